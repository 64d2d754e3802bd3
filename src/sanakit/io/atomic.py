"""The one crash-safe write primitive, for files and directories, and its housekeeping.

A process killed at any instant (``kill -9``, power loss) never leaves a half-written file or
directory under its final name: the data goes to a temp sibling ``.{name}.tmp-{pid}-{hex}`` in
the same directory, every file (and directory) in it is fsynced, it is renamed to the final name
(atomic on POSIX) and the parent directory is fsynced so the rename itself survives a power cut.

A directory cannot be renamed over a non-empty one, so replacing a directory first renames the
existing one to ``.{name}.old-{pid}-{hex}``, renames the new one in, then deletes the old copy.
A kill between those renames leaves both complete copies under dot-names; the owner of the
directory decides how to recover (see :func:`stale_siblings`).

Every file fsync goes through :func:`fsync_file` (looked up at call time), so tests can slow
writes down by patching it; nothing here reads test-only settings.
"""

import enum
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sanakit")

_HASH_CHUNK = 1 << 20

# Temp files made by atomic_write: ".{name}.tmp-{pid}-{8 hex}{suffix}".
_TEMP_FILE_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\.[^.]*)?$")
# Temp and replaced directories made by atomic_directory: ".{name}.{tag}-{pid}-{hex}".
_SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")

# Temp paths this process is writing right now. A leftover carrying our own pid is stale unless
# it is listed here: in containers a re-run after a kill often gets the same pid again.
_active_lock = threading.Lock()
_active: set[str] = set()


class Tag(enum.Enum):
    """The dot-names :func:`atomic_directory` leaves beside ``name`` if killed."""

    TMP = "tmp"  # being written; never installed, so garbage once its writer is gone
    OLD = "old"  # the previous copy of a replaced directory


@contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Mark ``path`` (a temp name of this process) as in use for :func:`owner_alive`."""
    key = str(Path(path).absolute())
    with _active_lock:
        _active.add(key)
    try:
        yield
    finally:
        with _active_lock:
            _active.discard(key)


def owner_alive(path: Path, pid: int) -> bool:
    """Whether the process ``pid`` that created temp ``path`` may still be writing it.

    Conservative: when in doubt (permission denied, Windows) the answer is True, so callers
    only ever clean up leftovers of processes that are certainly gone.
    """
    if pid == os.getpid():
        with _active_lock:
            return str(Path(path).absolute()) in _active
    if os.name == "nt":
        return True  # os.kill would terminate the process there
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is not ours (EPERM), or unknown
    return True


def temp_sibling(final: Path, tag: Tag) -> Path:
    """A fresh dot-name beside ``final`` that carries this process's pid: ``.{name}.{tag}-...``."""
    final = Path(final)
    return final.parent / f".{final.name}.{tag.value}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete :func:`atomic_write` temp files in ``directory`` whose writer process is gone.

    Such files are never the real data (the rename never happened), so removing them loses
    nothing; returns the removed paths. Directories are never touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed: list[Path] = []
    for entry in sorted(directory.iterdir()):
        m = _TEMP_FILE_RE.match(entry.name)
        if m is None or entry.is_symlink() or not entry.is_file():
            continue
        if owner_alive(entry, int(m.group(1))):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (creations, renames, deletions) to stable storage.

    Without this a rename can be lost on power failure even though the file data was synced.
    Windows cannot open directories for fsync, so there it is a no-op.
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirs.append(Path(dirpath))
        for name in sorted(filenames):
            fsync_file(Path(dirpath) / name)
    for d in reversed(dirs):
        fsync_dir(d)


def makedirs_durable(path: Path) -> None:
    """Create ``path`` (and missing parents) and fsync each parent whose entries changed."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    # Outermost first, so each new directory's entry is durable in its (now existing) parent.
    for created in reversed(missing):
        fsync_dir(created.parent)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create or replace file ``path`` atomically: readers see the old or the complete new one.

    ``write(tmp)`` must create ``tmp`` (a path in the same directory, named
    ``.{name}.tmp-{pid}-{random}{suffix}``; the original suffix is kept for writers that infer
    a format from it). The temp file is then fsynced, renamed over ``path`` and the directory
    fsynced. On any exception (including KeyboardInterrupt) the temp file is removed and the
    exception re-raised; ``path`` is left untouched. Missing parent directories are created.
    """
    path = Path(path)
    makedirs_durable(path.parent)
    base = temp_sibling(path, Tag.TMP)
    tmp = base.with_name(base.name + path.suffix)

    def fill(tmp: Path) -> None:
        write(tmp)
        if not tmp.is_file():
            # E.g. np.save appends ".npy" and writes elsewhere; renaming nothing into place
            # would lose the data silently, so treat it as a bug in the caller.
            raise RuntimeError(f"atomic_write: writer did not create the temp file {tmp}")

    _commit(path, tmp, fill, os.replace, lambda p: p.unlink(missing_ok=True))


