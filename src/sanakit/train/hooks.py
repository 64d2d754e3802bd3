"""What happens around an optimizer step: metrics, validation grids, checkpoints, stopping.

Each hook is called by name from the loop (no callback registry): ``Metrics.record`` after every
step, ``Validation.maybe_run``, ``StopPolicy.check``, and ``Checkpointer.save`` when due. Only
the main process writes files; collectives (loss reduce, stop agreement, FSDP gathers) run on
every rank at the same steps.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from tqdm import tqdm

from sanakit.config import Config
from sanakit.errors import SanakitError
from sanakit.flow import loss_by_sigma_bin
from sanakit.io import checkpoint as ckpt
from sanakit.io.atomic import atomic_write_text
from sanakit.io.shards import SHARD_DIR, missing_shard_files
from sanakit.sampling import sample_latents, to_uint8_grid
from sanakit.train import parallel, sharded
from sanakit.train.components import autocast_dtype, estimate_checkpoint_bytes
from sanakit.train.state import TrainState
from sanakit.train.step import StepOutcome
from sanakit.train.timers import Timers

log = logging.getLogger("sanakit")


class TrainingDiverged(SanakitError):
    """The loss or the weights stopped being finite: stop without saving the poisoned state."""


class MetricsFile:
    """``metrics.jsonl``: one row per optimizer step with the exact loss (for resume checks).

    On resume, rows past the checkpoint's step (written by the killed run) are dropped so the
    file always reads like one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int, reduce=None) -> None:
        self.path, self.enabled = path, enabled
        self.reduce = reduce  # mean over ranks: the logged loss is the global batch's
        if enabled and path.exists():
            kept = []
            for row in (r for r in path.read_text().splitlines() if r.strip()):
                try:
                    if json.loads(row)["step"] <= keep_until:
                        kept.append(row)
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line from a kill
            atomic_write_text(path, "".join(k + "\n" for k in kept))

    def append(
        self, step: int, window: list[torch.Tensor], extras: dict[int, dict] | None = None
    ) -> list[float]:
        """Write the window's losses (steps ``step-len+1 .. step``); the one host sync.

        ``extras`` adds fields to some steps' rows (the held-out losses of an evaluation step):
        every row keeps ``step`` and ``loss``, so readers of the loss curve are unaffected.
        """
        if not window:
            return []
        stacked = torch.stack(window).float()
        if self.reduce is not None:
            stacked = self.reduce(stacked)  # every rank flushes at the same steps
        losses = stacked.cpu().tolist()
        if self.enabled:
            first = step - len(losses) + 1
            with self.path.open("a") as f:
                for i, value in enumerate(losses):
                    row = {"step": first + i, "loss": value, **(extras or {}).get(first + i, {})}
                    f.write(json.dumps(row) + "\n")
        return losses


class Metrics:
    """Every ``log_interval``: exact losses to metrics.jsonl, a log line, tensorboard scalars."""

    def __init__(self, cfg: Config, accelerator: Accelerator, state: TrainState) -> None:
        self.cfg, self.state = cfg, state
        work_dir, is_main = Path(cfg.work_dir), accelerator.is_main_process
        self.is_main = is_main
        world = accelerator.num_processes
        self.file = MetricsFile(
            work_dir / "metrics.jsonl",
            is_main,
            keep_until=state.step,
            reduce=(lambda t: accelerator.reduce(t, reduction="mean")) if world > 1 else None,
        )
        self.writer = make_writer(cfg, work_dir) if is_main else None
        self.timers = Timers()
        self.window: list[torch.Tensor] = []  # per-step losses, flushed at log time
        self.extras: dict[int, dict] = {}  # more fields for some steps' rows (held-out losses)
        self.per_sigma: list[tuple[torch.Tensor, torch.Tensor]] = []  # binned at log time
        self.dropped = self.seen = 0
        # redrawn at most twice a second: at tqdm's default 10 Hz a ~0.1 s step paid a redraw
        self.progress = tqdm(
            total=cfg.train.max_steps,
            initial=state.step,
            disable=not is_main,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def record(self, outcome: StepOutcome, extra: dict | None = None) -> None:
        self.window.append(outcome.loss)
        if extra:
            self.extras[self.state.step] = extra
        self.per_sigma.extend(outcome.per_sigma)
        self.dropped, self.seen = self.dropped + outcome.dropped, self.seen + outcome.seen
        self.progress.update(1)
        step = self.state.step
        if step % self.cfg.train.log_interval == 0 or step == self.cfg.train.max_steps:
            self._log(self.flush(), outcome.grad_norm)

    def flush(self) -> list[float]:
        """Write pending losses; stop the run if one is not finite (nothing poisoned is saved)."""
        losses = self.file.append(self.state.step, self.window, self.extras)
        self.window, self.extras = [], {}
        bad = next((v for v in losses if not math.isfinite(v)), None)
        if bad is not None:
            first = self.state.step - len(losses) + 1 + losses.index(bad)
            raise TrainingDiverged(
                f"the loss became {bad} at step {first}: training stopped without saving; the "
                f"last good checkpoint stays in {Path(self.cfg.work_dir) / 'checkpoints'} "
                "(lower --train.lr or check the data, then re-run to resume from it)"
            )
        return losses

    def _log(self, losses: list[float], grad_norm: torch.Tensor) -> None:
        if not losses:
            return
        state, split = self.state, self.timers.pop()
        lr = state.lr_scheduler.get_last_lr()[0]
        dropout = float(self.dropped) / max(1, self.seen)
        self.progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}")
        if self.writer is not None:
            log_scalars(self.writer, state.step, losses, grad_norm, lr, dropout, split)
            log_loss_by_sigma(self.writer, state.step, self.per_sigma)
        self.per_sigma.clear()
        log.info(
            "step %d/%d loss %.4f grad_norm %.3f lr %.2e dropout %.3f | time data %.2fs "
            "text %.2fs autoencoder %.2fs model %.2fs",
            state.step, self.cfg.train.max_steps, losses[-1], float(grad_norm), lr, dropout,
            split.get("data", 0), split.get("text", 0), split.get("autoencoder", 0),
            split.get("model", 0),
        )  # fmt: skip

    def end_epoch(self, epoch: int, unreadable: int, skipped_at_index: int) -> None:
        if unreadable and self.is_main:
            log.warning("epoch %d: skipped %d unreadable samples", epoch, unreadable)
        if self.writer is not None:
            self.writer.add_scalar("data/skipped_samples", unreadable + skipped_at_index, epoch)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


