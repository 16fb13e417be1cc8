"""Delta and predictive codecs: bit-exact round trips on arbitrary data and on real
consecutive training states, damaged bases caught, chain bound kept."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qckpt
from bench.compare import differences
from bench.workload import Trainer, WarmupCosine, train_step
from qckpt.format.codecs import (
    BFLOAT16, FLOAT16, FLOAT32, FLOAT64, AdamParamCodec, AdamSecondMomentCodec, DeltaCodec, LinearCodec, PredictiveCodec,
)  # fmt: skip
from qckpt.format.ids import digest
from qckpt.format.objects import Candidate, decode_object, encode_object
from qckpt.errors import IntegrityError

FORMATS = {FLOAT32: 4, BFLOAT16: 2, FLOAT16: 2, FLOAT64: 8}
PREDICTIVE: list[tuple[PredictiveCodec, int, int]] = [  # codec, inputs, scalars
    (DeltaCodec(), 1, 0), (AdamSecondMomentCodec(), 3, 2), (AdamParamCodec(), 3, 4), (LinearCodec(), 2, 2),
]  # fmt: skip


def _random_bits(rng: np.random.Generator, n: int, itemsize: int) -> np.ndarray:
    return rng.integers(0, 256, size=n * itemsize, dtype=np.uint8)  # NaN, inf, subnormal patterns included


def _close_floats(rng: np.random.Generator, base: np.ndarray, fmt: int) -> np.ndarray:
    """``base`` nudged a little (like one training step), as raw bytes of format ``fmt``."""
    kind = {FLOAT32: np.float32, FLOAT16: np.float16, FLOAT64: np.float64}.get(fmt)
    if kind is None:  # bfloat16: nudge the low bits of the bit pattern
        return (base.view(np.uint16) ^ rng.integers(0, 4, size=base.size // 2, dtype=np.uint16)).view(np.uint8)
    with np.errstate(all="ignore"):  # the random bits include NaN and inf
        return (base.view(kind) * kind(1.001)).astype(kind).view(np.uint8)


@settings(max_examples=80, deadline=None)
@given(codec_index=st.integers(0, len(PREDICTIVE) - 1), fmt=st.sampled_from(sorted(FORMATS)), n=st.integers(1, 300),
       seed=st.integers(0, 2**32 - 1), near=st.booleans(),
       scalars=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=4, max_size=4))  # fmt: skip
def test_predictive_codecs_round_trip_any_bits(
    codec_index: int, fmt: int, n: int, seed: int, near: bool, scalars: list[float]
) -> None:
    codec, arity, count = PREDICTIVE[codec_index]
    itemsize = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    inputs = [_random_bits(rng, n, itemsize) for _ in range(arity)]
    raw = _close_floats(rng, inputs[0], fmt) if near else _random_bits(rng, n, itemsize)
    payload = codec.encode(raw, itemsize, 1, inputs, fmt, tuple(scalars[:count]))
    assert bytes(codec.decode(memoryview(payload), raw.size, itemsize, inputs)) == raw.tobytes()


@settings(max_examples=40, deadline=None)
@given(itemsize=st.sampled_from([1, 2, 4, 8, 16]), floating=st.booleans(), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_delta_round_trips_any_dtype_and_objects_verify(itemsize: int, floating: bool, n: int, seed: int) -> None:
    """Every element width a supported dtype has (16: complex128), floating (byte planes
    when stored plain) or not."""
    rng = np.random.default_rng(seed)
    base, raw = _random_bits(rng, n, itemsize), _random_bits(rng, n, itemsize)
    raw[: raw.size // 2] = base[: raw.size // 2]
    obj = encode_object(raw, itemsize, floating, 1, [Candidate(DeltaCodec(), (digest(base),), (base,), 0)])
    assert bytes(decode_object(obj.data, digest(raw), {digest(base): base.tobytes()}.__getitem__)) == raw.tobytes()


def test_object_picks_the_prediction_and_checks_dependencies() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(4096).astype(np.float32).view(np.uint8)
    raw = (base.view(np.float32) * np.float32(1.0001)).view(np.uint8)
    obj = encode_object(raw, 4, True, 1, [Candidate(DeltaCodec(), (digest(base),), (base,), FLOAT32)])
    assert obj.deps == (digest(base),) and obj.codec == DeltaCodec.id
    assert bytes(decode_object(obj.data, digest(raw), lambda d: base.tobytes())) == raw.tobytes()
    wrong_base = base.copy()
    wrong_base[7] ^= 1
    with pytest.raises(IntegrityError, match="digest"):
        decode_object(obj.data, digest(raw), lambda d: wrong_base.tobytes())
    noise = rng.integers(0, 256, 4096 * 4, dtype=np.uint8)  # unpredictable: stored on its own
    assert encode_object(noise, 4, True, 1, [Candidate(DeltaCodec(), (digest(base),), (base,), FLOAT32)]).deps == ()


# -- real training -------------------------------------------------------------------


def _codec_usage(repo: qckpt.Repository) -> Counter[str]:
    names = {c.id: c.name for c in (DeltaCodec, AdamSecondMomentCodec, AdamParamCodec, LinearCodec)}
    usage: Counter[str] = Counter()
    for snap in repo.log("main"):
        for entry in repo.manifest(snap).tensors:
            for chunk_id in entry.chunks:
                location = repo._store.index.get(chunk_id)
                assert location is not None
                usage[names.get(location.codec, "plain")] += 1
    return usage


def _train_and_verify(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    steps: int = 10,
    dtype: torch.dtype = torch.float32,
    freeze: bool = False,
    poison: bool = False,
    max_chain: int = 6,
) -> Counter[str]:
    """Train the tiny reference model, commit every step, then check that every
    snapshot reads back bit for bit (compared with torch.save copies)."""
    trainer = Trainer("tiny", total_steps=50)
    model = trainer.model.to(dtype)
    if freeze:  # still in the optimizer, but never gets a gradient (no optimizer state)
        model.pos_emb.weight.requires_grad_(False)
    optimizer = make_optimizer(list(model.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(4, 50))  # LR changes every step
    state = qckpt.TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, sampler=trainer.sampler)
    repo = qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=4096, max_chain=max_chain)
    expected = {}
    for step in range(steps):
        train_step(state)
        if poison and step == 4:
            with torch.no_grad():
                model.head.weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        buffer = io.BytesIO()
        torch.save(state.capture(), buffer)
        expected[repo.commit(state).id] = buffer.getvalue()
    for snapshot_id, saved in expected.items():
        want = torch.load(io.BytesIO(saved), weights_only=False)
        got = repo.load(snapshot_id).tree()
        want["components"]["model"] = dict(want["components"]["model"])  # torch.save keeps the OrderedDict type
        assert differences(want["components"], got["components"]) == []
    usage = _codec_usage(repo)
    repo.close()
    return usage


def test_adamw_training_states_round_trip_and_use_predictions() -> None:
    usage = _train_and_verify(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1))
    assert usage["adam-param"] and usage["adam-v"] and usage["delta"], usage


@pytest.mark.parametrize(
    "variant",
    ["adam no weight decay", "adam amsgrad", "bf16 params", "frozen param and non-finite values", "sgd nesterov", "sgd"],
)
def test_training_variants_round_trip(variant: str) -> None:
    if variant == "adam no weight decay":
        usage = _train_and_verify(lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.0))
        assert usage["adam-param"], usage
    elif variant == "adam amsgrad":
        usage = _train_and_verify(lambda p: torch.optim.AdamW(p, lr=3e-3, amsgrad=True))
        assert usage["adam-param"], usage
    elif variant == "bf16 params":
        usage = _train_and_verify(lambda p: torch.optim.AdamW(p, lr=3e-3), dtype=torch.bfloat16, steps=6)
        assert usage["adam-param"] or usage["adam-v"] or usage["delta"], usage
    elif variant == "frozen param and non-finite values":
        _train_and_verify(lambda p: torch.optim.AdamW(p, lr=3e-3), freeze=True, poison=True)
    elif variant == "sgd nesterov":
        usage = _train_and_verify(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4))
        assert usage["linear"], usage
    else:
        usage = _train_and_verify(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1))
        assert usage["linear"], usage


def test_chain_bound_holds_after_hundreds_of_commits() -> None:
    max_chain = 4
    repo = qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=1024, max_chain=max_chain)
    weights = torch.linspace(-1, 1, 1000)
    for step in range(300):
        weights = weights * 1.0001 + 1e-4
        repo.commit({"w": weights, "step": step}, step=step)
    longest: dict[bytes, int] = {}

    def chain(chunk_id: bytes) -> int:  # recomputed from the dependency graph, not trusted from the index
        if chunk_id not in longest:
            location = repo._store.index.get(chunk_id)
            assert location is not None
            longest[chunk_id] = 1 + max((chain(d) for d in location.deps), default=0)
        return longest[chunk_id]

    depths = [chain(c) for snap in repo.log("main") for e in repo.manifest(snap).tensors for c in e.chunks]
    assert max(depths) == max_chain and min(depths) == 1
    assert repo.load("main@0")["w"].shape == (1000,) and torch.equal(repo.load("main")["w"], weights)


def test_damaged_delta_base_is_an_integrity_error_not_wrong_weights(tmp_path: Path) -> None:
    with qckpt.Repository.init(tmp_path / "repo", chunk_size=4096, max_chain=8, warm=False) as repo:
        weights = torch.randn(1024)
        first = repo.commit({"w": weights})
        repo.commit({"w": weights * 1.0001})
        base_chunk = repo.manifest(first).tensors[0].chunks[0]
        location = repo._store.index.get(base_chunk)
        assert location is not None
        latest = repo.manifest(repo.snapshot("main")).tensors[0].chunks[0]
        assert repo._store.index.get(latest).deps == (base_chunk,)  # type: ignore[union-attr]
    pack = tmp_path / "repo" / "packs" / f"{location.pack_id}.pack"
    data = bytearray(pack.read_bytes())
    data[location.offset + location.length - 5] ^= 0xFF
    pack.write_bytes(bytes(data))
    with qckpt.Repository.open(tmp_path / "repo") as repo:
        with pytest.raises(IntegrityError, match=f"depends on object {base_chunk.hex()}"):
            repo.load("main")["w"]
        report = repo.fsck()
        assert {p.subject for p in report.problems} == {f"object {base_chunk.hex()}", f"pack {location.pack_id}"}
        (damaged,) = [p for p in report.problems if p.subject.startswith("object")]  # reported once, with...
        assert any(f"through object {latest.hex()}" in a for a in damaged.affects)  # ...what is predicted from it


def test_gc_keeps_what_kept_snapshots_depend_on(repo: qckpt.Repository) -> None:
    weights = torch.randn(2000)
    for step in range(6):
        weights = weights * 1.0001
        repo.commit({"w": weights}, step=step)
    assert repo.config.max_chain == 16  # the fixture's default chain bound: all six commits form one chain
    latest = repo.load("main").entry("w").chunks
    depths = [repo._store.index.get(c).depth for c in latest]  # type: ignore[union-attr]
    assert max(depths) == 6  # the newest chunks sit at the end of a six-object chain
    repo.gc(qckpt.RetentionPolicy(keep_last=1))
    assert [s.step for s in repo.log()] == [5]
    for snapshot_id in repo._store.warm.snapshot_ids():
        repo._store.warm.delete(snapshot_id)  # read the chain, not the head's warm copy

    def from_the_packs() -> torch.Tensor:  # nor the hot tier's copy of the head (a view would take it)
        return repo._store.read_arrays(repo.snapshot("main"), [repo.load("main").entry("w")])[0]  # type: ignore[return-value]

    assert torch.equal(from_the_packs(), weights) and repo.fsck().ok
    repo._store.index.clear()  # forget every location: reads must find them again in the footers
    assert torch.equal(from_the_packs(), weights)
    assert [repo._store.locate(c).depth for c in latest] == depths  # type: ignore[union-attr]


def test_restore_makes_the_next_commit_a_delta(tmp_path: Path) -> None:
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "repo", chunk_size=4096) as repo:
        train_step(trainer.state)
        repo.commit(trainer.state)
    shutil.copytree(tmp_path / "repo", tmp_path / "copy")
    stats = {}
    for name, hot in (("repo", 2), ("copy", 0)):  # the copy keeps no hot tier: no delta base
        resumed = Trainer("tiny", total_steps=50)
        with qckpt.Repository.open(tmp_path / name, hot_snapshots=hot) as repo:
            repo.restore(resumed.state)  # a new process's view: read from storage
            train_step(resumed.state)
            stats[name] = repo.commit(resumed.state).stats
    assert stats["repo"].new_chunks == stats["copy"].new_chunks  # the same state...
    assert stats["repo"].new_stored_bytes < 0.7 * stats["copy"].new_stored_bytes  # ...predicted from the restored one


def test_complex_tensors_commit_as_deltas_and_restore(tmp_path: Path) -> None:
    """Elements wider than a machine word (complex128, 16 bytes) are stored as deltas
    against the previous commit like any other dtype (their second commit used to fail)."""
    values = torch.randn(50_000, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    with qckpt.Repository.init(tmp_path / "repo", chunk_size=1 << 16) as repo:
        first = repo.commit({"z": values, "z64": values.to(torch.complex64)})
        nudged = values * (1 + 1e-9)
        second = repo.commit({"z": nudged, "z64": nudged.to(torch.complex64)})
        assert second.stats.new_stored_bytes < 0.8 * first.stats.new_stored_bytes  # the deltas are smaller than the data
    with qckpt.Repository.open(tmp_path / "repo") as repo:
        assert torch.equal(repo.load(first.id)["z"], values)
        assert torch.equal(repo.load(second.id)["z"], nudged)
        assert torch.equal(repo.load(second.id)["z64"], nudged.to(torch.complex64))
