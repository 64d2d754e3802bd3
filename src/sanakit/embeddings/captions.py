"""Caption -> (embeds, mask) at step time: an in-memory memo in front of the on-disk cache.

The text encoder is deterministic for a fixed config, so a caption seen before is never encoded
again, and each caption is encoded alone: its embedding must not depend on which other captions
shared its batch, or a resumed run would drift in the last bits. Training passes a
``TextEmbeddingCache`` (content-keyed files through the artifact store);
sampling uses the memo alone. Caption dropout happens after this, at step time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

_MEMO_BYTES = 512 * 1024 * 1024  # a 300-token Gemma embedding is ~1.4 MB: bound bytes too


class CaptionEncoder:
    """Memoised, one-caption-at-a-time encoding; optionally backed by an on-disk cache."""

    def __init__(
        self,
        encoder: Any,
        capacity: int = 4096,
        store: Any = None,
        max_bytes: int = _MEMO_BYTES,
    ) -> None:
        self.encoder = encoder
        self.store = store  # a TextEmbeddingCache, or None for memory only
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def _one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store is not None:
            return self.store.get(caption)
        embeds, mask = self.encoder.encode([caption])
        return embeds[0], mask[0]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] embeds and [B, L] mask for the captions, in order."""
        rows = []
        for caption in captions:
            row = self.memo.get(caption)
            if row is None:
                row = self._one(caption)
                self.memo[caption] = row
                self._bytes += _nbytes(row)
                # keep the row just added even if it alone exceeds the byte budget
                while len(self.memo) > 1 and (
                    len(self.memo) > self.capacity or self._bytes > self.max_bytes
                ):
                    _, old = self.memo.popitem(last=False)
                    self._bytes -= _nbytes(old)
            else:
                self.memo.move_to_end(caption)
            rows.append(row)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _nbytes(row: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in row)
