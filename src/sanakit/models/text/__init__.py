"""Text encoders: prompts -> (embeds [B, L, D], mask [B, L]) at a fixed max length."""

from __future__ import annotations

from typing import Any

import torch

from sanakit.errors import ConfigError
from sanakit.models.text.base import (
    MIN_MAX_LENGTH,
    TextEncoder,
    check_max_length_setting,
    instruction_hash,
)
from sanakit.models.text.gemma import GemmaEncoder
from sanakit.models.text.minilm import MiniLMEncoder
from sanakit.models.text.t5 import T5Encoder

__all__ = [
    "ENCODER_TYPES",
    "MIN_MAX_LENGTH",
    "SANA_COMPLEX_HUMAN_INSTRUCTION",
    "TextEncoder",
    "build_text_encoder",
    "instruction_hash",
]

# The default ``complex_human_instruction`` of diffusers' ``SanaPipeline.__call__``, copied
# verbatim: importing the pipeline module only to read a default costs ~3 s per process.
# tests/test_text_encoders.py asserts it still equals the installed diffusers default.
SANA_COMPLEX_HUMAN_INSTRUCTION: list[str] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",  # noqa: E501
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
]

#: valid values of ``text_encoder.type``
ENCODER_TYPES = ("minilm", "gemma-2", "t5")


def _instruction_from_cfg(value: Any) -> list[str] | None:
    """Normalise ``complex_human_instruction`` (list, OmegaConf ListConfig, None) to list | None."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(s, str) for s in value):
        raise ConfigError(
            "text_encoder.complex_human_instruction must be a list of strings (or null)"
        )
    return list(value) or None


def build_text_encoder(cfg: Any, device: torch.device | str = "cpu") -> TextEncoder:
    """Build the text encoder described by ``cfg`` (the ``text_encoder`` config section).

    ``cfg`` needs the attributes ``type`` (one of :data:`ENCODER_TYPES`), ``name_or_path``
    (``""`` selects the packaged MiniLM for ``minilm``; required otherwise), ``max_length``,
    ``complex_human_instruction`` (list of lines or None; gemma-2 only) and ``dtype``
    (``"auto" | "float32" | "bfloat16"``). Models are loaded offline only.
    """
    kind = getattr(cfg, "type", None)
    name_or_path = str(getattr(cfg, "name_or_path", "") or "")
    max_length = getattr(cfg, "max_length", None)
    dtype = getattr(cfg, "dtype", "auto") or "auto"
    instruction = _instruction_from_cfg(getattr(cfg, "complex_human_instruction", None))

    if kind not in ENCODER_TYPES:
        raise ConfigError(
            f"text_encoder.type '{kind}' is not valid: use one of {', '.join(ENCODER_TYPES)}"
        )
    check_max_length_setting(max_length)
    if instruction and kind != "gemma-2":
        raise ConfigError(
            f"text_encoder.complex_human_instruction is only supported for type 'gemma-2' "
            f"(type is '{kind}'): set --text_encoder.complex_human_instruction=null"
        )
    if kind != "minilm" and not name_or_path:
        raise ConfigError(
            f"text_encoder.name_or_path is required for type '{kind}': set "
            f"--text_encoder.name_or_path=PATH (a local folder or a cached Hugging Face repo id)"
        )

    if kind == "minilm":
        return MiniLMEncoder(
            name_or_path or None, max_length=max_length, device=device, dtype=dtype
        )
    if kind == "gemma-2":
        return GemmaEncoder(
            name_or_path,
            max_length=max_length,
            instruction=instruction,
            device=device,
            dtype=dtype,
        )
    return T5Encoder(name_or_path, max_length=max_length, device=device, dtype=dtype)
