"""Load a trained checkpoint for sampling: the model, its encoders and its own null embedding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sanakit.config import Config
from sanakit.embeddings.captions import CaptionEncoder
from sanakit.errors import CheckpointError, SanakitError
from sanakit.io.checkpoint import listed_files, resolve_checkpoint
from sanakit.io.shards import require_full_layout
from sanakit.models.base_identity import check_same_base, identify_base
from sanakit.models.lora import add_lora, set_lora_scale
from sanakit.models.text.null_embedding import NullEmbedding, check_matches_checkpoint
from sanakit.models.transformer import load_weights
from sanakit.sampling import sample_latents, to_uint8_grid
from sanakit.train.components import autocast_dtype, build_models, latent_shape
from sanakit.train.lora_checks import read_adapter_record
from sanakit.train.state import (
    load_transformer_weights,
    read_config,
    read_null_embedding,
    read_trainer_state,
)

log = logging.getLogger("sanakit")
MEMO_CAPACITY = 4096  # prompts kept by Inference.encode_prompts
MAX_BATCH = 16  # images per model call in sample_grid: bounds peak memory whatever the request
MAX_IMAGES = 1024  # images per sample_grid call
MAX_GRID_PIXELS = 2**27  # ~400 MB as uint8 RGB: 128 images of 1024 px
GAP = 2  # px between grid tiles, as in sampling.to_uint8_grid


@dataclass
class Inference:
    cfg: Config
    checkpoint: Path
    models: Any  # train.components.Models, transformer in eval mode
    null: NullEmbedding
    captions: CaptionEncoder
    device: torch.device
    # prompt -> (embeds [L, D], mask [L]); filled by encode_prompts
    memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, L, D] embeds and [N, L] mask; the prompts not seen before go in ONE batch.

        Training encodes one caption per call (bit-stable across batch compositions, for exact
        resume); sampling has no such need, and one batched call (as SanaPipeline makes) halves
        the text-encoding time of a batch of new prompts. Repeated prompts (eval) are memoised.
        """
        missing = list(dict.fromkeys(p for p in prompts if p not in self.memo))
        if missing:
            if len(self.memo) + len(missing) > MEMO_CAPACITY:
                self.memo.clear()
            embeds, mask = self.models.text_encoder.encode(missing)
            self.memo.update(zip(missing, zip(embeds, mask, strict=True), strict=True))
        rows = [self.memo[p] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        cfg_scale: float,
        steps: int,
        sampler: str,
        seed: int,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images [N,3,H,W] in [-1,1] for the prompts; same seed -> identical images."""
        embeds, mask = self.encode_prompts(prompts)
        shape = latent_shape(self.cfg, self.models.autoencoder)
        if noise is None:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn((len(prompts), *shape), generator=generator)
        latents = sample_latents(
            self.models.transformer,
            embeds,
            mask,
            self.null.embeds,
            self.null.mask,
            shape,
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            flow_shift=self.cfg.scheduler.flow_shift,
            noise=noise.to(self.device),
            autocast_dtype=autocast_dtype(self.cfg, self.device),
        )
        return self.models.autoencoder.decode(latents).float().cpu()


def load_for_inference(
    checkpoint: str | Path,
    *,
    ema: bool = False,
    device: str | torch.device | None = None,
    allow_encoder_change: bool = False,
    lora_scale: float = 1.0,
    base: str | Path | None = None,
) -> Inference:
    """A checkpoint ready to sample. A LoRA checkpoint loads its base (the recorded one, or
    ``base``: it must have the recorded fingerprint) plus the adapter at ``lora_scale``."""
    path = resolve_checkpoint(checkpoint)
    require_full_layout(listed_files(path))  # before any model is built
    cfg = read_config(path)
    record = read_adapter_record(path, read_trainer_state(path))
    if record is not None and base is None and not Path(record.base.path).exists():
        raise CheckpointError(
            f"the base model {record.base.path} that LoRA checkpoint {path} was trained on is "
            "gone; pass --base=PATH to where it is now (its fingerprint is checked)"
        )
    base_identity = identify_base(base or record.base.path) if record else None
    if record is not None:  # before any model is built: a wrong base costs one line, fast
        check_same_base(record.base, base_identity, f"LoRA checkpoint {path}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = build_models(cfg, device)
    if record is not None:
        load_weights(models.transformer, base_identity.path)
        add_lora(models.transformer, cfg.lora)
        set_lora_scale(models.transformer, lora_scale)
    # one error line if they misfit
    load_transformer_weights(path, models.transformer, ema=ema, adapter_only=record is not None)
    models.transformer.eval()
    null = read_null_embedding(path, models.text_encoder)
    check_matches_checkpoint(
        NullEmbedding(null.embeds, null.mask, models.text_encoder.provenance(), "current encoder"),
        null.provenance,
        allow_encoder_change,
    )
    null = null.to(device, models.text_encoder.dtype)
    log.info(
        "loaded %s weights from %s%s", "EMA" if ema else "model", path,
        f" on base {base_identity.path} (LoRA scale {lora_scale})" if record else "",
    )  # fmt: skip
    return Inference(cfg, path, models, null, CaptionEncoder(models.text_encoder), device)


def check_request(num_prompts: int, per_prompt: int, image_size: int | None = None) -> None:
    """Refuse a grid too large to hold (checked before any sampling)."""
    total = num_prompts * per_prompt
    if total <= 0:
        raise SanakitError("nothing to sample: give at least one prompt and one image")
    if total > MAX_IMAGES:
        raise SanakitError(
            f"{num_prompts} prompt(s) x --num_images={per_prompt} is {total} images; "
            f"sample at most {MAX_IMAGES} per call"
        )
    if image_size is not None:
        pixels = (num_prompts * (image_size + GAP) - GAP) * (per_prompt * (image_size + GAP) - GAP)
        if pixels > MAX_GRID_PIXELS:
            raise SanakitError(
                f"a grid of {num_prompts} x {per_prompt} images of {image_size} px is "
                f"{pixels / 1e6:.0f} megapixels (at most {MAX_GRID_PIXELS / 1e6:.0f}); ask for "
                "fewer --num_images or prompts"
            )


def sample_grid(
    inf: Inference,
    prompts: list[str],
    per_prompt: int,
    *,
    cfg_scale: float,
    steps: int,
    sampler: str,
    seed: int,
    batch_size: int = MAX_BATCH,
) -> np.ndarray:
    """One uint8 [H', W', 3] grid: a row per prompt of ``per_prompt`` images, 2 px gaps.

    Image i (prompt-major) is denoised from row i of ONE noise draw seeded by ``seed``, whatever
    the batching: a request of at most ``batch_size`` images is one model call (the bytes of
    earlier versions), a larger one runs consecutive slices of that draw. Each slice goes into
    the uint8 grid as it finishes, so peak memory is the grid plus one batch.
    """
    check_request(len(prompts), per_prompt, inf.cfg.model.image_size)
    batch = [p for p in prompts for _ in range(per_prompt)]
    inf.encode_prompts(list(dict.fromkeys(batch)))  # every prompt in one encoder call
    shape = latent_shape(inf.cfg, inf.models.autoencoder)
    noise = torch.randn((len(batch), *shape), generator=torch.Generator().manual_seed(seed))
    gap_value = to_uint8_grid(torch.zeros(1, 3, 1, 1), 1)[0, 0, 0].item()
    grid: np.ndarray | None = None
    for start in range(0, len(batch), batch_size):
        images = inf.generate(
            batch[start : start + batch_size],
            cfg_scale=cfg_scale,
            steps=steps,
            sampler=sampler,
            seed=seed,
            noise=noise[start : start + batch_size],
        )
        for k, image in enumerate(images):
            tile = to_uint8_grid(image[None], 1).numpy()
            h, w = tile.shape[:2]
            if grid is None:
                size = (len(prompts) * (h + GAP) - GAP, per_prompt * (w + GAP) - GAP, 3)
                grid = np.full(size, gap_value, dtype=np.uint8)
            row, col = divmod(start + k, per_prompt)
            grid[row * (h + GAP) : row * (h + GAP) + h, col * (w + GAP) : col * (w + GAP) + w] = (
                tile
            )
    return grid  # type: ignore[return-value]  # check_request: at least one image
