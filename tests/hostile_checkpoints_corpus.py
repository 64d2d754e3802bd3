"""Checkpoint mutations for the hostile corpus: raw corruption, and re-sealed corruption
whose manifest is recomputed so the damage reaches the loaders."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import yaml

CK = "w/checkpoints/step_00000002"
PWNED = "PWNED"  # a planted payload would create this file in the scratch dir


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


def alias_bomb(levels: int, width: int) -> str:
    """``&b2 [&b1 [&b0 [x, x], *b0], *b1]``: anchors inside one flow value, nested."""
    node = "&b0 [" + ", ".join(["x"] * width) + "]"
    for i in range(1, levels):
        node = f"&b{i} [{node}, " + ", ".join([f"*b{i - 1}"] * (width - 1)) + "]"
    return node


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
