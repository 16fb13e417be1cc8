"""The chunk index: chunk id -> where its object is stored.

The index is a cache of what the pack footers say: ``Repository.rebuild_index``
recreates it from the packs. It is written after the packs it describes and
before any manifest that needs it (write order), so a reader that finds a
manifest also finds its chunks here.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import lmdb

from qckpt.errors import BackendError
from qckpt.format.ids import ID_BYTES
from qckpt.format.packs import ChunkLocation

_VALUE = struct.Struct(f"<{ID_BYTES}sQIBB")  # pack id, offset, length, codec, depth; then dependency ids
_V1_VALUE = struct.Struct(f"<{ID_BYTES}sQIB")  # written by qckpt before delta codecs: self-contained objects
_log = logging.getLogger("qckpt")
_GENERATION_KEY = b"qckpt:gc-generation"  # not 16 bytes long: never a chunk id


class ChunkIndex(ABC):
    """Maps 16-byte chunk ids to locations. Thread-safe; only garbage collection removes entries."""

    @abstractmethod
    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        """The location of ``chunk_id``, or None when unknown."""

    @abstractmethod
    def get_many(self, chunk_ids: Iterable[bytes]) -> dict[bytes, ChunkLocation]:
        """The locations of those of ``chunk_ids`` the index knows (one read
        transaction: a caller with many to look up crosses into the index once)."""

    @abstractmethod
    def put_many(self, locations: Mapping[bytes, ChunkLocation]) -> None:
        """Record locations durably (one transaction)."""

    @abstractmethod
    def remove_many(self, chunk_ids: Iterable[bytes]) -> None:
        """Forget chunks (garbage collection only, under the exclusive writer lock)."""

    @abstractmethod
    def clear(self) -> None:
        """Forget everything (before a rebuild from the packs)."""

    @abstractmethod
    def entries_in(self, pack_ids: Iterable[str]) -> dict[bytes, ChunkLocation]:
        """Every entry that places a chunk in one of ``pack_ids`` (reads the whole index)."""

    @abstractmethod
    def generation(self) -> str | None:
        """The garbage-collection generation this index reflects (None: unknown)."""

    @abstractmethod
    def set_generation(self, generation: str | None) -> None:
        """Record which garbage-collection generation this index reflects."""

    @abstractmethod
    def __len__(self) -> int: ...

    def close(self) -> None:
        """Release resources."""


class MemoryIndex(ChunkIndex):
    """A dictionary, for memory-backed repositories."""

    def __init__(self) -> None:
        self._map: dict[bytes, ChunkLocation] = {}
        self._generation: str | None = None
        self._lock = threading.Lock()

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        with self._lock:
            return self._map.get(chunk_id)

    def get_many(self, chunk_ids: Iterable[bytes]) -> dict[bytes, ChunkLocation]:
        with self._lock:
            return {c: self._map[c] for c in chunk_ids if c in self._map}

    def put_many(self, locations: Mapping[bytes, ChunkLocation]) -> None:
        with self._lock:
            self._map.update(locations)

    def remove_many(self, chunk_ids: Iterable[bytes]) -> None:
        with self._lock:
            for c in chunk_ids:
                self._map.pop(c, None)

    def clear(self) -> None:
        with self._lock:
            self._map.clear()

    def entries_in(self, pack_ids: Iterable[str]) -> dict[bytes, ChunkLocation]:
        wanted = set(pack_ids)
        with self._lock:
            return {c: loc for c, loc in self._map.items() if loc.pack_id in wanted}

    def generation(self) -> str | None:
        return self._generation

    def set_generation(self, generation: str | None) -> None:
        self._generation = generation

    def __len__(self) -> int:
        with self._lock:
            return len(self._map)


def _encode(loc: ChunkLocation) -> bytes:
    return _VALUE.pack(bytes.fromhex(loc.pack_id), loc.offset, loc.length, loc.codec, loc.depth) + b"".join(loc.deps)


def _decode(value: bytes) -> ChunkLocation:
    if len(value) == _V1_VALUE.size:
        pack, offset, length, codec = _V1_VALUE.unpack(value)
        return ChunkLocation(pack.hex(), offset, length, codec)
    pack, offset, length, codec, depth = _VALUE.unpack_from(value)
    deps = value[_VALUE.size :]
    return ChunkLocation(pack.hex(), offset, length, codec, depth,
                         tuple(deps[i : i + ID_BYTES] for i in range(0, len(deps), ID_BYTES)))  # fmt: skip


class _SharedEnv:
    """One LMDB environment per path per process (LMDB forbids opening it twice), refcounted."""

    _lock = threading.Lock()
    _open: dict[str, tuple[lmdb.Environment, int]] = {}

    @classmethod
    def acquire(cls, path: Path) -> lmdb.Environment:
        key = os.path.realpath(path)
        with cls._lock:
            env, count = cls._open.get(key, (None, 0))
            if env is None:
                env = _open_checked(path)
            cls._open[key] = (env, count + 1)
            return env

    @classmethod
    def release(cls, env: lmdb.Environment) -> None:
        key = env.path()
        with cls._lock:
            env, count = cls._open[key]
            if count == 1:
                del cls._open[key]
                env.close()
            else:
                cls._open[key] = (env, count - 1)


def _open_checked(path: Path) -> lmdb.Environment:
    """Open the LMDB environment at ``path``; one that is damaged -- unreadable, or
    shorter than its own meta page says (a truncated ``data.mdb`` would make reads
    past its end kill the process with SIGBUS) -- is deleted and started afresh:
    the index is a cache, rebuilt from the pack footers."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        try:
            env = lmdb.open(str(path), map_size=1 << 30, max_dbs=0, subdir=True)
            needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
            if os.path.getsize(path / "data.mdb") >= needed:
                return env
            env.close()
            reason = f"data.mdb is shorter than the {needed} bytes its meta page claims"
        except lmdb.Error as e:
            reason = str(e)
        _log.warning("chunk index at %s is damaged (%s): starting it afresh, it is rebuilt from the packs", path, reason)
        shutil.rmtree(path)
        path.mkdir(parents=True)
        return lmdb.open(str(path), map_size=1 << 30, max_dbs=0, subdir=True)
    except (lmdb.Error, OSError) as e:
        raise BackendError(f"cannot open chunk index at {path}: {e}") from e


