"""`sanakit sample|eval|export`: commands that read a checkpoint."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sanakit.cli.common import OneLineParser
from sanakit.errors import SanakitError


def sample_parser(prog: str = "sanakit sample") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Sample images from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or work_dir (newest)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--cfg_scale", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None, help="flow_dpm_solver | flow_euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="out.png")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--allow_encoder_change", action="store_true")
    add_lora_options(p)
    return p


def add_lora_options(p: OneLineParser) -> None:
    p.add_argument(
        "--lora_scale", type=float, default=1.0, help="LoRA runs: adapter strength (0 = base)"
    )
    p.add_argument("--base", default=None, help="LoRA runs: the base model, if it moved")


def check_lora_scale(value: float) -> float:
    if not math.isfinite(value):
        raise SanakitError(f"--lora_scale={value} must be a finite number (1.0 = as trained)")
    return value


def check_out_file(out: Path, flag: str, suffix: str | None = None) -> Path:
    """An output file that can be written: checked before any work, not after it."""
    what = f"{flag}={out}" if flag.startswith("--") else f"{flag} {out}"
    if suffix and out.suffix.lower() != suffix:
        raise SanakitError(f"{what} must end in {suffix}")
    if out.is_dir():
        raise SanakitError(f"{what} is a directory; give a file path")
    parent = out.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise SanakitError(f"{what} cannot be written: {blocker} is a file, not a directory")
    if not parent.exists():
        raise SanakitError(f"{flag} directory {parent} does not exist; create it first")
    return out


def check_guidance(value: float, flag: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise SanakitError(f"{flag}={value} must be a finite number >= 0")
    return value


def check_sampling_options(opts: argparse.Namespace) -> None:
    """The options `sample` and `eval` share: sampler, steps, seed."""
    from sanakit.config import Sampler, check_seed

    if opts.sampler is not None and opts.sampler not in set(Sampler):
        choices = ", ".join(s.value for s in Sampler)
        raise SanakitError(f"unknown --sampler={opts.sampler}; use one of {choices}")
    if opts.steps is not None and opts.steps <= 0:
        raise SanakitError(f"--steps={opts.steps} must be > 0")
    check_seed(opts.seed, "--seed")


def check_sample_options(opts: argparse.Namespace) -> list[str]:
    """Every `sample` option checked before the models load; returns the prompts."""
    prompts = list(opts.prompt)
    if not prompts:
        raise SanakitError("no prompt given; pass --prompt=TEXT (repeat for several)")
    if any(not p.strip() for p in prompts):
        raise SanakitError("an empty --prompt was given; give each prompt some text")
    check_sampling_options(opts)
    if opts.cfg_scale is not None:
        check_guidance(opts.cfg_scale, "--cfg_scale")
    if opts.num_images <= 0:
        raise SanakitError(f"--num_images={opts.num_images} must be > 0")
    check_out_file(Path(opts.out), "--out", ".png")
    check_lora_scale(opts.lora_scale)
    return prompts


def cmd_sample(args: list[str]) -> int:
    opts = sample_parser().parse_args(args)
    prompts = check_sample_options(opts)
    out = Path(opts.out)
    from sanakit.io.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(opts.checkpoint)  # fail fast, before the heavy imports
    from PIL import Image

    from sanakit.inference import check_request, load_for_inference, sample_grid
    from sanakit.io.atomic import atomic_write

    check_request(len(prompts), opts.num_images)
    inf = load_for_inference(
        checkpoint,
        ema=opts.ema,
        allow_encoder_change=opts.allow_encoder_change,
        lora_scale=opts.lora_scale,
        base=opts.base,
    )
    t = inf.cfg.train
    grid = sample_grid(
        inf,
        prompts,
        opts.num_images,
        cfg_scale=t.cfg_scale if opts.cfg_scale is None else opts.cfg_scale,
        steps=opts.steps or t.sampling_steps,
        sampler=opts.sampler or t.sampler,
        seed=opts.seed,
    )
    atomic_write(out, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    print(f"wrote {out} ({len(prompts)} prompt(s) x {opts.num_images} image(s))")
    return 0


def parse_cfg_scales(text: str) -> list[float]:
    """``--cfg_scales="[1.0,4.5]"``: a non-empty list of finite numbers >= 0."""
    from sanakit.config import load_yaml

    wrong = SanakitError(f"--cfg_scales={text} must be a list like [1.0,4.5]")
    try:
        scales = load_yaml(text, "--cfg_scales")
    except SanakitError:
        raise wrong from None
    if not isinstance(scales, list) or not scales:
        raise wrong
    if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scales):
        raise wrong
    return [check_guidance(float(s), "--cfg_scales") for s in scales]


def eval_parser() -> OneLineParser:
    p = OneLineParser(prog="sanakit eval", description="Colour/shape adherence of a shapes model.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    p.add_argument("--cfg_scales", default=None, help='e.g. "[1.0,4.5]" (default: 1.0 and cfg)')
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--out", default=None, help="JSON report (default: WORK_DIR/eval.json)")
    add_lora_options(p)
    return p


def cmd_eval(args: list[str]) -> int:
    opts = eval_parser().parse_args(args)
    check_sampling_options(opts)
    if opts.samples_per_prompt <= 0:
        raise SanakitError(f"--samples_per_prompt={opts.samples_per_prompt} must be > 0")
    scales = parse_cfg_scales(opts.cfg_scales) if opts.cfg_scales is not None else None
    out = check_out_file(Path(opts.out), "--out") if opts.out else None
    from sanakit.evaluate import evaluate, format_table, to_uint8
    from sanakit.inference import load_for_inference
    from sanakit.io.atomic import atomic_write_text

    check_lora_scale(opts.lora_scale)
    inf = load_for_inference(
        opts.checkpoint, ema=opts.ema, lora_scale=opts.lora_scale, base=opts.base
    )
    if inf.cfg.data.type != "shapes" and not inf.cfg.lora.rank:
        # a LoRA run fine-tunes a shapes base on an image folder (the fine-tuning demo)
        raise SanakitError("sanakit eval scores the built-in shapes model only (data.type=shapes)")
    scales = scales or [1.0, inf.cfg.train.cfg_scale]
    out = out or check_out_file(inf.checkpoint.parent.parent / "eval.json", "the eval report")

    def sample_fn(captions: list[str], cfg_scale: float, seed: int):
        images = inf.generate(
            captions,
            cfg_scale=cfg_scale,
            steps=opts.steps or inf.cfg.train.sampling_steps,
            sampler=opts.sampler or inf.cfg.train.sampler,
            seed=seed,
        )
        return to_uint8(images)

    report = evaluate(
        sample_fn, samples_per_prompt=opts.samples_per_prompt, cfg_scales=scales, seed=opts.seed
    )
    report["checkpoint"] = str(inf.checkpoint)
    report["weights"] = "ema" if opts.ema else "model"
    atomic_write_text(out, json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out}")
    return 0


def cmd_export(args: list[str]) -> int:
    """`sanakit export CHECKPOINT OUT_DIR [--ema] [--overwrite] [--lora | --merge]`: a
    SanaPipeline folder, or a LoRA run's adapter in diffusers' format."""
    p = OneLineParser(prog="sanakit export", description="Export a checkpoint for diffusers.")
    p.add_argument("checkpoint", help="checkpoint dir or work_dir (newest)")
    p.add_argument("out_dir", help="folder to write (must be absent or empty)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--lora", action="store_true", help="LoRA runs: the adapter, diffusers format")
    p.add_argument("--merge", action="store_true", help="LoRA runs: a pipeline, adapter fused")
    add_lora_options(p)
    opts = p.parse_args(args)
    if opts.lora and opts.merge:
        raise SanakitError("--lora and --merge exclude each other; pass one")
    check_lora_scale(opts.lora_scale)
    import transformers
    from diffusers.utils import logging as diffusers_logging

    from sanakit.export import export_checkpoint
    from sanakit.io.ownership import own_destination

    # weight-loading/saving progress bars would bury the one-line notices
    transformers.utils.logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()

    with own_destination(Path(opts.out_dir), "sanakit export"):  # one export per OUT_DIR
        if opts.lora:
            from sanakit.export_lora import export_lora

            result = export_lora(
                opts.checkpoint, opts.out_dir, ema=opts.ema, overwrite=opts.overwrite,
                base=opts.base,
            )  # fmt: skip
            print(f"wrote {result.out_dir / 'pytorch_lora_weights.safetensors'}")
            return 0
        result = export_checkpoint(
            opts.checkpoint, opts.out_dir, ema=opts.ema, overwrite=opts.overwrite,
            merge=opts.merge, lora_scale=opts.lora_scale, base=opts.base,
        )  # fmt: skip
    if not result.pipeline_runnable:
        print(
            f"note: SanaPipeline cannot run this model ({result.not_runnable_because}); exported "
            "transformer, scheduler, tokenizer, text encoder and README.md (no model_index.json)"
        )
    print(
        f"wrote {result.out_dir} ({result.settings['weights']} weights, step "
        f"{result.settings['step']}, from {result.checkpoint})"
    )
    return 0
