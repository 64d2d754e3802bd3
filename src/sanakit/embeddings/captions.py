"""Caption -> (embeds, mask) at step time: an in-memory memo in front of the on-disk cache.

The text encoder is deterministic for a fixed config, so a caption seen before is never encoded
again. A caption's embedding must not depend on where a run resumed or which captions shared a
batch with it, or a resumed run would drift in the last bits. So the dataset's captions are cut
into fixed chunks (:class:`CaptionChunks`: the distinct captions ordered by length, then text,
``CHUNK`` at a time) and a dataset caption is always encoded as its row of its chunk's batch: by
:meth:`prefill` before step 1 (one batched pass over every chunk with a caption missing from the
cache), and by the rare miss later (a damaged entry, ``cache_mode=off`` beyond the memo), which
encodes its whole chunk again and gets the same bits. A chunk is encoded trimmed
(``encode_trimmed``: the model runs only over the chunk's longest caption, padding rows are
zeros), which ordering by length keeps close to each caption's own length; ``BATCHING`` names
this scheme in every cache key. Any other prompt (validation, sampling) is encoded alone, at
full length. Caption dropout happens after this, at step time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm import tqdm

from sanakit.embeddings.store import EntryStatus

log = logging.getLogger("sanakit")
_MEMO_BYTES = 512 * 1024 * 1024  # a 300-token Gemma embedding is ~1.4 MB: bound bytes too
CHUNK = 64  # captions per batched encode; part of what determines every cached embedding
#: how a chunk's rows are made; in every text-cache key, so a change makes old entries stale
BATCHING = f"chunks-{CHUNK}-by-length-trimmed"
Row = tuple[torch.Tensor, torch.Tensor]


class CaptionChunks:
    """The dataset's distinct captions, ordered by (length, text) and cut into fixed batches
    of ``size``: the same chunks whatever order the captions come in."""

    def __init__(self, captions: Iterable[str], size: int = CHUNK) -> None:
        # similar lengths share a chunk, so its longest caption pads the others little
        self.ordered = sorted(set(captions), key=lambda c: (len(c), c))
        self.size = size
        self.index = {c: i for i, c in enumerate(self.ordered)}

    def __len__(self) -> int:
        return -(-len(self.ordered) // self.size)

    def __contains__(self, caption: str) -> bool:
        return caption in self.index

    def chunk(self, k: int) -> list[str]:
        return self.ordered[k * self.size : (k + 1) * self.size]

    def chunk_of(self, caption: str) -> list[str]:
        return self.chunk(self.index[caption] // self.size)


class CaptionEncoder:
    """Memoised encoding, optionally backed by an on-disk cache and fixed caption chunks."""

    def __init__(
        self,
        encoder: Any,
        capacity: int = 4096,
        store: Any = None,
        max_bytes: int = _MEMO_BYTES,
        chunks: CaptionChunks | None = None,
    ) -> None:
        self.encoder = encoder
        self.store = store  # a TextEmbeddingCache, or None for memory only
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.chunks = chunks
        self.memo: OrderedDict[str, Row] = OrderedDict()
        self.pinned: dict[str, Row] = {}  # never evicted: rows no disk entry holds
        self._bytes = 0
        self._pinned_bytes = 0
        self.reload: Callable[[], Any] | None = None  # set when the encoder was released

    def _encoder(self) -> Any:
        if self.reload is not None:
            log.warning("a caption embedding is missing from the cache: reloading the text encoder")
            self.encoder, self.reload = self.reload(), None
        return self.encoder

    def _encode_chunk(self, captions: list[str]) -> dict[str, Row]:
        # run over the chunk's longest caption only, where the encoder can
        embeds, mask = self._encoder().encode_trimmed(captions)
        return {c: (embeds[i], mask[i]) for i, c in enumerate(captions)}

    def _one(self, caption: str) -> Row:
        hit = self.store.find(caption) if self.store is not None else None
        if hit is not None:
            return self._to_device(hit)
        if self.chunks is not None and caption in self.chunks:
            rows = self._encode_chunk(self.chunks.chunk_of(caption))
            for other, row in rows.items():  # the chunk's other rows are free now: keep them
                if other != caption and other not in self.memo:
                    self._remember(other, row)
            row = rows[caption]
        else:
            embeds, mask = self._encoder().encode([caption])
            row = (embeds[0], mask[0])
        if self.store is not None:
            self.store.put(caption, *row)
        return row

    def known(self, caption: str) -> Row | None:
        """The caption's row from memory or the disk cache, never encoded (for loader workers);
        a row read from disk is remembered, so the next epoch reads nothing."""
        row = self.pinned.get(caption) or self.memo.get(caption)
        if row is not None:  # a row on the GPU must not cross into a forked worker
            return row if row[0].device.type == "cpu" else None
        row = self.store.find(caption) if self.store is not None else None
        if row is not None:
            self._remember(caption, row)
        return row

    def _to_device(self, row: Row) -> Row:
        device = self.encoder.device  # a released encoder keeps its device
        return row[0].to(device, non_blocking=True), row[1].to(device, non_blocking=True)

    def _remember(self, caption: str, row: Row) -> None:
        self.memo[caption] = row
        self._bytes += _nbytes(row)
        # keep the row just added even if it alone exceeds the byte budget
        while len(self.memo) > 1 and (
            len(self.memo) > self.capacity or self._bytes > self.max_bytes
        ):
            _, old = self.memo.popitem(last=False)
            self._bytes -= _nbytes(old)

    def encode(
        self, captions: list[str], found: list[Row | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] embeds and [B, L] mask for the captions, in order.

        ``found`` holds rows a data-loader worker already read from the cache (None: not found).
        """
        rows = []
        for i, caption in enumerate(captions):
            row = found[i] if found is not None else None
            if row is not None:
                row = self._to_device(row)
            else:
                row = self.pinned.get(caption) or self.memo.get(caption)
            if row is None:
                row = self._one(caption)
                self._remember(caption, row)
            elif caption in self.memo:
                self.memo.move_to_end(caption)
            rows.append(row)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def prefill(self, thorough: bool = False, progress: bool = False) -> dict[EntryStatus, int]:
        """Encode, chunk by chunk, every dataset caption the cache lacks, before step 1.

        Checks each entry from its header (``thorough``: fully, NaN scan included, as
        ``cache build`` does). Rows that cannot go to disk (cache ``read``/``off``) are pinned
        in memory while they fit the byte budget. Returns the entries found by status.
        """
        assert self.chunks is not None, "prefill needs the dataset's caption chunks"
        found = {status: 0 for status in EntryStatus}
        for k in tqdm(range(len(self.chunks)), desc="captions", disable=not progress):
            chunk = self.chunks.chunk(k)
            status = {c: self._status(c, thorough) for c in chunk}
            for s in status.values():
                found[s] += 1
            todo = [c for c, s in status.items() if s is not EntryStatus.VALID]
            if not todo:
                continue
            rows = self._encode_chunk(chunk)
            for caption in todo:
                self._keep(caption, rows[caption])
        return found

    def _status(self, caption: str, thorough: bool) -> EntryStatus:
        if caption in self.pinned:
            return EntryStatus.VALID
        if self.store is None:
            return EntryStatus.MISSING
        if thorough:
            return self.store.inspect_caption(caption).status
        return self.store.probe_caption(caption)

    def _keep(self, caption: str, row: Row) -> None:
        if self.store is not None and self.store.mode == "readwrite":
            self.store.put(caption, *row)
        elif self._pinned_bytes + _nbytes(row) <= self.max_bytes:
            self.pinned[caption] = row  # no disk entry will hold it: keep it while it fits
            self._pinned_bytes += _nbytes(row)

    def pin(self, prompts: list[str]) -> None:
        """Encode prompts that are needed later (validation) now, so the encoder can go."""
        for prompt in prompts:
            if prompt not in self.pinned:
                embeds, mask = self.encode([prompt])
                self.pinned[prompt] = (embeds[0], mask[0])
                self._pinned_bytes += _nbytes(self.pinned[prompt])


def _nbytes(row: tuple[torch.Tensor, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in row)
