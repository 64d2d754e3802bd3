"""`sanakit train|sample|eval|doctor|cache|export`: parse, call, map errors to exit codes.

A user error (``SanakitError``) prints one line ``error: ...`` and exits with its code (2 by
default), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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


DRY_RUN_FLAGS = ("--dry_run", "--dry-run", "--train.dry_run")  # the last: the older spelling
FLAG_WORDS = {"true": True, "yes": True, "on": True, "1": True}
FLAG_WORDS.update({"false": False, "no": False, "off": False, "0": False})


def pop_dry_run(overrides: list[str]) -> tuple[bool, list[str]]:
    """Take ``--dry_run[=BOOL]`` out of the overrides: a CLI flag, not part of the config."""
    dry, rest = False, []
    for arg in overrides:
        flag, has_value, raw = arg.partition("=")
        if flag not in DRY_RUN_FLAGS:
            rest.append(arg)
            continue
        word = raw.strip("\"'").lower() if has_value else "true"
        if word not in FLAG_WORDS:
            raise SanakitError(f"{flag}={raw} must be true or false; write {flag} alone for true")
        dry = FLAG_WORDS[word]
    return dry, rest


def cmd_train(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from sanakit.config import load_config

    config, overrides = split_config_args(args)
    dry, overrides = pop_dry_run(overrides)
    cfg = load_config(config, overrides)
    if dry:
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
        checkpoint, ema=opts.ema, allow_encoder_change=opts.allow_encoder_change
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

    inf = load_for_inference(opts.checkpoint, ema=opts.ema)
    if inf.cfg.data.type != "shapes":
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
