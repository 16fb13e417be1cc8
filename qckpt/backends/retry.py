"""Retries with exponential backoff and full jitter, as a wrapper around any backend."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from qckpt.backends._base import Backend
from qckpt.backends._reflock import ref_lock
from qckpt.errors import ObjectNotFoundError, TransientBackendError

T = TypeVar("T")
_log = logging.getLogger("qckpt")


class RetryingBackend(Backend):
    """Retries ``TransientBackendError`` up to ``attempts`` times, sleeping a random
    fraction of a delay that doubles from ``base_delay_s`` up to ``max_delay_s``.

    Permanent errors pass through at once. Every operation is safe to retry:
    puts are idempotent (content-addressed, exclusive puts compare content),
    the inner backend's ``swap_ref`` treats "already holds the new value" as
    done, and a retried ``delete`` that finds the key gone counts as done.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 8,
        base_delay_s: float = 0.05,
        max_delay_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.native_lock = inner.native_lock
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep
        self.retries = 0  # transient failures absorbed, for reports

    def _retry(self, operation: str, fn: Callable[[], T]) -> T:
        delay = self.base_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientBackendError as e:
                if attempt == self.attempts:
                    raise
                self.retries += 1
                _log.warning("%s: %s failed (%s); retry %d of %d", self.uri, operation, e, attempt, self.attempts - 1)
                self._sleep(random.uniform(0, delay))
                delay = min(delay * 2, self.max_delay_s)
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        self._retry("put", lambda: self.inner.put(key, data, exclusive=exclusive))

    def get(self, key: str) -> bytes:
        return self._retry("get", lambda: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._retry("get_range", lambda: self.inner.get_range(key, offset, length))

    def exists(self, key: str) -> bool:
        return self._retry("exists", lambda: self.inner.exists(key))

    def list(self, prefix: str) -> list[str]:
        return self._retry("list", lambda: self.inner.list(prefix))

    def size(self, key: str) -> int:
        return self._retry("size", lambda: self.inner.size(key))

    def delete(self, key: str) -> None:
        tried = []

        def attempt() -> None:
            try:
                self.inner.delete(key)
            except ObjectNotFoundError:
                if not tried:
                    raise
            finally:
                tried.append(True)

        self._retry("delete", attempt)

    def read_ref(self, name: str) -> str | None:
        return self._retry("read_ref", lambda: self.inner.read_ref(name))

    def list_refs(self, prefix: str) -> dict[str, str]:
        return self._retry("list_refs", lambda: self.inner.list_refs(prefix))

    def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
        self._retry("swap_ref", lambda: self.inner.swap_ref(name, expected, new))

    def lock(self, *, exclusive: bool) -> AbstractContextManager[None]:
        return self.inner.lock(exclusive=exclusive) if self.native_lock else ref_lock(self, exclusive=exclusive)

    def close(self) -> None:
        self.inner.close()
