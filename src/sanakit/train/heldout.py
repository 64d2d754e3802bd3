"""The held-out loss: the flow-matching loss on samples training never sees.

Every ``train.eval_sampling_steps`` the mean loss over the held-out set (``data.val_split`` or
``data.val_dir``, see ``data/split.py``) is computed for the model and for its EMA. Each
held-out sample has its own fixed sigma and noise, drawn from a generator seeded by the run's
seed and the sample's position, so successive values differ only because the weights did, and
a resumed run computes exactly what an uninterrupted one would. The set is cut into fixed
batches (never mixing sizes) whatever the number of processes; rank r evaluates batches
r, r+W, ... and the per-sample losses are summed over ranks into one vector (each entry has one
contributor, so the sum is exact): every rank gets the same mean, equal to one process's.
Uses no training randomness; the weights are the same before and after.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

from sanakit.config import Config
from sanakit.data.dataset import target_size
from sanakit.embeddings.loader import through_caches
from sanakit.flow import flow_matching_loss, sample_sigmas
from sanakit.train.components import Parts, autocast_dtype
from sanakit.train.parallel import local
from sanakit.train.state import TrainState

log = logging.getLogger("sanakit")

# The log line flags a held-out loss that rose this many evaluations in a row. With fixed
# samples, sigmas and noise the value moves only when the weights do; one or two rises are the
# jitter of a model near its best, three in a row (1,500 steps at the default interval) is a
# trend worth a look before more compute is spent.
RISES_TO_WARN = 3
_DRAW_SEED = 424_242  # separates the held-out draws from every other seeded stream
KINDS = ("model", "ema")


def fixed_draws(
    cfg: Config, position: int, latent: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out sample ``position``'s sigma (from the training distribution) and noise."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + _DRAW_SEED + position)
    s = cfg.scheduler
    sigma = sample_sigmas(1, s.weighting_scheme, g, s.logit_mean, s.logit_std, s.flow_shift)
    return sigma, torch.randn(latent, generator=g)


def eval_batches(dataset: Any, batch_size: int, image_size: int) -> list[list[int]]:
    """Fixed batches of held-out positions; a batch never mixes target sizes."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in range(len(dataset)):
        by_size.setdefault(target_size(dataset, i, image_size), []).append(i)
    return [
        positions[k : k + batch_size]
        for size in sorted(by_size)
        for positions in [by_size[size]]
        for k in range(0, len(positions), batch_size)
    ]


@contextlib.contextmanager
def ema_weights(state: TrainState) -> Iterator[None]:
    """The model holds its EMA weights inside the block and exactly its own weights after."""
    params = [p for p in state.model.parameters() if p.requires_grad]
    kept = [local(p.detach()).clone() for p in params]
    with torch.no_grad():
        for p, shadow in zip(params, state.ema.shadow, strict=True):
            local(p.detach()).copy_(local(shadow))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, own in zip(params, kept, strict=True):
                local(p.detach()).copy_(own)


class Trend:
    """Consecutive rises and the best value of each kind of held-out loss; lives in
    ``TrainState.extra["heldout"]`` so a resumed run flags rises like an uninterrupted one."""

    def __init__(self, saved: Any) -> None:
        self.kinds: dict[str, dict[str, float]] = {}
        if isinstance(saved, dict) and all(self._valid(saved.get(k)) for k in KINDS):
            self.kinds = {k: dict(saved[k]) for k in KINDS}
        elif saved is not None:
            log.warning("the checkpoint's held-out loss history is unreadable; starting anew")

    @staticmethod
    def _valid(entry: Any) -> bool:
        keys = ("last", "rises", "best", "best_step")
        return isinstance(entry, dict) and all(
            isinstance(entry.get(k), int | float) and math.isfinite(entry[k]) for k in keys
        )

    def update(self, step: int, values: dict[str, float]) -> None:
        for kind, value in values.items():
            seen = self.kinds.get(kind)
            if seen is None:
                self.kinds[kind] = {"last": value, "rises": 0, "best": value, "best_step": step}
                continue
            seen["rises"] = seen["rises"] + 1 if value > seen["last"] else 0
            seen["last"] = value
            if value < seen["best"]:
                seen["best"], seen["best_step"] = value, step

    def rising(self) -> list[str]:
        """Words for each kind that rose ``RISES_TO_WARN`` or more evaluations in a row."""
        return [
            f"{'EMA' if kind == 'ema' else 'model'} rose {int(seen['rises'])} evaluations in a "
            f"row (lowest {seen['best']:.4f} at step {int(seen['best_step'])})"
            for kind, seen in self.kinds.items()
            if seen["rises"] >= RISES_TO_WARN
        ]

    def state(self) -> dict:
        return {k: dict(v) for k, v in self.kinds.items()}


