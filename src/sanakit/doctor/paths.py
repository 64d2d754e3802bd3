"""Where train writes: the work dir and what it creates inside, the null-embedding root, the
caches and the free disk. Every path problem fails here, before train writes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from sanakit.config import Config, null_embed_root
from sanakit.doctor.check import FAIL, PASS, WARN, Check, Skipped
from sanakit.doctor.check import writable_without_trace as writable
from sanakit.doctor.probe import Probe
from sanakit.embeddings.latents import LatentCache
from sanakit.embeddings.store import cache_root
from sanakit.embeddings.text import TextEmbeddingCache
from sanakit.io.atomic import free_bytes
from sanakit.io.ownership import current_owner
from sanakit.train.components import estimate_checkpoint_bytes
from sanakit.train.resume import checkpoints_dir
from sanakit.train.state import CONFIG_FILE
from sanakit.units import human_bytes

CHECKPOINTS_NEEDED = 3  # free disk the doctor asks for, in checkpoints of this model
APPENDED_FILES = ("train.log", "metrics.jsonl")  # train appends to these in work_dir


def train_dirs(cfg: Config) -> list[Path]:
    """The directories train creates inside work_dir for this config."""
    work_dir = Path(cfg.work_dir)
    dirs = [checkpoints_dir(cfg)]
    if cfg.train.visualize:
        dirs.append(work_dir / "vis")
    if cfg.report_to == "tensorboard":
        dirs.append(work_dir / "logs")
    return dirs


def file_problem(path: Path, appended: bool) -> str | None:
    """Why train cannot write the file ``path`` (replaced atomically, or appended to)."""
    if not (path.exists() or path.is_symlink()):
        return None
    if not path.is_file():
        return f"{path} exists but is not a regular file"
    if appended and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def work_dir_problem(cfg: Config) -> str | None:
    """The first thing inside work_dir that train could not create or write, else None."""
    for d in train_dirs(cfg):
        reason = writable(d)
        if reason:
            return f"{d} cannot be used ({reason})"
    work_dir = Path(cfg.work_dir)
    files = [(work_dir / CONFIG_FILE, False)] + [(work_dir / n, True) for n in APPENDED_FILES]
    for path, appended in files:
        reason = file_problem(path, appended)
        if reason:
            return reason
    return None


def check_work_dir(cfg: Config, probe: Probe) -> Check:
    work_dir = Path(cfg.work_dir)
    reason = writable(work_dir)
    if reason:
        return Check(
            "work_dir",
            FAIL,
            f"work_dir={work_dir} is not writable ({reason})",
            "choose a writable --work_dir or fix its permissions",
        )
    reason = work_dir_problem(cfg)
    if reason:
        return Check(
            "work_dir",
            FAIL,
            f"work_dir={work_dir}: {reason}",
            "move that path aside (train writes its own files there) or choose another --work_dir",
        )
    owner = current_owner(work_dir) if work_dir.is_dir() else None
    if owner is not None:
        return Check(
            "work_dir",
            FAIL,
            f"work_dir={work_dir} is in use by {owner.describe()}",
            "wait for that run to finish or stop it, or choose another --work_dir",
        )
    state = "exists" if work_dir.is_dir() else "can be created"
    return Check("work_dir", PASS, f"{work_dir} {state} and is writable")


def skip_inside_bad_work_dir(cfg: Config, path: Path) -> None:
    """A path inside an unusable work_dir: its check adds nothing to the work_dir line."""
    work_dir = Path(cfg.work_dir).absolute()
    if path.absolute().is_relative_to(work_dir) and writable(work_dir):
        raise Skipped(f"{path} is inside work_dir, which is not writable (see above)")


def check_null_embed_root(cfg: Config, probe: Probe) -> Check:
    root = null_embed_root(cfg)
    reason = writable(root)
    if reason:
        return Check(
            "null_embed_root",
            FAIL,
            f"{root} is not writable ({reason})",
            "set --train.null_embed_root to a writable directory",
        )
    return Check("null_embed_root", PASS, f"{root} is writable")


def check_cache(cfg: Config, probe: Probe) -> Check:
    """The caches train reads (train.cache_mode=read) or also writes (readwrite)."""
    mode, root = cfg.train.cache_mode, cache_root(cfg)
    if mode == "off":
        return Check("cache", PASS, "train.cache_mode=off: no cache is read or written")
    skip_inside_bad_work_dir(cfg, root)
    if mode == "read":
        if not root.is_dir():
            return Check(
                "cache",
                WARN,
                f"{root} is not a directory: with train.cache_mode=read every lookup misses",
                "set --train.cache_dir to a built cache, or --train.cache_mode=readwrite",
            )
        return Check("cache", PASS, f"{root} is read (train.cache_mode=read)")
    for sub in (TextEmbeddingCache.subdir, LatentCache.subdir):
        reason = writable(root / sub)
        if reason:
            return Check(
                "cache",
                FAIL,
                f"cache {root / sub} is not writable ({reason})",
                "set --train.cache_dir to a writable directory or --train.cache_mode=read",
            )
    return Check("cache", PASS, f"{root} is writable")


def check_disk(cfg: Config, probe: Probe) -> Check:
    one = estimate_checkpoint_bytes(probe.transformer)
    where = checkpoints_dir(cfg)
    free = free_bytes(where)
    fits = free // max(1, one)
    msg = (
        f"{human_bytes(free)} free for {where}; one checkpoint is about {human_bytes(one)} "
        f"(model + EMA + AdamW moments, fp32): room for {fits}"
    )
    fix = (
        f"free space or choose another --work_dir (keep room for {CHECKPOINTS_NEEDED}; "
        f"train.checkpoints_total_limit={cfg.train.checkpoints_total_limit})"
    )
    if fits < 1:
        return Check("disk", FAIL, msg, fix)
    if fits < CHECKPOINTS_NEEDED:
        return Check("disk", WARN, msg, fix)
    return Check("disk", PASS, msg)
