"""The latent cache: one image -> its scaled latent, on disk.

Two kinds of entries. An image read from a file is keyed by the file's bytes (its sha256, see
``sources.py``), the crop plan (target size, resize, crop box, decided from the header size),
the flip and the decode version: a warm epoch finds its latents without decoding a pixel. An
image made in memory (the built-in shapes) is keyed by its exact pixel tensor. Either way each
image is encoded alone, so no value depends on which images shared its batch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sanakit.config import Config
from sanakit.data.images import CropPlan
from sanakit.embeddings.sources import Source
from sanakit.embeddings.store import EntryCache, Inspection, cache_root
from sanakit.embeddings.writer import writer
from sanakit.io.artifacts import Tensors, key_hash

# bump when load_image turns the same bytes and plan into other pixels (entries go stale)
DECODE_VERSION = 1
Entry = tuple[Path, dict]  # where an entry lives and the key it must carry


@dataclass
class ImageBatch:
    """A batch as the data loader hands it over: latents found in the cache (read and checked
    in a worker) and decoded pixels, with the entry to store, for the rest."""

    latents: list[torch.Tensor | None]
    pixels: list[torch.Tensor | None]
    entries: list[Entry | None]
    stacked: torch.Tensor | None = None  # every latent, when all were found

    def __len__(self) -> int:
        return len(self.latents)

    def pin_memory(self) -> ImageBatch:  # DataLoader(pin_memory=True) calls this (CUDA only)
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return ImageBatch(
            [pin(t) for t in self.latents],
            [pin(t) for t in self.pixels],
            self.entries,
            pin(self.stacked),
        )


log = logging.getLogger("sanakit")


def pixel_digest(pixels: torch.Tensor) -> str:
    """sha256 of one image tensor: dtype, shape and raw bytes (24 us at 64 px, 1.5 ms at 512)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def pixel_variants(pixels: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """The pixel tensors training may feed for one decoded image: it, and its mirror if flipped."""
    # random_flip picks a side per (epoch, index): every epoch needs one of the two. Flipping
    # the decoded tensor equals flipping the cropped image (a pure pixel permutation).
    return [pixels, torch.flip(pixels, dims=[-1])] if flips else [pixels]


class LatentCache(EntryCache):
    """Pixels ``[B, 3, H, W]`` -> scaled latents, each image looked up or encoded on its own.

    With ``cache_mode=off`` images are still encoded one at a time, so switching the mode never
    changes a single bit of a run. The pixel "autoencoder" is an identity: nothing is cached.
    """

    what = "latent cache"
    subdir = "latents"

    def __init__(self, root: Path, autoencoder: Any, mode: str = "readwrite") -> None:
        self.autoencoder = autoencoder
        self.passthrough = getattr(autoencoder, "name", "") == "pixel"
        super().__init__(root, "off" if self.passthrough else mode)
        self.device = getattr(autoencoder, "device", torch.device("cpu"))
        self.dtype = getattr(autoencoder, "dtype", torch.float32)
        self.latent_channels = int(autoencoder.latent_channels)
        self.reload: Callable[[], Any] | None = None  # set when the encoder half is released
        self.identity = {
            "autoencoder": autoencoder.name,
            "fingerprint": autoencoder.fingerprint(),  # hashes weights: compute once
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(cls, cfg: Config, autoencoder: Any) -> LatentCache:
        if getattr(autoencoder, "name", "") == "pixel":
            log.info("latent cache not used: vae.type=pixel trains on pixels, nothing to encode")
        return cls(cache_root(cfg), autoencoder, cfg.train.cache_mode)

    def key_for(self, digest: str, height: int, width: int) -> dict:
        return {
            "kind": "latent",
            "pixels_sha256": digest,
            "height": height,
            "width": width,
            **self.identity,
        }

    def validate(self, tensors: Tensors) -> str | None:
        latent = tensors.get("latent")
        if latent is None:
            return "latent missing"
        if latent.dim() != 3:
            return f"latent shape {tuple(latent.shape)} is not [C, h, w]"
        return None

    def fits(self, tensors: Tensors) -> str | None:
        latent = tensors["latent"]
        if latent.shape[0] != self.latent_channels:
            return f"latent shape {tuple(latent.shape)} does not fit the autoencoder"
        if latent.dtype != self.dtype:
            return f"dtype {latent.dtype}, expected {self.dtype}"
        return None

    def _entry(self, pixels: torch.Tensor) -> tuple[Path, dict]:
        digest = pixel_digest(pixels)
        key = self.key_for(digest, int(pixels.shape[-2]), int(pixels.shape[-1]))
        return self.path_for_digest(digest), key

    def file_entry(self, source: Source, plan: CropPlan, flip: bool) -> Entry:
        """The entry of one file image under a crop plan and flip (no pixel needed)."""
        what = {
            "source_sha256": source.sha256,
            "source_size": [source.height, source.width],
            "size": [plan.height, plan.width],
            "resize": [plan.resize_h, plan.resize_w],
            "crop": [plan.left, plan.top],
            "flip": bool(flip),
            "decode": DECODE_VERSION,
        }
        return self.path_for_digest(key_hash(what)), {
            "kind": "latent-file",
            **what,
            **self.identity,
        }

    def encode_one(self, pixels: torch.Tensor) -> torch.Tensor:
        """One image ``[3, H, W]`` through the autoencoder, alone (reloaded if released)."""
        if self.reload is not None:
            log.warning("a latent is missing from the cache: reloading the released autoencoder")
            self.autoencoder, self.reload = self.reload(), None
        self.stats.computed += 1
        return self.autoencoder.encode(pixels[None].to(self.device))[0]

    def encode(self, pixels: torch.Tensor | ImageBatch) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` on the autoencoder's device."""
        if isinstance(pixels, ImageBatch):
            return self.encode_loaded(pixels)
        if self.passthrough:
            return self.autoencoder.encode(pixels.to(self.device))
        rows = []
        for i in range(pixels.shape[0]):
            path, key = self._entry(pixels[i])
            hit = self.lookup(path, key)
            if hit is not None:
                rows.append(hit["latent"].to(self.device))
                continue
            latent = self.encode_one(pixels[i])
            self.store(path, key, {"latent": latent})
            rows.append(latent)
        return torch.stack(rows)

    def encode_loaded(self, batch: ImageBatch) -> torch.Tensor:
        """Latents of a loaded batch: the found ones copied over, the rest encoded and stored."""
        if batch.stacked is not None:
            self.stats.read += len(batch)
            return batch.stacked.to(self.device, non_blocking=True)
        rows = []
        for latent, pixels, entry in zip(batch.latents, batch.pixels, batch.entries, strict=True):
            if latent is None and entry is not None:  # an equal image may be in flight already
                pending = writer().pending(entry[0], key_hash(entry[1]))
                latent = None if pending is None else pending["latent"]
            if latent is not None:
                self.stats.read += 1
                rows.append(latent.to(self.device, non_blocking=True))
                continue
            assert pixels is not None and entry is not None, "a miss carries its pixels"
            latent = self.encode_one(pixels)
            self.store(*entry, {"latent": latent})
            rows.append(latent)
        return torch.stack(rows)

    def inspect_pixels(self, pixels: torch.Tensor) -> Inspection:
        """The entry one image ``[3, H, W]`` needs, checked without using it."""
        return self.inspect(*self._entry(pixels))
