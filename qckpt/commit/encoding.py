"""Per-chunk encoding plans for one commit: which predictions each new chunk
may try, and the chain depth each encoded chunk gets.

A prediction is offered for a chunk only if every input is available: a
tensor of the same dtype and size in the base snapshot (kept in the hot tier)
or in this commit, whose chunk at the same position is either indexed
already in its final form (then its depth is known; a deferred chunk awaiting
compaction is not) or encoded by an earlier wave of this commit; no chunk
depends on itself; and the chain it would create is at most ``max_chain``
objects long. Otherwise the chunk is simply stored on its own,
which is always safe. Candidates carry the mantissa bits the lossy tier
rounded the array by, so predictions are rounded alike.

Which prediction wins is a property of the training loop (which moments the
optimizer keeps, whether the scheduler steps before the commit), not of one
chunk: ``EncodingChoices`` remembers what won when a tensor's chunks were last
sampled, and later commits encode that tensor's chunks with it directly,
sampling again every ``RESAMPLE_COMMITS`` commits.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qckpt.commit.hot import HotSnapshot
from qckpt.commit.predict import BASE, ParamRule, Prediction, plan_predictions
from qckpt.commit.staging import StagedArray
from qckpt.format.codecs import FLOAT_FORMATS, FLOAT_NONE, DeferredCodec, PredictiveCodec, codec_by_id
from qckpt.format.objects import Candidate, EncodedObject
from qckpt.format.records import TensorEntry
from qckpt.store.index import ChunkIndex


RESAMPLE_COMMITS = 8


def chunk_view(array: StagedArray, number: int, chunk_size: int) -> np.ndarray:
    """The bytes of chunk ``number`` of ``array`` (a view)."""
    return array.data[number * chunk_size : (number + 1) * chunk_size]


class EncodingChoices:
    """The prediction that won when each tensor path was last sampled (its index in
    the commit's plan), with what was on offer then (the predictions' indices and
    codecs: a choice among fewer options, e.g. where the chain bound ruled some
    out, is not reused when more are available) and the commit it was sampled in.
    A self-contained outcome is not remembered (the next chunk samples again).
    One per writer, used by its committing thread only; a stale memory costs
    bytes, never correctness."""

    def __init__(self) -> None:
        self.commits = 0  # commits planned with this memory
        self._won: dict[str, tuple[int, tuple[tuple[int, int], ...], int]] = {}

    def next_commit(self) -> None:
        """A new commit is being planned (choices age by commits)."""
        self.commits += 1

    def recall(self, path: str, offered: tuple[tuple[int, int], ...]) -> int | None:
        """The prediction remembered for ``path`` when the same was ``offered``
        ((index, codec id) pairs), if it is fresh."""
        sampled, then, won = self._won.get(path, (-RESAMPLE_COMMITS, (), 0))
        return won if then == offered and self.commits - sampled < RESAMPLE_COMMITS else None

    def remember(self, path: str, offered: tuple[tuple[int, int], ...], won: int | None) -> None:
        if won is None:
            self._won.pop(path, None)
        else:
            self._won[path] = (self.commits, offered, won)


@dataclass(frozen=True)
class ChunkPlan:
    """What to try for one new chunk: ``candidates``, what was ``offered`` (every
    available prediction's index in the plan and codec id, in candidate order),
    and whether to sample the candidates or encode the first one directly."""

    candidates: list[Candidate]
    offered: tuple[tuple[int, int], ...]
    choose: bool


class EncodePlanner:
    """Plans the encoding of one commit's new chunks. ``plan`` and ``encoded`` may be
    called from the committing thread only; ``encoded`` records results in wave order."""

    def __init__(
        self,
        index: ChunkIndex,
        chunk_size: int,
        max_chain: int,
        staged: Sequence[StagedArray],
        entries: Sequence[TensorEntry],
        base: HotSnapshot | None,
        rules: Mapping[str, ParamRule],
        step: int | None,
        new: Collection[bytes],
        choices: EncodingChoices | None = None,
    ) -> None:
        self._choices = choices
        if choices is not None:
            choices.next_commit()
        self._chunk_size = chunk_size
        self._max_chain = max_chain
        self._current = {a.path: (a, e) for a, e in zip(staged, entries)}
        self._base = base
        # the usable dependencies: chunks indexed in their final form, and those encoded in this commit
        self._depths: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._predictions: dict[str, list[Prediction]] = {}
        if base is not None and max_chain > 1:
            steps = step - base.step if step is not None and base.step is not None else None
            self._predictions = plan_predictions(
                list(self._current), list(base.arrays), rules, base.rules, steps
            ).by_path
            # every chunk a prediction may depend on, looked up at once (the committing thread would
            # otherwise cross into the index per chunk, competing for the GIL with the encoders)
            referenced = {c for e in (*entries, *base.entries.values()) for c in e.chunks}.difference(new)
            self._depths = {c: location.depth for c, location in index.get_many(referenced).items()
                            if location.codec != DeferredCodec.id}  # fmt: skip

    def wave(self, array: StagedArray, number: int) -> int:
        """The encoding wave of a new chunk (after those it may be predicted from)."""
        return max((p.wave for p in self._predictions.get(array.path, ())), default=0)

    def _depth(self, chunk_id: bytes) -> int | None:
        """Chain depth of an existing or already encoded chunk; None if unusable as a
        dependency: new in this commit and not encoded yet, not indexed (e.g. the base
        snapshot's chunks were garbage-collected elsewhere), or deferred (its
        compaction will give it a chain depth nobody knows yet)."""
        with self._lock:
            return self._depths.get(chunk_id)

    def plan(self, chunk_id: bytes, array: StagedArray, number: int) -> ChunkPlan:
        """The predictions a new chunk may try: the one remembered for its tensor if
        that is available, else all of them, to sample."""
        predictions = self._predictions.get(array.path, [])
        available = self._candidates(chunk_id, array, number, predictions)
        offered = tuple((i, predictions[i].codec_id) for i in available)
        if self._choices is not None and available:
            won = self._choices.recall(array.path, offered)
            if won is not None:
                return ChunkPlan([available[won]], offered, False)
        return ChunkPlan(list(available.values()), offered, True)

    def _candidates(self, chunk_id: bytes, array: StagedArray, number: int,
                    predictions: list[Prediction]) -> dict[int, Candidate]:  # fmt: skip
        """The available predictions of a new chunk, by their index in ``predictions``."""
        out = {}
        for i, prediction in enumerate(predictions):
            codec = codec_by_id(prediction.codec_id)
            assert isinstance(codec, PredictiveCodec)
            fmt = FLOAT_FORMATS.get(array.dtype, FLOAT_NONE)
            if codec.float_only and fmt == FLOAT_NONE:
                continue
            deps, inputs, depth = [], [], 0
            for source, path in prediction.inputs:
                if source == BASE:
                    assert self._base is not None
                    found = self._base.arrays.get(path), self._base.entries.get(path)
                else:
                    found = self._current.get(path, (None, None))
                other, entry = found
                if other is None or entry is None or other.dtype != array.dtype or other.data.size != array.data.size:
                    break
                dep = entry.chunks[number]
                dep_depth = self._depth(dep) if dep != chunk_id else None
                if dep_depth is None:
                    break
                depth = max(depth, dep_depth)
                deps.append(dep)
                inputs.append(chunk_view(other, number, self._chunk_size))
            else:
                if depth + 1 <= self._max_chain:
                    out[i] = Candidate(codec, tuple(deps), tuple(inputs), fmt, prediction.scalars, array.dropped)
        return out

    def encoded(self, chunk_id: bytes, array: StagedArray, plan: ChunkPlan, obj: EncodedObject) -> int:
        """Record how ``chunk_id`` (of ``array``, planned as ``plan``) was encoded;
        returns its chain depth."""
        if plan.choose and plan.candidates and self._choices is not None:
            won = None if obj.candidate is None else plan.offered[obj.candidate][0]
            self._choices.remember(array.path, plan.offered, won)
        deps = obj.deps
        depth = 1 + max((self._depths[d] for d in deps), default=0)
        with self._lock:
            self._depths[chunk_id] = depth
        return depth
