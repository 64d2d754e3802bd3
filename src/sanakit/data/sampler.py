"""One deterministic, resumable sampler: a seeded order per epoch plus a position.

Each epoch is a fixed list of *global* batches (``batch_size * world_size`` samples each); rank r
takes positions r, r+W, ... of every global batch, so every sample is seen exactly once per epoch
across ranks. The saved position is the number of global batches consumed, so a run killed
mid-epoch continues with exactly the next batch (nothing replayed), and a resume with another
world size but the same global batch re-shards exactly.

With ``groups`` (aspect-ratio buckets) a global batch never mixes groups: each group's samples
are chunked separately and the chunks' order is shuffled.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch


class ResumableSampler:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        groups: Sequence[Hashable] | None = None,
    ) -> None:
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f"{len(groups)} group labels for {num_samples} samples")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.groups = list(groups) if groups is not None else None
        self.epoch = 0
        self.batches_done = 0  # global batches consumed in this epoch
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def _chunks(self, order: list[int]) -> list[list[int]]:
        # a trailing chunk smaller than the world size cannot feed every rank: dropped
        out = [order[i : i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        return [c for c in out if len(c) >= self.world_size]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of ``epoch``, in order (cached per epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        order = self.permutation(epoch).tolist()
        if self.groups is None:
            batches = self._chunks(order)
        else:
            by_group: dict[Hashable, list[int]] = {}
            for index in order:
                by_group.setdefault(self.groups[index], []).append(index)
            batches = [c for key in sorted(by_group, key=str) for c in self._chunks(by_group[key])]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7_919)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._cache = (epoch, batches)
        return batches

    def __len__(self) -> int:
        """Global batches per epoch."""
        return len(self.epoch_batches(self.epoch))

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_samples - sum(len(b) for b in self.epoch_batches(self.epoch))

    def global_batches(self) -> Iterator[list[int]]:
        """Every rank's samples of each remaining global batch of this epoch."""
        yield from self.epoch_batches(self.epoch)[self.batches_done :]

    def batches(self) -> Iterator[list[int]]:
        """This rank's share of each remaining global batch."""
        for global_indices in self.global_batches():
            yield global_indices[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches()

    def advance(self) -> None:
        """Record that one global batch was consumed (called by the loop, not by the iterator,
        so prefetching workers never move the saved position)."""
        self.batches_done = min(self.batches_done + 1, len(self))

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "grouped": self.groups is not None,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, now in (
            ("num_samples", self.num_samples),
            ("global_batch", self.global_batch),
            ("grouped", self.groups is not None),
        ):
            if key in state and state[key] != now:
                name = {"num_samples": "dataset size", "grouped": "model.multi_scale"}.get(
                    key, "global batch"
                )
                raise ValueError(f"{name} changed from {state[key]} to {now}")
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.seed = int(state["seed"])
