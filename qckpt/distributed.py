"""``torch.distributed.checkpoint`` (DCP) on a qckpt repository::

    writer = QckptWriter("ckpts", branch="main")        # on every rank; keep it across saves
    writer.step = step                                   # optional: recorded with the snapshot
    dcp.save(state_dict, storage_writer=writer)          # one snapshot on "main"
    dcp.load(state_dict, storage_reader=QckptReader("ckpts", "main"))

DCP plans: which rank writes which shard, one copy of a replicated tensor,
resharding on load (N ranks saved, M ranks or one process without
``torch.distributed`` load). qckpt stores, in two phases:

1. every rank (``write_data``) stages the items DCP gives it, writes their
   new chunks into packs as they are, durably, and indexes them
   (``Store.write_unpublished``): chunks already stored are not written again;
   it hands DCP each item's manifest entry. Then, on a thread of its own, the
   rank *compacts* what it wrote: a changed tensor is delta-encoded against the
   same item at this writer's previous save (hence keep the writer) and stored
   again, encoded, and the packs of the save's raw chunks are deleted; then
   it writes its warm part. The save waits for durability, not for the
   compression (``defer_encoding=False``: encode before returning, as before);
2. the coordinator (``finish``) gets every rank's entries from DCP, writes one
   manifest and one snapshot record and moves the branch by compare-and-swap,
   in the same transaction as ``Repository.commit``.

The coordinator holds the repository's writer lock shared from its set-up
(before any rank can write) until it has published, so garbage collection
never sweeps a rank's packs in between. A rank that dies mid-save fails DCP's
collective steps: nothing is published, the branch stays where it was, and
what was written meanwhile is garbage for the next GC. A coordinator whose
save failed keeps the lock until the writer's next save or ``close``.

The snapshot is an ordinary one (log, diff, fsck, gc and the CLI see it). Its
tree: ``{"dcp": {"format": 1, "metadata": bytes, "tensors": {key: tensor},
"objects": {key: bytes}}}``: DCP's ``Metadata`` pickled (as DCP itself stores
it: load only repositories you trust, as with DCP's own files), each tensor
item under its key (the fully qualified name; for a shard, ``@`` and its
offsets: ``layers.0.w@512,0``), and DCP's own serialisation of non-tensor
values. ``QckptReader`` reads only the chunks that cover what its rank asks for.

Not thread-safe: one save or load at a time per writer or reader. A
writer's compactions run one at a time, in save order, on its own thread; a
failed one is raised by the writer's next save or ``close`` (the save it
compacts is durable and published all the same: its chunks stay stored raw).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint import Metadata, StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from qckpt.commit.arrays import compact, write_arrays, write_deferred
from qckpt.commit.encoding import EncodingChoices
from qckpt.commit.hot import HotSnapshot
from qckpt.commit.predict import ParamRule
from qckpt.commit.staging import stage
from qckpt.errors import IntegrityError, InvalidInputError, StateMismatchError
from qckpt.format.ids import hex_id
from qckpt.format.records import WARM_PARTS_ANNOTATION, CommitStats, Manifest, Snapshot, TensorEntry
from qckpt.format.tensors import torch_dtype
from qckpt.format.tree import ArrayLeaf, encode_plain, encoded_dict, encoded_leaf, join_path
from qckpt.repository import Repository, check_metrics
from qckpt.state import TrainingState, capture_rng, restore_rng
from qckpt.store.layout import manifest_key
from qckpt.store.refs import check_ref_name

FORMAT = 1
_TENSORS = join_path(join_path("", "dcp"), "tensors")


def _key(index: MetadataIndex, shard: bool) -> str:
    return f"{index.fqn}@{','.join(map(str, index.offset or ()))}" if shard else index.fqn


#: A compaction starts once its save has ended, so that it does not compete with the save's
#: last steps for the cores: the coordinator knows (``finish``), and so does every rank that
#: saves through ``QckptWriter.commit``; a rank that ``dcp.save`` calls directly cannot tell,
#: and starts this long after its own write (or at its next save, ``wait`` or ``close``).
COMPACTION_DELAY_S = 0.1


def _open(repo: Repository | str | os.PathLike[str]) -> tuple[Repository, bool]:
    """The repository, and whether this object opened it (and so closes it)."""
    return (repo, False) if isinstance(repo, Repository) else (Repository.open(repo), True)


@dataclass(frozen=True)
class _Written:
    """What one rank hands DCP for one item (``WriteResult.storage_data``): the
    item's key, its manifest entry (tensors) or bytes (objects), and, with the
    rank's first item, the rank's commit sizes and its warm part, if written."""

    key: str
    value: TensorEntry | bytes
    stats: CommitStats | None = None
    warm_part: str | None = None


def _manifest(tensors: Mapping[str, TensorEntry], **plain: Any) -> Manifest:
    """The manifest of ``{"dcp": {**plain, "tensors": {key: tensor}}}`` whose tensor
    table is ``tensors``' entries, in order (each entry's path is
    ``join_path(_TENSORS, key)``), laid out without building the tree: a save has
    thousands of tensors, and encoding placeholders for them cost more than the
    rest of its publication."""
    table = encoded_dict((key, encoded_leaf(i)) for i, key in enumerate(tensors))
    body = encoded_dict([*((key, encode_plain(value)) for key, value in plain.items()), ("tensors", table)])
    return Manifest(encoded_dict([("dcp", body)]), tuple(tensors.values()))


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


_PLANNER_MISMATCHES = ("Size mismatch", "Missing key")  # how DCP's load planner reports a state that does not fit


class QckptWriter(StorageWriter):
    """A DCP storage writer that commits each ``dcp.save`` as one snapshot on ``branch``.

    ``repo``: a ``Repository`` or its location (each rank opens it; ``close``
    closes what it opened). ``step``, ``metrics`` and ``message`` are recorded
    with the snapshot of every following save (set them on the coordinator
    before each ``dcp.save``; ``commit`` does); ``snapshot`` is the last
    snapshot this writer published (coordinator only).
    ``dcp.save(..., checkpoint_id=NAME)`` commits that save on branch ``NAME``.
    Memory: each rank keeps a copy of the items it wrote last in host memory,
    the next save's delta bases (as the hot tier does for ``commit``), and one
    more per save whose compaction is still queued (at most two: a save waits
    for the older one first). ``defer_encoding``: store each save's chunks raw
    and compact them afterwards (see the module docstring); by default on local
    disk and in memory, but not on S3, where the raw bytes are an upload that
    costs the save more than encoding them does (measured on loopback:
    0.13-0.14 s a save against 0.11-0.12 s).
    """

    def __init__(self, repo: Repository | str | os.PathLike[str], branch: str = "main", *, message: str = "dcp.save",
                 defer_encoding: bool | None = None) -> None:  # fmt: skip
        check_ref_name(branch)
        self.repo, self._owned = _open(repo)
        if defer_encoding is None:
            defer_encoding = not self.repo._store.backend.capabilities.remote
        self.branch = self._default_branch = branch
        self._next_branch: str | None = None
        self.message = message
        self.step: int | None = None
        self.metrics: dict[str, float] = {}
        self.snapshot: Snapshot | None = None
        self._coordinator = False
        self._hold = ExitStack()
        self._previous: HotSnapshot | None = None  # this rank's items at its previous save: delta bases
        self._last_part = -math.inf  # when this rank last wrote a warm part
        self._choices = EncodingChoices()  # used by the thread that encodes: the compactor's, if deferred
        self._defer = defer_encoding
        self._compactor: ThreadPoolExecutor | None = None  # started by the first deferred save, stopped by close
        self._compactions: deque[ThreadFuture[None]] = deque()  # in save order
        self._queue_lock = threading.Lock()
        self._saved = threading.Event()  # the latest save has ended: its compaction may start
        if defer_encoding:
            self.repo._compacting.add(self)  # the repository's flush and close wait for the compactions

    def commit(self, state: TrainingState, *, metrics: Mapping[str, float] | None = None,
               step: int | None = None) -> Snapshot | None:  # fmt: skip
        """``dcp.save`` of a sharded ``TrainingState`` (call on every rank, like
        ``dcp.save``): see ``sharded_state_dict``. The snapshot's step is ``step``,
        else the state's. Returns the snapshot on the coordinator, None elsewhere.
        ``Repository.commit`` of a sharded state comes here."""
        import torch.distributed.checkpoint as dcp

        self.step, self.metrics = state.step if step is None else step, dict(metrics or {})
        self.snapshot = None
        try:
            dcp.save(sharded_state_dict(state), storage_writer=self)
        finally:
            self._saved.set()
        return self.snapshot

    # -- StorageWriter ---------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """DCP calls this only when ``dcp.save`` is given a ``checkpoint_id``: the
        branch of that one save (the next one is on ``branch`` again)."""
        if checkpoint_id is not None:
            self._next_branch = check_ref_name(str(checkpoint_id))

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives") is False and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:  # fmt: skip
            raise InvalidInputError("QckptWriter needs DCP's collectives: every rank's items go into one snapshot "
                                    "(use_collectives=False would publish one snapshot per rank)")  # fmt: skip
        self._coordinator = is_coordinator
        self.branch, self._next_branch = self._next_branch or self._default_branch, None
        self._hold.close()  # a lock left by a save that failed on this coordinator
        if is_coordinator:  # before any rank can write: they write only after the coordinator's global plan
            self._hold.enter_context(self.repo._store.backend.lock(exclusive=False))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Phase one on this rank: every item's chunks durable and indexed; each
        result carries the item's manifest entry (tensors) or bytes (objects),
        the rank's first result also its ``CommitStats``."""
        self._saved.set()  # a new save: the one before has ended
        self._settle(1)
        objects, leaves, tensor_items = [], [], []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = _key(item.index, item.type == WriteItemType.SHARD)
            if item.type == WriteItemType.BYTE_IO:
                assert isinstance(data, io.BytesIO)
                objects.append(WriteResult(item.index, data.getbuffer().nbytes, _Written(key, data.getvalue())))
            else:
                assert isinstance(data, torch.Tensor)
                leaves.append(ArrayLeaf(join_path(_TENSORS, key), data.detach()))
                tensor_items.append((item.index, key))
        staged = stage(leaves)
        previous = self._previous
        keys = [key for _, key in tensor_items]
        rules = optimizer_rules(planner, keys)
        store = self.repo._store
        if not self._defer:
            entries, stats, part = store.write_unpublished(lambda txn: self._write(txn, staged, keys, previous, rules))
        else:
            entries, stats, written = store.write_unpublished(lambda txn: write_deferred(txn, staged))
            manifest = _manifest(dict(zip(keys, entries))).to_bytes() if self._part_due(entries) else None
            part = hex_id(manifest) if manifest is not None else None  # the compaction writes it: the save needs its id
            self._saved = threading.Event()
            if self._compactor is None:
                self._compactor = ThreadPoolExecutor(1, thread_name_prefix="qckpt-compact")
            with self._queue_lock:
                self._compactions.append(self._compactor.submit(self._compact, self._saved, staged, written, previous,
                                                                rules, entries, (part, manifest) if manifest else None))  # fmt: skip
        self._previous = HotSnapshot("", {a.path: a for a in staged}, {e.path: e for e in entries}, rules, None)
        results = [WriteResult(i, e.nbytes, _Written(k, e)) for (i, k), e in zip(tensor_items, entries)] + objects
        if results:
            first, item = results[0], results[0].storage_data
            results[0] = WriteResult(first.index, first.size_in_bytes, _Written(item.key, item.value, stats, part))
        return _done(results)

    def _write(self, txn: Any, staged: list[Any], keys: list[str], previous: HotSnapshot | None,
               rules: dict[str, ParamRule]) -> tuple[list[TensorEntry], CommitStats, str | None]:  # fmt: skip
        """Without deferral: this rank's chunks, encoded, then, when one is due, its
        warm part: a manifest of its tensors and their raw bytes
        (``WarmCopies.write_part``), so a restore of this snapshot decodes no chain."""
        entries, stats = write_arrays(txn, staged, previous, rules, None, choices=self._choices)
        if not self._part_due(entries):
            return entries, stats, None
        part = txn.put_manifest(_manifest(dict(zip(keys, entries))))
        txn.store.warm.write_part(part, entries, {a.path: a.data for a in staged})
        return entries, stats, part

    def _part_due(self, entries: list[TensorEntry]) -> bool:
        """Whether this save writes a warm part: due as the repository's warm copies
        are (``warm_interval``: every save on local disk, at most once a minute on S3)."""
        cadence = self.repo._warm
        if cadence is None or not entries or time.monotonic() - self._last_part < cadence.interval_s:
            return False
        self._last_part = time.monotonic()
        return True

    def _compact(self, saved: threading.Event, staged: list[Any], written: frozenset[bytes], previous: HotSnapshot | None,
                 rules: dict[str, ParamRule], entries: list[TensorEntry], part: tuple[str, bytes] | None) -> None:  # fmt: skip
        """On the compactor's thread, once the save has ended (``saved``; at most
        ``COMPACTION_DELAY_S`` after the rank's write, where the rank cannot tell):
        encode what ``write_deferred`` stored raw, then write the warm part listed in the
        save, its part manifest (id and bytes) included: both are a cache, written
        as one (until then the part's tensors read from the packs, which are raw
        meanwhile; a part whose manifest is missing is skipped)."""
        saved.wait(COMPACTION_DELAY_S)
        store = self.repo._store
        store.write_unpublished(lambda txn: compact(txn, staged, entries, written, previous, rules, None, self._choices))
        if part is not None:
            store.backend.put_cache(manifest_key(part[0]), part[1])
            store.warm.write_part(part[0], entries, {a.path: a.data for a in staged})

    def wait(self) -> None:
        """Wait until every save so far is compacted (and its warm part written);
        raises the first compaction that failed. ``close`` waits too."""
        self._saved.set()
        self._settle(0)

    def _settle(self, running: int) -> None:
        """Wait until at most ``running`` compactions are in flight; raise the first
        that failed (once). Safe beside a save on another thread (``dcp.async_save``
        saves on DCP's thread while ``Repository.flush`` may wait here)."""
        while True:
            with self._queue_lock:
                if not self._compactions or (len(self._compactions) <= running and not self._compactions[0].done()):
                    return
                job = self._compactions.popleft()
            job.result()

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Phase two, on the coordinator: one manifest of every rank's items, one
        snapshot on the branch; then the lock taken at set-up is released."""
        try:
            self.snapshot = self._publish(metadata, [r for rank in results for r in rank])
        finally:
            self._hold.close()
            self._saved.set()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked by DCP from a bare id: pass a QckptWriter

    # -- the snapshot -----------------------------------------------------------
    def _publish(self, metadata: Metadata, results: Sequence[WriteResult]) -> Snapshot:
        tensors: dict[str, TensorEntry] = {}
        objects: dict[str, bytes] = {}
        keys: dict[MetadataIndex, str] = {}
        total = CommitStats()
        parts: list[str] = []
        for result in results:
            written: _Written = result.storage_data
            if written.stats is not None:
                total = _add(total, written.stats)
            if written.warm_part is not None:
                parts.append(written.warm_part)
            if isinstance(written.value, TensorEntry):
                tensors[written.key] = written.value
            else:
                objects[written.key] = written.value
            keys[result.index] = written.key
        metadata.storage_data = keys
        manifest = _manifest(tensors, format=FORMAT, metadata=pickle.dumps(metadata), objects=objects)
        store = self.repo._store
        metrics = check_metrics(self.metrics)
        annotations = {WARM_PARTS_ANNOTATION: parts} if parts else {}  # what no part holds is read from the packs

        def build(txn: Any) -> Any:
            manifest_id = txn.put_manifest(manifest)
            return lambda head: Snapshot.new(manifest=manifest_id, parents=(head,) if head else (), step=self.step,
                                             message=self.message, metrics=metrics, stats=total,
                                             annotations=annotations)  # fmt: skip

        return store.transaction(self.branch, build, cause="dcp.save")

    def close(self) -> None:
        """Wait for the compactions (raising the first that failed), release a lock a
        failed save left, and close the repository if this writer opened it."""
        try:
            self.wait()
        finally:
            if self._compactor is not None:
                self._compactor.shutdown(wait=True)
                self._compactor = None
            self._hold.close()
            if self._owned:
                self.repo.close()


def optimizer_rules(planner: SavePlanner, keys: Sequence[str]) -> dict[str, ParamRule]:
    """The update rule of each parameter whose tensor and optimizer state this rank
    writes (``keys``), from the state dict DCP flattened (``DefaultSavePlanner``'s
    ``state_dict`` and ``mappings``; another planner: none, so plain deltas).

    An optimizer state dict as ``get_state_dict`` makes it (``state`` and
    ``param_groups`` keyed by parameter name) gives, per parameter, its state
    tensors and its group's settings; the parameter is the one other flattened
    entry whose path ends with that name. Adam's and AdamW's (``exp_avg`` and
    ``exp_avg_sq``) and SGD's (``momentum_buffer``) feed the predictive codecs;
    a wrong guess costs bytes only (predictions are verified residuals)."""
    flat, mappings = getattr(planner, "state_dict", None), getattr(planner, "mappings", None)
    if not isinstance(flat, dict) or not isinstance(mappings, dict):
        return {}
    states: dict[tuple[Any, ...], dict[str, dict[str, str]]] = {}
    groups: dict[tuple[Any, ...], dict[Any, dict[str, Any]]] = {}
    by_name: dict[str, list[str]] = {}
    for flat_key, path in mappings.items():
        path = tuple(path)
        if len(path) >= 3 and path[-3] == "state":
            states.setdefault(path[:-3], {}).setdefault(str(path[-2]), {})[str(path[-1])] = flat_key
        elif len(path) >= 3 and path[-3] == "param_groups":
            groups.setdefault(path[:-3], {}).setdefault(path[-2], {})[str(path[-1])] = flat.get(flat_key)
        else:
            by_name.setdefault(str(path[-1]), []).append(flat_key)
    local = {key.partition("@")[0]: key for key in keys}  # this rank's items, by flattened name
    written = set(keys)
    rules: dict[str, ParamRule] = {}
    for prefix, per_param in states.items():
        for group in groups.get(prefix, {}).values():
            hyper = {k: v for k, v in group.items() if k != "params"}
            for name in group.get("params") or ():
                state, owners = per_param.get(str(name), {}), by_name.get(str(name), [])
                kind = "adam" if {"exp_avg", "exp_avg_sq"} <= set(state) else "sgd" if "momentum_buffer" in state else None
                if kind is None or len(owners) != 1 or owners[0] not in local:
                    continue
                param_key = local[owners[0]]
                suffix = param_key[len(owners[0]):]  # a shard's offsets: its state shares them
                tensors = {n: join_path(_TENSORS, state[n] + suffix) for n in state if state[n] + suffix in written and n != "step"}
                if not tensors:
                    continue
                step = flat.get(state["step"]) if "step" in state else None
                step = float(step) if isinstance(step, (int, float, torch.Tensor)) and not isinstance(step, bool) else None
                rules[join_path(_TENSORS, param_key)] = ParamRule(kind, join_path(_TENSORS, param_key), tensors, hyper, step)
    return rules


def _rank_key() -> str:
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    return f"rank{rank}"


def _owner(state: TrainingState, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    owners = [m for m in state.components.values() if isinstance(m, torch.nn.Module)
              and any(id(p) in params for p in m.parameters())]  # fmt: skip
    if len(owners) != 1:
        raise InvalidInputError(f"an optimizer's parameters must belong to exactly one module component (found {len(owners)})")
    return owners[0]


def sharded_state_dict(state: TrainingState) -> dict[str, Any]:
    """The DCP state dict of a ``TrainingState`` whose modules may be sharded (FSDP2,
    DTensor) or replicated: each module's and optimizer's state through
    ``get_model_state_dict``/``get_optimizer_state_dict`` (optimizer state keyed by
    parameter name); every other component, and the process RNG, under this
    rank's own key (``rank<N>``: DCP stores one copy of what all ranks share, and
    data positions and RNG streams differ per rank); step and extras as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tree: dict[str, Any] = {"step": state.step, "extras": state.extras}
    own: dict[str, Any] = {"rng": capture_rng() if state.rng else None}
    for name, component in state.components.items():
        if isinstance(component, torch.nn.Module):
            tree[name] = get_model_state_dict(component)
        elif isinstance(component, torch.optim.Optimizer):
            tree[name] = get_optimizer_state_dict(_owner(state, component), component)
        elif isinstance(component, torch.Generator):
            own[name] = component.get_state()
        else:
            own[name] = component.state_dict()
    tree[_rank_key()] = own
    return tree


