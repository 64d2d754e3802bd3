"""Build the parts of a run from its config: encoders, data, model, optimizer, schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from sanakit.config import Config, LoraConfig, to_yaml
from sanakit.data.dataset import build_dataset
from sanakit.data.sampler import ResumableSampler
from sanakit.data.split import describe, split_heldout
from sanakit.errors import ConfigError
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.base_identity import identify_base
from sanakit.models.lora import add_lora, lora_alpha
from sanakit.models.pretrained import base_identity, load_pretrained_weights, locate_pretrained
from sanakit.models.text import build_text_encoder
from sanakit.models.text.null_embedding import NullEmbedding
from sanakit.models.transformer import LoadedWeights, build_transformer, load_weights
from sanakit.train import parallel
from sanakit.train.encoders import Encoders, build_encoders
from sanakit.train.state import EMA, TrainState

log = logging.getLogger("sanakit")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (and on CPU when asked); never fp16 (100x slower on CPU)."""
    mp = cfg.train.mixed_precision
    if mp == "bf16" or (mp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def accelerate_precision(cfg: Config, device_type: str) -> str:
    """The same policy in accelerate's words."""
    return "bf16" if autocast_dtype(cfg, torch.device(device_type)) == torch.bfloat16 else "no"


def fused_adamw(params: list[torch.nn.Parameter], **options: float) -> torch.optim.AdamW:
    """AdamW with one fused kernel per step where torch has one for these parameters' device
    (CPU and CUDA since torch 2.4: 5x faster than the per-tensor loop for the default model),
    else the multi-tensor (foreach) path. Resuming a checkpoint keeps the kernel it was written
    with (the choice is part of the saved param groups), so an old run continues bit for bit."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except RuntimeError:  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, foreach=True, **options)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "adamw":
        return fused_adamw(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "came":
        try:
            from came_pytorch import CAME
        except ImportError:  # pragma: no cover - pinned dependency
            raise ConfigError("train.optimizer=came needs the came-pytorch package") from None
        return CAME(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999, 0.9999))
    raise ConfigError(f"unknown train.optimizer '{t.optimizer}'; use adamw or came")


def build_lr_scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant LR after a linear warmup (Sana's default schedule)."""
    warmup = cfg.train.warmup_steps

    def factor(step: int) -> float:
        return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Models:
    text_encoder: Any  # sanakit.models.text.TextEncoder
    autoencoder: Any  # sanakit.models.autoencoder.Autoencoder
    transformer: torch.nn.Module


def build_models(cfg: Config, device: torch.device) -> Models:
    text_encoder = build_text_encoder(cfg.text_encoder, device)
    autoencoder = build_autoencoder(cfg.vae, device, torch.float32)
    factor = autoencoder.downsample_factor
    if cfg.model.image_size % (factor * cfg.model.patch_size):
        raise ConfigError(
            f"model.image_size={cfg.model.image_size} is not divisible by the autoencoder factor "
            f"{factor} x model.patch_size {cfg.model.patch_size}; pick a multiple of "
            f"{factor * cfg.model.patch_size}"
        )
    torch.manual_seed(cfg.seed)  # reproducible initial weights
    transformer = build_transformer(
        cfg, autoencoder.latent_channels, text_encoder.hidden_size, factor
    ).to(device)
    return Models(text_encoder, autoencoder, transformer)


def latent_shape(cfg: Config, autoencoder: Any) -> tuple[int, int, int]:
    side = cfg.model.image_size // autoencoder.downsample_factor
    return (autoencoder.latent_channels, side, side)


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Model + EMA (fp32) + AdamW moments (2x fp32) of the trained parameters (a LoRA run
    saves its adapter only), plus slack for small files."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(n * 4 * 4 + 1_000_000)


def steps_per_epoch(num_batches: int, accumulation: int) -> int:
    return max(1, math.ceil(num_batches / accumulation))


@dataclass
class Parts:
    """Everything a run is built from; ``state`` is what survives a restart."""

    models: Models
    encoders: Encoders
    dataset: Dataset
    state: TrainState
    sharded: bool  # FSDP: the transformer was sharded in place
    latent_shape: tuple[int, int, int]  # of a square model.image_size sample
    heldout: Dataset | None = None  # samples kept out of training for the held-out loss

    @property
    def autoencoder(self) -> Any:
        return self.models.autoencoder


def initial_weights(cfg: Config, model: torch.nn.Module) -> LoadedWeights | None:
    """A fresh start's weights: ``load_from`` if given, else ``model.pretrained``'s, else the
    seeded random init. A resumed run takes every weight from its checkpoint instead."""
    if cfg.load_from:
        loaded = load_weights(model, cfg.load_from)
        log.info("loaded %s", loaded.description)
        return loaded
    if cfg.model.pretrained:
        log.info("loaded %s", load_pretrained_weights(model, cfg.model.pretrained))
    return None


def add_adapter(cfg: Config, model: torch.nn.Module) -> dict[str, Any]:
    """Load the base (``load_from``, else ``model.pretrained``'s transformer), freeze it and add
    the LoRA adapter; returns what trainer_state.json records (base identity, adapter settings)."""
    spec = cfg.load_from or str(locate_pretrained(cfg.model.pretrained).transformer_dir)
    base = identify_base(spec)
    load_weights(model, base.path)
    torch.manual_seed(cfg.seed)  # reproducible adapter initialisation
    trainable = add_lora(model, cfg.lora)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA rank %d on base %s (fingerprint %s): %d of %d parameters trainable (%.2f%%)",
        cfg.lora.rank, base.path, base.fingerprint[:16], trainable, total,
        100 * trainable / total,
    )  # fmt: skip
    return {"base_model": base.to_dict(), "lora": lora_record(cfg.lora)}


