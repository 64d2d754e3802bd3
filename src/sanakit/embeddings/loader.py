"""Cache lookups inside the DataLoader workers: a warm epoch decodes no image.

:class:`CachedSamples` wraps a file-backed dataset (``CaptionedImageDataset``, or a ``Subset``
of one). For each index a worker learns the file's digest from ``sources`` (a stat and a small
read while the file is unchanged), derives the latent entry from the header size, the bucket
size and the flip, and reads and checks (NaN/Inf, shapes, key) that entry and the caption's
text entry. Only a miss reads the image bytes and decodes them; the main process then encodes
the pixels and stores the latent (the autoencoder lives there, on the training device).
:func:`collate_cached` stacks what the workers found. :class:`EntryCheck` serves
``cache build|verify`` the same way, for every flip variant a run can ask for.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import Any, TypedDict

import torch
from torch.utils.data import Dataset

from sanakit.config import Config
from sanakit.data.dataset import collate
from sanakit.data.images import IMAGE_ERRORS, load_image, plan_crop
from sanakit.embeddings.captions import CaptionEncoder
from sanakit.embeddings.latents import Entry, ImageBatch, LatentCache
from sanakit.embeddings.sources import SourceIndex, read_bytes
from sanakit.embeddings.store import EntryStatus, Inspection

logger = logging.getLogger("sanakit.data.dataset")


def base_and_indices(dataset: Any) -> tuple[Any, list[int]]:
    """The underlying dataset and the indices a (nested) ``Subset`` exposes."""
    indices = list(range(len(dataset)))
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def file_backed(dataset: Any) -> bool:
    """Whether samples come from indexed files (records), not rendered in memory."""
    return getattr(base_and_indices(dataset)[0], "records", None) is not None


def dataset_captions(dataset: Any) -> list[str] | None:
    """Every caption of a file dataset, from its index (None for images made in memory)."""
    base, indices = base_and_indices(dataset)
    records = getattr(base, "records", None)
    return None if records is None else [records[j].caption for j in indices]


AUTO_WORKERS = 2  # enough to keep cache reads and cold decodes off the training process
CORES_KEPT = 2  # the training process's own threads; workers only pay beyond them


def loader_workers(cfg: Config) -> int:
    """``data.num_workers``, or when unset: 0 for the built-in shapes (rendered in-process in a
    few ms; a worker only adds start-up), else up to AUTO_WORKERS on the cores beyond
    CORES_KEPT. On 2 cores a worker took a core from the model: 0.63 of the bare loop's speed
    with one worker against 0.82 without (benchmarks/folder_bench.py, BENCHMARKS.md)."""
    if cfg.data.num_workers is not None:
        return int(cfg.data.num_workers)
    if cfg.data.type == "shapes":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(AUTO_WORKERS, (cores or 1) - CORES_KEPT))


class CachedSamples(Dataset):
    """``dataset[i]`` as a cached latent when the cache holds it, else decoded pixels; with
    ``text``, the caption's embedding when memory or the disk cache holds it."""

    def __init__(
        self,
        dataset: Any,
        latents: LatentCache,
        sources: SourceIndex,
        text: CaptionEncoder | None = None,
    ) -> None:
        self.base, self.indices = base_and_indices(dataset)
        self.latents, self.sources, self.text = latents, sources, text

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        j = self.indices[int(index)]
        rec = self.base.records[j]
        height, width = self.base.target_size_for(j)
        flip = self.base.flip_for(j)
        sample: dict[str, Any] = {"caption": rec.caption, "id": rec.id}
        if self.text is not None:
            sample["text"] = self.text.known(rec.caption)
        try:
            source, data = self.sources.identify(rec)
            plan = plan_crop(source.height, source.width, height, width)
            entry = self.latents.file_entry(source, plan, flip)
            hit = self.latents.lookup(*entry)
            if hit is not None:
                return {**sample, "latent": hit["latent"]}
            data = read_bytes(rec) if data is None else data
            pixels = load_image(io.BytesIO(data), height, width, flip=flip)
        except IMAGE_ERRORS as err:
            logger.warning("dropping unreadable image %s (%s): %s", rec.id, rec.path, err)
            return None
        return {**sample, "pixels": pixels, "entry": entry}


