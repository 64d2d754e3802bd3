"""`sanakit cache build|verify`: fill or check every entry a run's dataset needs.

Both take the parts (``CacheParts``) that :func:`open_caches` builds from a run's config: the
encoders and the dataset exactly as training builds them (same buckets, same
``data.max_samples`` cap), so the entries are the ones training will look up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from sanakit.config import Config
from sanakit.data.dataset import build_dataset
from sanakit.data.split import split_heldout
from sanakit.embeddings.captions import CaptionChunks, CaptionEncoder
from sanakit.embeddings.latents import LatentCache, pixel_variants
from sanakit.embeddings.loader import (
    EntryCheck,
    base_and_indices,
    dataset_captions,
    file_backed,
    loader_workers,
)
from sanakit.embeddings.sources import SourceIndex
from sanakit.embeddings.store import PROBLEMS, EntryStatus, Inspection, cache_root
from sanakit.embeddings.text import TextEmbeddingCache
from sanakit.embeddings.writer import flush_writes
from sanakit.errors import ArtifactError
from sanakit.io.atomic import remove_stale_temp_files
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text import build_text_encoder

_SHOW = 5  # paths listed per problem kind by verify


@dataclass
class CacheParts:
    """The caches of one run (sharing one root) and the dataset whose entries they hold."""

    text: TextEmbeddingCache
    latents: LatentCache
    dataset: Any  # the training dataset, resized into buckets as training does
    sources: SourceIndex  # file digests (latents of files are keyed by their bytes)
    num_workers: int = 0  # DataLoader workers decoding images
    heldout: Any = None  # a data.val_dir held-out set (files, never flipped), read by evaluation

    @property
    def root(self) -> Path:
        return self.text.root

    def of_heldout(self) -> CacheParts | None:
        """The same caches over the ``data.val_dir`` set (None without one)."""
        return None if self.heldout is None else replace(self, dataset=self.heldout, heldout=None)


@dataclass
class Section:
    """Counts for one cache (text or latents) in a build or verify report."""

    name: str
    skipped: str = ""
    total: int = 0
    counts: dict[EntryStatus, int] = field(default_factory=dict)
    examples: dict[EntryStatus, list[str]] = field(default_factory=dict)

    def add(self, status: EntryStatus, example: str = "") -> None:
        self.total += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        shown = self.examples.setdefault(status, [])
        if example and len(shown) < _SHOW:
            shown.append(example)

    def record(self, found: Inspection, what: str) -> None:
        """Count one inspected entry; problems keep its path (and reason) as an example."""
        if found.status is EntryStatus.VALID:
            example = ""
        elif found.status is EntryStatus.MISSING:
            example = f"{found.path} ({what})"
        else:
            example = f"{found.path} ({what}): {found.reason}"
        self.add(found.status, example)

    def problems(self) -> int:
        return sum(self.counts.get(k, 0) for k in PROBLEMS)


def _as_list(items: list) -> list:
    return items


def _loaded(dataset: Any, num_workers: int, desc: str, progress: bool) -> Iterator[Any]:
    """Every item of ``dataset`` through a DataLoader (``num_workers`` processes)."""
    loader = DataLoader(dataset, batch_size=16, collate_fn=_as_list, num_workers=num_workers)
    with tqdm(total=len(dataset), desc=desc, unit="sample", disable=not progress) as bar:
        for batch in loader:
            bar.update(len(batch))
            yield from batch


def _samples(dataset: Any, num_workers: int, need_pixels: bool) -> Iterator[dict | None]:
    """Every sample of the run's dataset; captions straight from the index when pixels are moot."""
    base, indices = base_and_indices(dataset)
    records = getattr(base, "records", None)
    if not need_pixels and records is not None:
        for i in indices:
            yield {"caption": records[i].caption, "id": records[i].id}
        return
    loader = DataLoader(dataset, batch_size=16, collate_fn=_as_list, num_workers=num_workers)
    for batch in loader:
        yield from batch


def _each_sample(parts: CacheParts, desc: str, progress: bool) -> Iterator[dict | None]:
    """The samples with a progress bar; None for a sample that could not be read."""
    need_pixels = not parts.latents.passthrough
    with tqdm(total=len(parts.dataset), desc=desc, unit="sample", disable=not progress) as bar:
        for item in _samples(parts.dataset, parts.num_workers, need_pixels):
            bar.update(1)
            yield item


