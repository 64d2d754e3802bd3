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
from transformers import AutoModel

from sanakit import __version__
from sanakit.errors import ConfigError, ModelLoadError
from sanakit.models.dtypes import dtype_name
from sanakit.models.fingerprint import combine, hash_model_dirs, hash_model_object
from sanakit.models.text.loading import load_pretrained
from sanakit.models.text.tokens import count_longer, pad_to_length

logger = logging.getLogger(__name__)

#: the smallest ``text_encoder.max_length`` an encoder accepts: the empty prompt (the null
#: embedding) needs its two special tokens ([CLS][SEP], BOS+EOS), and Gemma's instruction
#: selection keeps BOS plus the last L-1 positions
MIN_MAX_LENGTH = 2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def instruction_hash(instruction: Sequence[str] | None) -> str | None:
    """Return the sha256 hex of a complex human instruction, or None when there is none.

    The list is hashed as JSON, so line boundaries matter (they become newlines in the prompt).
    """
    if not instruction:
        return None
    payload = json.dumps(list(instruction), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


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


def display_name(name_or_path: str) -> str:
    """Short id for file names: the folder basename, reduced to ``[A-Za-z0-9._-]``."""
    base = name_or_path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    return cleaned or "text-encoder"


def check_max_length_setting(max_length: Any) -> None:
    """Reject a ``text_encoder.max_length`` that is not an integer >= :data:`MIN_MAX_LENGTH`."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ConfigError(f"text_encoder.max_length must be an integer (got {max_length!r})")
    if max_length < MIN_MAX_LENGTH:
        raise ConfigError(
            f"text_encoder.max_length must be >= {MIN_MAX_LENGTH} (got {max_length}): the empty "
            f"prompt alone needs {MIN_MAX_LENGTH} tokens"
        )


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

    def encode_trimmed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`encode` for a fixed batch of dataset captions, which an encoder may run only
        over the batch's longest prompt (zeros at padding); by default the full length."""
        return self.encode(prompts)

    def null_embedding(self) -> tuple[Tensor, Tensor]:
        """The empty-prompt embedding used for classifier-free guidance: ``[1, L, D], [1, L]``."""
        return self.encode_negative([""])

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex identifying weights, tokenizer and every setting that affects outputs."""

    def provenance(self) -> dict[str, Any]:
        """JSON-able record stored next to derived artifacts (cached embeds, null embedding)."""
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
    #: tokens kept per caption when the caller gives no ``max_length``
    default_max_length: int = 300

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_length: int | None = None,
        instruction: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "auto",
        name: str | None = None,
    ) -> None:
        max_length = self.default_max_length if max_length is None else max_length
        check_max_length_setting(max_length)
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
            loaded = load_pretrained(spec, self._model_class(), self.dtype)
            model, tokenizer, self._source_dirs = loaded.model, loaded.tokenizer, loaded.source_dirs
            self.name = name or display_name(spec)
        else:
            self.name = name or display_name(
                str(getattr(getattr(model, "config", None), "_name_or_path", "") or self.kind)
            )
        self._adopt(model, tokenizer)

    def _adopt(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Take ``model`` and ``tokenizer`` on: right padding, eval mode, device and dtype."""
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
        return AutoModel

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
        n_long = count_longer(self.tokenizer, texts, length) if warn else 0
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
        return pad_to_length(self.tokenizer, texts, length)

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

    @torch.no_grad()
    def encode_trimmed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`encode` with the model run only over the longest prompt's tokens.

        Tokenized exactly as :meth:`encode` (to L, right padded, truncated, the same warning);
        the model then sees ``ids[:, :n]``, ``n`` the longest prompt's token count, and the
        ``[B, L, D]`` embeds hold zeros wherever the ``[B, L]`` mask (the full-length one) is 0.
        The cache's caption chunks use it: padding to L costs compute and changes nothing.

        Exact for what consumes it: a real token attends to real tokens only, so its row equals
        the full-length one up to float rounding of differently shaped products (a fixed chunk
        always gets the same bits); a padded row never reaches the Sana transformer's output,
        which turns the mask into a -10000 additive attention bias and otherwise acts per
        position. Encoders whose kept positions depend on the padding (Gemma with an
        instruction) return :meth:`encode` instead.
        """
        texts = self.preprocess(self._check_prompts(prompts))
        if not texts:
            return self._empty()
        ids, mask = self._tokenize(texts, self.max_length)
        n = max(int(mask.sum(1).max()), 1)  # masks are prefixes of ones; a forward needs one
        embeds = self._forward(ids[:, :n], mask[:, :n])
        mask = mask.to(self.device)
        # zeros, not the model's output on pad tokens: the stored rows carry nothing unused
        embeds = embeds.masked_fill(mask[:, :n, None] == 0, 0)
        return torch.nn.functional.pad(embeds, (0, 0, 0, self.max_length - n)), mask

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
        if self._source_dirs is not None:
            # folders do not change under a running process; objects can, so never cache those
            content = hash_model_dirs(self._source_dirs)
            self._cached_fingerprint = combine(self._settings(), b"dirs", content)
            return self._cached_fingerprint
        content = hash_model_object(self.model, self.tokenizer)
        return combine(self._settings(), b"objects", content)
