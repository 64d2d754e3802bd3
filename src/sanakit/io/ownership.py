"""One job per directory: an exclusive ``flock`` held for the whole job.

A training run owns its work dir, an export its destination, a cache build its cache dir. The
lock is an OS lock on an open file, so the OS drops it the instant the process dies (``kill -9``
included): a stale lock cannot exist. The lock file's content is only the record of who took
it (pid, host, command, start time), emptied again when the job ends; whether the lock is held
is always asked of the OS, never read from the record (a killed job's record stays behind).

The processes of one launch (torchrun, accelerate: ``RANK``) are one owner: global rank 0 takes
the lock for all of them. If rank 0 is refused it exits, and the launcher ends the other ranks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from sanakit.errors import SanakitError

log = logging.getLogger("sanakit")

LOCK_NAME = ".sanakit.lock"
# a `doctor` asking who owns a dir holds a shared lock for microseconds: try a little longer
# before calling the dir busy (this also gives a new owner time to write its record)
RETRY_SECONDS = 1.0
_RECORD_LIMIT = 64 * 1024


# lock fds held by this process; a forked child (a DataLoader worker) closes its copies, or it
# would keep the lock alive after its parent was killed
_HELD: set[int] = set()


def _close_inherited() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # only this copy: the parent's lock stays (flock(2))
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class OwnershipError(SanakitError):
    """A directory's lock file cannot be opened or locked."""


class WorkDirBusy(OwnershipError):
    """Another job owns the directory (its pid, host and command are in the message)."""


@dataclass(frozen=True)
class Owner:
    """Who owns a directory: the record written into its lock file (pid 0: no record)."""

    pid: int
    host: str
    what: str  # e.g. "sanakit train"
    command: str  # the full command line
    started: str  # UTC, "YYYY-MM-DD HH:MM:SS UTC"

    def describe(self) -> str:
        if not self.pid:
            return "another process (it left no owner record)"
        return f"pid {self.pid} on host {self.host} ({self.what}, started {self.started})"


UNKNOWN_OWNER = Owner(pid=0, host="", what="", command="", started="")


def lock_file(directory: Path) -> Path:
    """The lock file of a directory the job writes into (a work dir, a cache dir)."""
    return Path(directory) / LOCK_NAME


def destination_lock_file(out: Path) -> Path:
    """The lock file of a destination replaced as a whole by rename: a sibling of it."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}{LOCK_NAME}"


def is_follower_rank() -> bool:
    """True in every process of a multi-process launch except global rank 0."""
    for name in ("RANK", "LOCAL_RANK"):  # LOCAL_RANK alone: a single-node launcher
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                return int(raw) != 0
            except ValueError:
                return False
    return False


def _open(path: Path, create: bool) -> int:
    # never follow a planted symlink (the record write would truncate its target)
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    flags |= os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file locked via ``fd`` (a releasing owner may unlink)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _read_record(fd: int) -> Owner:
    try:
        data = json.loads(os.pread(fd, _RECORD_LIMIT, 0).decode("utf-8"))
        owner = Owner(**{k: data[k] for k in Owner.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return UNKNOWN_OWNER
    if not isinstance(owner.pid, int) or not all(
        isinstance(v, str) for v in (owner.host, owner.what, owner.command, owner.started)
    ):
        return UNKNOWN_OWNER
    return owner


def _write_record(fd: int, what: str) -> Owner:
    me = Owner(
        pid=os.getpid(),
        host=socket.gethostname(),
        what=what,
        command=shlex.join(sys.argv),
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    data = (json.dumps(asdict(me)) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return me


def _acquire(path: Path, subject: str, hint: str) -> int | None:
    """An fd holding the exclusive lock on ``path``; None where the file system has no locks."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            fd = _open(path, create=True)
        except OSError as err:
            raise OwnershipError(
                f"cannot lock {subject}: its lock file {path} cannot be opened "
                f"({err.strerror or err}); remove or fix that path"
            ) from None
        try:
            locked = _try_lock(fd, fcntl.LOCK_EX)
        except OSError as err:  # e.g. ENOLCK: a network file system without locking
            os.close(fd)
            log.warning("cannot lock %s (%s): concurrent jobs on it go undetected", subject, err)
            return None
        if locked and _same_file(fd, path):
            return fd
        other = _read_record(fd)
        os.close(fd)
        if not locked and time.monotonic() >= deadline:
            raise WorkDirBusy(f"{subject} is in use by {other.describe()}; {hint}")
        time.sleep(0.0 if locked else 0.05)  # locked but unlinked meanwhile: open it anew


