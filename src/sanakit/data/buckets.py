"""Aspect-ratio buckets (``model.multi_scale=true``): Sana's ratio tables and assignment.

A bucket table maps a ratio key (``"0.5"`` = height/width) to a ``(height, width)`` of roughly
``base_size**2`` pixels. Sana's own tables (as shipped by diffusers' Sana pipeline) are used for
the sizes they exist for; any other base size scales the 512 table and rounds every side to a
multiple of ``multiple`` (the latent stride times the patch size, 32 by default).

How an index gets its bucket size: :func:`assign_buckets` reads the dataset's ``image_sizes()``,
assigns every index the closest-ratio bucket once, and hands the per-index ``(height, width)``
list to ``dataset.set_target_sizes``; ``dataset[i]`` then resizes and crops to that size. The
assignment never changes between epochs, so it is set once, before the DataLoader creates its
iterator (workers copy the dataset at that moment). Batching by bucket is the job of the one
resumable sampler (``data/sampler.py``, its ``groups`` argument).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sanakit.errors import ConfigError

BucketTable = dict[str, tuple[int, int]]


def _sana_tables() -> dict[int, Mapping[str, Sequence[float]]]:
    """Sana's ratio tables by base size, imported from diffusers (never retyped here)."""
    from diffusers.pipelines.sana import pipeline_sana as sana  # heavy; only multi_scale needs it

    tables = {512: sana.ASPECT_RATIO_512_BIN, 1024: sana.ASPECT_RATIO_1024_BIN}
    # Larger tables exist in newer diffusers releases; use them when present.
    for size in (2048, 4096):
        table = getattr(sana, f"ASPECT_RATIO_{size}_BIN", None)
        if table is not None:
            tables[size] = table
    return tables


def bucket_table(base_size: int, multiple: int = 32) -> BucketTable:
    """The ``{ratio_key: (height, width)}`` bucket table for ``base_size``.

    Uses Sana's table for ``base_size`` when one exists and all its sides are multiples of
    ``multiple``; otherwise scales the 512 table by ``base_size / 512``, rounds each side to the
    nearest multiple of ``multiple`` (at least ``multiple``), keys each bucket by its rounded size's
    ratio, and merges buckets that collapse together, so small base sizes give fewer buckets.
    """
    if base_size < 1 or multiple < 1:
        raise ConfigError(
            f"bucket base size {base_size} and multiple {multiple} must be positive; "
            f"fix model.image_size"
        )
    tables = _sana_tables()
    exact = tables.get(base_size)
    if exact is not None and all(int(v) % multiple == 0 for hw in exact.values() for v in hw):
        return {key: (int(h), int(w)) for key, (h, w) in exact.items()}
    scale = base_size / 512
    out: BucketTable = {}
    for h, w in tables[512].values():
        # floor(x + 0.5): round half up, unlike round()'s banker's rounding.
        hw = (
            max(multiple, math.floor(h * scale / multiple + 0.5) * multiple),
            max(multiple, math.floor(w * scale / multiple + 0.5) * multiple),
        )
        # Re-key by the rounded size's real ratio; entries that collapse together merge.
        out.setdefault(str(round(hw[0] / hw[1], 2)), hw)
    return out


def assign_bucket(height: int, width: int, table: Mapping[str, Sequence[int]]) -> str:
    """Key of the bucket whose aspect ratio is closest to ``height / width``.

    Distance is measured in log-ratio, so 1:2 and 2:1 are equally far from 1:1; ties go to the
    first bucket in table order, which keeps the assignment deterministic.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target = math.log(height / width)
    return min(table, key=lambda k: abs(math.log(table[k][0] / table[k][1]) - target))


def assign_buckets(dataset: Any, table: Mapping[str, Sequence[int]]) -> list[str]:
    """Give every index its closest-ratio bucket and tell the dataset to resize to it.

    Returns each index's bucket key, the ``groups`` of ``data.sampler.ResumableSampler`` (a
    batch never mixes buckets). The dataset must provide ``image_sizes()`` and
    ``set_target_sizes()`` (all on-disk formats do; the built-in shapes dataset does not).
    """
    if not (hasattr(dataset, "image_sizes") and hasattr(dataset, "set_target_sizes")):
        raise ConfigError(
            f"{type(dataset).__name__} has no per-image sizes, so it cannot use aspect-ratio "
            "buckets; set model.multi_scale=false"
        )
    keys = [assign_bucket(h, w, table) for h, w in dataset.image_sizes()]
    dataset.set_target_sizes([(int(table[k][0]), int(table[k][1])) for k in keys])
    return keys
