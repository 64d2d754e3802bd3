"""Preflight checks: say what is wrong before compute is spent.

Each check returns a ``Check`` (PASS / WARN / FAIL, a message, and for non-PASS what to do).
``preflight`` runs the cheap subset at the start of ``train`` before any model is loaded and
refuses to start on a FAIL; ``sanakit doctor`` runs them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sanakit.config import Config, null_embed_root
from sanakit.errors import SanakitError
from sanakit.fsutil import check_writable

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status} {self.name}: {self.message}"
        return f"{text} -> {self.fix}" if self.fix and self.status != PASS else text


def check_work_dir(cfg: Config) -> Check:
    reason = _writable_without_trace(Path(cfg.work_dir))
    if reason:
        return Check(
            "work_dir",
            FAIL,
            f"{cfg.work_dir} is not writable ({reason})",
            "choose a writable --work_dir or fix its permissions",
        )
    return Check("work_dir", PASS, f"{cfg.work_dir} is writable")


def check_null_embed_root(cfg: Config) -> Check:
    root = null_embed_root(cfg)
    reason = _writable_without_trace(root)
    if reason:
        return Check(
            "null_embed_root",
            FAIL,
            f"{root} is not writable ({reason})",
            "set --train.null_embed_root to a writable directory",
        )
    return Check("null_embed_root", PASS, f"{root} is writable")


def check_data_roots(cfg: Config) -> Check:
    if cfg.data.type == "shapes":
        return Check("data", PASS, "built-in shapes dataset")
    missing = [d for d in cfg.data.data_dir if not Path(d).is_dir()]
    if missing:
        return Check(
            "data",
            FAIL,
            f"data root {missing[0]} does not exist",
            "fix --data.data_dir to point at existing folders",
        )
    return Check("data", PASS, f"{len(cfg.data.data_dir)} data root(s) exist")


def check_resume_target(cfg: Config) -> Check:
    from sanakit.train import checkpoint as ckpt

    target = cfg.resume_from
    if target in ("", "none", "null"):
        return Check("resume", PASS, "resume disabled: the run starts fresh")
    if target == "latest":
        latest, skipped = ckpt.find_latest(Path(cfg.work_dir) / "checkpoints")
        note = f"; {len(skipped)} newer incomplete/corrupt checkpoint(s) skipped" if skipped else ""
        if latest is None:
            if skipped:
                return Check(
                    "resume",
                    WARN,
                    f"no complete checkpoint{note}; the run starts fresh",
                    f"inspect {skipped[0][0]} ({skipped[0][1]})",
                )
            return Check("resume", PASS, "no checkpoint yet: the run starts fresh")
        status = WARN if skipped else PASS
        fix = f"inspect {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
        return Check("resume", status, f"will resume from {latest}{note}", fix)
    path = Path(target)
    reason = ckpt.verify_checkpoint(path) if path.is_dir() else "no such directory"
    if reason:
        return Check(
            "resume",
            FAIL,
            f"resume_from={path} does not verify ({reason})",
            "use --resume_from=latest or a complete checkpoint directory",
        )
    return Check("resume", PASS, f"will resume from {path} (verified)")


def _writable_without_trace(directory: Path) -> str | None:
    """check_writable, but remove directories it had to create (a check must leave no trace)."""
    created = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    reason = check_writable(directory)
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass
    return reason


CHEAP_CHECKS = (check_work_dir, check_null_embed_root, check_data_roots, check_resume_target)


class PreflightFailed(SanakitError):
    pass


def preflight(cfg: Config) -> list[Check]:
    """The cheap checks; raise on the first FAIL with its line (before any model is loaded)."""
    results = [check(cfg) for check in CHEAP_CHECKS]
    for result in results:
        if result.status == FAIL:
            raise PreflightFailed(result.line())
    return results


def run_doctor(cfg: Config) -> int:
    """Print one line per check; exit code 0 when nothing FAILs, else 1."""
    results = [check(cfg) for check in CHEAP_CHECKS]
    for result in results:
        print(result.line())
    return 1 if any(r.status == FAIL for r in results) else 0
