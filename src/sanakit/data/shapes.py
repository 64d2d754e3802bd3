"""Built-in procedural "shapes" dataset: one coloured shape on a dark background.

Every image is generated on the fly from ``(seed, index)``, so the dataset needs no files on
disk and is identical across processes, workers and runs.
"""

from __future__ import annotations

import math
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


def caption_for(colour: str, shape: str) -> str:
    """The caption used for a (colour, shape) pair, e.g. ``"a green triangle"``."""
    return f"a {colour} {shape}"


def all_prompts() -> list[str]:
    """Every ``"a {colour} {shape}"`` caption, colour-major in ``COLOURS``/``SHAPES`` order."""
    return [caption_for(c, s) for c in COLOURS for s in SHAPES]


def _coverage(shape: str, span: float, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (HxW float32) of one shape placed fully inside the image."""
    n = image_size * _SUPERSAMPLE
    s = span * n  # extent in supersampled pixels
    if shape == "triangle":
        # Upright isosceles triangle (base = height = s), tilted slightly about its centroid.
        verts = np.array([[0.0, -2 * s / 3], [s / 2, s / 3], [-s / 2, s / 3]])
        t = rng.uniform(-_MAX_TRIANGLE_TILT, _MAX_TRIANGLE_TILT)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        verts = verts @ rot.T
        lo, hi = verts.min(axis=0), verts.max(axis=0)
    else:
        lo, hi = np.array([-s / 2, -s / 2]), np.array([s / 2, s / 2])
    # Keep the whole shape (plus one output pixel of margin) inside the image.
    margin = _SUPERSAMPLE
    cx = rng.uniform(margin - lo[0], n - margin - hi[0])
    cy = rng.uniform(margin - lo[1], n - margin - hi[1])

    coords = np.arange(n, dtype=np.float32) + 0.5  # supersample centres
    x = coords[None, :] - np.float32(cx)
    y = coords[:, None] - np.float32(cy)
    if shape == "circle":
        mask = x * x + y * y <= np.float32((s / 2) ** 2)
    elif shape == "square":
        half = np.float32(s / 2)
        mask = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        mask = np.ones((n, n), dtype=bool)
        for k in range(3):  # inside = on the positive side of all three edges (y points down)
            (x0, y0), (x1, y1) = verts[k], verts[(k + 1) % 3]
            mask &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    f = _SUPERSAMPLE
    return mask.reshape(image_size, f, image_size, f).mean(axis=(1, 3), dtype=np.float32)


def render(colour: str, shape: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one ``colour`` ``shape`` at a random size and position; returns uint8 HxWx3."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    span = rng.uniform(_MIN_SPAN, _MAX_SPAN)
    alpha = _coverage(shape, span, image_size, rng)[..., None]
    bg = np.float32(rng.integers(0, _MAX_BACKGROUND + 1))
    fg = np.asarray(COLOURS[colour], dtype=np.float32)
    img = bg + alpha * (fg - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


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

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        # SeedSequence over (seed, i): independent, reproducible streams per item, no global state.
        rng = np.random.default_rng([self.seed, i])
        colour = self._colours[int(rng.integers(len(self._colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        img = render(colour, shape, self.image_size, rng)
        pixels = torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return {
            "pixels": pixels,
            "caption": caption_for(colour, shape),
            "colour": colour,
            "shape": shape,
            "id": f"shapes/{self.seed}/{i}",
        }
