"""Every file the page shows lives in the server's own temp dir (Gradio's cache, outside
WORK_DIR): validation grids are copied there after checks, sampled PNGs are written there.
Gradio itself is given no path inside WORK_DIR to serve, so no URL can reach one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import stat
import threading
from pathlib import Path

from PIL import Image

from sanakit.io.manifest import parse_step_name

MAX_GRID_BYTES = 64 << 20  # a validation grid is a few MB at most; larger is not one
MAX_SAMPLE_FILES = 256  # sampled PNGs kept for the page (oldest removed first)


def inside(path: Path, root: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a symlink) of at most ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
        return data if len(data) <= limit else None  # it grew while we read
    except OSError:
        return None
    finally:
        os.close(fd)


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def is_png(data: bytes) -> bool:
    """A complete PNG (a grid still being written by the trainer is not, yet)."""
    if not data.endswith(PNG_END):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                return False
            img.load()  # decodes every row: a truncated file fails here
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for a bad file
        return False


class PublicFiles:
    """The served copies. ``root`` is Gradio's temp dir; it must not be inside WORK_DIR."""

    def __init__(self, root: Path, work_dir: Path) -> None:
        if inside(root, work_dir):
            raise ValueError(f"the server's temp dir {root} must not be inside {work_dir}")
        self.root, self.work_dir = root, work_dir
        (root / "vis").mkdir(parents=True, exist_ok=True)
        (root / "samples").mkdir(parents=True, exist_ok=True)
        self._grids: dict[tuple, Path] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()

    def grids(self, limit: int) -> list[tuple[int, Path]]:
        """(step, served copy) of the newest ``limit`` validation grids, newest first."""
        vis = self.work_dir / "vis"
        if vis.is_symlink() or not vis.is_dir() or not inside(vis, self.work_dir):
            return []
        found = []
        try:
            entries = list(os.scandir(vis))
        except OSError:
            return []
        for entry in entries:
            step = parse_step_name(entry.name.removesuffix(".png"))
            if entry.name.endswith(".png") and step is not None:
                found.append((step, entry))
        found.sort(key=lambda pair: pair[0], reverse=True)
        out = []
        for step, entry in found:
            if len(out) == limit:
                break
            copy = self._copy_grid(Path(entry.path))
            if copy is not None:
                out.append((step, copy))
        return out

    def _copy_grid(self, path: Path) -> Path | None:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        key = (path.name, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._grids and self._grids[key].exists():
                return self._grids[key]
        data = read_regular_file(path, MAX_GRID_BYTES)
        if data is None or not is_png(data):
            return None  # a symlink, a huge file, or a grid still being written
        digest = hashlib.sha256(data).hexdigest()[:16]
        copy = self.root / "vis" / f"{path.stem}-{digest}.png"
        if not copy.exists():
            self._write(copy, data)
        with self._lock:
            self._grids[key] = copy
        return copy

    def add_sample(self, png: bytes, label: str) -> Path:
        """Write a sampled PNG; the oldest are removed beyond ``MAX_SAMPLE_FILES``."""
        name = f"{next(self._counter):06d}-{label}.png"
        out = self.root / "samples" / name
        self._write(out, png)
        kept = sorted((self.root / "samples").iterdir())
        for old in kept[: max(0, len(kept) - MAX_SAMPLE_FILES)]:
            old.unlink(missing_ok=True)
        return out

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader never sees half a file
