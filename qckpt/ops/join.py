"""Joining branches: keep the best one, or average several into a new snapshot."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from qckpt.commit.arrays import write_arrays
from qckpt.commit.lossy import check_main_line
from qckpt.commit.staging import stage
from qckpt.errors import InvalidInputError, StateMismatchError
from qckpt.format.records import LOSSY_ANNOTATION, CommitStats, Manifest, Snapshot, TensorEntry
from qckpt.format.tensors import is_floating
from qckpt.format.tree import ArrayLeaf
from qckpt.store.refs import check_ref_name
from qckpt.store.store import Store, Transaction

Metric = str | Callable[[Snapshot], float]


def _unique(ids: Sequence[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _lossy_of(snaps: Sequence[Snapshot]) -> dict[str, Any]:
    """The annotations that mark a result built from lossy snapshots (the coarsest one's record), or none."""
    lossy = [s.lossy for s in snaps if s.lossy is not None]
    return {LOSSY_ANNOTATION: min(lossy, key=lambda a: a.get("mantissa_bits", 0))} if lossy else {}


def pick_best(
    store: Store, target: str, candidates: Sequence[str], metric: Metric, mode: str, message: str, allow_lossy: bool
) -> tuple[Snapshot, Snapshot]:
    """Move ``target`` to a join snapshot of the best candidate (see ``Repository.join``);
    returns the join and the candidate's own snapshot."""
    check_ref_name(target)
    if not candidates or mode not in ("min", "max"):
        raise InvalidInputError("join needs at least one candidate and mode 'min' or 'max'")
    snaps = [(rev, store.snapshot(store.resolve(rev))) for rev in candidates]
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom metric")

    def score(snap: Snapshot) -> float:
        value = metric(snap) if callable(metric) else snap.metrics.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidInputError(f"snapshot {snap.short_id} has no numeric metric {name!r}")
        return math.inf if math.isnan(value) else (value if mode == "min" else -value)  # NaN loses

    scores = [score(s) for _, s in snaps]
    winner_rev, winner = snaps[scores.index(min(scores))]
    summary = [{"revision": r, "snapshot": s.id, "step": s.step, "metrics": s.metrics} for r, s in snaps]
    lossy = _lossy_of([winner])
    check_main_line(target, lossy.get(LOSSY_ANNOTATION), allow_lossy, f"joining {winner_rev} into {target!r}")
    join = store.transaction(target, cause="join", build=lambda txn: lambda head: Snapshot.new(
        manifest=winner.manifest, parents=_unique([head, *(s.id for _, s in snaps)]), step=winner.step,
        message=message or f"join {target}: picked {winner_rev} by {name} ({mode})", metrics=winner.metrics,
        stats=CommitStats(raw_bytes=winner.stats.raw_bytes, chunks=winner.stats.chunks),
        annotations={"join": {"metric": name, "mode": mode, "winner": winner_rev, "candidates": summary}, **lossy},
    ))  # fmt: skip
    return join, winner


def _weighted(values: list[Any], weights: list[float], like: Any) -> Any:
    as_torch = [torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for v in values]
    wide = torch.complex128 if as_torch[0].is_complex() else torch.float64
    total = sum(w * t.to(wide) for w, t in zip(weights, as_torch))
    if isinstance(like, np.ndarray):
        return total.numpy().astype(like.dtype)
    return total.to(like.dtype)


def average(
    store: Store, revisions: Sequence[str], branch: str, weights: Sequence[float] | None, message: str, allow_lossy: bool
) -> Snapshot:
    """Commit the element-wise weighted average of snapshots to ``branch`` (see ``Repository.average``)."""
    check_ref_name(branch)
    if len(revisions) < 2:
        raise InvalidInputError("average needs at least two revisions")
    raw_weights = list(weights) if weights is not None else [1.0] * len(revisions)
    if len(raw_weights) != len(revisions) or any(w < 0 for w in raw_weights) or sum(raw_weights) <= 0:
        raise InvalidInputError("weights must be one non-negative number per revision, not all zero")
    norm = [w / sum(raw_weights) for w in raw_weights]
    snaps = [store.snapshot(store.resolve(r)) for r in revisions]
    lossy = _lossy_of(snaps)
    check_main_line(branch, lossy.get(LOSSY_ANNOTATION), allow_lossy, f"averaging into {branch!r}")
    manifests = [store.manifest(s) for s in snaps]
    first = manifests[0]
    shape_of = [[(t.path, t.kind, t.dtype, t.shape) for t in m.tensors] for m in manifests]
    problems = [f"{revisions[i]}: tensors differ from {revisions[0]} ({set(shape_of[i]) ^ set(shape_of[0])})"
                for i in range(1, len(snaps)) if shape_of[i] != shape_of[0]]  # fmt: skip
    if problems:
        raise StateMismatchError("snapshots cannot be averaged:", problems)

    entries: list[TensorEntry | None] = []
    computed: list[ArrayLeaf] = []
    for i, entry in enumerate(first.tensors):
        versions = [m.tensors[i] for m in manifests]
        if all(v.chunks == entry.chunks for v in versions) or not is_floating(entry.dtype):
            entries.append(entry)  # identical everywhere (or not floating): kept as in the first
            continue
        values = [store.read_arrays(s, [v])[0] for s, v in zip(snaps, versions)]
        computed.append(ArrayLeaf(entry.path, _weighted(values, norm, values[0])))
        entries.append(None)
    staged = stage(computed)

    def build(txn: Transaction) -> Callable[[str | None], Snapshot]:
        stored, stats = write_arrays(txn, staged, None, {}, None)
        new_entries = iter(stored)
        tensors = tuple(e if e is not None else next(new_entries) for e in entries)
        manifest_id = txn.put_manifest(Manifest(first.tree, tensors))
        return lambda head: Snapshot.new(
            manifest=manifest_id, parents=_unique([head, *(s.id for s in snaps)]), step=snaps[0].step,
            message=message or f"average of {', '.join(revisions)}",
            stats=CommitStats(sum(t.nbytes for t in tensors), sum(len(t.chunks) for t in tensors),
                              stats.new_chunks, stats.new_raw_bytes, stats.new_stored_bytes),
            annotations={"average": {"revisions": list(revisions), "snapshots": [s.id for s in snaps], "weights": norm}, **lossy},
        )  # fmt: skip

    return store.transaction(branch, build, cause="average")
