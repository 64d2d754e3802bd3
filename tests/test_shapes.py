"""Tests for the built-in procedural shapes dataset."""

from __future__ import annotations

import colorsys
import hashlib
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from sanakit.data.shapes import COLOURS, SHAPES, ShapesDataset, all_prompts, render


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_colours_are_saturated_and_hues_well_separated() -> None:
    assert len(COLOURS) >= 6
    hues = sorted(colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360 for rgb in COLOURS.values())
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() >= 50  # a hue classifier needs clear margins between colours
    for rgb in COLOURS.values():
        assert colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[1] >= 0.7


def test_all_prompts_covers_every_pair_in_fixed_order() -> None:
    prompts = all_prompts()
    assert SHAPES == ("circle", "square", "triangle")
    assert len(prompts) == len(set(prompts)) == len(COLOURS) * len(SHAPES)
    assert set(prompts) == {f"a {c} {s}" for c in COLOURS for s in SHAPES}
    assert prompts == all_prompts()
    assert prompts[0] == f"a {next(iter(COLOURS))} circle"


def test_item_format_and_value_range() -> None:
    ds = ShapesDataset(image_size=32, seed=3, length=100)
    assert len(ds) == 100
    item = ds[5]
    assert set(item) == {"pixels", "caption", "colour", "shape", "id"}
    px = item["pixels"]
    assert px.dtype == torch.float32 and px.shape == (3, 32, 32)
    assert px.min() >= -1.0 and px.max() <= 1.0
    assert px.max() > 0.5 and px.min() < -0.8  # a bright shape on a dark background
    assert item["colour"] in COLOURS and item["shape"] in SHAPES
    assert item["caption"] == f"a {item['colour']} {item['shape']}"
    assert item["id"] == "shapes/3/5"
    assert ShapesDataset(image_size=16)[0]["pixels"].shape == (3, 16, 16)


def test_deterministic_in_seed_and_index() -> None:
    a, b = ShapesDataset(seed=0), ShapesDataset(seed=0)
    for i in (0, 1, 123, 59999):
        x, y = a[i], b[i]
        assert torch.equal(x["pixels"], y["pixels"]) and x["caption"] == y["caption"]
        assert torch.equal(a[i]["pixels"], x["pixels"])  # repeated calls too
    # Access order must not matter (no shared RNG state).
    assert torch.equal(ShapesDataset(seed=0)[123]["pixels"], a[123]["pixels"])
    other = ShapesDataset(seed=1)
    assert sum(not torch.equal(a[i]["pixels"], other[i]["pixels"]) for i in range(20)) >= 19
    assert sum(not torch.equal(a[i]["pixels"], a[i + 1]["pixels"]) for i in range(20)) >= 19


def test_same_output_in_another_process() -> None:
    code = (
        "from sanakit.data.shapes import ShapesDataset;"
        "d = ShapesDataset(seed=4)[77];"
        "print(d['caption'], float(d['pixels'].double().mul(1e3).round().sum()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    d = ShapesDataset(seed=4)[77]
    assert out[:-1] == d["caption"].split()
    assert float(out[-1]) == float(d["pixels"].double().mul(1e3).round().sum())


def test_every_colour_and_shape_appears_roughly_uniformly() -> None:
    ds = ShapesDataset(image_size=16, seed=2)
    n = 360
    counts = Counter((ds[i]["colour"], ds[i]["shape"]) for i in range(n))
    assert set(counts) == {(c, s) for c in COLOURS for s in SHAPES}
    expected = n / (len(COLOURS) * len(SHAPES))
    assert min(counts.values()) >= expected / 3 and max(counts.values()) <= expected * 2.5


def test_sizes_and_positions_vary_and_stay_inside() -> None:
    ds = ShapesDataset(image_size=32, seed=5)
    spans, centres = [], []
    for i in range(150):
        img = _uint8(ds[i]["pixels"])
        fg = img.max(axis=-1) > 100
        ys, xs = np.nonzero(fg)
        assert len(ys) > 0
        spans.append(max(np.ptp(ys), np.ptp(xs)) + 1)
        centres.append(((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2))
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert border.max() <= 40  # the whole shape is inside: the border is background
    spans_frac = np.array(spans) / 32
    assert spans_frac.min() >= 0.3 and spans_frac.max() <= 0.8
    assert spans_frac.max() - spans_frac.min() >= 0.3
    centres_arr = np.array(centres)
    assert np.ptp(centres_arr[:, 0]) >= 8 and np.ptp(centres_arr[:, 1]) >= 8
    assert len({tuple(c) for c in centres}) >= 50


def test_background_is_dark_and_foreground_has_the_named_colour() -> None:
    rng = np.random.default_rng(0)
    for colour, rgb in COLOURS.items():
        img = render(colour, "square", 32, rng)
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
        assert img[0, 0].max() <= 24
        brightest = img.reshape(-1, 3)[img.reshape(-1, 3).sum(axis=1).argmax()]
        assert np.abs(brightest.astype(int) - np.array(rgb)).max() <= 1


def test_render_rejects_unknown_names_and_dataset_checks_indices() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render("chartreuse", "circle", 32, rng)
    with pytest.raises(ValueError):
        render("red", "hexagon", 32, rng)
    ds = ShapesDataset(length=10)
    with pytest.raises(IndexError):
        ds[10]
    assert torch.equal(ds[-1]["pixels"], ds[9]["pixels"])
    assert ds[-1]["id"] == "shapes/0/9"


def test_getitem_renders_many_items() -> None:
    # a speed bound lives in benchmarks/, not here: timings on a shared CI machine are noise
    ds = ShapesDataset(image_size=32)
    for i in range(200):
        assert ds[i]["pixels"].shape == (3, 32, 32)


# sha256 over (pixels, caption) of items 0..199 at seed 7, measured with the one-image-at-a-time
# renderer that preceded batched rendering: the data values must never change silently
GOLDEN = {
    16: "5d4f86c2c1e314cb2703f0caca67798a1cabc761a95bc98b5f8d46f3db3cf4aa",
    32: "b2a8fe5796ff12fc29a76fda9b251787586c3f1815c078d81f5918b38b5926c1",
}


@pytest.mark.parametrize("size", sorted(GOLDEN))
def test_batched_rendering_is_bit_identical_to_one_at_a_time(size: int) -> None:
    ds = ShapesDataset(image_size=size, seed=7)
    batch = ds.__getitems__(range(200))  # what the DataLoader calls for a batch
    digest = hashlib.sha256()
    for i, item in enumerate(batch):
        alone = ds[i]
        assert torch.equal(item["pixels"], alone["pixels"]) and item["caption"] == alone["caption"]
        digest.update(item["pixels"].numpy().tobytes())
        digest.update(item["caption"].encode())
    assert digest.hexdigest() == GOLDEN[size]
    shuffled = ds.__getitems__([150, 3, -1, 3])  # order and repeats do not matter
    assert torch.equal(shuffled[0]["pixels"], batch[150]["pixels"])
    assert torch.equal(shuffled[2]["pixels"], ds[199 + (len(ds) - 200)]["pixels"])
    assert torch.equal(shuffled[1]["pixels"], shuffled[3]["pixels"])
    with pytest.raises(IndexError):
        ds.__getitems__([0, len(ds)])
