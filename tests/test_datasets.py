"""On-disk dataset formats: counts, captions, pixels, skips with reasons, errors, flips."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from sanakit.data import dataset as dataset_module
from sanakit.data.dataset import (
    CaptionedImageDataset,
    SkipCounter,
    collate,
    index_dataset,
)
from sanakit.errors import DataError

SIZE = 16
RED, BLUE = (255, 0, 0), (0, 0, 255)


def cfg(kind: str, *roots: Path, caption_key: str = "caption", flip: bool = False):
    return SimpleNamespace(
        type=kind, data_dir=[str(r) for r in roots], caption_key=caption_key, random_flip=flip
    )


def image_bytes(w: int = 20, h: int = 12, fmt: str = "PNG", split: bool = False) -> bytes:
    """A ``w x h`` image: all red, or left half red / right half blue with ``split``."""
    img = Image.new("RGB", (w, h), RED)
    if split:
        img.paste(BLUE, (w // 2, 0, w, h))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def check_samples(ds, expected: dict[str, str]) -> None:
    """Every good sample has the contract's keys, shape and range; captions match by id."""
    got = {}
    for i in range(len(ds)):
        s = ds[i]
        if s is None:
            continue
        assert set(s) == {"pixels", "caption", "id"}
        assert s["pixels"].shape == (3, SIZE, SIZE) and s["pixels"].dtype == torch.float32
        assert s["pixels"].min() >= -1 and s["pixels"].max() <= 1
        got[s["id"]] = s["caption"]
    assert got == expected


# ----------------------------------------------------------------------------- sana_img


@pytest.fixture
def sana_root(tmp_path: Path) -> Path:
    root = tmp_path / "sana"
    write(root / "a.jpg", image_bytes(fmt="JPEG"))
    write(root / "a.txt", "a red thing\nsecond line is ignored, as in Sana\n")
    write(root / "b.png", image_bytes(12, 30))  # listed without extension: .png is Sana's default
    write(root / "b.txt", "b caption")
    write(root / "sub" / "c.webp", image_bytes(fmt="WEBP"))
    write(root / "sub" / "c.txt", "c caption")
    write(root / "corrupt.png", b"\x89PNG not really")  # passes index checks, fails at load
    write(root / "corrupt.txt", "corrupt")
    write(root / "zero.png", b"")
    write(root / "zero.txt", "zero")
    write(root / "blank.png", image_bytes())
    write(root / "blank.txt", "  \n")
    write(root / "nocap.png", image_bytes())
    write(tmp_path / "outside.png", image_bytes())
    write(tmp_path / "outside.txt", "outside")
    names = ["a.jpg", "b", "sub/c.webp", "corrupt.png", "zero.png", "blank.png", "nocap.png"]
    names += ["../outside.png", "ghost.jpg", 7, "a.jpg"]
    write(root / "meta_data.json", json.dumps({"name": "t", "__kind__": "x", "img_names": names}))
    return root


def test_sana_img(sana_root: Path) -> None:
    ds = index_dataset(cfg("sana_img", sana_root), SIZE, seed=0)
    assert isinstance(ds, CaptionedImageDataset) and len(ds) == 4
    check_samples(ds, {"0:a.jpg": "a red thing", "0:b": "b caption", "0:sub/c.webp": "c caption"})
    assert ds[3] is None  # the corrupt file is dropped at load time, not raised
    assert ds.skips.counts == {
        "empty image file": 1,
        "empty caption": 1,
        "missing caption": 1,
        "path escapes root": 1,
        "missing image": 1,
        "invalid entry": 1,
        "duplicate entry": 1,
    }
    assert ds.skips.summary().startswith("skipped 7 samples: ")
    assert ds.image_sizes() == [(12, 20), (30, 12), (12, 20), (SIZE, SIZE)]


def test_sana_img_missing_meta(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="meta_data.json"):
        index_dataset(cfg("sana_img", tmp_path), SIZE, seed=0)


# ----------------------------------------------------------------------------- image_folder


def test_image_folder_multi_root(tmp_path: Path) -> None:
    r0, r1 = tmp_path / "r0", tmp_path / "r1"
    write(r0 / "a.jpg", image_bytes(fmt="JPEG"))
    write(r0 / "a.txt", " a caption \n")
    write(r0 / "deep" / "er" / "b.PNG", image_bytes(40, 10))
    write(r0 / "deep" / "er" / "b.json", json.dumps({"caption": "b json"}))
    write(r0 / "c.bmp", image_bytes(fmt="BMP"))  # no caption
    write(r0 / "d.png", image_bytes())
    write(r0 / "d.json", "{broken")
    write(r0 / "e.png", image_bytes())
    write(r0 / "e.json", json.dumps({"other": "x"}))
    write(r0 / ".cache" / "f.png", image_bytes())  # hidden folders are not searched
    write(r0 / ".cache" / "f.txt", "hidden")
    write(r0 / "notes.txt", "not an image")
    write(r1 / "a.webp", image_bytes(fmt="WEBP"))
    write(r1 / "a.txt", "other root")
    write(r1 / "z.jpg", b"")
    write(r1 / "z.txt", "zero bytes")
    write(tmp_path / "secret.png", image_bytes())
    (r1 / "link.png").symlink_to(tmp_path / "secret.png")  # resolves outside its root
    write(r1 / "link.txt", "escapes")
    ds = index_dataset(cfg("image_folder", r0, r1), SIZE, seed=0)
    check_samples(
        ds, {"0:a.jpg": "a caption", "0:deep/er/b.PNG": "b json", "1:a.webp": "other root"}
    )
    assert ds.skips.counts == {
        "missing caption": 2,
        "unreadable caption": 1,
        "empty image file": 1,
        "path escapes root": 1,
    }


