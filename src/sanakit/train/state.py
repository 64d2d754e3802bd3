"""Everything that must survive a restart, in one object that saves and loads itself.

A checkpoint directory holds: the model and EMA weights (safetensors), optimizer, LR-scheduler and
grad-scaler state, the python/numpy/torch(/cuda) RNG state and the training generator of every
rank, every rank's data-sampler position, step and epoch, the resolved config, and the null
embedding with its provenance. Nothing read back can execute code: safetensors for weights,
``torch.load(weights_only=True)`` or JSON for the rest. The directory mechanics (temp dir, fsync,
manifest, rename) live in ``io/checkpoint.py``; reading files back (only those the manifest
lists, every value checked) in ``train/checkpoint_files.py``.

By default weights, EMA and optimizer state are written full (unsharded) in the single-process
layout, whether the run was one process, DDP or FSDP; an FSDP run gathers them first
(:meth:`TrainState.full_state`) and cuts them back into shards on load (``train/parallel.py``).
With ``train.checkpoint_format=sharded`` every rank writes its own slices instead
(``train/sharded.py``); :meth:`TrainState.load` reads either layout.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from sanakit import __version__
from sanakit.data.sampler import ResumableSampler
from sanakit.errors import CheckpointError
from sanakit.io.artifacts import PROVENANCE
from sanakit.io.checkpoint import ListedFiles, listed_files
from sanakit.io.shards import is_sharded_checkpoint, require_full_layout
from sanakit.models.lora import is_adapter_key
from sanakit.models.text.null_embedding import NullEmbedding
from sanakit.train.checkpoint_files import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    NULL_EMBED_FILE,
    TRAINER_FILE,
    check_optimizer_state,
    check_plain_state,
    count,
    read_config,
    read_null_embedding,
    read_sampler_state,
    read_trainer_state,
    read_weights,
    reading,
    torch_load,
)
from sanakit.train.parallel import (
    copy_full_,
    full_model_state,
    gather_full,
    is_sharded,
    load_full_model_state,
    local,
    shard_optimizer_state,
)
from sanakit.train.sharded import load_shards

log = logging.getLogger("sanakit")
RESTORED_EXTRAS = ("heldout",)  # keys of ``TrainState.extra`` a resume reads back

__all__ = [
    "CONFIG_FILE",
    "EMA",
    "EMA_FILE",
    "MODEL_FILE",
    "NULL_EMBED_FILE",
    "TRAINER_FILE",
    "TrainState",
    "load_transformer_weights",
    "read_config",
    "read_null_embedding",
    "read_trainer_state",
]


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG state, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32.

    On a sharded (FSDP) model each shadow is sharded like its parameter, so a rank holds and
    updates only its 1/N; :meth:`state_dict` then returns sharded tensors (gathered on save).
    """

    def __init__(self, model: torch.nn.Module, rate: float) -> None:
        self.rate = rate
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]
        self._plain: bool | None = None  # set at the first update

    @torch.no_grad()
    def update(self, trainable: list[torch.Tensor]) -> None:
        """Move the shadows towards ``trainable``: the model's parameters that train, in order."""
        if self._plain is None:  # fp32, unsharded: lerp from the parameters as they are
            self._plain = all(
                p.dtype == torch.float32 and local(p) is p for p in trainable
            )  # fmt: skip
        if self._plain:
            torch._foreach_lerp_(self.shadow, trainable, 1.0 - self.rate)
            return
        # on local shards: elementwise, so exactly what the full tensors would give
        params = [local(p.detach()).float() for p in trainable]
        torch._foreach_lerp_([local(s) for s in self.shadow], params, 1.0 - self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full tensors (a checkpoint's), cutting them into shards where sharded."""
        for i, name in enumerate(self.names):
            copy_full_(self.shadow[i], state[name])


@dataclass
class TrainState:
    """The resumable state of a run. The loop mutates it; only this class reads or writes it."""

    model: torch.nn.Module  # not the DDP wrapper; under FSDP the model itself, sharded in place
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: ResumableSampler
    generator: torch.Generator  # noise, sigmas, caption dropout: the only training randomness
    null: NullEmbedding
    config_yaml: str
    rank: int = 0
    world_size: int = 1
    grad_scaler: Any = None
    step: int = 0  # optimizer steps completed
    extra: dict = field(default_factory=dict)  # more trainer_state.json keys (the LoRA base)
    adapter_only: bool = False  # LoRA: model.safetensors holds the adapter, not the frozen base

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    # ---- saving ---------------------------------------------------------------------------
    def per_rank_state(self) -> dict[str, Any]:
        """What differs between ranks; gathered to the main process before a save."""
        return {
            "rank": self.rank,
            "rng": capture_rng(self.generator),
            "sampler": self.sampler.state_dict(),
        }

    def full_state(self) -> dict[str, Any]:
        """Model, EMA and optimizer state as full tensors, in the single-process layout.

        Sharded (FSDP): a collective that every rank must call; the main process (rank 0) gets
        the tensors on CPU, the other ranks get None in their place. Otherwise: the live state
        dicts, no copy.
        """
        keep = self.rank == 0
        states = {"ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict()}
        if is_sharded(self.model):
            states = {name: gather_full(s, keep=keep) for name, s in states.items()}
        model = full_model_state(self.model, keep=keep)
        if self.adapter_only and model is not None:
            model = {k: v for k, v in model.items() if is_adapter_key(k)}
        return {"model": model, **states}

    def write(
        self, directory: Path, ranks: list[dict[str, Any]], full: dict[str, Any] | None = None
    ) -> None:
        """Write every file of a checkpoint into ``directory`` (a temporary dir).

        ``full`` is :meth:`full_state`, gathered beforehand by all ranks when the model is
        sharded (this method runs on the main process only).
        """
        if full is None:
            if is_sharded(self.model):
                raise RuntimeError("a sharded model's state must be gathered by every rank first")
            full = self.full_state()
        save_file(_contiguous(full["model"]), str(directory / MODEL_FILE))
        save_file(_contiguous(full["ema"]), str(directory / EMA_FILE))
        torch.save(full["optimizer"], directory / "optimizer.pt")
        self.write_side_files(directory, ranks, "full")

    def write_side_files(self, directory: Path, ranks: list[dict[str, Any]], layout: str) -> None:
        """Everything but model, EMA and optimizer (main process; small in either layout)."""
        torch.save(self.lr_scheduler.state_dict(), directory / "lr_scheduler.pt")
        if self.grad_scaler is not None:
            torch.save(self.grad_scaler.state_dict(), directory / "grad_scaler.pt")
        for r in ranks:
            torch.save(r["rng"], directory / f"rng_rank{r['rank']}.pt")
            (directory / f"sampler_rank{r['rank']}.json").write_text(json.dumps(r["sampler"]))
        null = {**self.null.tensors(), PROVENANCE: {"key": self.null.provenance}}
        torch.save(null, directory / NULL_EMBED_FILE)
        (directory / CONFIG_FILE).write_text(self.config_yaml)
        trainer = {
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "sanakit_version": __version__,
            "null_embed_provenance": self.null.provenance,
            "checkpoint_format": layout,
            **self.extra,
        }
        (directory / TRAINER_FILE).write_text(json.dumps(trainer, indent=2))

    # ---- loading --------------------------------------------------------------------------
    def load(self, directory: Path) -> None:
        """Restore everything from a verified checkpoint directory (only files it lists)."""
        files = listed_files(directory)
        trainer = read_trainer_state(directory)
        if is_sharded_checkpoint(files):  # every rank reads the slices it holds now
            load_shards(files, self.model, self.ema, self.optimizer)
        else:
            self._load_full(files)
        path = files.path("lr_scheduler.pt")
        scheduler = torch_load(path)
        check_plain_state(path, scheduler, self.lr_scheduler.state_dict())
        self.lr_scheduler.load_state_dict(scheduler)
        if self.grad_scaler is not None and files.has("grad_scaler.pt"):
            path = files.path("grad_scaler.pt")
            scaler = torch_load(path)
            check_plain_state(path, scaler, self.grad_scaler.state_dict())
            with reading(path):
                self.grad_scaler.load_state_dict(scaler)
        saved_world = int(trainer.get("world_size", 1))
        self._load_sampler(files, self.rank if self.rank < saved_world else 0)
        rng_rank = self.rank if saved_world == self.world_size else 0
        with reading(files.path(f"rng_rank{rng_rank}.pt")):
            restore_rng(torch_load(files.path(f"rng_rank{rng_rank}.pt")), self.generator)
        if saved_world != self.world_size:
            # the sampler position re-shards exactly (it counts samples, not batches); the
            # shared training generator is identical on every rank, so rank 0's state serves all
            log.warning(
                "resuming with %d processes from a checkpoint written by %d: data order and "
                "noise continue exactly; per-rank global RNG streams are re-derived",
                self.world_size,
                saved_world,
            )
        # hooks' own small state (train/heldout.py checks it when it reads it)
        self.extra = {k: trainer[k] for k in RESTORED_EXTRAS if k in trainer}
        self.step = int(trainer["step"])

    def _load_full(self, files: ListedFiles) -> None:
        # full tensors; a sharded model keeps this rank's slices
        weights = read_weights(files, MODEL_FILE, model_shapes(self.model, self.adapter_only))
        with reading(files.path(MODEL_FILE)):
            if self.adapter_only:  # the frozen base came from load_from
                self.model.load_state_dict(weights, strict=False)
            else:
                load_full_model_state(self.model, weights)
        ema_shapes = {k: v.shape for k, v in self.ema.state_dict().items()}
        ema = read_weights(files, EMA_FILE, ema_shapes)
        with reading(files.path(EMA_FILE)):
            self.ema.load_state_dict(ema)
        self._load_optimizer(files)

    def _load_optimizer(self, files: ListedFiles) -> None:
        path = files.path("optimizer.pt")
        state = torch_load(path)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        check_optimizer_state(path, state, params)
        with reading(path):
            self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, state))

    def _load_sampler(self, files: ListedFiles, rank_file: int) -> None:
        path = files.path(f"sampler_rank{rank_file}.json")
        state = read_sampler_state(files, rank_file)
        try:
            self.sampler.load_state_dict(state)
        except ValueError as err:
            raise CheckpointError(
                f"cannot resume {files.directory}: {err}; keep the dataset and the global batch "
                "(train_batch_size x processes) as they were, or start a new work_dir"
            ) from None
        count(path, state, "batches_done", 0, len(self.sampler))


def load_transformer_weights(
    directory: Path, model: torch.nn.Module, ema: bool = False, adapter_only: bool = False
) -> None:
    """Load a checkpoint's model (or EMA) weights into ``model`` for sampling.

    EMA files hold the trainable parameters only, so they may cover a subset of the model; a
    LoRA checkpoint (``adapter_only``) holds the adapter, loaded on top of the base in ``model``.
    """
    files = listed_files(directory)
    require_full_layout(files)
    name = EMA_FILE if ema else MODEL_FILE
    weights = read_weights(files, name, model_shapes(model, adapter_only), partial=ema)
    with reading(files.path(name)):
        model.load_state_dict(weights, strict=not (ema or adapter_only))


def model_shapes(model: torch.nn.Module, adapter_only: bool) -> dict[str, torch.Size]:
    """The shapes of what a checkpoint's model file holds for ``model``."""
    state = model.state_dict()
    return {k: v.shape for k, v in state.items() if not adapter_only or is_adapter_key(k)}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
