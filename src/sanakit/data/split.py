"""Held-out samples: a seeded split of the dataset (``data.val_split``) or a folder of its own
(``data.val_dir``), never seen by training.

The split depends only on the dataset's length and the run's seed, so a resumed run holds out
exactly the same samples. Held-out samples are served without random flips, so every
evaluation sees the same pixels.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch.utils.data import Dataset, Subset

from sanakit.config import Config
from sanakit.data.dataset import index_dataset, set_epoch, target_size
from sanakit.errors import DataError


class Part(Subset):
    """Some samples of a dataset by index, keeping what the loop asks of a dataset: each
    sample's target size, the skip counts, and the epoch that seeds random flips."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], image_size: int) -> None:
        super().__init__(dataset, list(indices))
        self.image_size = image_size
        self.skips = getattr(dataset, "skips", None)

    def target_size_for(self, index: int) -> tuple[int, int]:
        return target_size(self.dataset, self.indices[index], self.image_size)

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self.dataset, epoch)


@dataclass
class Split:
    train: Dataset
    groups: list[Hashable] | None  # aspect-ratio bucket of each training sample
    heldout: Dataset | None  # None: no held-out loss


def heldout_count(val_split: float, total: int) -> int:
    """How many of ``total`` samples ``data.val_split`` holds out: a fraction or a count."""
    if val_split <= 0:
        return 0
    count = max(1, round(val_split * total)) if val_split < 1 else int(val_split)
    if count >= total:
        raise DataError(
            f"data.val_split={val_split:g} holds out {count} of {total} samples and leaves none "
            "to train on; use a fraction below 1 or a smaller count"
        )
    return count


def heldout_indices(val_split: float, total: int, seed: int) -> list[int]:
    """The held-out indices, sorted: the same for the same (fraction or count, length, seed)."""
    count = heldout_count(val_split, total)
    # a string seed goes through SHA-512 in random.Random: stable across runs and platforms
    return sorted(random.Random(f"heldout:{seed}").sample(range(total), count))


def without_flips(dataset: Dataset) -> Dataset:
    """A copy of the dataset (under any Subsets) whose samples are never flipped."""
    if isinstance(dataset, Subset):
        outer = copy.copy(dataset)
        outer.dataset = without_flips(dataset.dataset)
        return outer
    if getattr(dataset, "random_flip", False):
        dataset = copy.copy(dataset)
        dataset.random_flip = False  # type: ignore[attr-defined]
    return dataset


def split_heldout(cfg: Config, dataset: Dataset, groups: list[Hashable] | None) -> Split:
    """Training samples (and their buckets) and the held-out set the config asks for."""
    data, size = cfg.data, cfg.model.image_size
    if data.val_dir:
        val_cfg = replace(data, data_dir=[data.val_dir], val_dir="", val_split=0.0)
        try:
            heldout = index_dataset(val_cfg, size, cfg.seed)
        except DataError as err:
            raise DataError(f"data.val_dir: {err}") from None
        return Split(dataset, groups, without_flips(heldout))
    held = heldout_indices(data.val_split, len(dataset), cfg.seed)
    if not held:
        return Split(dataset, groups, None)
    out = set(held)
    kept = [i for i in range(len(dataset)) if i not in out]
    kept_groups = [groups[i] for i in kept] if groups is not None else None
    return Split(Part(dataset, kept, size), kept_groups, Part(without_flips(dataset), held, size))


def describe(split: Split) -> str:
    """One log line: how many samples train and how many are held out."""
    held: Any = split.heldout
    return f"{len(split.train)} training samples, {len(held) if held is not None else 0} held out"
