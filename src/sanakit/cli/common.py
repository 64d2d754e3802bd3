"""What every command shares: usage text, one-line argument errors, console logging,
splitting CONFIG from overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

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
  serve  WORK_DIR [--host 127.0.0.1] [--port 7860]         a web page: watch a run, sample it
  checkpoint consolidate CHECKPOINT [OUT]                  sharded checkpoint -> full layout

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


def load_run_config(config: str | None, overrides: list[str]) -> Any:
    """``load_config`` plus ``model.pretrained``'s architecture and parts (train, doctor, cache).

    Only a config naming a pretrained model imports the model stack here (a few seconds).
    """
    from sanakit.config import load_config, user_set_keys

    cfg = load_config(config, overrides)
    if not cfg.model.pretrained:
        return cfg
    from sanakit.models.pretrained_config import resolve_pretrained

    return resolve_pretrained(cfg, user_set_keys(config, overrides))


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
