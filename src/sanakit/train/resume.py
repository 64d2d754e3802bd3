"""Which checkpoint a run continues from: the one resolver, for ``train`` and ``doctor`` alike.

``find_resume`` only reads: it lists the checkpoints, verifies them newest first and reports the
choice together with every newer one it had to skip. ``resolve_resume`` is the trainer's entry:
it first performs the one write a resume may need (renaming back the old copy of a re-save that
was killed between its two renames), then asks ``find_resume`` and reports the skipped ones once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sanakit.config import Config
from sanakit.errors import CheckpointError
from sanakit.io.checkpoint import (
    candidates,
    interrupted_replacements,
    recover_interrupted,
    verify_checkpoint,
)

log = logging.getLogger("sanakit")

FRESH = ("", "none", "null", None)  # resume_from values that start a fresh run


@dataclass
class Resume:
    """Which checkpoint a run would continue from, found without touching the disk."""

    path: Path | None  # None: the run starts fresh
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer ones that fail to verify
    explicit: bool = False  # resume_from=PATH (else latest or none)
    restores: bool = False  # path is an interrupted re-save's old copy: train renames it back first
    error: str = ""  # why an explicit resume_from does not verify


def checkpoints_dir(cfg: Config) -> Path:
    return Path(cfg.work_dir) / "checkpoints"


def find_resume(cfg: Config, deep: bool = True) -> Resume:
    """The checkpoint a run of ``cfg`` resumes from (read-only; ``deep`` hashes the files)."""
    target = cfg.resume_from
    if target in FRESH:
        return Resume(None)
    if target != "latest":
        path = Path(target)
        reason = verify_checkpoint(path, deep=deep)
        return Resume(None if reason else path, explicit=True, error=reason or "")
    d = checkpoints_dir(cfg)
    found = [(step, path, False) for step, path in candidates(d)]
    # a re-save killed between its two renames leaves ``.step_N.old-*`` and no step_N; train
    # renames it back before choosing, so it is a candidate too
    found += [(step, old, True) for step, old in interrupted_replacements(d)]
    skipped: list[tuple[Path, str]] = []
    for _, path, restores in sorted(found, key=lambda c: c[0], reverse=True):
        reason = verify_checkpoint(path, deep=deep)
        if reason is None:
            return Resume(path, skipped, restores=restores)
        skipped.append((path, reason))
    return Resume(None, skipped)


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start (the trainer's call).

    Recovers an interrupted re-save first (the only write), warns once per skipped checkpoint,
    and refuses an explicit ``resume_from`` that does not verify.
    """
    d = checkpoints_dir(cfg)
    if cfg.resume_from == "latest" and d.is_dir():
        recover_interrupted(d)
    # an old copy recover_interrupted left in place was already warned about there
    warned = {old for _, old in interrupted_replacements(d)} if d.is_dir() else set()
    resume = find_resume(cfg, deep=True)
    if resume.explicit and resume.error:
        raise CheckpointError(
            f"resume_from={Path(cfg.resume_from)} is not a usable checkpoint ({resume.error}); "
            "use resume_from=latest or another checkpoint directory"
        )
    for path, reason in resume.skipped:
        if path not in warned:
            log.warning("skipping checkpoint %s: %s (left on disk)", path, reason)
    return resume.path