def load_sharded_state_dict(state: TrainingState, tree: Mapping[str, Any]) -> None:
    """Load what ``dcp.load`` filled into ``sharded_state_dict(state)`` back into ``state``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    own = tree[_rank_key()]
    for name, component in state.components.items():
        if isinstance(component, torch.nn.Module):
            set_model_state_dict(component, tree[name])
        elif isinstance(component, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner(state, component), component, tree[name])
        elif isinstance(component, torch.Generator):
            component.set_state(own[name])
        else:
            component.load_state_dict(own[name])
    if state.rng and own["rng"] is not None:
        restore_rng(own["rng"])
    state.step, state.extras = tree["step"], tree["extras"]


def _add(a: CommitStats, b: CommitStats) -> CommitStats:
    return CommitStats(a.raw_bytes + b.raw_bytes, a.chunks + b.chunks, a.new_chunks + b.new_chunks,
                       a.new_raw_bytes + b.new_raw_bytes, a.new_stored_bytes + b.new_stored_bytes,
                       tuple(dict.fromkeys(a.notes + b.notes)))  # fmt: skip


class QckptReader(StorageReader):
    """A DCP storage reader for the snapshot ``revision`` names (resolved once, here:
    an unknown revision raises ``RevisionNotFoundError`` before DCP starts).
    ``dcp.load(..., checkpoint_id=REVISION)`` reads that revision instead."""

    def __init__(self, repo: Repository | str | os.PathLike[str], revision: str = "main") -> None:
        self.repo, self._owned = _open(repo)
        self._resolve(revision)
        self._keys: dict[MetadataIndex, str] = {}

    def _resolve(self, revision: str) -> None:
        self.snapshot = self.repo.snapshot(revision)
        self._view = self.repo.load(self.snapshot.id)
        tree = self._view.skeleton()
        dcp = tree.get("dcp") if isinstance(tree, dict) else None
        if not isinstance(dcp, dict) or dcp.get("format") != FORMAT:
            raise InvalidInputError(f"snapshot {self.snapshot.short_id} ({revision}) was not written by dcp.save "
                                    "through QckptWriter (use Repository.restore or Repository.load)")  # fmt: skip
        self._tree = dcp

    def restore(self, state: TrainingState) -> None:
        """``dcp.load`` into a sharded ``TrainingState`` saved by ``QckptWriter.commit``
        (call on every rank): modules and optimizers through DCP's
        ``set_*_state_dict`` (resharded to this run's layout), each rank's other
        components and RNG from its own entry, step and extras. A state that does
        not fit the snapshot (a tensor of another global shape, a key it lacks),
        found by DCP's planner before anything is read, raises
        ``StateMismatchError`` listing DCP's findings (rather than DCP's
        ``CheckpointException``, a ``BaseException``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        tree = sharded_state_dict(state)
        try:
            dcp.load(tree, storage_reader=self)
        except CheckpointException as e:
            found = [(rank, error) for rank, (error, _) in sorted(e.failures.items())]
            if not found or not all(str(error).startswith(_PLANNER_MISMATCHES) for _, error in found):
                raise
            raise StateMismatchError(
                f"snapshot {self.snapshot.short_id} does not fit the sharded training state; nothing was loaded:",
                [f"rank {rank}: {error}" for rank, error in found],
            ) from None
        load_sharded_state_dict(state, tree)

    # -- StorageReader ---------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self._resolve(str(checkpoint_id))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            metadata = pickle.loads(self._tree["metadata"])
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise IntegrityError(f"snapshot {self.snapshot.short_id}: unreadable DCP metadata: {e}") from e
        if not isinstance(metadata, Metadata):
            raise IntegrityError(f"snapshot {self.snapshot.short_id}: DCP metadata is a {type(metadata).__name__}")
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._keys = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read what this rank's plan asks for: whole tensors together (in parallel),
        parts of tensors by the chunks that cover them; everything digest-checked."""
        tensors = [item for item in plan.items if item.type != LoadItemType.BYTE_IO]
        entries = {item.storage_index: self._view.entry(join_path(_TENSORS, self._keys[item.storage_index])) for item in tensors}
        warm = self._from_warm_parts(list({e.path: e for e in entries.values()}.values()))
        whole: list[tuple[ReadItem, TensorEntry]] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(self._tree["objects"][self._keys[item.storage_index]]))
                continue
            entry = entries[item.storage_index]
            index = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
            if entry.path in warm:
                self._copy(planner, item, warm[entry.path][index])
            elif all(o == 0 for o in item.storage_offsets) and tuple(item.lengths) == entry.shape:
                whole.append((item, entry))
            else:
                self._copy(planner, item, self._view.read(entry.path, index))
        values = self.repo.read_arrays(self.snapshot, [e for _, e in whole]) if whole else []
        for (item, _), value in zip(whole, values):
            self._copy(planner, item, value)
        return _done(None)

    def _from_warm_parts(self, entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
        """The tensors of ``entries`` that the snapshot's warm parts hold (each part's
        trailer checked and every wanted chunk hashed, as any warm read), by path;
        a missing or damaged part leaves its tensors to the packs."""
        store = self.repo._store
        found: dict[str, torch.Tensor] = {}
        for part in self.snapshot.warm_parts:
            todo = {e.path: e for e in entries if e.path not in found}
            if not todo:
                break
            try:
                manifest = store.manifest_by_id(part)
            except IntegrityError:  # collected, or damaged: a cache
                continue
            wanted = [e for e in manifest.tensors if todo.get(e.path) == e]
            read = store.warm.read_part(part, manifest, wanted) if wanted else None
            for entry, array in zip(wanted, read.private() if read is not None else ()):
                found[entry.path] = torch.from_numpy(array).view(torch_dtype(entry.dtype)).reshape(entry.shape)
        return found

    @staticmethod
    def _copy(planner: LoadPlanner, item: ReadItem, value: Any) -> None:
        target = planner.resolve_tensor(item).detach()
        if tuple(target.shape) != tuple(value.shape):
            raise InvalidInputError(f"{item.dest_index.fqn}: the stored part has shape {tuple(value.shape)}, "
                                    f"the destination {tuple(target.shape)}")  # fmt: skip
        target.copy_(value)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def close(self) -> None:
        """Close the repository if this reader opened it."""
        if self._owned:
            self.repo.close()
