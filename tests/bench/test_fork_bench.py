"""The fork benchmark harness runs and reports what it claims (timings are not asserted)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import fork


def test_fork_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "fork.json"
    results = fork.run(argparse.Namespace(quick=True, json=out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["fork_bytes_written"] == 0  # a fork writes refs only
    assert results["gc_size_ratio"] <= 1.05 and results["gc_size_ratio_large"] <= 1.05
    assert results["params_large"] > results["params_small"] > 0
    assert results["fork_s_small"] > 0 and results["copy_checkpoint_s_large"] > 0
