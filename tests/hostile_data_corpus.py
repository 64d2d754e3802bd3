"""Data-file mutations for the hostile corpus: images, captions and metadata of tiny
image_folder, sana_img and hf_imagefolder roots."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

# --------------------------------------------------------------------------- (c) data mutations

CAPTIONS = ["a red circle", "a green square", "a blue triangle", "a yellow square"]


def png_bytes(size: int, colour: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    image = Image.new("RGB", (size, size), ((colour * 60) % 256, (colour * 90) % 256, 128))
    if mode == "I;16":
        image = image.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    elif mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if mode in ("CMYK", "F") else "PNG")  # PNG has no such mode
    return buf.getvalue()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid-looking PNG header claiming billions of pixels (PIL's decompression bomb)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def build_data(scratch: Path, n: int = 8) -> None:
    """``data/img`` (image_folder) and ``data/sana`` (sana_img) with ``n`` 32 px images each."""
    img, sana = scratch / "data" / "img", scratch / "data" / "sana"
    img.mkdir(parents=True)
    sana.mkdir(parents=True)
    for i in range(n):
        for root in (img, sana):
            (root / f"im{i}.png").write_bytes(png_bytes(32, i))
            (root / f"im{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
    names = [f"im{i}" for i in range(n)]
    (sana / "meta_data.json").write_text(json.dumps({"name": "tiny", "img_names": names}))
    hf = scratch / "data" / "hf"
    hf.mkdir()
    rows = []
    for i in range(n):
        (hf / f"im{i}.png").write_bytes(png_bytes(32, i))
        rows.append(json.dumps({"file_name": f"im{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}))
    (hf / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def damage_image(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("this is not an image\n")
    elif how == "wrong_ext":  # PNG bytes under .jpg, and a JPEG-named PNG
        path.rename(path.with_suffix(".jpg"))
    elif how == "bomb":
        path.write_bytes(bomb_png())
    elif how.startswith("mode:"):
        path.write_bytes(png_bytes(32, 3, how[5:]))
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "symlink_loop":
        path.unlink()
        (path.parent / "loop").symlink_to(".", target_is_directory=True)
        path.symlink_to(path.name)
    else:  # pragma: no cover
        raise AssertionError(how)


def damage_caption(path: Path, how: str) -> None:
    text = {
        "nul": b"a red\x00 circle\n",
        "invalid_utf8": b"a red \xff\xfe circle\n",
        "huge_line": b"a red circle " * 150000 + b"\n",
        "empty": b"",
        "whitespace": b" \t\r\n\n",
        "bom": b"\xef\xbb\xbfa red circle\n",
        "control": b"\x1b[2J\x07a red circle\r\n",
    }.get(how)
    if text is not None:
        path.write_bytes(text)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "directory":
        path.unlink()
        path.mkdir()
    else:  # pragma: no cover
        raise AssertionError(how)


def damage_meta(path: Path, how: str) -> None:
    meta = json.loads(path.read_text())
    names = meta["img_names"]
    replace = {
        "nul_name": names[:-1] + ["im1\x00.png"],
        "escape": names + ["../../w/config", "/etc/passwd"],
        "numbers": [1, 2.5, None, True, {"a": 1}] + names,
        "not_list": "im0",
        "huge": names + [f"missing{i}" for i in range(20000)],
        "dupes": names * 3,
    }
    if how in replace:
        meta["img_names"] = replace[how]
        path.write_text(json.dumps(meta))
    elif how == "deep":
        path.write_bytes(b'{"img_names": ' + b"[" * 100000)
    elif how == "invalid_utf8":
        path.write_bytes(b'{"img_names": ["im0\xff"]}')
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:17])
    else:  # pragma: no cover
        raise AssertionError(how)


def damage_jsonl(path: Path, how: str) -> None:
    """A Hugging Face ``metadata.jsonl``: bad rows among good ones, or a bad file."""
    lines = path.read_bytes().splitlines()
    bad = {
        "nul_name": b'{"file_name": "im1\\u0000.png", "text": "a red circle"}',
        "escape": b'{"file_name": "../../w/config.yaml", "text": "a red circle"}',
        "numbers": b'{"file_name": 5, "text": [1, 2]}',
        "bad_line": b'{"file_name": "im1.png", "text": ',
        "deep": b"[" * 100000,
        "invalid_utf8": b'{"file_name": "im1.png", "text": "a \xff\xfe circle"}',
        "huge_text": b'{"file_name": "im1.png", "text": "' + b"a" * 2_000_000 + b'"}',
        "missing_key": b'{"name": "im1.png"}',
        "absolute": b'{"file_name": "/etc/hostname", "text": "a red circle"}',
    }[how]
    path.write_bytes(b"\n".join([lines[0], bad, *lines[2:]]) + b"\n")


def write_data_mutations(scratch: Path, damages: tuple[tuple[str, str, str], ...]) -> None:
    """``damages``: (root, file kind, how) triples applied to a fresh ``build_data`` tree."""
    build_data(scratch)
    for index, (root, kind, how) in enumerate(damages):
        base = scratch / "data" / root
        if kind == "meta" and root == "hf":
            damage_jsonl(base / "metadata.jsonl", how)
        elif kind == "meta":
            damage_meta(base / "meta_data.json", how)
        elif kind == "image":
            damage_image(base / f"im{index + 1}.png", how)
        else:
            damage_caption(base / f"im{index + 1}.txt", how)
