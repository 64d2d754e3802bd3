"""The text-encoder interface and the machinery shared by the Hugging Face backed encoders.

Every encoder maps prompts to ``(embeds [B, L, D], mask [B, L])`` at a fixed ``max_length`` L with
right padding. Derived artifacts (cached embeddings, the null embedding) are keyed by
:meth:`TextEncoder.fingerprint`, so it must change whenever anything that affects the outputs
changes, and stay cheap enough to compute for multi-GB checkpoints.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sanakit.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

# Small files that do not affect outputs; skipped so that editing a model card keeps the cache.
_IGNORED_FILES = re.compile(r"(?i)^(readme.*|.*\.md|\.gitattributes|.*\.(png|jpe?g|gif|webp))$")
# Files up to this size (configs, tokenizers, small weights) are hashed in full; larger ones by
# name, size and a byte sample. 32 MiB hashes in ~50 ms, so only real checkpoints get sampled.
_FULL_HASH_LIMIT = 32 * 1024 * 1024
_HEAD_BYTES = 64 * 1024  # covers safetensors headers (tensor names, shapes, offsets)
_TAIL_BYTES = 64 * 1024
_SAMPLE_CHUNKS = 16
_CHUNK_BYTES = 4096

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def instruction_hash(instruction: Sequence[str] | None) -> str | None:
    """Return the sha256 hex of a complex human instruction, or None when there is none.

    The list is hashed as JSON, so line boundaries matter (they become newlines in the prompt).
    """
    if not instruction:
        return None
    payload = json.dumps(list(instruction), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling used in configs and provenance."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    spec: str | torch.dtype, device: torch.device, cuda_default: torch.dtype
) -> torch.dtype:
    """Resolve a config dtype (``"auto" | "float32" | "bfloat16"``) for ``device``.

    ``"auto"`` picks ``cuda_default`` on CUDA and float32 elsewhere: bf16 matmuls on CPU are slow
    and only approximate what the float32 reference produces.
    """
    if isinstance(spec, torch.dtype):
        if spec not in _DTYPES.values():
            raise ConfigError(
                f"text_encoder.dtype {dtype_name(spec)} is not supported: "
                "use auto, float32 or bfloat16"
            )
        return spec
    if spec == "auto":
        return cuda_default if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise ConfigError(
            f"text_encoder.dtype '{spec}' is not valid: use auto, float32 or bfloat16"
        )
    return _DTYPES[spec]


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_offline(name_or_path: str) -> ModelLoadError:
    return ModelLoadError(
        f"text encoder '{name_or_path}' is not available offline: put the model folder at a local "
        f"path and set --text_encoder.name_or_path=PATH, or fill the Hugging Face cache "
        f"(HF_HOME=...; searched {_hf_cache_dir()})"
    )


def _looks_like_path(name_or_path: str) -> bool:
    """True for strings that can only be filesystem paths, never a Hub repo id."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") != 1
    )