def _flips(dataset: Any) -> bool:
    return bool(getattr(base_and_indices(dataset)[0], "random_flip", False))


def _remove_stale_temp_files(parts: CacheParts) -> int:
    dirs = (parts.text.dir, parts.latents.dir)
    return sum(
        len(remove_stale_temp_files(d))
        for sub in dirs
        if sub.is_dir()
        for d in sub.iterdir()
        if d.is_dir()
    )


def _build_text(parts: CacheParts, progress: bool) -> int:
    """Encode every missing caption as training would (file datasets: in the same fixed
    chunks; images made in memory: alone); returns how many distinct captions there are."""
    text = parts.text
    captions = dataset_captions(parts.dataset)
    if captions is None:
        seen = {i["caption"] for i in _each_sample(parts, "captions", progress) if i is not None}
        for caption in sorted(seen):
            text.get(caption)
        return len(seen)
    chunks = CaptionChunks(captions)
    found = CaptionEncoder(text.encoder, store=text, chunks=chunks).prefill(True, progress)
    text.stats.read += found[EntryStatus.VALID]
    text.stats.invalid += found[EntryStatus.CORRUPT] + found[EntryStatus.STALE]
    return len(chunks.ordered)


def _build_file_latents(parts: CacheParts, flips: bool, progress: bool) -> tuple[int, int]:
    """Every latent variant of a file dataset, checked in workers, built here; (images, bad)."""
    latents, images, unreadable = parts.latents, 0, 0
    check = EntryCheck(parts.dataset, latents, parts.sources, flips, decode=True)
    for item in _loaded(check, parts.num_workers, "cache build", progress):
        if item is None:
            unreadable += 1
            continue
        for k, (entry, found) in enumerate(zip(item["entries"], item["found"], strict=True)):
            images += 1
            if found.status is EntryStatus.VALID:
                latents.stats.read += 1
                continue
            latents.stats.invalid += found.status is not EntryStatus.MISSING
            pixels = torch.flip(item["pixels"], dims=[-1]) if k else item["pixels"]
            latents.store(*entry, {"latent": latents.encode_one(pixels)})
    return images, unreadable


def _build_memory_latents(parts: CacheParts, flips: bool, progress: bool) -> tuple[int, int]:
    """Latents of images made in memory (keyed by their pixels); (images, unreadable)."""
    images = unreadable = 0
    for item in _each_sample(parts, "cache build", progress):
        if item is None:
            unreadable += 1
            continue
        for pixels in pixel_variants(item["pixels"], flips):
            parts.latents.encode(pixels[None])
            images += 1
    return images, unreadable


def _build_heldout(parts: CacheParts, progress: bool) -> dict | None:
    """The ``data.val_dir`` set's entries, made the way evaluation reads them: captions outside
    the training chunks encoded alone, latents by file bytes, never flipped."""
    held = parts.of_heldout()
    if held is None:
        return None
    chunked = set(dataset_captions(parts.dataset) or ())
    alone = sorted(set(dataset_captions(held.dataset) or ()) - chunked)
    for caption in tqdm(alone, desc="held-out captions", disable=not progress):
        parts.text.get(caption)
    images, unreadable = 0, 0
    if not parts.latents.passthrough:
        images, unreadable = _build_file_latents(held, False, progress)
    return {"samples": len(held.dataset), "captions_alone": len(alone), "images": images,
            "unreadable": unreadable}  # fmt: skip


