"""Reading objects: fetch, resolve dependencies, decode and verify, in parallel.

``ChunkReader.read`` takes the chunk ids wanted, follows their dependencies in
the chunk index (no object is read to discover what it depends on), and splits
the whole dependency closure into independent groups (connected components:
typically one chunk slot of a parameter and its optimizer moments along a
chain). Groups are processed in batches of bounded encoded size: each batch is
fetched with coalesced ranged reads (neighbouring objects of one pack in one
request), then every group is decoded in the thread pool in dependency order,
keeping a decoded dependency only until its last dependent is done. Every
object, dependencies included, is digest-checked.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Executor
from typing import Protocol

from qckpt.errors import IntegrityError, ObjectNotFoundError
from qckpt.format.codecs import Raw
from qckpt.format.objects import decode_object
from qckpt.format.packs import ChunkLocation
from qckpt.store.layout import pack_key

READ_GAP = 1 << 20  # objects at most this far apart in a pack are fetched with one read
READ_SPAN = 64 << 20  # ... as long as that read stays this short
BATCH_BYTES = 256 << 20  # encoded bytes fetched (and held) at once


class RangeReader(Protocol):
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...


def describe(chunk_id: bytes, location: ChunkLocation) -> str:
    return f"object {chunk_id.hex()} (pack {location.pack_id}, offset {location.offset})"


class ChunkReader:
    """Reads chunks located by ``locate`` (an index lookup) from ``backend``, with
    ``fetch_pool`` for parallel fetches and ``decode_pool`` (about a thread per
    core: decoding is CPU-bound) for parallel decodes. When a chunk is not in the index
    (or not where it says), ``refresh`` (an index rebuild; none if not given) runs
    at most once per ``read``; a chunk still not found after it is missing.
    Thread-safe."""

    def __init__(
        self,
        backend: RangeReader,
        locate: Callable[[bytes], ChunkLocation | None],
        fetch_pool: Executor,
        decode_pool: Executor,
        refresh: Callable[[], object] | None = None,
    ) -> None:
        self._backend = backend
        self._index_get = locate
        self._refresh = refresh
        self._fetch_pool = fetch_pool
        self._decode_pool = decode_pool

    def _locator(self) -> Callable[[bytes, ChunkLocation | None], ChunkLocation | None]:
        """An index lookup that refreshes the index, once, on the first chunk that is
        unknown or known only at ``not_at`` (where it turned out not to be)."""
        lock = threading.Lock()
        refreshed = self._refresh is None

        def locate(chunk_id: bytes, not_at: ChunkLocation | None = None) -> ChunkLocation | None:
            nonlocal refreshed
            location = self._index_get(chunk_id)
            if (location is None or location == not_at) and not refreshed:
                with lock:
                    if not refreshed and self._refresh is not None:
                        self._refresh()
                        refreshed = True
                location = self._index_get(chunk_id)
            return location

        return locate

    def read(
        self,
        targets: Collection[bytes],
        deliver: Callable[[bytes, Raw], None],
        *,
        known: Mapping[bytes, memoryview] | None = None,
        _again: bool = False,
    ) -> dict[bytes, IntegrityError]:
        """Decode each of ``targets`` and call ``deliver(chunk_id, raw)`` (from pool
        threads, once per target). Returns the targets that could not be read, each
        with an ``IntegrityError`` naming the object (or the dependency) at fault.

        ``known``: chunks whose raw bytes the caller has already verified (a warm
        copy): delivered as they are, and where a chain reaches one it stops there.

        An object that fails verification where the index placed it is looked up
        again (pack footers re-read, once): if the footers place it elsewhere (a
        damaged index entry), the failed targets are read once more from there."""
        known = known or {}
        wanted = set(targets)
        for chunk_id in wanted & known.keys():
            deliver(chunk_id, known[chunk_id])
        locate = self._locator()
        locations: dict[bytes, ChunkLocation] = {}
        errors: dict[bytes, IntegrityError] = {}
        stack = list(wanted - known.keys())
        while stack:
            chunk_id = stack.pop()
            if chunk_id in locations or chunk_id in errors or chunk_id in known:
                continue
            location = locate(chunk_id, None)
            if location is None:
                errors[chunk_id] = IntegrityError(f"object {chunk_id.hex()} is missing (in no pack)")
                continue
            locations[chunk_id] = location
            stack.extend(location.deps)
        for batch in _batches(_components(locations), locations):
            data = self._fetch(batch, locations, errors, locate)
            tasks = [self._decode_pool.submit(self._decode_group, g, locations, data, errors, wanted, deliver, known) for g in batch]
            for task in tasks:
                task.result()
        failed = {c: e for c, e in errors.items() if c in wanted}
        if failed and not _again and any(locate(c, loc) not in (None, loc) for c, loc in locations.items() if c in errors):
            return self.read(list(failed), deliver, known=known, _again=True)
        return failed

    def _decode_group(
        self,
        group: list[bytes],
        locations: dict[bytes, ChunkLocation],
        data: dict[bytes, memoryview],
        errors: dict[bytes, IntegrityError],
        wanted: set[bytes],
        deliver: Callable[[bytes, Raw], None],
        known: Mapping[bytes, memoryview],
    ) -> None:
        uses = Counter(d for c in group for d in locations[c].deps)
        decoded: dict[bytes, Raw] = {}

        def resolve(dep: bytes) -> Raw:
            if dep in decoded:
                return decoded[dep]
            if dep in known:
                return known[dep]
            raise IntegrityError(f"its dependency {dep.hex()} is not listed in the pack footer before it")

        for chunk_id in sorted(group, key=lambda c: locations[c].depth):
            location = locations[chunk_id]
            broken = next((d for d in location.deps if d in errors), None)
            if chunk_id in errors:
                pass
            elif broken is not None:
                errors[chunk_id] = IntegrityError(
                    f"{describe(chunk_id, location)} depends on object {broken.hex()}, which cannot be read: {errors[broken]}"
                )
            else:
                try:
                    raw = decode_object(data[chunk_id], chunk_id, resolve)
                except IntegrityError as e:
                    errors[chunk_id] = IntegrityError(f"{describe(chunk_id, location)}: {e}")
                else:
                    if chunk_id in wanted:
                        deliver(chunk_id, raw)
                    if uses[chunk_id]:
                        decoded[chunk_id] = raw
            data.pop(chunk_id, None)
            for dep in location.deps:
                uses[dep] -= 1
                if uses[dep] == 0:
                    decoded.pop(dep, None)

    def _fetch(
        self,
        batch: list[list[bytes]],
        locations: dict[bytes, ChunkLocation],
        errors: dict[bytes, IntegrityError],
        locate: Callable[[bytes, ChunkLocation | None], ChunkLocation | None],
    ) -> dict[bytes, memoryview]:
        """The encoded objects of ``batch``; coalesced ranged reads in parallel."""
        by_pack: dict[str, list[tuple[bytes, ChunkLocation]]] = {}
        for group in batch:
            for chunk_id in group:
                by_pack.setdefault(locations[chunk_id].pack_id, []).append((chunk_id, locations[chunk_id]))
        data: dict[bytes, memoryview] = {}

        def read_one(chunk_id: bytes, location: ChunkLocation) -> None:
            moved = locate(chunk_id, location)  # garbage collection may have repacked it meanwhile
            if moved is None or moved == location:
                errors[chunk_id] = IntegrityError(f"{describe(chunk_id, location)}: pack is missing")
                return
            locations[chunk_id] = moved
            data[chunk_id] = memoryview(self._backend.get_range(pack_key(moved.pack_id), moved.offset, moved.length))

        def read_span(pack_id: str, span: list[tuple[bytes, ChunkLocation]]) -> None:
            start = span[0][1].offset
            end = max(loc.offset + loc.length for _, loc in span)
            try:
                view = memoryview(self._backend.get_range(pack_key(pack_id), start, end - start))
            except ObjectNotFoundError:
                for chunk_id, location in span:
                    read_one(chunk_id, location)
                return
            for chunk_id, loc in span:
                data[chunk_id] = view[loc.offset - start : loc.offset - start + loc.length]

        tasks = []
        for pack_id, located in by_pack.items():
            located.sort(key=lambda item: item[1].offset)
            span = [located[0]]
            span_end = located[0][1].offset + located[0][1].length
            for item in located[1:]:
                if item[1].offset - span_end <= READ_GAP and item[1].offset + item[1].length - span[0][1].offset <= READ_SPAN:
                    span.append(item)
                else:
                    tasks.append(self._fetch_pool.submit(read_span, pack_id, span))
                    span, span_end = [item], 0
                span_end = max(span_end, item[1].offset + item[1].length)
            tasks.append(self._fetch_pool.submit(read_span, pack_id, span))
        for task in tasks:
            task.result()
        return data


def _components(locations: dict[bytes, ChunkLocation]) -> list[list[bytes]]:
    """Groups of chunks connected by dependencies (union-find)."""
    parent = {c: c for c in locations}

    def find(c: bytes) -> bytes:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for chunk_id, location in locations.items():
        for dep in location.deps:
            if dep in parent:
                parent[find(chunk_id)] = find(dep)
    groups: dict[bytes, list[bytes]] = {}
    for chunk_id in locations:
        groups.setdefault(find(chunk_id), []).append(chunk_id)
    return list(groups.values())


def _batches(groups: Iterable[list[bytes]], locations: dict[bytes, ChunkLocation]) -> Iterable[list[list[bytes]]]:
    batch: list[list[bytes]] = []
    size = 0
    for group in groups:
        batch.append(group)
        size += sum(locations[c].length for c in group)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
