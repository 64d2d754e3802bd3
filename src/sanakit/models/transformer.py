"""Build diffusers' SanaTransformer2DModel from config, and load Sana weights into it."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file

from sanakit.config import Config
from sanakit.errors import CheckpointError
from sanakit.io.checkpoint import resolve_checkpoint


def transformer_kwargs(cfg: Config, in_channels: int, caption_channels: int, factor: int) -> dict:
    """The SanaTransformer2DModel constructor arguments implied by a config."""
    m = cfg.model
    return dict(
        in_channels=in_channels,
        out_channels=in_channels,
        num_attention_heads=m.num_attention_heads,
        attention_head_dim=m.attention_head_dim,
        num_layers=m.num_layers,
        num_cross_attention_heads=m.num_cross_attention_heads,
        cross_attention_head_dim=m.cross_attention_head_dim,
        cross_attention_dim=m.num_attention_heads * m.attention_head_dim,
        caption_channels=caption_channels,
        mlp_ratio=m.mlp_ratio,
        sample_size=m.image_size // factor,
        patch_size=m.patch_size,
        interpolation_scale=None,
    )


def build_transformer(
    cfg: Config, in_channels: int, caption_channels: int, factor: int
) -> SanaTransformer2DModel:
    """A freshly initialised transformer (seed it before calling for reproducible weights)."""
    model = SanaTransformer2DModel(**transformer_kwargs(cfg, in_channels, caption_channels, factor))
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def find_weights(path: str | Path) -> Path:
    """The weights file ``load_from`` names: a .safetensors file, a sanakit checkpoint or work
    dir (its newest checkpoint), a diffusers transformer folder or a pipeline folder."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = resolve_checkpoint(path)
    candidates = [
        path / "model.safetensors",  # a sanakit checkpoint
        path / "diffusion_pytorch_model.safetensors",  # a diffusers transformer folder
        path / "transformer" / "diffusion_pytorch_model.safetensors",  # a pipeline folder
    ]
    if path.is_file() and path.suffix == ".safetensors":
        candidates.insert(0, path)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CheckpointError(
            f"load_from={path} holds no model.safetensors or diffusers transformer weights; "
            "point it at a sanakit checkpoint or a diffusers Sana transformer folder"
        )
    return found


def load_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load weights only (fine-tuning) from a sanakit checkpoint dir or a diffusers folder.

    Returns a short description of what was loaded. Shapes must match exactly.
    """
    found = find_weights(path)
    try:
        state = load_file(str(found))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"load_from weights {found} cannot be read ({err})") from None
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if mismatched or missing:
        what = f"{len(mismatched)} tensors differ in shape" if mismatched else ""
        what += (", " if what and missing else "") + (f"{len(missing)} missing" if missing else "")
        raise CheckpointError(
            f"load_from weights {found} do not fit this model ({what}, e.g. "
            f"{(mismatched or missing)[0]}); match the model.* settings to those weights"
        )
    model.load_state_dict(state, strict=False)
    return str(found)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
