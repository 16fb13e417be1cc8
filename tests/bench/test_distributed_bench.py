"""The distributed benchmark runs end to end on 2 gloo ranks (FSDP2 on the CPU) and
writes the issue's JSON keys; its correctness figures are asserted (bit-exact
resume in new processes, 2 ranks restored into one process), its speed is only
reported."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import distributed

pytestmark = pytest.mark.slow


def test_distributed_benchmark_resumes_bit_exactly_and_reshards(tmp_path: Path) -> None:
    out = tmp_path / "distributed.json"
    distributed.run(argparse.Namespace(quick=True, size="tiny", steps=6, json=out))
    results = json.loads(out.read_text())
    keys = {"qckpt_bytes", "dcp_bytes", "qckpt_commit_s", "dcp_save_s", "qckpt_restore_s", "dcp_load_s", "bit_exact", "resharded_restore",
            "train_s", "qckpt_sync_train_s", "dcp_sync_train_s", "qckpt_async_train_s", "dcp_async_train_s"}
    assert keys <= set(results)
    assert results["bit_exact"] is True and results["resharded_restore"] is True
    assert 0 < results["qckpt_bytes"] < results["dcp_bytes"]  # every step stored: dedup and deltas must show
