"""Which keys the user set: those in the config file given and those in overrides.

The packaged default config and the schema defaults are not the user's choices, so a value taken
from a pretrained model may replace them; a key the user did set must agree with it instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sanakit.config.loading import parse_override
from sanakit.config.yaml_text import load_yaml


def _dotted(data: Any, prefix: str = "") -> set[str]:
    """Every key of a nested mapping, dotted (``{"model": {"num_layers": 2}}`` -> both)."""
    keys: set[str] = set()
    if isinstance(data, dict):
        for name, value in data.items():
            keys.add(f"{prefix}{name}")
            keys |= _dotted(value, f"{prefix}{name}.")
    return keys


def user_set_keys(path: str | Path | None, overrides: list[str]) -> frozenset[str]:
    """Dotted keys set in the config file ``path`` (if given) or by an override.

    Call it after ``load_config`` accepted the same arguments: the file then reads and parses.
    """
    keys: set[str] = set()
    if path:
        keys |= _dotted(load_yaml(Path(path).read_text(), f"config file {path}"))
    keys |= {parse_override(arg)[0] for arg in overrides}
    return frozenset(keys)
