"""The spike benchmark harness runs end to end at a small size (no result asserted:
the figures are the benchmark's, in README)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import spike


def test_spike_benchmark_runs_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "spike.json"
    spike.run(argparse.Namespace(quick=False, steps=50, seeds=1, json=out))
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {"clean", "lr_spike", "poison", "noise_shard"}
    for scenario in results["scenarios"].values():
        assert set(scenario["methods"]) == set(spike.METHODS)
        for m in scenario["methods"].values():
            assert {"final_loss_mean", "final_loss_std", "spikes", "compute_steps", "wall_s"} <= set(m)
            assert m["compute_steps"] >= 50
            assert m["compute_steps"] == pytest.approx(m["train_steps"] + results["eval_cost"] * m["eval_batches"])
    assert (tmp_path / "spike-cone.html").exists() and (tmp_path / "spike-cone.png").exists()
