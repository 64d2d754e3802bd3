"""Content-keyed caches of caption embeddings and latents, one artifact-store file per entry.

Layout under the cache root (``train.cache_dir``, default ``{work_dir}/cache``)::

    text/{h[:2]}/{h}.safetensors     h = sha256(caption, UTF-8); tensors embeds [L, D], mask [L]
    latents/{h[:2]}/{h}.safetensors  h = sha256(dtype, shape, bytes of the pixel tensor the
                                     autoencoder sees); tensor latent [C, H/f, W/f]

The file name says *what went in* (a caption, an exact pixel tensor); the provenance key in the
safetensors metadata adds *what it went through*: the text encoder's fingerprint, max length,
instruction hash and dtype, or the autoencoder's fingerprint, the image height x width and the
dtype. Hashing the decoded pixels covers image content, resize, crop and flip at once, so a
flipped or re-cropped image is simply another entry, and a cache never depends on the step or
the batch an entry was first seen in (diffusers #14430). An entry whose key differs (another
encoder, max length, autoencoder...) is *stale*; one that is empty, truncated, unreadable or
holds NaN/Inf is *corrupt*. Neither is ever used: the value is recomputed (and rewritten in
``readwrite`` mode) with one warning line.

Values are computed one caption / one image per encoder call, so a cached value is bit-identical
to a fresh one whatever batch it first arrived in, and a resumed run reproduces its losses.

Writes go through the artifact store's atomic, fsynced write on a small thread pool: a cold
epoch does not wait for fsync (~3 ms per file here), entries still in flight are served from
memory, and the pool drains before the process exits. No per-entry lock is taken: two ranks
writing the same entry each rename a complete file over it, and both hold the same value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sanakit.config import Config
from sanakit.errors import ArtifactError, ConfigError
from sanakit.io import artifacts
from sanakit.io.artifacts import Artifact, Invalid, Tensors, check_tensors, key_hash, load_valid
from sanakit.io.atomic import check_writable, remove_stale_temp_files

log = logging.getLogger("sanakit")

MODES = ("off", "read", "readwrite")
WARN_LIMIT = 10  # invalid entries warned one by one per cache; then one line says the rest
_STALE_PREFIX = "built for a different"  # how artifacts.load_valid words a key mismatch
_SHOW = 5  # paths listed per problem kind by verify


def cache_root(cfg: Config) -> Path:
    """Where the caches of this run live: ``train.cache_dir`` or ``{work_dir}/cache``."""
    return Path(cfg.train.cache_dir or Path(cfg.work_dir) / "cache")


# ----------------------------------------------------------------------------- writer


class _Writer:
    """Background atomic writes with a bound on what is in flight; pending entries readable."""

    def __init__(self, workers: int = 4, max_pending: int = 256) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[Path, tuple[str, Tensors]] = {}
        self._in_flight = 0
        self._slots = threading.BoundedSemaphore(max_pending)  # back-pressure on the loop
        self.failures: list[str] = []

    def submit(self, path: Path, key: dict, tensors: Tensors) -> None:
        self._slots.acquire()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sanakit-cache")
            self._pending[path] = (key_hash(key), tensors)
            self._in_flight += 1
            self._pool.submit(self._run, path, key, tensors)

    def _run(self, path: Path, key: dict, tensors: Tensors) -> None:
        try:
            artifacts._write(path, tensors, artifacts.make_provenance(key))
        except Exception as err:  # a cache write must never take training down
            with self._lock:
                self.failures.append(f"{path}: {err}")
                first = len(self.failures) == 1
            if first:
                log.warning(
                    "cannot write cache entry %s (%s); continuing, entries that fail to write "
                    "are recomputed when needed",
                    path,
                    err,
                )
        finally:
            with self._lock:
                if self._pending.get(path, (None, None))[1] is tensors:
                    del self._pending[path]
                self._in_flight -= 1
                self._idle.notify_all()
            self._slots.release()

    def pending(self, path: Path, key_sha: str) -> Tensors | None:
        with self._lock:
            entry = self._pending.get(path)
        return entry[1] if entry is not None and entry[0] == key_sha else None

    def flush(self) -> None:
        with self._lock:
            while self._in_flight:
                self._idle.wait()


_WRITER = _Writer()


def _reset_writer_in_child() -> None:
    # a forked DataLoader worker inherits the object but not the threads: start clean
    global _WRITER
    _WRITER = _Writer()


os.register_at_fork(after_in_child=_reset_writer_in_child)


def flush_writes() -> list[str]:
    """Wait until every queued cache write is on disk; returns the failures so far."""
    _WRITER.flush()
    return list(_WRITER.failures)


# ----------------------------------------------------------------------------- entries


@dataclass
class CacheStats:
    """What a cache did: entries read, computed, found invalid (stale/corrupt), queued to write."""

    read: int = 0
    computed: int = 0
    invalid: int = 0
    written: int = 0


class EntryCache:
    """Per-entry files under ``root/subdir`` read and written per ``mode`` (off|read|readwrite)."""

    what = "cache entry"
    subdir = "entries"

    def __init__(self, root: Path, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"train.cache_mode '{mode}' is not one of: {', '.join(MODES)}")
        self.root = Path(root)
        self.dir = self.root / self.subdir
        self.mode = mode
        self.stats = CacheStats()
        self._warned = 0
        if mode == "readwrite":
            reason = check_writable(self.dir)
            if reason:
                raise ArtifactError(
                    f"cannot use {self.dir} for the {self.what} cache: {reason}; set "
                    f"--train.cache_dir to a writable directory or --train.cache_mode=read"
                )

    def path_for_digest(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def validate(self, tensors: Tensors) -> str | None:
        """None if ``tensors`` have the names and ranks this cache stores (any settings)."""
        return None

    def fits(self, tensors: Tensors) -> str | None:
        """None if ``tensors`` have the exact shapes and dtypes of the current settings."""
        return None

    def _artifact(self, path: Path, key: dict) -> Artifact:
        return Artifact(path, key, build=_no_build, validate=self.validate, what=self.what)

    def _load(self, path: Path, key: dict) -> Tensors:
        # shapes are checked after the key: an entry of another max length is stale, not corrupt
        tensors = load_valid(self._artifact(path, key)).tensors
        reason = self.fits(tensors)
        if reason:
            raise Invalid(reason)
        return tensors

    def lookup(self, path: Path, key: dict) -> Tensors | None:
        """A valid entry (in flight or on disk) or None; an invalid one is warned about."""
        if self.mode == "off":
            return None
        pending = _WRITER.pending(path, key_hash(key))
        if pending is not None:
            self.stats.read += 1
            return pending
        try:
            tensors = self._load(path, key)
        except Invalid as bad:
            if str(bad) != "missing":
                self.stats.invalid += 1
                self._warn(path, str(bad))
            return None
        self.stats.read += 1
        return tensors

    def store(self, path: Path, key: dict, tensors: Tensors) -> None:
        """Queue a freshly computed entry for writing (readwrite mode only)."""
        if self.mode != "readwrite":
            return
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        reason = check_tensors(tensors) or self.validate(tensors) or self.fits(tensors)
        if reason:
            # used as computed (exactly what cache_mode=off would do) but never stored
            self._warn(path, f"freshly computed value is not cacheable ({reason})", fresh=True)
            return
        _WRITER.submit(path, key, tensors)
        self.stats.written += 1

    def inspect(self, path: Path, key: dict) -> tuple[str, str]:
        """``(status, reason)``: status is valid | missing | stale | corrupt."""
        try:
            self._load(path, key)
        except Invalid as bad:
            reason = str(bad)
            if reason == "missing":
                return "missing", reason
            return ("stale" if reason.startswith(_STALE_PREFIX) else "corrupt"), reason
        return "valid", ""

    def _warn(self, path: Path, reason: str, fresh: bool = False) -> None:
        self._warned += 1
        if self._warned > WARN_LIMIT + 1:
            return
        if self._warned == WARN_LIMIT + 1:
            log.warning(
                "more invalid %s entries in %s are not listed one by one; "
                "`sanakit cache verify` reports them all",
                self.what,
                self.dir,
            )
            return
        if fresh:
            log.warning("%s for %s: %s; not written", self.what, path, reason)
        elif self.mode == "readwrite":
            log.warning(
                "%s %s is invalid: %s; recomputing and rewriting it", self.what, path, reason
            )
        else:
            log.warning(
                "%s %s is invalid: %s; recomputing it (cache_mode=read: not rewritten)",
                self.what,
                path,
                reason,
            )


def _no_build() -> Tensors:  # entries are computed by the caches themselves, never by the store
    raise RuntimeError("cache entries are not built through Artifact.build")


# ----------------------------------------------------------------------------- text


class TextEmbeddingCache(EntryCache):
    """Caption -> ``(embeds [L, D], mask [L])`` of one text encoder, on disk.

    Misses are encoded one caption per call, exactly as ``CaptionEncoder``
    does without a cache, so cached and fresh values are the same bits.
    """

    what = "text-embedding cache"
    subdir = "text"

    def __init__(self, root: Path, encoder: Any, mode: str = "readwrite") -> None:
        super().__init__(root, mode)
        self.encoder = encoder
        provenance = dict(encoder.provenance())  # fingerprints hash weights: compute once
        provenance.pop("sanakit_version", None)  # a release does not change the embeddings
        self.identity = provenance
        self.shape = (int(encoder.max_length), int(encoder.hidden_size))
        self.dtype = encoder.dtype

    @classmethod
    def from_config(cls, cfg: Config, encoder: Any) -> TextEmbeddingCache | None:
        """The run's text cache, or None for ``train.cache_mode=off``."""
        mode = cfg.train.cache_mode
        return None if mode == "off" else cls(cache_root(cfg), encoder, mode)

    def key_for(self, caption: str) -> dict:
        return {"kind": "text-embedding", "caption": caption, **self.identity}

    def path_for(self, caption: str) -> Path:
        return self.path_for_digest(hashlib.sha256(caption.encode("utf-8")).hexdigest())

    def validate(self, tensors: Tensors) -> str | None:
        embeds, mask = tensors.get("embeds"), tensors.get("mask")
        if embeds is None or mask is None:
            return "embeds or mask missing"
        if embeds.dim() != 2 or mask.dim() != 1 or embeds.shape[0] != mask.shape[0]:
            return f"shapes {tuple(embeds.shape)}/{tuple(mask.shape)} are not [L, D]/[L]"
        return None

    def fits(self, tensors: Tensors) -> str | None:
        embeds, mask = tensors["embeds"], tensors["mask"]
        if tuple(embeds.shape) != self.shape or tuple(mask.shape) != self.shape[:1]:
            return f"shapes {tuple(embeds.shape)}/{tuple(mask.shape)}, expected {self.shape}"
        if embeds.dtype != self.dtype:
            return f"dtype {embeds.dtype}, expected {self.dtype}"
        return None

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [L, D], mask [L])`` on the encoder's device: from disk or computed."""
        path, key = self.path_for(caption), self.key_for(caption)
        hit = self.lookup(path, key)
        device = self.encoder.device
        if hit is not None:
            return hit["embeds"].to(device), hit["mask"].to(device)
        embeds, mask = self.encoder.encode([caption])
        self.stats.computed += 1
        self.store(path, key, {"embeds": embeds[0], "mask": mask[0]})
        return embeds[0], mask[0]

    def inspect_caption(self, caption: str) -> tuple[str, str, Path]:
        path = self.path_for(caption)
        return (*self.inspect(path, self.key_for(caption)), path)


