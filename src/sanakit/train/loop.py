"""The training story: read it top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch: take this
rank's samples from the resumable sampler, encode images and captions, swap dropped captions for
the null embedding, draw sigmas and noise from the run's generator, predict the velocity, back-
propagate. Then clip, step, update the EMA, and every so often log, validate and checkpoint.
Everything that must survive a restart lives in ``TrainState``.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from sanakit.config import Config, null_embed_root, to_yaml
from sanakit.data.sampler import ResumableSampler
from sanakit.embeddings.caches import LatentCache, TextEmbeddingCache
from sanakit.embeddings.captions import CaptionEncoder
from sanakit.errors import CheckpointError, SanakitError
from sanakit.flow import drop_captions, flow_matching_loss, loss_by_sigma_bin, sample_sigmas
from sanakit.io import checkpoint as ckpt
from sanakit.io.atomic import atomic_write_text
from sanakit.io.ownership import own
from sanakit.io.run_dir import is_fresh_start, prepare_fresh_start
from sanakit.models.text.null_embedding import check_matches_checkpoint, obtain_null_embedding
from sanakit.models.transformer import load_weights
from sanakit.sampling import sample_latents, to_uint8_grid
from sanakit.train import parallel
from sanakit.train.components import (
    accelerate_precision,
    autocast_dtype,
    build_dataset,
    build_lr_scheduler,
    build_models,
    build_optimizer,
    estimate_checkpoint_bytes,
    latent_shape,
    set_epoch,
    target_size,
)
from sanakit.train.state import EMA, TrainState, read_trainer_state

log = logging.getLogger("sanakit")


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT or the wall-clock budget; the loop stops after the current step."""

    reason: str = ""
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.reason = signal.Signals(signum).name


@dataclass
class Timers:
    """Seconds spent per phase since the last log line (Sana-style time split)."""

    spent: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.spent[name] += now - since
        return now

    def pop(self) -> dict[str, float]:
        out, self.spent = dict(self.spent), defaultdict(float)
        return out


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


