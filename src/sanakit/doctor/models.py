"""The model checks (doctor only): the encoders load, the transformer builds, memory fits."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch

from sanakit.config import Config
from sanakit.doctor.check import FAIL, PASS, WARN, Check, env_int
from sanakit.doctor.probe import Probe
from sanakit.models.lora import lora_parameter_count
from sanakit.models.text.base import resolve_dtype
from sanakit.train.components import autocast_dtype
from sanakit.units import human_bytes

try:  # optional: comes with accelerate; without it free RAM is read from sysconf
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


def modules(obj: Any) -> list[torch.nn.Module]:
    """The torch modules an adapter object holds (to count a frozen model's parameters)."""
    return [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]


def params(obj: Any) -> int:
    return sum(p.numel() for m in modules(obj) for p in m.parameters())


def check_text_encoder(cfg: Config, probe: Probe) -> Check:
    te = cfg.text_encoder
    try:
        enc = probe.text_encoder
    except Exception as err:  # noqa: BLE001 - transformers raises many types for bad folders
        where = te.name_or_path or "(packaged MiniLM)"
        return Check(
            "text_encoder",
            FAIL,
            f"{te.type} from {where} does not load: {err}",
            "set --text_encoder.name_or_path to a local folder holding the model "
            "(models load offline)",
        )
    name = te.type if enc.name == te.type else f"{te.type} {enc.name}"
    return Check(
        "text_encoder",
        PASS,
        f"{name} loads (hidden {enc.hidden_size}, max_length {enc.max_length}, "
        f"{params(enc) / 1e6:.1f}M params, fingerprint {enc.fingerprint()[:12]})",
    )


def check_autoencoder(cfg: Config, probe: Probe) -> Check:
    try:
        ae = probe.autoencoder
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for bad folders
        return Check(
            "autoencoder",
            FAIL,
            f"vae.type={cfg.vae.type} from {cfg.vae.name_or_path or '(unset)'} does not load: "
            f"{err}",
            "set --vae.name_or_path to a local diffusers autoencoder folder",
        )
    factor, patch, size = ae.downsample_factor, cfg.model.patch_size, cfg.model.image_size
    if size % (factor * patch):
        return Check(
            "autoencoder",
            FAIL,
            f"model.image_size={size} is not divisible by the autoencoder factor {factor} x "
            f"model.patch_size {patch}",
            f"set --model.image_size to a multiple of {factor * patch}",
        )
    return Check(
        "autoencoder",
        PASS,
        f"{ae.name} loads ({ae.latent_channels} latent channels, factor {factor}; "
        f"{size}px -> {size // factor}x{size // factor} latents)",
    )


def check_model(cfg: Config, probe: Probe) -> Check:
    model = probe.transformer
    n = sum(p.numel() for p in model.parameters())
    side = cfg.model.image_size // probe.autoencoder.downsample_factor // cfg.model.patch_size
    return Check(
        "model",
        PASS,
        f"SanaTransformer2DModel {n / 1e6:.2f}M params, {cfg.model.num_layers} layers, "
        f"{side * side} tokens per image",
    )


def frozen_bytes(cfg: Config, probe: Probe) -> int:
    """The frozen encoders as training holds them: the text encoder at its training dtype."""
    enc = probe.text_encoder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the doctor loaded the encoder on the CPU; training puts it on `device` at its dtype there
    cuda_default = getattr(type(enc), "cuda_default_dtype", enc.dtype)
    enc_dtype = resolve_dtype(cfg.text_encoder.dtype, device, cuda_default)
    return params(enc) * torch.finfo(enc_dtype).bits // 8 + params(probe.autoencoder) * 4


# Resident memory of a CPU training process before any model: the Python runtime with torch,
# diffusers, transformers and accelerate imported (0.42 GB measured, torch 2.13 CPU).
CPU_RUNTIME_BYTES = 450 * 1024**2


def encoders_released(cfg: Config) -> bool:
    """Whether training frees the encoders before its first step (``train.release_encoders``:
    it does once the caches cover the dataset, which ``sanakit cache build`` makes sure of)."""
    return cfg.train.release_encoders


def optimizer_state_bytes(optimizer: str, parameters: Iterable[torch.nn.Parameter]) -> int:
    """fp32 optimizer state: AdamW keeps two moments (8 B/param). CAME keeps a first moment and,
    for a tensor of 2+ dims, row and column factors of its two last dims twice (squared grads
    and residuals): tiny for a matrix, but as large as the tensor for a 1x1 conv ``[o, i, 1, 1]``
    (row factor ``[o, i, 1]``), which is half of Sana's Mix-FFN: 2.9 floats/param on Sana-600M."""
    total = 0
    for p in parameters:
        shape = tuple(p.shape)
        if optimizer == "adamw" or len(shape) < 2:
            total += 2 * p.numel()
        else:
            total += p.numel() + 2 * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]))
    return total * 4