def lora_record(lora: LoraConfig) -> dict[str, Any]:
    """The adapter's settings as a checkpoint records them."""
    return {
        "rank": lora.rank,
        "alpha": lora_alpha(lora),
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
    }


def build_parts(
    cfg: Config, accelerator: Any, models: Models, null: NullEmbedding, resuming: bool
) -> Parts:
    """Caches, data, sampler, (sharded) model, optimizer, schedule and the fresh state."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    dataset, buckets = build_dataset(cfg, models.autoencoder.downsample_factor)
    split = split_heldout(cfg, dataset, buckets)  # the same samples on every rank and resume
    if split.heldout is not None:
        log.info("held-out loss on %s", describe(split))
    # cold captions, then release when the caches cover what training and evaluation read
    # (a val_split held-out set is part of `dataset`; a val_dir one is not)
    separate = split.heldout if cfg.data.val_dir else None
    encoders = build_encoders(cfg, accelerator, models, dataset, separate)
    dataset, buckets = split.train, split.groups
    bs = cfg.train.train_batch_size
    sampler = ResumableSampler(len(dataset), bs, cfg.seed, rank, world, groups=buckets)
    if sampler.dropped_per_epoch:
        log.info(
            "%d samples per epoch do not fill a batch for every rank", sampler.dropped_per_epoch
        )
    model = models.transformer
    extra: dict[str, Any] = {}
    loaded = None
    if cfg.lora.rank:  # the frozen base is loaded whether or not the run resumes
        extra = add_adapter(cfg, model)
    elif not resuming:
        loaded = initial_weights(cfg, model)
    sharded = parallel.use_fsdp(cfg, world)
    if sharded:  # in place, before the optimizer and the EMA take the (now sharded) parameters
        log.info(parallel.shard_transformer(model, device, world))
    optimizer = build_optimizer(cfg, model)
    state = TrainState(
        model=model,
        ema=EMA(model, cfg.train.ema_rate),
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(cfg, optimizer),
        sampler=sampler,
        generator=torch.Generator().manual_seed(cfg.seed),
        null=null,
        config_yaml=to_yaml(cfg),
        rank=rank,
        world_size=world,
        extra=extra,
        adapter_only=bool(cfg.lora.rank),
    )
    if loaded is not None and loaded.ema is not None:  # an NVlabs checkpoint's own EMA
        state.ema.load_state_dict(loaded.ema)
    if cfg.model.pretrained:  # which base this run started from (LoRA checks it on resume)
        state.extra["pretrained_model"] = base_identity(cfg.model.pretrained).to_dict()
    shape = latent_shape(cfg, models.autoencoder)
    return Parts(models, encoders, dataset, state, sharded, shape, split.heldout)