# ----------------------------------------------------------------------------- latents


def pixel_digest(pixels: torch.Tensor) -> str:
    """sha256 of one image tensor: dtype, shape and raw bytes (24 us at 64 px, 1.5 ms at 512)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class LatentCache(EntryCache):
    """Pixels ``[B, 3, H, W]`` -> scaled latents, each image looked up or encoded on its own.

    With ``cache_mode=off`` images are still encoded one at a time, so switching the mode never
    changes a single bit of a run. The pixel "autoencoder" is an identity: nothing is cached.
    """

    what = "latent cache"
    subdir = "latents"

    def __init__(self, root: Path, autoencoder: Any, mode: str = "readwrite") -> None:
        self.autoencoder = autoencoder
        self.passthrough = getattr(autoencoder, "name", "") == "pixel"
        super().__init__(root, "off" if self.passthrough else mode)
        self.device = getattr(autoencoder, "device", torch.device("cpu"))
        self.dtype = getattr(autoencoder, "dtype", torch.float32)
        self.identity = {
            "autoencoder": autoencoder.name,
            "fingerprint": autoencoder.fingerprint(),  # hashes weights: compute once
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(cls, cfg: Config, autoencoder: Any) -> LatentCache:
        if getattr(autoencoder, "name", "") == "pixel":
            log.info("latent cache not used: vae.type=pixel trains on pixels, nothing to encode")
        return cls(cache_root(cfg), autoencoder, cfg.train.cache_mode)

    def key_for(self, digest: str, height: int, width: int) -> dict:
        return {
            "kind": "latent",
            "pixels_sha256": digest,
            "height": height,
            "width": width,
            **self.identity,
        }

    def validate(self, tensors: Tensors) -> str | None:
        latent = tensors.get("latent")
        if latent is None:
            return "latent missing"
        if latent.dim() != 3:
            return f"latent shape {tuple(latent.shape)} is not [C, h, w]"
        return None

    def fits(self, tensors: Tensors) -> str | None:
        latent = tensors["latent"]
        if latent.shape[0] != self.autoencoder.latent_channels:
            return f"latent shape {tuple(latent.shape)} does not fit the autoencoder"
        if latent.dtype != self.dtype:
            return f"dtype {latent.dtype}, expected {self.dtype}"
        return None

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` on the autoencoder's device."""
        if self.passthrough:
            return self.autoencoder.encode(pixels.to(self.device))
        rows = []
        for i in range(pixels.shape[0]):
            one = pixels[i : i + 1]
            digest = pixel_digest(one[0])
            path = self.path_for_digest(digest)
            key = self.key_for(digest, int(one.shape[-2]), int(one.shape[-1]))
            hit = self.lookup(path, key)
            if hit is not None:
                rows.append(hit["latent"].to(self.device))
                continue
            latent = self.autoencoder.encode(one.to(self.device))[0]
            self.stats.computed += 1
            self.store(path, key, {"latent": latent})
            rows.append(latent)
        return torch.stack(rows)

    def inspect_pixels(self, pixels: torch.Tensor) -> tuple[str, str, Path]:
        digest = pixel_digest(pixels)
        path = self.path_for_digest(digest)
        key = self.key_for(digest, int(pixels.shape[-2]), int(pixels.shape[-1]))
        return (*self.inspect(path, key), path)


