"""Autoencoder adapters: pixel space (identity), DC-AE (Sana's default) and SD-style KL VAEs.

Every adapter maps pixels in ``[-1, 1]`` to *scaled* latents ``(z - shift) * scale`` and back,
deterministically (DC-AE has no posterior; the KL VAE uses the posterior mode), so latents can
be cached and a cache can be keyed by :meth:`Autoencoder.fingerprint`.

Weights are only ever read from local disk (``local_files_only=True``): ``vae.name_or_path``
is a diffusers model folder, a pipeline folder with a ``vae/`` subfolder, or a Hub id that is
already in the local Hugging Face cache.
"""

from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC, AutoencoderKL
from torch import Tensor

from sanakit.errors import ModelLoadError, SanakitError
from sanakit.models.dtypes import as_dtype, dtype_name
from sanakit.models.fingerprint import combine, hash_state_dict, hash_weight_files, stable_config
from sanakit.models.hub import (
    ModelRole,
    component_dir,
    first_line,
    read_model_config,
    require_safetensors,
    resolve_model_dir,
)

# kind -> diffusers class
_CLASSES: dict[str, type[torch.nn.Module]] = {"dc-ae": AutoencoderDC, "sd-vae": AutoencoderKL}
_KINDS = ("pixel", *_CLASSES)
_ROLE = ModelRole.AUTOENCODER


class Autoencoder(abc.ABC):
    """Maps pixels ``[B, 3, H, W]`` in ``[-1, 1]`` to scaled latents and back.

    Attributes: ``name`` (the ``vae.type``), ``latent_channels``, ``downsample_factor`` (pixels
    per latent along each side), ``scaling_factor`` and ``shift_factor`` (latents are
    ``(z - shift_factor) * scaling_factor``).
    """

    name: str
    latent_channels: int
    downsample_factor: int
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @abc.abstractmethod
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in ``[-1, 1]`` -> scaled latents ``[B, latent_channels, H/f, W/f]``."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels, clamped to ``[-1, 1]``."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex of everything that determines the latents (config, factors, weights)."""

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(height, width)`` for an image of ``height x width`` pixels."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of {f} ({self.name})")
        return height // f, width // f


class PixelAutoencoder(Autoencoder):
    """Identity "autoencoder": diffusion runs directly on pixels (3 channels, factor 1)."""

    name = "pixel"
    latent_channels = 3
    downsample_factor = 1

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # Defaults keep it an exact identity; explicit factors are honoured like for real VAEs.
        self.scaling_factor = 1.0 if scaling_factor is None else float(scaling_factor)
        self.shift_factor = 0.0 if shift_factor is None else float(shift_factor)

    def encode(self, pixels: Tensor) -> Tensor:
        x = pixels.to(device=self.device, dtype=self.dtype)
        if self.scaling_factor == 1.0 and self.shift_factor == 0.0:
            return x
        return (x - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        x = latents.to(device=self.device, dtype=self.dtype)
        return (x / self.scaling_factor + self.shift_factor).clamp(-1.0, 1.0)

    def fingerprint(self) -> str:
        settings = {"kind": "pixel", "scale": self.scaling_factor, "shift": self.shift_factor}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class DiffusersAutoencoder(Autoencoder):
    """Shared logic for diffusers autoencoders: scaling, dtype, no-grad, fingerprint.

    ``source_dir`` is the folder the weights came from (enables the cheap on-disk fingerprint);
    ``None`` means an in-memory module, fingerprinted from its full state_dict.
    """

    kind: str = ""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        source_dir: Path | None = None,
    ) -> None:
        config = module.config
        self.name = self.kind
        self.device = torch.device(device)
        self.dtype = dtype
        # SD VAEs overflow in fp16 (their config says force_upcast); run those in fp32 and cast
        # the outputs back, as diffusers' pipelines do.
        upcast = dtype == torch.float16 and bool(config.get("force_upcast", False))
        self.compute_dtype = torch.float32 if upcast else dtype
        self.module = module.to(device=self.device, dtype=self.compute_dtype).eval()
        self.module.requires_grad_(False)
        self.latent_channels = int(config["latent_channels"])
        self.downsample_factor = self._downsample_factor(config)
        own_scale = config.get("scaling_factor") or 1.0  # absent/null in the config: unscaled
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else own_scale)
        own_shift = config.get("shift_factor")
        self.shift_factor = float(
            shift_factor if shift_factor is not None else (own_shift if own_shift else 0.0)
        )
        self.source_dir = source_dir
        self._cached_fingerprint: str | None = None

    @staticmethod
    @abc.abstractmethod
    def _downsample_factor(config: Any) -> int:
        """Spatial reduction per side implied by the module config."""

    @abc.abstractmethod
    def _raw_encode(self, x: Tensor) -> Tensor:
        """Unscaled deterministic latents of ``x`` (already on device, in compute dtype)."""

    def encode(self, pixels: Tensor) -> Tensor:
        x = pixels.to(device=self.device, dtype=self.compute_dtype)
        # no_grad, not inference_mode: latents feed the training graph, and inference tensors
        # cannot be saved for backward.
        with torch.no_grad():
            z = self._raw_encode(x)
        return ((z - self.shift_factor) * self.scaling_factor).to(self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(device=self.device, dtype=self.compute_dtype)
        z = z / self.scaling_factor + self.shift_factor
        with torch.no_grad():
            pixels = self.module.decode(z).sample
        return pixels.clamp(-1.0, 1.0).to(self.dtype)

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "class": type(self.module).__name__,
            "config": stable_config(dict(self.module.config)),
            "scale": self.scaling_factor,
            "shift": self.shift_factor,
            "dtype": dtype_name(self.compute_dtype),
        }

    def fingerprint(self) -> str:
        if self._cached_fingerprint is not None:
            return self._cached_fingerprint
        if self.source_dir is not None:
            # Files on disk do not change under a running job; an in-memory module can, so
            # only the on-disk fingerprint is cached.
            content = hash_weight_files(self.source_dir)
            self._cached_fingerprint = combine(self._settings(), b"files", content)
            return self._cached_fingerprint
        return combine(self._settings(), b"state", hash_state_dict(self.module))


class DCAutoencoder(DiffusersAutoencoder):
    """DC-AE (diffusers ``AutoencoderDC``), e.g. Sana's f32c32 with scaling factor 0.41407."""

    kind = "dc-ae"

    @staticmethod
    def _downsample_factor(config: Any) -> int:
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)

    def _raw_encode(self, x: Tensor) -> Tensor:
        return self.module.encode(x).latent


