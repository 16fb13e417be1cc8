"""Per-chunk encoding plans for one commit: which predictions each new chunk
may try, and the chain depth each encoded chunk gets.

A prediction is offered for a chunk only if every input is available: a
tensor of the same dtype and size in the base snapshot (kept in the hot tier)
or in this commit, whose chunk at the same position is either indexed
already (then its depth is known) or encoded by an earlier wave of this
commit; no chunk depends on itself; and the chain it would create is at most
``max_chain`` objects long. Otherwise the chunk is simply stored on its own,
which is always safe. Candidates carry the mantissa bits the lossy tier
rounded the array by, so predictions are rounded alike.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from qckpt.commit.hot import HotSnapshot
from qckpt.commit.predict import BASE, ParamRule, Prediction, plan_predictions
from qckpt.commit.staging import StagedArray
from qckpt.format.codecs import FLOAT_FORMATS, FLOAT_NONE, PredictiveCodec, codec_by_id
from qckpt.format.objects import Candidate
from qckpt.format.records import TensorEntry
from qckpt.store.index import ChunkIndex


def chunk_view(array: StagedArray, number: int, chunk_size: int) -> np.ndarray:
    """The bytes of chunk ``number`` of ``array`` (a view)."""
    return array.data[number * chunk_size : (number + 1) * chunk_size]


class EncodePlanner:
    """Plans the encoding of one commit's new chunks. ``candidates`` may be called
    from the committing thread only; ``encoded`` records results in wave order."""

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
    ) -> None:
        self._index = index
        self._chunk_size = chunk_size
        self._max_chain = max_chain
        self._current = {a.path: (a, e) for a, e in zip(staged, entries)}
        self._base = base
        self._new = new
        self._depths: dict[bytes, int] = {}  # encoded in this commit, or looked up in the index
        self._lock = threading.Lock()
        self._predictions: dict[str, list[Prediction]] = {}
        if base is not None and max_chain > 1:
            steps = step - base.step if step is not None and base.step is not None else None
            self._predictions = plan_predictions(
                list(self._current), list(base.arrays), rules, base.rules, steps
            ).by_path

    def wave(self, array: StagedArray, number: int) -> int:
        """The encoding wave of a new chunk (after those it may be predicted from)."""
        return max((p.wave for p in self._predictions.get(array.path, ())), default=0)

    def _depth(self, chunk_id: bytes) -> int | None:
        """Chain depth of an existing or already encoded chunk; None if unusable as a dependency."""
        with self._lock:
            if chunk_id in self._depths:
                return self._depths[chunk_id]
        if chunk_id in self._new:
            return None  # new in this commit but not encoded yet
        location = self._index.get(chunk_id)
        if location is None:
            return None  # e.g. the base snapshot's chunks were garbage-collected elsewhere
        with self._lock:
            self._depths[chunk_id] = location.depth
        return location.depth

    def candidates(self, chunk_id: bytes, array: StagedArray, number: int) -> list[Candidate]:
        """The predictions a new chunk may try."""
        out = []
        for prediction in self._predictions.get(array.path, ()):
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
                    out.append(Candidate(codec, tuple(deps), tuple(inputs), fmt, prediction.scalars, array.dropped))
        return out

    def encoded(self, chunk_id: bytes, deps: Sequence[bytes]) -> int:
        """Record that ``chunk_id`` was encoded with ``deps``; returns its chain depth."""
        depth = 1 + max((self._depths[d] for d in deps), default=0)
        with self._lock:
            self._depths[chunk_id] = depth
        return depth
