"""Fixed-length tokenization: every prompt right padded / truncated to exactly L tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pad_to_length(tokenizer: Any, texts: list[str], length: int) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, length], int64 mask [B, length])``, right padded and truncated."""
    batch = tokenizer(
        texts,
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"].to(torch.long)


def count_longer(tokenizer: Any, texts: list[str], length: int) -> int:
    """How many of ``texts`` exceed ``length`` tokens (special tokens included)."""
    lengths = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return sum(len(ids) > length for ids in lengths)
