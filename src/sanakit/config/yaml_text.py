"""YAML as sanakit reads it: safe, no anchors or aliases (an alias bomb expands exponentially
when merged), bounded nesting."""

from __future__ import annotations

from typing import Any

import yaml

from sanakit.errors import ConfigError


class AliasRefused(ConfigError):
    """A YAML anchor or alias: refused before anything is expanded."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases before anything is expanded."""

    where = "a YAML text"

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1 if event.start_mark else "?"
            raise AliasRefused(
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
