"""Resolve a config: defaults <- YAML file <- Sana-style dotted overrides <- the debug policy.

OmegaConf structured configs over the schema's dataclasses reject unknown keys (struct mode),
wrong types and values outside a choice; each failure is reported as one line naming the key,
with close matches or the allowed values.
"""

from __future__ import annotations

import difflib
import enum
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from sanakit.config.checks import validate
from sanakit.config.schema import (
    LEGACY_KEYS,
    Config,
    ReportTo,
    packaged_config_path,
    schema_types,
)
from sanakit.config.yaml_text import AliasRefused, load_yaml
from sanakit.errors import ConfigError


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
    except AliasRefused:
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
