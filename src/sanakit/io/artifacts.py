"""Content-keyed derived artifacts: built by whoever needs them first, never by an option.

An artifact is a file of named tensors declared by a *key* (everything that determines its
content) and a *builder*. ``get_or_build`` loads it when present, readable, valid and built under
the same key; otherwise it (re)builds it and writes it atomically (temp file in the same directory,
fsync, rename, fsync dir) with its provenance. Under several processes the local main process
builds under a file lock while the others wait at a barrier, then load what it wrote.

Two storage formats, chosen by suffix: ``.pth`` (a dict, the format Sana uses for its null
embedding; always read with ``torch.load(weights_only=True)``) and ``.safetensors`` (provenance in
the metadata).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import safe_open, save_file

from sanakit import __version__
from sanakit.errors import ArtifactError
from sanakit.io.atomic import atomic_write, check_writable

log = logging.getLogger("sanakit")

PROVENANCE = "sanakit_provenance"  # the extra entry we add next to Sana-format tensors

Tensors = dict[str, torch.Tensor]


def key_hash(key: dict) -> str:
    """Stable hash of a JSON-able key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Artifact:
    path: Path
    key: dict  # everything that determines the content; compared on load
    build: Callable[[], Tensors]
    validate: Callable[[Tensors], str | None] | None = None  # None if fine, else a reason
    accept_unkeyed: bool = False  # a file with no provenance (e.g. written by Sana) is accepted
    what: str = "artifact"  # words for log lines: "null embedding", "text-embedding cache"


class LoadStatus(enum.StrEnum):
    """How ``get_or_build`` obtained an artifact (its text is what tests and logs show)."""

    LOADED = "loaded"
    BUILT = "built"
    REBUILT = "rebuilt"  # an invalid file was replaced
    LOADED_UNKEYED = "loaded-unkeyed"  # no provenance (e.g. written by Sana), accepted


@dataclass
class Loaded:
    tensors: Tensors
    provenance: dict = field(default_factory=dict)
    status: LoadStatus = LoadStatus.LOADED
    path: Path | None = None


class InvalidKind(enum.Enum):
    """Why an artifact cannot be used: callers branch on this, never on the message."""

    MISSING = "missing"
    CORRUPT = "corrupt"  # unreadable, empty, wrong shape, NaN/Inf
    STALE = "stale"  # readable, but keyed for other settings (or not keyed at all)


class Invalid(Exception):
    """An artifact file cannot be used; ``kind`` says why, the message says how."""

    def __init__(self, reason: str, kind: InvalidKind = InvalidKind.CORRUPT) -> None:
        super().__init__(reason)
        self.kind = kind


def _read(path: Path) -> tuple[Tensors, dict | None]:
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:  # one open: warm epochs read many
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            raw = meta.get(PROVENANCE)
            return tensors, json.loads(raw) if raw else None
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated/corrupt files raise many types; all mean "unusable"
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise Invalid(f"unreadable ({type(err).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise Invalid(f"holds a {type(data).__name__}, not a dict of tensors")
    provenance = data.pop(PROVENANCE, None)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    return tensors, provenance


def _write(path: Path, tensors: Tensors, provenance: dict) -> None:
    def write(tmp: Path) -> None:
        if path.suffix == ".safetensors":
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(tmp),
                metadata={PROVENANCE: json.dumps(provenance, sort_keys=True)},
            )
        else:
            torch.save({**tensors, PROVENANCE: provenance}, tmp)

    atomic_write(path, write)


def check_tensors(tensors: Tensors) -> str | None:
    """Reject NaN/Inf anywhere: a poisoned artifact must never be used."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} contains NaN or Inf"
    return None


def load_valid(artifact: Artifact) -> Loaded:
    """Load an existing artifact or raise Invalid with the reason it cannot be used."""
    if not artifact.path.exists():
        raise Invalid("missing", InvalidKind.MISSING)
    if artifact.path.stat().st_size == 0:
        raise Invalid("empty file")
    tensors, provenance = _read(artifact.path)
    reason = check_tensors(tensors) or (artifact.validate(tensors) if artifact.validate else None)
    if reason:
        raise Invalid(reason)
    if provenance is None:
        if not artifact.accept_unkeyed:
            raise Invalid("no provenance recorded", InvalidKind.STALE)
        return Loaded(tensors, {}, LoadStatus.LOADED_UNKEYED, artifact.path)
    if provenance.get("key_sha256") != key_hash(artifact.key):
        stored = provenance.get("key", {})
        diff = sorted(
            k for k in set(stored) | set(artifact.key) if stored.get(k) != artifact.key.get(k)
        )
        raise Invalid(f"built for a different {', '.join(diff) or 'key'}", InvalidKind.STALE)
    return Loaded(tensors, provenance, LoadStatus.LOADED, artifact.path)


def make_provenance(key: dict) -> dict:
    return {
        "key": key,
        "key_sha256": key_hash(key),
        "sanakit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _load_or_build(artifact: Artifact) -> Loaded:
    status = LoadStatus.BUILT
    try:
        return load_valid(artifact)
    except Invalid as bad:
        if bad.kind is not InvalidKind.MISSING:
            log.warning("%s at %s is invalid: %s; rebuilding", artifact.what, artifact.path, bad)
            status = LoadStatus.REBUILT
    tensors = artifact.build()
    reason = check_tensors(tensors) or (artifact.validate(tensors) if artifact.validate else None)
    if reason:
        raise ArtifactError(f"{artifact.what} built for {artifact.path} is invalid: {reason}")
    provenance = make_provenance(artifact.key)
    try:
        _write(artifact.path, tensors, provenance)
    except OSError as err:
        raise ArtifactError(
            f"cannot write {artifact.what} to {artifact.path} ({err.strerror or err}); "
            "make the directory writable or choose another location"
        ) from None
    return Loaded(tensors, provenance, status, artifact.path)


def get_or_build(
    artifact: Artifact,
    *,
    is_builder: bool = True,
    barrier: Callable[[], None] | None = None,
) -> Loaded:
    """Load a valid artifact, or build and store it. Safe under several processes.

    ``is_builder`` marks the one process per machine that may build; the others wait at
    ``barrier`` and then load. The file lock also serialises separate runs sharing a directory.
    """
    directory = artifact.path.parent
    if is_builder:
        reason = check_writable(directory)
        if reason and not artifact.path.exists():
            raise ArtifactError(
                f"cannot create {artifact.what} in {directory}: {reason}; "
                "make it writable or point the setting at a writable directory"
            )
        # the lock file stays: unlinking it while another process waits would split the lock
        with FileLock(str(artifact.path) + ".lock"):
            result = _load_or_build(artifact)
    if barrier is not None:
        barrier()
    if not is_builder:
        try:
            result = load_valid(artifact)
        except Invalid as bad:
            raise ArtifactError(
                f"{artifact.what} at {artifact.path} is not usable after the main process built "
                f"it ({bad}); check that all processes see the same filesystem"
            ) from None
    return result
