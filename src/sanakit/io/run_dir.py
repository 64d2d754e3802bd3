"""Starting afresh in a work dir that already holds a run: refuse, or move the old run aside.

A fresh start (``resume_from=none``) would write ``step_N`` over the old run's verified
checkpoints and truncate its metrics. It is refused unless the user asks for it with
``train.overwrite_run=true``, and even then nothing is deleted: the old run's files are renamed
into ``WORK_DIR/previous_runs/<UTC time>/``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sanakit.errors import SanakitError
from sanakit.io.atomic import fsync_dir

log = logging.getLogger("sanakit")

FRESH_START = ("", "none", "null")  # resume_from values that start a new run
PREVIOUS_RUNS = "previous_runs"
# what a run writes into its work dir; caches and the null embedding are reusable, so they stay
RUN_FILES = ("checkpoints", "metrics.jsonl", "train.log", "vis", "logs", "config.yaml")


class RunExists(SanakitError):
    """A fresh start was asked for in a work dir that holds checkpoints."""


def is_fresh_start(resume_from: str | None) -> bool:
    return resume_from is None or resume_from in FRESH_START


def existing_checkpoints(work_dir: Path) -> list[str]:
    """Names in ``WORK_DIR/checkpoints`` (any entry: a half-replaced one is still data)."""
    d = Path(work_dir) / "checkpoints"
    try:
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    except OSError:
        return ["(unreadable)"]  # cannot tell it is empty: treat it as holding a run


def _new_previous_dir(work_dir: Path) -> Path:
    base = work_dir / PREVIOUS_RUNS
    base.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1000):
        dest = base / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            dest.mkdir()
        except FileExistsError:
            continue
        return dest
    raise RunExists(f"too many runs moved aside at {stamp} in {base}; move some elsewhere")


def move_run_aside(work_dir: Path) -> Path | None:
    """Rename the run's files into a new ``previous_runs/<time>/``; returns it (None: nothing)."""
    work_dir = Path(work_dir)
    present = [n for n in RUN_FILES if os.path.lexists(work_dir / n)]
    if not present:
        return None
    try:
        dest = _new_previous_dir(work_dir)
        for name in present:
            os.rename(work_dir / name, dest / name)
        fsync_dir(dest)
        fsync_dir(work_dir)
    except OSError as err:
        raise RunExists(
            f"cannot move the previous run in {work_dir} aside ({err.strerror or err}); "
            "move its checkpoints elsewhere by hand, or use another --work_dir"
        ) from None
    log.info("moved the previous run (%s) to %s", ", ".join(present), dest)
    return dest


def prepare_fresh_start(work_dir: Path, overwrite: bool) -> Path | None:
    """Make ``work_dir`` ready for a run from step 0: refuse if it holds checkpoints, unless
    ``overwrite``, which moves the old run aside. Returns where it went (None: nothing moved).
    """
    work_dir = Path(work_dir)
    found = existing_checkpoints(work_dir)
    if overwrite:
        return move_run_aside(work_dir)
    if found:
        raise RunExists(
            f"{work_dir} already holds a run (checkpoints/{found[-1]}) and resume_from=none "
            "would start over on top of it; use --resume_from=latest to continue it, or "
            f"--train.overwrite_run=true to start fresh (the old run is moved to "
            f"{work_dir / PREVIOUS_RUNS}/)"
        )
    return None
