"""A minimal progress bar on stderr: redrawn in place on a terminal, a line per quarter otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "training") as bar: bar.update(1, loss=...)``."""

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
        elif fraction * 4 >= self._next_quarter:
            sys.stderr.write(line + "\n")
            self._next_quarter = int(fraction * 4) + 1