def resolve_model_dir(name_or_path: str) -> Path:
    """Map a local folder or a Hub repo id to a local folder without touching the network.

    Repo ids are looked up in the Hugging Face cache with ``local_files_only=True``; anything that
    cannot be found raises :class:`ModelLoadError` naming ``name_or_path``.
    """
    if not name_or_path:
        raise ConfigError(
            "text_encoder.name_or_path is empty: set --text_encoder.name_or_path=PATH or a repo id"
        )
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ModelLoadError(
            f"text encoder path '{name_or_path}' is a file, not a model folder: set "
            f"--text_encoder.name_or_path to the folder that holds config.json"
        )
    if _looks_like_path(name_or_path):
        raise _not_offline(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=name_or_path, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise _not_offline(name_or_path) from None


def component_dirs(root: Path) -> tuple[Path, Path]:
    """Return ``(model_dir, tokenizer_dir)`` inside ``root``.

    A plain model folder holds both; a diffusers pipeline folder (e.g. a Sana checkpoint) keeps
    them in ``text_encoder/`` and ``tokenizer/``, so both layouts are accepted.
    """
    if not (root / "config.json").is_file() and (root / "text_encoder" / "config.json").is_file():
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root / "text_encoder"
        return root / "text_encoder", tok_dir
    return root, root


def display_name(name_or_path: str) -> str:
    """Short id for file names: the folder basename, reduced to ``[A-Za-z0-9._-]``."""
    base = name_or_path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    return cleaned or "text-encoder"


def _hash_file_sample(h: Any, path: Path, size: int) -> None:
    """Feed head, tail and evenly spaced chunks of ``path`` into ``h`` (O(1) reads per file)."""
    with path.open("rb") as f:
        h.update(f.read(_HEAD_BYTES))
        if size > _HEAD_BYTES + _TAIL_BYTES:
            span = size - _HEAD_BYTES - _TAIL_BYTES
            for i in range(_SAMPLE_CHUNKS):
                f.seek(_HEAD_BYTES + span * i // _SAMPLE_CHUNKS)
                h.update(f.read(_CHUNK_BYTES))
        f.seek(max(size - _TAIL_BYTES, 0))
        h.update(f.read(_TAIL_BYTES))


def hash_model_dirs(dirs: Sequence[Path]) -> str:
    """Cheap content hash of model folders (top-level files only).

    Every file is keyed by name and size. Config, tokenizer and small weight files are hashed in
    full; larger files (checkpoint shards) by a byte sample: head, tail and evenly spaced chunks,
    so a 5 GB checkpoint costs a few hundred KiB of reads. The head covers the safetensors header
    (tensor names, shapes, dtypes); any fine-tune rewrites bytes throughout and so hits the
    sample, while a single edited value deep inside a large shard may go unnoticed.
    """
    h = hashlib.sha256()
    unique = list(dict.fromkeys(dirs))  # a plain model folder is both model and tokenizer dir
    for index, d in enumerate(unique):
        for path in sorted(p for p in d.iterdir() if p.is_file()):
            if _IGNORED_FILES.match(path.name):
                continue
            size = path.stat().st_size  # follows HF-cache symlinks to the blobs
            # Key by position, not folder name: moving a model folder or a new cache snapshot
            # with identical files must keep the fingerprint (and every cache keyed by it).
            h.update(f"{index}/{path.name}\0{size}\0".encode())
            if size > _FULL_HASH_LIMIT:
                _hash_file_sample(h, path, size)
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # view as bytes so that bf16 (which numpy cannot represent) hashes too
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


# Config keys that describe how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def hash_model_object(model: torch.nn.Module, tokenizer: Any) -> str:
    """Content hash of in-memory objects: every state_dict tensor, the config and the tokenizer.

    Used when the encoder was built from objects (tests, notebooks); affordable for small models.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {
            k: v
            for k, v in config.to_dict().items()
            if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_attn_implementation")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        h.update(f"{key}\0{dtype_name(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        h.update(_tensor_bytes(tensor))
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


class TextEncoder(abc.ABC):
    """Prompts -> ``(embeds [B, L, D], mask [B, L])`` at a fixed max length, right padded.

    Attributes:
        name: short id used in file names (``"minilm"``, ``"gemma-2-2b-it"``, ...).
        max_length: L, the fixed number of token positions returned.
        hidden_size: D, the embedding width.
        instruction: complex human instruction prepended to prompts by :meth:`encode`, or None.
        device: where returned tensors live.
        dtype: dtype of the model and of the returned embeddings.
    """

    name: str
    max_length: int
    hidden_size: int
    instruction: list[str] | None
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode training/sampling prompts (CHI applied when configured).

        Returns embeds ``[B, L, D]`` in ``self.dtype`` and an int64 mask ``[B, L]`` on
        ``self.device``. Prompts longer than L are truncated with one warning per call.
        """

    @abc.abstractmethod
    def encode_negative(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode negative prompts the way samplers do: no CHI, padded to L, own mask."""

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        """The empty-prompt embedding used for classifier-free guidance: ``[1, L, D], [1, L]``."""
        return self.encode_negative([""])

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex identifying weights, tokenizer and every setting that affects outputs."""

    def provenance(self) -> dict[str, Any]:
        """JSON-able record stored next to derived artifacts (cached embeds, null embedding)."""
        from sanakit import __version__

        return {
            "encoder": self.name,
            "fingerprint": self.fingerprint(),
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "dtype": dtype_name(self.dtype),
            "instruction_sha256": instruction_hash(self.instruction),
            "sanakit_version": __version__,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, max_length={self.max_length}, "
            f"hidden_size={self.hidden_size}, dtype={dtype_name(self.dtype)}, "
            f"device={self.device}, instruction={'yes' if self.instruction else 'no'})"
        )


class PretrainedTextEncoder(TextEncoder):
    """A transformers model + tokenizer, right padded to ``max_length``, last hidden state out.

    Subclasses choose the model class, the default dtype and any prompt preprocessing. Build it
    from a folder / cached repo id (``name_or_path``) or from ready ``model`` + ``tokenizer``
    objects; the latter is meant for tests and keeps the fingerprint exact (full state_dict hash).
    """

    #: value of the ``type`` config key; recorded in the fingerprint
    kind: str = "pretrained"
    #: dtype that ``dtype="auto"`` selects on CUDA
    cuda_default_dtype: torch.dtype = torch.float32

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_length: int,
        instruction: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "auto",
        name: str | None = None,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(
                f"text_encoder.max_length must be an integer >= 2 (got {max_length!r})"
            )
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device, self.cuda_default_dtype)
        self.max_length = max_length
        self.instruction = list(instruction) if instruction else None
        self._source_dirs: list[Path] | None = None
        self._cached_fingerprint: str | None = None

        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None:
            if name_or_path is None:
                raise ValueError("pass name_or_path or model + tokenizer")
            spec = os.fspath(name_or_path)
            model, tokenizer = self._load(spec)
            self.name = name or display_name(spec)
        else:
            self.name = name or display_name(
                str(getattr(getattr(model, "config", None), "_name_or_path", "") or self.kind)
            )

        if tokenizer.pad_token is None:
            raise ModelLoadError(
                f"tokenizer of text encoder '{self.name}' has no pad token: use a tokenizer that "
                f"defines one (right padding to max_length needs it)"
            )
        # Padding side is part of the contract (masks are prefixes of ones); never inherit it.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.hidden_size = int(self.model.config.hidden_size)
        self._check_max_length(self.max_length)

    # -- loading ------------------------------------------------------------------------------

    def _model_class(self) -> Any:
        """The transformers class used to load weights from a folder."""
        from transformers import AutoModel

        return AutoModel

    def _load(self, spec: str) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoTokenizer

        root = resolve_model_dir(spec)
        model_dir, tok_dir = component_dirs(root)
        self._source_dirs = [model_dir, tok_dir]
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            model = self._model_class().from_pretrained(
                model_dir, local_files_only=True, dtype=self.dtype
            )
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(
                f"text encoder '{spec}' cannot be loaded from {root} ({first}): point "
                f"--text_encoder.name_or_path at a folder with config.json, tokenizer and weights"
            ) from None
        return model, tokenizer

    def _check_max_length(self, length: int) -> None:
        """Reject sequence lengths beyond learned position embeddings (they would crash later)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit:
            raise ConfigError(
                f"text_encoder.max_length={self.max_length} needs {length} positions but "
                f"'{self.name}' supports {limit}: lower --text_encoder.max_length"
            )

    # -- encoding -----------------------------------------------------------------------------

    def preprocess(self, prompts: list[str]) -> list[str]:
        """Prompt normalisation applied before tokenization (none by default)."""
        return list(prompts)

    def _tokenize(self, texts: list[str], length: int, warn: bool = True) -> tuple[Tensor, Tensor]:
        """Right-pad/truncate ``texts`` to exactly ``length`` tokens; warn once about truncation."""
        if warn:
            lengths = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
            n_long = sum(len(ids) > length for ids in lengths)
            if n_long:
                logger.warning(
                    "%d of %d prompts exceed %d tokens for text encoder '%s' (max_length=%d%s) "
                    "and were truncated",
                    n_long,
                    len(texts),
                    length,
                    self.name,
                    self.max_length,
                    ", complex human instruction included" if length != self.max_length else "",
                )
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"].to(torch.long)

    def _forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """Last hidden state for ``input_ids`` in ``self.dtype`` on ``self.device``."""
        out = self.model(input_ids.to(self.device), attention_mask=mask.to(self.device))
        return out[0].to(dtype=self.dtype, device=self.device)

    @staticmethod
    def _check_prompts(prompts: list[str]) -> list[str]:
        if isinstance(prompts, str):
            # a bare string would be encoded character by character downstream
            raise TypeError("prompts must be a list of strings, not a single string")
        return list(prompts)

    def _empty(self) -> tuple[Tensor, Tensor]:
        embeds = torch.empty(0, self.max_length, self.hidden_size, dtype=self.dtype)
        mask = torch.empty(0, self.max_length, dtype=torch.long)
        return embeds.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _encode_plain(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        texts = self.preprocess(self._check_prompts(prompts))
        if not texts:
            return self._empty()
        ids, mask = self._tokenize(texts, self.max_length)
        return self._forward(ids, mask), mask.to(self.device)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self._encode_plain(prompts)

    def encode_negative(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self._encode_plain(prompts)

    # -- identity -----------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "class": type(self).__name__,
            "max_length": self.max_length,
            "instruction_sha256": instruction_hash(self.instruction),
            "dtype": dtype_name(self.dtype),
        }

    def fingerprint(self) -> str:
        if self._cached_fingerprint is not None:
            return self._cached_fingerprint
        h = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        if self._source_dirs is not None:
            h.update(b"dirs\0" + hash_model_dirs(self._source_dirs).encode())
            # folders do not change under a running process; objects can, so never cache those
            self._cached_fingerprint = h.hexdigest()
            return self._cached_fingerprint
        h.update(b"objects\0" + hash_model_object(self.model, self.tokenizer).encode())
        return h.hexdigest()
