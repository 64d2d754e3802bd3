"""The training story: read it top to bottom.

Build the parts, continue from the newest checkpoint if there is one, then repeat: take this
rank's share of the next global batch (``batches.py``), forward/backward it and, once every
``gradient_accumulation_steps`` micro-batches, step the optimizer (``step.py``); after each
optimizer step log, validate, check for a stop and checkpoint when due (``hooks.py``).
Everything that must survive a restart lives in ``TrainState`` (``state.py``).
"""

from __future__ import annotations

import logging
import logging.handlers
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from sanakit.config import Config, null_embed_root, to_yaml
from sanakit.io.atomic import atomic_write_text
from sanakit.io.ownership import own
from sanakit.io.run_dir import is_fresh_start, prepare_fresh_start
from sanakit.models.text.null_embedding import check_matches_checkpoint
from sanakit.train.batches import EpochBatches
from sanakit.train.components import accelerate_precision, build_models, build_parts
from sanakit.train.heldout import HeldOut
from sanakit.train.hooks import Checkpointer, Metrics, StopPolicy, Validation
from sanakit.train.lora_checks import check_same_adapter
from sanakit.train.nodes import Launch
from sanakit.train.sharded import check_checkpoint_format
from sanakit.train.state import TrainState, read_trainer_state
from sanakit.train.step import Stepper

log = logging.getLogger("sanakit")
BUSY_HINT = "wait for that run to finish or stop it, or use another --work_dir"


@dataclass
class RunResult:
    """Where a call of :func:`train` ended."""

    step: int
    checkpoint: Path | None  # the newest checkpoint on disk afterwards
    resumed_from: Path | None  # the checkpoint this run continued from (None: fresh start)
    stopped_by: str = ""  # a signal or the wall-clock budget; "" when it ran to the end


def train(cfg: Config) -> RunResult:
    """Run (or continue) the job described by ``cfg``.

    The CLI runs ``doctor.preflight`` first, before any model is loaded.
    """
    check_checkpoint_format(cfg)  # before the work dir is touched
    # the job owns its work dir (rank 0 for every rank) before it writes anything into it
    with own(Path(cfg.work_dir), "sanakit train", hint=BUSY_HINT) as owner:
        if owner is not None and is_fresh_start(cfg.resume_from):
            prepare_fresh_start(Path(cfg.work_dir), cfg.train.overwrite_run)
        accelerator = setup_accelerator(cfg)
        log_file = open_log(cfg, accelerator)
        # every rank, on every node: how the nodes see the roots, and one agreed resume point
        launch = Launch.agree(cfg)
        resume_dir = launch.resume_dir
        models = build_models(cfg, accelerator.device)
        # the null embedding is obtained here, whatever the options: never a side effect (Sana #216)
        null = launch.null_embedding(models.text_encoder, null_embed_root(cfg))
        parts = build_parts(cfg, accelerator, models, null, resuming=resume_dir is not None)
        state = parts.state
        if resume_dir is not None:
            continue_from(resume_dir, state, cfg)
        if log_file is not None:  # a start that failed above leaves the work dir as it was
            atomic_write_text(Path(cfg.work_dir) / "config.yaml", to_yaml(cfg))
            log_file.commit()
        # FSDP sharded the model in place; otherwise accelerate wraps it (DDP with >1 process)
        wrapped, optimizer = (
            (state.model, state.optimizer)
            if parts.sharded
            else accelerator.prepare(state.model, state.optimizer)
        )
        state.grad_scaler = accelerator.scaler

        # metrics closes its progress bar and tensorboard writer however the run ends
        with Metrics(cfg, accelerator, state) as metrics, StopPolicy(cfg, accelerator) as stop:
            stepper = Stepper(
                cfg, accelerator, state, wrapped, optimizer, parts.encoders, metrics.timers,
                keep_per_sigma=metrics.writer is not None,
            )  # fmt: skip
            validation = Validation(cfg, accelerator, parts, parts.sharded, metrics.writer)
            heldout = HeldOut(cfg, accelerator, parts, state, metrics.writer)
            checkpointer = Checkpointer(cfg, accelerator, state.step if resume_dir else -1)
            finished = state.step >= cfg.train.max_steps
            while not (finished or stop.now):
                epoch = EpochBatches(cfg, parts, accelerator.device, metrics.timers)
                for micro in epoch:
                    outcome = stepper.add(micro)
                    if outcome is None:  # accumulating gradients over micro-batches
                        continue
                    metrics.record(outcome, heldout.maybe_run(state))  # held-out losses: same row
                    validation.maybe_run(state)
                    stop.check()  # a signal or the wall-clock budget, agreed by every rank
                    finished = state.step >= cfg.train.max_steps
                    if checkpointer.due(state.step, ending=finished or stop.now):
                        metrics.flush()
                        checkpointer.save(state)
                    if finished or stop.now:
                        break
                else:  # the epoch ran out
                    metrics.end_epoch(state.epoch, epoch.bad, skipped_at_index(parts.dataset))
                    state.sampler.start_next_epoch()
                    finished = state.epoch >= cfg.train.num_epochs
                    if finished and checkpointer.last_saved != state.step:
                        metrics.flush()
                        checkpointer.save(state)
        accelerator.wait_for_everyone()
        stopped_by = (stop.reason or "another rank") if stop.now else ""
        return finish(accelerator, state, checkpointer, resume_dir, stopped_by)


