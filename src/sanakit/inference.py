"""Load a trained checkpoint for sampling: the model, its encoders and its own null embedding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sanakit.config import Config
from sanakit.embeddings.captions import CaptionEncoder
from sanakit.io.checkpoint import resolve_checkpoint
from sanakit.models.text.null_embedding import NullEmbedding, check_matches_checkpoint
from sanakit.sampling import sample_latents
from sanakit.train.components import autocast_dtype, build_models, latent_shape
from sanakit.train.state import load_transformer_weights, read_config, read_null_embedding

log = logging.getLogger("sanakit")
MEMO_CAPACITY = 4096  # prompts kept by Inference.encode_prompts


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
) -> Inference:
    path = resolve_checkpoint(checkpoint)
    cfg = read_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = build_models(cfg, device)
    load_transformer_weights(path, models.transformer, ema=ema)  # one error line if they misfit
    models.transformer.eval()
    null = read_null_embedding(path, models.text_encoder)
    check_matches_checkpoint(
        NullEmbedding(null.embeds, null.mask, models.text_encoder.provenance(), "current encoder"),
        null.provenance,
        allow_encoder_change,
    )
    null = null.to(device, models.text_encoder.dtype)
    log.info("loaded %s weights from %s", "EMA" if ema else "model", path)
    return Inference(cfg, path, models, null, CaptionEncoder(models.text_encoder, cfg), device)
