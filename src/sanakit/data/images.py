"""Image decoding: any PIL mode to RGB uint8, EXIF orientation, resize to cover, center crop.

Sample pixels are a float tensor ``[3, H, W]`` in ``[-1, 1]``. Decoding errors are whatever PIL
raises for corrupt or hostile files (:data:`IMAGE_ERRORS`); callers turn them into a dropped sample.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

#: Image extensions accepted by every file-based format (matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What PIL raises on corrupt, truncated or hostile files; anything else is a bug and propagates.
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height are swapped.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Full scale of the integer and float modes PIL's own convert() clips to 0-255 (a 16-bit PNG
# would come out solid white). "I" is where older Pillow and TIFF put 16-bit samples; "F" holds
# floats in [0, 1], the convention of float images written by imaging libraries.
_FULL_SCALE: dict[str, float] = {"I": 65535.0, "F": 1.0}


def _full_scale(mode: str) -> float | None:
    if mode.startswith("I;16"):
        return 65535.0
    return _FULL_SCALE.get(mode)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image, whatever its PIL mode.

    High-bit-depth grey (``I;16*``, ``I``, ``F``) is scaled from its full range to 0-255 (PIL
    would clip it); alpha is dropped, as Sana's loader does; every other mode uses PIL's own
    conversion (palette, CMYK, YCbCr, LAB, HSV included).
    """
    scale = _full_scale(img.mode)
    if scale is not None:
        grey = np.asarray(img, dtype=np.float64) * (255.0 / scale)
        grey = np.nan_to_num(grey, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "La":  # premultiplied grey+alpha: PIL converts it only via LA
        img = img.convert("LA")
    return img.convert("RGB")


def is_transposed(img: Image.Image) -> bool:
    """Whether the EXIF orientation rotates by 90 degrees (stored width/height are swapped)."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except IMAGE_ERRORS:  # a broken EXIF block must not hide an otherwise fine image
        return False
    return orientation in _TRANSPOSED_ORIENTATIONS


@dataclass(frozen=True)
class CropPlan:
    """How an image of a given displayed size becomes a ``height x width`` sample: resize to
    cover, then center crop. Decided from the header size alone, so a cache can be keyed by it
    without decoding a pixel."""

    height: int
    width: int
    resize_h: int
    resize_w: int
    left: int
    top: int


def plan_crop(source_h: int, source_w: int, height: int, width: int) -> CropPlan:
    """The resize and center-crop box that turn ``source_h x source_w`` into ``height x width``."""
    scale = max(height / source_h, width / source_w)
    new_h = max(height, round(source_h * scale))
    new_w = max(width, round(source_w * scale))
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return CropPlan(height, width, new_h, new_w, left, top)


def load_image(source: Any, height: int, width: int, flip: bool = False) -> torch.Tensor:
    """Decode ``source`` to RGB, resize to cover ``height x width``, center crop, maybe flip.

    Returns a float tensor ``[3, height, width]`` in ``[-1, 1]``. Raises what PIL raises for a
    corrupt file; callers turn that into a dropped sample.
    """
    with Image.open(source) as img:
        transposed = is_transposed(img)
        w0, h0 = img.size[::-1] if transposed else img.size
        plan = plan_crop(h0, w0, height, width)
        new_h, new_w = plan.resize_h, plan.resize_w
        shrink = max(height / h0, width / w0) < 1
        if shrink:
            # JPEG only: decode at a reduced DCT scale that is still >= the needed size, which
            # makes big photos several times cheaper. draft() works in stored orientation.
            img.draft("RGB", (new_h, new_w) if transposed else (new_w, new_h))
        rgb = to_rgb(ImageOps.exif_transpose(img))
    # Lanczos keeps detail when shrinking; bicubic avoids ringing when upscaling small images.
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    if rgb.size != (new_w, new_h):
        rgb = rgb.resize((new_w, new_h), resample)
    left, top = plan.left, plan.top
    rgb = rgb.crop((left, top, left + width, top + height))
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(rgb, dtype=np.uint8)  # a writable copy, so torch does not warn
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def read_image_size(source: Any) -> tuple[int, int]:
    """``(height, width)`` as displayed (after EXIF orientation), from the header only."""
    with Image.open(source) as img:
        w, h = img.size
        return (w, h) if is_transposed(img) else (h, w)
