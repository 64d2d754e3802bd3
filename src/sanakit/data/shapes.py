"""Built-in procedural "shapes" dataset: one coloured shape on a dark background.

Every image is generated on the fly from ``(seed, index)``, so the dataset needs no files on
disk and is identical across processes, workers and runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Six saturated hues 60 degrees apart: a hue classifier separates them with a 30 degree margin.
# Two channels are always equal, so each colour sits exactly on its hue.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (230, 230, 30),
    "green": (30, 230, 30),
    "cyan": (30, 230, 230),
    "blue": (30, 30, 230),
    "magenta": (230, 30, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

_SUPERSAMPLE = 4  # render at 4x and box-downsample: cheap anti-aliasing
_MIN_SPAN, _MAX_SPAN = 0.35, 0.75  # shape extent as a fraction of the image side
_MAX_TRIANGLE_TILT = math.radians(8.0)  # small tilt only, so triangles stay recognisable
_MAX_BACKGROUND = 24  # near-black grey level; far below every colour's brightest channel
_MAX_GRID_VALUES = 1 << 22  # supersampled pixels rendered at once (32 MB of float64 per temporary)


def caption_for(colour: str, shape: str) -> str:
    """The caption used for a (colour, shape) pair, e.g. ``"a green triangle"``."""
    return f"a {colour} {shape}"


def all_prompts() -> list[str]:
    """Every ``"a {colour} {shape}"`` caption, colour-major in ``COLOURS``/``SHAPES`` order."""
    return [caption_for(c, s) for c in COLOURS for s in SHAPES]


@dataclass
class _Draw:
    """One image's random choices, drawn from its own generator in a fixed order."""

    colour: str
    shape: str
    span: float
    verts: np.ndarray | None  # triangle corners relative to the centre (float64)
    lo: np.ndarray
    hi: np.ndarray
    cx: float = 0.0
    cy: float = 0.0
    bg: int = 0


