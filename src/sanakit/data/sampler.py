"""A deterministic, resumable batch sampler: a seeded permutation per epoch plus a position.

Resuming never replays batches: the state is (epoch, samples consumed in that epoch), so a run
killed mid-epoch continues with exactly the next global batch. The position is counted in samples,
not batches, so it re-shards correctly when the world size changes with the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler:
    """Yields each rank's index list for every global batch of an epoch, from the saved position.

    Global batch ``g = batch_size * world_size``; rank r takes positions r, r+W, ... of each global
    batch, so every sample is seen exactly once per epoch across ranks. A final partial global batch
    is split the same way; a remainder smaller than the world size is dropped (it cannot feed every
    rank) and reported by ``dropped_per_epoch``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.samples_done = 0  # consumed in this epoch, counted across all ranks

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def usable_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full * self.global_batch + (rest if rest >= self.world_size else 0)

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_samples - self.usable_per_epoch

    def __len__(self) -> int:
        """Global batches per epoch."""
        return -(-self.usable_per_epoch // self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def batches(self) -> Iterator[list[int]]:
        """This rank's batches from the current position to the end of the epoch."""
        for global_indices in self.global_batches():
            yield global_indices[self.rank :: self.world_size]

    def global_batches(self) -> Iterator[list[int]]:
        """Every rank's samples of each remaining global batch (rank r owns positions r::W)."""
        order = self.permutation(self.epoch)
        start, end = self.samples_done, self.usable_per_epoch
        while start < end:
            stop = min(start + self.global_batch, end)
            yield order[start:stop].tolist()
            start = stop

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches()

    def advance(self) -> None:
        """Record that one global batch was consumed (called by the loop, not by the iterator,
        so prefetching workers never move the saved position)."""
        self.samples_done = min(self.samples_done + self.global_batch, self.usable_per_epoch)

    def epoch_finished(self) -> bool:
        return self.samples_done >= self.usable_per_epoch

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.samples_done = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "samples_done": self.samples_done,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"dataset size changed from {state['num_samples']} to {self.num_samples}"
            )
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"global batch changed from {state['global_batch']} to {self.global_batch}"
            )
        self.epoch = int(state["epoch"])
        self.samples_done = int(state["samples_done"])
        self.seed = int(state["seed"])
