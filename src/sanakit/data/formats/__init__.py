"""On-disk dataset formats, one module each; every one indexes roots into :class:`Record` s.

* ``sana_img`` -- NVlabs/Sana's ``SanaImgDataset`` folder: ``meta_data.json`` with ``img_names``
  and the caption on the first line of ``{stem}.txt`` next to each image.
* ``image_folder`` -- images anywhere below the root with a same-stem ``.txt`` or ``.json``.
* ``hf_imagefolder`` -- Hugging Face ``imagefolder`` layout (``metadata.jsonl``/``.csv``).
* ``webdataset`` -- uncompressed ``.tar`` shards with ``key.{jpg,png,webp}`` plus a caption.

An indexer takes ``(roots, skips, caption_key)`` and returns records; it counts every skipped
sample by reason and raises :class:`sanakit.errors.DataError` only when a root is unusable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sanakit.data.formats import hf_imagefolder, image_folder, sana_img, webdataset
from sanakit.data.formats.hf_imagefolder import HF_METADATA_NAMES
from sanakit.data.images import IMAGE_EXTENSIONS
from sanakit.data.records import Record, SkipCounter

Indexer = Callable[[Sequence[Path], SkipCounter, str], list[Record]]

INDEXERS: dict[str, Indexer] = {
    "sana_img": sana_img.index_sana_img,
    "image_folder": image_folder.index_image_folder,
    "hf_imagefolder": hf_imagefolder.index_hf_imagefolder,
    "webdataset": webdataset.index_webdataset,
}

#: What each format needs, for error messages and the doctor.
FORMAT_HINTS: dict[str, str] = {
    "sana_img": sana_img.HINT,
    "image_folder": image_folder.HINT,
    "hf_imagefolder": hf_imagefolder.HINT,
    "webdataset": webdataset.HINT,
}

__all__ = ["FORMAT_HINTS", "HF_METADATA_NAMES", "IMAGE_EXTENSIONS", "INDEXERS", "Indexer"]