# ----------------------------------------------------------------------------- build / verify


def _base(dataset: Any) -> tuple[Any, list[int]]:
    """The underlying dataset and the indices a (nested) ``Subset`` exposes."""
    indices = list(range(len(dataset)))
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _as_list(items: list) -> list:
    return items


def _samples(dataset: Any, num_workers: int, need_pixels: bool) -> Iterator[dict | None]:
    """Every sample of the run's dataset; captions straight from the index when pixels are moot."""
    base, indices = _base(dataset)
    records = getattr(base, "records", None)
    if not need_pixels and records is not None:
        for i in indices:
            yield {"caption": records[i].caption, "id": records[i].id}
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=16, collate_fn=_as_list, num_workers=num_workers)
    for batch in loader:
        yield from batch


def _pixel_variants(item: dict, flips: bool) -> list[torch.Tensor]:
    # random_flip picks a side per (epoch, index): every epoch needs one of the two. Flipping
    # the decoded tensor equals flipping the cropped image (a pure pixel permutation).
    pixels = item["pixels"]
    return [pixels, torch.flip(pixels, dims=[-1])] if flips else [pixels]


def _flips(dataset: Any) -> bool:
    return bool(getattr(_base(dataset)[0], "random_flip", False))


@dataclass
class Section:
    """Counts for one cache (text or latents) in a build or verify report."""

    name: str
    skipped: str = ""
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, status: str, example: str = "") -> None:
        self.total += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        shown = self.examples.setdefault(status, [])
        if example and len(shown) < _SHOW:
            shown.append(example)

    def problems(self) -> int:
        return sum(self.counts.get(k, 0) for k in ("missing", "corrupt", "stale"))


