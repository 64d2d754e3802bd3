"""Read a checkpoint written by NVlabs/Sana's trainer (``.pth``) into diffusers' names.

NVlabs/Sana saves ``{"state_dict": ..., "state_dict_ema": ..., "optimizer": ..., "scheduler":
..., "epoch": ..., "rng_state": ...}`` (its released ``.pth`` files hold ``state_dict`` alone);
``ema`` is accepted for the EMA as well. The names are those of Sana's own modules; the map below
renames them to ``SanaTransformer2DModel``'s (read from diffusers'
``scripts/convert_sana_to_diffusers.py``), splitting the fused self-attention ``qkv`` and the
cross-attention ``kv`` projections along their output dimension.

Loading never runs code from the file: ``torch.load(weights_only=True)``, with numpy's array
reconstruction allowed (Sana stores ``np.random.get_state()`` in ``rng_state``; rebuilding an
array calls no user code). Optimizer, scheduler and RNG state are reported as not loaded: they
belong to Sana's optimizer and parameter order and cannot carry over.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sanakit.errors import CheckpointError
from sanakit.models.hub import first_line

#: NVlabs name -> diffusers name, outside the blocks
TOP_LEVEL = {
    "x_embedder.proj.weight": "patch_embed.proj.weight",
    "x_embedder.proj.bias": "patch_embed.proj.bias",
    "y_embedder.y_proj.fc1.weight": "caption_projection.linear_1.weight",
    "y_embedder.y_proj.fc1.bias": "caption_projection.linear_1.bias",
    "y_embedder.y_proj.fc2.weight": "caption_projection.linear_2.weight",
    "y_embedder.y_proj.fc2.bias": "caption_projection.linear_2.bias",
    "t_embedder.mlp.0.weight": "time_embed.emb.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_embed.emb.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_embed.emb.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_embed.emb.timestep_embedder.linear_2.bias",
    "t_block.1.weight": "time_embed.linear.weight",
    "t_block.1.bias": "time_embed.linear.bias",
    "attention_y_norm.weight": "caption_norm.weight",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
    "final_layer.scale_shift_table": "scale_shift_table",
}
#: inside ``blocks.{i}.`` (NVlabs) / ``transformer_blocks.{i}.`` (diffusers)
BLOCK_RENAMES = {
    "scale_shift_table": "scale_shift_table",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "attn.q_norm.weight": "attn1.norm_q.weight",  # Sana 1.5 (qk_norm)
    "attn.k_norm.weight": "attn1.norm_k.weight",
    "cross_attn.q_linear.weight": "attn2.to_q.weight",
    "cross_attn.q_linear.bias": "attn2.to_q.bias",
    "cross_attn.q_norm.weight": "attn2.norm_q.weight",
    "cross_attn.k_norm.weight": "attn2.norm_k.weight",
    "cross_attn.proj.weight": "attn2.to_out.0.weight",
    "cross_attn.proj.bias": "attn2.to_out.0.bias",
    "mlp.inverted_conv.conv.weight": "ff.conv_inverted.weight",
    "mlp.inverted_conv.conv.bias": "ff.conv_inverted.bias",
    "mlp.depth_conv.conv.weight": "ff.conv_depth.weight",
    "mlp.depth_conv.conv.bias": "ff.conv_depth.bias",
    "mlp.point_conv.conv.weight": "ff.conv_point.weight",
}
#: fused NVlabs tensors, split into equal parts along dim 0
BLOCK_SPLITS = {
    "attn.qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "attn.qkv.bias": ("attn1.to_q.bias", "attn1.to_k.bias", "attn1.to_v.bias"),
    "cross_attn.kv_linear.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
    "cross_attn.kv_linear.bias": ("attn2.to_k.bias", "attn2.to_v.bias"),
}
#: NVlabs tensors with no diffusers counterpart (learned null caption, fixed sin-cos table, ...)
NO_COUNTERPART = (
    "y_embedder.y_embedding",
    "pos_embed",
    "logvar_linear.weight",
    "logvar_linear.bias",
)
MODEL_KEY = "state_dict"
EMA_KEYS = ("state_dict_ema", "ema")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


@dataclass
class NVlabsCheckpoint:
    """A converted NVlabs checkpoint: diffusers-named tensors, and what was left out."""

    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    not_loaded: list[str]  # top-level entries and tensors that were not converted


def convert_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """NVlabs names -> diffusers names; returns the converted tensors and the unknown names."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for name, tensor in state.items():
        block = _BLOCK.match(name)
        if name in TOP_LEVEL:
            out[TOP_LEVEL[name]] = tensor
        elif block and block.group(2) in BLOCK_RENAMES:
            out[f"transformer_blocks.{block.group(1)}.{BLOCK_RENAMES[block.group(2)]}"] = tensor
        elif block and block.group(2) in BLOCK_SPLITS:
            targets = BLOCK_SPLITS[block.group(2)]
            for target, part in zip(targets, torch.chunk(tensor, len(targets), dim=0), strict=True):
                out[f"transformer_blocks.{block.group(1)}.{target}"] = part.clone()
        elif name not in NO_COUNTERPART:
            unknown.append(name)
    return out, unknown


