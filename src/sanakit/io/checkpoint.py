"""Crash-safe directory checkpoints: the file mechanics, not what goes inside them.

Layout under ``checkpoints_dir``::

    step_00001000/            a committed checkpoint
        <any files written by the caller>
        manifest.json         written LAST: sizes and sha256 of every other file
    .step_00001500.tmp-<pid>-<rand>/     being written (or left by a killed writer)
    .step_00001000.old-<pid>-<rand>/     previous copy of a step being replaced
    .deleting-step_00000500-<pid>-<rand>/  being removed by rotation
    step_00000700.corrupt-<time>/         a step dir that failed verification and was moved
                                          aside instead of overwritten (kept for the user)

Invariants this module maintains, so that ``kill -9`` at any instant is harmless:

* A ``step_*`` name only ever appears through a single ``rename`` of a fully written, fsynced
  directory whose manifest is already inside it; anything else lives under a dot-name.
* Nothing is trusted by name alone: a checkpoint is valid only if its manifest parses, names the
  same step as the directory, and every listed file has the recorded size (and sha256, deep).
* Nothing a user might want is deleted silently: only superseded copies, abandoned temp dirs and
  checkpoints rotation decided to drop are removed, each with a log line; invalid checkpoints are
  reported and left on disk.
"""

import errno
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sanakit.errors import CheckpointError
from sanakit.io.atomic import (
    Displace,
    Existing,
    Tag,
    atomic_directory,
    claimed,
    free_bytes,
    fsync_dir,
    makedirs_durable,
    owner_alive,
    remove_tree,
    sha256_file,
    stale_siblings,
)
from sanakit.io.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ListedFiles,
    checkpoint_step,
    listed_files,
    load_manifest,
    parse_step_name,
    read_manifest,
    step_dir_name,
    verify_checkpoint,
)

log = logging.getLogger("sanakit")

# the manifest half lives in io/manifest.py; callers keep importing it from here
__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ListedFiles",
    "candidates",
    "checkpoint_step",
    "clean_stale",
    "find_latest",
    "has_room",
    "interrupted_replacements",
    "list_checkpoints",
    "listed_files",
    "read_manifest",
    "recover_interrupted",
    "resolve_checkpoint",
    "rotate",
    "seal",
    "step_dir_name",
    "verify_checkpoint",
    "write_checkpoint",
]

_DELETING_RE = re.compile(r"^\.deleting-step_(\d{8,})-(\d+)-[0-9a-f]+$")


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


# --------------------------------------------------------------------------------------------
# Listing and selection
# --------------------------------------------------------------------------------------------


