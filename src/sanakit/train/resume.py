"""Which checkpoint a run continues from (placeholder until the one resolver lands)."""

from __future__ import annotations

import logging
from pathlib import Path

from sanakit.config import Config
from sanakit.errors import CheckpointError
from sanakit.io import checkpoint as ckpt

log = logging.getLogger("sanakit")


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start."""
    target = cfg.resume_from
    if target in ("", "none", "null", None):
        return None
    if target == "latest":
        checkpoints = Path(cfg.work_dir) / "checkpoints"
        if checkpoints.is_dir():
            ckpt.recover_interrupted(checkpoints)
        latest, skipped = ckpt.find_latest(checkpoints)
        for path, reason in skipped:
            log.warning("skipping checkpoint %s: %s (left on disk)", path, reason)
        return latest
    path = Path(target)
    reason = ckpt.verify_checkpoint(path) if path.is_dir() else "no such directory"
    if reason:
        raise CheckpointError(
            f"resume_from={path} is not a usable checkpoint ({reason}); "
            "use resume_from=latest or another checkpoint directory"
        )
    return path
