"""Per-block progress on stderr: one line per block with the time of each phase."""

from __future__ import annotations

import sys
import time

from rich.console import Console


class ProgressReporter:
    def __init__(self, total_blocks: int, enabled: bool = True):
        self.total = total_blocks
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False)
        self.started = time.perf_counter()

    def block_done(self, index: int, timings: dict[str, float]) -> None:
        if not self.enabled:
            return
        phases = "  ".join(f"{k} {v:5.2f}s" for k, v in timings.items())
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[dim]block {index + 1:>3}/{self.total}[/]  {phases}  (elapsed {elapsed:6.1f}s)")
        sys.stderr.flush()

    def close(self) -> None:
        pass
