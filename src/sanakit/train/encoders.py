"""Images -> latents and captions -> embeddings for a run: caches, the cold pass, the release.

Before step 1 every caption of a file dataset that the text cache lacks is encoded in one
batched pass, in fixed chunks (``embeddings.captions``), so a resumed run and an uninterrupted
one see the same bits. Then, with ``train.release_encoders``, when the caches cover the whole
dataset the text encoder and the autoencoder's encoder half are freed: training reads only
cached values. What still needs them is kept or prepared first: the null embedding was built
before, the validation prompts are encoded and pinned now, and the autoencoder's decoder stays
for the validation grids. A cache entry found damaged later reloads the freed part (with a
warning) rather than failing the run.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from sanakit.config import Config
from sanakit.embeddings.captions import CaptionChunks, CaptionEncoder
from sanakit.embeddings.latents import LatentCache
from sanakit.embeddings.loader import covered, dataset_captions
from sanakit.embeddings.sources import SourceIndex
from sanakit.embeddings.store import EntryStatus, cache_root
from sanakit.embeddings.text import TextEmbeddingCache
from sanakit.embeddings.writer import flush_writes
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text import build_text_encoder
from sanakit.units import human_bytes

log = logging.getLogger("sanakit")


@dataclass
class Encoders:
    """Images -> latents and captions -> embeddings, each through its on-disk cache."""

    latents: LatentCache
    captions: CaptionEncoder
    sources: SourceIndex | None = None  # file digests; None when latents are not cached by file
    released: bool = False


def build_encoders(
    cfg: Config, accelerator: Any, models: Any, dataset: Any, heldout: Any = None
) -> Encoders:
    """The run's caches and encoders; the cold caption pass done; encoders freed if unneeded.

    ``heldout``: a held-out set outside ``dataset`` (``data.val_dir``); its captions are
    encoded alone when first evaluated, and the encoders are freed only if it is cached too.
    """
    text = models.text_encoder
    store = TextEmbeddingCache.from_config(cfg, text)
    captions = dataset_captions(dataset)
    chunks = None if captions is None else CaptionChunks(captions)
    latents = LatentCache.from_config(cfg, models.autoencoder)
    sources = None
    if captions is not None and not latents.passthrough and latents.mode != "off":
        sources = SourceIndex(cache_root(cfg), latents.mode)
    encoders = Encoders(latents, CaptionEncoder(text, store=store, chunks=chunks), sources)
    if chunks is not None:
        # one builder writes, the others read what it wrote; memory-only rows: every rank
        if store is None or store.mode != "readwrite" or accelerator.is_local_main_process:
            found = encoders.captions.prefill()
            missing = len(chunks.ordered) - found[EntryStatus.VALID]
            if missing:
                log.info("encoded %d captions in chunks of %d before step 1", missing, chunks.size)
        flush_writes()  # data-loader workers read the entries from disk
        accelerator.wait_for_everyone()
    if cfg.train.release_encoders and all(
        caches_cover(encoders, store, d) for d in (dataset, heldout) if d is not None
    ):
        release(cfg, encoders, models)
    return encoders


def caches_cover(encoders: Encoders, store: Any, dataset: Any) -> bool:
    """Whether ``dataset`` can be read on cached values alone (checked from entry headers)."""
    captions = dataset_captions(dataset)
    if captions is None:
        return False  # images made in memory: nothing to check without rendering them all
    pinned = encoders.captions.pinned
    text_ok = all(
        c in pinned or (store is not None and store.probe_caption(c) is EntryStatus.VALID)
        for c in set(captions)
    )
    if not text_ok:
        return False
    if encoders.latents.passthrough:
        return True
    return encoders.sources is not None and covered(dataset, encoders.latents, encoders.sources)


def parameter_bytes(module: Any) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def rss_bytes() -> int:
    import psutil  # optional: only for the log line

    return int(psutil.Process(os.getpid()).memory_info().rss)


def return_freed_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so RSS shows what was freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS just drops later, or not at all
        pass


def release(cfg: Config, encoders: Encoders, models: Any) -> int:
    """Free the text encoder and the autoencoder's encoder; log what it freed. Returns bytes."""
    prompts = list(cfg.train.validation_prompts) if cfg.train.visualize else []
    encoders.captions.pin(prompts)  # validation keeps sampling without the text encoder
    before = rss_bytes()
    text, ae = models.text_encoder, models.autoencoder
    freed = parameter_bytes(getattr(text, "model", None))
    text.model = None
    device = text.device
    encoders.captions.reload = lambda: build_text_encoder(cfg.text_encoder, device)
    module = getattr(ae, "module", None)
    if module is not None and getattr(module, "encoder", None) is not None:
        freed += parameter_bytes(module.encoder)
        module.encoder = None  # the decoder stays: validation grids decode latents
        encoders.latents.reload = lambda: build_autoencoder(cfg.vae, ae.device, torch.float32)
    gc.collect()
    return_freed_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    after = rss_bytes()
    log.info(
        "caches cover the dataset: released the text encoder and the autoencoder's encoder "
        "(%s of parameters; process RSS %s -> %s)",
        human_bytes(freed), human_bytes(before), human_bytes(after),
    )  # fmt: skip
    encoders.released = True
    return freed
