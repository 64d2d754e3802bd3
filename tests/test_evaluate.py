"""Tests for the analytic shapes classifier and the eval harness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sanakit.data.shapes import COLOURS, SHAPES, ShapesDataset, all_prompts, render
from sanakit.evaluate import classify_image, evaluate, format_table, to_uint8


def _ground_truth_sampler(image_size: int = 32, override=None):
    """A sample_fn that draws exactly what each caption asks for (optionally overridden)."""
    calls: list[tuple[int, float, int]] = []

    def sample_fn(captions: list[str], cfg_scale: float, seed: int) -> np.ndarray:
        calls.append((len(captions), cfg_scale, seed))
        out = []
        for i, caption in enumerate(captions):
            _, colour, shape = caption.split()
            if override is not None:
                colour, shape = override(colour, shape)
            rng = np.random.default_rng([seed, i])
            out.append(render(colour, shape, image_size, rng))
        return np.stack(out)

    sample_fn.calls = calls  # type: ignore[attr-defined]
    return sample_fn


@pytest.mark.parametrize("image_size", [32, 16])
def test_classifier_accuracy_on_dataset_images(image_size: int) -> None:
    ds = ShapesDataset(image_size=image_size, seed=11)
    images = to_uint8(torch.stack([ds[i]["pixels"] for i in range(600)]))
    colour_ok = shape_ok = 0
    for i, img in enumerate(images):
        colour, shape = classify_image(img)
        colour_ok += colour == ds[i]["colour"]
        shape_ok += shape == ds[i]["shape"]
    assert colour_ok / 600 >= 0.98
    assert shape_ok / 600 >= 0.98


def test_classifier_tolerates_pixel_noise() -> None:
    ds = ShapesDataset(image_size=32, seed=12)
    rng = np.random.default_rng(0)
    both = 0
    for i in range(120):
        d = ds[i]
        img = to_uint8(d["pixels"][None])[0].astype(np.float64)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).round().astype(np.uint8)
        both += classify_image(img) == (d["colour"], d["shape"])
    assert both / 120 >= 0.95


def test_classifier_rejects_blank_images() -> None:
    assert classify_image(np.zeros((32, 32, 3), np.uint8)) == ("none", "none")
    assert classify_image(np.full((16, 16, 3), 180, np.uint8)) == ("none", "none")
    faint = np.zeros((32, 32, 3), np.uint8)
    faint[10:20, 10:20] = (12, 0, 0)  # far below any drawn colour
    assert classify_image(faint) == ("none", "none")
    with pytest.raises(ValueError):
        classify_image(np.zeros((32, 32), np.uint8))


def test_classifier_ignores_a_stray_speck() -> None:
    img = render("blue", "circle", 32, np.random.default_rng(3))
    img[(1, 2, 1, 2), (1, 1, 2, 2)] = COLOURS["blue"]  # 2x2 speck in the corner
    assert classify_image(img) == ("blue", "circle")


def test_to_uint8_rounds_clamps_and_permutes() -> None:
    x = torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0, 0.5]).view(1, 3, 1, 2)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255]
    assert out[0, 0, :, 1].tolist() == [128, 0]
    assert out[0, 0, :, 2].tolist() == [255, 191]
    # Dataset pixels are exact multiples of 1/127.5, so the round trip is lossless.
    pixels = torch.stack([ShapesDataset(seed=0)[i]["pixels"] for i in range(4)])
    back = torch.from_numpy(to_uint8(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(back, pixels, atol=1e-6)


def test_evaluate_scores_ground_truth_images_near_perfectly() -> None:
    sample_fn = _ground_truth_sampler(32)
    report = evaluate(sample_fn, samples_per_prompt=6, cfg_scales=[1.0, 4.5], seed=7)
    json.dumps(report)  # must be JSON-able
    assert report["samples_per_prompt"] == 6
    assert report["num_prompts"] == len(COLOURS) * len(SHAPES)
    assert set(report["cfg_scales"]) == {"1.0", "4.5"}
    for row in report["cfg_scales"].values():
        assert row["colour"] >= 0.98 and row["shape"] >= 0.98 and row["both"] >= 0.98
        assert set(row["per_prompt"]) == set(all_prompts())
    n = 6 * len(COLOURS) * len(SHAPES)
    assert sample_fn.calls == [(n, 1.0, 7), (n, 4.5, 7)]


def test_evaluate_random_noise_scores_near_chance() -> None:
    def noise_fn(captions: list[str], cfg_scale: float, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (len(captions), 32, 32, 3), dtype=np.uint8)

    report = evaluate(noise_fn, samples_per_prompt=6, cfg_scales=[3.0])
    row = report["cfg_scales"]["3.0"]
    assert row["colour"] <= 0.35  # chance is 1/6
    assert row["shape"] <= 0.5  # chance is 1/3
    assert row["both"] <= 0.2


def test_evaluate_scores_colour_and_shape_separately_per_prompt() -> None:
    # Always red: colour right only for red prompts; shape always right.
    report = evaluate(
        _ground_truth_sampler(16, override=lambda c, s: ("red", s)),
        samples_per_prompt=3,
        cfg_scales=[2.0],
    )
    row = report["cfg_scales"]["2.0"]
    assert row["shape"] >= 0.98
    assert abs(row["colour"] - 1 / len(COLOURS)) < 0.02
    assert row["per_prompt"]["a red square"]["both"] == 1.0
    assert row["per_prompt"]["a blue square"] == {"colour": 0.0, "shape": 1.0, "both": 0.0}

    # Only the requested subset of prompts is sampled; one prompt is drawn as the wrong shape.
    prompts = [("green", "triangle"), ("cyan", "circle")]
    wrong = evaluate(
        _ground_truth_sampler(32, override=lambda c, s: (c, "square" if c == "cyan" else s)),
        prompts=prompts,
        samples_per_prompt=4,
        cfg_scales=[1.0],
    )
    row = wrong["cfg_scales"]["1.0"]
    assert wrong["num_prompts"] == 2
    assert row["per_prompt"]["a green triangle"]["both"] == 1.0
    assert row["per_prompt"]["a cyan circle"] == {"colour": 1.0, "shape": 0.0, "both": 0.0}
    assert row["shape"] == 0.5 and row["colour"] == 1.0


def test_evaluate_rejects_wrongly_sized_samples() -> None:
    def short_fn(captions: list[str], cfg_scale: float, seed: int) -> np.ndarray:
        return np.zeros((len(captions) - 1, 32, 32, 3), np.uint8)

    with pytest.raises(ValueError, match="sample_fn returned"):
        evaluate(short_fn, samples_per_prompt=2, cfg_scales=[1.0])


def test_format_table_lists_each_scale() -> None:
    report = evaluate(_ground_truth_sampler(16), samples_per_prompt=2, cfg_scales=[1.0, 4.5])
    table = format_table(report)
    lines = table.splitlines()
    assert "colour %" in lines[0] and "shape %" in lines[0] and "both %" in lines[0]
    rows = [ln.split() for ln in lines[1:3]]
    assert [r[0] for r in rows] == ["1.0", "4.5"]
    assert all(float(v) >= 98.0 for r in rows for v in r[1:])
