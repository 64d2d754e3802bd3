"""Seconds spent per phase of the step since the last log line (Sana-style time split)."""

from __future__ import annotations

import time
from collections import defaultdict


class Timers:
    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def restart(self) -> None:
        """Start timing afresh (time spent in logging, validation and saving is not a phase)."""
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to ``name``."""
        now = time.perf_counter()
        self.spent[name] += now - self.last
        self.last = now

    def pop(self) -> dict[str, float]:
        out, self.spent = dict(self.spent), defaultdict(float)
        return out
