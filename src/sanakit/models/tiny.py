"""Tiny random-weight diffusers autoencoders for tests, benchmarks and offline trials.

No weights can be downloaded here, so the latent path is exercised with these: saved with
``save_pretrained``, they go through the real ``from_pretrained`` loaders. Their outputs are
meaningless; only shapes, scaling and speed are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL

# Non-default factors, so tests can tell "read from the model config" from "fell back to 1/0".
TINY_DCAE_SCALING = 0.5
TINY_SDVAE_SCALING = 0.25
TINY_SDVAE_SHIFT = 0.125


def tiny_dcae() -> torch.nn.Module:
    """A ~69k-parameter AutoencoderDC: 4 latent channels, downsampling by 2."""
    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        scaling_factor=TINY_DCAE_SCALING,
    )


def tiny_sdvae() -> torch.nn.Module:
    """A ~44k-parameter AutoencoderKL: 4 latent channels, downsampling by 2."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=TINY_SDVAE_SCALING,
        shift_factor=TINY_SDVAE_SHIFT,
    )


def make_tiny_autoencoder(kind: str, path: Path) -> Path:
    """Save a tiny random ``kind`` ("dc-ae" | "sd-vae") autoencoder to ``path``; returns it."""
    builders = {"dc-ae": tiny_dcae, "sd-vae": tiny_sdvae}
    if kind not in builders:
        raise ValueError(f"unknown autoencoder kind {kind!r}; use one of {sorted(builders)}")
    path = Path(path)
    builders[kind]().save_pretrained(path)
    return path