def test_image_folder_caption_key(tmp_path: Path) -> None:
    write(tmp_path / "a.png", image_bytes())
    write(tmp_path / "a.json", json.dumps({"prompt": "via key", "caption": "not this"}))
    ds = index_dataset(cfg("image_folder", tmp_path, caption_key="prompt"), SIZE, seed=0)
    assert ds[0]["caption"] == "via key"


# ----------------------------------------------------------------------------- hf_imagefolder


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def test_hf_imagefolder(tmp_path: Path) -> None:
    r0, r1 = tmp_path / "hf0", tmp_path / "hf1"
    write(r0 / "a.png", image_bytes())
    write(r0 / "sub" / "b.jpg", image_bytes(fmt="JPEG"))
    write(r0 / "c.png", b"garbage")
    write(r0 / "z.png", b"")
    write(r0 / "e.png", image_bytes())
    write(tmp_path / "outside.png", image_bytes())
    rows0 = [
        {"file_name": "a.png", "text": "a red"},
        {"file_name": "sub/b.jpg", "text": "b red"},
        {"file_name": "c.png", "text": "corrupt"},
        {"file_name": "z.png", "text": "zero"},
        {"file_name": "e.png", "text": ""},
        {"file_name": "../outside.png", "text": "escape"},
        {"file_name": "missing.png", "text": "gone"},
        {"text": "no file name"},
    ]
    write(r0 / "metadata.jsonl", jsonl(rows0))
    # Second root: a malformed line makes datasets reject the file; lines are then parsed singly.
    write(r1 / "x.png", image_bytes())
    write(r1 / "nested" / "y.png", image_bytes())
    write(r1 / "nested" / "metadata.jsonl", jsonl([{"file_name": "y.png", "text": "nested y"}]))
    write(r1 / "metadata.jsonl", jsonl([{"file_name": "x.png", "text": "x"}, "{not json", "[1]"]))
    ds = index_dataset(cfg("hf_imagefolder", r0, r1), SIZE, seed=0)
    assert len(ds) == 5
    check_samples(
        ds,
        {"0:a.png": "a red", "0:sub/b.jpg": "b red", "1:x.png": "x", "1:nested/y.png": "nested y"},
    )
    assert ds.skips.counts == {
        "empty image file": 1,
        "empty caption": 1,
        "path escapes root": 1,
        "missing image": 1,
        "invalid metadata row": 1,
        "malformed metadata line": 2,
    }


def test_hf_imagefolder_caption_column(tmp_path: Path) -> None:
    write(tmp_path / "a.png", image_bytes())
    write(tmp_path / "metadata.jsonl", jsonl([{"file_name": "a.png", "prompt": "p"}]))
    with pytest.raises(DataError, match="caption_key"):
        index_dataset(cfg("hf_imagefolder", tmp_path), SIZE, seed=0)
    ds = index_dataset(cfg("hf_imagefolder", tmp_path, caption_key="prompt"), SIZE, seed=0)
    assert ds[0]["caption"] == "p"


# ----------------------------------------------------------------------------- webdataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    root = tmp_path / "shards"
    root.mkdir()
    with wds.TarWriter(str(root / "shard-000.tar")) as sink:
        sink.write({"__key__": "s/k0", "jpg": image_bytes(fmt="JPEG"), "txt": "zero"})
        sink.write({"__key__": "s/k1", "png": image_bytes(10, 30), "json": {"caption": "one"}})
        sink.write({"__key__": "s/k2", "webp": image_bytes(fmt="WEBP"), "txt": "  "})
        sink.write({"__key__": "s/k3", "jpg": image_bytes(fmt="JPEG")})
        sink.write({"__key__": "s/k4", "txt": "no image"})
        sink.write({"__key__": "s/k5", "png": b"corrupt bytes", "txt": "corrupt"})
    with tarfile.open(root / "shard-001.tar", "w") as tar:
        add_member(tar, "k0.png", image_bytes())  # same key, other shard: a different sample
        add_member(tar, "k0.txt", b"second shard")
        add_member(tar, "k1.png", b"")
        add_member(tar, "k1.txt", b"zero-byte image")
        add_member(tar, "k2.png", image_bytes())
        add_member(tar, "k2.json", b'{"caption": 5}')
        add_member(tar, "README", b"no extension: not a sample")
    write(root / "junk.tar", b"this is not a tar archive at all" * 40)
    ds = index_dataset(cfg("webdataset", root), SIZE, seed=0)
    assert len(ds) == 4
    check_samples(
        ds,
        {
            "0:shard-000.tar/s/k0": "zero",
            "0:shard-000.tar/s/k1": "one",
            "0:shard-001.tar/k0": "second shard",
        },
    )
    assert ds[2] is None  # s/k5: corrupt image bytes
    assert ds.skips.counts == {
        "empty caption": 1,
        "missing caption": 2,
        "missing image": 1,
        "empty image file": 1,
        "unreadable shard": 1,
    }
    assert ds.image_sizes()[1] == (30, 10)
    # A single shard file works as a root too.
    one = index_dataset(cfg("webdataset", root / "shard-001.tar"), SIZE, seed=0)
    assert [r.id for r in one.records] == ["0:shard-001.tar/k0"]


