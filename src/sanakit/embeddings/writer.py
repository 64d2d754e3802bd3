"""Background, atomic writes of cache entries: a cold epoch does not wait for fsync.

Each entry goes through the artifact store's atomic, fsynced write on a small thread pool (~3 ms
per file here); entries still in flight are served from memory, and ``flush_writes`` drains the
pool before a process relies on the files. No per-entry lock is taken: two ranks writing the
same entry each rename a complete file over it, and both hold the same value.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors.torch import save_file

from sanakit.io.artifacts import PROVENANCE, Tensors, key_hash, make_provenance
from sanakit.io.atomic import atomic_write, atomic_write_text

log = logging.getLogger("sanakit")


def write_entry(path: Path, key: dict, tensors: Tensors) -> None:
    """One ``.safetensors`` entry with its provenance, as ``artifacts.load_valid`` reads it."""
    metadata = {PROVENANCE: json.dumps(make_provenance(key), sort_keys=True)}

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)

    atomic_write(path, write)


class BackgroundWriter:
    """Background atomic writes with a bound on what is in flight; pending entries readable."""

    def __init__(self, workers: int = 4, max_pending: int = 256) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[Path, tuple[str, Tensors]] = {}
        self._in_flight = 0
        self._slots = threading.BoundedSemaphore(max_pending)  # back-pressure on the loop
        self.failures: list[str] = []

    def submit(self, path: Path, key: dict, tensors: Tensors) -> None:
        """Queue ``tensors`` for ``path``; blocks while ``max_pending`` writes are in flight."""
        self._slots.acquire()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sanakit-cache")
            self._pending[path] = (key_hash(key), tensors)
            self._in_flight += 1
            self._pool.submit(self._run, path, key, tensors)

    def submit_text(self, path: Path, text: str) -> None:
        """Queue a small text file (a source record); never served while in flight."""
        self._slots.acquire()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sanakit-cache")
            self._in_flight += 1
            self._pool.submit(self._run, path, None, text)

    def _run(self, path: Path, key: dict | None, tensors: Tensors | str) -> None:
        try:
            if isinstance(tensors, str):
                atomic_write_text(path, tensors)
            else:
                write_entry(path, key, tensors)
        except Exception as err:  # a cache write must never take training down
            with self._lock:
                self.failures.append(f"{path}: {err}")
                first = len(self.failures) == 1
            if first:
                log.warning(
                    "cannot write cache entry %s (%s); continuing, entries that fail to write "
                    "are recomputed when needed",
                    path,
                    err,
                )
        finally:
            with self._lock:
                if self._pending.get(path, (None, None))[1] is tensors:
                    del self._pending[path]
                self._in_flight -= 1
                self._idle.notify_all()
            self._slots.release()

    def pending(self, path: Path, key_sha: str) -> Tensors | None:
        """The tensors queued for ``path`` under the key hashed to ``key_sha``, if any."""
        with self._lock:
            entry = self._pending.get(path)
        return entry[1] if entry is not None and entry[0] == key_sha else None

    def flush(self) -> None:
        """Wait until nothing is in flight."""
        with self._lock:
            while self._in_flight:
                self._idle.wait()


_WRITER = BackgroundWriter()


def _reset_writer_in_child() -> None:
    # a forked DataLoader worker inherits the object but not the threads: start clean
    global _WRITER
    _WRITER = BackgroundWriter()


os.register_at_fork(after_in_child=_reset_writer_in_child)


def writer() -> BackgroundWriter:
    """The process's writer (a fresh one in each forked child)."""
    return _WRITER


def flush_writes() -> list[str]:
    """Wait until every queued cache write is on disk; returns the failures so far."""
    _WRITER.flush()
    return list(_WRITER.failures)
