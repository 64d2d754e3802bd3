"""``sanakit train --dry_run``: show, on the real training loop, that save -> reload -> continue
is exact before a long run depends on it.

Three calls of ``sanakit.train.loop.train`` on copies of the user's config, each in a temporary
work dir: a straight 3-step run; a 2-step run (which saves a checkpoint when it finishes); and a
run resumed from that checkpoint for the third step. The per-step losses that ``metrics.jsonl``
holds exactly must be the same in both work dirs: bit-equal on the CPU (GPU kernels are not
bit-deterministic, so there they must agree to 1e-5 relative). The user's work_dir is never
used, and the temporary directory is removed however the dry run ends.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sanakit.config import Config
from sanakit.errors import SanakitError
from sanakit.io import checkpoint as ckpt
from sanakit.train.loop import RunResult, train
from sanakit.units import human_bytes

log = logging.getLogger("sanakit")

STEPS = 3  # the straight run
SPLIT = 2  # steps before the checkpoint; the resumed run does the rest


@dataclass
class DryRunResult:
    straight: list[float]
    resumed: list[float]
    checkpoint: Path  # the checkpoint written after SPLIT steps (inside the removed temp dir)
    checkpoint_bytes: int
    seconds: dict[str, float]
    exact: bool  # bit-equality was required (CPU)

    @property
    def equal(self) -> bool:
        if len(self.straight) != len(self.resumed):
            return False
        if self.exact:
            return self.straight == self.resumed
        return all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
            for a, b in zip(self.straight, self.resumed, strict=True)
        )


def dry_run_configs(cfg: Config, root: Path) -> tuple[Config, Config, Config]:
    """(straight 3 steps, first 2 steps, resume to 3): copies of ``cfg`` that write only in root.

    Only what must differ is changed: work dirs, step counts, save interval, and everything
    that would write outside the temporary dir or cost time without touching the numbers
    (visualisation, tensorboard). Model, data, optimizer, seed, precision and cache mode stay the
    user's.
    """
    base = copy.deepcopy(cfg)
    base.train = replace(
        base.train,
        visualize=False,  # has its own generator: never changes training, costs seconds
        log_interval=1,
        save_model_steps=STEPS,  # the only mid-run save is the SPLIT run's final one
        checkpoints_total_limit=max(2, base.train.checkpoints_total_limit),
        num_epochs=max(base.train.num_epochs, STEPS),  # a tiny dataset still gets 3 steps
        early_stop_hours=0.0,
        null_embed_root="",  # = {temporary work_dir}/pretrained_models: built there
        cache_dir="",  # = {temporary work_dir}/cache: the user's cache is never written
    )
    base = replace(base, report_to="none", debug=False)
    straight = replace(
        base,
        work_dir=str(root / "straight"),
        resume_from="none",
        train=replace(base.train, max_steps=STEPS),
    )
    first = replace(
        base,
        work_dir=str(root / "resumed"),
        resume_from="none",
        train=replace(base.train, max_steps=SPLIT),
    )
    second = replace(first, resume_from="latest", train=replace(base.train, max_steps=STEPS))
    return straight, first, second


def read_losses(work_dir: Path) -> list[float]:
    """Per-step losses from ``metrics.jsonl`` (exact JSON floats), checked to be steps 1..N."""
    path = Path(work_dir) / "metrics.jsonl"
    try:
        rows = [json.loads(r) for r in path.read_text().splitlines() if r.strip()]
    except (OSError, ValueError) as err:
        raise SanakitError(f"dry run: {path} is unreadable ({type(err).__name__})") from None
    steps = [r.get("step") for r in rows]
    if steps != list(range(1, len(rows) + 1)):
        raise SanakitError(f"dry run: {path} has steps {steps}, expected 1..{len(rows)}")
    return [float(r["loss"]) for r in rows]


def _run(cfg: Config, quiet: io.StringIO) -> RunResult:
    """One call of the real loop; stdout (preflight lines) kept aside, log file handlers closed."""
    before = list(log.handlers)
    try:
        with contextlib.redirect_stdout(quiet):
            return train(cfg)
    finally:
        # train() adds a FileHandler for its work_dir; without this, the next run's lines
        # would also land in the previous run's train.log
        for handler in [h for h in log.handlers if h not in before]:
            log.removeHandler(handler)
            handler.close()


def run_dry_run(cfg: Config, root: Path) -> DryRunResult:
    """Run the three trainings under ``root`` and collect their losses (root is not removed)."""
    straight, first, second = dry_run_configs(cfg, root)
    quiet = io.StringIO()
    seconds: dict[str, float] = {}
    try:
        tick = time.perf_counter()
        _run(straight, quiet)
        seconds["straight"] = time.perf_counter() - tick
        tick = time.perf_counter()
        _run(first, quiet)
        seconds["first"] = time.perf_counter() - tick
        saved = Path(first.work_dir) / "checkpoints" / ckpt.step_dir_name(SPLIT)
        reason = ckpt.verify_checkpoint(saved)
        if reason:
            raise SanakitError(
                f"dry run: the {SPLIT}-step run left no usable checkpoint {saved.name} ({reason}); "
                f"see the warnings above (is {root.parent} full? set TMPDIR elsewhere)"
            )
        tick = time.perf_counter()
        third = _run(second, quiet)
        seconds["resume"] = time.perf_counter() - tick
    except BaseException:
        sys.stdout.write(quiet.getvalue())  # the inner runs' lines help explain a failure
        raise
    if third.resumed_from != saved:
        # without this a run that silently started fresh would match the straight run
        raise SanakitError(
            f"dry run: the third run did not resume from {saved} (it started from "
            f"{third.resumed_from or 'scratch'})"
        )
    size = sum(f.stat().st_size for f in saved.iterdir() if f.is_file())
    return DryRunResult(
        straight=read_losses(Path(straight.work_dir)),
        resumed=read_losses(Path(second.work_dir)),
        checkpoint=saved,
        checkpoint_bytes=size,
        seconds=seconds,
        exact=not torch.cuda.is_available(),
    )


def format_report(result: DryRunResult, total: float) -> str:

    device = "cpu" if result.exact else "cuda"
    lines = [
        f"dry run on {device}, real training loop: {STEPS} steps straight vs {SPLIT} steps + "
        f"checkpoint + reload + {STEPS - SPLIT} more",
        f"{'step':>4}  {'straight':<22}  resumed",
    ]
    for i in range(max(len(result.straight), len(result.resumed))):
        a = repr(result.straight[i]) if i < len(result.straight) else "-"
        b = repr(result.resumed[i]) if i < len(result.resumed) else "-"
        mark = "" if a == b else "  <- differs"
        lines.append(f"{i + 1:>4}  {a:<22}  {b:<22}{mark}".rstrip())
    kind = "bit-equal" if result.exact else "equal to 1e-5 (GPU)"
    lines.append(f"losses {kind}: {'yes' if result.equal else 'NO'}")
    lines.append(
        f"checkpoint {result.checkpoint.name}: {human_bytes(result.checkpoint_bytes)}, saved, "
        f"verified and resumed from"
    )
    s = result.seconds
    lines.append(
        f"time {total:.1f} s (straight {s.get('straight', 0):.1f} s, first {SPLIT} steps "
        f"{s.get('first', 0):.1f} s, resume {s.get('resume', 0):.1f} s); temporary files removed"
    )
    return "\n".join(lines)


def dry_run(cfg: Config) -> int:
    """The ``--dry_run`` command: 0 when the resumed losses equal the straight run's, else 1."""
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if world != "1":
        raise SanakitError(
            f"--dry_run runs in a single process (WORLD_SIZE={world}); launch it without "
            "torchrun / accelerate launch"
        )
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="sanakit-dry-run-"))
    try:
        result = run_dry_run(cfg, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(format_report(result, time.perf_counter() - started), flush=True)
    if not result.equal:
        print(
            "error: dry run: the resumed run's losses differ from the straight run's; resuming "
            "this configuration is not exact",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0