def estimate_train_memory(
    cfg: Config, probe: Probe, released: bool | None = None
) -> tuple[int, str]:
    """Rough peak bytes for one training process, and the parts in words.

    fp32 master weights + grads (8 B/param), the optimizer state (``optimizer_state_bytes``), the
    fp32 EMA (4) -- with LoRA only the adapter has grads, moments and EMA, the base 4 B/param --
    the frozen encoders at their dtype, and activations: per layer and token about
    (26 + 5 * mlp_ratio) * hidden values kept for backward, in bf16 or fp32 (calibrated on CPU
    fp32 with autograd's saved-tensor hooks: 38-39 at mlp_ratio 2.5 for hidden 128 and 256,
    4 and 8 layers); with gradient checkpointing only each layer's input plus one layer's worth.
    On the CPU, plus the runtime (``CPU_RUNTIME_BYTES``). When the encoders are ``released``
    (default: ``encoders_released(cfg)``) the peak is the larger of start-up (encoders, model
    and EMA) and the steps (no encoders): checked against a real Sana-600M process by
    ``benchmarks/full_size.py``.
    """
    m, t = cfg.model, cfg.train
    released = encoders_released(cfg) if released is None else released
    n = sum(p.numel() for p in probe.transformer.parameters())
    weights = n * (8 + 4) + optimizer_state_bytes(t.optimizer, probe.transformer.parameters())
    trained = "model"
    if cfg.lora.rank:  # the base is frozen (fp32, no grads/moments/EMA); the adapter trains
        adapter = lora_parameter_count(probe.transformer, cfg.lora)
        weights = n * 4 + adapter * (8 + 8 + 4)  # adapters are matrices: AdamW-like state
        trained = f"frozen base + LoRA rank {cfg.lora.rank} ({adapter:,} params), adapter"
    frozen = frozen_bytes(cfg, probe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = CPU_RUNTIME_BYTES if device.type == "cpu" else 0
    act_bytes = 2 if autocast_dtype(cfg, device) == torch.bfloat16 else 4
    side = m.image_size // probe.autoencoder.downsample_factor // m.patch_size
    hidden = m.num_attention_heads * m.attention_head_dim
    per_layer = t.train_batch_size * side * side * hidden * act_bytes
    width = 26 + 5 * m.mlp_ratio
    if m.gradient_checkpointing:
        acts = int(per_layer * (m.num_layers + width))
    else:
        acts = int(per_layer * m.num_layers * width)
    if released:  # start-up holds the encoders with the model and its EMA (8 B/param)
        need = runtime + max(frozen + n * 8, weights + acts)
    else:
        need = runtime + weights + frozen + acts
    parts = (
        f"{trained}+grads+{t.optimizer}+EMA {human_bytes(weights)}, encoders {human_bytes(frozen)}"
        f"{' (released before the first step)' if released else ''}, "
        f"activations ~{human_bytes(acts)} ({'bf16' if act_bytes == 2 else 'fp32'}, batch "
        f"{t.train_batch_size}{', checkpointed' if m.gradient_checkpointing else ''})"
        f"{f', runtime {human_bytes(runtime)}' if runtime else ''}"
    )
    return need, parts


def available_memory() -> tuple[int, str]:
    """(bytes, where) that one training process can use: the GPU's, else free system RAM."""
    if torch.cuda.is_available():
        index = env_int("LOCAL_RANK", 0) or 0
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"{props.name} (cuda:{index})"
    if psutil is not None:
        avail = int(psutil.virtual_memory().available)
    else:  # pragma: no cover
        avail = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    local = env_int("LOCAL_WORLD_SIZE", 1) or 1  # CPU processes share the machine's RAM
    return avail // local, "available RAM" + (f" / {local} processes" if local > 1 else "")


def check_memory(cfg: Config, probe: Probe) -> Check:
    need, parts = estimate_train_memory(cfg, probe)
    have, where = available_memory()
    msg = f"about {human_bytes(need)} per process ({parts}); {human_bytes(have)} {where}"
    fix = (
        "lower --train.train_batch_size (raise gradient_accumulation_steps to keep the batch), "
        "set --model.gradient_checkpointing=true, or --train.mixed_precision=bf16"
    )
    if need > have:
        return Check("memory", FAIL, msg, fix)
    if need > 0.8 * have:
        return Check("memory", WARN, msg, fix)
    return Check("memory", PASS, msg)
