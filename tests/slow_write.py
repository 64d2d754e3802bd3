"""Test-only: slow down every fsync of sanakit's write primitive so a SIGKILL lands mid-write.

Nothing in ``src/`` knows about this; kill tests inject it into their subprocesses:

* ``python tests/slow_write.py SECONDS ARGS...`` runs the sanakit CLI (``sanakit ARGS...``) with
  every file fsync delayed by SECONDS;
* ``import slow_write; slow_write.install(SECONDS)`` does the same inside a ``-c`` script.

Every file that :func:`sanakit.io.atomic.atomic_write` or ``atomic_directory`` commits is fsynced
through ``sanakit.io.atomic.fsync_file`` before its rename, so the pause lands after the data is
written and before it is installed under its final name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def install(seconds: float) -> None:
    """Make every ``sanakit.io.atomic.fsync_file`` call sleep ``seconds`` first."""
    import sanakit.io.atomic as atomic

    if seconds <= 0:
        raise ValueError(f"slow_write: {seconds!r} is not a positive number of seconds")
    real = atomic.fsync_file

    def slow_fsync(path: Path) -> None:
        time.sleep(seconds)
        real(path)

    atomic.fsync_file = slow_fsync


def command(seconds: float, *args: str) -> list[str]:
    """The argv that runs ``sanakit ARGS`` with slowed writes."""
    return [sys.executable, str(HERE / "slow_write.py"), str(seconds), *args]


if __name__ == "__main__":
    install(float(sys.argv[1]))
    from sanakit.cli import main

    sys.argv = ["sanakit", *sys.argv[2:]]
    sys.exit(main())