def to_nvlabs_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse map: diffusers-named tensors as NVlabs/Sana's trainer names them."""
    top = {v: k for k, v in TOP_LEVEL.items()}
    renames = {v: k for k, v in BLOCK_RENAMES.items()}
    part_of = {p: (fused, i) for fused, parts in BLOCK_SPLITS.items() for i, p in enumerate(parts)}
    out: dict[str, Tensor] = {}
    fused_parts: dict[str, dict[int, Tensor]] = {}
    for name, tensor in state.items():
        block = _DIFFUSERS_BLOCK.match(name)
        if name in top:
            out[top[name]] = tensor
        elif block and block.group(2) in renames:
            out[f"blocks.{block.group(1)}.{renames[block.group(2)]}"] = tensor
        elif block and block.group(2) in part_of:
            fused, position = part_of[block.group(2)]
            fused_parts.setdefault(f"blocks.{block.group(1)}.{fused}", {})[position] = tensor
    for name, parts in fused_parts.items():
        out[name] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def _safe_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain data only; numpy arrays allowed."""
    numpy_core = getattr(np, "_core", None) or np.core
    allowed = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "uint8")]
    try:
        with torch.serialization.safe_globals(allowed):
            try:  # mmap: a multi-GB checkpoint is not read into memory twice
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # files from torch < 1.6 cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{what} cannot be loaded without running code from it ({_unsafe_reason(err)}); "
            f"sanakit only loads tensors and plain data: re-save it as a dict of tensors in a "
            f"session you trust"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"{what} is not a readable PyTorch checkpoint ({first_line(err, 160)}); check the "
            f"file (a complete download, a .pth written by torch.save)"
        ) from None


def _unsafe_reason(err: BaseException) -> str:
    """The global the weights-only unpickler refused, from torch's long message."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return f"it references {found.group(1)}" if found else first_line(err, 120)


def _describe(data: Any) -> str:
    """What a loaded object holds, for the "unknown layout" line."""
    if isinstance(data, dict):
        keys = [f"{k!s}: {type(v).__name__}" for k, v in list(data.items())[:8]]
        more = f", ... ({len(data)} entries)" if len(data) > 8 else ""
        return "a dict with {" + ", ".join(keys) + more + "}"
    return f"a {type(data).__name__}"


def _tensors(data: Any) -> dict[str, Tensor] | None:
    """``data`` as a name -> tensor dict (``module.`` prefixes of DDP dropped), else None."""
    if not isinstance(data, dict) or not data:
        return None
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        return None
    if all(k.startswith("module.") for k in data):
        return {k.removeprefix("module."): v for k, v in data.items()}
    return dict(data)


def _fit(
    state: dict[str, Tensor], shapes: Mapping[str, torch.Size], what: str, part: str
) -> dict[str, Tensor]:
    """Convert ``state`` and check it covers the model exactly, shape for shape."""
    converted, unknown = convert_state(state)
    if unknown:
        raise CheckpointError(
            f"{what}: {part} has {len(unknown)} tensors sanakit cannot map to diffusers' Sana "
            f"names (e.g. {', '.join(unknown[:3])}); it is not a Sana checkpoint, or a variant "
            f"(e.g. Sana-Sprint) sanakit does not convert yet"
        )
    missing = [k for k in shapes if k not in converted]
    extra = [k for k in converted if k not in shapes]
    wrong = [k for k in converted if k in shapes and converted[k].shape != shapes[k]]
    if missing or extra or wrong:
        key = (wrong or missing or extra)[0]
        detail = (
            f"{key} is {tuple(converted[key].shape)} there, {tuple(shapes[key])} here"
            if wrong
            else f"{len(missing)} missing, {len(extra)} not in this model, e.g. {key}"
        )
        raise CheckpointError(
            f"{what}: {part} does not fit the configured model ({detail}); set "
            f"--model.pretrained to the matching diffusers Sana model (or the model.* keys)"
        )
    return converted


def read_nvlabs_checkpoint(path: Path, shapes: Mapping[str, torch.Size]) -> NVlabsCheckpoint:
    """Load and convert an NVlabs/Sana ``.pth`` for a model with parameter ``shapes``."""
    what = f"load_from={path}"
    data = _safe_load(path, what)
    model = _tensors(data.get(MODEL_KEY)) if isinstance(data, dict) else None
    if model is None and _tensors(data) is not None and any(k in TOP_LEVEL for k in data):
        data, model = {MODEL_KEY: data}, _tensors(data)  # a bare NVlabs state dict
    if model is None:
        raise CheckpointError(
            f"{what} has a layout sanakit does not know: {_describe(data)}; expected an "
            f"NVlabs/Sana checkpoint (a dict with 'state_dict' and optionally 'state_dict_ema'), a "
            f"sanakit checkpoint directory or a diffusers Sana folder"
        )
    ema_key = next((k for k in EMA_KEYS if _tensors(data.get(k)) is not None), None)
    ema = _fit(_tensors(data[ema_key]), shapes, what, ema_key) if ema_key else None
    not_loaded = [str(k) for k in data if k not in (MODEL_KEY, ema_key)]
    dropped = sorted(k for k in model if k in NO_COUNTERPART)
    return NVlabsCheckpoint(_fit(model, shapes, what, MODEL_KEY), ema, not_loaded + dropped)
