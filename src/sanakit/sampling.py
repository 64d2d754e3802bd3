"""Classifier-free-guidance sampling over diffusers' flow schedulers.

The conditional and unconditional branches run as one batched forward (uncond first, as in
diffusers' SanaPipeline), so the same weights, noise and scheduler give the same images.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from sanakit.errors import ConfigError

# diffusers is imported where it is used: importing it costs ~3 s, and `sanakit sample` checks
# its arguments against SAMPLERS before any of that is needed.

SAMPLERS = ("flow_dpm_solver", "flow_euler")


def make_scheduler(sampler: str, flow_shift: float):
    """A fresh diffusers scheduler for one sampling run (they are stateful)."""
    if sampler == "flow_dpm_solver":
        # Sana's released scheduler config: DPM-Solver++ (2M) on flow sigmas.
        return DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=flow_shift,
            final_sigmas_type="zero",
            lower_order_final=True,
            timestep_spacing="linspace",
        )
    if sampler == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    raise ConfigError(f"unknown sampler '{sampler}'; use one of: {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    latent_shape: tuple[int, int, int],
    *,
    steps: int,
    cfg_scale: float,
    sampler: str,
    flow_shift: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Integrate from noise to latents for a batch of prompt embeddings.

    ``cfg_scale <= 1`` runs the conditional branch alone (as diffusers does); otherwise
    uncond + scale * (cond - uncond) with both branches in one forward pass.
    """
    device = embeds.device
    batch = embeds.shape[0]
    scheduler = make_scheduler(sampler, flow_shift)
    scheduler.set_timesteps(steps, device=device)
    if noise is None:
        noise = randn_tensor((batch, *latent_shape), generator=generator, device=device)
    latents = noise.to(device=device, dtype=torch.float32)

    guided = cfg_scale > 1.0
    if guided:
        ctx = torch.cat([null_embeds.expand(batch, -1, -1).to(embeds), embeds])
        ctx_mask = torch.cat([null_mask.expand(batch, -1).to(mask), mask])
    else:
        ctx, ctx_mask = embeds, mask
    use_autocast = autocast_dtype is not None and autocast_dtype != torch.float32
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            velocity = model(
                model_in,
                encoder_hidden_states=ctx,
                encoder_attention_mask=ctx_mask,
                timestep=t.expand(model_in.shape[0]),
                return_dict=False,
            )[0].float()
        if guided:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + cfg_scale * (cond - uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def to_uint8_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[N,3,H,W] in [-1,1] -> one uint8 [H', W', 3] grid image with a 2 px gap."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    pad = 2
    grid = torch.zeros(c, rows * (h + pad) - pad, ncol * (w + pad) - pad)
    for i, img in enumerate(images.float().cpu()):
        r, k = divmod(i, ncol)
        grid[:, r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = img
    grid = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return grid.permute(1, 2, 0)