def setup_logging(work_dir: Path, is_main: bool) -> None:
    if not is_main:
        log.setLevel(logging.WARNING)
        return
    handler = logging.FileHandler(work_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


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


def train(cfg: Config, preflight_done: bool = False) -> Path:
    """Run (or continue) the training job described by ``cfg``; returns the last checkpoint.

    ``preflight_done``: the caller (the CLI) already ran ``doctor.preflight`` on this config.
    """
    from sanakit.doctor import preflight

    if not preflight_done:
        preflight(cfg)  # cheap checks before any model is loaded; raises on a FAIL
    # the job owns its work dir (rank 0 for every rank) before it writes anything into it
    with own(Path(cfg.work_dir), "sanakit train", hint=BUSY_HINT) as owner:
        if owner is not None and is_fresh_start(cfg.resume_from):
            prepare_fresh_start(Path(cfg.work_dir), cfg.train.overwrite_run)
        return run_training(cfg)


BUSY_HINT = "wait for that run to finish or stop it, or use another --work_dir"


def run_training(cfg: Config) -> Path:
    """The training job itself, in a work dir this job owns."""
    work_dir = Path(cfg.work_dir)
    accelerator = setup_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    if is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / "config.yaml", to_yaml(cfg))
    accelerator.wait_for_everyone()
    setup_logging(work_dir, is_main)
    log.info(
        "device %s, %d process(es), %s, mixed precision %s",
        device, world, accelerator.distributed_type.value, accelerator.mixed_precision,
    )  # fmt: skip
    resume_dir = resolve_resume(cfg)

    # ---- the parts --------------------------------------------------------------------------
    models = build_models(cfg, device)
    null = obtain_null_embedding(
        models.text_encoder,
        null_embed_root(cfg),
        is_builder=accelerator.is_local_main_process,
        barrier=accelerator.wait_for_everyone,
    )
    captions = CaptionEncoder(
        models.text_encoder, cfg, store=TextEmbeddingCache.from_config(cfg, models.text_encoder)
    )
    latent_cache = LatentCache.from_config(cfg, models.autoencoder)
    factor = models.autoencoder.downsample_factor
    dataset, buckets = build_dataset(cfg, factor)
    sampler = ResumableSampler(
        len(dataset), cfg.train.train_batch_size, cfg.seed, rank, world, groups=buckets
    )
    if sampler.dropped_per_epoch:
        log.info(
            "%d samples per epoch do not fill a batch for every rank", sampler.dropped_per_epoch
        )
    model = models.transformer
    if cfg.load_from and resume_dir is None:
        log.info("loaded weights from %s", load_weights(model, cfg.load_from))
    sharded = parallel.use_fsdp(cfg, world)
    if sharded:  # in place, before the optimizer and the EMA take the (now sharded) parameters
        log.info(parallel.shard_transformer(model, device, world))
    optimizer = build_optimizer(cfg, model)
    lr_scheduler = build_lr_scheduler(cfg, optimizer)
    state = TrainState(
        model=model,
        ema=EMA(model, cfg.train.ema_rate),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        sampler=sampler,
        generator=torch.Generator().manual_seed(cfg.seed),
        null=null,
        config_yaml=to_yaml(cfg),
        rank=rank,
        world_size=world,
    )
    if resume_dir is not None:
        saved = read_trainer_state(resume_dir)
        check_matches_checkpoint(
            null, saved.get("null_embed_provenance", {}), cfg.train.allow_encoder_change
        )
        state.load(resume_dir)
        log.info("resumed from %s at step %d (epoch %d)", resume_dir, state.step, state.epoch)
    metrics = MetricsFile(
        work_dir / "metrics.jsonl",
        is_main,
        keep_until=state.step,
        reduce=(lambda t: accelerator.reduce(t, reduction="mean")) if world > 1 else None,
    )
    # FSDP sharded the model in place above; otherwise accelerate wraps it (DDP with >1 process)
    ddp_model, optimizer = (model, optimizer) if sharded else accelerator.prepare(model, optimizer)
    state.grad_scaler = accelerator.scaler
    writer = make_writer(cfg, work_dir) if is_main else None

    # ---- the loop ---------------------------------------------------------------------------
    stop = StopRequest()
    stop.install()
    started = time.monotonic()
    timers = Timers()
    accum = cfg.train.gradient_accumulation_steps
    amp = autocast_dtype(cfg, device)
    x_shape = latent_shape(cfg, models.autoencoder)
    window: list[torch.Tensor] = []  # per-step losses, flushed at log time (no per-step sync)
    dropped_total = seen_total = 0
    bad_samples = 0
    last_saved = state.step if resume_dir is not None else -1
    progress = tqdm(
        total=cfg.train.max_steps, initial=state.step, disable=not is_main, dynamic_ncols=True
    )
    micro = 0
    step_loss = torch.zeros((), device=device)
    per_sigma: list[tuple[torch.Tensor, torch.Tensor]] = []  # binned at log time (no sync)
    finished = state.step >= cfg.train.max_steps
    while not finished:
        set_epoch(dataset, sampler.epoch)  # random flips are seeded by (seed, epoch, index)
        batches = iter(make_loader(dataset, sampler, cfg))
        tick = time.perf_counter()
        for batch in batches:
            # one micro-batch: every rank draws the global batch's randomness, keeps its share,
            # so N ranks see exactly the (sample, sigma, noise, dropout) a single process would
            global_size = batch["global_size"]
            sigmas = sample_sigmas(
                global_size,
                cfg.scheduler.weighting_scheme,
                state.generator,
                cfg.scheduler.logit_mean,
                cfg.scheduler.logit_std,
                cfg.scheduler.flow_shift,
            )
            h, w = batch["size"]  # the global batch's (bucket) size: same on every rank
            noise_shape = (global_size, x_shape[0], h // factor, w // factor)
            noise = torch.randn(noise_shape, generator=state.generator)
            drop_draw = torch.rand(global_size, generator=state.generator)
            mine = batch["positions"]  # this rank's surviving positions in the global batch
            sigmas, noise, drop_draw = sigmas[mine], noise[mine].to(device), drop_draw[mine]
            sampler.advance()
            bad_samples += batch["num_bad"]
            weight = 1.0
            if batch["pixels"] is None:  # every sample of this rank's share was unreadable
                if world == 1:
                    continue
                # the other ranks all-reduce this micro-batch's gradients: take part with a
                # zero-weight blank stand-in, or they would wait for this rank forever
                batch = {"pixels": torch.zeros(1, 3, h, w), "captions": [""]}
                sigmas, drop_draw = torch.full((1,), 0.5), torch.ones(1)
                noise = torch.zeros(1, *noise_shape[1:], device=device)
                weight = 0.0
            tick = timers.add("data", tick)

            x0 = latent_cache.encode(batch["pixels"])  # per image: cached or encoded alone
            tick = timers.add("autoencoder", tick)
            embeds, mask = captions.encode(batch["captions"])
            tick = timers.add("text", tick)
            embeds, mask, dropped = drop_captions(
                embeds,
                mask,
                state.null.embeds,
                state.null.mask,
                cfg.model.class_dropout_prob,
                draws=drop_draw,
            )
            dropped_total += int(dropped.sum())
            seen_total += len(dropped)

            is_last_micro = micro == accum - 1
            # between optimizer steps, skip the gradient all-reduce/reduce-scatter (DDP/FSDP)
            sync = (
                parallel.no_gradient_sync(accelerator, ddp_model)
                if not is_last_micro
                else _null_context()
            )
            with sync:
                with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                    out = flow_matching_loss(ddp_model, x0, embeds, mask, sigmas, noise)
                accelerator.backward(out.loss * (weight / accum))
            step_loss += out.loss.detach() * (weight / accum)
            if writer is not None:
                per_sigma.append((out.per_sample, sigmas))
            micro += 1
            if not is_last_micro:
                tick = timers.add("model", tick)
                continue

            # ---- the optimizer step ----
            grad_norm = parallel.clip_grad_norm(accelerator, ddp_model, cfg.train.gradient_clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.ema.update(model)
            state.step += 1
            micro = 0
            window.append(step_loss)
            step_loss = torch.zeros((), device=device)
            tick = timers.add("model", tick)
            progress.update(1)

            if state.step % cfg.train.log_interval == 0 or state.step == cfg.train.max_steps:
                losses = metrics.flush(state.step, window)
                window = []
                split = timers.pop()
                progress.set_postfix(
                    loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}"
                )
                if writer is not None:
                    log_scalars(
                        writer,
                        state,
                        losses,
                        grad_norm,
                        split,
                        per_sigma,
                        dropped_total / max(1, seen_total),
                    )
                log.info(
                    "step %d/%d loss %.4f grad_norm %.3f lr %.2e dropout %.3f | time data %.2fs "
                    "text %.2fs autoencoder %.2fs model %.2fs",
                    state.step,
                    cfg.train.max_steps,
                    losses[-1],
                    float(grad_norm),
                    lr_scheduler.get_last_lr()[0],
                    dropped_total / max(1, seen_total),
                    split.get("data", 0),
                    split.get("text", 0),
                    split.get("autoencoder", 0),
                    split.get("model", 0),
                )
                per_sigma.clear()
            # a sharded model's forward needs every rank; only the main process writes
            if (is_main or sharded) and cfg.train.visualize and cfg.train.validation_prompts:
                if state.step == 1 or state.step % cfg.train.eval_sampling_steps == 0:
                    visualize(cfg, state, models, captions, writer, x_shape, amp, write=is_main)
            if cfg.train.early_stop_hours and not stop.reason:
                if time.monotonic() - started > cfg.train.early_stop_hours * 3600:
                    stop.reason = f"train.early_stop_hours={cfg.train.early_stop_hours}"
            stop_now = agree_to_stop(accelerator, bool(stop.reason))
            finished = state.step >= cfg.train.max_steps or sampler.epoch >= cfg.train.num_epochs
            if state.step % cfg.train.save_model_steps == 0 or finished or stop_now:
                metrics.flush(state.step, window)
                window = []
                if save(cfg, accelerator, state, window):
                    last_saved = state.step
            if stop_now:
                progress.close()
                stop.uninstall()
                where = ckpt.list_checkpoints(work_dir / "checkpoints")
                if is_main:
                    print(
                        f"stopped by {stop.reason or 'another rank'} at step {state.step}; "
                        f"checkpoint: {where[-1] if where else 'none'}",
                        flush=True,
                    )
                return where[-1] if where else work_dir
            if finished:
                break
            tick = time.perf_counter()
        if finished:
            break
        if bad_samples and is_main:
            log.warning("epoch %d: skipped %d unreadable samples", sampler.epoch, bad_samples)
        if writer is not None:
            skips = getattr(getattr(dataset, "skips", None), "total", 0)
            writer.add_scalar("data/skipped_samples", bad_samples + skips, sampler.epoch)
        bad_samples = 0
        sampler.start_next_epoch()
        finished = sampler.epoch >= cfg.train.num_epochs
        if finished and last_saved != state.step:
            save(cfg, accelerator, state, window)
    progress.close()
    stop.uninstall()
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    latest, _ = ckpt.find_latest(work_dir / "checkpoints")
    if is_main:
        log.info("training done at step %d; checkpoint %s", state.step, latest)
    return latest or work_dir


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def agree_to_stop(accelerator: Accelerator, mine: bool) -> bool:
    """All ranks stop at the same step if any rank was asked to (one tiny collective)."""
    if accelerator.num_processes == 1:
        return mine
    flag = torch.tensor([1.0 if mine else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def collate_samples(items: list[dict | None]) -> dict | None:
    """Stack the readable samples; remember which positions survived (for noise alignment)."""
    kept = [i for i, item in enumerate(items) if item is not None]
    if not kept:
        return None
    return {
        "pixels": torch.stack([items[i]["pixels"] for i in kept]),
        "captions": [items[i]["caption"] for i in kept],
        "kept": kept,
        "num_bad": len(items) - len(kept),
    }


def make_loader(dataset, sampler: ResumableSampler, cfg: Config):
    """Batches for the rest of this epoch, with each rank's positions in the global batch."""
    from torch.utils.data import DataLoader

    class _Batches:
        def __iter__(self):
            for global_indices in sampler.global_batches():
                yield global_indices[sampler.rank :: sampler.world_size]

        def __len__(self) -> int:
            return len(sampler)

    sizes = [
        (len(g), target_size(dataset, g[0], cfg.model.image_size)) for g in sampler.global_batches()
    ]
    loader = DataLoader(
        dataset,
        batch_sampler=_Batches(),
        collate_fn=collate_samples,
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
    )
    for (global_size, size), batch in zip(sizes, loader, strict=True):
        positions = torch.arange(sampler.rank, global_size, sampler.world_size)
        if batch is None:
            yield {
                "global_size": global_size,
                "size": size,
                "positions": positions[:0],
                "pixels": None,
                "num_bad": len(positions),
            }
            continue
        keep = batch.get("kept")
        if keep is not None:
            positions = positions[torch.as_tensor(keep, dtype=torch.long)]
        yield {
            "global_size": global_size,
            "size": size,
            "positions": positions,
            "pixels": batch["pixels"],
            "captions": batch["captions"],
            "num_bad": batch.get("num_bad", 0),
        }


class MetricsFile:
    """``metrics.jsonl``: one row per optimizer step with the exact loss (for resume checks).

    On resume, rows past the checkpoint's step (written by the killed run) are dropped so the
    file always reads like one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int, reduce=None) -> None:
        self.path, self.enabled = path, enabled
        self.reduce = reduce  # mean over ranks: the logged loss is the global batch's
        if enabled and path.exists():
            rows = [r for r in path.read_text().splitlines() if r.strip()]
            kept = []
            for r in rows:
                try:
                    if json.loads(r)["step"] <= keep_until:
                        kept.append(r)
                except (ValueError, KeyError):
                    break  # a torn last line from a kill
            atomic_write_text(path, "".join(k + "\n" for k in kept))

    def flush(self, step: int, window: list[torch.Tensor]) -> list[float]:
        if not window:
            return [float("nan")]
        stacked = torch.stack(window).float()
        if self.reduce is not None:
            stacked = self.reduce(stacked)  # every rank flushes at the same steps
        losses = stacked.cpu().tolist()  # the only host sync per log interval
        if self.enabled:
            first = step - len(losses) + 1
            with self.path.open("a") as f:
                for i, value in enumerate(losses):
                    f.write(json.dumps({"step": first + i, "loss": value}) + "\n")
        return losses


def save(cfg: Config, accelerator: Accelerator, state: TrainState, window: list) -> bool:
    """Write a checkpoint (main process), then rotate. Returns False when skipped for space."""
    checkpoints = Path(cfg.work_dir) / "checkpoints"
    ranks = gather_object([state.per_rank_state()])
    full = state.full_state()  # FSDP: every rank takes part in gathering the full tensors
    saved = True
    if accelerator.is_main_process:
        needed = estimate_checkpoint_bytes(state.model)
        room, free = ckpt.has_room(checkpoints, needed)
        if not room:
            log.warning(
                "NOT SAVING step %d: %s has %.1f MB free, a checkpoint needs about %.1f MB; "
                "training continues and the save is retried at the next interval",
                state.step,
                checkpoints,
                free / 1e6,
                needed / 1e6,
            )
            saved = False
        else:
            path = ckpt.write_checkpoint(
                checkpoints, state.step, lambda d: state.write(d, ranks, full)
            )
            removed = ckpt.rotate(checkpoints, cfg.train.checkpoints_total_limit, protect=path)
            log.info(
                "saved checkpoint %s%s", path, f" (rotated out {len(removed)})" if removed else ""
            )
    accelerator.wait_for_everyone()
    return saved


def make_writer(cfg: Config, work_dir: Path):
    if cfg.report_to != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(work_dir / "logs"))


def log_scalars(writer, state, losses, grad_norm, split, per_sigma, dropout_rate) -> None:
    step = state.step
    writer.add_scalar("train/loss", sum(losses) / len(losses), step)
    writer.add_scalar("train/grad_norm", float(grad_norm), step)
    writer.add_scalar("train/lr", state.lr_scheduler.get_last_lr()[0], step)
    writer.add_scalar("train/caption_dropout_rate", dropout_rate, step)
    for name, seconds in split.items():
        writer.add_scalar(f"time/{name}", seconds, step)
    if per_sigma:
        losses_t = torch.cat([p for p, _ in per_sigma])
        sigmas_t = torch.cat([s for _, s in per_sigma])
        for b, value in sorted(loss_by_sigma_bin(losses_t, sigmas_t).items()):
            writer.add_scalar(f"loss_by_sigma/bin{b}", value, step)


@torch.no_grad()
def visualize(cfg, state, models, captions, writer, x_shape, amp, write: bool = True) -> None:
    """CFG samples of the validation prompts from fixed noise: a grid PNG and a TB image.

    Uses its own generator, so turning it on or off never changes training. ``write=False``
    samples without writing (the non-main ranks of a sharded model).
    """
    from PIL import Image

    prompts = list(cfg.train.validation_prompts)
    embeds, mask = captions.encode(prompts)
    model = state.model
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 12345)
    latents = sample_latents(
        model,
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
        autocast_dtype=amp,
    )
    model.train(was_training)
    if not write:
        return
    images = models.autoencoder.decode(latents)
    grid = to_uint8_grid(images, nrow=len(prompts))
    out = Path(cfg.work_dir) / "vis" / f"step_{state.step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(out)
    if writer is not None:
        writer.add_image("validation", grid.permute(2, 0, 1), state.step)


__all__ = ["train", "SanakitError"]
