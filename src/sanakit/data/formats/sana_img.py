"""NVlabs/Sana's ``SanaImgDataset`` folder: ``meta_data.json`` + ``{stem}.txt`` captions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from sanakit.data.files import read_inside, resolve_inside
from sanakit.data.formats.common import accept_caption, check_image, read_caption_file
from sanakit.data.images import IMAGE_EXTENSIONS
from sanakit.data.records import Record, SkipCounter
from sanakit.errors import DataError

HINT = (
    "each root needs meta_data.json listing img_names, with a {stem}.txt caption next to every "
    "image"
)
# Sana's loader appends ".png" to extensionless img_names by default; the rest are fallbacks.
_EXTENSION_ORDER: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_img_names(root: Path, base: Path) -> list:
    """The ``img_names`` list of ``root/meta_data.json``; a one-line DataError if unusable."""
    meta_path = root / "meta_data.json"
    data, reason = read_inside(meta_path, base)
    if data is None:
        what = f"{meta_path} is unusable ({reason})" if reason else f"{root} has no meta_data.json"
        raise DataError(
            f"{what} (data.type=sana_img); add a meta_data.json listing img_names (a regular "
            f"file inside the root) or use data.type=image_folder"
        )
    try:
        meta = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"cannot parse {meta_path}: {err}; fix the JSON") from err
    names = meta.get("img_names") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise DataError(f"{meta_path} has no img_names list; add one (data.type=sana_img)")
    return names


def _entry(root: Path, base: Path, name: str, skips: SkipCounter) -> tuple[Path, Path] | None:
    """``(caption stem, resolved image)`` of one ``img_names`` entry, or None after a skip."""
    entry = root / name
    if PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS:
        stem, candidates = entry.with_suffix(""), [entry]
    else:
        stem = entry
        candidates = [Path(f"{entry}{ext}") for ext in _EXTENSION_ORDER]
    inside, reason = resolve_inside(stem, base)
    if inside is None:
        skips.add(reason)
        return None
    image = next((c for c in candidates if c.exists()), candidates[0])
    resolved = check_image(image, base, skips)
    return None if resolved is None else (stem, resolved)


def index_sana_img(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index NVlabs/Sana image folders.

    ``img_names`` entries are relative to the root; an entry without an image extension is
    looked up as ``.png`` first (Sana's default), then the other image extensions. As in Sana,
    the caption is the first line of the ``.txt``. ``caption_key`` is unused (uniform signature).
    """
    del caption_key
    records: list[Record] = []
    for ri, root in enumerate(roots):
        base = root.resolve()
        seen: set[str] = set()
        for name in read_img_names(root, base):
            if not isinstance(name, str) or not name.strip() or "\0" in name:
                skips.add("invalid entry")
                continue
            if name in seen:
                skips.add("duplicate entry")
                continue
            seen.add(name)
            found = _entry(root, base, name, skips)
            if found is None:
                continue
            stem, resolved = found
            caption, reason = read_caption_file(Path(f"{stem}.txt"), base, "", first_line=True)
            caption = accept_caption(caption, reason, skips)
            if caption is not None:
                records.append(Record(id=f"{ri}:{name}", caption=caption, path=str(resolved)))
    return records
