"""``sanakit checkpoint consolidate``: a sharded checkpoint rewritten in the full layout.

No process group and no model are needed: DCP reads every rank's slices of one section at a
time (model, then EMA, then optimizer) into full tensors built from its metadata, so the peak
memory is the largest section (the AdamW moments, 8 bytes per parameter), not the whole
checkpoint. The result is a complete full-format checkpoint (manifest written last, renamed
into place): ``sample``, ``export`` and ``train`` read it like any other.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sanakit.errors import CheckpointError
from sanakit.io.atomic import Displace, atomic_directory
from sanakit.io.checkpoint import listed_files, resolve_checkpoint, seal
from sanakit.io.manifest import ListedFiles
from sanakit.io.shards import SHARD_DIR, is_sharded_checkpoint, load_into, read_shard_metadata
from sanakit.train.checkpoint_files import (
    EMA_FILE,
    MODEL_FILE,
    TRAINER_FILE,
    read_trainer_state,
    reading,
)
from sanakit.train.sharded import GROUPS_FILE, read_groups

log = logging.getLogger("sanakit")

OPTIMIZER_FILE = "optimizer.pt"
NOT_COPIED = (GROUPS_FILE, TRAINER_FILE)  # rewritten in the full layout


def default_destination(checkpoint: Path) -> Path:
    """``step_N`` -> ``step_N-full`` beside it (not a ``step_N`` name: training ignores it)."""
    return checkpoint.with_name(f"{checkpoint.name}-full")


def read_section(files: ListedFiles, section: str) -> dict[str, torch.Tensor]:
    """Every tensor of one DCP section (``model``, ``ema``, ``optimizer``) as full tensors."""
    metadata = read_shard_metadata(files)
    prefix = f"{section}."
    tensors = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    if not tensors:
        raise CheckpointError(f"checkpoint {files.directory} has no {section} tensors in shards/")
    with reading(files.directory / SHARD_DIR):
        load_into(tensors, files)  # no process group: this process reads every slice
    return {key[len(prefix) :]: value for key, value in tensors.items()}


def full_optimizer_state(files: ListedFiles) -> dict:
    """AdamW's state in the single-process layout: parameters numbered in group order."""
    groups = read_groups(files)
    order = [name for group in groups for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in read_section(files, "optimizer").items():
        name, _, moment = key.rpartition(".")
        if name not in index:
            raise CheckpointError(
                f"checkpoint {files.directory} holds optimizer state for {name}, which no "
                f"parameter group of {GROUPS_FILE} names; use a checkpoint sanakit wrote"
            )
        state.setdefault(index[name], {})[moment] = value
    full_groups = [{**g, "params": [index[n] for n in g["params"]]} for g in groups]
    # AdamW creates "step" first: the same key order as an optimizer.pt the full format writes
    ordered = {i: dict(sorted(m.items(), key=lambda kv: kv[0] != "step")) for i, m in state.items()}
    return {"state": dict(sorted(ordered.items())), "param_groups": full_groups}


def consolidate(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Write the full-layout copy of sharded ``checkpoint`` (a checkpoint or a work_dir)."""
    source = resolve_checkpoint(checkpoint)  # verified (sizes and sha256) before anything is read
    files = listed_files(source)
    if not is_sharded_checkpoint(files):
        raise CheckpointError(
            f"checkpoint {source} is already in the full layout; sample and export use it as it is"
        )
    target = Path(out) if out is not None else default_destination(source)
    if target.exists() or target.is_symlink():
        raise CheckpointError(f"{target} already exists; remove it or pass another OUT")
    trainer = {**read_trainer_state(source), "checkpoint_format": "full"}

    def fill(tmp: Path) -> None:
        save_file(_contiguous(read_section(files, "model")), str(tmp / MODEL_FILE))
        save_file(_contiguous(read_section(files, "ema")), str(tmp / EMA_FILE))
        torch.save(full_optimizer_state(files), tmp / OPTIMIZER_FILE)
        for rel in sorted(files.names):
            if rel.startswith(f"{SHARD_DIR}/") or rel in NOT_COPIED:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files.path(rel), tmp / rel)
        trainer["consolidated_from"] = str(source)
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2))
        seal(tmp, files.step)

    atomic_directory(target, fill, _never_replace)
    log.info("wrote %s: the full layout of %s", target, source)
    return target


def _never_replace(final: Path) -> Displace:
    raise CheckpointError(f"{final} appeared while consolidating; remove it or pass another OUT")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}
