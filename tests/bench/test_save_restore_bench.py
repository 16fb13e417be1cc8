"""The save/restore benchmark runs end to end on the tiny model (no timing asserted)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench import save_restore


def test_save_restore_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "sr.json"
    save_restore.run(argparse.Namespace(quick=False, sizes="tiny", steps=3, json=out))
    measured = json.loads(out.read_text())["sizes"]["tiny"]
    times = {k: v for k, v in measured.items() if k.endswith("_s")}
    assert {"clone_s", "stall_s", "restore_hot_s", "stall_every_step_s", "restore_latest_s", "restore_middle_s",
            "restore_oldest_s", "torch_load_s"} <= times.keys()  # fmt: skip
    assert all(math.isfinite(v) and v > 0 for v in times.values())
    assert measured["warm_bytes_per_commit"] > 0 and measured["latest_chain_depth"] >= 1
    assert set(measured["ratios"]) >= {"stall/clone", "restore_hot/clone", "restore_latest/torch_load"}
