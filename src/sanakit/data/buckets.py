"""Aspect-ratio buckets (``model.multi_scale=true``) and the resumable batch sampler.

A bucket table maps a ratio key (``"0.5"`` = height/width) to a ``(height, width)`` of roughly
``base_size**2`` pixels. Sana's own tables (as shipped by diffusers' Sana pipeline) are used for
the sizes they exist for; any other base size scales the 512 table and rounds every side to a
multiple of ``multiple`` (the latent stride times the patch size, 32 by default).

How an index gets its bucket size: :meth:`BucketBatchSampler.from_dataset` reads the dataset's
``image_sizes()``, assigns every index the closest-ratio bucket once, and hands the per-index
``(height, width)`` list to ``dataset.set_target_sizes``; ``dataset[i]`` then resizes and crops
to that size. The assignment never changes between epochs, so it is set once, before the
DataLoader creates its iterator (workers copy the dataset at that moment). The sampler itself
still yields plain lists of ``int`` indices.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from sanakit.errors import CheckpointError, ConfigError

BucketTable = dict[str, tuple[int, int]]


def _sana_tables() -> dict[int, Mapping[str, Sequence[float]]]:
    """Sana's ratio tables by base size, imported from diffusers (never retyped here)."""
    from diffusers.pipelines.sana import pipeline_sana as sana

    tables = {512: sana.ASPECT_RATIO_512_BIN, 1024: sana.ASPECT_RATIO_1024_BIN}
    # Larger tables exist in newer diffusers releases; use them when present.
    for size in (2048, 4096):
        table = getattr(sana, f"ASPECT_RATIO_{size}_BIN", None)
        if table is not None:
            tables[size] = table
    return tables


def bucket_table(base_size: int, multiple: int = 32) -> BucketTable:
    """The ``{ratio_key: (height, width)}`` bucket table for ``base_size``.

    Uses Sana's table for ``base_size`` when one exists and all its sides are multiples of
    ``multiple``; otherwise scales the 512 table by ``base_size / 512``, rounds each side to the
    nearest multiple of ``multiple`` (at least ``multiple``), keys each bucket by its rounded size's
    ratio, and merges buckets that collapse together, so small base sizes give fewer buckets.
    """
    if base_size < 1 or multiple < 1:
        raise ConfigError(
            f"bucket base size {base_size} and multiple {multiple} must be positive; "
            f"fix model.image_size"
        )
    tables = _sana_tables()
    exact = tables.get(base_size)
    if exact is not None and all(int(v) % multiple == 0 for hw in exact.values() for v in hw):
        return {key: (int(h), int(w)) for key, (h, w) in exact.items()}
    scale = base_size / 512
    out: BucketTable = {}
    for h, w in tables[512].values():
        # floor(x + 0.5): round half up, unlike round()'s banker's rounding.
        hw = (
            max(multiple, math.floor(h * scale / multiple + 0.5) * multiple),
            max(multiple, math.floor(w * scale / multiple + 0.5) * multiple),
        )
        # Re-key by the rounded size's real ratio; entries that collapse together merge.
        out.setdefault(str(round(hw[0] / hw[1], 2)), hw)
    return out


