"""Export a sanakit checkpoint as a diffusers folder that ``SanaPipeline.from_pretrained`` loads.

The folder holds the transformer (model or EMA weights), the scheduler our config samples with,
the tokenizer and text encoder saved from the loaded encoder objects, and the autoencoder. The
training settings a user needs to sample like ``sanakit sample`` does (max sequence length,
instruction prefix, flow shift, CFG scale, sampler + steps, where the null embedding came from)
are written to ``sanakit.json`` at the top level and repeated in the model card ``README.md``.

A pixel-space model (``vae.type=pixel``) cannot run in SanaPipeline (it needs an AutoencoderDC), so
it is exported without ``model_index.json``: the parts load one by one with diffusers/transformers.

The folder is written into a temporary sibling and renamed at the end
(:func:`sanakit.io.atomic.atomic_directory`), so a killed export never leaves a half folder under
the final name. The destination is guarded (``export_guard.py``): an export never replaces
anything but an earlier export, and never touches a sanakit run or checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SanaPipeline

from sanakit import __version__
from sanakit.config import to_dict
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
from sanakit.models.lora import fuse_and_unload
from sanakit.sampling import make_scheduler
from sanakit.train.state import read_config, read_trainer_state

__all__ = ["FORMAT", "SETTINGS_FILE", "ExportError", "check_destination", "export_checkpoint"]

log = logging.getLogger("sanakit")

NULL_EMBED_FILE = "null_embed.pth"  # the checkpoint's null embedding, Sana's key names
FORMAT_VERSION = 1
# The exported encoder must reproduce the checkpoint's null embedding within this (max abs);
# beyond it, SanaPipeline's unconditional branch (it encodes "" itself) is not the trained one.
NULL_EMBED_TOLERANCE = 1e-5


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint: Path
    pipeline_runnable: bool  # False for pixel / sd-vae models: no model_index.json
    settings: dict[str, Any]
    not_runnable_because: str = ""  # why SanaPipeline cannot run it ("" when it can)


def pipeline_blocker(cfg: Any, autoencoder: Any) -> str:
    """Why SanaPipeline cannot run this model, or "" when it can.

    SanaPipeline sizes latents from ``vae.config.encoder_block_out_channels`` (an AutoencoderDC)
    and decodes ``latents / vae.config.scaling_factor`` with no shift.
    """
    if cfg.vae.type == "pixel":
        return "vae.type=pixel (a pixel-space model)"
    if cfg.vae.type != "dc-ae":
        return f"vae.type={cfg.vae.type} (SanaPipeline needs an AutoencoderDC)"
    if autoencoder.shift_factor:
        return f"vae shift_factor={autoencoder.shift_factor} (SanaPipeline decodes with no shift)"
    return ""


def null_embedding_check(encoder: Any, null: Any) -> dict[str, Any]:
    """How closely the exported encoder reproduces the checkpoint's own null embedding.

    SanaPipeline builds its unconditional branch by encoding ``negative_prompt=""``; it matches
    our sampling only if that equals the null embedding the model was trained and sampled with.
    """
    embeds, mask = encoder.encode_negative([""])  # exactly what the pipeline computes for ""
    saved_embeds = null.embeds.to(embeds.device, torch.float32)
    same_mask = bool(torch.equal(mask.long().cpu(), null.mask.long().cpu()))
    diff = float((embeds.float() - saved_embeds).abs().max())
    return {"mask_equal": same_mask, "max_abs_diff": diff}


def pipeline_kwargs(cfg: Any) -> dict[str, Any]:
    """The ``SanaPipeline.__call__`` arguments that sample like ``sanakit sample``."""
    t = cfg.train
    instruction = cfg.text_encoder.complex_human_instruction
    return {
        "height": cfg.model.image_size,
        "width": cfg.model.image_size,
        "num_inference_steps": t.sampling_steps,
        "guidance_scale": t.cfg_scale,
        "max_sequence_length": cfg.text_encoder.max_length,
        "complex_human_instruction": list(instruction) if instruction else None,
        "negative_prompt": "",
        "use_resolution_binning": False,
    }


def build_settings(
    cfg: Any, checkpoint: Path, step: int, ema: bool, blocker: str, null: Any, null_check: dict
) -> dict[str, Any]:
    """Everything recorded in ``sanakit.json`` (and summarised in the model card)."""
    instruction = cfg.text_encoder.complex_human_instruction
    runnable = not blocker
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sanakit_version": __version__,
        "source_checkpoint": str(checkpoint.resolve()),
        "step": step,
        "weights": "ema" if ema else "model",
        "pipeline_runnable": runnable,
        "not_runnable_because": blocker or None,
        "image_size": cfg.model.image_size,
        "vae_type": cfg.vae.type,
        "text_encoder_type": cfg.text_encoder.type,
        "max_sequence_length": cfg.text_encoder.max_length,
        "complex_human_instruction": list(instruction) if instruction else None,
        "flow_shift": cfg.scheduler.flow_shift,
        "guidance_scale": cfg.train.cfg_scale,
        "sampler": cfg.train.sampler,
        "num_inference_steps": cfg.train.sampling_steps,
        "null_embedding": {
            "source": f"checkpoint {checkpoint.name}/null_embed.pth (its own copy)",
            "file": NULL_EMBED_FILE,
            "provenance": null.provenance,
            "exported_encoder_reproduces_it": null_check["mask_equal"]
            and null_check["max_abs_diff"] <= NULL_EMBED_TOLERANCE,
            **null_check,
        },
        "pipeline_kwargs": pipeline_kwargs(cfg) if runnable else None,
        "training_config": to_dict(cfg),
    }


def model_card(settings: dict[str, Any]) -> str:
    """README.md: front matter for the Hub, the recorded settings and how to sample."""
    s = settings
    instruction = "none" if not s["complex_human_instruction"] else "yes (see sanakit.json)"
    null = s["null_embedding"]
    rows = [
        ("weights", f"{s['weights']} (step {s['step']})"),
        ("image size", f"{s['image_size']} px ({s['vae_type']})"),
        (
            "text encoder",
            f"{s['text_encoder_type']}, max_sequence_length {s['max_sequence_length']}",
        ),
        ("instruction prefix", instruction),
        ("flow shift", s["flow_shift"]),
        ("default CFG scale", s["guidance_scale"]),
        ("sampler", f"{s['sampler']}, {s['num_inference_steps']} steps"),
        (
            "null embedding",
            f"{null['source']}; exported encoder reproduces it: "
            f"{null['exported_encoder_reproduces_it']} (max abs diff {null['max_abs_diff']:.2e})",
        ),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if s["pipeline_runnable"]:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in s["pipeline_kwargs"].items())
        usage = (
            "```python\nimport torch\nfrom diffusers import SanaPipeline\n\n"
            'pipe = SanaPipeline.from_pretrained("PATH", local_files_only=True)\n'
            'image = pipe("a red circle", generator=torch.Generator().manual_seed(0),\n'
            f"             {kwargs}).images[0]\n```\n"
        )
    else:
        usage = (
            f"SanaPipeline cannot run this model ({s['not_runnable_because']}), so there is no "
            "`model_index.json`. Sample it with `sanakit sample`, "
            "or load the parts with `SanaTransformer2DModel.from_pretrained(PATH, "
            'subfolder="transformer")`, `AutoModel/AutoTokenizer.from_pretrained(PATH, '
            'subfolder="text_encoder"/"tokenizer")` and the scheduler config in `scheduler/`.\n'
        )
    return (
        "---\nlibrary_name: diffusers\npipeline_tag: text-to-image\ntags:\n- sana\n- sanakit\n---\n"
        "# Sana-style text-to-image model exported by sanakit\n\n"
        "| setting | value |\n|---|---|\n"
        f"{table}\n\n## Sampling\n\n{usage}\n"
        'Pass `negative_prompt=""`, `use_resolution_binning=False` and the settings above; the '
        f"full record (and the training config) is in `{SETTINGS_FILE}`. The checkpoint's null "
        f"embedding is in `{NULL_EMBED_FILE}` (keys `uncond_prompt_embeds`, "
        "`uncond_prompt_embeds_mask`) for use as `negative_prompt_embeds`.\n"
    )


def _write_parts(inf: Any, tmp: Path, runnable: bool) -> None:
    """Save every component into ``tmp`` (diffusers/transformers layouts)."""
    cfg = inf.cfg
    models = inf.models
    scheduler = make_scheduler(cfg.train.sampler, cfg.scheduler.flow_shift)
    encoder = models.text_encoder
    transformer = models.transformer
    if runnable:
        vae = models.autoencoder.module
        # SanaPipeline decodes latents / vae.config.scaling_factor: record the factor we trained
        # with (a config override may differ from the autoencoder's own)
        vae.register_to_config(scaling_factor=models.autoencoder.scaling_factor)
        pipe = SanaPipeline(
            tokenizer=encoder.tokenizer,
            text_encoder=encoder.model,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        return
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    encoder.model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    encoder.tokenizer.save_pretrained(tmp / "tokenizer")
    autoencoder = models.autoencoder
    if hasattr(autoencoder, "module"):  # sd-vae: kept for completeness, not pipeline-runnable
        autoencoder.module.save_pretrained(tmp / "vae", safe_serialization=True)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    ema: bool = False,
    overwrite: bool = False,
    merge: bool = False,
    lora_scale: float = 1.0,
    base: str | Path | None = None,
) -> ExportResult:
    """Write ``out_dir`` as a diffusers Sana folder from a checkpoint (or a work_dir's newest).

    A LoRA checkpoint needs ``merge``: the adapter (at ``lora_scale``) is fused into its base and
    the folder holds a plain transformer. Raises :class:`SanakitError` subclasses (one line) for
    a bad checkpoint or destination.
    """
    path = resolve_checkpoint(checkpoint)
    lora = read_config(path).lora.rank > 0
    if lora != merge:
        raise ExportError(
            f"{path} is a LoRA run: export its adapter with --lora, or the whole pipeline with "
            "the adapter fused with --merge"
            if lora
            else f"--merge fuses a LoRA adapter, but {path} is a full fine-tune; drop --merge"
        )
    out_dir = check_destination(Path(out_dir), overwrite)
    inf = load_for_inference(path, ema=ema, device="cpu", lora_scale=lora_scale, base=base)
    if merge:
        fuse_and_unload(inf.models.transformer)
    cfg = inf.cfg
    blocker = pipeline_blocker(cfg, inf.models.autoencoder)
    runnable = not blocker
    step = int(read_trainer_state(path).get("step", 0))
    null_check = null_embedding_check(inf.models.text_encoder, inf.null)
    settings = build_settings(cfg, path, step, ema, blocker, inf.null, null_check)
    if merge:
        trainer = read_trainer_state(path)
        settings["merged_lora"] = {**trainer["lora"], "scale": lora_scale}
        settings["base_model"] = trainer["base_model"]
    if not settings["null_embedding"]["exported_encoder_reproduces_it"]:
        log.warning(
            "the exported text encoder does not reproduce the checkpoint's null embedding (max "
            "abs diff %.2e); SanaPipeline users should pass null_embed.pth as "
            "negative_prompt_embeds",
            null_check["max_abs_diff"],
        )

    def fill(tmp: Path) -> None:
        _write_parts(inf, tmp, runnable)
        torch.save(inf.null.to("cpu", torch.float32).tensors(), tmp / NULL_EMBED_FILE)
        (tmp / "README.md").write_text(model_card(settings))
        # last: the settings file is also the marker that lets --overwrite replace this folder
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n")

    clean_leftovers(out_dir)
    atomic_directory(out_dir, fill, lambda final: displace_earlier_export(final, overwrite))
    return ExportResult(out_dir, path, runnable, settings, blocker)
