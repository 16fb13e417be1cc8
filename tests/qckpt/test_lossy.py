"""The lossy tier: rounding keeps its error bound and nothing else, lossy objects
decode bit-exactly to the rounded values, real training stored lossy restores to
exactly the rounded state, and the main line refuses lossy content unless asked."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qckpt
from bench.workload import Trainer
from qckpt.format.codecs import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, FLOAT_FORMATS, mantissa_bits, round_bits
from qckpt.format.objects import Candidate, decode_object, encode_object
from qckpt.format.ids import digest
from qckpt.format.tensors import raw_bytes
from qckpt.errors import InvalidInputError
from tests.qckpt.test_codecs import PREDICTIVE, _close_floats

FORMATS = {FLOAT32: (np.uint32, np.float32), FLOAT64: (np.uint64, np.float64), FLOAT16: (np.uint16, np.float16),
           BFLOAT16: (np.uint16, None)}  # fmt: skip


def _as_float64(bits: np.ndarray, fmt: int) -> np.ndarray:
    wide = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32) if fmt == BFLOAT16 else bits.view(FORMATS[fmt][1])
    with np.errstate(invalid="ignore"):  # NaN payloads
        return wide.astype(np.float64)


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), data=st.data())
def test_rounding_keeps_the_bound_and_special_values(fmt: int, seed: int, n: int, data: st.DataObject) -> None:
    unsigned = FORMATS[fmt][0]
    dropped = data.draw(st.integers(1, mantissa_bits(fmt) - 1))
    bits = np.random.default_rng(seed).integers(0, np.iinfo(unsigned).max, size=n, dtype=unsigned, endpoint=True)
    rounded = round_bits(bits.view(np.uint8), fmt, dropped).view(unsigned)
    assert not np.any(rounded & unsigned((1 << dropped) - 1)), "low bits must be zero"
    assert np.array_equal(round_bits(rounded.view(np.uint8), fmt, dropped).view(unsigned), rounded), "idempotent"
    before, after = _as_float64(bits, fmt), _as_float64(rounded, fmt)
    assert np.array_equal(np.isnan(before), np.isnan(after))
    inf = np.isinf(before)
    assert np.array_equal(after[inf], before[inf]) and not np.any(np.isinf(after[~inf]))
    smallest_normal, largest_exponent = {FLOAT32: (2.0**-126, 127), FLOAT64: (2.0**-1022, 1023), FLOAT16: (2.0**-14, 15),
                                         BFLOAT16: (2.0**-126, 127)}[fmt]  # fmt: skip
    normal = np.isfinite(before) & (np.abs(before) >= smallest_normal)
    kept = mantissa_bits(fmt) - dropped
    with np.errstate(all="ignore"):
        error = np.abs(after[normal] - before[normal]) / np.abs(before[normal])
    assert np.all(error <= 2.0**-kept), "never worse than truncation"
    rounds_safely = np.abs(before[normal]) < (2 - 2.0**-kept) * 2.0**largest_exponent  # larger ones may be truncated
    assert np.all(error[rounds_safely] <= 2.0 ** -(kept + 1)), "round to nearest"


@settings(max_examples=60, deadline=None)
@given(codec_index=st.integers(0, len(PREDICTIVE) - 1), fmt=st.sampled_from(sorted(FORMATS)), n=st.integers(1, 300),
       seed=st.integers(0, 2**32 - 1), data=st.data())  # fmt: skip
def test_lossy_objects_decode_to_the_rounded_chunk(codec_index: int, fmt: int, n: int, seed: int, data: st.DataObject) -> None:
    codec, arity, count = PREDICTIVE[codec_index]
    itemsize = np.dtype(FORMATS[fmt][0]).itemsize
    dropped = data.draw(st.integers(1, mantissa_bits(fmt) - 1))
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, 256, size=n * itemsize, dtype=np.uint8) for _ in range(arity)]
    raw = round_bits(_close_floats(rng, inputs[0], fmt), fmt, dropped)
    scalars = tuple(float(s) for s in rng.normal(size=count))
    obj = encode_object(raw, itemsize, True, 1, [Candidate(codec, tuple(digest(i) for i in inputs), tuple(inputs), fmt, scalars, dropped)])
    by_id = {digest(i): i.tobytes() for i in inputs}
    assert bytes(decode_object(obj.data, digest(raw), by_id.__getitem__)) == raw.tobytes()


def test_an_unrounded_chunk_is_refused_not_silently_damaged() -> None:
    codec, _, _ = PREDICTIVE[0]
    raw = np.random.default_rng(0).normal(size=64).astype(np.float32).view(np.uint8)
    with pytest.raises(ValueError, match="rounded"):
        codec.encode(raw, 4, 1, [raw], FLOAT32, (), 13)


def _float_leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _float_leaves(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _float_leaves(value, f"{prefix}/{i}").items()}
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return {prefix: tree}
    return {}


def _rounded(tensor: torch.Tensor, tier: qckpt.LossyTier) -> torch.Tensor:
    """The value a lossy commit must store, computed here from the tensor's own bytes."""
    fmt = FLOAT_FORMATS[str(tensor.dtype).removeprefix("torch.")]
    dropped = mantissa_bits(fmt) - tier.mantissa_bits
    raw = raw_bytes(tensor).copy()
    if dropped > 0 and tensor.numel() >= tier.min_elements:
        raw = round_bits(raw, fmt, dropped)
    return torch.from_numpy(raw).view(tensor.dtype).reshape(tensor.shape)


