"""The curves of a run: exact per-step losses from ``metrics.jsonl`` and the scalars the trainer
logs to tensorboard (LR, grad norm, caption-dropout rate). Both are read incrementally and only
read: a page open for days costs one ``stat`` per refresh while the run is idle."""

from __future__ import annotations

import json
import logging
import math
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

log = logging.getLogger("sanakit")

SMOOTHING = 0.9  # tensorboard's default-like EMA weight for the smoothed loss
MAX_POINTS = 800  # points per curve sent to the browser; the rest is sampled evenly
MAX_CHUNK = 64 << 20  # bytes of metrics.jsonl parsed per refresh (a huge file catches up later)
RATE_WINDOW = 50  # logged points over which steps/s is measured
# tensorboard tags the trainer writes (train/hooks.py log_scalars), shown under these names
SCALAR_TAGS = {
    "learning rate": "train/lr",
    "grad norm": "train/grad_norm",
    "caption-dropout rate": "train/caption_dropout_rate",
}
LOSS_TAG = "train/loss"
# a held-out loss, whatever the trainer calls it: a row of its own kind ({"kind": "heldout", ...})
# or a field of a training row whose name says so ({"step": 5, "loss": ..., "val_loss": ...})
HELDOUT_WORDS = ("held", "val")
# event kinds the page never shows: keep one of each, not the whole history, in memory
SIZE_GUIDANCE = {
    "scalars": 4000,
    "images": 1,
    "audio": 1,
    "histograms": 1,
    "compressedHistograms": 1,
    "tensors": 1,
}


@dataclass
class Series:
    """One curve: steps and values in compact arrays (a million steps is 16 MB, not 100)."""

    steps: array = field(default_factory=lambda: array("q"))
    values: array = field(default_factory=lambda: array("d"))

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.steps)

    def last(self) -> tuple[int, float] | None:
        return (self.steps[-1], self.values[-1]) if self.steps else None

    def sampled(self, limit: int = MAX_POINTS) -> list[tuple[int, float]]:
        """At most ``limit`` finite (step, value) pairs, evenly spaced, the last one included."""
        n = len(self.steps)
        if n <= limit:
            picks = range(n)
        else:
            picks = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
        return [(self.steps[i], self.values[i]) for i in picks if math.isfinite(self.values[i])]


@dataclass
class LossCurve:
    """The exact training loss and its smoothed version, extended row by row."""

    raw: Series = field(default_factory=Series)
    smoothed: Series = field(default_factory=Series)
    _ema: float = 0.0
    _count: int = 0

    def add(self, step: int, loss: float) -> None:
        self.raw.add(step, loss)
        if math.isfinite(loss):  # one bad value must not turn the rest of the curve into NaN
            self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * loss
            self._count += 1
            self.smoothed.add(step, self._ema / (1 - SMOOTHING**self._count))


class MetricsTail:
    """``metrics.jsonl`` parsed incrementally: only complete lines appended since the last read.

    A resumed run rewrites the file (atomic rename: a new inode) without the rows of the killed
    run, so a new inode, or a shorter file, means reading it again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reset(None)

    def _reset(self, ident: tuple[int, int] | None) -> None:
        self._ident, self._offset = ident, 0
        self.loss = LossCurve()
        self.extra: dict[str, Series] = {}  # other numeric fields (a held-out loss), by name

    def read(self) -> bool:
        """Take in what was appended; True when something changed."""
        try:
            st = os.stat(self.path)
        except OSError:
            changed = self._ident is not None
            self._reset(None)
            return changed
        ident = (st.st_dev, st.st_ino)
        if ident != self._ident or st.st_size < self._offset:
            self._reset(ident)
        if st.st_size == self._offset:
            return False
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(min(st.st_size - self._offset, MAX_CHUNK))
        except OSError:
            return False
        end = chunk.rfind(b"\n")
        if end < 0:
            return False  # the one line there is still being written
        for line in chunk[:end].splitlines():
            self._add(line)
        self._offset += end + 1
        return True

    def _add(self, line: bytes) -> None:
        try:
            row = json.loads(line)
        except ValueError:
            return  # a torn line from a killed writer
        if not isinstance(row, dict):
            return
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            return
        kind = next((row[k] for k in ("kind", "type", "split") if isinstance(row.get(k), str)), "")
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key == "loss" and not kind:
                self.loss.add(step, float(value))
            elif kind or any(word in key.lower() for word in HELDOUT_WORDS):
                name = f"{kind} {key}".strip()
                self.extra.setdefault(name, Series()).add(step, float(value))

    def last_step(self) -> int:
        last = self.loss.raw.last()
        return last[0] if last else 0

    def first_non_finite(self) -> tuple[int, float] | None:
        """(step, value) of a loss that was not finite: the trainer stops there."""
        last = self.loss.raw.last()
        return last if last and not math.isfinite(last[1]) else None


class ScalarLog:
    """The trainer's tensorboard scalars (``WORK_DIR/logs``), read with tensorboard's own reader.

    Absent when the run used ``report_to=none``: the page then shows the loss only.
    """

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir
        self._acc: EventAccumulator | None = None
        self._warned = False

    def read(self) -> None:
        if not self.logs_dir.is_dir() or self.logs_dir.is_symlink():
            return
        try:
            if self._acc is None:
                self._acc = EventAccumulator(str(self.logs_dir), size_guidance=SIZE_GUIDANCE)
            self._acc.Reload()
        except Exception as err:  # noqa: BLE001 - a torn event file must not stop the page
            if not self._warned:
                log.warning("cannot read tensorboard logs in %s: %s", self.logs_dir, err)
                self._warned = True

    def tags(self) -> list[str]:
        if self._acc is None:
            return []
        return list(self._acc.Tags().get("scalars", []))

    def series(self, tag: str) -> Series:
        out = Series()
        if self._acc is not None and tag in self.tags():
            for event in self._acc.Scalars(tag):
                out.add(int(event.step), float(event.value))
        return out

    def steps_per_second(self) -> float | None:
        """From the wall times of the last logged losses (None with fewer than two)."""
        if self._acc is None or LOSS_TAG not in self.tags():
            return None
        events = self._acc.Scalars(LOSS_TAG)[-RATE_WINDOW:]
        if len(events) < 2:
            return None
        steps = events[-1].step - events[0].step
        seconds = events[-1].wall_time - events[0].wall_time
        return steps / seconds if steps > 0 and seconds > 0 else None

    def heldout_tags(self) -> list[str]:
        """Scalar tags of a held-out / validation loss, whatever the trainer names them."""
        known = {*SCALAR_TAGS.values(), LOSS_TAG}
        return [
            t for t in self.tags() if t not in known and any(w in t.lower() for w in HELDOUT_WORDS)
        ]
