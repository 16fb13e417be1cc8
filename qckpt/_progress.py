"""Progress bars on stderr: redrawn in place on a terminal; elsewhere (logs, CI) a line per
quarter, once the work has taken a second."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """``with Progress(total, "training") as bar: bar.update(1, loss=...)``. Not thread-safe."""

    def __init__(self, total: int, label: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._next_quarter = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def update(self, n: int = 1, **info: object) -> None:
        """Advance by ``n``; ``info`` is shown after the bar (floats with 4 digits)."""
        self.done += n
        if not self.enabled:
            return
        fraction = min(1.0, self.done / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / fraction - elapsed if fraction else 0.0
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        bar = "#" * int(fraction * 30)
        line = f"{self.label} [{bar:<30}] {self.done}/{self.total} {elapsed:5.1f}s eta {eta:4.0f}s {extra}"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif fraction * 4 >= self._next_quarter and elapsed >= 1.0:
            sys.stderr.write(line + "\n")
            self._next_quarter = int(fraction * 4) + 1


def stage_progress(enabled: bool = True) -> Callable[[str, int, int], None]:
    """A ``progress(stage, done, total)`` callback (as taken by ``gc``/``fsck``/export) drawing one bar per stage."""
    bars: dict[str, Progress] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.__exit__()
            bars.clear()
            bars[stage] = Progress(total, stage, enabled=enabled)
        bar = bars[stage]
        bar.total = max(1, total)
        bar.update(done - bar.done)

    return report
