"""Durable file primitives shared by checkpoints and the artifact store.

Everything here exists so that a process killed at any instant (``kill -9``, power loss) never
leaves a half-written file under its final name: data goes to a temp file in the same directory,
is fsynced, renamed over the target with :func:`os.replace` (atomic on POSIX), and then the
parent directory is fsynced so the rename itself survives a power cut.

Test-only hook: if the environment variable ``SANAKIT_TEST_SLOW_WRITE`` is set to a float number
of seconds, :func:`atomic_write` and the checkpoint writer (:mod:`sanakit.io.checkpoint`) sleep
that long after writing each file and before fsyncing/renaming it. Kill tests use it to land a
``SIGKILL`` in the middle of a write. It must never be set in real runs.
"""

import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

SLOW_WRITE_ENV = "SANAKIT_TEST_SLOW_WRITE"

_HASH_CHUNK = 1 << 20

# Temp files made by atomic_write: ".{name}.tmp-{pid}-{8 hex}{suffix}".
_TEMP_FILE_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\.[^.]*)?$")

# Temp paths this process is writing right now. A leftover carrying our own pid is stale unless
# it is listed here: in containers a re-run after a kill often gets the same pid again.
_active_lock = threading.Lock()
_active: set[str] = set()


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


def slow_write_pause() -> None:
    """Sleep ``$SANAKIT_TEST_SLOW_WRITE`` seconds if set (test-only hook, see module doc)."""
    raw = os.environ.get(SLOW_WRITE_ENV)
    if not raw:
        return
    try:
        delay = float(raw)
    except ValueError as err:
        # Fail loudly: a silently ignored hook would make a kill test pass without testing anything.
        raise ValueError(f"{SLOW_WRITE_ENV}={raw!r} is not a number of seconds") from err
    if delay > 0:
        time.sleep(delay)


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
    """Create or replace ``path`` atomically: readers see the old file or the complete new one.

    ``write(tmp)`` must create ``tmp`` (a path in the same directory, named
    ``.{name}.tmp-{pid}-{random}{suffix}``; the original suffix is kept for writers that infer
    a format from it). The temp file is then fsynced, renamed over ``path`` and the directory
    fsynced. On any exception (including KeyboardInterrupt) the temp file is removed and the
    exception re-raised; ``path`` is left untouched. Missing parent directories are created.
    """
    path = Path(path)
    parent = path.parent
    makedirs_durable(parent)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    with claimed(tmp):
        _write_and_replace(path, tmp, write)
    fsync_dir(parent)


def _write_and_replace(path: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    try:
        write(tmp)
        if not tmp.is_file():
            # E.g. np.save appends ".npy" and writes elsewhere; renaming nothing into place
            # would lose the data silently, so treat it as a bug in the caller.
            raise RuntimeError(f"atomic_write: writer did not create the temp file {tmp}")
        slow_write_pause()
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


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