def build_caches(parts: CacheParts, progress: bool = True) -> dict:
    """Compute and write every missing or invalid caption embedding and latent of the dataset.

    The caches should be opened in ``readwrite`` mode whatever ``train.cache_mode`` says
    (building is the point). Returns a JSON-able summary.
    """
    started = time.perf_counter()
    text, latents = parts.text, parts.latents
    removed = _remove_stale_temp_files(parts)
    flips = _flips(parts.dataset)
    captions = _build_text(parts, progress)
    images = unreadable = 0
    if latents.passthrough:
        unreadable = sum(item is None for item in _each_sample(parts, "cache build", progress))
    elif file_backed(parts.dataset):
        images, unreadable = _build_file_latents(parts, flips, progress)
    else:
        images, unreadable = _build_memory_latents(parts, flips, progress)
    heldout = _build_heldout(parts, progress)
    failures = flush_writes()
    if failures:
        raise ArtifactError(
            f"{len(failures)} cache entries could not be written (first: {failures[0]}); "
            f"free space or fix permissions under {parts.root} and run it again"
        )
    return {
        "root": str(parts.root),
        "samples": len(parts.dataset),
        "unreadable": unreadable,
        "captions": captions,
        "text": vars(text.stats),
        "images": images,
        "latents": None if latents.passthrough else vars(latents.stats),
        "flip_variants": flips,
        "heldout": heldout,
        "stale_temp_files_removed": removed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _verify_latents(parts: CacheParts, section: Section, progress: bool) -> int:
    """Record every latent entry the dataset needs in ``section``; returns the unreadable."""
    latents, flips, unreadable = parts.latents, _flips(parts.dataset), 0
    if file_backed(parts.dataset):
        check = EntryCheck(parts.dataset, latents, parts.sources, flips, decode=False)
        for item in _loaded(check, parts.num_workers, "cache verify", progress):
            if item is None:
                unreadable += 1
                continue
            for found in item["found"]:
                section.record(found, f"sample {item['id']}")
        return unreadable
    for item in _each_sample(parts, "cache verify", progress):
        if item is None:
            unreadable += 1
            continue
        for pixels in pixel_variants(item["pixels"], flips):
            section.record(latents.inspect_pixels(pixels), f"sample {item['id']}")
    return unreadable


def verify_caches(parts: CacheParts, progress: bool = True) -> tuple[list[Section], int]:
    """Check every entry the dataset needs; returns per-cache sections and the unreadable count.

    Open the caches in ``read`` mode: verifying never writes.
    """
    text = parts.text
    text_section = Section("text embeddings")
    latent_section = Section("latents")
    captions = dataset_captions(parts.dataset)
    if captions is None:
        captions = [i["caption"] for i in _each_sample(parts, "captions", progress) if i]
    if parts.heldout is not None:
        captions = [*captions, *(dataset_captions(parts.heldout) or ())]
    for caption in sorted(set(captions)):
        text_section.record(text.inspect_caption(caption), f"caption {caption[:60]!r}")
    if parts.latents.passthrough:
        latent_section.skipped = "vae.type=pixel trains on pixels: no latent cache"
        unreadable = 0
    else:
        unreadable = _verify_latents(parts, latent_section, progress)
        held = parts.of_heldout()
        if held is not None:
            unreadable += _verify_latents(held, latent_section, progress)
    return [text_section, latent_section], unreadable


def _format_section(s: Section) -> list[str]:
    if s.skipped:
        return [f"{s.name}: skipped ({s.skipped})"]
    c = s.counts
    counts = ", ".join(f"{c.get(status, 0)} {status.value}" for status in EntryStatus)
    lines = [f"{s.name}: {s.total} needed, {counts}"]
    for status in PROBLEMS:
        shown = s.examples.get(status, [])
        lines.extend(f"  {status.value}: {example}" for example in shown)
        more = c.get(status, 0) - len(shown)
        if more > 0:
            lines.append(f"  ... and {more} more {status.value}")
    return lines


def format_verify(sections: list[Section], unreadable: int, root: Path) -> str:
    """The report `sanakit cache verify` prints."""
    lines = [f"cache {root}"]
    for s in sections:
        lines.extend(_format_section(s))
    if unreadable:
        lines.append(f"{unreadable} unreadable samples skipped (training drops them too)")
    bad = sum(s.problems() for s in sections)
    lines.append(
        "cache complete and valid"
        if not bad
        else f"cache incomplete: {bad} entries to (re)build; run `sanakit cache build` with the "
        f"same config"
    )
    return "\n".join(lines)


def open_caches(cfg: Config, mode: str) -> CacheParts:
    """The run's text and latent caches in ``mode`` (readwrite to build, read to verify)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as training does
    encoder = build_text_encoder(cfg.text_encoder, device)
    autoencoder = build_autoencoder(cfg.vae, device, torch.float32)
    dataset, groups = build_dataset(cfg, autoencoder.downsample_factor)  # buckets as training
    # a val_split set is part of `dataset`; a val_dir set is read by evaluation too
    heldout = split_heldout(cfg, dataset, groups).heldout if cfg.data.val_dir else None
    root = cache_root(cfg)
    return CacheParts(
        text=TextEmbeddingCache(root, encoder, mode),
        latents=LatentCache(root, autoencoder, mode),
        dataset=dataset,
        sources=SourceIndex(root, mode),
        num_workers=loader_workers(cfg),
        heldout=heldout,
    )