# ----------------------------------------------------------------------------- common behaviour


def test_resize_crop_and_flip_determinism(tmp_path: Path) -> None:
    for i in range(6):
        write(tmp_path / f"{i}.png", image_bytes(40, 20, split=True))
        write(tmp_path / f"{i}.txt", f"caption {i}")
    ds = index_dataset(cfg("image_folder", tmp_path, flip=True), SIZE, seed=3)
    plain = index_dataset(cfg("image_folder", tmp_path), SIZE, seed=3)
    # 40x20 -> shorter side 16 -> 32x16 -> center crop: left half red, right half blue.
    px = plain[0]["pixels"]
    assert px[0, :, :7].min() > 0.9 and px[2, :, :7].max() < -0.9
    assert px[2, :, 9:].min() > 0.9 and px[0, :, 9:].max() < -0.9

    def flips(seed: int, epoch: int) -> list[bool]:
        d = index_dataset(cfg("image_folder", tmp_path, flip=True), SIZE, seed=seed)
        d.set_epoch(epoch)
        return [d.flip_for(i) for i in range(len(d))]

    # Same (seed, epoch) -> same flips in a fresh dataset; epoch and seed both change them.
    assert flips(3, 0) == flips(3, 0) == [True, False, False, False, True, False]
    assert flips(3, 1) != flips(3, 0) and flips(4, 0) != flips(3, 0)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            expected = plain[i]["pixels"]
            if ds.flip_for(i):
                expected = torch.flip(expected, dims=[2])
            assert torch.equal(ds[i]["pixels"], expected)
    assert not any(plain.flip_for(i) for i in range(len(plain)))
    restored = pickle.loads(pickle.dumps(ds))  # DataLoader workers may receive a pickled copy
    assert torch.equal(restored[1]["pixels"], ds[1]["pixels"])


def test_collate_drops_bad_samples() -> None:
    a = {"pixels": torch.zeros(3, 4, 4), "caption": "a", "id": "0:a"}
    b = {"pixels": torch.ones(3, 4, 4), "caption": "b", "id": "0:b"}
    out = collate([a, None, b, None])
    assert out["pixels"].shape == (2, 3, 4, 4)
    assert out["captions"] == ["a", "b"] and out["ids"] == ["0:a", "0:b"] and out["num_bad"] == 2
    assert out["kept"] == [0, 2]
    assert collate([a])["num_bad"] == 0
    assert collate([None, None]) is None


def test_skip_counter_summary() -> None:
    c = SkipCounter()
    assert c.total == 0 and c.summary() == "skipped 0 samples"
    c.add("path escapes root")
    assert c.summary() == "skipped 1 sample: 1 path escapes root"
    c.add("empty caption", 2)
    assert c.total == 3
    assert c.summary() == "skipped 3 samples: 2 empty caption, 1 path escapes root"


def test_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        index_dataset(cfg("image_folder", tmp_path / "missing"), SIZE, seed=0)
    with pytest.raises(DataError, match="unknown data.type"):
        index_dataset(cfg("parquet", tmp_path), SIZE, seed=0)
    with pytest.raises(DataError, match="data_dir"):
        index_dataset(cfg("image_folder"), SIZE, seed=0)
    write(tmp_path / "a.png", b"")
    write(tmp_path / "a.txt", "zero-byte image")
    write(tmp_path / "b.png", image_bytes())
    for kind in ("image_folder", "webdataset"):
        with pytest.raises(DataError, match="no usable samples") as info:
            index_dataset(cfg(kind, tmp_path), SIZE, seed=0)
        assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="skipped 2 samples: 1 empty image file, 1 missing caption"):
        index_dataset(cfg("image_folder", tmp_path), SIZE, seed=0)


def test_shapes_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    class FakeShapes:
        def __init__(self, image_size: int, seed: int, exclude_colors: tuple = ()) -> None:
            seen.update(image_size=image_size, seed=seed, exclude_colors=exclude_colors)

    monkeypatch.setattr(dataset_module, "ShapesDataset", FakeShapes)
    ds = index_dataset(SimpleNamespace(type="shapes", data_dir=[]), 24, seed=5)
    assert isinstance(ds, FakeShapes)
    assert seen == {"image_size": 24, "seed": 5, "exclude_colors": ()}
