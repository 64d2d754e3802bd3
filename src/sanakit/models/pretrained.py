"""Start from a released model: ``model.pretrained`` names its folder.

Accepted: a diffusers ``SanaPipeline`` folder (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``), a repo id already in the local Hugging Face cache (resolved offline), or a bare
``SanaTransformer2DModel`` folder. The transformer's architecture is its ``config.json``, so
every build of a run (fresh start, resume, sample, export) constructs the same module from it;
the weights (sharded or not) are read through diffusers' own ``from_pretrained`` on a fresh start
only: a resumed run takes every weight from its checkpoint.

:func:`base_identity` is the one description of "which base model": the folder, a fingerprint of
its weights and config, and a hash of the architecture alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from diffusers import SanaTransformer2DModel

from sanakit.config import MODEL_SIZE_MAX
from sanakit.errors import ModelLoadError, SanakitError
from sanakit.models.fingerprint import combine, hash_weight_files, stable_config
from sanakit.models.hub import (
    ModelRole,
    component_dir,
    first_line,
    read_model_config,
    require_safetensors,
    resolve_model_dir,
)

ROLE = ModelRole.PRETRAINED
TRANSFORMER_CLASS = "SanaTransformer2DModel"
SIZE_KEYS = (  # config.json keys that size the model's tensors
    "in_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim",
    "caption_channels", "mlp_ratio", "sample_size", "patch_size",
)  # fmt: skip
FIX = "point --model.pretrained at a diffusers SanaPipeline folder or a Sana transformer folder"


@dataclass(frozen=True)
class PretrainedSource:
    """Where a pretrained Sana transformer (and maybe its pipeline's other parts) lives."""

    spec: str  # model.pretrained as the user wrote it
    root: Path  # the resolved folder (pipeline root, or the transformer folder itself)
    transformer_dir: Path
    config: dict[str, Any]  # the full constructor config (defaults filled in by diffusers)
    weight_files: tuple[Path, ...]  # the safetensors files (several when sharded)

    @property
    def is_pipeline(self) -> bool:
        return self.transformer_dir != self.root

    @property
    def sharded(self) -> bool:
        return len(self.weight_files) > 1

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def reference(self) -> str:
        """How a config should name this model: the repo id for a cached one (its snapshot
        folder is an implementation detail of the cache), else the absolute folder."""
        return str(self.root) if Path(self.spec).expanduser().is_dir() else self.spec

    def component(self, name: str) -> Path | None:
        """A pipeline's ``name/`` folder when it holds a config, else None."""
        folder = self.root / name
        if self.is_pipeline and (folder / "config.json").is_file():
            return folder
        return None

    def meta_model(self) -> SanaTransformer2DModel:
        """The transformer on the meta device: shapes and parameter counts, no memory."""
        with torch.device("meta"):
            return SanaTransformer2DModel.from_config(self.config)


@dataclass(frozen=True)
class BaseModelIdentity:
    """Which base model a run started from (recorded in every checkpoint's trainer state)."""

    source: str  # model.pretrained as given (path or repo id)
    path: str  # the resolved transformer folder
    fingerprint: str  # weights (sampled for big shards) + config: changes when the weights do
    architecture: str  # sha256 of the config alone: what a resume must rebuild identically

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BaseModelIdentity | None:
        """A recorded identity (``trainer_state.json``'s ``base_model``); None if unusable."""
        names = ("source", "path", "fingerprint", "architecture")
        if not isinstance(data, dict) or not all(isinstance(data.get(n), str) for n in names):
            return None
        return cls(**{n: data[n] for n in names})


def _architecture_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stable_config(config), sort_keys=True).encode()).hexdigest()


def _check_sizes(folder: Path, raw: dict[str, Any], spec: str) -> None:
    """Sizes must be positive numbers a model can have (a hostile 10**9 layers is one line)."""
    for key in SIZE_KEYS:
        value = raw.get(key, 1)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and 0 < value <= MODEL_SIZE_MAX and (key == "mlp_ratio" or value == int(value))):
            raise ModelLoadError(
                f"model.pretrained={spec}: {folder}/config.json has {key}={value!r}, not a size "
                f"a Sana transformer can have; {FIX}"
            )


