"""LoRA adapters on the Sana transformer, through peft and diffusers' adapter API.

``add_lora`` freezes the base and injects a peft ``LoraConfig`` adapter with
``SanaTransformer2DModel.add_adapter``; from then on the model's trainable parameters are exactly
the adapter's, so the optimizer, the EMA and the checkpoint (``TrainState``) hold adapter weights
only. ``adapter_state`` gives them under the model's own names (what checkpoints store);
``diffusers_lora_state`` in the names ``SanaPipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from sanakit.config import LoraConfig
from sanakit.errors import ConfigError

ADAPTER = "default"  # peft's adapter name; one adapter per run


def lora_alpha(lora: LoraConfig) -> float:
    """``lora.alpha``, where 0 means the rank (a scale alpha / rank of 1)."""
    return float(lora.alpha or lora.rank)


def adaptable_names(model: torch.nn.Module) -> list[str]:
    """The short names of the layers LoRA can target (Linear and Conv2d), e.g. ``to_q``."""
    names = []
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            parts = full.split(".")
            # "to_out.0" is named with its parent: the index alone says nothing
            names.append(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return list(dict.fromkeys(names))


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target must name at least one layer (peft's own suffix rule)."""
    names = [n for n, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(
                f"lora.target_modules names '{target}', which matches no layer of the model; "
                f"layers that exist: {', '.join(adaptable_names(model))}"
            )


def lora_parameter_count(model: torch.nn.Module, lora: LoraConfig) -> int:
    """The parameters :func:`add_lora` would add to ``model``, without adding them (doctor,
    benchmarks): peft's A (in -> r, the layer's kernel) and B (r -> out, 1x1) per target."""
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in lora.target_modules):
            continue
        if isinstance(module, torch.nn.Linear):
            total += lora.rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += lora.rank * (module.in_channels * kernel + module.out_channels)
    return total


def peft_config(lora: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora_alpha(lora),
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=True,  # B = 0: the adapted model starts exactly as the base
    )


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> int:
    """Freeze ``model`` and add the adapter ``lora`` describes; returns its parameter count.

    Seed the torch RNG before calling for reproducible adapter initialisation.
    """
    check_targets(model, list(lora.target_modules))
    model.requires_grad_(False)
    model.add_adapter(peft_config(lora), adapter_name=ADAPTER)
    trainable = [p for n, p in model.named_parameters() if is_adapter_key(n)]
    for p in trainable:
        p.requires_grad_(True)
    return sum(p.numel() for p in trainable)


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key of an adapted model belongs to the adapter."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the model's own names (what a checkpoint stores)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def diffusers_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in peft's saved names (no adapter name), as ``save_lora_weights`` wants."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def set_lora_scale(model: torch.nn.Module, scale: float) -> None:
    """Scale the adapter's contribution (1.0 = as trained, 0.0 = the base alone)."""
    model.set_adapters([ADAPTER], weights=[scale])


def fuse_and_unload(model: Any) -> None:
    """Fold the adapter (at the scale :func:`set_lora_scale` set) into the base weights and
    remove the LoRA layers: a plain model again."""
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
