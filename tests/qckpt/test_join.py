"""Join (pick the best branch), average (combine branches) and diff."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qckpt


def _fork_two(repo: qckpt.Repository) -> tuple[qckpt.Snapshot, qckpt.Snapshot, qckpt.Snapshot]:
    base = repo.commit({"w": torch.ones(300), "n": torch.tensor([7]), "b": torch.zeros(8)}, step=0, metrics={"loss": 3.0})
    repo.create_branch("low")
    repo.create_branch("high")
    low = repo.commit({"w": torch.full((300,), 3.0), "n": torch.tensor([7]), "b": torch.zeros(8)},
                      branch="low", step=1, metrics={"loss": 1.0, "acc": 0.5})  # fmt: skip
    high = repo.commit({"w": torch.full((300,), 5.0), "n": torch.tensor([9]), "b": torch.zeros(8)},
                       branch="high", step=1, metrics={"loss": 2.0, "acc": 0.9})  # fmt: skip
    return base, low, high


def test_join_picks_the_best_and_records_everything(repo: qckpt.Repository) -> None:
    base, low, high = _fork_two(repo)
    bytes_before = repo.stats().stored_bytes
    joined = repo.join("main", ["low", "high"])
    assert repo.branches()["main"] == joined.id
    assert joined.manifest == low.manifest and joined.parents == (base.id, low.id, high.id)
    assert joined.annotations["join"]["winner"] == "low"
    assert [c["metrics"]["loss"] for c in joined.annotations["join"]["candidates"]] == [1.0, 2.0]
    assert joined.stats.new_stored_bytes == 0
    assert repo.stats().stored_bytes - bytes_before < 2048  # one small snapshot record, no data
    assert torch.equal(repo.load("main")["w"], torch.full((300,), 3.0))
    assert {s.id for s in repo.log("main")} == {joined.id, base.id, low.id, high.id}


def test_join_modes_callables_and_nan(repo: qckpt.Repository) -> None:
    _, low, high = _fork_two(repo)
    assert repo.join("best-acc", ["low", "high"], metric="acc", mode="max").manifest == high.manifest
    by_callable = repo.join("main", ["low", "high"], metric=lambda s: -s.metrics["acc"])
    assert by_callable.manifest == high.manifest
    repo.commit({"w": torch.zeros(300)}, branch="low", metrics={"loss": math.nan})
    assert repo.join("main", ["low", "high"]).manifest == high.manifest  # NaN loses


def test_join_errors(repo: qckpt.Repository) -> None:
    _fork_two(repo)
    with pytest.raises(qckpt.InvalidInputError, match="no numeric metric 'ppl'"):
        repo.join("main", ["low", "high"], metric="ppl")
    with pytest.raises(qckpt.InvalidInputError):
        repo.join("main", [])
    with pytest.raises(qckpt.RevisionNotFoundError):
        repo.join("main", ["low", "nope"])
    with pytest.raises(qckpt.InvalidRefNameError):
        repo.join("bad/name", ["low"])


def test_average(repo: qckpt.Repository) -> None:
    _, low, high = _fork_two(repo)
    avg = repo.average(["low", "high"], branch="soup", weights=[3, 1])
    view = repo.load("soup")
    assert torch.equal(view["w"], torch.full((300,), 3.5))
    assert torch.equal(view["n"], torch.tensor([7]))  # integers come from the first revision
    assert torch.equal(view["b"], torch.zeros(8))
    assert view.entry("b").chunks == repo.load("low").entry("b").chunks  # identical tensors are reused
    assert avg.parents == (low.id, high.id) and avg.annotations["average"]["weights"] == [0.75, 0.25]
    bf16 = repo.commit({"w": torch.full((4,), 1.0, dtype=torch.bfloat16), "a": np.ones(2)}, branch="x")
    repo.create_branch("y", "x")
    repo.commit({"w": torch.full((4,), 2.0, dtype=torch.bfloat16), "a": np.zeros(2)}, branch="y")
    mixed = repo.load(repo.average([bf16.id, "y"], branch="z").id)
    assert mixed["w"].dtype == torch.bfloat16 and torch.equal(mixed["w"], torch.full((4,), 1.5, dtype=torch.bfloat16))
    assert mixed["a"].dtype == np.float64 and np.array_equal(mixed["a"], np.full(2, 0.5))


def test_average_errors(repo: qckpt.Repository) -> None:
    _fork_two(repo)
    repo.commit({"w": torch.ones(3)}, branch="odd")
    with pytest.raises(qckpt.StateMismatchError, match="cannot be averaged"):
        repo.average(["low", "odd"], branch="soup")
    with pytest.raises(qckpt.InvalidInputError, match="weights"):
        repo.average(["low", "high"], branch="soup", weights=[1, -1])
    with pytest.raises(qckpt.InvalidInputError, match="at least two"):
        repo.average(["low"], branch="soup")
    assert "soup" not in repo.branches()


def test_diff(repo: qckpt.Repository) -> None:
    _fork_two(repo)
    repo.commit({"w": torch.full((300,), 5.0), "extra": torch.ones(2), "b": torch.zeros(8, 2)}, branch="other")
    diffs = {d.path: d for d in repo.diff("low", "high")}
    w = diffs["w"]
    assert (w.status, w.l2, w.relative, w.cosine) == ("changed", pytest.approx(2 * math.sqrt(300)),
                                                      pytest.approx(2 / 3), pytest.approx(1.0))  # fmt: skip
    assert diffs["b"].status == "same" and diffs["n"].status == "changed"
    other = {d.path: d.status for d in repo.diff("low", "other")}
    assert other == {"w": "changed", "n": "removed", "b": "retyped", "extra": "added"}
    repo.commit({"z": torch.zeros(4)}, branch="zero")
    repo.commit({"z": torch.ones(4)}, branch="one")
    (from_zero,) = repo.diff("zero", "one")
    assert from_zero.cosine is None and from_zero.relative == math.inf and from_zero.l2 == 2.0
