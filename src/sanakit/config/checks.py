"""Value checks that types alone cannot express; each failure names the key and the fix."""

from __future__ import annotations

import math
from operator import attrgetter

from sanakit.config.schema import (
    SEED_MAX,
    SHAPES_COLOURS,
    Config,
    DataType,
    VaeType,
    schema_types,
)
from sanakit.errors import ConfigError

_POSITIVE = (  # counts, sizes and factors
    "model.image_size", "model.patch_size", "model.num_layers", "model.num_attention_heads",
    "model.attention_head_dim", "model.num_cross_attention_heads",
    "model.cross_attention_head_dim", "model.mlp_ratio", "scheduler.flow_shift",
    "train.train_batch_size", "train.max_steps", "train.num_epochs",
    "train.gradient_accumulation_steps", "train.save_model_steps", "train.log_interval",
    "train.eval_sampling_steps", "train.sampling_steps",
)  # fmt: skip
_NON_NEGATIVE = (
    "train.lr", "train.warmup_steps", "train.gradient_clip", "train.cfg_scale",
    "train.early_stop_hours", "train.weight_decay", "data.max_samples", "data.num_workers",
    "scheduler.logit_std", "data.val_split", "lora.rank", "lora.alpha",
)  # fmt: skip
_UNIT_INTERVAL = ("model.class_dropout_prob", "train.ema_rate", "lora.dropout")
MODEL_SIZE_MAX = 65_536  # larger than any Sana layer, head or image side; beyond it shapes overflow
_MODEL_SIZES = tuple(k for k in _POSITIVE if k.startswith("model."))
COUNT_MAX = 2**31 - 1  # per-step counts a tensor shape or a worker pool must hold
_COUNTS = ("train.train_batch_size", "train.gradient_accumulation_steps",
           "train.sampling_steps", "data.num_workers", "text_encoder.max_length",
           "lora.rank")  # fmt: skip


def check_seed(seed: int, name: str = "seed") -> int:
    """A seed every generator takes (numpy's range); raise naming ``name`` otherwise."""
    if isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{name}={seed} is out of range; use a seed from 0 to {SEED_MAX}")
    return seed


def _check_numbers(cfg: Config) -> None:
    def fail(key: str, rule: str) -> ConfigError:
        value = attrgetter(key)(cfg)
        return ConfigError(f"config key '{key}' must be {rule} (got {value}); set --{key}=N")

    for key, hint in schema_types().items():  # NaN passes every comparison: catch it first
        value = attrgetter(key)(cfg) if hint in (float, float | None) else None
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(key, "a finite number")
    for rule, keys, ok in (
        ("> 0", _POSITIVE, lambda v: v > 0),
        (">= 0", _NON_NEGATIVE, lambda v: v >= 0),
        ("in [0, 1]", _UNIT_INTERVAL, lambda v: 0 <= v <= 1),
        (f"<= {MODEL_SIZE_MAX}", _MODEL_SIZES, lambda v: v <= MODEL_SIZE_MAX),
        (f"<= {COUNT_MAX}", _COUNTS, lambda v: v <= COUNT_MAX),
        (">= 2 (a token and its end marker)", ("text_encoder.max_length",), lambda v: v >= 2),
    ):
        bad = [k for k in keys if (v := attrgetter(k)(cfg)) is not None and not ok(v)]
        if bad:
            raise fail(bad[0], rule)
    check_seed(cfg.seed)


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express; each failure names the key and the fix."""
    _check_numbers(cfg)
    m = cfg.model
    if m.image_size % 32 and cfg.vae.type != VaeType.PIXEL:
        raise ConfigError(
            f"model.image_size={m.image_size} must be a multiple of 32 for a latent model; "
            "set --model.image_size to a multiple of 32"
        )
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"model.image_size={m.image_size} is not divisible by model.patch_size="
            f"{m.patch_size}; choose sizes so image_size / (autoencoder factor * patch) is whole"
        )
    if cfg.data.type != DataType.SHAPES and not cfg.data.data_dir:
        raise ConfigError(
            f'data.type={cfg.data.type} needs data.data_dir; set --data.data_dir="[DIR1,DIR2]"'
        )
    _check_heldout(cfg)
    if not cfg.work_dir:
        raise ConfigError("work_dir is empty; set --work_dir=DIR")
    _check_exclude_colors(cfg)
    _check_lora(cfg)
    return cfg


def _check_heldout(cfg: Config) -> None:
    d = cfg.data
    if d.val_split >= 1 and d.val_split != int(d.val_split):
        raise ConfigError(
            f"data.val_split={d.val_split:g} is neither a fraction below 1 nor a whole count; "
            "set --data.val_split=0.05 (a fraction) or --data.val_split=200 (a count)"
        )
    if d.val_split and d.val_dir:
        raise ConfigError(
            "data.val_split and data.val_dir are both set; hold out part of the data "
            "(--data.val_split) or give a separate folder (--data.val_dir), not both"
        )
    if d.val_dir and d.type == DataType.SHAPES:
        raise ConfigError(
            "data.val_dir needs a folder-based data.type; the built-in shapes hold out samples "
            "with --data.val_split=N"
        )


def _check_exclude_colors(cfg: Config) -> None:
    names = list(SHAPES_COLOURS)
    unknown = [c for c in cfg.data.exclude_colors if c not in names]
    if unknown:
        raise ConfigError(
            f"data.exclude_colors names unknown colour '{unknown[0]}'; use some of "
            f"{', '.join(names)}"
        )
    if set(names) <= set(cfg.data.exclude_colors):
        raise ConfigError("data.exclude_colors leaves no colour to draw; keep at least one")
    if cfg.data.exclude_colors and cfg.data.type != DataType.SHAPES:
        raise ConfigError(
            f"data.exclude_colors applies to data.type=shapes only (got {cfg.data.type}); "
            "remove it or use the shapes dataset"
        )


def _check_lora(cfg: Config) -> None:
    lora = cfg.lora
    if lora.rank == 0:
        return
    if not lora.target_modules or any(not t.strip() for t in lora.target_modules):
        raise ConfigError(
            'lora.target_modules is empty or holds an empty name; set --lora.target_modules="'
            '[to_q,to_k,to_v]" or leave the default'
        )
    if not (cfg.load_from or cfg.model.pretrained):
        raise ConfigError(
            f"lora.rank={lora.rank} trains an adapter on a base model, but neither "
            "model.pretrained nor load_from names one; set --model.pretrained=PIPELINE_OR_REPO "
            "or --load_from=BASE (a sanakit checkpoint or work dir, or a diffusers folder)"
        )
    if cfg.train.fsdp:
        raise ConfigError(
            "train.fsdp=true with lora.rank>0 is not supported (the adapter is small: DDP is "
            "enough); drop --train.fsdp or set --lora.rank=0"
        )
