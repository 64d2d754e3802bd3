"""Index-time checks shared by every on-disk format: images, captions, sample ids.

Index time only does cheap checks -- the file resolves inside its root, is a regular non-empty
file, and has a non-empty caption -- and counts every skip by reason. Every caption or image path
goes through :mod:`sanakit.data.files`, so one rule covers symlinks, loops, NUL bytes and FIFOs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

from sanakit.data.files import NOT_REGULAR, read_inside, resolve_inside
from sanakit.data.records import SkipCounter

MISSING_CAPTION = "missing caption"
UNREADABLE_CAPTION = "unreadable caption"


def check_image(path: Path, root: Path, skips: SkipCounter) -> Path | None:
    """Cheap image checks; returns the resolved path, or None after counting a skip.

    ``root`` is resolved; the image must resolve inside it and be a non-empty regular file.
    """
    resolved, reason = resolve_inside(path, root)
    if resolved is None:
        skips.add(reason)
        return None
    try:
        info = os.stat(resolved)
    except OSError:
        skips.add("missing image")
        return None
    if not stat.S_ISREG(info.st_mode):
        skips.add(NOT_REGULAR)
        return None
    if info.st_size == 0:
        skips.add("empty image file")
        return None
    return resolved


def decode_text(data: bytes) -> str | None:
    """UTF-8 text (a BOM from Windows editors tolerated), or None."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def caption_from_json(data: bytes, caption_key: str) -> tuple[str | None, str]:
    """``(caption, "")`` or ``(None, skip reason)`` from a JSON caption document."""
    text = decode_text(data)
    if text is None:
        return None, UNREADABLE_CAPTION
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None, UNREADABLE_CAPTION
    value = doc.get(caption_key) if isinstance(doc, dict) else None
    if not isinstance(value, str):
        return None, MISSING_CAPTION
    return value, ""


def accept_caption(caption: str | None, reason: str, skips: SkipCounter) -> str | None:
    """Count a skip for a missing/unreadable/empty caption; else return it stripped."""
    if caption is None:
        skips.add(reason)
        return None
    caption = caption.strip()
    if not caption:
        skips.add("empty caption")
        return None
    return caption


def read_caption_file(
    path: Path, root: Path, caption_key: str, first_line: bool = False
) -> tuple[str | None, str]:
    """Caption from a ``.txt`` (whole text, or first line) or ``.json`` file inside ``root``."""
    data, reason = read_inside(path, root)
    if data is None:
        return None, reason or MISSING_CAPTION
    if path.suffix.lower() == ".json":
        return caption_from_json(data, caption_key)
    text = decode_text(data)
    if text is None:
        return None, UNREADABLE_CAPTION
    if first_line:
        text = text.splitlines()[0] if text.strip() else ""
    return text, ""


def rel_id(index: int, path: Path, root: Path) -> str:
    """Stable sample id ``"{root index}:{path relative to root}"`` (lexical, not resolved)."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    return f"{index}:{PurePosixPath(Path(rel).as_posix())}"