def _full_config(folder: Path, raw: dict[str, Any], spec: str) -> dict[str, Any]:
    """The constructor config diffusers builds from ``raw`` (every default filled in)."""
    _check_sizes(folder, raw, spec)
    try:
        with torch.device("meta"):  # a hostile config with huge sizes costs nothing here
            model = SanaTransformer2DModel.from_config(raw)
    except SanakitError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for bad configs
        raise ModelLoadError(
            f"model.pretrained={spec}: {folder}/config.json does not build a {TRANSFORMER_CLASS} "
            f"({first_line(err, 160)}); {FIX}"
        ) from None
    return {k: v for k, v in dict(model.config).items() if k != "_use_default_values"}


@cache
def _locate(spec: str, root: Path, mtime_ns: int) -> PretrainedSource:
    folder = component_dir(root, "transformer", ROLE)
    raw = read_model_config(folder, ROLE)
    found = raw.get("_class_name")
    if found != TRANSFORMER_CLASS:
        what = f"a {found}" if isinstance(found, str) else "no diffusers model (no _class_name)"
        raise ModelLoadError(
            f"model.pretrained={spec}: {folder}/config.json describes {what}, not a "
            f"{TRANSFORMER_CLASS}; {FIX}"
        )
    require_safetensors(folder, ROLE)
    weights = tuple(sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors")))
    if not weights:
        raise ModelLoadError(
            f"model.pretrained={spec}: {folder} holds no .safetensors weights; {FIX}"
        )
    return PretrainedSource(spec, root, folder, _full_config(folder, raw, spec), weights)


def locate_pretrained(spec: str) -> PretrainedSource:
    """Resolve ``model.pretrained`` offline and read its transformer config (one line on error)."""
    root = resolve_model_dir(spec, ROLE)
    config = root / "config.json"
    if not config.is_file():
        config = root / "transformer" / "config.json"
    stamp = config.stat().st_mtime_ns if config.is_file() else 0
    return _locate(spec, root, stamp)


def base_identity(spec: str) -> BaseModelIdentity:
    """The identity of the base model ``spec`` names: folder + weight fingerprint."""
    source = locate_pretrained(spec)
    arch = _architecture_hash(source.config)
    content = hash_weight_files(source.transformer_dir)
    return BaseModelIdentity(
        source=spec,
        path=str(source.transformer_dir),
        fingerprint=combine({"architecture": arch}, b"files", content),
        architecture=arch,
    )


def architecture_of(spec: str) -> str:
    """The architecture hash alone (no weight hashing: cheap enough for train's preflight)."""
    return _architecture_hash(locate_pretrained(spec).config)


def check_fits(source: PretrainedSource, latent_channels: int, caption_channels: int) -> None:
    """The transformer must take the autoencoder's latents and the text encoder's embeddings."""
    pairs = (
        ("in_channels", latent_channels, "latent channels of the autoencoder", "vae"),
        ("caption_channels", caption_channels, "hidden size of the text encoder", "text_encoder"),
    )
    for key, have, what, group in pairs:
        if source.config.get(key) != have:
            raise ModelLoadError(
                f"model.pretrained={source.spec} has {key}={source.config.get(key)} but the "
                f"{what} is {have}; use the pipeline's own {group} (drop the {group}.* settings) "
                f"or one that matches"
            )


def build_pretrained_transformer(
    spec: str, latent_channels: int, caption_channels: int
) -> SanaTransformer2DModel:
    """The pretrained architecture with fresh weights (the checkpoint or the base fills them)."""
    source = locate_pretrained(spec)
    check_fits(source, latent_channels, caption_channels)
    return SanaTransformer2DModel.from_config(source.config)


def load_pretrained_weights(model: torch.nn.Module, spec: str) -> str:
    """Copy the base weights (through diffusers' ``from_pretrained``) into ``model``."""
    source = locate_pretrained(spec)
    try:
        base = SanaTransformer2DModel.from_pretrained(
            source.transformer_dir,
            local_files_only=True,
            use_safetensors=True,
            torch_dtype=torch.float32,
        )
    except SanakitError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers/safetensors raise many types
        raise ModelLoadError(
            f"model.pretrained={spec}: the weights in {source.transformer_dir} cannot be loaded "
            f"({first_line(err, 200)}); restore the folder (every shard and its index)"
        ) from None
    state = base.state_dict()
    with torch.no_grad():
        model.load_state_dict(state)
    shards = f"{len(source.weight_files)} safetensors shards" if source.sharded else "safetensors"
    return f"pretrained transformer {source.transformer_dir} ({len(state)} tensors, {shards})"
