"""Hugging Face ``imagefolder`` layout: ``metadata.jsonl``/``metadata.csv`` rows name the images."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sanakit.data.files import NOT_REGULAR, is_regular, read_regular, resolve_inside
from sanakit.data.formats.common import MISSING_CAPTION, accept_caption, check_image, rel_id
from sanakit.data.records import Record, SkipCounter
from sanakit.errors import DataError

logger = logging.getLogger(__name__)

HF_METADATA_NAMES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv")
HINT = "each root needs a metadata.jsonl with file_name and text (or data.caption_key) columns"
MALFORMED = "malformed metadata line"


def _parse_lines(data: bytes, skips: SkipCounter) -> list[dict[str, Any]]:
    """JSON lines one by one: the malformed ones are skipped and counted."""
    rows: list[dict[str, Any]] = []
    for line in data.decode("utf-8-sig", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            skips.add(MALFORMED)
            continue
        if not isinstance(row, dict):
            skips.add(MALFORMED)
            continue
        rows.append(row)
    return rows


def load_metadata_rows(path: Path, skips: SkipCounter) -> list[dict[str, Any]]:
    """Rows of a ``metadata.jsonl``/``.csv`` (a resolved regular file) via the ``datasets`` loaders.

    The loader runs against a throwaway cache dir so nothing lands in ``~/.cache``. It rejects
    a whole file over one malformed JSON line; then the lines are parsed one by one so the bad
    ones are skipped and counted rather than failing the dataset.
    """
    import datasets  # heavy (about a second): imported only when this format is used

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="sanakit-hf-") as cache:
            loader = (
                datasets.Dataset.from_csv if path.suffix == ".csv" else datasets.Dataset.from_json
            )
            return loader(str(path), keep_in_memory=True, cache_dir=cache).to_list()
    except Exception as err:  # datasets wraps parse failures in several exception types
        if path.suffix == ".csv":
            raise DataError(f"cannot parse {path}: {err}; fix the CSV") from err
        logger.warning("datasets could not load %s (%s); parsing it line by line", path, err)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    try:
        return _parse_lines(read_regular(path), skips)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}; fix the metadata file") from err


def metadata_files(root: Path, base: Path, skips: SkipCounter) -> list[Path]:
    """Every metadata file below ``root`` that is a regular file resolving inside it (resolved)."""
    found = []
    for path in sorted(p for name in HF_METADATA_NAMES for p in root.rglob(name)):
        resolved, reason = resolve_inside(path, base)
        if resolved is None or not is_regular(resolved):
            skips.add(f"unusable metadata file ({reason or NOT_REGULAR})")
            continue
        found.append(path)
    if not found:
        raise DataError(
            f"{root} has no usable metadata.jsonl (data.type=hf_imagefolder); add one with "
            f"file_name and text columns or use data.type=image_folder"
        )
    return found


def _caption_column(meta: Path, rows: list[dict[str, Any]], caption_key: str) -> str | None:
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    column = next((c for c in (caption_key, "text") if c in columns), None)
    if rows and column is None:
        raise DataError(
            f"{meta} has no {caption_key!r} or 'text' column; set data.caption_key to "
            f"the caption column"
        )
    return column


def _index_metadata(
    meta: Path, ri: int, root: Path, caption_key: str, skips: SkipCounter
) -> list[Record]:
    """The records of one metadata file; ``file_name`` must stay inside the file's folder."""
    base, meta_dir = root.resolve(), meta.parent.resolve()
    rows = load_metadata_rows(meta.resolve(), skips)
    column = _caption_column(meta, rows, caption_key)
    records: list[Record] = []
    for row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            skips.add("invalid metadata row")
            continue
        path = meta.parent / name
        inside, reason = resolve_inside(path, meta_dir)
        if inside is None:
            skips.add(reason)
            continue
        resolved = check_image(path, base, skips)
        if resolved is None:
            continue
        value = row.get(column) if column is not None else None
        caption = accept_caption(value if isinstance(value, str) else None, MISSING_CAPTION, skips)
        if caption is not None:
            records.append(Record(rel_id(ri, path, root), caption, str(resolved)))
    return records


def index_hf_imagefolder(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index Hugging Face ``imagefolder`` roots (``metadata.jsonl``/``metadata.csv``).

    Metadata files may sit anywhere below the root; ``file_name`` is relative to the metadata
    file's folder and must stay inside it (as in ``datasets``). The caption column is
    ``caption_key`` when the metadata has it, else ``text``. Images are not decoded here.
    """
    records: list[Record] = []
    for ri, root in enumerate(roots):
        for meta in metadata_files(root, root.resolve(), skips):
            records.extend(_index_metadata(meta, ri, root, caption_key, skips))
    return records
