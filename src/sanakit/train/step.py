"""One optimizer step: ``gradient_accumulation_steps`` forward/backward passes, then clip, step,
schedule and EMA.

Each micro-batch: images -> latents (cache or autoencoder), captions -> embeddings (cache or text
encoder), dropped captions swapped for the null embedding (embeds AND mask), the flow-matching
loss under autocast, backward without gradient sync until the last micro-batch of the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from sanakit.config import Config
from sanakit.flow import drop_captions, flow_matching_loss
from sanakit.train import parallel
from sanakit.train.batches import MicroBatch
from sanakit.train.components import autocast_dtype
from sanakit.train.state import TrainState
from sanakit.train.timers import Timers


@dataclass
class StepOutcome:
    """What the hooks learn from a finished optimizer step (tensors stay on the device)."""

    loss: torch.Tensor  # mean loss of the step's micro-batches
    grad_norm: torch.Tensor
    per_sigma: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    dropped: torch.Tensor | int = 0  # captions swapped for the null embedding (host tensor)
    seen: int = 0


class Stepper:
    """Accumulates micro-batches into optimizer steps on ``state``."""

    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        state: TrainState,
        wrapped: torch.nn.Module,  # DDP wrapper, or the (FSDP-sharded) model itself
        optimizer: torch.optim.Optimizer,  # as prepared by accelerate (or FSDP's own)
        encoders: Any,  # components.Encoders: latents + captions
        timers: Timers,
        keep_per_sigma: bool,
    ) -> None:
        self.cfg, self.accelerator, self.state, self.wrapped = cfg, accelerator, state, wrapped
        self.optimizer = parallel.stepping_optimizer(accelerator, optimizer)
        # listed once: clipping and the EMA go over these every step
        self.trainable = [p for p in state.model.parameters() if p.requires_grad]
        self.encoders, self.timers, self.keep_per_sigma = encoders, timers, keep_per_sigma
        self.accum = cfg.train.gradient_accumulation_steps
        self.amp = autocast_dtype(cfg, accelerator.device)
        self.pending = self._fresh()
        self.micro = 0

    def _fresh(self) -> StepOutcome:
        return StepOutcome(torch.zeros((), device=self.accelerator.device), torch.zeros(()))

    def add(self, micro: MicroBatch) -> StepOutcome | None:
        """Forward/backward one micro-batch; returns the outcome when it completed a step."""
        state, pending = self.state, self.pending
        x0 = self.encoders.latents.encode(micro.pixels)  # per image: cached or encoded alone
        self.timers.lap("autoencoder")
        embeds, mask = self.encoders.captions.encode(micro.captions, micro.found_text)
        self.timers.lap("text")
        embeds, mask, dropped = drop_captions(
            embeds,
            mask,
            state.null.embeds,
            state.null.mask,
            self.cfg.model.class_dropout_prob,
            draws=micro.drop_draws,
        )
        pending.dropped += dropped.sum()  # read on the host at log time only
        pending.seen += len(dropped)
        last = self.micro == self.accum - 1
        # between optimizer steps, skip the gradient all-reduce/reduce-scatter (DDP/FSDP)
        sync = contextlib.nullcontext() if last else parallel.no_gradient_sync(
            self.accelerator, self.wrapped
        )  # fmt: skip
        scale = micro.weight / self.accum
        with sync:
            with torch.autocast(self.accelerator.device.type, self.amp, self.amp != torch.float32):
                out = flow_matching_loss(self.wrapped, x0, embeds, mask, micro.sigmas, micro.noise)
            self.accelerator.backward(out.loss * scale)
        pending.loss += out.loss.detach() * scale
        if self.keep_per_sigma:
            pending.per_sigma.append((out.per_sample, micro.sigmas))
        self.micro += 1
        outcome = self._optimizer_step() if last else None
        self.timers.lap("model")
        return outcome

    def _optimizer_step(self) -> StepOutcome:
        state = self.state
        clip = self.cfg.train.gradient_clip
        self.pending.grad_norm = parallel.clip_grad_norm(
            self.accelerator, self.wrapped, clip, self.trainable
        )
        self.optimizer.step()
        state.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.ema.update(self.trainable)
        state.step += 1
        done, self.pending, self.micro = self.pending, self._fresh(), 0
        return done
