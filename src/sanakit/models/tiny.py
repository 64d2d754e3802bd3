"""Tiny random-weight models for tests, benchmarks and offline trials.

No weights can be downloaded here, so the latent path, the Gemma path and released-pipeline
fine-tuning are exercised with these: saved with ``save_pretrained``, they go through the real
``from_pretrained`` loaders. Their outputs are meaningless; only shapes, scaling and speed are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    SanaTransformer2DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

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


# The tiny pipeline's shapes: DC-AE latents (4 channels, factor 2), Gemma hidden 64.
TINY_GEMMA_HIDDEN = 64
TINY_SAMPLE_SIZE = 16  # latent side: 32 px images through the tiny DC-AE
_WORDS = (
    "a an the of on in with and red green blue yellow magenta cyan white black circle square "
    "triangle photo cat dog prompt user enhanced image"
).split()


def tiny_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code that prepends <bos> and pads right, like Gemma's."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {word: i for i, word in enumerate(specials + _WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_gemma() -> Gemma2Model:
    """A ~0.2M-parameter Gemma-2 (hidden 64, 2 layers)."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=TINY_GEMMA_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return Gemma2Model(config).eval()


def tiny_sana_transformer(num_layers: int = 2, seed: int = 0) -> SanaTransformer2DModel:
    """A Sana transformer for the tiny DC-AE and tiny Gemma (hidden 32, patch 2)."""
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=TINY_GEMMA_HIDDEN,
        sample_size=TINY_SAMPLE_SIZE,
        patch_size=2,
    )


def make_tiny_pipeline(path: Path, max_shard_size: str = "40KB") -> Path:
    """Save a tiny random ``SanaPipeline`` folder (transformer sharded) to ``path``; returns it.

    The layout of a released Sana pipeline: ``model_index.json``, ``transformer/`` (sharded
    safetensors + index), ``vae/`` (AutoencoderDC), ``text_encoder/`` (Gemma-2), ``tokenizer/``
    and ``scheduler/``.
    """
    from diffusers.pipelines.sana import SanaPipeline

    pipe = SanaPipeline(
        tokenizer=tiny_gemma_tokenizer(),
        text_encoder=tiny_gemma(),
        vae=tiny_dcae(),
        transformer=tiny_sana_transformer(),
        scheduler=DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
        ),
    )
    pipe.save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)
