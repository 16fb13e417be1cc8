"""Writing arrays inside a store transaction: chunk, hash, dedup, encode, pack, index.

``write_arrays`` is what every writer that stores tensor bytes calls from its
transaction's build step (commits, averages): chunks are identified by the
digest of their raw bytes, only chunks the index does not know are encoded,
predicted from ``base`` (a hot snapshot) where that is smaller, in waves (a
wave only predicts from chunks of earlier waves), in the store's thread pool
with a bounded number in flight; packs are written, then indexed.

``write_deferred`` and ``compact`` split that in two, for writers whose caller
waits for durability but not for compression (a ``torch.distributed.checkpoint``
save): the new chunks are first stored as they are (``DeferredCodec``), and a
later compaction, under a transaction of its own, stores them again encoded,
indexes them there and deletes the deferred packs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, wait

from qckpt.commit.encoding import ChunkPlan, EncodePlanner, EncodingChoices, chunk_view
from qckpt.commit.hot import HotSnapshot
from qckpt.commit.predict import ParamRule
from qckpt.commit.staging import StagedArray
from qckpt.errors import ObjectNotFoundError
from qckpt.format.codecs import DeferredCodec
from qckpt.format.ids import digest
from qckpt.format.objects import EncodedObject, deferred_object, encode_object
from qckpt.format.packs import ChunkLocation, PackBuilder
from qckpt.format.records import CommitStats, TensorEntry
from qckpt.format.tensors import is_floating
from qckpt.store.layout import pack_key
from qckpt.store.store import Transaction

PACK_TARGET_SIZE = 16 << 20  # a commit's packs but the last are written while it encodes (docs/design.md)
MAX_PACK_WRITES = 2  # packs being written while a writer encodes on
DEFERRED_NOTE = "stored raw, encoded afterwards"  # in the stats of a commit written by ``write_deferred``


def write_arrays(
    txn: Transaction,
    staged: Sequence[StagedArray],
    base: HotSnapshot | None,
    rules: Mapping[str, ParamRule],
    step: int | None,
    notes: tuple[str, ...] = (),
    choices: EncodingChoices | None = None,
) -> tuple[list[TensorEntry], CommitStats]:
    """Store every staged array; returns their manifest entries and the commit's sizes
    (``notes`` are recorded in the stats as they are). ``choices``: the writer's
    memory of which encodings won (see ``EncodingChoices``)."""
    entries, first, new = _chunks(txn, staged)
    stored = _encode(txn, staged, entries, first, new, base, rules, step, choices)
    return entries, _stats(txn, staged, entries, first, new, stored, notes)


def write_deferred(txn: Transaction, staged: Sequence[StagedArray]) -> tuple[list[TensorEntry], CommitStats, frozenset[bytes]]:
    """``write_arrays`` without the encoding: the new chunks are stored as they are,
    as ``DeferredCodec`` objects, and indexed. Returns the manifest entries, the
    sizes and the chunks written (what ``compact`` should encode). The objects
    hold ``staged``'s memory only until this returns."""
    entries, first, new = _chunks(txn, staged)
    store = txn.store
    packs = _Packs(txn)
    with packs.abandoned_on_failure():
        for chunk_id in new:
            array, number = first[chunk_id]
            packs.add(chunk_id, DeferredCodec.id, deferred_object(chunk_view(array, number, store.config.chunk_size), array.itemsize))
        locations = packs.finish()
    store.index.put_many(locations)
    return entries, _stats(txn, staged, entries, first, new, packs.stored, (DEFERRED_NOTE,)), frozenset(new)


