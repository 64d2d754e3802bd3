"""The text-embedding cache: caption -> ``(embeds [L, D], mask [L])`` of one text encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from sanakit.config import Config
from sanakit.embeddings.captions import BATCHING
from sanakit.embeddings.store import EntryCache, EntryStatus, Inspection, cache_root
from sanakit.io.artifacts import Tensors


class TextEmbeddingCache(EntryCache):
    """Caption -> ``(embeds [L, D], mask [L])`` of one text encoder, on disk.

    A file dataset's captions are stored as rows of their fixed chunk (``CaptionEncoder``,
    ``BATCHING``: chunks by length, the model run over the chunk's longest caption, zeros at
    padding); any other caption (images made in memory: :meth:`get`; validation prompts) is
    encoded alone at full length. A caption of a run always goes the same way, so cached and
    fresh values are the same bits; the key records ``BATCHING``, so entries written under
    another scheme are stale (rebuilt), never mixed in.
    """

    what = "text-embedding cache"
    subdir = "text"

    def __init__(self, root: Path, encoder: Any, mode: str = "readwrite") -> None:
        super().__init__(root, mode)
        self.encoder = encoder
        provenance = dict(encoder.provenance())  # fingerprints hash weights: compute once
        provenance.pop("sanakit_version", None)  # a release does not change the embeddings
        self.identity = {**provenance, "batching": BATCHING}  # how the stored rows were made
        self.shape = (int(encoder.max_length), int(encoder.hidden_size))
        self.dtype = encoder.dtype

    @classmethod
    def from_config(cls, cfg: Config, encoder: Any) -> TextEmbeddingCache | None:
        """The run's text cache, or None for ``train.cache_mode=off``."""
        mode = cfg.train.cache_mode
        return None if mode == "off" else cls(cache_root(cfg), encoder, mode)

    def key_for(self, caption: str) -> dict:
        return {"kind": "text-embedding", "caption": caption, **self.identity}

    def path_for(self, caption: str) -> Path:
        return self.path_for_digest(hashlib.sha256(caption.encode("utf-8")).hexdigest())

    def validate(self, tensors: Tensors) -> str | None:
        embeds, mask = tensors.get("embeds"), tensors.get("mask")
        if embeds is None or mask is None:
            return "embeds or mask missing"
        if embeds.dim() != 2 or mask.dim() != 1 or embeds.shape[0] != mask.shape[0]:
            return f"shapes {tuple(embeds.shape)}/{tuple(mask.shape)} are not [L, D]/[L]"
        return None

    def fits(self, tensors: Tensors) -> str | None:
        embeds, mask = tensors["embeds"], tensors["mask"]
        if tuple(embeds.shape) != self.shape or tuple(mask.shape) != self.shape[:1]:
            return f"shapes {tuple(embeds.shape)}/{tuple(mask.shape)}, expected {self.shape}"
        if embeds.dtype != self.dtype:
            return f"dtype {embeds.dtype}, expected {self.dtype}"
        return None

    def find(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(embeds [L, D], mask [L])`` from disk (checked), or None when it must be encoded."""
        hit = self.lookup(self.path_for(caption), self.key_for(caption))
        return None if hit is None else (hit["embeds"], hit["mask"])

    def put(self, caption: str, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """Record a freshly encoded caption (written in readwrite mode)."""
        self.stats.computed += 1
        self.store(self.path_for(caption), self.key_for(caption), {"embeds": embeds, "mask": mask})

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [L, D], mask [L])`` on the encoder's device: from disk or encoded alone."""
        hit = self.find(caption)
        device = self.encoder.device
        if hit is not None:
            return hit[0].to(device), hit[1].to(device)
        embeds, mask = self.encoder.encode([caption])
        self.put(caption, embeds[0], mask[0])
        return embeds[0], mask[0]

    def probe_caption(self, caption: str) -> EntryStatus:
        """The entry's status from its header alone (exists, readable, same key): no tensor is
        read, so checking a whole dataset before step 1 costs one small read per caption. A
        damaged body is still caught when the entry is used."""
        return self.probe(self.path_for(caption), self.key_for(caption))

    def inspect_caption(self, caption: str) -> Inspection:
        """The entry ``caption`` needs, checked without using it."""
        return self.inspect(self.path_for(caption), self.key_for(caption))
