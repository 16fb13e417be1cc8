"""A bounded corruption sweep: every kind of repository file damaged twice (a flipped
byte or a truncation), each followed by restores of every snapshot, fsck, GC and a
restore with a rebuilt index. Run in a subprocess so that a signal would be caught
too. ``python -m bench corruption`` runs the full sweep (300 trials by default)."""

from __future__ import annotations

import subprocess
import sys

from bench.corruption import KINDS


def test_no_damage_goes_unnoticed_or_loses_history() -> None:
    trials = 2 * len(KINDS)
    result = subprocess.run([sys.executable, "-m", "bench", "corruption", "--trials", str(trials), "--seed", "7"],
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert f"{trials} trials over {len(KINDS)} kinds of file" in result.stdout and ": 0 bad outcomes" in result.stdout
