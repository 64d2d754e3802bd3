"""What indexing produces: one :class:`Record` per usable sample, and the skips by reason."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO

from sanakit.data.files import open_regular


class SkipCounter:
    """Counts samples skipped while indexing, by reason (e.g. ``"empty caption"``)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        """Record ``n`` skipped samples for ``reason``."""
        self._counts[reason] += n

    @property
    def total(self) -> int:
        """Number of skipped samples over all reasons."""
        return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """A copy of the per-reason counts."""
        return dict(self._counts)

    def summary(self) -> str:
        """One line, most frequent reason first: ``"skipped 3 samples: 2 empty caption, 1 ..."``."""
        total = self.total
        noun = "sample" if total == 1 else "samples"
        if not total:
            return f"skipped 0 {noun}"
        parts = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return f"skipped {total} {noun}: " + ", ".join(f"{n} {reason}" for reason, n in parts)

    def __repr__(self) -> str:
        return f"SkipCounter({dict(self._counts)!r})"


@dataclass(frozen=True, slots=True)
class Record:
    """One indexed sample.

    ``path`` is the (resolved) image file, or for webdataset the shard holding it; then
    ``offset`` and ``size`` locate the member's bytes inside the (uncompressed) tar.
    """

    id: str
    caption: str
    path: str
    offset: int = -1
    size: int = 0

    def open(self) -> BinaryIO:
        """The image bytes as a file object for ``PIL.Image.open``; the caller closes it.

        Opened afresh per read (safe in forked DataLoader workers) and only if still a regular
        file, so a path swapped for a FIFO after indexing cannot hang a worker.
        """
        if self.offset < 0:
            return open_regular(self.path)
        with open_regular(self.path) as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member truncated: wanted {self.size} bytes, got {len(data)}")
        return io.BytesIO(data)
