"""What a check returns, and the small helpers every group of checks shares.

A check leaves no trace: writability is probed with a file that is removed at once, and
directories created for the probe are removed again.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from sanakit.io.atomic import check_writable


class Status(enum.StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


PASS, WARN, FAIL = Status.PASS, Status.WARN, Status.FAIL


@dataclass
class Check:
    """One printed line: ``STATUS name: message -> what to do`` (the fix only when not PASS)."""

    name: str
    status: Status
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status.value} {self.name}: {self.message}"
        return f"{text} -> {self.fix}" if self.fix and self.status != PASS else text


class Skipped(Exception):
    """A check cannot run because something it needs failed earlier (already reported)."""


def writable_without_trace(directory: Path) -> str | None:
    """check_writable, but remove directories it had to create (a check must leave no trace)."""
    created = []
    probe = Path(directory)
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    if probe.exists() and not probe.is_dir():  # name the file in the way, not a failed mkdir
        return f"{probe} exists but is not a directory"
    reason = check_writable(directory)
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass
    return reason


def env_int(name: str, default: int) -> int | None:
    """A positive integer from the environment; ``default`` when unset, None when invalid."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None