def compact(
    txn: Transaction,
    staged: Sequence[StagedArray],
    entries: Sequence[TensorEntry],
    written: frozenset[bytes],
    base: HotSnapshot | None,
    rules: Mapping[str, ParamRule],
    step: int | None,
    choices: EncodingChoices | None = None,
) -> int:
    """Encode the chunks ``write_deferred`` wrote for ``staged`` (its ``entries``; ``written``) as
    ``write_arrays`` would have, index them in their new packs, then delete every
    pack that held only deferred chunks of this set. Chunks no longer indexed as
    deferred (a garbage collection deleted or moved them since) are left as they
    are. Returns the encoded bytes stored. Readers that still locate a chunk in a
    deleted pack look it up again (as after a repack by garbage collection)."""
    store = txn.store
    first = _first_occurrences(staged, entries)
    before = store.index.get_many(written)
    pending = {c for c, location in before.items() if location.codec == DeferredCodec.id}
    again = [c for c in first if c in pending]  # this save's chunks still deferred where it wrote them
    stored = _encode(txn, staged, entries, first, again, base, rules, step, choices)
    for pack_id in {before[c].pack_id for c in again}:
        try:
            if store.pack_contents(pack_id).keys() <= set(again):
                store.backend.delete(pack_key(pack_id))
        except ObjectNotFoundError:
            pass  # deleted already (a retried compaction)
    return stored


def _chunks(txn: Transaction, staged: Sequence[StagedArray]
            ) -> tuple[list[TensorEntry], dict[bytes, tuple[StagedArray, int]], list[bytes]]:  # fmt: skip
    """Every staged array's manifest entry (its chunks hashed), each distinct chunk's
    first occurrence and the chunks the index does not know."""
    size = txn.store.config.chunk_size
    entries = [TensorEntry(array.path, array.kind, array.dtype, array.shape, size,
                           tuple(digest(array.data[o : o + size].data) for o in range(0, array.data.size, size)))
               for array in staged]  # fmt: skip
    first = _first_occurrences(staged, entries)
    known = txn.store.index.get_many(first)
    return entries, first, [cid for cid in first if cid not in known]


def _first_occurrences(staged: Sequence[StagedArray], entries: Sequence[TensorEntry]) -> dict[bytes, tuple[StagedArray, int]]:
    """Each distinct chunk's first occurrence: (array, chunk number)."""
    first: dict[bytes, tuple[StagedArray, int]] = {}
    for array, entry in zip(staged, entries):
        for number, chunk_id in enumerate(entry.chunks):
            first.setdefault(chunk_id, (array, number))
    return first


def _encode(
    txn: Transaction,
    staged: Sequence[StagedArray],
    entries: Sequence[TensorEntry],
    first: Mapping[bytes, tuple[StagedArray, int]],
    new: Sequence[bytes],
    base: HotSnapshot | None,
    rules: Mapping[str, ParamRule],
    step: int | None,
    choices: EncodingChoices | None,
) -> int:
    """Encode and pack the ``new`` chunks, then index them; returns the bytes stored."""
    store = txn.store
    planner = EncodePlanner(store.index, store.config.chunk_size, store.config.max_chain, staged, entries, base, rules,
                            step, set(new), choices)  # fmt: skip
    waves: dict[int, list[bytes]] = {}
    for chunk_id in new:
        waves.setdefault(planner.wave(*first[chunk_id]), []).append(chunk_id)
    locations, stored = _write_packs(txn, [waves[w] for w in sorted(waves)], first, planner)
    store.index.put_many(locations)
    return stored


