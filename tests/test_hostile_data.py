"""Hostile data files (issue 16): FIFOs, symlink loops, NUL bytes, symlinks out of the root, and
every PIL image mode. Each is skipped and counted (or one DataError line), never a hang or a crash.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
import os
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST, run_sanakit
from PIL import Image

from sanakit.data.dataset import index_dataset
from sanakit.data.images import load_image, to_rgb
from sanakit.errors import DataError

SIZE = 16
RED = (255, 0, 0)


class Blocked(BaseException):
    """Not an OSError (TimeoutError is one), so no ``except OSError`` in the code swallows it."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body blocks, e.g. opening a FIFO."""

    def expire(*_: object) -> None:
        raise Blocked(f"still blocked after {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cfg(kind: str, root: Path) -> SimpleNamespace:
    return SimpleNamespace(type=kind, data_dir=[str(root)], caption_key="caption")


def png(colour: tuple[int, int, int] = RED) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buf, format="PNG")
    return buf.getvalue()


def index(kind: str, root: Path):
    with deadline(20):
        return index_dataset(cfg(kind, root), SIZE, seed=0)


def sana_root(root: Path, names: list[str], good: int = 2) -> Path:
    """A sana_img root with ``good`` captioned images plus ``names`` in img_names."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"ok{i}.png").write_bytes(png())
        (root / f"ok{i}.txt").write_text(f"good {i}")
    (root / "meta_data.json").write_text(
        json.dumps({"img_names": [f"ok{i}.png" for i in range(good)] + names})
    )
    return root


def outside_caption(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("a secret outside the data root")
    return secret


# ----------------------------------------------------------------------------- FIFOs (item 4)


def test_fifo_caption_in_sana_img_is_skipped_not_waited_on(tmp_path: Path) -> None:
    root = sana_root(tmp_path / "d", ["b.png"])
    (root / "b.png").write_bytes(png())
    os.mkfifo(root / "b.txt")
    ds = index("sana_img", root)
    assert len(ds) == 2 and ds.skips.counts == {"not a regular file": 1}


def test_fifo_captions_images_and_metadata_in_every_format(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    (folder / "ok.txt").write_text("fine")
    (folder / "a.png").write_bytes(png())
    os.mkfifo(folder / "a.txt")  # a FIFO caption
    os.mkfifo(folder / "b.png")  # a FIFO image
    (folder / "b.txt").write_text("caption of a fifo image")
    (folder / "c.png").write_bytes(png())
    os.mkfifo(folder / "c.json")  # a FIFO json caption
    ds = index("image_folder", folder)
    assert len(ds) == 1 and ds.skips.counts == {"not a regular file": 3}

    hf = tmp_path / "hf"
    (hf / "sub").mkdir(parents=True)
    (hf / "ok.png").write_bytes(png())
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "ok.png", "text": "ok"}) + "\n")
    os.mkfifo(hf / "sub" / "metadata.jsonl")  # a FIFO metadata file
    ds = index("hf_imagefolder", hf)
    assert len(ds) == 1
    assert ds.skips.counts == {"unusable metadata file (not a regular file)": 1}

    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(wds / "good.tar", "w") as tar:
        for name, data in (("k.png", png()), ("k.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.mkfifo(wds / "fifo.tar")
    ds = index("webdataset", wds)
    assert len(ds) == 1 and ds.skips.counts == {"unusable shard (not a regular file)": 1}


def test_fifo_meta_data_json_is_one_error_line(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    os.mkfifo(root / "meta_data.json")
    with pytest.raises(DataError, match="meta_data.json") as info:
        index("sana_img", root)
    assert "not a regular file" in str(info.value) and "\n" not in str(info.value)


def test_image_swapped_for_a_fifo_after_indexing_is_dropped(tmp_path: Path) -> None:
    root = sana_root(tmp_path / "d", [])
    ds = index("sana_img", root)
    (root / "ok0.png").unlink()
    os.mkfifo(root / "ok0.png")
    with deadline(20):
        assert ds[0] is None and ds[1] is not None
        assert ds.image_sizes()[0] == (SIZE, SIZE)  # unreadable header: the square default


# ----------------------------------------------------------------------------- loops, NUL bytes (6)


def test_symlink_loop_in_image_folder_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "ok.txt").write_text("fine")
    os.symlink("b.png", tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "b.png")
    os.symlink("self.png", tmp_path / "self.png")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "ok2.png").write_bytes(png())
    os.symlink("ok2.txt", tmp_path / "ok2.txt")  # the caption is a loop
    ds = index("image_folder", tmp_path)
    assert len(ds) == 1 and ds.skips.counts == {"unresolvable path": 4}


def test_nul_byte_in_metadata_file_name_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png())
    rows = [{"file_name": "ok.png", "text": "ok"}, {"file_name": "o\u0000k.png", "text": "nul"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = index("hf_imagefolder", tmp_path)
    assert len(ds) == 1 and ds.skips.counts == {"unresolvable path": 1}


def test_nul_byte_in_sana_img_names_is_skipped(tmp_path: Path) -> None:
    root = sana_root(tmp_path / "d", ["b\u0000.png", "c\u0000"])
    ds = index("sana_img", root)
    assert len(ds) == 2 and ds.skips.counts == {"invalid entry": 2}


# ------------------------------------------------------------------------- outside the root (14)


def test_caption_symlinked_outside_the_root_is_refused_in_every_format(tmp_path: Path) -> None:
    secret = outside_caption(tmp_path)
    root = sana_root(tmp_path / "sana", ["b.png"])
    (root / "b.png").write_bytes(png())
    os.symlink(secret, root / "b.txt")
    ds = index("sana_img", root)
    assert len(ds) == 2 and ds.skips.counts == {"path escapes root": 1}
    assert all("secret" not in r.caption for r in ds.records)

    folder = tmp_path / "folder"
    folder.mkdir()
    for stem, ext in (("ok", None), ("t", ".txt"), ("j", ".json")):
        (folder / f"{stem}.png").write_bytes(png())
        if ext is None:
            (folder / f"{stem}.txt").write_text("fine")
        else:
            json_secret = secret.with_suffix(".json")
            json_secret.write_text(json.dumps({"caption": "a secret"}))
            os.symlink(secret if ext == ".txt" else json_secret, folder / f"{stem}{ext}")
    ds = index("image_folder", folder)
    assert len(ds) == 1 and ds.skips.counts == {"path escapes root": 2}


def test_metadata_and_shards_symlinked_outside_the_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(png())
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "x"}))
    hf = tmp_path / "hf"
    (hf / "sub").mkdir(parents=True)
    (hf / "ok.png").write_bytes(png())
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "ok.png", "text": "ok"}) + "\n")
    os.symlink(outside / "metadata.jsonl", hf / "sub" / "metadata.jsonl")
    ds = index("hf_imagefolder", hf)
    assert len(ds) == 1 and ds.skips.counts == {"unusable metadata file (path escapes root)": 1}

    wds = tmp_path / "wds"
    wds.mkdir()
    with tarfile.open(outside / "s.tar", "w") as tar:
        for name, data in (("k.png", png()), ("k.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (wds / "mine.tar").write_bytes((outside / "s.tar").read_bytes())
    os.symlink(outside / "s.tar", wds / "theirs.tar")
    ds = index("webdataset", wds)
    assert len(ds) == 1 and ds.skips.counts == {"unusable shard (path escapes root)": 1}


def test_meta_data_json_symlinked_outside_is_one_error_line(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"img_names": []}))
    root = tmp_path / "d"
    root.mkdir()
    os.symlink(outside, root / "meta_data.json")
    with pytest.raises(DataError, match="path escapes root"):
        index("sana_img", root)


# ----------------------------------------------------------------------------- PIL modes (12)


def grey_expected(h: int = 4, w: int = 64) -> np.ndarray:
    return np.linspace(0, 255, h * w).round().astype(np.uint8).reshape(h, w)


def reference_rgb() -> Image.Image:
    """A colourful gradient: red rises left to right, green top to bottom, blue constant."""
    x = np.linspace(0, 255, 64)
    y = np.linspace(0, 255, 4)
    arr = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((4, 64), 90.0)), axis=-1)
    return Image.fromarray(arr.round().astype(np.uint8))


def high_bit_image(mode: str) -> tuple[Image.Image, np.ndarray]:
    """A grey gradient over the mode's full range, and the 0-255 gradient it must become."""
    n = 4 * 64
    if mode == "F":
        arr = np.linspace(0, 1, n, dtype=np.float32).reshape(4, 64)
        return Image.fromarray(arr, mode="F"), grey_expected()
    values = np.linspace(0, 65535, n).round().astype(np.uint32).reshape(4, 64)
    expected = np.rint(values / 257).astype(np.uint8)
    if mode == "I":
        return Image.fromarray(values.astype(np.int32), mode="I"), expected
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    return Image.frombytes(mode, (64, 4), values.astype(dtype).tobytes()), expected


