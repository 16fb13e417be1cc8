"""The README's training-loop example runs as written, and resumes bit-exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import qckpt
from bench.compare import differences

README = Path(__file__).parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("## Use it in a training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def _run(code: str, where: Path) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_example_runs_and_resumes_bit_exactly(tmp_path: Path) -> None:
    code = _example()
    assert "range(state.step, 200)" in code
    once, twice = tmp_path / "once", tmp_path / "twice"
    once.mkdir()
    twice.mkdir()
    _run(code, once)
    _run(code.replace("range(state.step, 200)", "range(state.step, 120)"), twice)  # stopped at step 120...
    _run(code, twice)  # ...and run again: it resumes
    with qckpt.Repository.open(once / "ckpts") as a, qckpt.Repository.open(twice / "ckpts") as b:
        assert a.snapshot("main").step == b.snapshot("main").step == 200
        assert [s.step for s in b.log()][:3] == [200, 199, 198] and len(b.log()) == 200
        ta, tb = a.load("main").tree(), b.load("main").tree()
        assert differences(ta["components"], tb["components"]) == []
        assert differences(ta["rng"]["torch"], tb["rng"]["torch"]) == []  # Python's and NumPy's are never seeded here
        assert [s.metrics for s in a.log()] == [s.metrics for s in b.log()]  # every step's loss
