"""Retries with exponential backoff and full jitter, as a wrapper around any backend."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from qckpt.backends._base import Backend, Buffer, MappedBlob, joined
from qckpt.backends._reflock import Lease
from qckpt.errors import AlreadyExistsError, ObjectNotFoundError, RefConflictError, TransientBackendError

T = TypeVar("T")
_log = logging.getLogger("qckpt")


class RetryingBackend(Backend):
    """Retries ``TransientBackendError`` up to ``attempts`` times, sleeping a random
    fraction of a delay that doubles from ``base_delay_s`` up to ``max_delay_s``.

    Permanent errors pass through at once. A request that failed transiently may
    still have taken effect (its response was lost), so after such a failure a
    retry that finds its own effect counts as done: an exclusive put that finds
    the same bytes, a ref swap that finds the ref already holding the new value
    (refs hold unique snapshot ids), a delete that finds the key gone.
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
        self.capabilities = inner.capabilities
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep
        self.retries = 0  # transient failures absorbed, for reports

    def _retry(self, operation: str, fn: Callable[[bool], T]) -> T:
        """Call ``fn(after_transient_failure)`` until it succeeds or fails permanently."""
        delay = self.base_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(attempt > 1)
            except TransientBackendError as e:
                if attempt == self.attempts:
                    raise
                self.retries += 1
                _log.warning("%s: %s failed (%s); retry %d of %d", self.uri, operation, e, attempt, self.attempts - 1)
                self._sleep(random.uniform(0, delay))
                delay = min(delay * 2, self.max_delay_s)
        raise AssertionError("unreachable")

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        def attempt(retried: bool) -> None:
            try:
                self.inner.put(key, data, exclusive=exclusive)
            except AlreadyExistsError:
                if not (retried and self.inner.get(key) == bytes(joined(data))):
                    raise

        self._retry("put", attempt)

    def put_cache(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        self._retry("put_cache", lambda retried: self.inner.put_cache(key, data))

    def get(self, key: str) -> bytes:
        return self._retry("get", lambda retried: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._retry("get_range", lambda retried: self.inner.get_range(key, offset, length))

    def map(self, key: str, whole: bool = True) -> MappedBlob:
        return self._retry("map", lambda retried: self.inner.map(key, whole))

    def exists(self, key: str) -> bool:
        return self._retry("exists", lambda retried: self.inner.exists(key))

    def list(self, prefix: str) -> list[str]:
        return self._retry("list", lambda retried: self.inner.list(prefix))

    def size(self, key: str) -> int:
        return self._retry("size", lambda retried: self.inner.size(key))

    def delete(self, key: str) -> None:
        def attempt(retried: bool) -> None:
            try:
                self.inner.delete(key)
            except ObjectNotFoundError:
                if not retried:
                    raise

        self._retry("delete", attempt)

    def read_ref(self, name: str) -> str | None:
        return self._retry("read_ref", lambda retried: self.inner.read_ref(name))

    def list_refs(self, prefix: str) -> dict[str, str]:
        return self._retry("list_refs", lambda retried: self.inner.list_refs(prefix))

    def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
        def attempt(retried: bool) -> None:
            try:
                self.inner.swap_ref(name, expected, new)
            except RefConflictError as e:
                if not (retried and e.actual == new):
                    raise

        self._retry("swap_ref", attempt)

    @property
    def lock_refresh_s(self) -> float:  # type: ignore[override]
        return self.inner.lock_refresh_s

    @property
    def lock_stale_s(self) -> float:  # type: ignore[override]
        return self.inner.lock_stale_s

    def lock(self, *, exclusive: bool) -> AbstractContextManager[Lease]:
        # lock refs through this wrapper, so their requests are retried too
        return self.inner.lock(exclusive=exclusive) if self.capabilities.native_lock else super().lock(exclusive=exclusive)

    def close(self) -> None:
        self.inner.close()
