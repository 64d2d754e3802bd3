"""``train.checkpoint_format=sharded``: each rank writes and reads its own slices.

The full format gathers model, EMA and AdamW state on rank 0 (16 bytes per parameter). Here every
rank hands its FSDP shards to ``torch.distributed.checkpoint`` (DCP), which writes one file per
rank into ``shards/`` of the checkpoint's temp dir, in parallel, and rank 0 adds DCP's
``.metadata``. Rank 0 writes everything else (RNG, sampler, scheduler, config, null embedding:
small) as in the full format, then the manifest last, so the crash-safety and verification of
``io/checkpoint.py`` hold unchanged. DCP keys tensors by name (``model.<fqn>``, ``ema.<fqn>``,
``optimizer.<fqn>.exp_avg``...), so a checkpoint resumes under any world size, sharded or not.

Only tensors go through DCP (its non-tensor items are pickles); the optimizer's parameter groups
(learning rate, betas, parameter names) are ``optimizer_groups.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sanakit.config import Config
from sanakit.errors import CheckpointError, ConfigError
from sanakit.io.manifest import ListedFiles
from sanakit.io.shards import SHARD_DIR, SHARD_METADATA, load_into, read_shard_metadata
from sanakit.train.checkpoint_files import bad, read_json, reading
from sanakit.train.parallel import fsdp_requested

GROUPS_FILE = "optimizer_groups.json"
SECTIONS = ("model", "ema", "optimizer")  # the DCP key prefixes


def check_checkpoint_format(cfg: Config, world_size: int | None = None) -> None:
    """``sharded`` needs FSDP over more than one process (there is nothing to shard otherwise).

    ``world_size`` None: the launch's, which torchrun and accelerate launch export as WORLD_SIZE
    (read before any process group exists, so the check runs before anything is written).
    """
    if cfg.train.checkpoint_format != "sharded":
        return
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not fsdp_requested(cfg) or world_size < 2:
        raise ConfigError(
            "train.checkpoint_format=sharded needs FSDP over more than one process (here "
            f"train.fsdp={str(cfg.train.fsdp).lower()}, {world_size} process(es)); launch "
            "with --train.fsdp=true under torchrun --nproc_per_node>=2, or use "
            "--train.checkpoint_format=full"
        )


def _live_state(
    model: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This rank's tensors (DTensor shards under FSDP) keyed by name, and the param groups.

    On a fresh optimizer torch first runs one zero-gradient step with lr 0, so that AdamW's
    moments exist for DCP to load into (the weights do not change).
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "ema": ema.state_dict(), "optimizer": optim_state["state"]}
    return tensors, optim_state["param_groups"]


def save_shards(model: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer, tmp: Path):
    """A collective: every rank writes its slices into ``tmp/shards`` (rank 0 also .metadata).

    Returns the optimizer's parameter groups (for rank 0 to write as ``optimizer_groups.json``).
    """
    tensors, groups = _live_state(model, ema, optimizer)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp / SHARD_DIR, sync_files=True))
    return groups


def write_groups(directory: Path, groups: list[dict[str, Any]]) -> None:
    (directory / GROUPS_FILE).write_text(json.dumps(groups, indent=1) + "\n")


def read_groups(files: ListedFiles, names: list[list[str]] | None = None) -> list[dict]:
    """``optimizer_groups.json``: plain numbers and flags, and the parameter names of each group
    (``names``: the current optimizer's, which they must equal)."""
    path = files.path(GROUPS_FILE)
    groups = read_json(path)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad(path, "is not a list of optimizer parameter groups")
    out = []
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise bad(path, "holds a group without a list of parameter names")
        for key, value in group.items():
            values = value if isinstance(value, list) and key != "params" else [value]
            if key != "params" and not all(v is None or isinstance(v, int | float) for v in values):
                raise bad(path, f"holds {key}={value!r}, not a number or flag")
        # JSON has no tuples: AdamW's betas go back to the tuple torch wrote
        out.append({k: v if k == "params" else _tuples(v) for k, v in group.items()})
    if names is not None and [g["params"] for g in out] != names:
        raise bad(path, "names other parameters than this model's")
    return out


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _expected_shapes(tensors: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """DCP's flat keys of ``tensors`` and their global shapes."""
    flat: dict[str, tuple[int, ...]] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        elif isinstance(node, torch.Tensor):
            flat[prefix] = tuple(node.shape)

    for section, node in tensors.items():
        walk(section, node)
    return flat


def check_shapes(files: ListedFiles, expected: dict[str, tuple[int, ...]]) -> None:
    """The shards hold exactly ``expected``: the same names and global shapes (checked before
    any tensor is read, like the full format's safetensors headers)."""
    saved = {k: tuple(v.size) for k, v in read_shard_metadata(files).state_dict_metadata.items()}
    missing, unexpected = sorted(expected.keys() - saved), sorted(saved.keys() - expected)
    wrong = sorted(k for k in expected.keys() & saved.keys() if expected[k] != saved[k])
    if missing or unexpected or wrong:
        found = {"missing": missing, "unexpected": unexpected, "shape of": wrong}
        detail = "; ".join(f"{label} {keys[:3]}" for label, keys in found.items() if keys)
        raise bad(
            files.path(SHARD_METADATA),
            f"holds the state of another model ({detail}); use the config it was written with",
        )


def load_shards(
    files: ListedFiles, model: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer
) -> None:
    """A collective when distributed: every rank reads the slices it holds now (DCP reshards
    when the world size or the sharding differs from the run that wrote them)."""
    tensors, current = _live_state(model, ema, optimizer)
    check_shapes(files, _expected_shapes(tensors))
    groups = read_groups(files, [g["params"] for g in current])
    with reading(files.path(SHARD_METADATA)):
        # in place: into the live parameter shards, EMA shadows and AdamW moments
        load_into(tensors, files)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict={"state": tensors["optimizer"], "param_groups": groups},
        )
    for moments in tensors["optimizer"].values():
        for key, value in moments.items():
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.is_floating_point() and not torch.isfinite(local).all():
                raise bad(files.path(SHARD_METADATA), f"holds a non-finite optimizer {key}")


def share_temp_dir(checkpoints_dir: Path, tmp: Path | None) -> Path | None:
    """Rank 0's checkpoint temp dir (None: no save this time), as every rank receives it.

    Only its name travels: each rank joins it to its own ``checkpoints_dir``, so nodes that
    mount the shared storage at another path (or resolve a relative work_dir elsewhere) agree.
    """
    box = [tmp.name if tmp is not None else None]
    dist.broadcast_object_list(box, src=0)
    return checkpoints_dir / box[0] if box[0] is not None else None


def refuse_invisible_shards(shard_dir: Path, missing: list[str]) -> None:
    if missing:
        raise CheckpointError(
            f"rank 0 cannot see {len(missing)} shard file(s) other ranks wrote into {shard_dir} "
            f"(e.g. {missing[0]}): with train.checkpoint_format=sharded the work_dir's "
            "checkpoints/ must be on storage every node shares"
        )
