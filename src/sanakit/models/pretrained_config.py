"""Fill a config from ``model.pretrained``: the architecture, and the pipeline's other parts.

The rule for what the user *set*: a key counts as set when it appears in the config file given on
the command line or in an override (``config.user_set_keys``); the packaged default config and
the schema defaults never count. Then:

* ``model.*`` architecture keys come from the transformer's ``config.json``; a set one that
  disagrees stops the run with one line naming the key and both values;
* ``model.image_size`` (a training resolution, not architecture) defaults to the model's
  ``sample_size`` times the autoencoder's factor when the pipeline's own autoencoder is used;
* the autoencoder and the text encoder + tokenizer come from the pipeline folder unless the user
  set ``vae.type`` / ``vae.name_or_path`` (resp. ``text_encoder.type`` / ``.name_or_path``);
* with Gemma, ``text_encoder.complex_human_instruction`` and ``max_length`` default to Sana's.
"""

from __future__ import annotations

import copy
from collections.abc import Set

from sanakit.config import Config, validate
from sanakit.errors import ConfigError, ModelLoadError
from sanakit.models.hub import ModelRole, read_model_config
from sanakit.models.pretrained import PretrainedSource, locate_pretrained
from sanakit.models.text import SANA_COMPLEX_HUMAN_INSTRUCTION

#: model.* keys that are architecture: they must equal the pretrained config's values
ARCH_KEYS = (
    "patch_size",
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "mlp_ratio",
)
SANA_MAX_LENGTH = 300  # SanaPipeline's max_sequence_length default
_VAE_TYPES = {"AutoencoderDC": "dc-ae", "AutoencoderKL": "sd-vae"}
_TEXT_TYPES = {"gemma2": "gemma-2", "t5": "t5", "umt5": "t5", "bert": "minilm"}


def _agree(cfg: Config, source: PretrainedSource, user_set: Set[str]) -> None:
    """Copy the architecture into ``cfg.model``; a user-set key that disagrees is one line."""
    for key in ARCH_KEYS:
        theirs, mine = source.config[key], getattr(cfg.model, key)
        if f"model.{key}" in user_set and theirs != mine:
            raise ConfigError(
                f"model.{key}={mine} disagrees with model.pretrained={source.spec}, which has "
                f"{key}={theirs} ({source.transformer_dir / 'config.json'}); drop "
                f"--model.{key} (the architecture comes from the pretrained model) or point "
                f"model.pretrained at a model with {key}={mine}"
            )
        setattr(cfg.model, key, type(mine)(theirs))


def check_resolved(cfg: Config) -> None:
    """A config naming ``model.pretrained`` must carry its architecture (``resolve_pretrained``
    did it, or it was saved by a run that did): else shapes elsewhere would be computed wrong."""
    source = locate_pretrained(cfg.model.pretrained)
    for key in ARCH_KEYS:
        if getattr(cfg.model, key) != source.config[key]:
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)} but model.pretrained={source.spec} has "
                f"{key}={source.config[key]}: resolve the config with the pretrained model "
                f"(sanakit.cli.common.load_run_config), or drop --model.{key}"
            )


def _downsample_factor(vae_config: dict) -> int | None:
    channels = vae_config.get("encoder_block_out_channels") or vae_config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else None


def _take_vae(cfg: Config, source: PretrainedSource, user_set: Set[str]) -> int | None:
    """Use the pipeline's autoencoder unless the user chose one; returns its factor if used."""
    folder = source.component("vae")
    if folder is None or {"vae.type", "vae.name_or_path"} & user_set:
        return None
    vae_config = read_model_config(folder, ModelRole.AUTOENCODER)
    kind = _VAE_TYPES.get(str(vae_config.get("_class_name")))
    if kind is None:
        raise ModelLoadError(
            f"model.pretrained={source.spec}: its vae/ is a {vae_config.get('_class_name')}, "
            f"which sanakit cannot use; set --vae.type and --vae.name_or_path"
        )
    cfg.vae.type = type(cfg.vae.type)(kind)
    cfg.vae.name_or_path = source.reference
    return _downsample_factor(vae_config)


def _take_text_encoder(cfg: Config, source: PretrainedSource, user_set: Set[str]) -> None:
    folder = source.component("text_encoder")
    if folder is None or {"text_encoder.type", "text_encoder.name_or_path"} & user_set:
        return
    model_type = read_model_config(folder, ModelRole.TEXT_ENCODER).get("model_type")
    kind = _TEXT_TYPES.get(str(model_type))
    if kind is None:
        raise ModelLoadError(
            f"model.pretrained={source.spec}: its text_encoder/ is a {model_type} model, which "
            f"sanakit cannot use; set --text_encoder.type and --text_encoder.name_or_path"
        )
    cfg.text_encoder.type = type(cfg.text_encoder.type)(kind)
    cfg.text_encoder.name_or_path = source.reference


def _sana_text_defaults(cfg: Config, user_set: Set[str]) -> None:
    """Gemma under a released Sana: Sana's instruction prefix and 300 tokens unless set."""
    if cfg.text_encoder.type != "gemma-2":
        return
    if "text_encoder.max_length" not in user_set:
        cfg.text_encoder.max_length = SANA_MAX_LENGTH
    if "text_encoder.complex_human_instruction" not in user_set:
        cfg.text_encoder.complex_human_instruction = list(SANA_COMPLEX_HUMAN_INSTRUCTION)


def resolve_pretrained(cfg: Config, user_set: Set[str]) -> Config:
    """``cfg`` with ``model.pretrained``'s architecture and parts filled in (a new object).

    ``user_set`` holds the dotted keys the user set (``config.user_set_keys``). Without
    ``model.pretrained`` the config is returned unchanged.
    """
    if not cfg.model.pretrained:
        return cfg
    source = locate_pretrained(cfg.model.pretrained)
    out = copy.deepcopy(cfg)
    _agree(out, source, user_set)
    factor = _take_vae(out, source, user_set)
    _take_text_encoder(out, source, user_set)
    _sana_text_defaults(out, user_set)
    if factor and "model.image_size" not in user_set:
        out.model.image_size = int(source.config["sample_size"]) * factor
    return validate(out)


def pipeline_parts(cfg: Config) -> dict[str, str]:
    """Where each part of a resolved config loads from (for doctor's report)."""
    te = cfg.text_encoder
    return {
        "autoencoder": f"{cfg.vae.type} {cfg.vae.name_or_path}".strip(),
        "text encoder": f"{te.type} {te.name_or_path or '(packaged MiniLM)'}",
    }