class LmdbIndex(ChunkIndex):
    """An LMDB database in a directory; safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._env: lmdb.Environment | None = _SharedEnv.acquire(path)
        self._grow_lock = threading.Lock()

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise BackendError(f"chunk index at {self.path} is closed")
        return self._env

    def get(self, chunk_id: bytes) -> ChunkLocation | None:
        with self.env.begin() as txn:
            value = txn.get(chunk_id)
        return None if value is None else _decode(value)

    def get_many(self, chunk_ids: Iterable[bytes]) -> dict[bytes, ChunkLocation]:
        with self.env.begin() as txn:
            values = {c: txn.get(c) for c in chunk_ids}
        return {c: _decode(v) for c, v in values.items() if v is not None}

    def _write(self, fn: Callable[[lmdb.Transaction], None]) -> None:
        """Run ``fn`` in a write transaction, growing the map when LMDB reports it full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                with self._grow_lock:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as e:
                raise BackendError(f"chunk index at {self.path}: {e}") from e

    def put_many(self, locations: Mapping[bytes, ChunkLocation]) -> None:
        items = [(cid, _encode(loc)) for cid, loc in locations.items()]

        def write(txn: lmdb.Transaction) -> None:
            for cid, value in items:
                txn.put(cid, value)

        self._write(write)

    def remove_many(self, chunk_ids: Iterable[bytes]) -> None:
        ids = list(chunk_ids)

        def remove(txn: lmdb.Transaction) -> None:
            for cid in ids:
                txn.delete(cid)

        self._write(remove)

    def clear(self) -> None:
        self._write(lambda txn: txn.drop(self.env.open_db(), delete=False))

    def entries_in(self, pack_ids: Iterable[str]) -> dict[bytes, ChunkLocation]:
        wanted = set(pack_ids)
        with self.env.begin() as txn:
            entries = ((bytes(k), _decode(v)) for k, v in txn.cursor() if k != _GENERATION_KEY)
            return {c: loc for c, loc in entries if loc.pack_id in wanted}

    def generation(self) -> str | None:
        with self.env.begin() as txn:
            value = txn.get(_GENERATION_KEY)
        return None if value is None else value.decode()

    def set_generation(self, generation: str | None) -> None:
        def write(txn: lmdb.Transaction) -> None:
            if generation is None:
                txn.delete(_GENERATION_KEY)
            else:
                txn.put(_GENERATION_KEY, generation.encode())

        self._write(write)

    def __len__(self) -> int:
        with self.env.begin() as txn:
            return self.env.stat()["entries"] - (txn.get(_GENERATION_KEY) is not None)

    def close(self) -> None:
        if self._env is not None:
            _SharedEnv.release(self._env)
            self._env = None
