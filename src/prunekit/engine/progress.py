"""Per-block progress on stderr: one line per block with the time of each phase and an estimate of what is left."""

from __future__ import annotations

import sys
import time

from rich.console import Console


class ProgressReporter:
    def __init__(self, total_blocks: int, enabled: bool = True, label: str = "", start: int = 0):
        self.total = total_blocks
        self.enabled = enabled
        self.label = f"{label} " if label else ""
        self.start = start
        self.console = Console(stderr=True, highlight=False)
        self.started = time.perf_counter()

    def block_done(self, index: int, timings: dict[str, float]) -> None:
        if not self.enabled:
            return
        phases = "  ".join(f"{k} {v:5.2f}s" for k, v in timings.items())
        elapsed = time.perf_counter() - self.started
        done = index + 1 - self.start
        left = elapsed / done * (self.total - index - 1) if done else 0.0
        self.console.print(f"[dim]{self.label}block {index + 1:>3}/{self.total}[/]  {phases}  "
                           f"(elapsed {elapsed:6.1f}s, left ~{left:6.0f}s)")
        sys.stderr.flush()

    def close(self) -> None:
        pass