class _Packs:
    """Objects stored in packs of about ``PACK_TARGET_SIZE``, each pack stored as it
    fills: ``add`` them, then ``finish`` stores the last and returns every added
    chunk's location. ``stored``: the object bytes added.

    A full pack is written on the store's thread pool while objects go on being
    added (at most ``MAX_PACK_WRITES`` in flight, so at most that many packs are
    held in memory); ``finish`` waits for every write and raises the first
    failure. Add inside ``abandoned_on_failure``, so that a caller failing
    before ``finish`` leaves no write running."""

    def __init__(self, txn: Transaction) -> None:
        self._store = txn.store
        self._builder = PackBuilder()
        self._writes: deque[Future[dict[bytes, ChunkLocation]]] = deque()
        self._locations: dict[bytes, ChunkLocation] = {}
        self.stored = 0

    def add(self, chunk_id: bytes, codec: int, obj: bytes | Sequence[bytes | memoryview], depth: int = 1,
            deps: tuple[bytes, ...] = ()) -> None:  # fmt: skip
        before = self._builder.size
        self._builder.add(chunk_id, codec, obj, depth, deps)
        self.stored += self._builder.size - before
        if self._builder.size >= PACK_TARGET_SIZE:
            self._write()

    def finish(self) -> dict[bytes, ChunkLocation]:
        if len(self._builder):
            self._write()
        self._settle()
        return self._locations

    @contextmanager
    def abandoned_on_failure(self) -> Iterator[None]:
        """If the block fails, wait for the writes in flight before the failure goes
        on (the packs they write are never indexed: garbage)."""
        try:
            yield
        except BaseException as failure:
            self._settle(failure)
            raise

    def _settle(self, failure: BaseException | None = None) -> None:
        """Wait for every write in flight and take the locations of those that
        succeeded. Their failures are raised, the first with the others as its
        notes; given ``failure`` (one already on its way), all are noted on it."""
        wait(self._writes)
        writes, self._writes = self._writes, deque()
        failures = [e for e in (w.exception() for w in writes) if e is not None]
        for write in writes:
            if write.exception() is None:
                self._locations.update(write.result())
        raising = failure is None
        if failure is None:
            if not failures:
                return
            failure = failures[0]
        for other in failures:
            if other is not failure:
                failure.add_note(f"another pack write of this commit failed too: {other!r}")
        if raising:
            raise failure

    def _write(self) -> None:
        if len(self._writes) >= MAX_PACK_WRITES:
            self._locations.update(self._writes.popleft().result())
        self._writes.append(self._store.pool.submit(self._store.put_pack, self._builder))
        self._builder = PackBuilder()


def _stats(txn: Transaction, staged: Sequence[StagedArray], entries: Sequence[TensorEntry],
           first: Mapping[bytes, tuple[StagedArray, int]], new: Sequence[bytes], stored: int,
           notes: tuple[str, ...]) -> CommitStats:  # fmt: skip
    size = txn.store.config.chunk_size
    return CommitStats(sum(a.data.size for a in staged), sum(len(e.chunks) for e in entries), len(new),
                       sum(chunk_view(*first[c], size).size for c in new), stored, notes)  # fmt: skip


def _write_packs(
    txn: Transaction, waves: list[list[bytes]], first: Mapping[bytes, tuple[StagedArray, int]], planner: EncodePlanner
) -> tuple[dict[bytes, ChunkLocation], int]:
    store = txn.store
    level = store.config.compression_level
    size = store.config.chunk_size
    packs = _Packs(txn)
    max_in_flight = 4 * store.workers
    with packs.abandoned_on_failure():
        for wave in waves:
            pending: deque[tuple[bytes, ChunkPlan, Future[EncodedObject]]] = deque()
            todo = iter(wave)
            while True:
                for chunk_id in todo:
                    array, number = first[chunk_id]
                    plan = planner.plan(chunk_id, array, number)
                    pending.append((chunk_id, plan, store.compute.submit(
                        encode_object, chunk_view(array, number, size), array.itemsize, is_floating(array.dtype), level,
                        plan.candidates, choose=plan.choose,
                    )))  # fmt: skip
                    if len(pending) >= max_in_flight:
                        break
                if not pending:
                    break
                chunk_id, plan, future = pending.popleft()
                obj = future.result()
                depth = planner.encoded(chunk_id, first[chunk_id][0], plan, obj)
                packs.add(chunk_id, obj.codec, obj.data, depth, obj.deps)
        locations = packs.finish()
    return locations, packs.stored
