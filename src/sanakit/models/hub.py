"""Offline lookup of model folders: a local path, or a Hub repo id already in the HF cache.

Nothing here touches the network. Every failure is one :class:`ModelLoadError` line naming the
model, the folder looked at and the option to set. Folders must hold safetensors weights: a
pickle (``pytorch_model.bin``) can run code when loaded, so sanakit never unpickles one.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from sanakit.errors import ConfigError, ModelLoadError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONFIG_LIMIT = 16 * 1024 * 1024  # model configs are a few KiB; bigger is not a config


class ModelRole(Enum):
    """Which configured model a folder is for: names it in messages and says what to set."""

    TEXT_ENCODER = ("text encoder", "text_encoder.name_or_path")
    AUTOENCODER = ("autoencoder", "vae.name_or_path")
    PRETRAINED = ("pretrained model", "model.pretrained")

    @property
    def what(self) -> str:
        return self.value[0]

    @property
    def option(self) -> str:
        return self.value[1]


def hf_cache_dir() -> str:
    """The Hugging Face hub cache searched for repo ids (``HF_HOME`` / ``HF_HUB_CACHE``)."""
    return str(constants.HF_HUB_CACHE)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's text (libraries raise multi-line ones)."""
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return line.rstrip(".")[:limit]


def looks_like_path(name_or_path: str) -> bool:
    """True for strings that can only be filesystem paths, never a Hub repo id."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") != 1
        or not all(name_or_path.split("/"))
    )


def _not_found(name_or_path: str, role: ModelRole) -> ModelLoadError:
    if looks_like_path(name_or_path):
        return ModelLoadError(
            f"{role.what} folder '{name_or_path}' does not exist: put the model folder there, or "
            f"set --{role.option}=PATH to a local model folder (models load offline)"
        )
    return ModelLoadError(
        f"{role.what} '{name_or_path}' is not available offline: it is not a local folder and "
        f"not in the Hugging Face cache (searched {hf_cache_dir()}); put the model folder at a "
        f"local path and set --{role.option}=PATH, or fill the cache (HF_HOME=...)"
    )


def resolve_model_dir(name_or_path: str, role: ModelRole) -> Path:
    """Map a local folder or a cached Hub repo id to a local folder, without the network."""
    if not name_or_path:
        raise ConfigError(
            f"{role.option} is empty: set --{role.option}=PATH (a local folder or a cached "
            f"Hugging Face repo id)"
        )
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ModelLoadError(
            f"{role.what} path '{name_or_path}' is a file, not a model folder: set "
            f"--{role.option} to the folder that holds config.json"
        )
    if looks_like_path(name_or_path):
        raise _not_found(name_or_path, role)
    try:
        return Path(snapshot_download(repo_id=name_or_path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise _not_found(name_or_path, role) from None


def component_dir(root: Path, subfolder: str, role: ModelRole) -> Path:
    """The folder holding ``config.json``: ``root`` itself or a pipeline's ``root/subfolder``."""
    if (root / "config.json").is_file():
        return root
    if (root / subfolder / "config.json").is_file():
        return root / subfolder
    raise ModelLoadError(
        f"{role.what} cannot be loaded from {root}: it has no config.json (nor "
        f"{subfolder}/config.json); point --{role.option} at a model folder saved with "
        f"save_pretrained"
    )


def read_model_config(folder: Path, role: ModelRole) -> dict[str, Any]:
    """``folder/config.json`` as a dict; anything else (garbage, a list, huge) is one line."""
    path = folder / "config.json"
    try:
        if path.stat().st_size > _CONFIG_LIMIT:
            raise ValueError(f"{path.stat().st_size} bytes, not a model config")
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        reason = first_line(err, 120)
    else:
        if isinstance(config, dict):
            return config
        reason = f"it holds a JSON {type(config).__name__}, not an object"
    raise ModelLoadError(
        f"{role.what} config {path} is unreadable ({reason}): restore it, or re-save the model "
        f"with save_pretrained and point --{role.option} at that folder"
    )


def require_safetensors(folder: Path, role: ModelRole) -> None:
    """Refuse a folder whose weights exist only as pickles (loading one can run code)."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in files):
        return
    pickles = sorted(name for name in files if name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            f"{role.what} folder {folder} holds only pickle weights ({', '.join(pickles[:3])}), "
            f"which sanakit never loads (a pickle can run code): convert them to safetensors "
            f"(load and save_pretrained in a trusted session) and point --{role.option} there"
        )
