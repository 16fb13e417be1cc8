"""The S3 benchmark harness and the demo's --s3 mode run end to end (no timing asserted)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import s3


def test_s3_benchmark_quick(s3_endpoint: str, tmp_path: Path) -> None:
    out = tmp_path / "s3.json"
    results = s3.run(argparse.Namespace(quick=True, commits=5, endpoint=s3_endpoint, json=out))
    assert json.loads(out.read_text())["commits"] == 5
    per_commit = results["s3_requests_per_commit"]
    assert 0 < per_commit["put_object"] <= 7  # a handful of PUTs (packs, manifest, snapshot, ref log, ref, lock), not one per tensor
    assert set(results["methods"]) == {"qckpt-local", "qckpt-s3", "torch.save+upload"}
    s3_bytes, local_bytes = (results["methods"][m]["bytes"] for m in ("qckpt-s3", "qckpt-local"))
    assert abs(s3_bytes - local_bytes) <= 0.01 * local_bytes  # same data; records differ only in timestamps
