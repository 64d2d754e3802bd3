"""Caption -> (embeds, mask) at step time, memoised in memory.

The text encoder is deterministic for a fixed config, so a caption seen before is never encoded
again, and each caption is encoded alone (the built-in shapes dataset has 18 distinct captions).
The persistent, content-keyed cache on disk builds on the artifact store.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from sanakit.config import Config


class CaptionEncoder:
    def __init__(self, encoder, cfg: Config, capacity: int = 4096) -> None:
        self.encoder = encoder
        self.capacity = capacity
        self.memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] embeds and [B, L] mask for the captions, in order."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.memo))
        for caption in missing:
            # one caption per call: a caption's embedding must not depend on which other
            # captions happened to share its batch, or a resumed run would drift in the last bits
            embeds, mask = self.encoder.encode([caption])
            self.memo[caption] = (embeds[0], mask[0])
            while len(self.memo) > self.capacity:
                self.memo.popitem(last=False)
        rows = [self.memo[c] for c in captions]
        for c in captions:
            self.memo.move_to_end(c)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
