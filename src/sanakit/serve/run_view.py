"""What the page knows about a run, read from its work dir and nothing else (never written).

State comes from what is on disk: the work dir's lock (held: running; a record left by a job that
died holding it: killed), the last logged step, the newest verified checkpoint and the config's
``max_steps`` / ``num_epochs``.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sanakit.config import Config, from_yaml_text
from sanakit.errors import SanakitError
from sanakit.io.ownership import abandoned_owner, current_owner
from sanakit.serve.checkpoints import CheckpointInfo, CheckpointList
from sanakit.serve.files import PublicFiles
from sanakit.serve.metrics import SCALAR_TAGS, MetricsTail, ScalarLog, Series

MAX_GRIDS = 8  # validation grids on the page, newest first
STALL_SECONDS = 600  # a held lock with no new step for this long is shown as stalled
SNAPSHOT_TTL = 1.0  # seconds one snapshot serves every open page


class RunState(enum.StrEnum):
    RUNNING = "running"
    STALLED = "stalled"
    FINISHED = "finished"
    STOPPED = "stopped"
    CRASHED = "crashed"
    DIVERGED = "diverged"
    NOT_STARTED = "not started"


@dataclass(frozen=True)
class Status:
    state: RunState
    detail: str  # one sentence: why we say so, and what to do
    step: int
    max_steps: int | None
    steps_per_second: float | None
    eta_seconds: float | None


@dataclass(frozen=True)
class Snapshot:
    name: str
    work_dir: Path
    status: Status
    loss_raw: Series
    loss_smoothed: Series
    heldout: dict[str, Series]
    scalars: dict[str, Series]  # learning rate, grad norm, caption-dropout rate (tensorboard)
    grids: list[tuple[int, Path]]  # (step, served copy), newest first
    checkpoints: list[CheckpointInfo]
    config: Config | None = field(repr=False, default=None)


class RunView:
    """Reads one work dir; ``snapshot()`` is shared by every open page for ``SNAPSHOT_TTL``."""

    def __init__(self, work_dir: Path, files: PublicFiles) -> None:
        self.work_dir, self.files = work_dir, files
        self.metrics = MetricsTail(work_dir / "metrics.jsonl")
        self.scalars = ScalarLog(work_dir / "logs")
        self.checkpoints = CheckpointList(work_dir / "checkpoints")
        self._config: tuple[tuple, Config | None] = ((), None)
        self._progress: deque[tuple[float, int]] = deque(maxlen=120)  # (time, step) observed
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot] | None = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > SNAPSHOT_TTL:
                self._cached = (now, self._read())
            return self._cached[1]

    def config(self) -> Config | None:
        """``WORK_DIR/config.yaml`` (rewritten by each start), re-read when it changes."""
        path = self.work_dir / "config.yaml"
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._config[0]:
                text = path.read_text(encoding="utf-8") if st.st_size < 1 << 20 else ""
                self._config = (key, from_yaml_text(text, where=str(path)))
        except (OSError, UnicodeDecodeError, SanakitError):
            self._config = ((), None)
        return self._config[1]

    def _read(self) -> Snapshot:
        self.metrics.read()
        self.scalars.read()
        cfg = self.config()
        checkpoints = self.checkpoints.read()
        step = self.metrics.last_step()
        if not self._progress or self._progress[-1][1] != step:
            self._progress.append((time.monotonic(), step))
        status = self._status(cfg, step, checkpoints)
        heldout = dict(self.metrics.extra)
        for tag in self.scalars.heldout_tags():
            heldout.setdefault(tag, self.scalars.series(tag))
        return Snapshot(
            name=cfg.name if cfg is not None else self.work_dir.name,
            work_dir=self.work_dir,
            status=status,
            loss_raw=self.metrics.loss.raw,
            loss_smoothed=self.metrics.loss.smoothed,
            heldout=heldout,
            scalars={name: self.scalars.series(tag) for name, tag in SCALAR_TAGS.items()},
            grids=self.files.grids(MAX_GRIDS),
            checkpoints=checkpoints,
            config=cfg,
        )

    def _rate(self) -> float | None:
        rate = self.scalars.steps_per_second()
        if rate is None and len(self._progress) >= 2:
            (t0, s0), (t1, s1) = self._progress[0], self._progress[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None
        return rate

    def _status(self, cfg: Config | None, step: int, ckpts: list[CheckpointInfo]) -> Status:
        max_steps = cfg.train.max_steps if cfg is not None else None
        rate = self._rate()
        state, detail = self._state(cfg, step, ckpts)
        eta = None
        if state is RunState.RUNNING and rate and max_steps and max_steps > step:
            eta = (max_steps - step) / rate
        return Status(state, detail, step, max_steps, rate, eta)

    def _state(
        self, cfg: Config | None, step: int, ckpts: list[CheckpointInfo]
    ) -> tuple[RunState, str]:
        owner = current_owner(self.work_dir)
        if owner is not None:
            idle = self._seconds_since_progress()
            if step and idle is not None and idle > STALL_SECONDS:
                return RunState.STALLED, (
                    f"{owner.describe()} holds the work dir but logged no step for "
                    f"{idle / 60:.0f} min: is it hung?"
                )
            return RunState.RUNNING, f"{owner.describe()}"
        newest = next((c for c in ckpts if c.usable), None)
        bad = self.metrics.first_non_finite()
        if bad is not None:
            return RunState.DIVERGED, (
                f"the loss became {bad[1]} at step {bad[0]}; the run stopped without saving it "
                "(lower --train.lr or check the data, then re-run to resume)"
            )
        saved = newest.step if newest else None
        if saved is not None and saved >= step and self._done(cfg, newest):
            return RunState.FINISHED, f"all steps done; newest checkpoint {newest.name}"
        dead = abandoned_owner(self.work_dir)
        resume = f"newest checkpoint {newest.name}" if newest else "no checkpoint yet"
        if dead is not None:
            return RunState.CRASHED, (
                f"{dead.describe()} died holding the work dir (killed or crashed) at step "
                f"{step}; {resume}: re-run the same command to resume"
            )
        if saved is not None and saved >= step:
            return RunState.STOPPED, (
                f"stopped at step {saved} with a checkpoint (a signal or the time budget); "
                "re-run the same command to continue"
            )
        if step == 0 and newest is None:
            return RunState.NOT_STARTED, "no step logged and no checkpoint yet"
        return RunState.CRASHED, (
            f"ended at step {step} without a checkpoint of it (an error or a kill); {resume}"
        )

    @staticmethod
    def _done(cfg: Config | None, newest: CheckpointInfo) -> bool:
        if cfg is None:
            return False
        epochs_done = newest.epoch is not None and newest.epoch >= cfg.train.num_epochs
        return newest.step >= cfg.train.max_steps or epochs_done

    def _seconds_since_progress(self) -> float | None:
        try:
            return time.time() - os.stat(self.work_dir / "metrics.jsonl").st_mtime
        except OSError:
            return None
