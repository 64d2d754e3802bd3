"""Images anywhere below a root, each captioned by a same-stem ``.txt`` or ``.json``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sanakit.data.formats.common import (
    MISSING_CAPTION,
    accept_caption,
    check_image,
    read_caption_file,
    rel_id,
)
from sanakit.data.images import IMAGE_EXTENSIONS
from sanakit.data.records import Record, SkipCounter

HINT = (
    "put images (jpg/jpeg/png/webp/bmp) below the root with a same-stem .txt caption or a .json "
    "caption file"
)


def _caption(path: Path, base: Path, caption_key: str) -> tuple[str | None, str]:
    """The image's caption: ``.txt`` wins over ``.json``; whatever sits there must be usable."""
    for candidate in (path.with_suffix(".txt"), path.with_suffix(".json")):
        if os.path.lexists(candidate):  # a FIFO or bad link is counted, not silently passed over
            return read_caption_file(candidate, base, caption_key)
    return None, MISSING_CAPTION


def index_image_folder(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index images anywhere below each root, captioned by a same-stem ``.txt`` or ``.json``.

    Hidden directories (``.cache``, ``.ipynb_checkpoints``) are not searched; symlinks are
    followed only if they resolve inside the root.
    """
    records: list[Record] = []
    for ri, root in enumerate(roots):
        base = root.resolve()
        # followlinks=False: a symlinked directory cycle must not hang indexing.
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                resolved = check_image(path, base, skips)
                if resolved is None:
                    continue
                caption = accept_caption(*_caption(path, base, caption_key), skips)
                if caption is not None:
                    records.append(Record(rel_id(ri, path, root), caption, str(resolved)))
    return records
