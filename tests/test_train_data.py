"""Training on real image folders through the CLI: aspect-ratio buckets, bad data, resume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST, checkpoint_dir, losses, run_sanakit, the_error_line
from PIL import Image

from sanakit.data.shapes import COLOURS, SHAPES, render


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """40 captioned images of three aspect ratios, plus a corrupt image and an empty caption."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (64, 32), (32, 64)]  # (width, height)
    for i in range(40):
        colour, shape = list(COLOURS)[i % 6], SHAPES[i % 3]
        w, h = sizes[i % 3]
        image = Image.fromarray(render(colour, shape, 32, rng)).resize((w, h))
        sub = root / f"part{i % 2}"
        sub.mkdir(exist_ok=True)
        image.save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.txt").write_text(f"a {colour} {shape}")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "broken.txt").write_text("a broken image")
    (root / "nocaption.png").write_bytes((root / "part0" / "000.png").read_bytes())
    (root / "nocaption.txt").write_text("   ")
    return root


def data_args(root) -> list[str]:
    return [
        *FAST,
        "--model.image_size=32",
        "--data.type=image_folder",
        f"--data.data_dir=[{root}]",
        "--model.multi_scale=true",
        "--train.save_model_steps=100",
    ]


@pytest.mark.slow
def test_buckets_train_skip_bad_data_and_resume_exactly(mixed_folder, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = data_args(mixed_folder)
    first = run_sanakit("train", f"--work_dir={full}", *args, "--train.max_steps=14")
    assert first.returncode == 0, first.stderr[-3000:]
    # the empty caption is skipped at index time; the corrupt image when it is loaded
    assert "data.type=image_folder: skipped 1 sample: 1 empty caption" in first.stderr
    assert "dropping unreadable image 0:broken.png" in first.stderr
    assert "epoch 0: skipped 1 unreadable samples" in first.stderr  # the epoch's summary
    for k in (5,):
        stop = run_sanakit("train", f"--work_dir={part}", *args, f"--train.max_steps={k}")
        assert stop.returncode == 0, stop.stderr[-3000:]
        again = run_sanakit("train", f"--work_dir={part}", *args, "--train.max_steps=14")
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resumed from {checkpoint_dir(part, k)}" in again.stderr
    assert losses(part) == losses(full)
    assert (checkpoint_dir(part, 14) / "model.safetensors").read_bytes() == (
        checkpoint_dir(full, 14) / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_empty_dataset_and_missing_root_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (empty, tmp_path / "missing"):
        result = run_sanakit(
            "train",
            f"--work_dir={tmp_path / 'w'}",
            *FAST,
            "--data.type=image_folder",
            f"--data.data_dir=[{root}]",
        )
        assert result.returncode == 2
        assert str(root) in the_error_line(result)