HIGH_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Modes PIL writes from RGB without loss (alpha 255, CMYK without black generation).
LOSSLESS = ("RGBA", "RGBX", "RGBa", "CMYK")


def colour_space_image(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image built directly in HSV, YCbCr or LAB, and its RGB from the textbook formulas."""
    a = np.linspace(0, 255, 64).round()
    b = np.array([40.0, 110.0, 180.0, 250.0])
    p, q = np.broadcast_arrays(a[None, :], b[:, None])
    if mode == "HSV":  # hue wheel at several saturations, full value
        chans = [p, q, np.full_like(p, 255.0)]
        rgb = [
            colorsys.hsv_to_rgb(h / 255, s / 255, 1.0) for h, s in zip(p.flat, q.flat, strict=True)
        ]
        expected = np.array(rgb).reshape(4, 64, 3) * 255
    elif mode == "YCbCr":  # JFIF full-range: Y a ramp, Cb/Cr near neutral to stay in gamut
        y, cb, cr = p, 128 + (q - 145) / 6, 128 - (q - 145) / 8
        chans = [y, cb, cr]
        expected = np.stack(
            [
                y + 1.402 * (cr - 128),
                y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                y + 1.772 * (cb - 128),
            ],
            axis=-1,
        )
    else:  # LAB: the neutral axis, L* from 0 to 100 (a* = b* = 0 is grey in every white point)
        chans = [p, np.zeros_like(p), np.zeros_like(p)]  # PIL stores a*, b* as signed bytes
        lightness = p * 100 / 255
        lum = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)
        srgb = np.where(lum <= 0.0031308, 12.92 * lum, 1.055 * lum ** (1 / 2.4) - 0.055)
        expected = np.repeat((srgb * 255)[..., None], 3, axis=-1)
    arr = np.stack(chans, axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.frombytes(mode, (64, 4), arr.tobytes()), np.clip(expected, 0, 255).round()


COLOUR_TOLERANCE = {"HSV": 1, "YCbCr": 2, "LAB": 3}


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_pil_mode_converts_to_the_right_rgb(mode: str) -> None:
    ref = reference_rgb()
    if mode in HIGH_BIT:
        img, grey = high_bit_image(mode)
        expected = np.repeat(grey[..., None], 3, axis=-1)
        tolerance = 0
    elif mode in LOSSLESS:
        img, expected, tolerance = ref.convert(mode), np.asarray(ref), 0
    elif mode in COLOUR_TOLERANCE:
        (img, expected), tolerance = colour_space_image(mode), COLOUR_TOLERANCE[mode]
    elif mode in ("L", "LA", "La"):
        la = Image.fromarray(grey_expected()).convert("LA")  # alpha 255: La equals LA
        img = {"L": Image.fromarray(grey_expected()), "LA": la}.get(mode)
        img = img or Image.frombytes(mode, la.size, la.tobytes())
        expected, tolerance = np.repeat(grey_expected()[..., None], 3, axis=-1), 0
    elif mode in ("P", "PA"):
        img = ref.quantize(256).convert(mode)  # a 256-colour palette: close, not exact
        expected, tolerance = np.asarray(ref), 12
    elif mode == "1":
        img = Image.fromarray(grey_expected()).convert("1", dither=Image.Dither.NONE)
        expected = np.repeat(np.where(grey_expected() >= 128, 255, 0)[..., None], 3, axis=-1)
        tolerance = 0
    else:
        img, expected, tolerance = ref, np.asarray(ref), 0
    assert img.mode == mode
    out = to_rgb(img)
    assert out.mode == "RGB"
    diff = np.abs(np.asarray(out).astype(int) - expected.astype(int))
    assert diff.max() <= tolerance, f"{mode}: off by up to {diff.max()}"


def test_16bit_png_gradient_trains_as_the_same_gradient(tmp_path: Path) -> None:
    img, expected = high_bit_image("I;16")
    path = tmp_path / "g16.png"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"  # what Pillow hands us for a 16-bit grey PNG
    pixels = load_image(path, 4, 64)
    got = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=-1))


# ----------------------------------------------------------------------------- end to end


def test_train_on_a_sana_folder_with_a_fifo_caption_finishes(tmp_path: Path) -> None:
    root = sana_root(tmp_path / "d", ["fifo.png", "escape.png", "g16.png"], good=6)
    (root / "fifo.png").write_bytes(png())
    os.mkfifo(root / "fifo.txt")
    (root / "escape.png").write_bytes(png())
    os.symlink(outside_caption(tmp_path), root / "escape.txt")
    high_bit_image("I;16")[0].save(root / "g16.png")
    (root / "g16.txt").write_text("a grey gradient")
    result = run_sanakit(
        "train",
        f"--work_dir={tmp_path / 'w'}",
        *FAST,
        "--data.type=sana_img",
        f"--data.data_dir=[{root}]",
        "--train.max_steps=2",
        "--train.save_model_steps=2",
        timeout=240,  # before the fix this hung forever on the FIFO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 2 samples: 1 not a regular file, 1 path escapes root" in result.stderr
