"""What a source image is, known without decoding it: the sha256 of its bytes and its size.

Latents of files are keyed by the bytes of the file (plus the crop plan and the autoencoder),
so a warm epoch must learn each file's digest without reading it. One small JSON record per
file, ``sources/{h[:2]}/{h}.json`` with ``h = sha256(path, member offset)``, remembers the
digest and the displayed size together with the file's ``stat`` (size, mtime_ns, ctime_ns,
inode): while those are unchanged the record is believed; any change (an edit, a copy over it,
even a ``touch``) makes the next reader hash the bytes again. A re-hash that finds the same bytes
finds the same latents, so a touched or moved file is not re-encoded; a file whose bytes changed
gets new latents. Records are written atomically by whichever process hashed the file (a
DataLoader worker, usually), only with ``cache_mode=readwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import get_worker_info

from sanakit.data.images import read_image_size
from sanakit.data.records import Record
from sanakit.embeddings.writer import writer
from sanakit.io.atomic import atomic_write_text

SUBDIR = "sources"


@dataclass(frozen=True)
class Source:
    """One image file's content digest and displayed ``height x width`` (EXIF applied)."""

    sha256: str
    height: int
    width: int


def file_stat(rec: Record) -> list[int]:
    """What must stay equal for a remembered digest to hold (the shard's, for a tar member)."""
    st = os.stat(rec.path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, rec.offset, rec.size]


def read_bytes(rec: Record) -> bytes:
    """The raw bytes of the record's image (a tar member's bytes for webdataset)."""
    with rec.open() as f:
        return f.read()


class SourceIndex:
    """Remembered digests under ``root/sources``; ``mode`` as the caches (off|read|readwrite)."""

    def __init__(self, root: Path, mode: str) -> None:
        self.dir = Path(root) / SUBDIR
        self.mode = mode
        self.known: dict[tuple[str, int], tuple[list[int], Source]] = {}  # this process's reads

    def path_for(self, rec: Record) -> Path:
        h = hashlib.sha256(f"{rec.path}\0{rec.offset}".encode("utf-8", "surrogatepass"))
        digest = h.hexdigest()
        return self.dir / digest[:2] / f"{digest}.json"

    def find(self, rec: Record) -> Source | None:
        """The remembered source if the file is unchanged since; None when it must be hashed."""
        if self.mode == "off":
            return None
        try:
            stat = file_stat(rec)
            seen = self.known.get((rec.path, rec.offset))
            if seen is not None and seen[0] == stat:  # the stat alone, from the second epoch on
                return seen[1]
            doc = json.loads(self.path_for(rec).read_text(encoding="utf-8"))
            if doc["stat"] != stat or doc["path"] != rec.path:
                return None
            source = Source(str(doc["sha256"]), int(doc["height"]), int(doc["width"]))
        except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or malformed
            return None
        if len(source.sha256) != 64 or source.height <= 0 or source.width <= 0:
            return None
        self.known[(rec.path, rec.offset)] = (stat, source)
        return source

    def learn(self, rec: Record, data: bytes, stat: list[int]) -> Source:
        """Hash ``data`` (read after ``stat`` was taken) and read its header; remember both.

        Raises what PIL raises for an unreadable header (the sample is then dropped).
        """
        height, width = read_image_size(io.BytesIO(data))
        source = Source(hashlib.sha256(data).hexdigest(), int(height), int(width))
        self.known[(rec.path, rec.offset)] = (stat, source)
        if self.mode == "readwrite":
            text = json.dumps({"path": rec.path, "stat": stat, **vars(source)}, sort_keys=True)
            if get_worker_info() is None:  # the training process: off the step's path
                writer().submit_text(self.path_for(rec), text)
            else:  # a worker ends with os._exit: its background writes could be lost
                with contextlib.suppress(OSError):  # a full disk costs a re-hash, not the run
                    atomic_write_text(self.path_for(rec), text)
        return source

    def identify(self, rec: Record) -> tuple[Source, bytes | None]:
        """The record's source, from memory when unchanged (then no bytes are read), else
        hashed now; returns the bytes read, if any, so the caller can decode without reading
        again. Raises OSError / PIL errors for an unreadable file."""
        known = self.find(rec)
        if known is not None:
            return known, None
        stat = file_stat(rec)  # taken first: a write racing the read shows up next time
        data = read_bytes(rec)
        return self.learn(rec, data, stat), data
