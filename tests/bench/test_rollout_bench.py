"""The rollout benchmark harness runs end to end at a small size and writes the
issue's JSON shape (speed is the benchmark's to report, not asserted)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench import rollout
from branch import Pruning


def test_rollout_benchmark_runs_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "rollout.json"
    rollout.run(argparse.Namespace(quick=True, size="tiny", horizon=5, seeds=1, device="cpu", json=out))
    results = json.loads(out.read_text())
    assert set(results["strategies"]) in ({"sequential", "batched"}, {"sequential", "batched", "ray"})
    for per_k in results["strategies"].values():
        assert set(per_k) == {"2", "4"}
        for m in per_k.values():
            assert m["steps_per_s"] > 0 and {"peak_mem_bytes", "max_abs_diff_vs_sequential", "max_rel_diff_vs_sequential"} <= set(m)
    assert all(m["max_abs_diff_vs_sequential"] < 1e-4 for m in results["strategies"]["batched"].values())
    assert all(m["optimizer_stacked_s"] > 0 and m["optimizer_per_copy_s"] > 0 for m in results["strategies"]["batched"].values())
    assert all(m["max_abs_diff_vs_sequential"] == 0.0 for m in results["strategies"].get("ray", {}).values())
    assert set(results["chosen"]) == {"2", "4"} and set(results["chosen"].values()) <= {"sequential", "batched"}
    pruning = results["pruning"]
    assert set(pruning) == {"compute_saved", "same_winner_rate", "forecast_mae", "events", "ranked_by", "ranked_by_forecast",
                            "successive_halving", "ranked_by_held_out"}  # fmt: skip
    assert pruning["ranked_by"] == "observed" and pruning["ranked_by_forecast"]["events"] == pruning["events"]
    for figures in (pruning, pruning["ranked_by_forecast"], pruning["successive_halving"], pruning["ranked_by_held_out"]):
        assert 0 <= figures["compute_saved"] < 1 and 0 <= figures["same_winner_rate"] <= 1
    halving = pruning["successive_halving"]
    assert halving["rungs"] == [0.25, 0.5] and halving["events"] <= pruning["events"]
    assert halving["events"] == pruning["events"] > 0  # 200-step runs: both rungs fall inside every horizon
    assert halving["compute_saved"] > pruning["compute_saved"]  # 3 of 4 alternatives cut, two earlier than the one rung's cut
    held_out = pruning["ranked_by_held_out"]  # the same cut, but every alternative is evaluated at the rung first
    assert held_out["events"] == pruning["events"] and held_out["compute_saved"] < pruning["compute_saved"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rollout_benchmark_on_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "rollout.json"
    rollout.run(argparse.Namespace(quick=True, size="tiny", horizon=5, seeds=1, device="cuda", json=out))
    results = json.loads(out.read_text())
    assert results["device"].startswith("cuda")
    assert all(m["peak_mem_bytes"] > 0 for m in results["strategies"]["batched"].values())
    # a kernel swap alone moved the sequential futures ~3e-7 (10M model, H=20, H200); forks that
    # shared optimizer state through CUDA copy-on-write clones moved the batched ones 1.3e-2
    assert all(m["max_rel_diff_vs_sequential"] < 1e-4 for m in results["strategies"]["batched"].values())


def test_successive_halving_replay_cuts_half_at_each_rung_and_counts_what_it_saves() -> None:
    levels = {"control": 3.0, "a": 2.0, "b": 2.5, "c": 2.8, "d": 4.0}
    futures = [{"name": name, "metrics": [[s, level + 0.01 * (s % 2), None] for s in range(1, 21)],
                "eval": [level + 0.001 * i for i in range(8)]} for name, level in levels.items()]  # fmt: skip
    event = {"futures": futures, "horizon": 20, "origin": {"step": 0}, "number": 1, "selection": {"chosen": "a"}}
    cut, _ = rollout._replay(event, [], Pruning(), [5, 10], [])
    assert cut == {"c": 5, "d": 5, "b": 10}  # 4 alternatives -> the better 2 at step 5 -> the best 1 at step 10
    tally = rollout._Tally()
    tally.add(event, cut)
    evals = rollout.EVAL_COST * 8
    assert tally.figures() == {"compute_saved": pytest.approx((15 + 15 + 10 + 3 * evals) / (5 * (20 + evals))),
                               "same_winner_rate": 1.0, "events": 1}  # fmt: skip
    ranked_at_rung = rollout._Tally()  # the same cut after evaluating the 4 alternatives' 8 batches at each of the 2 rungs
    ranked_at_rung.add(event, cut, rung_evaluations=4 * 8 + 2 * 8)
    assert ranked_at_rung.figures()["compute_saved"] == pytest.approx((15 + 15 + 10 + 3 * evals - 6 * evals) / (5 * (20 + evals)))


def test_rollout_phases_time_every_commit_and_restore() -> None:
    from bench.rollout_phases import measure

    out = measure(2, "tiny", "cpu")
    sequential, batched = out["rounds"]
    assert sequential["strategy"] == "sequential" and batched["strategy"] == "batched"
    for figures in (sequential, batched):
        assert 0 < figures["commit_async_s"] < figures["wall_s"] and 0 < figures["write_s"] < figures["wall_s"]
        assert 0 < figures["pack_write_s"] < figures["write_s"]  # each commit writes at least its last pack
    assert sequential["restore_s"] > 0 and all(v > 0 for v in out["train_steps_per_s"].values())
    assert out["disk_write_mb_s"] > 0 and out["record_write_s"] > 0
    for figures in out["events"].values():
        assert 0 < figures["origin_restore_s"] < figures["run_futures_s"] < figures["event_s"]
        assert 0 < figures["join_s"] + figures["continue_s"] < figures["event_s"]
