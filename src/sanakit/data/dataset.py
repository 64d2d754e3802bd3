"""The training dataset: build it from the config, serve samples, batch them.

Every format is indexed once, up front, into a flat list of :class:`Record` (see
:mod:`sanakit.data.formats`); image decoding is lazy. A sample whose bytes turn out to be corrupt
makes ``__getitem__`` return ``None``, and :func:`collate` drops it and reports which positions
survived.

Sample contract: ``dataset[i]`` is ``{"pixels": FloatTensor[3, H, W] in [-1, 1], "caption": str,
"id": str}`` or ``None`` for an unreadable image.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch.utils.data import Dataset, Subset

from sanakit.config import Config, DataConfig
from sanakit.data.buckets import assign_buckets, bucket_table
from sanakit.data.formats import FORMAT_HINTS, INDEXERS
from sanakit.data.images import IMAGE_ERRORS, load_image, read_image_size
from sanakit.data.records import Record, SkipCounter
from sanakit.data.shapes import ShapesDataset
from sanakit.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "CaptionedImageDataset",
    "Record",
    "SkipCounter",
    "build_dataset",
    "collate",
    "index_dataset",
    "set_epoch",
    "target_size",
]


class CaptionedImageDataset(Dataset):
    """Map-style dataset over indexed :class:`Record` s, decoding images lazily.

    Target size: every sample is resized and center-cropped to ``(image_size, image_size)``
    unless :meth:`set_target_sizes` gave a per-index ``(height, width)`` -- that is how aspect
    ratio buckets (:mod:`sanakit.data.buckets`) pass each index its bucket's size. Set it before
    a DataLoader creates its iterator: workers get a copy of the dataset at that moment.

    Flip: with ``random_flip`` each index is flipped by a coin seeded from
    ``(seed, epoch, index)``, so a resumed run flips exactly like the original one. Call
    :meth:`set_epoch` at every epoch start (before creating the iterator when workers are not
    persistent; persistent workers keep the epoch they were started with).
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        image_size: int,
        seed: int = 0,
        random_flip: bool = False,
        format: str = "",
        roots: Sequence[str] = (),
        skips: SkipCounter | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.records: list[Record] = list(records)
        self.image_size = image_size
        self.seed = seed
        self.random_flip = random_flip
        self.format = format
        self.roots: list[str] = list(roots)
        self.skips: SkipCounter = skips if skips is not None else SkipCounter()
        self.epoch = 0
        self._target_sizes: list[tuple[int, int]] | None = None
        self._image_sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flip decisions ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def flip_for(self, index: int) -> bool:
        """Whether ``index`` is flipped in the current epoch (always False without random_flip)."""
        if not self.random_flip:
            return False
        # String seeds go through SHA-512 in random.Random: stable across runs and platforms,
        # unlike hash(), and independent per (seed, epoch, index).
        return random.Random(f"flip:{self.seed}:{self.epoch}:{index}").random() < 0.5

    def set_target_sizes(self, sizes: Sequence[tuple[int, int]] | None) -> None:
        """Per-index ``(height, width)`` to resize/crop to, or None for the square default."""
        if sizes is not None and len(sizes) != len(self.records):
            raise ValueError(f"got {len(sizes)} target sizes for {len(self.records)} samples")
        self._target_sizes = None if sizes is None else [(int(h), int(w)) for h, w in sizes]

    def target_size_for(self, index: int) -> tuple[int, int]:
        """The ``(height, width)`` sample ``index`` is resized and cropped to."""
        if self._target_sizes is None:
            return (self.image_size, self.image_size)
        return self._target_sizes[index]

    def _header_size(self, rec: Record) -> tuple[int, int]:
        try:
            with rec.open() as source:
                return read_image_size(source)
        except IMAGE_ERRORS:
            return (self.image_size, self.image_size)

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image, read from headers once and cached.

        An unreadable header reports the square target size: the sample lands in the square
        bucket and is dropped at load time like any other corrupt image.
        """
        if self._image_sizes is None:
            self._image_sizes = [self._header_size(rec) for rec in self.records]
        return list(self._image_sizes)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        if index < 0:
            index += len(self.records)
        rec = self.records[index]
        height, width = self.target_size_for(index)
        try:
            with rec.open() as source:
                pixels = load_image(source, height, width, flip=self.flip_for(index))
        except IMAGE_ERRORS as err:
            logger.warning("dropping unreadable image %s (%s): %s", rec.id, rec.path, err)
            return None
        return {"pixels": pixels, "caption": rec.caption, "id": rec.id}

    def __repr__(self) -> str:
        return (
            f"CaptionedImageDataset(format={self.format!r}, samples={len(self)}, "
            f"roots={self.roots!r}, {self.skips.summary()})"
        )


class Batch(TypedDict):
    """What :func:`collate` returns for a batch with at least one readable sample."""

    pixels: torch.Tensor  # [B, 3, H, W], the readable samples only
    captions: list[str]
    ids: list[str]  # sample ids ("" for datasets without ids)
    kept: list[int]  # positions in the requested batch that were readable
    num_bad: int  # how many requested samples were unreadable


def collate(items: Sequence[dict[str, Any] | None]) -> Batch | None:
    """Stack the readable samples and remember which positions survived (for noise alignment).

    Returns None when no sample of the batch was readable.
    """
    kept = [i for i, item in enumerate(items) if item is not None]
    if not kept:
        return None
    good = [items[i] for i in kept]
    return Batch(
        pixels=torch.stack([s["pixels"] for s in good]),
        captions=[s["caption"] for s in good],
        ids=[str(s.get("id", "")) for s in good],
        kept=kept,
        num_bad=len(items) - len(kept),
    )


def _as_roots(data_dir: Any) -> list[Path]:
    """``data.data_dir`` as a list of paths (a single string is one root)."""
    if data_dir is None:
        return []
    if isinstance(data_dir, str | os.PathLike):
        data_dir = [data_dir]
    return [Path(os.fspath(d)).expanduser() for d in data_dir]


def _check_roots(kind: str, paths: list[Path]) -> None:
    if not paths:
        raise DataError(f'data.type={kind} needs data.data_dir; set --data.data_dir="[DIR1,DIR2]"')
    for path in paths:
        if not path.exists():
            raise DataError(
                f"data root {path} does not exist (data.type={kind}); fix data.data_dir"
            )
        if not path.is_dir() and not (kind == "webdataset" and path.suffix == ".tar"):
            raise DataError(
                f"data root {path} is not a directory (data.type={kind}); fix data.data_dir"
            )


def index_dataset(cfg_data: DataConfig, image_size: int, seed: int) -> Dataset:
    """The dataset described by the ``data`` config section, at square ``image_size``.

    Reads ``type``, ``data_dir``, ``caption_key`` (default ``"caption"``) and ``random_flip``.
    Raises :class:`DataError` for an unknown type, a missing root, or no usable samples; skipped
    samples are logged once as a summary and kept on ``dataset.skips``.
    """
    kind = getattr(cfg_data, "type", None)
    if kind == "shapes":
        exclude = tuple(getattr(cfg_data, "exclude_colors", None) or ())
        return ShapesDataset(image_size=image_size, seed=seed, exclude_colors=exclude)
    if kind not in INDEXERS:
        known = ", ".join(["shapes", *INDEXERS])
        raise DataError(f"unknown data.type {kind!r}; use one of {known}")
    paths = _as_roots(getattr(cfg_data, "data_dir", None))
    _check_roots(kind, paths)
    skips = SkipCounter()
    records = INDEXERS[kind](paths, skips, getattr(cfg_data, "caption_key", None) or "caption")
    if not records:
        raise DataError(
            f"no usable samples in {[str(p) for p in paths]} (data.type={kind}, "
            f"{skips.summary()}); {FORMAT_HINTS[kind]}"
        )
    if skips.total:
        logger.warning("data.type=%s: %s", kind, skips.summary())
    return CaptionedImageDataset(
        records,
        image_size=image_size,
        seed=seed,
        random_flip=bool(getattr(cfg_data, "random_flip", False)),
        format=kind,
        roots=[str(p) for p in paths],
        skips=skips,
    )


def build_dataset(cfg: Config, downsample_factor: int = 1) -> tuple[Dataset, list[str] | None]:
    """The training dataset and, with ``model.multi_scale``, each sample's bucket key.

    Buckets are assigned on the full dataset (it resizes each image to its bucket) before an
    optional ``data.max_samples`` cap; ``downsample_factor`` is the autoencoder's, so bucket
    sides stay multiples of factor x patch size.
    """
    dataset = index_dataset(cfg.data, cfg.model.image_size, cfg.seed)
    groups = None
    if cfg.model.multi_scale:
        multiple = max(32, downsample_factor * cfg.model.patch_size)
        groups = assign_buckets(dataset, bucket_table(cfg.model.image_size, multiple=multiple))
    if cfg.data.max_samples and cfg.data.max_samples < len(dataset):
        skips = getattr(dataset, "skips", None)
        full = dataset
        dataset = Subset(full, range(cfg.data.max_samples))
        dataset.skips = skips  # type: ignore[attr-defined]
        dataset.target_size_for = getattr(full, "target_size_for", None)  # type: ignore[attr-defined]
        groups = groups[: cfg.data.max_samples] if groups else None
    return dataset, groups


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell the dataset (or the one under any Subsets) which epoch it serves."""
    inner = dataset
    while not hasattr(inner, "set_epoch") and hasattr(inner, "dataset"):
        inner = inner.dataset
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def target_size(dataset: Dataset, index: int, default: int) -> tuple[int, int]:
    """The (height, width) a sample is resized to: its bucket's, or the square default."""
    sized = getattr(dataset, "target_size_for", None)
    return tuple(sized(index)) if callable(sized) else (default, default)  # type: ignore[return-value]
