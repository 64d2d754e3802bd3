"""Webdataset ``.tar`` shards, indexed for random access without unpacking.

One pass over each shard's *headers* (``tarfile`` seeks over member data) records every member's
byte offset and size; samples are grouped with webdataset's own key rule
(``webdataset.tariterators.base_plus_ext``: key = path up to the first dot of the basename,
consecutive members with one key form a sample). Only the small caption members are read at
index time; ``__getitem__`` reads an image with one seek + read, so memory stays O(samples)
regardless of shard size and workers need no shared handles. Compressed shards (``.tar.gz``)
are not indexed because they cannot be seeked into.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from sanakit.data.files import NOT_REGULAR, is_regular, open_regular, resolve_inside
from sanakit.data.formats.common import (
    MISSING_CAPTION,
    UNREADABLE_CAPTION,
    accept_caption,
    caption_from_json,
    decode_text,
)
from sanakit.data.images import IMAGE_EXTENSIONS
from sanakit.data.records import Record, SkipCounter

HINT = "put uncompressed .tar shards holding key.jpg/png/webp with key.txt or key.json in the roots"
Members = dict[str, tarfile.TarInfo]


def shards(root: Path, skips: SkipCounter) -> list[Path]:
    """The ``.tar`` shards of a root (a root may itself be one ``.tar`` file).

    Shards found below a directory root must be regular files resolving inside it.
    """
    if root.is_file():
        return [root] if root.suffix == ".tar" and is_regular(root) else []
    base, found = root.resolve(), []
    for path in sorted(root.rglob("*.tar")):
        if path.is_dir():
            continue  # a folder named x.tar is not a shard
        resolved, reason = resolve_inside(path, base)
        if resolved is None or not is_regular(resolved):
            skips.add(f"unusable shard ({reason or NOT_REGULAR})")
            continue
        found.append(path)
    return found


def _members(shard: Path, skips: SkipCounter) -> list[tarfile.TarInfo]:
    """Regular-file headers of ``shard``; a truncated tail keeps the members read before it."""
    members: list[tarfile.TarInfo] = []
    try:
        # "r:" = uncompressed only: byte offsets into compressed streams are useless.
        with open_regular(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.isreg():
                    members.append(info)
    except (tarfile.TarError, OSError, EOFError):
        skips.add("unreadable shard")
    return members


def _groups(members: list[tarfile.TarInfo]) -> list[tuple[str, Members]]:
    """Consecutive members sharing a key, keyed by lower-case extension."""
    from webdataset.tariterators import base_plus_ext  # heavy; only this format needs it

    groups: list[tuple[str, Members]] = []
    for info in members:
        key, ext = base_plus_ext(info.name)
        if key is None:
            continue  # e.g. "README" without an extension: not part of any sample
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1][ext.lower()] = info
    return groups


def _caption(f: BinaryIO, parts: Members, caption_key: str) -> tuple[str | None, str]:
    info = parts.get("txt") or parts.get("json")
    if info is None:
        return None, MISSING_CAPTION
    f.seek(info.offset_data)
    data = f.read(info.size)
    if info.name.lower().endswith(".json"):
        return caption_from_json(data, caption_key)
    return decode_text(data), UNREADABLE_CAPTION


def _image(parts: Members, shard_size: int, skips: SkipCounter) -> tarfile.TarInfo | None:
    image = next((parts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in parts), None)
    if image is None:
        skips.add("missing image")
    elif image.size == 0:
        skips.add("empty image file")
    elif image.offset_data + image.size > shard_size:
        skips.add("truncated member")
    else:
        return image
    return None


def _index_shard(shard: Path, prefix: str, caption_key: str, skips: SkipCounter) -> list[Record]:
    groups = _groups(_members(shard, skips))
    records: list[Record] = []
    seen: set[str] = set()
    with open_regular(shard) as f:
        shard_size = f.seek(0, 2)
        for key, parts in groups:
            sample_id = f"{prefix}/{key}"
            if sample_id in seen:
                skips.add("duplicate key")
                continue
            seen.add(sample_id)
            image = _image(parts, shard_size, skips)
            if image is None:
                continue
            caption = accept_caption(*_caption(f, parts, caption_key), skips)
            if caption is not None:
                records.append(
                    Record(
                        sample_id, caption, str(shard), offset=image.offset_data, size=image.size
                    )
                )
    return records


def index_webdataset(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index webdataset ``.tar`` shards (a root may also be a single ``.tar`` file)."""
    records: list[Record] = []
    for ri, root in enumerate(roots):
        for shard in shards(root, skips):
            rel = shard.name if root.is_file() else shard.relative_to(root).as_posix()
            records.extend(_index_shard(shard.resolve(), f"{ri}:{rel}", caption_key, skips))
    return records
