"""A small progress bar on stderr for long commands (calibrate, eval): redrawn in place on a
terminal, a line per quarter otherwise (logs stay short)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, max(1, total)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_quarter = -1

    def update(self, done: int) -> None:
        frac = min(1.0, done / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(
                f"\r{self.label:<14} [{bar:<30}] {frac:4.0%} {done}/{self.total}  {elapsed:5.0f}s  eta {eta:4.0f}s"
            )
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif int(frac * 4) > self._last_quarter:
            self._last_quarter = int(frac * 4)
            print(f"{self.label}: {frac:.0%} ({done}/{self.total}, {elapsed:.0f}s)", file=self.stream, flush=True)