def candidates(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Every canonical ``step_N`` directory, sorted by N (valid or not)."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for entry in d.iterdir():
        step = parse_step_name(entry.name)
        if step is not None and entry.is_dir() and not entry.is_symlink():
            found.append((step, entry))
    found.sort(key=lambda sp: sp[0])
    return found


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """``step_N`` directories sorted by step, complete or not.

    A directory whose readable manifest names a different step than its name is excluded (with
    a warning): the step is never trusted from the name alone. Use :func:`verify_checkpoint` to
    tell complete ones apart.
    """
    result: list[Path] = []
    for step, path in candidates(checkpoints_dir):
        manifest, _ = load_manifest(path)
        if manifest is not None and manifest["step"] != step:
            log.warning("ignoring checkpoint %s: its manifest says step %d", path, manifest["step"])
            continue
        result.append(path)
    return result


def find_latest(checkpoints_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Newest checkpoint that deep-verifies, and (path, reason) for every newer one skipped.

    Read-only: it renames and deletes nothing (a writer calls :func:`recover_interrupted`
    first) and logs nothing (the caller reports ``skipped`` once).
    """
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return None, []
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(candidates(d)):
        reason = verify_checkpoint(path, deep=True)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


# --------------------------------------------------------------------------------------------
# Housekeeping of dot-directories left by killed processes
# --------------------------------------------------------------------------------------------


def _old_copies(d: Path) -> list[tuple[int, Path]]:
    """``(step, .step_N.old-*)`` copies of dead writers, whether or not ``step_N`` exists."""
    found = []
    for sib in stale_siblings(d, Tag.OLD):
        step = parse_step_name(sib.name)
        if step is not None:
            found.append((step, sib.path))
    return found


def interrupted_replacements(d: Path) -> list[tuple[int, Path]]:
    """``(step, .step_N.old-*)`` copies left by a killed re-save whose ``step_N`` is missing."""
    d = Path(d)
    return [(step, old) for step, old in _old_copies(d) if not _exists(d / step_dir_name(step))]


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover_interrupted(d: Path) -> list[Path]:
    """Rename a verified ``.step_N.old-*`` back to ``step_N`` when ``step_N`` is missing."""
    d = Path(d)
    restored: list[Path] = []
    for step, old in interrupted_replacements(d):
        final = d / step_dir_name(step)
        if _exists(final):
            continue  # two old copies of one step: the first one restored wins
        reason = verify_checkpoint(old, deep=True)
        if reason is not None:
            log.warning("leaving %s in place: it does not verify (%s)", old, reason)
            continue
        try:
            os.rename(old, final)
            fsync_dir(d)
        except OSError as err:
            log.warning("could not restore %s to %s: %s", old, final, err)
            continue
        log.warning("restored %s from an interrupted re-save (%s)", final, old.name)
        restored.append(final)
    return restored


def clean_stale(checkpoints_dir: Path) -> list[Path]:
    """Remove leftovers of killed writers; return what was removed.

    Removed: ``.step_*.tmp-*`` dirs (never committed, so never checkpoints), ``.deleting-*``
    dirs (rotation already decided to delete them) and ``.step_N.old-*`` copies superseded by
    a verified ``step_N``, all only when their owning pid is gone. Called by
    :func:`write_checkpoint`.
    """
    d = Path(checkpoints_dir)
    removed: list[Path] = []
    recover_interrupted(d)
    for sib in stale_siblings(d, Tag.TMP):
        if parse_step_name(sib.name) is not None and remove_tree(sib.path):
            log.warning("removed unfinished checkpoint temp dir from a killed writer: %s", sib.path)
            removed.append(sib.path)
    for entry in sorted(d.iterdir()) if d.is_dir() else []:
        m = _DELETING_RE.match(entry.name)
        if m is not None and not owner_alive(entry, int(m.group(2))) and remove_tree(entry):
            removed.append(entry)
    for step, old in _old_copies(d):
        final = d / step_dir_name(step)
        if verify_checkpoint(final, deep=True) is None and remove_tree(old):
            log.info("removed %s, superseded by re-saved %s", old, final)
            removed.append(old)
    return removed


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _file_table(tmp: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file the caller wrote into ``tmp`` (regular files only)."""
    files: dict[str, dict[str, Any]] = {}
    for root, dirnames, filenames in os.walk(tmp):
        dirnames.sort()
        root_path = Path(root)
        for dn in dirnames:
            if (root_path / dn).is_symlink():
                raise ValueError(f"checkpoint must not contain symlinks: {root_path / dn}")
        for fn in sorted(filenames):
            fpath = root_path / fn
            rel = fpath.relative_to(tmp).as_posix()
            if fpath.is_symlink() or not fpath.is_file():
                raise ValueError(f"checkpoint may only contain regular files: {rel}")
            if rel == MANIFEST_NAME:
                raise ValueError(f"write_files must not create {MANIFEST_NAME} itself")
            files[rel] = {"size": fpath.stat().st_size, "sha256": sha256_file(fpath)}
    if not files:
        raise ValueError(f"write_files wrote no files into {tmp}")
    return files


def seal(tmp: Path, step: int) -> None:
    """Write ``manifest.json`` (size + sha256 of every file in ``tmp``) as the last file."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": _file_table(tmp),
    }
    with open(tmp / MANIFEST_NAME, "xb") as fh:  # last: its presence means "complete"
        fh.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _corrupt_name(d: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = d / f"{name}.corrupt-{stamp}"
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = d / f"{name}.corrupt-{stamp}-{n}"
    return aside


def _displace(final: Path) -> Displace:
    """An existing ``step_N``: replace a verified copy safely, keep anything else aside."""
    reason = verify_checkpoint(final, deep=True)
    if reason is None:
        # Re-save of the same step (e.g. after resume): atomic_directory keeps the verified copy
        # as ``.step_N.old-*`` until the new one is in place; recover_interrupted restores it.
        log.info("replacing existing checkpoint %s with a new save of the same step", final)
        return Displace(Existing.REPLACE)
    # Never overwrite or delete what the user may want back.
    aside = _corrupt_name(final.parent, final.name)
    log.warning(
        "existing %s does not verify (%s); moving it aside to %s instead of deleting it",
        final,
        reason,
        aside,
    )
    return Displace(Existing.KEEP_ASIDE, aside)


def write_checkpoint(checkpoints_dir: Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """Write checkpoint ``step`` crash-safely and return its ``step_N`` directory.

    ``write_files(tmpdir)`` writes any regular files (subdirectories allowed) into a fresh
    temp dir; this function then writes ``manifest.json`` last, fsyncs everything and renames
    the dir into place (:func:`sanakit.io.atomic.atomic_directory`). Stale temp dirs of killed
    writers are removed first. If ``step_N`` exists and verifies it is replaced safely; if it
    exists but does not verify it is moved aside as ``step_N.corrupt-<time>``. On any exception
    the temp dir is removed and the existing checkpoints are untouched.
    """
    _check_step(step)
    d = Path(checkpoints_dir)
    try:
        makedirs_durable(d)
    except OSError as err:
        raise CheckpointError(
            f"cannot create checkpoint directory {d}: {err.strerror or err}; "
            "choose a writable output directory"
        ) from err
    clean_stale(d)

    def fill(tmp: Path) -> None:
        write_files(tmp)
        seal(tmp, step)

    name = step_dir_name(step)
    try:
        return atomic_directory(d / name, fill, _displace)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"out of disk space writing checkpoint {name} in {d} "
                f"({free_bytes(d)} bytes free); free space or keep fewer checkpoints"
            ) from err
        raise


# --------------------------------------------------------------------------------------------
# Rotation and space
# --------------------------------------------------------------------------------------------


def _delete_checkpoint(d: Path, path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half-deleted ``step_*`` dir."""
    doomed = d / f".deleting-{path.name}-{_token()}"
    with claimed(doomed):
        os.rename(path, doomed)
        fsync_dir(d)
        remove_tree(doomed)


def rotate(checkpoints_dir: Path, keep: int | None, protect: Path) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest ``keep``; return what was removed.

    ``keep`` None or <= 0 keeps everything. ``protect`` (the checkpoint just written) is never
    deleted, and if it does not verify nothing is deleted at all. Incomplete or corrupt
    checkpoints are never touched and do not count towards ``keep``.
    """
    if keep is None or keep <= 0:
        return []
    d = Path(checkpoints_dir)
    protect = Path(protect)
    reason = verify_checkpoint(protect, deep=False)
    if reason is not None:
        log.warning(
            "not rotating checkpoints: the new checkpoint %s is invalid (%s)", protect, reason
        )
        return []
    protect_real = protect.resolve()
    complete = [p for p in list_checkpoints(d) if verify_checkpoint(p, deep=False) is None]
    removed: list[Path] = []
    for path in complete[: max(0, len(complete) - keep)]:
        if path.resolve() == protect_real:
            continue
        try:
            _delete_checkpoint(d, path)
        except OSError as err:
            log.warning("could not delete old checkpoint %s: %s", path, err)
            continue
        log.info("deleted old checkpoint %s (keeping the newest %d)", path, keep)
        removed.append(path)
    return removed


def has_room(checkpoints_dir: Path, needed_bytes: int, margin: float = 1.1) -> tuple[bool, int]:
    """(enough, free): whether ``needed_bytes * margin`` fits on the checkpoint filesystem."""
    free = free_bytes(Path(checkpoints_dir))
    return free >= needed_bytes * margin, free


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a work_dir (then its newest verified checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoint or work_dir")
    if (path / "manifest.json").exists() or path.name.startswith("step_"):
        reason = verify_checkpoint(path)
        if reason:
            raise CheckpointError(f"checkpoint {path} does not verify ({reason}); use another one")
        return path
    latest, skipped = find_latest(path / "checkpoints")
    for bad, reason in skipped:
        log.warning("skipping checkpoint %s: %s", bad, reason)
    if latest is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (looked in {path / 'checkpoints'}); "
            "train first or pass a checkpoint directory"
        )
    return latest
