"""Pruning: the rule on its own (survivors, rankings, learned weights, forecasts),
and in the light cone: cut futures end at the rung and are never chosen, kept
ones resume from their rung commit exactly as if never paused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qckpt
from bench.compare import differences
from bench.spike import Workload, warm_cone
from branch import BatchedRollouts, BatchedStep, ConeConfig, Future, LightCone, Pruning, ScaleLR, SequentialRollouts, SkipBatches, select
from branch.pruning import at_rung, family_weights, predict, survivors


def test_survivors_keep_the_control_and_the_best_share() -> None:
    ranks = {"control": 9.0, "a": 2.0, "b": 3.0, "c": 1.0, "d": None}
    assert survivors(ranks, "control", 0.5) == {"control", "c", "a"}  # ceil(0.5 * 4) = 2; d diverged
    assert survivors(ranks, "control", 0.1) == {"control", "c"}  # at least one
    assert survivors(ranks, "control", 1.0) == {"control", "a", "b", "c"}  # never one without a rank


@given(st.dictionaries(st.text(min_size=1, max_size=3).filter(lambda n: n != "control"),
                       st.none() | st.floats(0.0, 10.0), max_size=8),
       st.none() | st.floats(0.0, 10.0), st.floats(0.01, 1.0))  # fmt: skip
def test_survivors_are_the_control_and_exactly_the_lowest_ranked_share(
    others: dict[str, float | None], control_rank: float | None, keep: float
) -> None:
    ranks = {"control": control_rank, **others}
    kept = survivors(ranks, "control", keep)
    assert "control" in kept  # never cut, whatever its rank (even none)
    going = kept - {"control"}
    ranked = [n for n, v in others.items() if v is not None]
    assert len(going) == min(len(ranked), max(1, math.ceil(keep * len(others))))
    assert all(others[n] is not None for n in going)  # a future without a rank (it diverged) is cut
    for n in going:  # nothing cut ranks strictly lower than anything kept
        assert all(others[m] is None or others[m] >= others[n] for m in others.keys() - kept)  # type: ignore[operator]


def test_each_ranking_decides_on_its_own_measure() -> None:
    """"observed" ranks by the mean loss of the prefix's last third; "forecast" by
    the forecast at the horizon. Two prefixes that the two measures order
    differently: one still falling fast (higher now, forecast lower), one flat."""
    falling = [[s, 1.0 + 2.0 * math.exp(-s / 6), None] for s in range(1, 13)]
    flat = [[s, 1.3, None] for s in range(1, 13)]
    prefixes = {"control": flat, "falling": falling, "flat": flat, "gone": None}
    assert at_rung(falling) == pytest.approx(sum(r[1] for r in falling[8:]) / 4) and at_rung(flat) == pytest.approx(1.3)
    assert at_rung(falling) > 1.3  # higher at the rung...
    assert at_rung([[1, 2.0, None], [2, float("nan"), None]]) is None and at_rung([[1, 2.0, None]]) == 2.0
    kept, forecasts, observed = Pruning(keep=0.3, context=0).decide([], 0, 24, prefixes, [])
    assert kept == {"control", "flat"} and observed == {"control": at_rung(flat), "falling": at_rung(falling),
                                                         "flat": at_rung(flat), "gone": None}  # fmt: skip
    assert forecasts["falling"]["value"] < forecasts["flat"]["value"] and forecasts["gone"] == {}  # ...lower at the horizon
    kept, _, _ = Pruning(keep=0.3, context=0, rank_by="forecast").decide([], 0, 24, prefixes, [])
    assert kept == {"control", "falling"}


def test_weights_are_learned_from_the_record() -> None:
    assert family_weights([]) == {}
    events = [{"futures": [{"rung_forecast": {"members": {"power": 2.0, "flat": 2.5}}, "rung_actual": 2.1},
                           {"rung_forecast": {"members": {"power": 3.0, "flat": 3.5}}, "rung_actual": 3.1},
                           {"rung_forecast": {"members": {"power": 1.0}}, "rung_actual": None}]}]  # fmt: skip
    weights = family_weights(events)
    assert weights["power"] == pytest.approx(0.8) and weights["flat"] == pytest.approx(0.2)  # errors 0.1 and 0.4
    rows = [[s, 3.0 * s**-0.3, None] for s in range(1, 41)]
    equal, learned = predict(rows[:30], rows[30:], 60, {}), predict(rows[:30], rows[30:], 60, weights)
    members = equal["members"]
    assert equal["value"] == pytest.approx(sum(members.values()) / len(members))
    assert learned["value"] == pytest.approx(0.8 * members["power"] + 0.2 * members["flat"])  # exp: no record, no weight
    assert equal["spread"] == pytest.approx(max(members.values()) - min(members.values()))
    assert predict([], rows[:2], 60, {}) == {}


def test_rung_and_bad_settings() -> None:
    assert Pruning().rung_steps(30) == 15 and Pruning().rung_steps(6) == 0  # too short to cut
    for bad in ({"rung": 1.0}, {"keep": 0.0}, {"context": -1}, {"rank_by": "loss"}):
        with pytest.raises(qckpt.InvalidInputError):
            Pruning(**bad)


def test_bonferroni_counts_the_cut_futures() -> None:
    scores = {"control": [1.0, 1.1, 0.9, 1.0], "a": [0.9, 1.0, 0.8, 0.95]}
    assert select(scores, "control").comparisons[0].level == pytest.approx(0.95)
    assert select(scores, "control", candidates=4).comparisons[0].level == pytest.approx(1 - 0.05 / 4)


FUTURES = [Future("control", None), Future("skip", SkipBatches(2)), Future("lower", ScaleLR(0.5)), Future("higher", ScaleLR(2.0))]


def _cone(repo: qckpt.Repository, executor: Any, pruning: Pruning | None) -> LightCone:
    config = ConeConfig(horizon=10, commit_every=4, resamples=200, pruning=pruning)
    return warm_cone(repo, Workload(100), config, executor=executor, validation=4)


@pytest.mark.parametrize("executor", [SequentialRollouts(), BatchedRollouts(BatchedStep(clip_grad_norm=1.0))],
                         ids=["sequential", "batched"])  # fmt: skip
def test_cut_futures_end_at_the_rung_and_kept_ones_resume_exactly(tmp_path: Path, executor: Any) -> None:
    with qckpt.Repository.init(tmp_path / "full") as repo:
        cone = _cone(repo, SequentialRollouts(), None)
        full = {r.future.name: (r, repo.load(r.snapshot).tree()) for r in cone.executor.run(cone, repo.snapshot("main"), FUTURES, 10).results}
    with qckpt.Repository.init(tmp_path / "pruned") as repo:
        cone = _cone(repo, executor, Pruning(rung=0.5, keep=0.3))
        origin = repo.snapshot("main")
        results = executor.run(cone, origin, FUTURES, 10).results
        kept = [r for r in results if r.pruned_at is None]
        cut = [r for r in results if r.pruned_at is not None]
        assert len(kept) == 2 and "control" in {r.future.name for r in kept} and len(cut) == 2
        for r in cut:
            assert r.pruned_at == (origin.step or 0) + 5 and r.scores == [] and len(r.metrics) == 5
            assert repo.snapshot(r.branch).id == r.snapshot and repo.snapshot(r.snapshot).step == r.pruned_at
        for r in results:
            assert r.rung_forecast["value"] > 0 and set(r.rung_forecast["members"]) == {"power", "exp", "flat"}
            assert r.rung_observed == at_rung(r.metrics[:5]) and r.as_record()["rung_observed"] == r.rung_observed
        worst_kept = max(r.rung_observed for r in kept if r.future.name != "control")
        assert all(r.rung_observed > worst_kept for r in cut if r.future.name != "control")  # ranked by what it observed
        exact = isinstance(executor, SequentialRollouts)
        for r in kept:  # paused at the rung, committed, restored, trained on: as if never paused
            reference, tree = full[r.future.name]
            assert len(r.metrics) == 10 and r.as_record()["rung_actual"] is not None
            if exact:
                assert r.metrics == reference.metrics and r.scores == reference.scores
                assert differences(repo.load(r.snapshot).tree()["components"], tree["components"]) == []
            else:
                assert max(abs(a[1] - b[1]) for a, b in zip(r.metrics, reference.metrics)) < 1e-5
                rung = repo.snapshot(r.snapshot).parents[0]  # horizon <- rung <- origin
                assert repo.snapshot(rung).step == origin.step + 5 and repo.snapshot(rung).parents == (origin.id,)
        decision = cone.explore(cone.index.observe(_nan(cone)))
        event = cone.record.events[-1]
        assert decision.selection.chosen in {r.future.name for r in decision.results if r.pruned_at is None}
        assert all(c["level"] == pytest.approx(1 - 0.05 / 4) for c in event["selection"]["comparisons"])
        assert sum(f["pruned_at"] is not None for f in event["futures"]) == 2


def _nan(cone: LightCone) -> Any:
    from branch import Observation

    return Observation(cone.state.step, float("nan"))
