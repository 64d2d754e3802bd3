"""The typed config tree: YAML files + Sana-style dotted overrides, and the debug policy.

``schema`` holds the dataclasses, ``loading`` resolves files and overrides, ``checks`` the value
rules, ``yaml_text`` the safe YAML reader. Everything is plain data.
"""

from sanakit.config.checks import COUNT_MAX, MODEL_SIZE_MAX, check_seed, validate
from sanakit.config.loading import (
    apply_debug,
    from_yaml_text,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)
from sanakit.config.schema import (
    LEGACY_KEYS,
    LORA_TARGETS,
    SEED_MAX,
    SHAPES_COLOURS,
    CacheMode,
    Config,
    DataConfig,
    DataType,
    EncoderDtype,
    LoraConfig,
    MixedPrecision,
    ModelConfig,
    Optimizer,
    ReportTo,
    Sampler,
    SchedulerConfig,
    TextEncoderConfig,
    TextEncoderType,
    TrainConfig,
    VaeConfig,
    VaeType,
    WeightingScheme,
    null_embed_root,
    packaged_config_path,
    schema_types,
)
from sanakit.config.user_keys import user_set_keys
from sanakit.config.yaml_text import load_yaml

__all__ = [
    "COUNT_MAX",
    "CacheMode",
    "Config",
    "DataConfig",
    "DataType",
    "EncoderDtype",
    "LEGACY_KEYS",
    "LORA_TARGETS",
    "LoraConfig",
    "MODEL_SIZE_MAX",
    "MixedPrecision",
    "ModelConfig",
    "Optimizer",
    "ReportTo",
    "SEED_MAX",
    "SHAPES_COLOURS",
    "Sampler",
    "SchedulerConfig",
    "TextEncoderConfig",
    "TextEncoderType",
    "TrainConfig",
    "VaeConfig",
    "VaeType",
    "WeightingScheme",
    "apply_debug",
    "check_seed",
    "from_yaml_text",
    "load_config",
    "load_yaml",
    "null_embed_root",
    "packaged_config_path",
    "parse_override",
    "schema_types",
    "to_dict",
    "to_yaml",
    "user_set_keys",
    "validate",
]
