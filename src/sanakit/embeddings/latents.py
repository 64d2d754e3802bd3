"""The latent cache: one image's exact pixel tensor -> its scaled latent, on disk."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from sanakit.config import Config
from sanakit.embeddings.store import EntryCache, Inspection, cache_root
from sanakit.io.artifacts import Tensors

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
        if latent.shape[0] != self.autoencoder.latent_channels:
            return f"latent shape {tuple(latent.shape)} does not fit the autoencoder"
        if latent.dtype != self.dtype:
            return f"dtype {latent.dtype}, expected {self.dtype}"
        return None

    def _entry(self, pixels: torch.Tensor) -> tuple[Path, dict]:
        digest = pixel_digest(pixels)
        key = self.key_for(digest, int(pixels.shape[-2]), int(pixels.shape[-1]))
        return self.path_for_digest(digest), key

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` on the autoencoder's device."""
        if self.passthrough:
            return self.autoencoder.encode(pixels.to(self.device))
        rows = []
        for i in range(pixels.shape[0]):
            one = pixels[i : i + 1]
            path, key = self._entry(one[0])
            hit = self.lookup(path, key)
            if hit is not None:
                rows.append(hit["latent"].to(self.device))
                continue
            latent = self.autoencoder.encode(one.to(self.device))[0]
            self.stats.computed += 1
            self.store(path, key, {"latent": latent})
            rows.append(latent)
        return torch.stack(rows)

    def inspect_pixels(self, pixels: torch.Tensor) -> Inspection:
        """The entry one image ``[3, H, W]`` needs, checked without using it."""
        return self.inspect(*self._entry(pixels))
