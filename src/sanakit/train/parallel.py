"""How the transformer is spread over processes: one process, DDP, or FSDP2.

One process trains the model as built. Several processes train it as DDP through accelerate
(every rank holds every weight, gradients are all-reduced) unless FSDP is asked for with
``train.fsdp=true`` or by an accelerate FSDP launch config (accelerate exports
``ACCELERATE_USE_FSDP=true``). Then torch's FSDP2 ``fully_shard`` is applied here, to each
``SanaTransformerBlock`` and then to the root, so every rank keeps 1/N of the parameters,
gradients, AdamW moments and EMA. We shard ourselves instead of letting accelerate do it because
accelerate refuses FSDP without GPUs: this way one code path runs on GPUs (NCCL) and on CPUs
(gloo), and the CPU path is what the tests exercise.

Checkpoints hold full tensors in the single-process layout by default, so DDP, FSDP and
single-process runs resume each other's checkpoints (``train.checkpoint_format=sharded``
writes each rank's slices instead: ``train/sharded.py``). The model's weights go through
``torch.distributed.checkpoint.state_dict`` (``get_/set_model_state_dict`` with full state
dicts); the EMA shadows and the optimizer state keep the single-process layout (integer
parameter ids, which DCP's optimizer state dicts replace by names), so :func:`gather_full`
assembles them (every rank takes part, one tensor at a time, only the main process keeps the
result) and :func:`copy_full_` / :func:`shard_optimizer_state` cut them back into shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from sanakit.config import Config
from sanakit.errors import CheckpointError, ConfigError

log = logging.getLogger("sanakit")


def fsdp_requested(cfg: Config) -> bool:
    """``train.fsdp=true``, or a launch through an accelerate FSDP config."""
    return cfg.train.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def use_fsdp(cfg: Config, world_size: int) -> bool:
    """Whether this run shards the transformer (FSDP asked for and more than one process)."""
    if not fsdp_requested(cfg):
        return False
    if world_size == 1:
        log.info("FSDP requested with a single process: nothing to shard, training unsharded")
        return False
    if cfg.lora.rank:  # train.fsdp=true is refused with the config; this is a launch config
        raise ConfigError(
            "FSDP (an accelerate FSDP launch config) with lora.rank>0 is not supported (the "
            "adapter is small: DDP is enough); launch without FSDP or set --lora.rank=0"
        )
    if cfg.train.optimizer != "adamw":
        # came-pytorch mixes its factored row/column statistics (plain tensors) with sharded
        # (DTensor) gradients and fails in its first step
        raise ConfigError(
            f"train.fsdp needs train.optimizer=adamw (got '{cfg.train.optimizer}': CAME does "
            "not support sharded parameters); use adamw, or train without FSDP"
        )
    return True


def shard_transformer(model: torch.nn.Module, device: torch.device, world_size: int) -> str:
    """``fully_shard`` each transformer block, then the root; returns a per-rank size report.

    Must run before the optimizer and the EMA are built: FSDP2 replaces the parameters with
    sharded ones in place. Every rank must call it (the report is gathered from all ranks).
    """
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = [m for m in model.modules() if isinstance(m, SanaTransformerBlock)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: patch, caption and time embeddings, output head
    mine = (
        sum(local(p).numel() for p in model.parameters()),
        sum(local(p).numel() * p.element_size() for p in model.parameters()),
    )
    counts: list[Any] = [None] * world_size
    dist.all_gather_object(counts, mine)
    total = sum(p.numel() for p in model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_rank = ", ".join(
        f"rank{r} {n}/{total} ({b / 2**20:.2f}/{total_bytes / 2**20:.2f} MiB)"
        for r, (n, b) in enumerate(counts)
    )
    return (
        f"FSDP: {len(blocks)} SanaTransformerBlock(s) + root sharded over {world_size} ranks; "
        f"parameters per rank (local/global): {per_rank}"
    )


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a sharded tensor; a plain tensor is its own piece."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def no_gradient_sync(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally, with no all-reduce / reduce-scatter.

    The next backward outside this context reduces the accumulated sum once.
    """
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(
    accelerator: Any,
    model: torch.nn.Module,
    max_norm: float,
    trainable: list[torch.nn.Parameter],
) -> torch.Tensor:
    """Clip to ``max_norm`` by the global gradient norm; returns that norm (a plain tensor).

    ``trainable``: the model's parameters that get gradients, listed once by the caller (used
    unsharded; frozen ones have no gradient to count).
    """
    if not is_sharded(model):
        # what accelerate's clip_grad_norm_ ends in for one process or DDP, without its walk
        # over every parameter on each call: unscale (fp16 loss scaling only), then torch's clip
        accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    # torch's clip sums the squared shard norms over the mesh (DTensor ops): the norm of the
    # full gradient, returned replicated
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def stepping_optimizer(accelerator: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The optimizer to call ``step``/``zero_grad`` on each step.

    Accelerate's wrapper adds fp16 loss scaling (and XLA's all-reduce) to them and otherwise
    calls the torch optimizer, after looking up an optional package on every call; without a
    scaler, off XLA, the torch optimizer itself does the same step.
    """
    inner = getattr(optimizer, "optimizer", None)
    plain = accelerator.scaler is None and accelerator.distributed_type != DistributedType.XLA
    return inner if plain and isinstance(inner, torch.optim.Optimizer) else optimizer


@torch.no_grad()
def gather_full(tree: Any, keep: bool) -> Any:
    """``tree`` (nested dicts/lists of tensors) with every sharded tensor made full, on CPU.

    A collective: every rank calls it on the same structure. Tensors are gathered one at a
    time and moved to CPU at once, so a rank's extra device memory is one full tensor; ranks
    with ``keep=False`` drop each one (they get None in its place).
    """
    if isinstance(tree, DTensor):
        full = tree.full_tensor()
        return full.cpu() if keep else None
    if isinstance(tree, dict):
        return {k: gather_full(v, keep) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v, keep) for v in tree)
    return tree


def shard_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``like`` is sharded (``full`` itself when ``like`` is not sharded).

    Every rank read the same full tensor from the checkpoint, so each keeps its own slice
    without communicating (``src_data_rank=None``).
    """
    if not isinstance(like, DTensor):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise CheckpointError(
            f"checkpoint tensor has shape {tuple(full.shape)}, the model expects "
            f"{tuple(like.shape)}; resume with the model config the checkpoint was written with"
        )
    return distribute_tensor(
        full.detach().to(like.device, like.dtype),
        like.device_mesh,
        like.placements,
        src_data_rank=None,
    )