class Existing(enum.Enum):
    """What :func:`atomic_directory` does with a directory already under the final name."""

    REPLACE = "replace"  # keep it until the new one is in place, then delete it
    KEEP_ASIDE = "keep_aside"  # move it to the name the caller gives and keep it


@dataclass(frozen=True)
class Displace:
    how: Existing
    aside: Path | None = None  # where KEEP_ASIDE moves the existing directory

    def __post_init__(self) -> None:
        if (self.how is Existing.KEEP_ASIDE) != (self.aside is not None):
            raise ValueError("Displace: KEEP_ASIDE needs an aside path, REPLACE takes none")


def atomic_directory(
    final: Path,
    fill: Callable[[Path], None],
    displace: Callable[[Path], Displace] = lambda _: Displace(Existing.REPLACE),
) -> Path:
    """Create or replace directory ``final`` so readers see the old or the complete new one.

    ``fill(tmp)`` writes into a fresh temp directory beside ``final``; every file and directory
    in it is then fsynced and it is renamed to ``final`` (parent fsynced). If ``final`` exists,
    ``displace(final)`` decides (it may also raise to refuse): REPLACE renames it to a dot-name
    ``.old-`` copy first and deletes that copy only once the new one is in place; KEEP_ASIDE
    moves it to ``aside`` for good. On any exception the temp directory is removed and
    ``final`` is untouched. Missing parent directories are created.
    """
    final = Path(final)
    makedirs_durable(final.parent)

    def make(tmp: Path) -> None:
        tmp.mkdir()
        fill(tmp)

    tmp = temp_sibling(final, Tag.TMP)
    _commit(final, tmp, make, lambda t, f: _install(t, f, displace), _discard_tree)
    return final


def _commit(
    final: Path,
    tmp: Path,
    fill: Callable[[Path], None],
    install: Callable[[Path, Path], None],
    discard: Callable[[Path], None],
) -> None:
    """The shared core: fill the temp sibling, make it durable, install it, fsync the parent."""
    with claimed(tmp):
        try:
            fill(tmp)
            if tmp.is_dir():
                fsync_tree(tmp)
            else:
                fsync_file(tmp)
            install(tmp, final)
        except BaseException:
            try:
                discard(tmp)
            except OSError:
                pass
            raise
    fsync_dir(final.parent)


def _install(tmp: Path, final: Path, displace: Callable[[Path], Displace]) -> None:
    if not (final.exists() or final.is_symlink()):
        os.rename(tmp, final)
        return
    decision = displace(final)
    if decision.aside is not None:  # KEEP_ASIDE
        os.rename(final, decision.aside)
        os.rename(tmp, final)
        return
    old = temp_sibling(final, Tag.OLD)
    with claimed(old):
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)  # put the previous copy back before giving up
            raise
        fsync_dir(final.parent)
        remove_tree(old)


def _discard_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_tree(path: Path) -> bool:
    """Delete a directory tree; False (with a warning if it was there) when it could not be."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        log.warning("could not remove %s: %s", path, err)
        return False
    return True


@dataclass(frozen=True)
class Sibling:
    """A dot-directory left beside ``name`` by :func:`atomic_directory` (tag tmp or old)."""

    path: Path
    name: str
    tag: Tag
    pid: int


def stale_siblings(parent: Path, tag: Tag, name: str | None = None) -> list[Sibling]:
    """``.{name}.{tag}-{pid}-{hex}`` directories in ``parent`` whose writer process is gone.

    A ``tmp`` one was never installed, so it is garbage. An ``old`` one is the previous copy of a
    replaced directory: garbage once ``name`` exists, the only copy if a kill landed between the
    two renames (then the caller should rename it back).
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        m = _SIBLING_RE.match(entry.name)
        if m is None or m["tag"] != tag.value or (name is not None and m["name"] != name):
            continue
        if entry.is_symlink() or not entry.is_dir() or owner_alive(entry, int(m["pid"])):
            continue
        found.append(Sibling(entry, m["name"], tag, int(m["pid"])))
    return found


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomically create or replace ``path`` with ``data``."""

    def _write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)

    atomic_write(path, _write)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Atomically create or replace ``path`` with ``text`` (UTF-8 by default)."""
    atomic_write_bytes(path, text.encode(encoding))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed so multi-GB checkpoints do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def free_bytes(path: Path) -> int:
    """Free bytes available on the filesystem that holds (or would hold) ``path``."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_writable(dir: Path) -> str | None:
    """Return None if ``dir`` exists (creating it if needed) and a file can be written there.

    Otherwise return a one-line reason naming the directory. The probe file is removed again;
    a directory created here is kept, since the caller is about to use it.
    """
    dir = Path(dir)
    try:
        makedirs_durable(dir)
    except OSError as err:
        return f"cannot create directory {dir}: {err.strerror or err}"
    if not dir.is_dir():
        return f"{dir} exists but is not a directory"
    probe = dir / f".sanakit-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(probe, "xb") as fh:
            fh.write(b"ok")
    except OSError as err:
        return f"cannot write to directory {dir}: {err.strerror or err}"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None