class HeldOut:
    """Every ``eval_sampling_steps``: the held-out loss of the model and of the EMA."""

    def __init__(
        self, cfg: Config, accelerator: Accelerator, parts: Parts, state: TrainState, writer: Any
    ) -> None:
        self.cfg, self.accelerator, self.writer = cfg, accelerator, writer
        self.dataset = parts.heldout
        self.enabled = self.dataset is not None
        if not self.enabled:
            return
        self.encoders, self.sharded = parts.encoders, parts.sharded
        enc = self.encoders
        # read as training reads: files by their bytes (no decode once cached; a released
        # autoencoder stays released), caption rows looked up alongside
        self.reader, self.collate = through_caches(
            self.dataset, enc.latents, enc.sources, enc.captions
        )
        self.factor: int = parts.autoencoder.downsample_factor
        self.channels: int = parts.latent_shape[0]
        self.batches = eval_batches(self.dataset, cfg.train.train_batch_size, cfg.model.image_size)
        self.amp = autocast_dtype(cfg, accelerator.device)
        self.trend = Trend(state.extra.get("heldout"))

    def maybe_run(self, state: TrainState) -> dict[str, float] | None:
        """The held-out losses when this step is an evaluation step (else None)."""
        if not self.enabled or state.step % self.cfg.train.eval_sampling_steps:
            return None
        return self.run(state)

    @torch.no_grad()
    def run(self, state: TrainState) -> dict[str, float]:
        was_training = state.model.training
        state.model.eval()
        try:
            model_loss = self.mean_loss(state.model)
            with ema_weights(state):
                ema_loss = self.mean_loss(state.model)
        finally:
            state.model.train(was_training)
        self.trend.update(state.step, {"model": model_loss, "ema": ema_loss})
        state.extra["heldout"] = self.trend.state()
        self._report(state.step, model_loss, ema_loss)
        return {"heldout_loss": model_loss, "heldout_loss_ema": ema_loss}

    def mean_loss(self, model: torch.nn.Module) -> float:
        """Mean per-sample loss over the held-out set (unreadable samples left out)."""
        losses, counted = self.local_losses(model)
        if self.accelerator.num_processes > 1:
            losses = self.accelerator.reduce(losses, reduction="sum")
            counted = self.accelerator.reduce(counted, reduction="sum")
        total = counted.sum()
        return float(losses.sum() / total) if total > 0 else math.nan

    def local_losses(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's per-sample losses over the whole held-out set (0 where another rank's)
        and which entries it filled."""
        device, n = self.accelerator.device, len(self.dataset)
        losses = torch.zeros(n, dtype=torch.float64, device=device)
        counted = torch.zeros(n, dtype=torch.float64, device=device)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        for first in range(0, len(self.batches), world):
            k = first + rank
            if k >= len(self.batches) and not self.sharded:
                continue
            # a sharded forward needs every rank: one without a batch repeats batch 0, unused
            positions = self.batches[k] if k < len(self.batches) else self.batches[0]
            kept, per_sample = self._losses(model, positions)
            if k < len(self.batches) and kept:
                losses[kept] = per_sample.to(device, torch.float64)
                counted[kept] = 1.0
        if self.sharded:  # FSDP leaves the root's weights gathered after a forward: re-shard,
            model.reshard()  # so the EMA swap sees (and the next gather reads) the shards
        return losses, counted

    def _batch(self, positions: list[int]) -> Any:
        fetch = getattr(self.reader, "__getitems__", None)
        return self.collate(fetch(positions) if fetch else [self.reader[i] for i in positions])

    def _losses(self, model: torch.nn.Module, positions: list[int]) -> tuple[list[int], Any]:
        batch = self._batch(positions)
        h, w = target_size(self.dataset, positions[0], self.cfg.model.image_size)  # one size
        if batch is None:  # nothing readable: a blank stand-in keeps a sharded forward in step
            batch = {"pixels": torch.zeros(1, 3, h, w), "captions": [""], "kept": []}
            kept = []
        else:
            kept = [positions[i] for i in batch["kept"]]
        latent = (self.channels, h // self.factor, w // self.factor)
        draws = [fixed_draws(self.cfg, p, latent) for p in kept or positions[:1]]
        sigmas = torch.cat([sigma for sigma, _ in draws])
        noise = torch.stack([eps for _, eps in draws]).to(self.accelerator.device)
        x0 = self.encoders.latents.encode(batch["pixels"])
        embeds, mask = self.encoders.captions.encode(batch["captions"], batch.get("found_text"))
        device_type = self.accelerator.device.type
        with torch.autocast(device_type, self.amp, self.amp != torch.float32):
            out = flow_matching_loss(model, x0, embeds, mask, sigmas, noise)
        return kept, out.per_sample

    def _report(self, step: int, model_loss: float, ema_loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("heldout/loss", model_loss, step)
            self.writer.add_scalar("heldout/loss_ema", ema_loss, step)
        if not self.accelerator.is_main_process:
            return
        rising = self.trend.rising()
        line = (
            f"held-out loss {model_loss:.4f} (EMA {ema_loss:.4f}) at step {step} over "
            f"{len(self.dataset)} samples"
        )
        if rising:
            log.warning("%s; %s: it may be overfitting", line, "; ".join(rising))
        else:
            log.info("%s", line)
