"""Write the golden repository of the current format version (run once per format version).

``python -m tests.golden.make_golden v1`` wrote ``tests/golden/v1`` with qckpt's
format version 1 (``v2``: version 2, with delta objects; ``v3``: version 3, with
a lossy-tier branch ``explore`` whose second snapshot is predicted from the
first; ``v4``: version 4, with a warm copy of every branch head; ``v5``: version 5,
the same content);
``tests/qckpt/test_golden.py`` checks that every later qckpt reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qckpt


def golden_state(step: int) -> dict[str, Any]:
    """The deterministic tree committed at ``step`` (the test regenerates it to compare)."""
    g = torch.Generator().manual_seed(step)
    return {
        "weights": torch.randn(300, 7, generator=g),
        "half": torch.randn(50, generator=g).to(torch.bfloat16),
        "ids": torch.arange(100, dtype=torch.int64) * step,
        "mask": torch.rand(33, generator=g) > 0.5,
        "table": np.linspace(0, step, 64, dtype=np.float64),
        "meta": {"step": step, "name": f"s{step}", "ratio": 0.1 * step, "pair": (1, "a")},
    }


LOSSY = qckpt.LossyTier(mantissa_bits=7)  # bfloat16's precision
LOSSY_STEPS = (20, 21)


def lossy_state(step: int) -> dict[str, Any]:
    """The unrounded tree committed with ``LOSSY`` at ``step``: close to each other, so
    the second is stored as a (rounded) prediction from the first."""
    state = golden_state(LOSSY_STEPS[0])
    state["weights"] = state["weights"] * (1 + 1e-3 * (step - LOSSY_STEPS[0]))
    return state


def main(version: str) -> None:
    root = Path(__file__).parent / version
    with qckpt.Repository.init(root, chunk_size=1024) as repo:
        for step in (1, 2, 3):
            repo.commit(golden_state(step), step=step, metrics={"loss": 1.0 / step})
        repo.create_tag("first", "main@1")
        repo.create_branch("side", "main@2")
        repo.commit(golden_state(10), branch="side", step=10)
        if version >= "v3":
            repo.create_branch("explore", "main@3")
            for step in LOSSY_STEPS:
                repo.commit(lossy_state(step), branch="explore", step=step, lossy=LOSSY)


if __name__ == "__main__":
    main(sys.argv[1])
