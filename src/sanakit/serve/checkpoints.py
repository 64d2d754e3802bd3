"""The checkpoints of a run as the page shows them: step, size, verified or why not, and the
null-embedding provenance each was trained with (Sana #216: the one thing that must match).

Only reads, through ``io.checkpoint`` / ``io.manifest`` and the checked readers of
``train.checkpoint_files``. A deep verification reads every byte, so its answer is kept per
directory identity (a re-saved step is a new directory, hence verified again).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from sanakit.errors import SanakitError
from sanakit.io.checkpoint import candidates, verify_checkpoint
from sanakit.io.manifest import MANIFEST_NAME, parse_step_name
from sanakit.train.checkpoint_files import read_trainer_state

# leftovers beside the step_N directories (io/checkpoint.py): never checkpoints, but shown
_TMP_RE = re.compile(r"^\.step_(\d{8,})\.tmp-")
_CORRUPT_RE = re.compile(r"^step_(\d{8,})\.corrupt-")
MAX_LISTED = 200  # rows in the table; a run keeping more shows its newest


@dataclass(frozen=True)
class CheckpointInfo:
    name: str  # the directory name inside WORK_DIR/checkpoints
    step: int
    size: int  # bytes of regular files inside (symlinks are not followed)
    verified: bool
    problem: str  # why it is not a usable checkpoint ("" when verified)
    encoder: str = ""
    max_length: str = ""
    fingerprint: str = ""
    instruction: str = ""
    epoch: int | None = None
    pending: bool = False  # sizes match; the sha256 check is still running

    @property
    def usable(self) -> bool:
        """Verified, or complete as far as checked yet (for the run's state, not for loading)."""
        return self.verified or self.pending


def directory_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):  # os.walk does not follow directory symlinks
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed while we looked (a rotation, a finished temp dir)
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def identity(path: Path) -> tuple[int, ...] | None:
    """What changes when a step directory is replaced or its manifest rewritten."""
    try:
        d, m = os.stat(path), os.stat(path / MANIFEST_NAME)
    except OSError:
        return None
    return (d.st_ino, d.st_mtime_ns, m.st_ino, m.st_mtime_ns, m.st_size)


def provenance_fields(path: Path) -> dict:
    """Encoder, max length, fingerprint, instruction hash and epoch, or a reason in ``problem``."""
    try:
        state = read_trainer_state(path)
    except (SanakitError, OSError) as err:
        return {"encoder": "unreadable", "problem": str(err)}
    prov = state.get("null_embed_provenance") or {}
    instruction = prov.get("instruction_sha256")
    return {
        "encoder": str(prov.get("encoder", "")),
        "max_length": str(prov.get("max_length", "")),
        "fingerprint": str(prov.get("fingerprint", ""))[:12],
        "instruction": str(instruction)[:12] if instruction else "none",
        "epoch": state.get("epoch"),
    }


class CheckpointList:
    """``WORK_DIR/checkpoints`` listed newest first.

    Sizes are checked at once; the sha256 of every file (gigabytes for a real model) is checked
    by one background thread, so the page shows a large run at once and each checkpoint turns
    verified when its hash is done. Answers are cached per directory identity.
    """

    def __init__(self, checkpoints_dir: Path) -> None:
        self.directory = checkpoints_dir
        self._known: dict[str, tuple[tuple[int, ...], CheckpointInfo]] = {}
        self._lock = threading.Lock()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sanakit-verify")
        self._jobs: dict[str, Future] = {}

    def read(self) -> list[CheckpointInfo]:
        with self._lock:
            rows = [self._info(step, path) for step, path in candidates(self.directory)]
            names = {r.name for r in rows}
            self._known = {k: v for k, v in self._known.items() if k in names}
            rows += self._leftovers()
        rows.sort(key=lambda r: (r.step, r.verified), reverse=True)
        return rows[:MAX_LISTED]

    def settle(self, timeout: float | None = None) -> None:
        """Wait for the hashing in progress (tests, the first page of a small run)."""
        for job in list(self._jobs.values()):
            job.result(timeout=timeout)

    def _info(self, step: int, path: Path) -> CheckpointInfo:
        key = identity(path)
        known = self._known.get(path.name)
        if key is not None and known is not None and known[0] == key:
            return known[1]
        reason = verify_checkpoint(path, deep=False)
        fields = provenance_fields(path)
        problem = reason or fields.pop("problem", "")
        fields.pop("problem", None)
        pending = not problem and key is not None
        info = CheckpointInfo(
            path.name,
            step,
            directory_size(path),
            False,
            "checking sha256 of every file..." if pending else problem,
            pending=pending,
            **fields,
        )
        if key is not None:
            self._known[path.name] = (key, info)
        if pending and path.name not in self._jobs:
            self._jobs[path.name] = self._hasher.submit(self._hash, path, key, info)
        return info

    def _hash(self, path: Path, key: tuple[int, ...], shallow: CheckpointInfo) -> None:
        reason = verify_checkpoint(path, deep=True)
        done = replace(shallow, verified=reason is None, problem=reason or "", pending=False)
        with self._lock:
            if self._known.get(path.name, (None,))[0] == key:
                self._known[path.name] = (key, done)
            self._jobs.pop(path.name, None)

    def _leftovers(self) -> list[CheckpointInfo]:
        """Half-written saves and directories moved aside: shown as such, never loaded."""
        rows = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return rows
        for entry in entries:
            tmp, aside = _TMP_RE.match(entry.name), _CORRUPT_RE.match(entry.name)
            if (tmp or aside) and entry.is_dir(follow_symlinks=False):
                match = tmp or aside
                problem = (
                    "half-written: a save in progress, or one a killed run left behind"
                    if tmp
                    else "moved aside by the trainer: it did not verify"
                )
                size = directory_size(Path(entry.path))
                rows.append(CheckpointInfo(entry.name, int(match.group(1)), size, False, problem))
        return rows


def checkpoint_path(checkpoints_dir: Path, name: str) -> Path | None:
    """``checkpoints_dir/name`` when ``name`` is a canonical step directory there, else None.

    The page sends a name, never a path: anything else (``..``, a slash, a symlink) is refused.
    """
    if not isinstance(name, str) or parse_step_name(name) is None:
        return None
    path = checkpoints_dir / name
    if path.is_symlink() or not path.is_dir():
        return None
    return path
