"""On-disk dataset formats: indexing, image loading and batching.

Every format is indexed once, up front, into a flat list of :class:`Record` (sample id, caption,
where the image bytes live). Index time only does cheap checks -- the file exists, is non-empty,
stays inside its root, and has a non-empty caption -- and counts every skip by reason in a
:class:`SkipCounter`. Image decoding is lazy: a sample whose bytes turn out to be corrupt makes
``__getitem__`` return ``None``, and :func:`collate` drops it and reports ``num_bad``.

Formats (each over several roots, ``data.data_dir``):

* ``sana_img`` -- NVlabs/Sana's ``SanaImgDataset`` folder: ``meta_data.json`` with ``img_names``
  (with or without an image extension; without one, ``.png`` is Sana's default and is tried
  first) and the caption on the first line of ``{stem}.txt`` next to each image.
* ``image_folder`` -- images anywhere below the root with a same-stem ``.txt`` caption or a
  ``.json`` holding ``{caption_key: ...}``.
* ``hf_imagefolder`` -- Hugging Face ``imagefolder`` layout: ``metadata.jsonl`` (or
  ``metadata.csv``) rows ``{"file_name": ..., "text": ...}``, read with the ``datasets`` JSON/CSV
  loaders so only the metadata is parsed and images stay undecoded until used.
* ``webdataset`` -- uncompressed ``.tar`` shards with ``key.{jpg,png,webp}`` plus ``key.txt`` or
  ``key.json``; see :func:`index_webdataset` for how random access works.
* ``shapes`` -- the built-in procedural dataset, delegated to :mod:`sanakit.data.shapes`.

Sample contract: ``dataset[i]`` is ``{"pixels": FloatTensor[3, H, W] in [-1, 1], "caption": str,
"id": str}`` or ``None`` for an unreadable image.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import struct
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from sanakit.errors import DataError

logger = logging.getLogger(__name__)

#: Image extensions accepted by every file-based format (matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Sana's loader appends ".png" to extensionless img_names by default; the rest are fallbacks.
_SANA_EXTENSION_ORDER: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_HF_METADATA_NAMES: tuple[str, ...] = ("metadata.jsonl", "metadata.csv")
# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height are swapped.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
# What PIL raises on corrupt, truncated or hostile files; anything else is a bug and propagates.
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_HINTS: dict[str, str] = {
    "sana_img": "each root needs meta_data.json listing img_names, with a {stem}.txt caption "
    "next to every image",
    "image_folder": "put images (jpg/jpeg/png/webp/bmp) below the root with a same-stem .txt "
    "caption or a .json caption file",
    "hf_imagefolder": "each root needs a metadata.jsonl with file_name and text (or "
    "data.caption_key) columns",
    "webdataset": "put uncompressed .tar shards holding key.jpg/png/webp with key.txt or "
    "key.json in the roots",
}


class SkipCounter:
    """Counts samples skipped while indexing, by reason (e.g. ``"empty caption"``)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        """Record ``n`` skipped samples for ``reason``."""
        self._counts[reason] += n

    @property
    def total(self) -> int:
        """Number of skipped samples over all reasons."""
        return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """A copy of the per-reason counts."""
        return dict(self._counts)

    def summary(self) -> str:
        """One line, most frequent reason first: ``"skipped 3 samples: 2 empty caption, 1 ..."``."""
        total = self.total
        noun = "sample" if total == 1 else "samples"
        if not total:
            return f"skipped 0 {noun}"
        parts = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"skipped {total} {noun}: " + ", ".join(f"{n} {reason}" for reason, n in parts)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self._counts)!r})"


