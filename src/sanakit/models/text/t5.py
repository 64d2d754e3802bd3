"""T5 v1.1 encoder (PixArt-style): right padding to L, ``last_hidden_state``, attention mask.

Only the encoder stack is loaded (``T5EncoderModel``), so a full T5 checkpoint or an
encoder-only folder both work. No complex human instruction: PixArt models never used one.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import T5EncoderModel

from sanakit.models.text.base import PretrainedTextEncoder


class T5Encoder(PretrainedTextEncoder):
    """T5 encoder; ``dtype="auto"`` is bf16 on CUDA (fp16 overflows in T5), float32 on CPU."""

    kind = "t5"
    cuda_default_dtype = torch.bfloat16

    def _model_class(self) -> Any:
        return T5EncoderModel
