"""Whether a directory holds a run: checked before anything heavy is imported, so a wrong
WORK_DIR is one line in a fraction of a second."""

from __future__ import annotations

import os
from pathlib import Path

from sanakit.errors import SanakitError
from sanakit.io.ownership import LOCK_NAME

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", LOCK_NAME)


class NotARun(SanakitError):
    """WORK_DIR is missing or holds no sanakit run."""


def check_run_dir(work_dir: Path) -> Path:
    """``work_dir`` made absolute if it holds a run (or one starting); else one clear error."""
    if not work_dir.exists():
        raise NotARun(f"WORK_DIR {work_dir} does not exist; pass the --work_dir of a run")
    if not work_dir.is_dir():
        raise NotARun(f"WORK_DIR {work_dir} is a file; pass the --work_dir of a run")
    if not any((work_dir / m).exists() for m in RUN_MARKERS):
        raise NotARun(
            f"WORK_DIR {work_dir} is not a sanakit run (it has no {', '.join(RUN_MARKERS)}); "
            "pass the --work_dir that `sanakit train` wrote"
        )
    return Path(os.path.abspath(work_dir))
