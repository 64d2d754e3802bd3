"""Small random diffusers parts for the benchmarks (speed only; the weights are meaningless)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_bench_autoencoder(path: Path) -> Path:
    """A small AutoencoderDC (4 latent channels, factor 2), saved with ``save_pretrained``.

    At 64 px it gives 32x32x4 latents: with patch 2 the default transformer sees 256 tokens, the
    same as the default pixel-space model at 32 px.
    """
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    vae = AutoencoderDC(
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
        scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return Path(path)
