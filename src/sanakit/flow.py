"""Flow matching, the whole objective: sigma sampling, interpolation, velocity target, loss.

x_t = (1 - sigma) * x0 + sigma * noise;  target = noise - x0;  model timestep = sigma * 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_LOSS_BINS = 10  # loss is also reported per sigma decile (minRF-style diagnosis)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Sana/SD3 timestep shift: pushes sigmas towards noise for shift > 1."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch_size: int,
    scheme: str,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Training sigmas in (0, 1): logit-normal(mean, std) or uniform, then shifted."""
    if scheme == "logit_normal":
        u = torch.randn(batch_size, generator=generator) * logit_std + logit_mean
        sigmas = torch.sigmoid(u)
    elif scheme == "uniform":
        sigmas = torch.rand(batch_size, generator=generator)
    else:
        raise ValueError(f"unknown weighting scheme {scheme!r}")
    return shift_sigmas(sigmas, shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def drop_captions(
    embeds: torch.Tensor,
    mask: torch.Tensor,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    prob: float,
    draws: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace a random subset of captions by the null embedding: embeds AND mask together.

    Sana reused the caption's mask for dropped captions (NVlabs/Sana#265); a dropped sample must
    look exactly like the unconditional branch at sampling time, so both are swapped.
    ``draws`` are uniform [0, 1) numbers, one per sample (sample i is dropped if draws[i] < prob).
    """
    drop = draws < prob
    # no `if drop.any()` shortcut: reading a tensor on the host every step would stall a GPU
    d = drop.to(embeds.device, non_blocking=True)
    embeds = torch.where(d[:, None, None], null_embeds.to(embeds), embeds)
    mask = torch.where(d[:, None], null_mask.to(mask), mask)
    return embeds, mask, drop


@dataclass
class FlowLoss:
    loss: torch.Tensor  # scalar, what is back-propagated
    per_sample: torch.Tensor  # [B], detached
    sigmas: torch.Tensor  # [B]


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> FlowLoss:
    """MSE between the model's velocity and noise - x0 at x_t."""
    sigmas = sigmas.to(x0.device, non_blocking=True)  # a blocking copy would sync the stream
    x_t = interpolate(x0, noise, sigmas)
    timestep = sigmas * 1000.0
    # a bf16 text encoder (or its cache) feeding an fp32 model outside autocast: compute in fp32
    embeds = embeds.to(x_t.dtype)
    pred = model(
        x_t, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep
    ).sample
    per_sample = F.mse_loss(pred.float(), velocity_target(x0, noise).float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    return FlowLoss(per_sample.mean(), per_sample.detach(), sigmas)


def loss_by_sigma_bin(per_sample: torch.Tensor, sigmas: torch.Tensor) -> dict[int, float]:
    """Mean loss per sigma decile present in the batch: {bin index: mean loss}."""
    bins = (sigmas.clamp(0, 1 - 1e-6) * NUM_LOSS_BINS).long().cpu()
    values = per_sample.float().cpu()
    return {int(b): float(values[bins == b].mean()) for b in bins.unique()}
