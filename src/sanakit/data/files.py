"""The one rule for every file a dataset reads: it resolves inside its root and is a regular file.

Images, captions, metadata and shards all pass through here, so a symlink that points outside the
data root, a symlink loop, a path with a NUL byte, or a FIFO/device is skipped (and counted by the
caller) the same way wherever it appears. Opening uses ``O_NONBLOCK`` and checks the type on the
open descriptor: a FIFO never blocks, and a file swapped after indexing is still refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

#: Skip reasons (the words users read in the "skipped N samples: ..." summary).
ESCAPES_ROOT = "path escapes root"
UNRESOLVABLE = "unresolvable path"
NOT_REGULAR = "not a regular file"


class NotRegularFile(OSError):
    """The path exists but is a FIFO, socket, device or directory: never read."""


def resolve_inside(path: Path, root: Path) -> tuple[Path | None, str]:
    """``(resolved, "")``, or ``(None, skip reason)`` when it leaves ``root`` or cannot resolve.

    ``root`` must already be resolved. Symlink loops (RuntimeError before Python 3.13, OSError
    after) and NUL bytes (ValueError) are bad data, not bugs.
    """
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None, UNRESOLVABLE
    if not resolved.is_relative_to(root):
        return None, ESCAPES_ROOT
    return resolved, ""


def is_regular(path: Path) -> bool:
    """Whether ``path`` (following symlinks) is a regular file; False for anything unusable."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (raises OSError otherwise).

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
    type is then checked on the descriptor itself, so nothing can be swapped in between.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except ValueError as err:  # a NUL byte in the name
        raise OSError(f"invalid path {path!r}: {err}") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{os.fspath(path)} is not a regular file")
        f = os.fdopen(fd, "rb")
        f.raw.name = os.fspath(path)  # error messages name the file, not the descriptor
        return f
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """All bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def read_inside(path: Path, root: Path) -> tuple[bytes | None, str]:
    """``(bytes, "")`` of a regular file inside ``root``, or ``(None, skip reason)``.

    A missing file reports ``""`` as reason so callers can choose their own word for it.
    """
    resolved, reason = resolve_inside(path, root)
    if resolved is None:
        return None, reason
    try:
        return read_regular(resolved), ""
    except NotRegularFile:
        return None, NOT_REGULAR
    except OSError:
        return None, ""
