"""A backend wrapper that injects transient failures, before or after the real operation."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from qckpt.backends import Backend, Lease
from qckpt.errors import TransientBackendError

T = TypeVar("T")


class FaultyBackend(Backend):
    """Fails a fraction of calls with ``TransientBackendError``: half before the call
    reaches ``inner`` (a refused request), half after it took effect (a dropped
    response). Seeded, so a failing run can be replayed."""

    def __init__(self, inner: Backend, rate: float, seed: int = 0) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.capabilities = inner.capabilities
        self.rate = rate
        self.random = random.Random(seed)
        self.injected = {"before": 0, "after": 0}

    def _maybe(self, operation: str, fn: Callable[[], T]) -> T:
        roll = self.random.random()
        if roll < self.rate / 2:
            self.injected["before"] += 1
            raise TransientBackendError(f"injected: {operation} refused")
        result = fn()
        if roll < self.rate:
            self.injected["after"] += 1
            raise TransientBackendError(f"injected: {operation} response dropped")
        return result

    def put(self, key, data, *, exclusive=False):  # type: ignore[no-untyped-def]
        return self._maybe("put", lambda: self.inner.put(key, data, exclusive=exclusive))

    def get(self, key):  # type: ignore[no-untyped-def]
        return self._maybe("get", lambda: self.inner.get(key))

    def get_range(self, key, offset, length):  # type: ignore[no-untyped-def]
        return self._maybe("get_range", lambda: self.inner.get_range(key, offset, length))

    def exists(self, key):  # type: ignore[no-untyped-def]
        return self._maybe("exists", lambda: self.inner.exists(key))

    def list(self, prefix):  # type: ignore[no-untyped-def]
        return self._maybe("list", lambda: self.inner.list(prefix))

    def size(self, key):  # type: ignore[no-untyped-def]
        return self._maybe("size", lambda: self.inner.size(key))

    def delete(self, key):  # type: ignore[no-untyped-def]
        return self._maybe("delete", lambda: self.inner.delete(key))

    def read_ref(self, name):  # type: ignore[no-untyped-def]
        return self._maybe("read_ref", lambda: self.inner.read_ref(name))

    def list_refs(self, prefix):  # type: ignore[no-untyped-def]
        return self._maybe("list_refs", lambda: self.inner.list_refs(prefix))

    def swap_ref(self, name, expected, new):  # type: ignore[no-untyped-def]
        return self._maybe("swap_ref", lambda: self.inner.swap_ref(name, expected, new))

    def lock(self, *, exclusive: bool) -> AbstractContextManager[Lease]:
        return self.inner.lock(exclusive=exclusive)
