"""``sanakit export CKPT OUT --lora``: a LoRA run's adapter in diffusers' format.

``OUT/pytorch_lora_weights.safetensors`` is what ``SanaPipeline.save_lora_weights`` writes (keys
``transformer.<module>.lora_A/B.weight``, the peft ``LoraConfig`` in the safetensors metadata so
alpha and targets travel with it); ``SanaPipeline.load_lora_weights(OUT)`` loads it onto the
base pipeline. ``sanakit.json`` (written last: the export marker) records the base model's path
and fingerprint and the settings to sample with; ``README.md`` says how. The folder is written
and guarded like every export (``export.py``, ``export_guard.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import SanaPipeline

from sanakit import __version__
from sanakit.config import to_dict
from sanakit.export import ExportResult, pipeline_kwargs
from sanakit.export_guard import (
    FORMAT,
    SETTINGS_FILE,
    ExportError,
    check_destination,
    clean_leftovers,
    displace_earlier_export,
)
from sanakit.inference import load_for_inference
from sanakit.io.atomic import atomic_directory
from sanakit.io.checkpoint import resolve_checkpoint
from sanakit.models.lora import diffusers_lora_state, peft_config
from sanakit.train.lora_checks import read_adapter_record
from sanakit.train.state import read_trainer_state

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for


def lora_card(settings: dict[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (settings["pipeline_kwargs"] or {}).items())
    base = settings["base_model"]
    return (
        "---\nlibrary_name: diffusers\ntags:\n- sana\n- lora\n- sanakit\n---\n"
        "# LoRA adapter for a Sana-style model, exported by sanakit\n\n"
        f"Rank {settings['lora']['rank']} (alpha {settings['lora']['alpha']}) on "
        f"{', '.join(settings['lora']['target_modules'])}; {settings['weights']} weights of step "
        f"{settings['step']}. Trained on the base `{base['path']}` (weight fingerprint "
        f"`{base['fingerprint']}`): load it onto that base only.\n\n"
        "```python\nimport torch\nfrom diffusers import SanaPipeline\n\n"
        'pipe = SanaPipeline.from_pretrained("BASE_PIPELINE", local_files_only=True)\n'
        'pipe.load_lora_weights("PATH")\n'
        'image = pipe("a red circle", generator=torch.Generator().manual_seed(0),\n'
        f"             {kwargs}).images[0]\n```\n"
    )


def export_lora(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    ema: bool = False,
    overwrite: bool = False,
    base: str | Path | None = None,
) -> ExportResult:
    """Write the adapter of a LoRA checkpoint (or a work_dir's newest) into ``out_dir``."""
    path = resolve_checkpoint(checkpoint)
    record = read_adapter_record(path, read_trainer_state(path))
    if record is None:
        raise ExportError(
            f"--lora exports an adapter, but {path} is a full fine-tune (lora.rank=0); export "
            "it without --lora"
        )
    out_dir = check_destination(Path(out_dir), overwrite)
    inf = load_for_inference(path, ema=ema, device="cpu", base=base)  # checks the base too
    cfg = inf.cfg
    settings = {
        "format": FORMAT,
        "kind": "lora",
        "sanakit_version": __version__,
        "source_checkpoint": str(path.resolve()),
        "step": int(read_trainer_state(path)["step"]),
        "weights": "ema" if ema else "model",
        "lora": record.settings,
        "base_model": record.base.to_dict(),
        "lora_file": LORA_WEIGHTS,
        "pipeline_kwargs": pipeline_kwargs(cfg),
        "training_config": to_dict(cfg),
    }
    state = diffusers_lora_state(inf.models.transformer)
    metadata = peft_config(cfg.lora).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set is not JSON

    def fill(tmp: Path) -> None:
        SanaPipeline.save_lora_weights(
            tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
        )
        (tmp / "README.md").write_text(lora_card(settings))
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n")

    clean_leftovers(out_dir)
    atomic_directory(out_dir, fill, lambda final: displace_earlier_export(final, overwrite))
    return ExportResult(out_dir, path, True, settings)
