"""Writing arrays inside a store transaction: chunk, hash, dedup, encode, pack, index.

``write_arrays`` is what every writer that stores tensor bytes calls from its
transaction's build step (commits, averages): chunks are identified by the
digest of their raw bytes, only chunks the index does not know are encoded,
predicted from ``base`` (a hot snapshot) where that is smaller, in waves (a
wave only predicts from chunks of earlier waves), in the store's thread pool
with a bounded number in flight; packs are written, then indexed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future

from qckpt.commit.encoding import ChunkPlan, EncodePlanner, EncodingChoices, chunk_view
from qckpt.commit.hot import HotSnapshot
from qckpt.commit.predict import ParamRule
from qckpt.commit.staging import StagedArray
from qckpt.format.ids import digest
from qckpt.format.objects import EncodedObject, encode_object
from qckpt.format.packs import ChunkLocation, PackBuilder
from qckpt.format.records import CommitStats, TensorEntry
from qckpt.format.tensors import is_floating
from qckpt.store.store import Transaction

PACK_TARGET_SIZE = 64 << 20


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
    store = txn.store
    size = store.config.chunk_size
    entries: list[TensorEntry] = []
    first: dict[bytes, tuple[StagedArray, int]] = {}  # chunk id -> (array, chunk number) of its first occurrence
    for array in staged:
        ids = tuple(digest(array.data[o : o + size].data) for o in range(0, array.data.size, size))
        for number, chunk_id in enumerate(ids):
            first.setdefault(chunk_id, (array, number))
        entries.append(TensorEntry(array.path, array.kind, array.dtype, array.shape, size, ids))
    missing = store.index.missing(first)
    new = [cid for cid in first if cid in missing]
    planner = EncodePlanner(store.index, size, store.config.max_chain, staged, entries, base, rules, step, missing, choices)
    waves: dict[int, list[bytes]] = {}
    for chunk_id in new:
        waves.setdefault(planner.wave(*first[chunk_id]), []).append(chunk_id)
    locations, stored = _write_packs(txn, [waves[w] for w in sorted(waves)], first, planner)
    store.index.put_many(locations)
    stats = CommitStats(sum(a.data.size for a in staged), sum(len(e.chunks) for e in entries), len(new),
                        sum(chunk_view(*first[c], size).size for c in new), stored, notes)  # fmt: skip
    return entries, stats


def _write_packs(
    txn: Transaction, waves: list[list[bytes]], first: Mapping[bytes, tuple[StagedArray, int]], planner: EncodePlanner
) -> tuple[dict[bytes, ChunkLocation], int]:
    store = txn.store
    level = store.config.compression_level
    size = store.config.chunk_size
    builder = PackBuilder()
    locations: dict[bytes, ChunkLocation] = {}
    stored = 0
    max_in_flight = 4 * store.workers
    for wave in waves:
        pending: deque[tuple[bytes, ChunkPlan, Future[EncodedObject]]] = deque()
        todo = iter(wave)
        while True:
            for chunk_id in todo:
                array, number = first[chunk_id]
                plan = planner.plan(chunk_id, array, number)
                pending.append((chunk_id, plan, store.pool.submit(
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
            builder.add(chunk_id, obj.codec, obj.data, depth, obj.deps)
            stored += len(obj.data)
            if builder.size >= PACK_TARGET_SIZE:
                locations.update(store.put_pack(builder))
    if len(builder):
        locations.update(store.put_pack(builder))
    return locations, stored
