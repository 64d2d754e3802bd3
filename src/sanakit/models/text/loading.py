"""Load a transformers text encoder and its tokenizer from a local folder or cached repo id.

Accepts a plain model folder (model and tokenizer side by side) or a diffusers pipeline folder
(e.g. a Sana checkpoint) keeping them in ``text_encoder/`` and ``tokenizer/``. Weights are read
from safetensors only; every failure is one :class:`ModelLoadError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from sanakit.errors import ModelLoadError, SanakitError
from sanakit.models.hub import (
    ModelRole,
    component_dir,
    first_line,
    read_model_config,
    require_safetensors,
    resolve_model_dir,
)

ROLE = ModelRole.TEXT_ENCODER


@dataclass
class LoadedEncoder:
    model: torch.nn.Module
    tokenizer: Any
    source_dirs: list[Path]  # [model_dir, tokenizer_dir]: what the fingerprint hashes


def component_dirs(root: Path) -> tuple[Path, Path]:
    """``(model_dir, tokenizer_dir)`` inside ``root`` (plain model or pipeline folder)."""
    model_dir = component_dir(root, "text_encoder", ROLE)
    if model_dir == root:
        return root, root
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    return model_dir, tok_dir


def load_pretrained(spec: str, model_class: Any, dtype: torch.dtype) -> LoadedEncoder:
    """Model (of ``model_class``, in ``dtype``) and tokenizer for ``spec``, offline."""
    root = resolve_model_dir(spec, ROLE)
    model_dir, tok_dir = component_dirs(root)
    read_model_config(model_dir, ROLE)  # transformers crashes on a list or a string
    require_safetensors(model_dir, ROLE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = model_class.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype, use_safetensors=True
        )
    except SanakitError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many types for bad folders
        raise ModelLoadError(
            f"text encoder '{spec}' cannot be loaded from {root} ({first_line(err)}): point "
            f"--{ROLE.option} at a folder with config.json, tokenizer and safetensors weights"
        ) from None
    return LoadedEncoder(model, tokenizer, [model_dir, tok_dir])
