"""What a LoRA checkpoint records about its adapter and base, read back and checked.

``trainer_state.json`` of a LoRA run holds ``lora`` (rank, alpha, dropout, target modules) and
``base_model`` (path + weight fingerprint, ``models/base_identity.py``). Resuming with other LoRA
settings, or on another base, stops with one line; so does sampling on another base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanakit.errors import CheckpointError
from sanakit.models.base_identity import BaseIdentity, check_same_base
from sanakit.train.checkpoint_files import TRAINER_FILE, bad


@dataclass(frozen=True)
class AdapterRecord:
    settings: dict[str, Any]  # rank, alpha, dropout, target_modules
    base: BaseIdentity


def read_adapter_record(directory: Path, trainer: dict) -> AdapterRecord | None:
    """The checkpoint's LoRA record (None for a full fine-tune), its values checked."""
    settings, base = trainer.get("lora"), trainer.get("base_model")
    if settings is None and base is None:
        return None
    path = directory / TRAINER_FILE
    identity = BaseIdentity.from_dict(base)
    if identity is None:
        raise bad(path, "holds a LoRA record without a base_model path and fingerprint")
    rank = settings.get("rank") if isinstance(settings, dict) else None
    targets = settings.get("target_modules") if isinstance(settings, dict) else None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise bad(path, f"holds a LoRA rank {rank!r}, not a positive integer")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise bad(path, "holds LoRA target_modules that are not a list of names")
    return AdapterRecord(settings, identity)


def describe(settings: dict[str, Any] | None) -> str:
    if settings is None:
        return "full fine-tuning (lora.rank=0)"
    return f"lora.rank={settings['rank']} on {','.join(settings['target_modules'])}"


def check_same_adapter(directory: Path, trainer: dict, current: dict[str, Any]) -> None:
    """Resuming must keep the checkpoint's LoRA settings and its base model."""
    saved = read_adapter_record(directory, trainer)
    now = current.get("lora")
    keys = ("rank", "target_modules")
    if (saved is None) != (now is None) or (
        saved is not None and any(saved.settings.get(k) != now[k] for k in keys)
    ):
        raise CheckpointError(
            f"checkpoint {directory} was trained with "
            f"{describe(saved.settings if saved else None)}, this run asks for {describe(now)}; "
            "resume with the settings it was trained with, or start a new --work_dir"
        )
    if saved is not None:
        current_base = BaseIdentity.from_dict(current["base_model"])
        assert current_base is not None  # built by components.add_adapter
        check_same_base(saved.base, current_base, f"checkpoint {directory}")
