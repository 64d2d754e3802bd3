"""The checkpoint manifest: its format, verification, and which files a checkpoint lists.

``manifest.json`` is written last into every checkpoint: the format, the step, and the size and
sha256 of every other file. A directory is a checkpoint only if its manifest parses (whatever
the bytes: deep nesting, wrong types and huge numbers just make it unverified), names the same
step as a ``step_N`` directory, and every listed file has the recorded size (and sha256, deep).
Readers open only listed files (:class:`ListedFiles`).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanakit.errors import CheckpointError
from sanakit.io.atomic import sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sanakit-checkpoint"
MANIFEST_VERSION = 1
# A manifest lists a few dozen files; anything far larger is not one of ours (and parsing it
# would only waste memory).
MAX_MANIFEST_BYTES = 16 << 20

_STEP_RE = re.compile(r"^step_(\d{8,})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def step_dir_name(step: int) -> str:
    """The directory name of step ``step``: ``step_{step:08d}``."""
    return f"step_{step:08d}"


def parse_step_name(name: str) -> int | None:
    """Step number of a canonical ``step_N`` directory name, else None."""
    m = _STEP_RE.match(name)
    if m is None:
        return None
    step = int(m.group(1))
    # Reject non-canonical spellings ("step_000000005") so one step has exactly one name.
    return step if name == step_dir_name(step) else None


def _validate_manifest(data: Any) -> str | None:
    """Reason why parsed manifest JSON is not a usable v1 manifest, or None."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return "manifest.json is not a sanakit checkpoint manifest"
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        return "manifest invalid: version"
    if version > MANIFEST_VERSION:
        return (
            f"manifest version {version} is newer than supported ({MANIFEST_VERSION}); "
            "upgrade sanakit"
        )
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return "manifest invalid: step"
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest invalid: no files listed"
    for rel, entry in files.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if (
            not parts
            or "\x00" in rel
            or rel.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or rel == MANIFEST_NAME
        ):
            return f"manifest invalid: bad file name {rel!r}"
        if not isinstance(entry, dict):
            return f"manifest invalid: entry for {rel}"
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"manifest invalid: size of {rel}"
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            return f"manifest invalid: sha256 of {rel}"
    return None


def load_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) if ``path`` holds a structurally valid manifest, else (None, reason)."""
    mf = path / MANIFEST_NAME
    try:
        if not mf.is_file():
            return None, f"no {MANIFEST_NAME}"
        if mf.is_symlink():
            return None, f"{MANIFEST_NAME} is a symlink, not a file"
        if mf.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{MANIFEST_NAME} is too large to be a manifest"
        data = json.loads(mf.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        # A 0-byte or truncated manifest, garbage, or JSON nested too deeply to parse.
        return None, "manifest unreadable"
    reason = _validate_manifest(data)
    if reason is not None:
        return None, reason
    return data, None


def verify_checkpoint(path: Path, deep: bool = True) -> str | None:
    """None if ``path`` is a complete checkpoint, else a short reason.

    Checks the manifest, that a ``step_N`` directory's manifest names step N, that every listed
    file exists with the recorded size and, if ``deep``, the recorded sha256. ``deep=False`` is
    the fast path (no file contents read). Files not listed in the manifest are ignored.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "not a directory" if path.exists() or path.is_symlink() else "does not exist"
    manifest, reason = load_manifest(path)
    if manifest is None:
        return reason
    name_step = parse_step_name(path.name)
    if name_step is not None and name_step != manifest["step"]:
        return f"manifest step {manifest['step']} != directory step {name_step}"
    files: dict[str, dict[str, Any]] = manifest["files"]
    # Sizes first for every file: cheap, and catches truncation before hashing gigabytes.
    root = path.resolve()
    for rel in sorted(files):
        fpath = path / rel
        try:
            if not fpath.is_file():
                return f"missing file {rel}"
            if fpath.is_symlink() or not fpath.resolve().is_relative_to(root):
                return f"{rel}: a symlink, not a file of the checkpoint"
            size = fpath.stat().st_size
        except (OSError, ValueError) as err:
            return f"{rel}: unreadable ({getattr(err, 'strerror', None) or err})"
        if size != files[rel]["size"]:
            return f"{rel}: size {size} != {files[rel]['size']}"
    if deep:
        for rel in sorted(files):
            try:
                digest = sha256_file(path / rel)
            except OSError as err:
                return f"{rel}: unreadable ({err.strerror or err})"
            if digest != files[rel]["sha256"]:
                return f"{rel}: sha256 mismatch"
    return None


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest of checkpoint ``path``; raises CheckpointError if it has none usable."""
    manifest, reason = load_manifest(Path(path))
    if manifest is None:
        raise CheckpointError(
            f"checkpoint {path}: {reason}; choose a complete checkpoint directory "
            f"(one containing a valid {MANIFEST_NAME})"
        )
    return manifest


def checkpoint_step(path: Path) -> int:
    """The step recorded in ``path``'s manifest (never inferred from the directory name)."""
    return int(read_manifest(path)["step"])


@dataclass(frozen=True)
class ListedFiles:
    """The files a checkpoint's manifest lists. Readers open only these: a file that is present
    but not listed was never verified, so it is never loaded, whatever its name."""

    directory: Path
    names: frozenset[str]
    step: int

    def has(self, rel: str) -> bool:
        return rel in self.names

    def path(self, rel: str) -> Path:
        """``directory / rel`` if the manifest lists ``rel``; else a CheckpointError."""
        if rel not in self.names:
            raise CheckpointError(
                f"checkpoint {self.directory} does not list {rel} in its {MANIFEST_NAME}, so it "
                "is not loaded; use a complete checkpoint written by sanakit"
            )
        return self.directory / rel


def listed_files(path: Path) -> ListedFiles:
    """What checkpoint ``path``'s manifest lists (CheckpointError if it has no usable one)."""
    manifest = read_manifest(path)
    return ListedFiles(Path(path), frozenset(manifest["files"]), int(manifest["step"]))


# --------------------------------------------------------------------------------------------
