"""`sanakit train|sample|eval|doctor|cache|export`: parse, call, map errors to exit codes.

A user error (``SanakitError``) prints one line ``error: ...`` and exits with its code (2 by
default), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sanakit.errors import SanakitError

log = logging.getLogger("sanakit")

USAGE = """usage: sanakit COMMAND [...]

commands:
  train  [CONFIG.yaml] [--group.key=value ...] [--debug]   train (or resume) a model
  sample --checkpoint=PATH --prompt=TEXT [...]             sample images from a checkpoint
  eval   --checkpoint=PATH [...]                           colour/shape adherence (shapes model)
  export CHECKPOINT OUT_DIR [--ema] [--overwrite]          write a diffusers SanaPipeline folder
  doctor [CONFIG.yaml] [--group.key=value ...]             preflight checks
  cache  build|verify [CONFIG.yaml] [--group.key=value ...] precompute / check the caches

With no CONFIG the packaged default is used (built-in shapes, MiniLM, pixel space, tiny model).
Overrides follow Sana: --train.train_batch_size=8 --data.data_dir="[a,b]".
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SanakitError(f"{self.prog}: {message}; see `{self.prog} --help`")


def setup_console_logging(verbose: bool = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # per-tensor "Loading weights" bars of a 22M-parameter encoder are noise, not progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sanakit %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    for noisy in ("transformers", "diffusers", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # The libraries read these when first imported. Importing them here just to set a level
    # cost ~2.5 s per command, so bad input failed slowly; only already-imported ones are set.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] --k=v ...`` -> (CONFIG or None, overrides)."""
    config = None
    overrides = []
    for arg in args:
        if arg.startswith("--"):
            overrides.append(arg)
        elif config is None and (arg.endswith((".yaml", ".yml")) or Path(arg).exists()):
            config = arg
        elif "=" in arg:
            overrides.append(arg)
        elif config is None:
            config = arg
        else:
            raise SanakitError(
                f"unexpected argument '{arg}'; overrides look like --group.key=value"
            )
    return config, overrides


def cmd_train(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from sanakit.config import load_config

    config, overrides = split_config_args(args)
    overrides = ["--train.dry_run=true" if o == "--dry_run" else o for o in overrides]
    cfg = load_config(config, overrides)
    if cfg.train.dry_run:
        from sanakit.train.dry_run import dry_run

        return dry_run(cfg)
    from sanakit.doctor import preflight

    # before importing the training stack: a FAIL then costs ~1 s instead of ~5 s
    preflight(cfg)
    from sanakit.train.loop import train

    train(cfg)
    return 0


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
    return p


def cmd_sample(args: list[str]) -> int:
    opts = sample_parser().parse_args(args)
    from sanakit.sampling import SAMPLERS

    prompts = [p for p in opts.prompt]
    if not prompts:
        raise SanakitError("no prompt given; pass --prompt=TEXT (repeat for several)")
    if any(not p.strip() for p in prompts):
        raise SanakitError("an empty --prompt was given; give each prompt some text")
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise SanakitError(f"unknown --sampler={opts.sampler}; use one of {', '.join(SAMPLERS)}")
    if opts.cfg_scale is not None and opts.cfg_scale < 0:
        raise SanakitError(f"--cfg_scale={opts.cfg_scale} must be >= 0")
    if opts.steps is not None and opts.steps <= 0:
        raise SanakitError(f"--steps={opts.steps} must be > 0")
    if opts.num_images <= 0:
        raise SanakitError(f"--num_images={opts.num_images} must be > 0")
    out = Path(opts.out)
    if out.suffix.lower() != ".png":
        raise SanakitError(f"--out={out} must end in .png")
    if not out.parent.exists() and str(out.parent) not in ("", "."):
        raise SanakitError(f"--out directory {out.parent} does not exist; create it first")
    from sanakit.io.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(opts.checkpoint)  # fail fast, before the heavy imports
    from PIL import Image

    from sanakit.inference import load_for_inference
    from sanakit.io.atomic import atomic_write
    from sanakit.sampling import to_uint8_grid

    inf = load_for_inference(
        checkpoint, ema=opts.ema, allow_encoder_change=opts.allow_encoder_change
    )
    t = inf.cfg.train
    batch = [p for p in prompts for _ in range(opts.num_images)]
    images = inf.generate(
        batch,
        cfg_scale=t.cfg_scale if opts.cfg_scale is None else opts.cfg_scale,
        steps=opts.steps or t.sampling_steps,
        sampler=opts.sampler or t.sampler,
        seed=opts.seed,
    )
    grid = to_uint8_grid(images, nrow=opts.num_images)
    atomic_write(out, lambda tmp: Image.fromarray(grid.numpy()).save(tmp, format="PNG"))
    print(f"wrote {out} ({len(prompts)} prompt(s) x {opts.num_images} image(s))")
    return 0


def cmd_eval(args: list[str]) -> int:
    p = OneLineParser(prog="sanakit eval", description="Colour/shape adherence of a shapes model.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples_per_prompt", type=int, default=8)
    p.add_argument("--cfg_scales", default=None, help='e.g. "[1.0,4.5]" (default: 1.0 and cfg)')
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--out", default=None, help="JSON report (default: WORK_DIR/eval.json)")
    opts = p.parse_args(args)
    import yaml

    from sanakit.evaluate import evaluate, format_table, to_uint8
    from sanakit.inference import load_for_inference
    from sanakit.io.atomic import atomic_write_text

    inf = load_for_inference(opts.checkpoint, ema=opts.ema)
    if inf.cfg.data.type != "shapes":
        raise SanakitError("sanakit eval scores the built-in shapes model only (data.type=shapes)")
    scales = yaml.safe_load(opts.cfg_scales) if opts.cfg_scales else [1.0, inf.cfg.train.cfg_scale]
    if not isinstance(scales, list) or not all(isinstance(s, int | float) for s in scales):
        raise SanakitError(f"--cfg_scales={opts.cfg_scales} must be a list like [1.0,4.5]")

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
    out = Path(opts.out) if opts.out else inf.checkpoint.parent.parent / "eval.json"
    atomic_write_text(out, json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out}")
    return 0


def cmd_doctor(args: list[str]) -> int:
    """``sanakit doctor [CONFIG] [overrides]``: one PASS/WARN/FAIL line per check; 1 on a FAIL."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from sanakit.config import load_config
    from sanakit.doctor import run_doctor

    try:
        config, overrides = split_config_args(args)
        cfg = load_config(config, overrides)
    except SanakitError as err:
        # a config that does not resolve is itself a failed check, in the same line format
        print(f"FAIL config: {err} -> fix the config file or override named here", flush=True)
        return 1
    return run_doctor(cfg, config or "")


def cmd_export(args: list[str]) -> int:
    """`sanakit export CHECKPOINT OUT_DIR [--ema] [--overwrite]`: a SanaPipeline folder."""
    p = OneLineParser(prog="sanakit export", description="Export a checkpoint for diffusers.")
    p.add_argument("checkpoint", help="checkpoint dir or work_dir (newest)")
    p.add_argument("out_dir", help="folder to write (must be absent or empty)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    opts = p.parse_args(args)
    import transformers
    from diffusers.utils import logging as diffusers_logging

    from sanakit.export import export_checkpoint
    from sanakit.io.ownership import own_destination

    # weight-loading/saving progress bars would bury the one-line notices
    transformers.utils.logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()

    with own_destination(Path(opts.out_dir), "sanakit export"):  # one export per OUT_DIR
        result = export_checkpoint(
            opts.checkpoint, opts.out_dir, ema=opts.ema, overwrite=opts.overwrite
        )
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


CACHE_USAGE = """usage: sanakit cache build|verify [CONFIG.yaml] [--group.key=value ...]

  build   compute and write every caption embedding and latent of the dataset
  verify  report missing, corrupt and stale entries; exit 0 if complete, 1 if not
The cache lives in train.cache_dir (default WORK_DIR/cache).
"""


def cmd_cache(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(CACHE_USAGE)
        return 0 if args else 2
    action, rest = args[0], args[1:]
    if action not in ("build", "verify"):
        raise SanakitError(f"unknown cache action '{action}'; use `sanakit cache build|verify`")
    if any(a in ("-h", "--help") for a in rest):
        print(CACHE_USAGE)
        return 0
    from sanakit.config import load_config
    from sanakit.embeddings.commands import build_caches, format_verify, open_caches, verify_caches
    from sanakit.embeddings.store import cache_root
    from sanakit.io.ownership import own

    config, overrides = split_config_args(rest)
    cfg = load_config(config, overrides)
    if action == "build":
        with own(cache_root(cfg), "sanakit cache build", subject="cache dir"):
            r = build_caches(open_caches(cfg, "readwrite"))
        text, latents = r["text"], r["latents"]
        print(f"cache {r['root']}: {r['samples']} samples ({r['unreadable']} unreadable)")
        print(
            f"text embeddings: {r['captions']} captions, {text['computed']} computed "
            f"({text['invalid']} replaced invalid entries), {text['read']} already valid"
        )
        if latents is None:
            print("latents: skipped (vae.type=pixel trains on pixels: no latent cache)")
        else:
            print(
                f"latents: {r['images']} images{' (both flips)' if r['flip_variants'] else ''}, "
                f"{latents['computed']} computed ({latents['invalid']} replaced invalid "
                f"entries), {latents['read']} already valid"
            )
        print(f"done in {r['seconds']:.1f}s")
        return 0
    sections, unreadable = verify_caches(open_caches(cfg, "read"))
    print(format_verify(sections, unreadable, cache_root(cfg)))
    return 1 if any(s.problems() for s in sections) else 0


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "export": cmd_export,
    "doctor": cmd_doctor,
    "cache": cmd_cache,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"error: unknown command '{command}'; use one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    setup_console_logging()
    try:
        return COMMANDS[command](rest)
    except SanakitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
