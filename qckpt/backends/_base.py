"""The backend interface every storage implements (memory, local disk, S3)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from qckpt.backends._reflock import Lease, ref_lock
from qckpt.errors import InvalidInputError

_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=-]*")
REFS_NAMESPACE = "refs"  # where backends keep refs; no blob key may start with it


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers the layers above, as data (wrappers pass their inner
    backend's on, so wrapping never changes behaviour).

    ``native_lock``: ``lock`` is a native lock (flock, in-process) rather than
    lock refs. ``index``: where the chunk index belongs: ``"memory"`` (the
    repository lives no longer than the process), ``"local"`` (in
    ``local_dir``, a directory beside the data that only this backend's
    users see), or ``"cache"`` (a per-user cache directory: remote storage).
    """

    native_lock: bool = False
    index: Literal["memory", "local", "cache"] = "cache"
    local_dir: Path | None = None

    @property
    def remote(self) -> bool:
        """The data lives on another machine (every byte written is an upload)."""
        return self.index == "cache"

    def __post_init__(self) -> None:
        if (self.index == "local") != (self.local_dir is not None):
            raise ValueError("local_dir is required for, and only for, index='local'")


Buffer = Union[bytes, bytearray, memoryview]


def joined(data: Buffer | Sequence[Buffer]) -> Buffer:
    """``data`` as one buffer: itself, or a sequence of buffers joined back to back."""
    return data if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(data)


@dataclass(frozen=True)
class MappedBlob:
    """A whole stored value in memory: ``view`` is read-only; ``private()`` returns a
    writable view of the same bytes whose writes reach neither storage nor ``view``
    (a copy-on-write mapping where the backend maps files, else a copy; each call
    returns a new one). ``mapped``: the first ``private()`` is such a mapping, so
    it copies nothing up front (only the pages that are written, when written)."""

    view: memoryview
    private: Callable[[], memoryview]
    mapped: bool = False


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key (``a/b.c``), else raise ``InvalidInputError``.

    Keys are '/'-separated parts of letters, digits and ``._+@=-``, each starting
    with a letter or digit, so no key can escape a backend's root (no ``..``,
    no absolute paths, no hidden files).
    """
    parts = key.split("/")
    if not key or any(not _KEY_PART.fullmatch(p) for p in parts):
        raise InvalidInputError(f"invalid storage key {key!r}")
    return key


def check_blob_key(key: str) -> str:
    """``check_key``, and not in the reserved refs namespace (every backend's blob methods call this)."""
    if check_key(key).split("/", 1)[0] == REFS_NAMESPACE:
        raise InvalidInputError(f"key {key!r} is in the reserved {REFS_NAMESPACE!r} namespace")
    return key


class Backend(ABC):
    """A store of immutable blobs under string keys, plus mutable refs.

    Contract:

    * ``put`` writes a whole value atomically: readers see all of it or nothing.
      Keys hold content-addressed data, so putting an existing key again with
      the same bytes is harmless; with ``exclusive=True`` an existing key raises
      ``AlreadyExistsError`` instead.
    * ``get``/``get_range``/``delete`` raise ``ObjectNotFoundError`` for a missing key.
    * Refs are small text values (snapshot ids) that change only through
      ``swap_ref``, a compare-and-swap: two writers never silently overwrite
      each other.
    * Every method is safe to call from several threads at once.
    * Storage failures surface as ``BackendError``; never as a silent success.
    """

    #: Where the repository lives, for messages (never contains credentials).
    uri: str
    #: What this backend offers (see ``Capabilities``).
    capabilities: Capabilities = Capabilities()
    #: Lock refs (see ``lock``): renewed every ``lock_refresh_s``; one not renewed
    #: for ``lock_stale_s`` is a crashed holder's, ignored and deleted.
    lock_refresh_s: float = 5.0
    lock_stale_s: float = 30.0

    @abstractmethod
    def put(self, key: str, data: Buffer | Sequence[Buffer], *, exclusive: bool = False) -> None:
        """Store ``data`` (a buffer, or a sequence of buffers stored back to back)
        under ``key`` atomically."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole value under ``key``."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the value under ``key`` starting at ``offset``.

        A range reaching past the end of the value returns fewer bytes (callers verify).
        """

    def put_cache(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """``put`` for data that is a cache (verified when read, rebuilt or done without
        when missing): readers still see all of it or nothing, but it need not
        survive a power loss. ``data`` may be a sequence of buffers, stored back to
        back. This default calls ``put``; the local backend skips the fsyncs."""
        self.put(key, data)

    def map(self, key: str, whole: bool = True) -> MappedBlob:
        """The whole value under ``key`` in memory (see ``MappedBlob``). This default
        reads it with ``get``; backends on local files map them instead, reading the
        whole file ahead if the caller will read the ``whole`` value (or most of
        it), else only the pages touched."""
        data = self.get(key)
        return MappedBlob(memoryview(data), lambda: memoryview(bytearray(data)))

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a value is stored under ``key``."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys that start with ``prefix``, sorted."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Length in bytes of the value under ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the value under ``key``."""

    @abstractmethod
    def read_ref(self, name: str) -> str | None:
        """The value of ref ``name`` (like ``heads/main``), or ``None`` if absent. Bytes
        that are not UTF-8 read as U+FFFD (the layer above judges the value)."""

    @abstractmethod
    def list_refs(self, prefix: str) -> dict[str, str]:
        """All refs whose name starts with ``prefix``, as name -> value."""

    @abstractmethod
    def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
        """Set ref ``name`` to ``new`` if it currently holds ``expected``.

        ``expected=None`` means "must not exist" (create); ``new=None`` deletes.
        Raises ``RefConflictError`` (with the actual value) when the ref differs.
        """

    def lock(self, *, exclusive: bool) -> AbstractContextManager[Lease]:
        """Hold the repository-wide writer lock until the context exits; the
        context's value is a ``Lease`` to ``check()`` before irreversible steps.

        Writers that add data (commits) hold it shared, garbage collection holds
        it exclusive, so GC never deletes an object a commit is about to
        reference. Blocks until granted; a dead holder's lock blocks others for
        at most ``lock_stale_s``. This default builds the lock from refs (see
        ``_reflock``); backends with a native lock override it and say so in
        ``capabilities``.
        """
        return ref_lock(self, exclusive=exclusive, refresh_s=self.lock_refresh_s, stale_s=self.lock_stale_s)

    def close(self) -> None:
        """Release resources. The backend must not be used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