def make_writer(cfg: Config, work_dir: Path) -> Any:
    if cfg.report_to != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional: only with report_to

    return SummaryWriter(str(work_dir / "logs"))


def log_scalars(writer, step, losses, grad_norm, lr, dropout_rate, split) -> None:
    writer.add_scalar("train/loss", sum(losses) / len(losses), step)
    writer.add_scalar("train/grad_norm", float(grad_norm), step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/caption_dropout_rate", dropout_rate, step)
    for name, seconds in split.items():
        writer.add_scalar(f"time/{name}", seconds, step)


def log_loss_by_sigma(writer, step: int, per_sigma: list) -> None:
    if not per_sigma:
        return
    losses = torch.cat([p for p, _ in per_sigma])
    sigmas = torch.cat([s for _, s in per_sigma])
    for b, value in sorted(loss_by_sigma_bin(losses, sigmas).items()):
        writer.add_scalar(f"loss_by_sigma/bin{b}", value, step)


class Validation:
    """CFG samples of the validation prompts from fixed noise: a grid PNG and a TB image.

    Uses its own generator, so turning it on or off never changes training. A sharded model's
    forward needs every rank; only the main process writes.
    """

    def __init__(
        self, cfg: Config, accelerator: Accelerator, parts: Any, sharded: bool, writer: Any
    ) -> None:
        self.cfg, self.parts, self.writer = cfg, parts, writer
        self.write = accelerator.is_main_process
        self.enabled = bool(
            (self.write or sharded) and cfg.train.visualize and cfg.train.validation_prompts
        )
        self.amp = autocast_dtype(cfg, accelerator.device)

    def maybe_run(self, state: TrainState) -> None:
        every = self.cfg.train.eval_sampling_steps
        if self.enabled and (state.step == 1 or state.step % every == 0):
            self.run(state)

    @torch.no_grad()
    def run(self, state: TrainState) -> None:
        cfg, prompts = self.cfg, list(self.cfg.train.validation_prompts)
        embeds, mask = self.parts.encoders.captions.encode(prompts)
        x_shape = self.parts.latent_shape
        generator = torch.Generator().manual_seed(cfg.seed + 12345)
        was_training = state.model.training
        state.model.eval()
        latents = sample_latents(
            state.model,
            embeds,
            mask,
            state.null.embeds,
            state.null.mask,
            x_shape,
            steps=cfg.train.sampling_steps,
            cfg_scale=cfg.train.cfg_scale,
            sampler=cfg.train.sampler,
            flow_shift=cfg.scheduler.flow_shift,
            noise=torch.randn((len(prompts), *x_shape), generator=generator),
            autocast_dtype=self.amp,
        )
        state.model.train(was_training)
        if not self.write:
            return
        grid = to_uint8_grid(self.parts.autoencoder.decode(latents), nrow=len(prompts))
        out = Path(cfg.work_dir) / "vis" / f"step_{state.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.numpy()).save(out)
        if self.writer is not None:
            self.writer.add_image("validation", grid.permute(2, 0, 1), state.step)


class Checkpointer:
    """Every ``save_model_steps``, at the end and on a stop: one crash-safe checkpoint."""

    def __init__(self, cfg: Config, accelerator: Accelerator, last_saved: int) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.directory = Path(cfg.work_dir) / "checkpoints"
        self.last_saved = last_saved  # -1 when nothing of this run is on disk yet

    def due(self, step: int, ending: bool) -> bool:
        return step % self.cfg.train.save_model_steps == 0 or ending

    def save(self, state: TrainState) -> bool:
        """Write (main process), then rotate. False when skipped for lack of space."""
        ranks = gather_object([state.per_rank_state()])
        if self.cfg.train.checkpoint_format == "sharded":
            check_finite_weights(self.accelerator, state, self.directory)
            saved = self._save_sharded(state, ranks)
        else:
            full = state.full_state()  # FSDP: every rank takes part in gathering full tensors
            check_finite_weights(self.accelerator, state, self.directory)
            saved = True
            if self.accelerator.is_main_process:
                saved = self._write(state, lambda d: state.write(d, ranks, full))
        self.accelerator.wait_for_everyone()
        if saved:
            self.last_saved = state.step
        return saved

    def _save_sharded(self, state: TrainState, ranks: list) -> bool:
        """Every rank writes its slices into rank 0's temp dir; rank 0 then seals it (manifest
        last, every rank's files included) and renames it into place."""
        parts = (state.model, state.ema, state.optimizer)
        if not self.accelerator.is_main_process:
            tmp = sharded.share_temp_dir(self.directory, None)  # None: rank 0 skipped the save
            if tmp is not None:
                sharded.save_shards(*parts, tmp)
            return tmp is not None
        shared = False

        def fill(tmp: Path) -> None:
            nonlocal shared
            state.write_side_files(tmp, ranks, "sharded")
            (tmp / SHARD_DIR).mkdir()
            sharded.share_temp_dir(self.directory, tmp)
            shared = True
            sharded.write_groups(tmp, sharded.save_shards(*parts, tmp))
            sharded.refuse_invisible_shards(tmp, missing_shard_files(tmp / SHARD_DIR))

        try:
            return self._write(state, fill)
        finally:
            if not shared:  # the other ranks wait for a temp dir: tell them there is none
                sharded.share_temp_dir(self.directory, None)

    def _write(self, state: TrainState, write_files: Callable[[Path], None]) -> bool:
        needed = estimate_checkpoint_bytes(state.model)
        room, free = ckpt.has_room(self.directory, needed)
        if not room:
            log.warning(
                "NOT SAVING step %d: %s has %.1f MB free, a checkpoint needs about %.1f MB; "
                "training continues and the save is retried at the next interval",
                state.step, self.directory, free / 1e6, needed / 1e6,
            )  # fmt: skip
            return False
        path = ckpt.write_checkpoint(self.directory, state.step, write_files)
        limit = self.cfg.train.checkpoints_total_limit
        removed = ckpt.rotate(self.directory, limit, protect=path)
        log.info("saved checkpoint %s%s", path, f" (rotated out {len(removed)})" if removed else "")
        return True

    def newest(self) -> Path | None:
        found = ckpt.list_checkpoints(self.directory)
        return found[-1] if found else None


def check_finite_weights(accelerator: Accelerator, state: TrainState, directory: Path) -> None:
    """A checkpoint of NaN/Inf weights would poison every resume: refuse it on all ranks."""
    bad = torch.zeros((), device=accelerator.device)
    for p in state.model.parameters():
        bad += (~torch.isfinite(parallel.local(p.detach()))).any()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        raise TrainingDiverged(
            f"the weights are no longer finite at step {state.step}: not saving them; the last "
            f"good checkpoint stays in {directory} (lower "
            "--train.lr, then re-run to resume from it)"
        )


class StopPolicy:
    """SIGTERM/SIGINT or the wall-clock budget: every rank stops after the same step."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.accelerator, self.hours = accelerator, cfg.train.early_stop_hours
        self.started = time.monotonic()
        self.reason = ""
        self.now = False  # agreed by all ranks
        self.previous: dict = {}
        self.group = host_group() if accelerator.num_processes > 1 else None

    def __enter__(self) -> StopPolicy:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def check(self) -> bool:
        """One tiny collective per step: stop if any rank was asked to."""
        if self.hours and not self.reason:
            if time.monotonic() - self.started > self.hours * 3600:
                self.reason = f"train.early_stop_hours={self.hours}"
        mine = bool(self.reason)
        if self.accelerator.num_processes == 1:
            self.now = mine
        else:  # on the host: reading a GPU tensor back every step would stall the device
            flag = torch.tensor([1 if mine else 0], dtype=torch.int32)
            dist.all_reduce(flag, group=self.group)
            self.now = bool(flag.item() > 0)
        return self.now


def host_group() -> Any:
    """A process group for small host-side agreements: the default one when it is gloo (CPU
    runs), else a gloo group over the same ranks (made once, by every rank, at start-up)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")