@torch.no_grad()
def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``target``, which may be one rank's shard of it."""
    if isinstance(target, DTensor):
        target.to_local().copy_(shard_like(target, full).to_local())
    else:
        target.copy_(full)


def load_full_model_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a model that may be sharded."""
    if not is_sharded(model):
        model.load_state_dict(full)
        return
    targets = model.state_dict(keep_vars=True)  # the live (sharded) parameters and buffers
    missing, unexpected = targets.keys() - full.keys(), full.keys() - targets.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint model weights do not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); resume with the config it was written with"
        )
    # torch.distributed.checkpoint cuts each full tensor into this rank's shard
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def full_model_state(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on CPU; sharded: a collective, kept where ``keep``."""
    if not is_sharded(model):
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 receives
    full = get_model_state_dict(model, options=options)
    return full if keep else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> dict:
    """A full optimizer state dict (single-process layout) cut into this rank's shards.

    Every state tensor with its parameter's shape (AdamW's moments) is sharded like the
    parameter; the rest (the step count) stays as it is. Feed the result to ``load_state_dict``.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return full
    state = {}
    for index, values in full["state"].items():
        param = params[int(index)]
        state[index] = {
            key: shard_like(param, value)
            if key != "step" and torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in values.items()
        }
    return {**full, "state": state}