class KLAutoencoder(DiffusersAutoencoder):
    """SD-style KL VAE (diffusers ``AutoencoderKL``); encodes to the posterior mode."""

    kind = "sd-vae"

    @staticmethod
    def _downsample_factor(config: Any) -> int:
        return 2 ** (len(config["block_out_channels"]) - 1)

    def _raw_encode(self, x: Tensor) -> Tensor:
        return self.module.encode(x).latent_dist.mode()


_ADAPTERS: dict[str, type[DiffusersAutoencoder]] = {"dc-ae": DCAutoencoder, "sd-vae": KLAutoencoder}


# ----------------------------------------------------------------------------- loading


def _load_module(kind: str, name_or_path: str, dtype: torch.dtype) -> tuple[Any, Path]:
    """Load the diffusers module for ``kind`` from local disk; returns it and its folder."""
    cls = _CLASSES[kind]
    class_name = cls.__name__
    if not name_or_path:
        raise ModelLoadError(
            f"vae.type={kind} needs vae.name_or_path; set it to a local diffusers {class_name} "
            f"folder"
        )
    # a model folder, or a whole pipeline folder holding vae/
    folder = component_dir(resolve_model_dir(name_or_path, _ROLE), "vae", _ROLE)
    found = read_model_config(folder, _ROLE).get("_class_name")
    if found and found != class_name:
        other = next((k for k, c in _CLASSES.items() if c.__name__ == found), None)
        fix = f"set vae.type={other}" if other else f"use a {class_name} folder"
        raise ModelLoadError(
            f"autoencoder {folder} is a {found}, not the {class_name} vae.type={kind} needs; {fix}"
        )
    require_safetensors(folder, _ROLE)
    try:
        module = cls.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except SanakitError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers/hub raise many types (OSError, ...)
        raise ModelLoadError(
            f"cannot load {class_name} from {folder}: {first_line(err)}; re-save the folder "
            f"with diffusers save_pretrained"
        ) from err
    return module, folder


def build_autoencoder(
    cfg_vae: Any, device: str | torch.device, dtype: torch.dtype | str
) -> Autoencoder:
    """The autoencoder described by the ``vae`` config section.

    Reads ``type`` (pixel | dc-ae | sd-vae), ``name_or_path``, ``scaling_factor`` and
    ``shift_factor`` (``None`` = the model config's value; shift defaults to 0).
    ``name_or_path`` may also be an already built diffusers module (tests, notebooks).
    Raises :class:`ModelLoadError` when the weights cannot be loaded from local disk.
    """
    kind = getattr(cfg_vae, "type", "pixel")
    scaling = getattr(cfg_vae, "scaling_factor", None)
    shift = getattr(cfg_vae, "shift_factor", None)
    dtype = as_dtype(dtype)
    if kind == "pixel":
        return PixelAutoencoder(device, dtype, scaling, shift)
    if kind not in _ADAPTERS:
        raise ModelLoadError(f"unknown vae.type {kind!r}; use one of {', '.join(_KINDS)}")
    source = getattr(cfg_vae, "name_or_path", "")
    if isinstance(source, torch.nn.Module):
        module, folder = source, None
        if type(module).__name__ != _CLASSES[kind].__name__:
            raise ModelLoadError(
                f"vae.type={kind} needs a {_CLASSES[kind].__name__}, got a "
                f"{type(module).__name__}; fix vae.type"
            )
    else:
        module, folder = _load_module(kind, str(source or ""), dtype)
    return _ADAPTERS[kind](
        module,
        device=device,
        dtype=dtype,
        scaling_factor=scaling,
        shift_factor=shift,
        source_dir=folder,
    )
