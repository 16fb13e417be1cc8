"""An in-process backend for tests and throwaway repositories."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from qckpt.backends._base import Backend, Buffer, Capabilities, check_blob_key, check_key, joined
from qckpt.backends._reflock import Lease
from qckpt.errors import AlreadyExistsError, ObjectNotFoundError, RefConflictError


class MemoryBackend(Backend):
    """Blobs and refs in dictionaries, guarded by one lock. Lost when the process ends."""

    capabilities = Capabilities(native_lock=True, index="memory")

    def __init__(self, name: str = "") -> None:
        self.uri = f"memory://{name}"
        self._blobs: dict[str, bytes] = {}
        self._refs: dict[str, str] = {}
        self._lock = threading.Lock()
        self._writers = threading.Condition()
        self._shared_holders = 0
        self._exclusive_held = False

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        check_blob_key(key)
        value = bytes(joined(data))
        with self._lock:
            if exclusive and key in self._blobs:
                raise AlreadyExistsError(f"{self.uri}: key {key!r} exists already")
            self._blobs[key] = value

    def _blob(self, key: str) -> bytes:
        check_blob_key(key)
        with self._lock:
            try:
                return self._blobs[key]
            except KeyError:
                raise ObjectNotFoundError(f"{self.uri}: no object {key!r}") from None

    def get(self, key: str) -> bytes:
        return self._blob(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._blob(key)[offset : offset + length]

    def exists(self, key: str) -> bool:
        check_blob_key(key)
        with self._lock:
            return key in self._blobs

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._blobs if k.startswith(prefix))

    def size(self, key: str) -> int:
        return len(self._blob(key))

    def delete(self, key: str) -> None:
        check_blob_key(key)
        with self._lock:
            if self._blobs.pop(key, None) is None:
                raise ObjectNotFoundError(f"{self.uri}: no object {key!r}")

    def read_ref(self, name: str) -> str | None:
        check_key(name)
        with self._lock:
            return self._refs.get(name)

    def list_refs(self, prefix: str) -> dict[str, str]:
        with self._lock:
            return {k: v for k, v in sorted(self._refs.items()) if k.startswith(prefix)}

    def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
        check_key(name)
        with self._lock:
            actual = self._refs.get(name)
            if actual != expected:
                raise RefConflictError(name, expected, actual)
            if new is None:
                del self._refs[name]
            else:
                self._refs[name] = new

    @contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[Lease]:
        with self._writers:
            if exclusive:
                self._writers.wait_for(lambda: not self._exclusive_held and self._shared_holders == 0)
                self._exclusive_held = True
            else:
                self._writers.wait_for(lambda: not self._exclusive_held)
                self._shared_holders += 1
        try:
            yield Lease()
        finally:
            with self._writers:
                if exclusive:
                    self._exclusive_held = False
                else:
                    self._shared_holders -= 1
                self._writers.notify_all()
