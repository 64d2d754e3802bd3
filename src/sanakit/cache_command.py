"""Turn a run's config into the parts `sanakit cache build|verify` works on.

It lives above ``train/`` because the dataset is built exactly as training builds it (same
buckets, same ``data.max_samples`` cap); ``sanakit.embeddings`` only ever receives built parts.
"""

from __future__ import annotations

import torch

from sanakit.config import Config
from sanakit.embeddings.commands import CacheParts
from sanakit.embeddings.latents import LatentCache
from sanakit.embeddings.store import cache_root
from sanakit.embeddings.text import TextEmbeddingCache
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text import build_text_encoder
from sanakit.train.components import build_dataset


def open_caches(cfg: Config, mode: str) -> CacheParts:
    """The run's text and latent caches in ``mode`` (readwrite to build, read to verify)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as training does
    encoder = build_text_encoder(cfg.text_encoder, device)
    autoencoder = build_autoencoder(cfg.vae, device, torch.float32)
    dataset, _ = build_dataset(cfg, autoencoder.downsample_factor)  # buckets resize as training
    root = cache_root(cfg)
    return CacheParts(
        text=TextEmbeddingCache(root, encoder, mode),
        latents=LatentCache(root, autoencoder, mode),
        dataset=dataset,
        num_workers=cfg.data.num_workers,
    )
