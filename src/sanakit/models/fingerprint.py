"""One fingerprint for model weights and tokenizers: what derived artifacts are keyed by.

Text and latent caches and the null embedding's provenance store these hashes, so they must change
whenever the weights change, stay the same when a folder moves, and be cheap for multi-GB
checkpoints. Folders are hashed by file (name, size, bytes: in full up to
:data:`FULL_HASH_LIMIT`, else a sample); in-memory modules by every state_dict tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sanakit.models.dtypes import dtype_name

# Small files that do not affect outputs; skipped so that editing a model card keeps the cache.
IGNORED_FILES = re.compile(r"(?i)^(readme.*|.*\.md|\.gitattributes|.*\.(png|jpe?g|gif|webp))$")
#: suffixes of weight files (pickles included: a pickle next to safetensors still names the model)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Files up to this size (configs, tokenizers, small weights) are hashed in full; larger ones by
# name, size and a byte sample. 32 MiB hashes in ~50 ms, so only real checkpoints get sampled.
FULL_HASH_LIMIT = 32 * 1024 * 1024
_HEAD_BYTES = 64 * 1024  # covers safetensors headers (tensor names, shapes, offsets)
_TAIL_BYTES = 64 * 1024
_SAMPLE_CHUNKS = 16
_CHUNK_BYTES = 4096
# Config keys that describe how a model was loaded or saved, not what it computes.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "_diffusers_version",
        "_use_default_values",
        "dtype",
        "torch_dtype",
    }
)


def _hash_file(h: Any, path: Path, size: int) -> None:
    """Feed ``path`` into ``h``: in full when small, else head, tail and evenly spaced chunks.

    The head covers the safetensors header (tensor names, shapes, dtypes); any fine-tune
    rewrites bytes throughout and so hits the sample, while a single edited value deep inside a
    large shard may go unnoticed. A 5 GB checkpoint costs a few hundred KiB of reads.
    """
    with path.open("rb") as f:
        if size <= FULL_HASH_LIMIT:
            h.update(f.read())
            return
        h.update(f.read(_HEAD_BYTES))
        span = size - _HEAD_BYTES - _TAIL_BYTES
        if span > 0:
            for i in range(_SAMPLE_CHUNKS):
                f.seek(_HEAD_BYTES + span * i // _SAMPLE_CHUNKS)
                h.update(f.read(_CHUNK_BYTES))
        f.seek(max(size - _TAIL_BYTES, 0))
        h.update(f.read(_TAIL_BYTES))


def hash_files(entries: Iterable[tuple[str, Path]]) -> str:
    """sha256 over ``(label, file)`` pairs: each label, the file's size and its (sampled) bytes."""
    h = hashlib.sha256()
    for label, path in entries:
        size = path.stat().st_size  # follows HF-cache symlinks to the blobs
        h.update(f"{label}\0{size}\0".encode())
        _hash_file(h, path, size)
    return h.hexdigest()


def _top_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def hash_model_dirs(dirs: Sequence[Path]) -> str:
    """Hash every top-level file of model folders (a text encoder's model and tokenizer dirs).

    Files are keyed by folder position, not folder name: moving a model folder, or a new cache
    snapshot with identical files, keeps the fingerprint (and every cache keyed by it).
    """
    unique = list(dict.fromkeys(dirs))  # a plain model folder is both model and tokenizer dir
    return hash_files(
        (f"{index}/{path.name}", path)
        for index, folder in enumerate(unique)
        for path in _top_files(folder)
        if not IGNORED_FILES.match(path.name)
    )


def hash_weight_files(folder: Path) -> str:
    """Hash the weight files of one folder (an autoencoder: its config is hashed as settings)."""
    return hash_files(
        (path.name, path) for path in _top_files(folder) if path.suffix in WEIGHT_SUFFIXES
    )


def _update_with_tensors(h: Any, module: torch.nn.Module) -> None:
    for key, tensor in module.state_dict().items():
        t: Tensor = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}\0{dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            # raw bytes via a uint8 view: works for bf16, which numpy cannot represent
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def hash_state_dict(module: torch.nn.Module) -> str:
    """Full hash of every tensor of an in-memory module (meant for small / test models)."""
    h = hashlib.sha256()
    _update_with_tensors(h, module)
    return h.hexdigest()


def stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the keys that say how a model was loaded or saved."""
    return {
        k: v
        for k, v in config.items()
        if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_attn_implementation")
    }


def hash_model_object(model: torch.nn.Module, tokenizer: Any) -> str:
    """Content hash of in-memory objects: the config, every state_dict tensor and the tokenizer.

    Used when an encoder was built from objects (tests, notebooks); affordable for small models.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(stable_config(config.to_dict()), sort_keys=True, default=str).encode())
    _update_with_tensors(h, model)
    h.update(hash_tokenizer_object(tokenizer).encode())
    return h.hexdigest()


def hash_tokenizer_object(tokenizer: Any) -> str:
    """Hash a tokenizer's full definition (fast tokenizers) or its vocabulary (slow ones)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # padding/truncation are call-time settings the encoder changes on first use; they do
        # not change what a token means, so they must not change the fingerprint
        definition.pop("padding", None)
        definition.pop("truncation", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "cls": getattr(tokenizer, "cls_token", None),
        "sep": getattr(tokenizer, "sep_token", None),
    }
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return h.hexdigest()


def combine(settings: dict[str, Any], source: bytes, content: str) -> str:
    """The fingerprint of a model: its settings (JSON) plus a tagged content hash."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(source + b"\0" + content.encode())
    return h.hexdigest()
