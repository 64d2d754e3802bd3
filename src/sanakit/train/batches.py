"""This rank's share of each global batch, with the global batch's randomness.

Every rank draws the sigmas, noise and caption-dropout draws of the WHOLE global batch from the
run's generator and keeps the positions it owns (``rank::world_size``), so N ranks see exactly
the (sample, sigma, noise, dropout) that one process would. A sample that cannot be read is
dropped together with its draws; a rank left with nothing still takes part in the gradient
all-reduce through a zero-weight stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from sanakit.config import Config
from sanakit.data.dataset import set_epoch, target_size
from sanakit.data.sampler import ResumableSampler
from sanakit.embeddings.loader import loader_workers, through_caches
from sanakit.flow import sample_sigmas
from sanakit.train.components import Parts
from sanakit.train.timers import Timers


@dataclass
class MicroBatch:
    """What one forward/backward consumes on this rank."""

    pixels: torch.Tensor
    captions: list[str]
    sigmas: torch.Tensor
    noise: torch.Tensor  # on the training device
    drop_draws: torch.Tensor  # caption dropout: dropped where draw < class_dropout_prob
    weight: float = 1.0  # 0.0 for a stand-in that only joins the all-reduce
    found_text: list | None = None  # caption embeddings a loader worker read from the cache


@dataclass
class GlobalDraws:
    sigmas: torch.Tensor
    noise: torch.Tensor
    drop_draws: torch.Tensor

    def share(self, positions: torch.Tensor | None, device: torch.device) -> GlobalDraws:
        """The draws at ``positions`` (None: all of them), noise on ``device``."""
        # non_blocking: a blocking host-to-GPU copy waits for the queued work (a sync per step)
        if positions is None:
            noise = self.noise.to(device, non_blocking=True)
            return GlobalDraws(self.sigmas, noise, self.drop_draws)
        noise = self.noise[positions].to(device, non_blocking=True)
        return GlobalDraws(self.sigmas[positions], noise, self.drop_draws[positions])


def draw_global(
    cfg: Config, generator: torch.Generator, size: int, latent: tuple[int, int, int]
) -> GlobalDraws:
    """Sigmas, noise and dropout draws for a whole global batch, in a fixed order."""
    s = cfg.scheduler
    sigmas = sample_sigmas(
        size, s.weighting_scheme, generator, s.logit_mean, s.logit_std, s.flow_shift
    )
    noise = torch.randn((size, *latent), generator=generator)
    return GlobalDraws(sigmas, noise, torch.rand(size, generator=generator))


class EpochBatches:
    """Iterate the rest of the current epoch as this rank's micro-batches.

    The sampler's position advances as each batch is handed out (prefetching workers never
    move it), so a checkpoint taken after any step resumes at exactly the next batch.
    ``bad`` counts the samples that could not be read this epoch.
    """

    def __init__(self, cfg: Config, parts: Parts, device: torch.device, timers: Timers) -> None:
        self.cfg, self.dataset, self.device, self.timers = cfg, parts.dataset, device, timers
        self.sampler: ResumableSampler = parts.state.sampler
        self.generator: torch.Generator = parts.state.generator
        self.latent_channels = parts.latent_shape[0]
        self.factor: int = parts.autoencoder.downsample_factor
        self.bad = 0
        self.encoders = parts.encoders

    def _loader(self) -> DataLoader:
        """Cache lookups run in the workers for file datasets; pinned batches on CUDA."""
        enc = self.encoders
        dataset, collate_fn = through_caches(self.dataset, enc.latents, enc.sources, enc.captions)
        return DataLoader(
            dataset,
            batch_sampler=self.sampler,  # yields this rank's share of each global batch
            collate_fn=collate_fn,
            num_workers=loader_workers(self.cfg),
            pin_memory=self.device.type == "cuda",
        )

    def __iter__(self) -> Iterator[MicroBatch]:
        sampler, image_size = self.sampler, self.cfg.model.image_size
        set_epoch(self.dataset, sampler.epoch)  # random flips are seeded by (seed, epoch, index)
        sizes = [
            (len(g), target_size(self.dataset, g[0], image_size)) for g in sampler.global_batches()
        ]
        loader = iter(self._loader())
        for global_size, (h, w) in sizes:
            self.timers.restart()
            batch = next(loader)
            latent = (self.latent_channels, h // self.factor, w // self.factor)
            draws = draw_global(self.cfg, self.generator, global_size, latent)
            sampler.advance()
            micro = self._mine(batch, draws, global_size, latent)
            self.timers.lap("data")
            if micro is not None:
                yield micro

    def _mine(
        self, batch: dict | None, draws: GlobalDraws, global_size: int, latent: tuple
    ) -> MicroBatch | None:
        positions = torch.arange(self.sampler.rank, global_size, self.sampler.world_size)
        if batch is None:  # nothing of this rank's share was readable
            self.bad += len(positions)
            return self._stand_in(latent) if self.sampler.world_size > 1 else None
        self.bad += batch["num_bad"]
        if len(batch["kept"]) == global_size:  # one process, every sample read: all of it
            mine = draws.share(None, self.device)
        else:
            positions = positions[torch.as_tensor(batch["kept"], dtype=torch.long)]
            mine = draws.share(positions, self.device)
        return MicroBatch(
            batch["pixels"], batch["captions"], mine.sigmas, mine.noise, mine.drop_draws,
            found_text=batch.get("found_text"),
        )  # fmt: skip

    def _stand_in(self, latent: tuple[int, int, int]) -> MicroBatch:
        # the other ranks all-reduce this micro-batch's gradients: take part with a zero-weight
        # blank sample, or they would wait for this rank forever
        _, h, w = latent
        return MicroBatch(
            pixels=torch.zeros(1, 3, h * self.factor, w * self.factor),
            captions=[""],
            sigmas=torch.full((1,), 0.5),
            noise=torch.zeros(1, *latent, device=self.device),
            drop_draws=torch.ones(1),
            weight=0.0,
        )
