"""Where an export may be written: never over a sanakit run or checkpoint, only over an export.

``sanakit export CKPT OUT --overwrite`` replaces ``OUT`` only when it is an earlier export,
recognised by the settings file every export writes last (``sanakit.json`` with
``"format": "sanakit-export"``). A destination that is, contains or lies inside a work dir or a
checkpoint is refused whatever ``--overwrite`` says, so a slip like ``export w w --overwrite`` or
``export w . --overwrite`` costs one error line, not the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sanakit.errors import SanakitError
from sanakit.io.atomic import (
    Displace,
    Existing,
    Tag,
    check_writable,
    remove_tree,
    stale_siblings,
)
from sanakit.io.checkpoint import MANIFEST_FORMAT, MANIFEST_NAME
from sanakit.io.ownership import destination_lock_file, remove_stale_lock

SETTINGS_FILE = "sanakit.json"  # written last by every export: also its marker
FORMAT = "sanakit-export"
# An earlier export is a diffusers folder a few levels deep with a few dozen files; a tree far
# larger than this is not one, and is never searched (or replaced) in full.
_MAX_SCAN_ENTRIES = 20_000
_MARKER_MAX_BYTES = 16 << 20


class ExportError(SanakitError):
    """The export cannot be written (destination exists, not writable, unsupported model)."""


def sanakit_kind(directory: Path) -> str | None:
    """ "checkpoint" or "work dir" if ``directory`` is one (by its files), else None."""
    try:
        manifest = directory / MANIFEST_NAME
        if manifest.is_file():
            with open(manifest, "rb") as fh:
                if MANIFEST_FORMAT.encode() in fh.read(1 << 16):
                    return "checkpoint"
        if (directory / "checkpoints").is_dir():
            return "work dir"
        if (directory / "config.yaml").is_file() and (directory / "metrics.jsonl").is_file():
            return "work dir"
    except OSError:
        return None
    return None


def is_earlier_export(directory: Path) -> bool:
    """Whether ``directory`` holds the marker an export writes (its settings file)."""
    marker = directory / SETTINGS_FILE
    try:
        if marker.is_symlink() or not marker.is_file():
            return False
        if marker.stat().st_size > _MARKER_MAX_BYTES:
            return False
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _enclosing_run(out_dir: Path) -> tuple[Path, str] | None:
    """The nearest of ``out_dir`` and its ancestors that is a run or a checkpoint."""
    for directory in (out_dir, *out_dir.parents):
        kind = sanakit_kind(directory)
        if kind is not None:
            return directory, kind
    return None


def _contained_run(out_dir: Path) -> str | None:
    """Why ``out_dir`` cannot be an earlier export: it holds a run/checkpoint, or is too big."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(out_dir):
        seen += len(dirnames) + len(filenames)
        if seen > _MAX_SCAN_ENTRIES:
            return f"it holds more than {_MAX_SCAN_ENTRIES} files, far more than an export"
        kind = sanakit_kind(Path(dirpath))
        if kind is not None:
            return f"it contains the sanakit {kind} {dirpath}"
    return None


def replace_refusal(out_dir: Path, overwrite: bool) -> str | None:
    """Why the existing directory ``out_dir`` must not be replaced, or None if it may be."""
    if out_dir.is_symlink():
        return f"export destination {out_dir} is a symlink; pass a real directory path"
    if not out_dir.is_dir():
        return f"export destination {out_dir} is a file; pass a directory path"
    if not any(out_dir.iterdir()):
        return None
    if not overwrite:
        return (
            f"export destination {out_dir} exists and is not empty; choose another OUT_DIR or "
            "pass --overwrite to replace an earlier export"
        )
    if not is_earlier_export(out_dir):
        return (
            f"export destination {out_dir} is not an earlier sanakit export (no {SETTINGS_FILE}); "
            "--overwrite replaces only an export, choose another OUT_DIR"
        )
    inside = _contained_run(out_dir)
    if inside is not None:
        return f"export destination {out_dir} is not replaced: {inside}; choose another OUT_DIR"
    return None


def check_destination(out_dir: Path, overwrite: bool) -> Path:
    """The absolute destination if an export may be written there; else an ExportError.

    Refused whatever ``overwrite`` says: the filesystem root, a destination that is or lies
    inside a sanakit work dir or checkpoint (when it exists: it is part of the run), one inside
    a checkpoint or a run's checkpoints folder (even when new), and a non-empty directory that
    is not an earlier export. The parent must be writable.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.parent == out_dir:
        raise ExportError(f"export destination {out_dir} is a filesystem root; pass a new folder")
    real = out_dir.resolve()
    exists = out_dir.exists() or out_dir.is_symlink()
    enclosing = _enclosing_run(real if exists else real.parent)
    if enclosing is not None:
        where, kind = enclosing
        inside_checkpoints = kind == "checkpoint" or "checkpoints" in real.relative_to(where).parts
        if exists or inside_checkpoints:
            relation = "is" if where == real else "lies inside"
            raise ExportError(
                f"export destination {out_dir} {relation} the sanakit {kind} {where}; an export "
                "never replaces or writes into a run, choose an OUT_DIR outside it"
            )
    if exists:
        refusal = replace_refusal(out_dir, overwrite)
        if refusal is not None:
            raise ExportError(refusal)
    problem = check_writable(out_dir.parent)  # creates missing parents
    if problem:
        raise ExportError(f"cannot write the export next to {out_dir}: {problem}")
    return out_dir


def displace_earlier_export(final: Path, overwrite: bool) -> Displace:
    """For ``atomic_directory``: re-checked at the rename, replace only an earlier export."""
    refusal = replace_refusal(final, overwrite)
    if refusal is not None:
        raise ExportError(refusal)
    return Displace(Existing.REPLACE)


def clean_leftovers(out_dir: Path) -> None:
    """Remove temp folders of killed exports to ``out_dir``; restore an interrupted replace.

    A kill between the two renames of a replace leaves the earlier export only as
    ``.{name}.old-*``: it is put back when ``out_dir`` is missing, else deleted. A killed CLI
    export's destination lock file is removed too (only when no one holds it).
    """
    remove_stale_lock(destination_lock_file(out_dir))
    for sib in stale_siblings(out_dir.parent, Tag.TMP, out_dir.name):
        remove_tree(sib.path)
    for sib in stale_siblings(out_dir.parent, Tag.OLD, out_dir.name):
        if not (out_dir.exists() or out_dir.is_symlink()) and is_earlier_export(sib.path):
            os.rename(sib.path, out_dir)
        else:
            remove_tree(sib.path)
