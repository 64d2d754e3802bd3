"""A deterministic hostile-input corpus: mutated configs, overrides, checkpoints and data files.

``generate(seed, count)`` returns :class:`Case` objects. Each one names the CLI arguments to run
(after ``python -m sanakit``) from inside a scratch directory laid out as::

    w/            a copy of a real 2-step run (checkpoint ``w/checkpoints/step_00000002``)
    data/img/     a tiny image_folder root     (made by data cases only)
    data/sana/    a tiny sana_img root         (made by data cases only)
    cfg.yaml      a mutated config             (config cases only)
    afile         a regular file, for paths that lie "under a file"

and a ``prepare(scratch)`` that writes the mutation into that directory. Re-sealed checkpoint
mutations recompute the manifest's size and sha256 so the damage passes verification and reaches
the loaders. Nothing here depends on the wall clock or global random state: the same seed gives
the same cases byte for byte (modulo the contents of the copied run they start from).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from sanakit.config import Config

CK = "w/checkpoints/step_00000002"
# appended after a config / before a hostile override: a run that is accepted stays short
TRAIN_BOUNDS = (
    "--train.max_steps=3",
    "--train.save_model_steps=2",
    "--train.train_batch_size=4",
    "--train.visualize=false",
    "--report_to=none",
)
# keys the bounds override anyway, and the work dir (a hostile one could point outside scratch)
MASKED = {"work_dir", "report_to"} | {b.split("=")[0][2:] for b in TRAIN_BOUNDS}
# a huge value here is a legitimate request for a very long run, not hostile input
DURATION = {"train.max_steps", "train.num_epochs", "train.sampling_steps", "data.max_samples"}
NUMERIC = [".nan", ".inf", "-.inf", "-1", "0", "1e309", "-1e30", "18446744073709551616", "1e-320"]
WRONG_TYPE = ["fast", "[1, 2]", "{a: 1}", "null", "true", "''", "2026-12-02", "0x10", "~"]
TAGS = [
    "!!python/object/apply:os.system ['touch PWNED']",
    "!!python/name:os.system",
    "!!set {a, b}",
    "!!binary aGVsbG8=",
    "!!float nan",
]
TEXT = ["[1.0", "]]]", "{{{", "&a [*a]", "*a", "afile/sub", "\t", "\u202ex", "x" * 50000]
PWNED = "PWNED"  # a planted payload would create this file in the scratch dir


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    prepare: Callable[[Path], None]
    # files a successful run may write; on success every OTHER pre-existing file must stay put
    # (read-only commands); None: the command may legitimately rewrite its work dir (train)
    outputs: tuple[str, ...] | None = None


def config_keys() -> list[tuple[str, Any]]:
    """(dotted key, default) for every leaf of the config schema."""

    def walk(node: Any, prefix: str) -> list[tuple[str, Any]]:
        out = []
        for f in fields(node):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                out.extend(walk(type(default), f"{prefix}{f.name}."))
            else:
                out.append((f"{prefix}{f.name}", default))
        return out

    return walk(Config, "")


# ------------------------------------------------------------------------------ small helpers


def slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text)
    return keep.strip("_")[:24] or "x"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reseal(scratch: Path, rels: list[str] | None = None) -> None:
    """Recompute size and sha256 in the checkpoint's manifest for ``rels`` (default: listed)."""
    ck = scratch / CK
    manifest = json.loads((ck / "manifest.json").read_text())
    for rel in rels or list(manifest["files"]):
        if (ck / rel).is_file():
            manifest["files"][rel] = {"size": (ck / rel).stat().st_size, "sha256": sha256(ck / rel)}
    (ck / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


RAW = "@@RAW@@"


def dump_config(data: Any) -> bytes:
    """YAML of ``data`` where a string ``RAW + literal`` is written as the bare literal."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10**6)
    out = []
    for line in text.splitlines():
        if RAW in line:  # put hostile literals (tags, .nan, flow syntax) back unquoted
            head, rest = line.split(RAW, 1)
            quote = head.rstrip()[-1:] if head.rstrip()[-1:] in ("'", '"') else ""
            head = head.rstrip()[: len(head.rstrip()) - len(quote)]
            rest = rest[: len(rest) - len(quote)] if quote else rest
            line = head + (rest.replace("''", "'") if quote == "'" else rest)
        out.append(line)
    return ("\n".join(out) + "\n").encode("utf-8")


def set_dotted(data: dict, key: str, value: Any) -> None:
    *groups, leaf = key.split(".")
    node = data
    for g in groups:
        if not isinstance(node.get(g), dict):
            node[g] = {}
        node = node[g]
    node[leaf] = value


def del_dotted(data: dict, key: str) -> None:
    *groups, leaf = key.split(".")
    node = data
    for g in groups:
        node = node.get(g, {})
    if isinstance(node, dict):
        node.pop(leaf, None)


# ------------------------------------------------------------------------- (a) config mutations


def mutate_config(original: bytes, op: str, key: str, value: str) -> bytes:
    """``original`` (a resolved config.yaml) with one hostile mutation applied."""
    data = yaml.safe_load(original.decode("utf-8"))
    group = key.split(".")[0]
    if op == "set":
        set_dotted(data, key, RAW + value)
    elif op == "list":
        set_dotted(data, key, [RAW + value, RAW + value])
    elif op == "unknown":
        set_dotted(data, f"{key}_{value}", 1)
    elif op == "delete":
        del_dotted(data, key)
    elif op == "group_scalar":
        data[group] = RAW + value
    elif op == "document":
        return value.encode("utf-8")
    elif op == "truncate":
        return original[: int(len(original) * float(value))]
    elif op == "non_utf8":
        line = f"{key.split('.')[-1]}:".encode()
        return original.replace(line, line + b" \xff\xfe\x80", 1)
    elif op == "alias_bomb":  # value "LEVELSxWIDTH": WIDTH**LEVELS leaves once expanded
        set_dotted(data, key, RAW + alias_bomb(*(int(v) for v in value.split("x"))))
    else:  # pragma: no cover
        raise AssertionError(op)
    return dump_config(data)


def alias_bomb(levels: int, width: int) -> str:
    """``&b2 [&b1 [&b0 [x, x], *b0], *b1]``: anchors inside one flow value, nested."""
    node = "&b0 [" + ", ".join(["x"] * width) + "]"
    for i in range(1, levels):
        node = f"&b{i} [{node}, " + ", ".join([f"*b{i - 1}"] * (width - 1)) + "]"
    return node


def config_mutation(rng: random.Random, keys: list[tuple[str, Any]]) -> tuple[str, str, str]:
    """A random (op, key, value) for :func:`mutate_config`."""
    key, default = rng.choice(keys)
    op = rng.choice(
        ["set", "set", "set", "list", "unknown", "delete", "group_scalar", "document"]
        + ["truncate", "non_utf8", "alias_bomb"]
    )
    if op in ("set", "list", "group_scalar"):
        pool = NUMERIC if isinstance(default, int | float) else WRONG_TYPE
        pool = pool + TAGS + WRONG_TYPE[:3]
        if key in DURATION:
            pool = [v for v in pool if v not in ("18446744073709551616", "1e309")]
        return op, key, rng.choice(pool)
    if op == "document":
        doc = rng.choice(["- a\n- b\n", "42\n", "'text'\n", "[" * 5000 + "\n", "{a: 1}\n", ""])
        return op, key, doc
    if op == "truncate":
        return op, key, rng.choice(["0.1", "0.33", "0.5", "0.77", "0.99"])
    if op == "alias_bomb":
        return op, key, rng.choice(["2x3", "4x4", "9x9"])
    return op, key, rng.choice(["bogus", "lr2", "_"])


def write_config(scratch: Path, op: str, key: str, value: str, target: str) -> None:
    source = scratch / "w" / "config.yaml"
    (scratch / target).write_bytes(mutate_config(source.read_bytes(), op, key, value))


def override_value(rng: random.Random, key: str, default: Any) -> str:
    numeric = isinstance(default, int | float) and not isinstance(default, bool)
    pool = NUMERIC * 3 + WRONG_TYPE + TAGS[:3] + TEXT if numeric else WRONG_TYPE + TAGS + TEXT
    if key in DURATION:
        pool = [v for v in pool if v not in ("18446744073709551616", "1e309")]
    return rng.choice(pool)


SAMPLE_HOSTILE = {
    "--seed": ["18446744073709551616", "-1", "nan", "1e3"],
    "--cfg_scale": ["nan", "inf", "-inf", "1e309", "x"],
    "--steps": ["0", "-3", "nan", "1.5"],
    "--num_images": ["0", "-1", "100000", "1e9", "18446744073709551616"],
    "--out": ["dir.png", "afile/x.png", "", "x.PNG.txt", "nodir/x.png", "w", "w/config.yaml"],
    "--sampler": ["nope", "", "../../x"],
    "--prompt": ["", " ", "x" * 50000, "\u202e", "{a: 1}"],
}


# --------------------------------------------------------------------- (b) checkpoint mutations


def corrupt_raw(data: bytes, how: str) -> bytes:
    """Byte-level damage that any verification should notice."""
    if how == "truncate":
        return data[: len(data) // 2]
    if how == "empty":
        return b""
    if how == "flip":
        mid = len(data) // 2
        return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :] if data else b"\x00"
    if how == "garbage":
        return bytes(range(256)) * 4
    if how == "append":
        return data + b"\x00junk"
    if how == "non_utf8":
        return b"\xff\xfe\x80" + data
    raise AssertionError(how)  # pragma: no cover


JSON_VALUES = ["str", 1e30, float("inf"), float("nan"), -1, 10**30, None, [], {}, True, 2.5]


def mutate_json(data: bytes, how: str, key_index: int, value_index: int) -> bytes:
    """Wrong types / absurd numbers / wrong shape for a JSON document (then re-sealed)."""
    if how == "deep":
        return b"[" * 100000 + b"]" * 100000
    if how == "document":
        return json.dumps([1, 2, 3]).encode()
    doc = json.loads(data)
    keys = sorted(doc) if isinstance(doc, dict) else []
    if not keys:
        return b"{}"
    key = keys[key_index % len(keys)]
    if how == "delete":
        del doc[key]
    else:
        doc[key] = JSON_VALUES[value_index % len(JSON_VALUES)]
    return json.dumps(doc).encode()


def mutate_manifest(data: bytes, how: str) -> bytes:
    """The manifest itself: nothing re-seals it, so these are structural attacks."""
    if how == "deep":
        return b"[" * 100000
    doc = json.loads(data)
    files = doc["files"]
    first = sorted(files)[0]
    if how == "traversal":
        files["../../../w/config.yaml"] = files.pop(first)
    elif how == "absolute":
        files["/etc/passwd"] = files.pop(first)
    elif how == "huge_size":
        files[first]["size"] = 10**30
    elif how == "step_type":
        doc["step"] = "2"
    elif how == "step_other":
        doc["step"] = 99
    elif how == "version":
        doc["version"] = 10**9
    elif how == "files_list":
        doc["files"] = sorted(files)
    elif how == "unlisted":  # the file stays on disk but is no longer covered by the manifest
        files.pop("null_embed.pth", None)
        files.pop("ema.safetensors", None)
    elif how == "nan_size":
        return data.replace(b'"size": ', b'"size": NaN, "x": ', 1)
    return json.dumps(doc, indent=2).encode()


def mutate_safetensors(data: bytes, how: str) -> bytes:
    """A safetensors file whose header lies (length, dtype, shape, offsets, names)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    first = header[names[0]]
    if how == "header_len":
        return struct.pack("<Q", 2**62) + data[8:]
    if how == "dtype":
        first["dtype"] = "F64" if first["dtype"] != "F64" else "F16"
    elif how == "shape":
        first["shape"] = [3, 5, 7]
    elif how == "offsets":
        first["data_offsets"] = [0, 2**60]
    elif how == "drop":
        del header[names[-1]]
    elif how == "rename":
        header[names[0] + ".extra"] = header.pop(names[0])
    elif how == "metadata":
        header["__metadata__"] = {"format": ["not", "a", "string"]}
    elif how == "not_json":
        return struct.pack("<Q", 4) + b"\xff\xfe{[" + body
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


class Payload:
    """Unpickling this runs ``touch PWNED``: a loader that honours pickles is exploitable."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def mutate_torch_file(data: bytes, how: str) -> bytes:
    """A ``.pth``/``.pt`` with the wrong shape or type, or a planted pickle."""
    import torch

    if how == "pickle":
        return pickle.dumps(Payload(), protocol=2)
    value: Any = {
        "shape": torch.zeros(3, 5),
        "dtype": torch.zeros(1, 16, 384, dtype=torch.int64),
        "dict": {"embed": "not a tensor"},
        "nan": torch.full((1, 16, 384), float("nan")),
        "list": [1, 2, 3],
    }[how]
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def write_checkpoint_mutation(
    scratch: Path, rel: str, kind: str, how: str, extra: tuple[int, ...] = ()
) -> None:
    """Mutate ``CK/rel``; ``kind`` raw (verification should fail) or a re-sealed family."""
    path = scratch / CK / rel
    data = path.read_bytes()
    if kind == "raw":
        path.write_bytes(corrupt_raw(data, how))
        return
    mutate = {
        "manifest": mutate_manifest,
        "json": lambda d, h: mutate_json(d, h, *extra),
        "yaml": lambda d, h: mutate_config(d, *h.split("|")),
        "safetensors": mutate_safetensors,
        "torch": mutate_torch_file,
    }[kind]
    path.write_bytes(mutate(data, how))
    if kind != "manifest":
        reseal(scratch, [rel])


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


# ------------------------------------------------------------------------------- the generator

SAMPLE = ("sample", "--prompt=a red circle", "--num_images=1", "--steps=2", "--out=o.png")
RESUME = ("train", "--work_dir=w", *TRAIN_BOUNDS)
DOCTOR = ("doctor", "--work_dir=w", "--train.train_batch_size=4")
# families and how often each comes up in every 20 cases
CYCLE = (
    "override checkpoint config sample data override checkpoint override export checkpoint "
    "config data override checkpoint sample data override checkpoint config sample"
).split()


def config_case(rng: random.Random, keys: list[tuple[str, Any]]) -> tuple[str, tuple, Callable]:
    op, key, value = config_mutation(rng, [kv for kv in keys if kv[0] not in MASKED])
    args = rng.choice(
        [
            ("train", "cfg.yaml", "--work_dir=w", *TRAIN_BOUNDS),
            ("train", "cfg.yaml", "--work_dir=fresh", *TRAIN_BOUNDS),
            ("doctor", "cfg.yaml", "--work_dir=w", "--train.train_batch_size=4"),
        ]
    )
    prepare = partial(write_config, op=op, key=key, value=value, target="cfg.yaml")
    return f"{op}-{key}-{slug(value)}", args, prepare


def override_case(rng: random.Random, keys: list[tuple[str, Any]]) -> tuple[str, tuple]:
    key, default = rng.choice([kv for kv in keys if kv[0] != "work_dir"])
    value = override_value(rng, key, default)
    base = rng.choice([RESUME, DOCTOR, RESUME])
    return f"{base[0]}-{key}-{slug(value)}", (*base, f"--{key}={value}")


def checkpoint_case(rng: random.Random) -> tuple[str, tuple, Callable]:
    kind = rng.choice(["raw", "raw", "manifest", "json", "json", "yaml", "safetensors", "torch"])
    extra: tuple[int, ...] = ()
    if kind == "raw":
        rel = rng.choice(
            ["manifest.json", "trainer_state.json", "sampler_rank0.json"] * 2
            + ["config.yaml", "model.safetensors", "null_embed.pth", "ema.safetensors"]
        )
        how = rng.choice(["truncate", "empty", "flip", "garbage", "append", "non_utf8"])
    elif kind == "manifest":
        rel = "manifest.json"
        how = rng.choice(
            ["deep", "traversal", "absolute", "huge_size", "step_type"]
            + ["step_other", "version", "files_list", "unlisted", "nan_size"]
        )
    elif kind == "json":
        rel = rng.choice(["trainer_state.json", "sampler_rank0.json"])
        how = rng.choice(["set", "set", "set", "delete", "deep", "document"])
        extra = (rng.randrange(20), rng.randrange(len(JSON_VALUES)))
    elif kind == "yaml":
        rel = "config.yaml"
        how = "|".join(config_mutation(rng, config_keys()))
    elif kind == "safetensors":
        rel = rng.choice(["model.safetensors", "ema.safetensors"])
        how = rng.choice(
            ["header_len", "dtype", "shape", "offsets", "drop", "rename"] + ["metadata", "not_json"]
        )
    else:
        rel = rng.choice(["null_embed.pth", "null_embed.pth", "optimizer.pt", "rng_rank0.pt"])
        how = rng.choice(["shape", "dtype", "dict", "nan", "list", "pickle"])
    ema = ("--ema",) if rel.startswith("ema") else ()
    sample = [(*SAMPLE, "--checkpoint=w", *ema), (*SAMPLE, f"--checkpoint={CK}", *ema)]
    export = [("export", "w", "exported", *ema), ("export", CK, "exported", *ema)]
    args = rng.choice([RESUME, RESUME, RESUME, DOCTOR, *sample, *sample, *export])
    prepare = partial(write_checkpoint_mutation, rel=rel, kind=kind, how=how, extra=extra)
    detail = f"{kind}-{rel.split('.')[0]}-{slug(how)}"
    return f"{detail}-{slug(args[0])}", args, prepare


DATA_DAMAGE = {
    "image": ["truncate", "empty", "text", "wrong_ext", "bomb", "directory", "symlink_loop"]
    + ["mode:I;16", "mode:CMYK", "mode:P", "mode:LA", "mode:1", "mode:RGBA", "mode:F"],
    "caption": ["nul", "invalid_utf8", "huge_line", "empty", "whitespace", "bom", "control"]
    + ["fifo", "directory"],
    "meta": ["nul_name", "escape", "numbers", "not_list", "huge", "dupes", "deep"]
    + ["invalid_utf8", "truncate"],
    "jsonl": ["nul_name", "escape", "numbers", "bad_line", "deep", "invalid_utf8", "huge_text"]
    + ["missing_key", "absolute"],
}
FORMATS = {"img": "image_folder", "sana": "sana_img", "hf": "hf_imagefolder"}


def data_case(rng: random.Random) -> tuple[str, tuple, Callable]:
    root = rng.choice(sorted(FORMATS))
    damages = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(
            {"img": ["image", "caption"], "sana": ["image", "caption", "meta"]}.get(
                root, ["image", "meta", "meta"]
            )
        )
        pool = DATA_DAMAGE["jsonl" if kind == "meta" and root == "hf" else kind]
        damages.append((root, kind, rng.choice(pool)))
    data = (f"--data.type={FORMATS[root]}", f"--data.data_dir=[data/{root}]", "--work_dir=run")
    bounds = (*TRAIN_BOUNDS, "--train.max_steps=2")
    train, build = ("train", *data, *bounds), ("cache", "build", *data)
    args = rng.choice([train, train, build, ("doctor", *data), ("cache", "verify", *data)])
    prepare = partial(write_data_mutations, damages=tuple(damages))
    detail = "-".join(f"{k}-{slug(h)}" for _, k, h in damages)
    return (
        f"{root}-{detail}-{slug('_'.join(args[:2]) if args[0] == 'cache' else args[0])}",
        args,
        prepare,
    )


def sample_case(rng: random.Random) -> tuple[str, tuple, tuple[str, ...]]:
    option = rng.choice(sorted(SAMPLE_HOSTILE))
    value = rng.choice(SAMPLE_HOSTILE[option])
    outputs = ("o.png", value) if option == "--out" else ("o.png",)
    return f"{option[2:]}-{slug(value)}", (*SAMPLE, "--checkpoint=w", f"{option}={value}"), outputs


def export_case(rng: random.Random) -> tuple[str, tuple]:
    source = rng.choice(["w", CK])
    dest = rng.choice(["w", ".", "w/checkpoints", CK, "afile", "afile/sub", "w/inside", "data"])
    flags = rng.choice([("--overwrite",), (), ("--overwrite", "--ema")])
    return f"{slug(source)}-to-{slug(dest)}{''.join(flags)}", ("export", source, dest, *flags)


def nothing(scratch: Path) -> None:
    """No file mutation: the hostility is in the arguments."""


def generate(seed: int, count: int) -> list[Case]:
    """``count`` hostile cases, the same ones for the same seed."""
    keys = config_keys()
    cases: list[Case] = []
    for i in range(count):
        for attempt in range(20):  # redraw a case identical to an earlier one
            case = one_case(f"{seed}:{i}:{attempt}", CYCLE[i % len(CYCLE)], keys, i)
            if case.id[3:] not in {c.id[3:] for c in cases}:  # ids are "NN-..."
                break
        cases.append(case)
    return cases


def one_case(seed: str, family: str, keys: list[tuple[str, Any]], index: int) -> Case:
    rng = random.Random(seed)
    prepare: Callable[[Path], None] = nothing
    outputs: tuple[str, ...] | None = ()
    if family == "config":
        name, args, prepare = config_case(rng, keys)
    elif family == "override":
        name, args = override_case(rng, keys)
    elif family == "checkpoint":
        name, args, prepare = checkpoint_case(rng)
    elif family == "data":
        name, args, prepare = data_case(rng)
    elif family == "sample":
        name, args, outputs = sample_case(rng)
    else:
        name, args = export_case(rng)
    if args[0] in ("train", "cache") and args[:2] != ("cache", "verify"):
        outputs = None  # may legitimately rewrite its work dir
    elif args[0] == "sample" and family != "sample":
        outputs = ("o.png",)
    return Case(f"{index:02d}-{family}-{name}", tuple(args), prepare, outputs)