def _open(cfg: Config, mode: str) -> tuple[TextEmbeddingCache, LatentCache, Any]:
    from sanakit.data.dataset import build_dataset
    from sanakit.models.autoencoder import build_autoencoder
    from sanakit.models.text import build_text_encoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as training does
    encoder = build_text_encoder(cfg.text_encoder, device)
    autoencoder = build_autoencoder(cfg.vae, device, torch.float32)
    dataset, _ = build_dataset(cfg, autoencoder.downsample_factor)  # buckets resize as training
    root = cache_root(cfg)
    return TextEmbeddingCache(root, encoder, mode), LatentCache(root, autoencoder, mode), dataset


def build_caches(cfg: Config, progress: bool = True) -> dict:
    """Compute and write every missing or invalid caption embedding and latent of the dataset.

    Ignores ``train.cache_mode`` (building is the point). Returns a JSON-able summary.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    text, latents, dataset = _open(cfg, "readwrite")
    removed = sum(
        len(remove_stale_temp_files(d))
        for sub in (text.dir, latents.dir)
        if sub.is_dir()
        for d in sub.iterdir()
        if d.is_dir()
    )
    flips = _flips(dataset)
    seen: set[str] = set()
    images = unreadable = 0
    bar = tqdm(total=len(dataset), desc="cache build", unit="sample", disable=not progress)
    for item in _samples(dataset, cfg.data.num_workers, not latents.passthrough):
        bar.update(1)
        if item is None:
            unreadable += 1
            continue
        if item["caption"] not in seen:
            seen.add(item["caption"])
            text.get(item["caption"])
        if not latents.passthrough:
            for pixels in _pixel_variants(item, flips):
                latents.encode(pixels[None])
                images += 1
    bar.close()
    failures = flush_writes()
    if failures:
        raise ArtifactError(
            f"{len(failures)} cache entries could not be written (first: {failures[0]}); "
            f"free space or fix permissions under {cache_root(cfg)} and run it again"
        )
    return {
        "root": str(cache_root(cfg)),
        "samples": len(dataset),
        "unreadable": unreadable,
        "captions": len(seen),
        "text": vars(text.stats),
        "images": images,
        "latents": None if latents.passthrough else vars(latents.stats),
        "flip_variants": flips,
        "stale_temp_files_removed": removed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def verify_caches(cfg: Config, progress: bool = True) -> tuple[list[Section], int]:
    """Check every entry the dataset needs; returns per-cache sections and the unreadable count."""
    from tqdm import tqdm

    text, latents, dataset = _open(cfg, "read")
    flips = _flips(dataset)
    text_section = Section("text embeddings")
    latent_section = Section("latents")
    if latents.passthrough:
        latent_section.skipped = "vae.type=pixel trains on pixels: no latent cache"
    seen: set[str] = set()
    unreadable = 0
    bar = tqdm(total=len(dataset), desc="cache verify", unit="sample", disable=not progress)
    for item in _samples(dataset, cfg.data.num_workers, not latents.passthrough):
        bar.update(1)
        if item is None:
            unreadable += 1
            continue
        caption = item["caption"]
        if caption not in seen:
            seen.add(caption)
            status, reason, path = text.inspect_caption(caption)
            text_section.add(status, _example(status, path, reason, f"caption {caption[:60]!r}"))
        if not latents.passthrough:
            for pixels in _pixel_variants(item, flips):
                status, reason, path = latents.inspect_pixels(pixels)
                latent_section.add(status, _example(status, path, reason, f"sample {item['id']}"))
    bar.close()
    return [text_section, latent_section], unreadable


def _example(status: str, path: Path, reason: str, what: str) -> str:
    if status == "valid":
        return ""
    return f"{path} ({what})" if status == "missing" else f"{path} ({what}): {reason}"


def format_verify(sections: list[Section], unreadable: int, root: Path) -> str:
    lines = [f"cache {root}"]
    for s in sections:
        if s.skipped:
            lines.append(f"{s.name}: skipped ({s.skipped})")
            continue
        c = s.counts
        lines.append(
            f"{s.name}: {s.total} needed, {c.get('valid', 0)} valid, {c.get('missing', 0)} "
            f"missing, {c.get('corrupt', 0)} corrupt, {c.get('stale', 0)} stale"
        )
        for status in ("missing", "corrupt", "stale"):
            shown = s.examples.get(status, [])
            for example in shown:
                lines.append(f"  {status}: {example}")
            more = c.get(status, 0) - len(shown)
            if more > 0:
                lines.append(f"  ... and {more} more {status}")
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
