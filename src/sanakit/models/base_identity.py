"""Which base model a fine-tune (a LoRA adapter) was trained on: its path and weight fingerprint.

An adapter only means something on top of the exact weights it was trained against, so a LoRA
checkpoint records the base's identity and every later use (resume, sample, export) checks the
base it is given against it. The fingerprint hashes the weight files' bytes
(``fingerprint.hash_files``, sampled for large files), not their folder: a moved base keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanakit.errors import CheckpointError
from sanakit.models.fingerprint import hash_files
from sanakit.models.transformer import find_weight_files


class BaseMismatch(CheckpointError):
    """The base model given is not the one the adapter was trained on."""


@dataclass(frozen=True)
class BaseIdentity:
    path: str  # the weights as the user named them (resolved to a checkpoint dir / file)
    fingerprint: str  # sha256 over the weight files (position, size, bytes)

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Any) -> BaseIdentity | None:
        """The identity a checkpoint recorded, or None when it holds none (or not this shape)."""
        if not isinstance(data, dict):
            return None
        path, fingerprint = data.get("path"), data.get("fingerprint")
        if not isinstance(path, str) or not isinstance(fingerprint, str):
            return None
        return cls(path, fingerprint)


def identity_of_files(path: str | Path, files: Sequence[Path]) -> BaseIdentity:
    """The identity of a base held in ``files`` (several for a sharded base), named ``path``."""
    # labelled by position, not name: the same weights as model.safetensors (a sanakit
    # checkpoint) or diffusion_pytorch_model.safetensors (its export) are the same base
    ordered = sorted(files, key=lambda f: f.name)
    return BaseIdentity(str(path), hash_files((str(i), f) for i, f in enumerate(ordered)))


def identify_base(path: str | Path) -> BaseIdentity:
    """The identity of the base model at ``path`` (a load_from value)."""
    # a work dir means its newest checkpoint: the recorded path is that checkpoint's file, so it
    # keeps naming the same weights when the base run goes on
    name, files = find_weight_files(path)  # a sharded folder is named by the folder
    return identity_of_files(name, files)


def check_same_base(recorded: BaseIdentity, current: BaseIdentity, what: str) -> None:
    """Raise one line naming both fingerprints when ``current`` is not the recorded base."""
    if recorded.fingerprint != current.fingerprint:
        raise BaseMismatch(
            f"{what} was trained on base {recorded.path} (fingerprint "
            f"{recorded.fingerprint[:16]}) but the base given is {current.path} (fingerprint "
            f"{current.fingerprint[:16]}); use the base it was trained on"
        )
