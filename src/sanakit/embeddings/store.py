"""Content-keyed caches of caption embeddings and latents, one artifact-store file per entry.

Layout under the cache root (``train.cache_dir``, default ``{work_dir}/cache``)::

    text/{h[:2]}/{h}.safetensors     h = sha256(caption, UTF-8); tensors embeds [L, D], mask [L]
    latents/{h[:2]}/{h}.safetensors  file images: h = sha256(the file's bytes' sha256, its size,
                                     target size, resize, crop box, flip, decode version);
                                     images made in memory: h = sha256(dtype, shape, bytes of the
                                     pixel tensor); tensor latent [C, H/f, W/f]
    sources/{h[:2]}/{h}.json         h = sha256(file path, member offset): the file's digest and
                                     size, believed while its stat is unchanged (sources.py)

The file name says *what went in* (a caption, an image's bytes and crop, an exact pixel tensor);
the provenance key in the safetensors metadata adds *what it went through*: the text encoder's
fingerprint, max length, instruction hash and dtype and how captions were batched, or the
autoencoder's fingerprint and dtype.
A flipped or re-cropped image is simply another entry, and a cache never depends on the step or
the batch an entry was first seen in (diffusers #14430). An entry whose key differs (another
encoder, max length, autoencoder...) is *stale*; one that is empty, truncated, unreadable or
holds NaN/Inf is *corrupt*. Neither is ever used: the value is recomputed (and rewritten in
``readwrite`` mode) with one warning line.

This module holds what both caches share: modes, lookup, store and inspection of one entry.
``text.py`` and ``latents.py`` say what an entry holds; ``writer.py`` puts it on disk.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from sanakit.config import Config
from sanakit.embeddings.writer import writer
from sanakit.errors import ArtifactError, ConfigError
from sanakit.io.artifacts import (
    PROVENANCE,
    Artifact,
    Invalid,
    InvalidKind,
    Tensors,
    check_tensors,
    key_hash,
    load_valid,
)
from sanakit.io.atomic import check_writable

log = logging.getLogger("sanakit")

MODES = ("off", "read", "readwrite")
WARN_LIMIT = 10  # invalid entries warned one by one per cache; then one line says the rest


def cache_root(cfg: Config) -> Path:
    """Where the caches of this run live: ``train.cache_dir`` or ``{work_dir}/cache``."""
    return Path(cfg.train.cache_dir or Path(cfg.work_dir) / "cache")


class EntryStatus(enum.Enum):
    """What one entry on disk is worth; the value is the word reports print."""

    VALID = "valid"
    MISSING = "missing"
    CORRUPT = "corrupt"
    STALE = "stale"

    @classmethod
    def of(cls, kind: InvalidKind) -> EntryStatus:
        return {
            InvalidKind.MISSING: cls.MISSING,
            InvalidKind.CORRUPT: cls.CORRUPT,
            InvalidKind.STALE: cls.STALE,
        }[kind]


PROBLEMS = (EntryStatus.MISSING, EntryStatus.CORRUPT, EntryStatus.STALE)


@dataclass
class CacheStats:
    """What a cache did: entries read, computed, found invalid (stale/corrupt), queued to write."""

    read: int = 0
    computed: int = 0
    invalid: int = 0
    written: int = 0


@dataclass(frozen=True)
class Inspection:
    """One entry checked without using it: its status, why (empty when valid), where."""

    status: EntryStatus
    reason: str
    path: Path


def probe_entry(path: Path, key: dict) -> EntryStatus:
    """An entry's status from the safetensors header alone (no tensor read, no NaN scan)."""
    if writer().pending(path, key_hash(key)) is not None:
        return EntryStatus.VALID
    try:
        if path.stat().st_size == 0:
            return EntryStatus.CORRUPT
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(PROVENANCE)
        stored = json.loads(raw)["key_sha256"] if raw else None
    except FileNotFoundError:
        return EntryStatus.MISSING
    except Exception:  # a damaged header raises many types; all mean "rebuild it"
        return EntryStatus.CORRUPT
    return EntryStatus.VALID if stored == key_hash(key) else EntryStatus.STALE


def _no_build() -> Tensors:  # entries are computed by the caches themselves, never by the store
    raise RuntimeError("cache entries are not built through Artifact.build")


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

    def _load(self, path: Path, key: dict) -> Tensors:
        # shapes are checked after the key: an entry of another max length is stale, not corrupt
        artifact = Artifact(path, key, build=_no_build, validate=self.validate, what=self.what)
        tensors = load_valid(artifact).tensors
        reason = self.fits(tensors)
        if reason:
            raise Invalid(reason, InvalidKind.CORRUPT)
        return tensors

    def lookup(self, path: Path, key: dict) -> Tensors | None:
        """A valid entry (in flight or on disk) or None; an invalid one is warned about."""
        if self.mode == "off":
            return None
        pending = writer().pending(path, key_hash(key))
        if pending is not None:
            self.stats.read += 1
            return pending
        try:
            tensors = self._load(path, key)
        except Invalid as bad:
            if bad.kind is not InvalidKind.MISSING:
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
        writer().submit(path, key, tensors)
        self.stats.written += 1

    def probe(self, path: Path, key: dict) -> EntryStatus:
        """The entry's status from its header alone (see :func:`probe_entry`)."""
        return EntryStatus.MISSING if self.mode == "off" else probe_entry(path, key)

    def inspect(self, path: Path, key: dict) -> Inspection:
        """Check the entry at ``path`` against ``key`` and the current settings."""
        try:
            self._load(path, key)
        except Invalid as bad:
            return Inspection(EntryStatus.of(bad.kind), str(bad), path)
        return Inspection(EntryStatus.VALID, "", path)

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
        elif fresh:
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