@contextmanager
def _hold(path: Path, what: str, subject: str, hint: str, remove: bool) -> Iterator[Owner]:
    fd = _acquire(path, subject, hint)
    if fd is None:
        yield UNKNOWN_OWNER
        return
    _HELD.add(fd)
    try:
        try:
            me = _write_record(fd, what)
        except OSError as err:
            raise OwnershipError(
                f"cannot write the owner record {path} of {subject} ({err.strerror or err})"
            ) from None
        yield me
    finally:
        try:
            if remove:  # unlinked while still held, so no one can lock the old file after us
                path.unlink()
            else:  # emptied: a job refused after taking the dir leaves its bytes as they were
                os.ftruncate(fd, 0)
        except OSError:
            pass
        _HELD.discard(fd)
        os.close(fd)  # closing the only descriptor releases the lock


def _mkdir(directory: Path, subject: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OwnershipError(f"cannot create {subject}: {err.strerror or err}") from None


@contextmanager
def own(
    directory: Path, what: str, subject: str = "work dir", hint: str = ""
) -> Iterator[Owner | None]:
    """Own ``directory`` (created if missing) for the ``with`` block, or raise WorkDirBusy.

    Yields this job's Owner record, or None in a follower rank (rank 0 owns for it). The lock
    file stays behind, empty.
    """
    if is_follower_rank():
        yield None
        return
    directory = Path(directory)
    subject = f"{subject} {directory}"
    _mkdir(directory, subject)
    hint = hint or "wait for that job to finish or stop it, or use another directory"
    with _hold(lock_file(directory), what, subject, hint, remove=False) as me:
        yield me


@contextmanager
def own_destination(out: Path, what: str, hint: str = "") -> Iterator[Owner | None]:
    """Own a destination that is replaced by rename (an export folder) via a sibling lock file.

    The lock file is removed when the job ends (a killed job's is reused by the next one).
    """
    if is_follower_rank():
        yield None
        return
    path = destination_lock_file(out)
    subject = f"export destination {Path(os.path.abspath(out))}"
    _mkdir(path.parent, subject)
    hint = hint or "wait for that export to finish, or choose another OUT_DIR"
    with _hold(path, what, subject, hint, remove=True) as me:
        yield me


def remove_stale_lock(path: Path) -> bool:
    """Remove the lock file ``path`` if no one holds it (a killed job's); True if removed.

    It is locked while being unlinked, as a releasing owner does, so a job opening it meanwhile
    notices (its file is no longer at ``path``) and starts over with a new one.
    """
    try:
        fd = _open(Path(path), create=False)
    except OSError:
        return False
    try:
        if not (_try_lock(fd, fcntl.LOCK_EX) and _same_file(fd, Path(path))):
            return False
        Path(path).unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def lock_owner(path: Path) -> Owner | None:
    """Who holds the lock file ``path`` right now, or None (read-only; creates nothing)."""
    try:
        fd = _open(Path(path), create=False)
    except OSError:
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):  # shared: never shuts out a peer probing at once
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_record(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def current_owner(directory: Path) -> Owner | None:
    """The job that owns ``directory`` (a work dir, a cache dir) right now, or None."""
    return lock_owner(lock_file(directory))


def abandoned_owner(directory: Path) -> Owner | None:
    """The record a job left in ``directory``'s lock file when it died holding it (``kill -9``,
    a crash, power loss), or None: no lock file, an empty record (a job that ended normally
    empties it), or the lock is held right now (the job is alive). Read-only."""
    try:
        fd = _open(lock_file(directory), create=False)
    except OSError:
        return None
    try:
        if not _try_lock(fd, fcntl.LOCK_SH):
            return None  # held: the owner is alive
        fcntl.flock(fd, fcntl.LOCK_UN)
        if os.fstat(fd).st_size == 0:
            return None
        return _read_record(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