def setup_accelerator(cfg: Config) -> Accelerator:
    # DDP warns once per rank about the depthwise conv's gradient strides; it is harmless
    warnings.filterwarnings("ignore", message=".*[Gg]rad strides do not match bucket view")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # an accelerate FSDP launch config is honoured by train/parallel.py (our own FSDP2 sharding,
    # on GPUs and CPUs alike); accelerate itself never wraps the model in FSDP here
    return Accelerator(
        mixed_precision=accelerate_precision(cfg, device_type),
        cpu=device_type == "cpu",
        # we accumulate by hand so checkpoints always fall on optimizer-step boundaries
        gradient_accumulation_steps=1,
    )


class DeferredLog(logging.handlers.MemoryHandler):
    """``train.log`` lines held in memory until the run has started (parts built, checkpoint
    loaded): a run that fails while starting appends nothing to the work dir's log."""

    def __init__(self, path: Path) -> None:
        target = logging.FileHandler(path, delay=True)  # the file is opened at the first write
        target.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        super().__init__(capacity=1 << 20, flushLevel=logging.CRITICAL + 1, target=target)
        self.committed = False

    def shouldFlush(self, record: logging.LogRecord) -> bool:  # noqa: N802 - logging's name
        return self.committed

    def flush(self) -> None:
        if self.committed:
            super().flush()

    def commit(self) -> None:
        self.committed = True
        self.flush()

    def close(self) -> None:
        target = self.target
        super().close()  # flushes only when committed
        if target is not None:
            target.close()


def open_log(cfg: Config, accelerator: Accelerator) -> DeferredLog | None:
    """The main process logs to ``train.log`` (deferred); the others log warnings only."""
    handler = None
    if accelerator.is_main_process:
        Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
        handler = DeferredLog(Path(cfg.work_dir) / "train.log")
        log.addHandler(handler)
    else:
        log.setLevel(logging.WARNING)
    accelerator.wait_for_everyone()
    log.info(
        "device %s, %d process(es), %s, mixed precision %s",
        accelerator.device, accelerator.num_processes, accelerator.distributed_type.value,
        accelerator.mixed_precision,
    )  # fmt: skip
    return handler


def continue_from(resume_dir: Path, state: TrainState, cfg: Config) -> None:
    """Load a verified checkpoint into ``state`` after checking it was made with this encoder."""
    saved = read_trainer_state(resume_dir)
    check_matches_checkpoint(
        state.null, saved.get("null_embed_provenance", {}), cfg.train.allow_encoder_change
    )
    check_same_adapter(resume_dir, saved, state.extra)
    state.load(resume_dir)
    log.info("resumed from %s at step %d (epoch %d)", resume_dir, state.step, state.epoch)


def skipped_at_index(dataset: object) -> int:
    """Samples the dataset left out when it was indexed (missing captions, bad paths...)."""
    return getattr(getattr(dataset, "skips", None), "total", 0)


def finish(
    accelerator: Accelerator,
    state: TrainState,
    checkpointer: Checkpointer,
    resume_dir: Path | None,
    stopped_by: str,
) -> RunResult:
    newest = checkpointer.newest()
    if stopped_by and accelerator.is_main_process:
        print(f"stopped by {stopped_by} at step {state.step}; checkpoint: {newest}", flush=True)
    elif accelerator.is_main_process:
        log.info("training done at step %d; checkpoint %s", state.step, newest)
    return RunResult(state.step, newest, resume_dir, stopped_by)
