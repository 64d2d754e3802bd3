"""Build diffusers' SanaTransformer2DModel from config, and load Sana weights into it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file

from sanakit.config import Config
from sanakit.errors import CheckpointError
from sanakit.io.checkpoint import resolve_checkpoint
from sanakit.io.shards import SHARD_METADATA
from sanakit.models.pretrained import build_pretrained_transformer
from sanakit.models.pretrained_config import check_resolved
from sanakit.models.sana_checkpoint import read_nvlabs_checkpoint

#: load_from files read as NVlabs/Sana trainer checkpoints (torch.load, weights only)
TORCH_SUFFIXES = (".pth", ".pt")


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
    """A freshly initialised transformer (seed it before calling for reproducible weights).

    With ``model.pretrained`` the architecture is that model's config.json, exactly.
    """
    if cfg.model.pretrained:
        check_resolved(cfg)
        model = build_pretrained_transformer(cfg.model.pretrained, in_channels, caption_channels)
    else:
        model = SanaTransformer2DModel(
            **transformer_kwargs(cfg, in_channels, caption_channels, factor)
        )
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


@dataclass
class LoadedWeights:
    """What ``load_from`` put into the model, and the EMA weights it also held (if any)."""

    description: str  # one line for the log
    ema: dict[str, torch.Tensor] | None = None


def load_nvlabs_weights(model: torch.nn.Module, path: Path) -> LoadedWeights:
    """An NVlabs/Sana trainer ``.pth``: model weights now, the EMA for the caller to take."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    found = read_nvlabs_checkpoint(path, shapes)
    with torch.no_grad():
        model.load_state_dict(found.model)
    ema = f" and EMA ({len(found.ema)} tensors)" if found.ema is not None else " (no EMA in it)"
    skipped = ", ".join(found.not_loaded) or "nothing"
    return LoadedWeights(
        f"NVlabs/Sana checkpoint {path}: model ({len(found.model)} tensors){ema}; not loaded: "
        f"{skipped} (optimizer and RNG state do not carry over)",
        found.ema,
    )


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
    if found is None and (path / SHARD_METADATA).is_file():
        raise CheckpointError(
            f"load_from={path} is a sharded checkpoint; run `sanakit checkpoint consolidate "
            f"{path}` and point load_from at the checkpoint it writes"
        )
    if found is None:
        raise CheckpointError(
            f"load_from={path} holds no model.safetensors or diffusers transformer weights; "
            "point it at a sanakit checkpoint, a diffusers Sana transformer folder or an "
            "NVlabs/Sana .pth"
        )
    return found


SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"  # diffusers' sharded weights


def _shards_of(index: Path) -> list[Path]:
    """The shard files a diffusers index names (each a plain file name beside the index)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError, TypeError):
        raise CheckpointError(
            f"{index} is not a readable diffusers shard index; restore the folder"
        ) from None
    files = [index.parent / n for n in names if isinstance(n, str) and Path(n).name == n]
    if not files or len(files) != len(names) or not all(f.is_file() for f in files):
        raise CheckpointError(f"{index} names shard files that are not there; restore the folder")
    return files


def find_weight_files(path: str | Path) -> tuple[Path, list[Path]]:
    """What ``load_from`` (or a LoRA base) names, and its safetensors files: several for a
    sharded diffusers transformer or pipeline folder (by its index), else the one file."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = resolve_checkpoint(path)
    for folder in (path, path / "transformer"):
        if (folder / SHARD_INDEX).is_file():
            return folder, _shards_of(folder / SHARD_INDEX)
    found = find_weights(path)
    return found, [found]


def load_weights(model: torch.nn.Module, path: str | Path) -> LoadedWeights:
    """Load weights only (fine-tuning) from a sanakit checkpoint or work dir, a diffusers folder,
    a ``.safetensors`` file or an NVlabs/Sana trainer ``.pth``. Shapes must match exactly."""
    path = Path(path)
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        return load_nvlabs_weights(model, path)
    found, files = find_weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as err:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"load_from weights {file} cannot be read ({err})") from None
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
    return LoadedWeights(f"weights from {found}")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