def _draw(colour: str, shape: str, image_size: int, rng: np.random.Generator) -> _Draw:
    """Span, tilt, position and background of one shape, in the order they were always drawn."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    n = image_size * _SUPERSAMPLE
    span = rng.uniform(_MIN_SPAN, _MAX_SPAN)
    s = span * n  # extent in supersampled pixels
    verts = None
    if shape == "triangle":
        # Upright isosceles triangle (base = height = s), tilted slightly about its centroid.
        verts = np.array([[0.0, -2 * s / 3], [s / 2, s / 3], [-s / 2, s / 3]])
        t = rng.uniform(-_MAX_TRIANGLE_TILT, _MAX_TRIANGLE_TILT)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        verts = verts @ rot.T
        lo, hi = verts.min(axis=0), verts.max(axis=0)
    else:
        lo, hi = np.array([-s / 2, -s / 2]), np.array([s / 2, s / 2])
    d = _Draw(colour, shape, span, verts, lo, hi)
    # Keep the whole shape (plus one output pixel of margin) inside the image.
    margin = _SUPERSAMPLE
    d.cx = rng.uniform(margin - lo[0], n - margin - hi[0])
    d.cy = rng.uniform(margin - lo[1], n - margin - hi[1])
    d.bg = int(rng.integers(0, _MAX_BACKGROUND + 1))
    return d


def _column(values: list[float], dtype: type) -> np.ndarray:
    """Per-image scalars as a [B, 1, 1] array, to broadcast against the pixel grid."""
    return np.array(values, dtype=dtype).reshape(-1, 1, 1)


def _masks(shape: str, draws: list[_Draw], image_size: int) -> np.ndarray:
    """Supersampled inside/outside masks [B, n, n] of same-shape draws, all at once.

    Every operation is elementwise with the same dtypes as drawing one image alone (float32
    grid, float64 triangle edges), so each image is bit-identical to rendering it by itself.
    """
    n = image_size * _SUPERSAMPLE
    coords = np.arange(n, dtype=np.float32) + 0.5  # supersample centres
    x = coords[None, None, :] - _column([d.cx for d in draws], np.float32)
    y = coords[None, :, None] - _column([d.cy for d in draws], np.float32)
    if shape == "circle":
        radius2 = [np.float32((d.span * n / 2) ** 2) for d in draws]
        return x * x + y * y <= _column(radius2, np.float32)
    if shape == "square":
        half = _column([np.float32(d.span * n / 2) for d in draws], np.float32)
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    mask = np.ones((len(draws), n, n), dtype=bool)
    for k in range(3):  # inside = on the positive side of all three edges (y points down)
        x0, y0 = (_column([d.verts[k][j] for d in draws], np.float64) for j in (0, 1))
        x1, y1 = (_column([d.verts[(k + 1) % 3][j] for d in draws], np.float64) for j in (0, 1))
        # a - b >= 0 exactly when a >= b for finite doubles (a rounded difference keeps its
        # sign), so the [B, n, n] difference is never made: one comparison of the two factors
        mask &= (x1 - x0) * (y - y0) >= (y1 - y0) * (x - x0)
    return mask


def _box_downsample(mask: np.ndarray, image_size: int) -> np.ndarray:
    """Coverage in [0, 1] of each output pixel: the mean of its f x f supersamples (float32).

    Counts are summed as uint8 over strided views (5x faster than ``mean`` over two axes); a
    count over 16 is exact in float32, so the values equal that mean bit for bit.
    """
    f, b = _SUPERSAMPLE, len(mask)
    rows = mask.view(np.uint8).reshape(b, image_size, f, image_size * f)
    counts = sum(rows[:, :, k] for k in range(f)).reshape(b, image_size, image_size, f)
    counts = sum(counts[..., k] for k in range(f))
    return counts.astype(np.float32) / np.float32(f * f)


def _paint(draws: list[_Draw], image_size: int) -> np.ndarray:
    """uint8 [B, H, W, 3] images of ``draws`` (anti-aliased by box-downsampling 4x masks)."""
    alpha = np.empty((len(draws), image_size, image_size), dtype=np.float32)
    n = image_size * _SUPERSAMPLE
    chunk = max(1, _MAX_GRID_VALUES // (n * n))  # bounds the float64 triangle temporaries
    for shape in SHAPES:
        where = [i for i, d in enumerate(draws) if d.shape == shape]
        for start in range(0, len(where), chunk):
            part = where[start : start + chunk]
            mask = _masks(shape, [draws[i] for i in part], image_size)
            alpha[part] = _box_downsample(mask, image_size)
    # elementwise, so one pass over the whole batch gives each image's own bits
    bg = _column([np.float32(d.bg) for d in draws], np.float32)[..., None]
    fg = np.array([COLOURS[d.colour] for d in draws], dtype=np.float32)[:, None, None, :]
    img = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(colour: str, shape: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one ``colour`` ``shape`` at a random size and position; returns uint8 HxWx3."""
    return _paint([_draw(colour, shape, image_size, rng)], image_size)[0]


class ShapesDataset(Dataset):
    """``length`` procedural images; item ``i`` depends only on ``(seed, i)``.

    ``exclude_colors`` leaves hues out (a base model that never saw them, for fine-tuning
    demos); with none left out the items are those of earlier versions, byte for byte.
    """

    def __init__(
        self,
        image_size: int = 32,
        seed: int = 0,
        length: int = 60000,
        exclude_colors: tuple[str, ...] = (),
    ) -> None:
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.image_size = image_size
        self.seed = seed
        self.length = length
        unknown = [c for c in exclude_colors if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown colour {unknown[0]!r}; expected some of {tuple(COLOURS)}")
        self._colours = tuple(c for c in COLOURS if c not in exclude_colors)
        if not self._colours:
            raise ValueError("exclude_colors leaves no colour to draw")

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        return i

    def _draw(self, i: int) -> _Draw:
        # SeedSequence over (seed, i): independent, reproducible streams per item, no global state.
        rng = np.random.default_rng([self.seed, i])
        colour = self._colours[int(rng.integers(len(self._colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return _draw(colour, shape, self.image_size, rng)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Several items rendered at once (the DataLoader asks for a batch this way); each is
        bit-identical to rendering it alone."""
        indices = [self._index(i) for i in indices]
        draws = [self._draw(i) for i in indices]
        images = torch.from_numpy(_paint(draws, self.image_size))
        pixels = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return [
            {
                "pixels": pixels[k],
                "caption": caption_for(d.colour, d.shape),
                "colour": d.colour,
                "shape": d.shape,
                "id": f"shapes/{self.seed}/{i}",
            }
            for k, (i, d) in enumerate(zip(indices, draws, strict=True))
        ]
