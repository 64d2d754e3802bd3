"""What several checks need (models, dataset, resume target), built at most once per run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from sanakit.config import Config
from sanakit.data.dataset import build_dataset
from sanakit.doctor.check import Skipped
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text import build_text_encoder
from sanakit.models.transformer import build_transformer
from sanakit.train.resume import Resume, find_resume


class Probe:
    """Lazily built parts; a part that failed to build is remembered and reported once."""

    def __init__(self, cfg: Config, *, full: bool) -> None:
        self.cfg = cfg
        self.full = full  # doctor (deep verification, models loaded) vs the train preflight
        self._memo: dict[str, tuple[bool, Any]] = {}

    def _get(self, name: str, what: str, build: Callable[[], Any]) -> Any:
        if name not in self._memo:
            try:
                self._memo[name] = (True, build())
            except Exception as err:
                self._memo[name] = (False, err)
                raise
        ok, value = self._memo[name]
        if isinstance(value, Skipped):
            raise value  # name the root cause, not the part that needed it
        if not ok:
            raise Skipped(f"{what} is not available (see its line above)")
        return value

    @property
    def text_encoder(self) -> Any:
        return self._get(
            "text_encoder", "the text encoder", lambda: build_text_encoder(self.cfg.text_encoder)
        )

    @property
    def autoencoder(self) -> Any:
        return self._get(
            "autoencoder",
            "the autoencoder",
            lambda: build_autoencoder(self.cfg.vae, "cpu", torch.float32),
        )

    @property
    def dataset(self) -> Any:
        """The training dataset as train indexes it (same samples, same max_samples cap).

        Aspect-ratio buckets are not assigned: that reads every image header and changes
        neither the count nor which files decode.
        """
        flat = replace(self.cfg, model=replace(self.cfg.model, multi_scale=False))
        return self._get("dataset", "the dataset", lambda: build_dataset(flat)[0])

    @property
    def transformer(self) -> Any:
        """The configured transformer on the meta device: shapes and counts, no memory."""

        def build() -> Any:
            enc, ae = self.text_encoder, self.autoencoder
            with torch.device("meta"):
                return build_transformer(
                    self.cfg, ae.latent_channels, enc.hidden_size, ae.downsample_factor
                )

        return self._get("transformer", "the transformer", build)

    @property
    def resume(self) -> Resume:
        return self._get("resume", "the resume target", lambda: find_resume(self.cfg, self.full))