def test_lossy_training_snapshots_restore_to_exactly_the_rounded_state(tmp_path: Any) -> None:
    """Real training, lossy and lossless commits interleaved on one branch: every
    snapshot read back (fresh repository, no hot tier) equals the rounded capture
    (lossless ones: the capture itself), within the stated error of the original."""
    trainer = Trainer("tiny", total_steps=20)
    repo = qckpt.Repository.init(tmp_path / "repo")
    lossless = qckpt.Repository.init(tmp_path / "lossless")
    tier = qckpt.LossyTier(mantissa_bits=8)
    expected: list[tuple[str, dict[str, torch.Tensor], bool]] = []
    for step in range(8):
        trainer.train_step()
        trainer.state.step = step
        use_lossy = step != 5
        snapshot = repo.commit(trainer.state, branch="explore", lossy=tier if use_lossy else None)
        lossless.commit(trainer.state, branch="explore")
        assert (snapshot.lossy is not None) == use_lossy
        captured = _float_leaves(trainer.state.capture())
        expected.append((snapshot.id, {k: _rounded(v, tier) if use_lossy else v.clone() for k, v in captured.items()}, use_lossy))
        if use_lossy:
            for path, value in captured.items():
                stored, original = expected[-1][1][path].double(), value.double()
                normal = original.abs() >= torch.finfo(value.dtype).tiny
                assert torch.all((stored - original)[normal].abs() <= original[normal].abs() * tier.relative_error), path
    repo.close()
    with qckpt.Repository.open(tmp_path / "repo", hot_snapshots=0) as fresh:
        for snapshot_id, values, _ in expected:
            restored = _float_leaves(fresh.load(snapshot_id).tree())
            assert restored.keys() == values.keys()
            for path, value in values.items():
                assert np.array_equal(raw_bytes(restored[path]), raw_bytes(value)), (snapshot_id[:8], path)
        assert fresh.fsck().ok
        assert fresh.stats().stored_bytes < 0.8 * lossless.stats().stored_bytes


def test_restore_into_a_training_state_uses_the_rounded_values() -> None:
    trainer = Trainer("tiny", total_steps=5)
    trainer.train_step()
    repo = qckpt.Repository.init(qckpt.MemoryBackend())
    tier = qckpt.LossyTier(4)
    snapshot = repo.commit(trainer.state, branch="explore", lossy=tier)
    weight = next(trainer.model.parameters())
    step_count = trainer.optimizer.state[weight]["step"].clone()
    expected = _rounded(weight.detach(), tier)
    assert weight.numel() >= tier.min_elements and not torch.equal(expected, weight.detach())
    trainer.train_step()
    repo.restore(trainer.state, snapshot.id)
    assert torch.equal(weight.detach(), expected)
    assert torch.equal(trainer.optimizer.state[weight]["step"], step_count), "bookkeeping scalars stay exact"


def test_the_main_line_refuses_lossy_content_unless_asked() -> None:
    repo = qckpt.Repository.init(qckpt.MemoryBackend())
    tree = {"w": torch.randn(64)}
    with pytest.raises(InvalidInputError, match="main line"):
        repo.commit(tree, lossy=qckpt.LossyTier(10))
    assert repo.branches() == {}, "nothing was written"
    base = repo.commit(tree, metrics={"loss": 2.0})
    explored = repo.commit({"w": tree["w"] * 0.5}, branch="explore", lossy=qckpt.LossyTier(10), metrics={"loss": 1.0})
    with pytest.raises(InvalidInputError, match="main line"):
        repo.join("main", ["explore", base.id])
    with pytest.raises(InvalidInputError, match="main line"):
        repo.average(["explore", base.id], branch="main")
    assert repo.snapshot("main").id == base.id
    joined = repo.join("main", ["explore", base.id], allow_lossy=True)
    assert joined.lossy == explored.lossy == qckpt.LossyTier(10).annotation()
    allowed = repo.commit(tree, lossy=qckpt.LossyTier(10, allow_main=True))
    assert allowed.lossy is not None and repo.snapshot("main").id == allowed.id


@pytest.mark.parametrize("bits", [0, 52, 2.5, True, "10"])
def test_lossy_tier_rejects_impossible_precisions(bits: Any) -> None:
    with pytest.raises(InvalidInputError, match="mantissa_bits"):
        qckpt.LossyTier(bits)
    with pytest.raises(InvalidInputError, match="min_elements"):
        qckpt.LossyTier(10, min_elements=0)
    with pytest.raises(InvalidInputError, match="LossyTier"):
        qckpt.Repository.init(qckpt.MemoryBackend()).commit({"w": torch.ones(2)}, branch="x", lossy=10)  # type: ignore[arg-type]