class CachedBatch(TypedDict):
    """What :func:`collate_cached` returns (the fields of ``data.dataset.Batch``, plus text)."""

    pixels: ImageBatch
    captions: list[str]
    ids: list[str]
    kept: list[int]
    num_bad: int
    found_text: list[tuple[torch.Tensor, torch.Tensor] | None]


def collate_cached(items: list[dict[str, Any] | None]) -> CachedBatch | None:
    """Stack what the workers found; keep the misses' pixels and entries for the main process."""
    kept = [i for i, item in enumerate(items) if item is not None]
    if not kept:
        return None
    good = [items[i] for i in kept]
    latents = [s.get("latent") for s in good]
    found = all(t is not None for t in latents) and len({t.shape for t in latents}) == 1
    images = ImageBatch(
        latents=latents,
        pixels=[s.get("pixels") for s in good],
        entries=[s.get("entry") for s in good],
        stacked=torch.stack(latents) if found else None,
    )
    return CachedBatch(
        pixels=images,
        captions=[s["caption"] for s in good],
        ids=[s["id"] for s in good],
        kept=kept,
        num_bad=len(items) - len(kept),
        found_text=[s.get("text") for s in good],
    )


def through_caches(
    dataset: Any, latents: LatentCache, sources: SourceIndex | None, text: CaptionEncoder
) -> tuple[Any, Callable[[list], Any]]:
    """How training and evaluation read ``dataset``, and the collate function for it: a file
    dataset through the caches (:class:`CachedSamples`: no decode once cached) when file
    digests are kept (``sources``), anything else as it is."""
    if sources is None or not file_backed(dataset):
        return dataset, collate
    return CachedSamples(dataset, latents, sources, text), collate_cached


class EntryCheck(Dataset):
    """For ``cache build|verify``: per sample, the latent entries a run may look up (both flips
    with ``random_flip``) inspected in a worker, and the unflipped pixels when one needs
    building (``decode``). None for an unreadable image."""

    def __init__(
        self, dataset: Any, latents: LatentCache, sources: SourceIndex, flips: bool, decode: bool
    ) -> None:
        self.base, self.indices = base_and_indices(dataset)
        self.latents, self.sources = latents, sources
        self.flips, self.decode = (False, True) if flips else (False,), decode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        j = self.indices[int(index)]
        rec = self.base.records[j]
        height, width = self.base.target_size_for(j)
        try:
            source, data = self.sources.identify(rec)
            plan = plan_crop(source.height, source.width, height, width)
            entries: list[Entry] = [self.latents.file_entry(source, plan, f) for f in self.flips]
            found: list[Inspection] = [self.latents.inspect(*e) for e in entries]
            pixels = None
            if self.decode and any(f.status is not EntryStatus.VALID for f in found):
                data = read_bytes(rec) if data is None else data
                pixels = load_image(io.BytesIO(data), height, width)
        except IMAGE_ERRORS as err:
            logger.warning("dropping unreadable image %s (%s): %s", rec.id, rec.path, err)
            return None
        return {"caption": rec.caption, "id": rec.id, "entries": entries, "found": found,
                "pixels": pixels}  # fmt: skip


def covered(dataset: Any, latents: LatentCache, sources: SourceIndex) -> bool:
    """Whether every latent the dataset can ask for is on disk (headers only; no decode).

    Files never seen (no remembered digest) count as not covered: hashing them here would read
    the whole dataset before step 1.
    """
    base, indices = base_and_indices(dataset)
    flips = (False, True) if getattr(base, "random_flip", False) else (False,)
    for j in indices:
        source = sources.find(base.records[j])
        if source is None:
            return False
        plan = plan_crop(source.height, source.width, *base.target_size_for(j))
        for flip in flips:
            path, key = latents.file_entry(source, plan, flip)
            if latents.probe(path, key) is not EntryStatus.VALID:
                return False
    return True