def assign_bucket(height: int, width: int, table: Mapping[str, Sequence[int]]) -> str:
    """Key of the bucket whose aspect ratio is closest to ``height / width``.

    Distance is measured in log-ratio, so 1:2 and 2:1 are equally far from 1:1; ties go to the
    first bucket in table order, which keeps the assignment deterministic.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target = math.log(height / width)
    return min(table, key=lambda k: abs(math.log(table[k][0] / table[k][1]) - target))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that never mix buckets; deterministic and resumable.

    Each epoch, with a generator seeded from ``(seed, epoch)``: shuffle the indices of every
    bucket, cut them into batches of ``batch_size``, shuffle the batch order, then rank ``r``
    of ``world_size`` takes batches ``r, r + world_size, ...``. Every index is thus seen once
    per epoch over all ranks. Without ``drop_last`` a bucket's last batch may be short and ranks
    may differ by one batch; with ``drop_last`` short batches are dropped and the batch list is
    cut to a multiple of ``world_size`` so all ranks run the same number of steps.

    Resume: :meth:`state_dict` is ``{"epoch", "batches_done"}`` for this rank; after
    :meth:`load_state_dict` iteration continues with the next unseen batch, without touching the
    dataset for the skipped ones. ``batches_done`` counts batches *yielded*; a DataLoader with
    workers prefetches ahead of the training loop, so pass the number of batches the loop has
    actually consumed this epoch to ``state_dict(batches_done=...)`` in that case.

    ``bucket_keys[i]`` is index ``i``'s bucket (any hashable; all equal = plain shuffling).
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}; fix train batch size")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.bucket_keys: list[Hashable] = list(bucket_keys)
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(self.bucket_keys):
            groups.setdefault(key, []).append(index)
        # Sorted by the key's text so the order never depends on dataset iteration quirks.
        self._groups: list[tuple[Hashable, np.ndarray]] = [
            (k, np.asarray(groups[k], dtype=np.int64)) for k in sorted(groups, key=str)
        ]
        self.target_sizes: list[tuple[int, int]] | None = None
        self.epoch = 0
        self.batches_done = 0
        self._cached: tuple[int, list[list[int]]] | None = None  # (epoch, that epoch's batches)

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        batch_size: int,
        *,
        table: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> BucketBatchSampler:
        """Sampler over ``dataset``; with a ``table``, also sets the dataset's target sizes.

        With ``table=None`` every index is in one bucket (plain seeded shuffling) and the
        dataset keeps its square size. With a table the dataset must provide
        ``image_sizes()`` and ``set_target_sizes()`` (all on-disk formats do).
        """
        if table is None:
            return cls(
                [None] * len(dataset),
                batch_size,
                seed=seed,
                rank=rank,
                world_size=world_size,
                drop_last=drop_last,
            )
        if not (hasattr(dataset, "image_sizes") and hasattr(dataset, "set_target_sizes")):
            raise ConfigError(
                f"{type(dataset).__name__} has no per-image sizes, so it cannot use aspect-ratio "
                f"buckets; set model.multi_scale=false"
            )
        keys = [assign_bucket(h, w, table) for h, w in dataset.image_sizes()]
        sampler = cls(
            keys, batch_size, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
        )
        sizes = [(int(table[k][0]), int(table[k][1])) for k in keys]
        sampler.target_sizes = sizes
        dataset.set_target_sizes(sizes)
        return sampler

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` in order (rank ``r`` takes ``[r::world_size]``)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[list[int]] = []
        for _, indices in self._groups:
            perm = indices[rng.permutation(len(indices))]
            for start in range(0, len(perm), self.batch_size):
                batch = perm[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch.tolist())
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        # Cached per epoch: __len__ and __iter__ are both called every epoch by DataLoader.
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (
                self.epoch,
                self.epoch_batches(self.epoch)[self.rank :: self.world_size],
            )
        return self._cached[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; moving to a different epoch restarts it from its first batch.

        Setting the epoch that is already current keeps ``batches_done``, so the usual
        ``sampler.set_epoch(epoch)`` at the top of the loop is safe right after a resume.
        """
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        while self.batches_done < len(batches):
            batch = batches[self.batches_done]
            self.batches_done += 1
            yield batch

    def __len__(self) -> int:
        """Number of batches this rank gets in a full epoch."""
        return len(self._rank_batches())

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """``{"epoch", "batches_done"}``; ``batches_done`` overrides the yielded-batch count."""
        done = self.batches_done if batches_done is None else int(batches_done)
        return {"epoch": self.epoch, "batches_done": done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next batch yielded is the first one not yet done."""
        try:
            epoch, done = int(state["epoch"]), int(state["batches_done"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"bad sampler state {dict(state)!r}: needs integer epoch and batches_done; "
                f"the checkpoint is damaged, resume from another one"
            ) from err
        if epoch < 0 or done < 0:
            raise CheckpointError(
                f"bad sampler state {dict(state)!r}: values must be >= 0; resume from another "
                f"checkpoint"
            )
        self.epoch, self.batches_done = epoch, done