@dataclass(frozen=True, slots=True)
class Record:
    """One indexed sample.

    ``path`` is the image file, or for webdataset the shard holding it; then ``offset`` and
    ``size`` locate the member's bytes inside the (uncompressed) tar.
    """

    id: str
    caption: str
    path: str
    offset: int = -1
    size: int = 0

    def open(self) -> Any:
        """A path or in-memory file that ``PIL.Image.open`` accepts."""
        if self.offset < 0:
            return self.path
        # One short-lived handle per read: safe in forked DataLoader workers, nothing to share.
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member truncated: wanted {self.size} bytes, got {len(data)}")
        return io.BytesIO(data)


# ----------------------------------------------------------------------------- image loading


def _is_transposed(img: Image.Image) -> bool:
    """Whether the EXIF orientation rotates by 90 degrees (stored width/height are swapped)."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _IMAGE_ERRORS:  # a broken EXIF block must not hide an otherwise fine image
        return False
    return orientation in _TRANSPOSED_ORIENTATIONS


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(height, width)`` as displayed, i.e. after the EXIF orientation is applied."""
    w, h = img.size
    return (w, h) if _is_transposed(img) else (h, w)


def load_image(source: Any, height: int, width: int, flip: bool = False) -> torch.Tensor:
    """Decode ``source`` to RGB, resize to cover ``height x width``, center crop, maybe flip.

    Returns a float tensor ``[3, height, width]`` in ``[-1, 1]``. Raises what PIL raises for a
    corrupt file; callers turn that into a dropped sample.
    """
    with Image.open(source) as img:
        transposed = _is_transposed(img)
        w0, h0 = img.size[::-1] if transposed else img.size
        scale = max(height / h0, width / w0)
        new_h = max(height, round(h0 * scale))
        new_w = max(width, round(w0 * scale))
        if scale < 1:
            # JPEG only: decode at a reduced DCT scale that is still >= the needed size, which
            # makes big photos several times cheaper. draft() works in stored orientation.
            img.draft("RGB", (new_h, new_w) if transposed else (new_w, new_h))
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    # Lanczos keeps detail when shrinking; bicubic avoids ringing when upscaling small images.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    if rgb.size != (new_w, new_h):
        rgb = rgb.resize((new_w, new_h), resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    rgb = rgb.crop((left, top, left + width, top + height))
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(rgb, dtype=np.uint8)  # a writable copy, so torch does not warn
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def read_image_size(source: Any) -> tuple[int, int]:
    """``(height, width)`` from the image header only (no pixel decode)."""
    with Image.open(source) as img:
        return _oriented_size(img)


# ----------------------------------------------------------------------------- dataset


class CaptionedImageDataset(Dataset):
    """Map-style dataset over indexed :class:`Record` s, decoding images lazily.

    Target size: every sample is resized and center-cropped to ``(image_size, image_size)``
    unless :meth:`set_target_sizes` gave a per-index ``(height, width)`` -- that is how aspect
    ratio buckets (:mod:`sanakit.data.buckets`) pass each index its bucket's size. Set it before
    a DataLoader creates its iterator: workers get a copy of the dataset at that moment.

    Flip: with ``random_flip`` each index is flipped by a coin seeded from
    ``(seed, epoch, index)``, so a resumed run flips exactly like the original one. Call
    :meth:`set_epoch` at every epoch start (before creating the iterator when workers are not
    persistent; persistent workers keep the epoch they were started with).
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        image_size: int,
        seed: int = 0,
        random_flip: bool = False,
        format: str = "",
        roots: Sequence[str] = (),
        skips: SkipCounter | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.records: list[Record] = list(records)
        self.image_size = image_size
        self.seed = seed
        self.random_flip = random_flip
        self.format = format
        self.roots: list[str] = list(roots)
        self.skips: SkipCounter = skips if skips is not None else SkipCounter()
        self.epoch = 0
        self._target_sizes: list[tuple[int, int]] | None = None
        self._image_sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flip decisions ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def flip_for(self, index: int) -> bool:
        """Whether ``index`` is flipped in the current epoch (always False without random_flip)."""
        if not self.random_flip:
            return False
        # String seeds go through SHA-512 in random.Random: stable across runs and platforms,
        # unlike hash(), and independent per (seed, epoch, index).
        return random.Random(f"flip:{self.seed}:{self.epoch}:{index}").random() < 0.5

    def set_target_sizes(self, sizes: Sequence[tuple[int, int]] | None) -> None:
        """Per-index ``(height, width)`` to resize/crop to, or None for the square default."""
        if sizes is not None and len(sizes) != len(self.records):
            raise ValueError(f"got {len(sizes)} target sizes for {len(self.records)} samples")
        self._target_sizes = None if sizes is None else [(int(h), int(w)) for h, w in sizes]

    def target_size_for(self, index: int) -> tuple[int, int]:
        """The ``(height, width)`` sample ``index`` is resized and cropped to."""
        if self._target_sizes is None:
            return (self.image_size, self.image_size)
        return self._target_sizes[index]

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image, read from headers once and cached.

        An unreadable header reports the square target size: the sample lands in the square
        bucket and is dropped at load time like any other corrupt image.
        """
        if self._image_sizes is None:
            sizes = []
            for rec in self.records:
                try:
                    sizes.append(read_image_size(rec.open()))
                except _IMAGE_ERRORS:
                    sizes.append((self.image_size, self.image_size))
            self._image_sizes = sizes
        return list(self._image_sizes)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        if index < 0:
            index += len(self.records)
        rec = self.records[index]
        height, width = self.target_size_for(index)
        try:
            pixels = load_image(rec.open(), height, width, flip=self.flip_for(index))
        except _IMAGE_ERRORS as err:
            logger.warning("dropping unreadable image %s (%s): %s", rec.id, rec.path, err)
            return None
        return {"pixels": pixels, "caption": rec.caption, "id": rec.id}

    def __repr__(self) -> str:
        return (
            f"CaptionedImageDataset(format={self.format!r}, samples={len(self)}, "
            f"roots={self.roots!r}, {self.skips.summary()})"
        )


def collate(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack ``pixels``, list ``caption``/``id`` (and any other shared keys), drop ``None`` s.

    Returns ``{"pixels": [B, 3, H, W], "caption": [...], "id": [...], "num_bad": int}``, or
    ``None`` when every sample in the batch was bad.
    """
    good = [s for s in batch if s is not None]
    if not good:
        return None
    out: dict[str, Any] = {"pixels": torch.stack([s["pixels"] for s in good])}
    shared = set(good[0]).intersection(*good[1:]) - {"pixels"}
    for key in sorted(shared):
        out[key] = [s[key] for s in good]
    out["num_bad"] = len(batch) - len(good)
    return out


# ----------------------------------------------------------------------------- index helpers


def _inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved (symlinks and ``..``), or None when that leaves ``root`` (resolved)."""
    resolved = path.resolve()
    return resolved if resolved.is_relative_to(root) else None


def _check_image(path: Path, root: Path, skips: SkipCounter) -> Path | None:
    """Cheap index-time image checks; returns the resolved path or None after counting a skip."""
    resolved = _inside(path, root)
    if resolved is None:
        skips.add("path escapes root")
        return None
    try:
        size = resolved.stat().st_size
    except OSError:
        skips.add("missing image")
        return None
    if not resolved.is_file():
        skips.add("missing image")
        return None
    if size == 0:
        skips.add("empty image file")
        return None
    return resolved


def _decode_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError:
        return None


def _caption_from_json(data: bytes, caption_key: str) -> tuple[str | None, str]:
    """``(caption, "")`` or ``(None, skip reason)`` from a JSON caption document."""
    text = _decode_text(data)
    if text is None:
        return None, "unreadable caption"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None, "unreadable caption"
    value = doc.get(caption_key) if isinstance(doc, dict) else None
    if not isinstance(value, str):
        return None, "missing caption"
    return value, ""


def _accept_caption(caption: str | None, reason: str, skips: SkipCounter) -> str | None:
    """Count a skip for a missing/unreadable/empty caption; else return it stripped."""
    if caption is None:
        skips.add(reason)
        return None
    caption = caption.strip()
    if not caption:
        skips.add("empty caption")
        return None
    return caption


def _read_caption_file(
    path: Path, caption_key: str, first_line: bool = False
) -> tuple[str | None, str]:
    """Caption from a ``.txt`` (whole text, or first line) or ``.json`` file."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, "missing caption"
    if path.suffix.lower() == ".json":
        return _caption_from_json(data, caption_key)
    text = _decode_text(data)
    if text is None:
        return None, "unreadable caption"
    if first_line:
        text = text.splitlines()[0] if text.strip() else ""
    return text, ""


def _rel_id(index: int, path: Path, root: Path) -> str:
    """Stable sample id ``"{root index}:{path relative to root}"`` (lexical, not resolved)."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    return f"{index}:{PurePosixPath(Path(rel).as_posix())}"


# ----------------------------------------------------------------------------- formats


def index_sana_img(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index NVlabs/Sana image folders (``meta_data.json`` + ``{stem}.txt`` captions).

    ``img_names`` entries are relative to the root; an entry without an image extension is
    looked up as ``.png`` first (Sana's default), then the other image extensions. As in Sana,
    the caption is the first line of the ``.txt``. ``caption_key`` is unused (uniform signature).
    """
    del caption_key
    records: list[Record] = []
    for ri, root in enumerate(roots):
        base = root.resolve()
        meta_path = root / "meta_data.json"
        if not meta_path.is_file():
            raise DataError(
                f"{root} has no meta_data.json (data.type=sana_img); add one listing img_names "
                f"or use data.type=image_folder"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"cannot parse {meta_path}: {err}; fix the JSON") from err
        names = meta.get("img_names") if isinstance(meta, dict) else None
        if not isinstance(names, list):
            raise DataError(f"{meta_path} has no img_names list; add one (data.type=sana_img)")
        seen: set[str] = set()
        for name in names:
            if not isinstance(name, str) or not name.strip():
                skips.add("invalid entry")
                continue
            if name in seen:
                skips.add("duplicate entry")
                continue
            seen.add(name)
            entry = root / name
            if PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS:
                stem, candidates = entry.with_suffix(""), [entry]
            else:
                stem = entry
                candidates = [Path(f"{entry}{ext}") for ext in _SANA_EXTENSION_ORDER]
            if _inside(stem, base) is None:
                skips.add("path escapes root")
                continue
            image = next((c for c in candidates if c.exists()), candidates[0])
            resolved = _check_image(image, base, skips)
            if resolved is None:
                continue
            caption, reason = _read_caption_file(Path(f"{stem}.txt"), "", first_line=True)
            caption = _accept_caption(caption, reason, skips)
            if caption is None:
                continue
            records.append(Record(id=f"{ri}:{name}", caption=caption, path=str(resolved)))
    return records


def index_image_folder(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index images anywhere below each root, captioned by a same-stem ``.txt`` or ``.json``.

    ``.txt`` wins when both exist. Hidden directories (``.cache``, ``.ipynb_checkpoints``) are
    not searched; symlinks are followed only if they resolve inside the root.
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
                resolved = _check_image(path, base, skips)
                if resolved is None:
                    continue
                txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
                if txt.is_file():
                    caption, reason = _read_caption_file(txt, caption_key)
                elif js.is_file():
                    caption, reason = _read_caption_file(js, caption_key)
                else:
                    caption, reason = None, "missing caption"
                caption = _accept_caption(caption, reason, skips)
                if caption is None:
                    continue
                records.append(Record(_rel_id(ri, path, root), caption, str(resolved)))
    return records


def _load_metadata_rows(path: Path, skips: SkipCounter) -> list[dict[str, Any]]:
    """Rows of a ``metadata.jsonl``/``.csv`` via the ``datasets`` loaders.

    The loader runs against a throwaway cache dir so nothing lands in ``~/.cache``. It rejects
    a whole file over one malformed JSON line; then the lines are parsed one by one so the bad
    ones are skipped and counted rather than failing the dataset.
    """
    import datasets

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
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skips.add("malformed metadata line")
                continue
            if not isinstance(row, dict):
                skips.add("malformed metadata line")
                continue
            rows.append(row)
    return rows


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
        base = root.resolve()
        metas = sorted(p for name in _HF_METADATA_NAMES for p in root.rglob(name) if p.is_file())
        if not metas:
            raise DataError(
                f"{root} has no metadata.jsonl (data.type=hf_imagefolder); add one with "
                f"file_name and text columns or use data.type=image_folder"
            )
        for meta in metas:
            meta_dir = meta.parent.resolve()
            rows = _load_metadata_rows(meta, skips)
            columns = set().union(*(r.keys() for r in rows)) if rows else set()
            column = next((c for c in (caption_key, "text") if c in columns), None)
            if rows and column is None:
                raise DataError(
                    f"{meta} has no {caption_key!r} or 'text' column; set data.caption_key to "
                    f"the caption column"
                )
            for row in rows:
                name = row.get("file_name")
                if not isinstance(name, str) or not name.strip():
                    skips.add("invalid metadata row")
                    continue
                path = meta.parent / name
                if _inside(path, meta_dir) is None:
                    skips.add("path escapes root")
                    continue
                resolved = _check_image(path, base, skips)
                if resolved is None:
                    continue
                value = row.get(column)
                caption = _accept_caption(
                    value if isinstance(value, str) else None, "missing caption", skips
                )
                if caption is None:
                    continue
                records.append(Record(_rel_id(ri, path, root), caption, str(resolved)))
    return records


def _shards(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".tar" else []
    return sorted(p for p in root.rglob("*.tar") if p.is_file())


def _tar_members(shard: Path, skips: SkipCounter) -> list[tarfile.TarInfo]:
    """Regular-file headers of ``shard``; a truncated tail keeps the members read before it."""
    members: list[tarfile.TarInfo] = []
    try:
        # "r:" = uncompressed only: byte offsets into compressed streams are useless.
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if info.isreg():
                    members.append(info)
    except (tarfile.TarError, OSError, EOFError):
        skips.add("unreadable shard")
    return members


def index_webdataset(
    roots: Sequence[Path], skips: SkipCounter, caption_key: str = "caption"
) -> list[Record]:
    """Index webdataset ``.tar`` shards (a root may also be a single ``.tar`` file).

    Random access design: one pass over each shard's *headers* (``tarfile`` seeks over member
    data) records every member's byte offset and size; samples are grouped with webdataset's
    own key rule (``webdataset.tariterators.base_plus_ext``: key = path up to the first dot of
    the basename, consecutive members with one key form a sample). Only the small caption
    members are read at index time; ``__getitem__`` reads an image with one seek + read, so
    memory stays O(samples) regardless of shard size and workers need no shared handles.
    Compressed shards (``.tar.gz``) are not indexed because they cannot be seeked into.
    """
    from webdataset.tariterators import base_plus_ext

    records: list[Record] = []
    for ri, root in enumerate(roots):
        for shard in _shards(root):
            rel_shard = shard.name if root.is_file() else shard.relative_to(root).as_posix()
            shard_size = shard.stat().st_size
            groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
            for info in _tar_members(shard, skips):
                key, ext = base_plus_ext(info.name)
                if key is None:
                    continue  # e.g. "README" without an extension: not part of any sample
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext.lower()] = info
            seen: set[str] = set()
            with open(shard, "rb") as f:
                for key, parts in groups:
                    sample_id = f"{ri}:{rel_shard}/{key}"
                    if sample_id in seen:
                        skips.add("duplicate key")
                        continue
                    seen.add(sample_id)
                    image = next((parts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in parts), None)
                    if image is None:
                        skips.add("missing image")
                        continue
                    if image.size == 0:
                        skips.add("empty image file")
                        continue
                    if image.offset_data + image.size > shard_size:
                        skips.add("truncated member")
                        continue
                    cap_info = parts.get("txt") or parts.get("json")
                    if cap_info is None:
                        caption, reason = None, "missing caption"
                    else:
                        f.seek(cap_info.offset_data)
                        data = f.read(cap_info.size)
                        if cap_info.name.lower().endswith(".json"):
                            caption, reason = _caption_from_json(data, caption_key)
                        else:
                            caption, reason = _decode_text(data), "unreadable caption"
                    caption = _accept_caption(caption, reason, skips)
                    if caption is None:
                        continue
                    records.append(
                        Record(
                            id=sample_id,
                            caption=caption,
                            path=str(shard.resolve()),
                            offset=image.offset_data,
                            size=image.size,
                        )
                    )
    return records


INDEXERS: dict[str, Callable[[Sequence[Path], SkipCounter, str], list[Record]]] = {
    "sana_img": index_sana_img,
    "image_folder": index_image_folder,
    "hf_imagefolder": index_hf_imagefolder,
    "webdataset": index_webdataset,
}


def _as_roots(data_dir: Any) -> list[str]:
    """``data.data_dir`` as a list of strings (a single string is one root)."""
    if data_dir is None:
        return []
    if isinstance(data_dir, str | os.PathLike):
        return [os.fspath(data_dir)]
    return [os.fspath(d) for d in data_dir]


def build_dataset(cfg_data: Any, image_size: int, seed: int) -> Dataset:
    """Build the training dataset described by ``cfg_data`` (the ``data`` config section).

    Reads ``type``, ``data_dir``, ``caption_key`` (default ``"caption"``) and ``random_flip``.
    Raises :class:`DataError` for an unknown type, a missing root, or no usable samples; skipped
    samples are logged once as a summary and kept on ``dataset.skips``.
    """
    kind = getattr(cfg_data, "type", None)
    if kind == "shapes":
        # Imported lazily: the procedural dataset is independent of every on-disk format.
        from sanakit.data.shapes import ShapesDataset

        return ShapesDataset(image_size=image_size, seed=seed)
    if kind not in INDEXERS:
        known = ", ".join(["shapes", *INDEXERS])
        raise DataError(f"unknown data.type {kind!r}; use one of {known}")
    roots = _as_roots(getattr(cfg_data, "data_dir", None))
    if not roots:
        raise DataError(f'data.type={kind} needs data.data_dir; set --data.data_dir="[DIR1,DIR2]"')
    paths = [Path(r).expanduser() for r in roots]
    for path in paths:
        if not path.exists():
            raise DataError(
                f"data root {path} does not exist (data.type={kind}); fix data.data_dir"
            )
        if not path.is_dir() and not (kind == "webdataset" and path.suffix == ".tar"):
            raise DataError(
                f"data root {path} is not a directory (data.type={kind}); fix data.data_dir"
            )
    caption_key = getattr(cfg_data, "caption_key", None) or "caption"
    skips = SkipCounter()
    records = INDEXERS[kind](paths, skips, caption_key)
    if not records:
        raise DataError(
            f"no usable samples in {[str(p) for p in paths]} (data.type={kind}, "
            f"{skips.summary()}); {_HINTS[kind]}"
        )
    if skips.total:
        logger.warning("data.type=%s: %s", kind, skips.summary())
    return CaptionedImageDataset(
        records,
        image_size=image_size,
        seed=seed,
        random_flip=bool(getattr(cfg_data, "random_flip", False)),
        format=kind,
        roots=[str(p) for p in paths],
        skips=skips,
    )
