"""Cold vs warm epoch with the text-embedding and latent caches, through the real training loop.

Generates an image-folder dataset (64 px coloured shapes, one ``.txt`` caption each, every
caption distinct), saves a tiny random AutoencoderDC with ``save_pretrained`` (so the real
loader and fingerprint are used) and trains one epoch twice with the same ``train.cache_dir``:
first with an empty cache (cold: every caption and image is encoded and written), then as a
fresh run (new work_dir, new process state) that finds everything on disk (warm). The step log's
time split (data / text / autoencoder / model) is summed over the epoch.

    .venv/bin/python benchmarks/cache_bench.py            # 2,000 images
    .venv/bin/python benchmarks/cache_bench.py --quick    # 256 images
    .venv/bin/python benchmarks/cache_bench.py --with-off # also one epoch with cache_mode=off

Prints one line per run, then a final JSON line with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sanakit.models.tiny import make_tiny_autoencoder

STEP_LINE = re.compile(
    r"time data (?P<data>[\d.]+)s text (?P<text>[\d.]+)s autoencoder (?P<autoencoder>[\d.]+)s "
    r"model (?P<model>[\d.]+)s"
)
SIZES = ("small", "medium", "large")
PLACES = ("on the left", "in the middle", "on the right", "near the top", "near the bottom")


def make_dataset(root: Path, n: int, size: int = 64) -> None:
    """``n`` PNGs with distinct captions, rendered by the built-in shapes renderer."""
    from PIL import Image

    from sanakit.data.shapes import COLOURS, SHAPES, render

    root.mkdir(parents=True, exist_ok=True)
    colours = tuple(COLOURS)
    for i in range(n):
        rng = np.random.default_rng([2026, i])
        colour = colours[int(rng.integers(len(colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        Image.fromarray(render(colour, shape, size, rng)).save(root / f"img_{i:05d}.png")
        words = f"a {SIZES[i % 3]} {colour} {shape} {PLACES[i % 5]}, picture number {i}"
        (root / f"img_{i:05d}.txt").write_text(words)


class SplitCollector(logging.Handler):
    """Sums the step log's time split over a run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.split = {"data": 0.0, "text": 0.0, "autoencoder": 0.0, "model": 0.0}
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        m = STEP_LINE.search(record.getMessage())
        if m:
            self.lines += 1
            for k, v in m.groupdict().items():
                self.split[k] += float(v)


def run_epoch(label: str, work: Path, common: list[str], mode: str) -> dict:
    from sanakit.config import load_config
    from sanakit.embeddings.writer import flush_writes
    from sanakit.train.loop import train

    cfg = load_config(None, [f"--work_dir={work}", f"--train.cache_mode={mode}", *common])
    collector = SplitCollector()
    logger = logging.getLogger("sanakit")
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # preflight's PASS lines
            train(cfg)
        flush_writes()  # a cold run's writes count against it
    finally:
        logger.removeHandler(collector)
    wall = time.perf_counter() - started
    epoch = sum(collector.split.values())
    split = {k: round(v, 3) for k, v in collector.split.items()}
    print(
        f"{label:>5}: epoch {epoch:6.2f}s (sum of the split) | train() wall {wall:6.2f}s | "
        + " ".join(f"{k} {v:.2f}s" for k, v in split.items()),
        flush=True,
    )
    return {"epoch_s": round(epoch, 3), "wall_s": round(wall, 3), "split_s": split}


def count_entries(cache: Path, sub: str) -> int:
    return sum(1 for _ in (cache / sub).glob("*/*.safetensors")) if (cache / sub).is_dir() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="256 images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--with-off", action="store_true", help="also an epoch with cache_mode=off")
    p.add_argument("--keep", default="", help="work in this folder and keep it")
    args = p.parse_args()
    n = 256 if args.quick else args.images
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from sanakit.cli import setup_console_logging

    setup_console_logging()
    logging.getLogger("sanakit").handlers[0].setLevel(logging.WARNING)  # keep stdout readable
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cache-bench-"))
    try:
        t0 = time.perf_counter()
        make_dataset(base / "data", n)
        vae = make_tiny_autoencoder("dc-ae", base / "tiny-dcae")
        print(f"dataset: {n} images of 64 px in {time.perf_counter() - t0:.1f}s at {base}")
        steps = math.ceil(n / args.batch)
        common = [
            "--data.type=image_folder",
            f"--data.data_dir=[{base / 'data'}]",
            "--vae.type=dc-ae",
            f"--vae.name_or_path={vae}",
            "--model.image_size=64",
            "--model.patch_size=2",
            "--model.num_layers=1",
            "--model.num_attention_heads=2",
            "--model.attention_head_dim=16",
            "--model.num_cross_attention_heads=2",
            "--model.cross_attention_head_dim=16",
            "--text_encoder.max_length=24",
            f"--train.train_batch_size={args.batch}",
            "--train.num_epochs=1",
            "--train.max_steps=1000000",
            f"--train.log_interval={steps}",
            "--train.save_model_steps=1000000",
            "--train.visualize=false",
            "--train.warmup_steps=10",
            f"--train.cache_dir={base / 'cache'}",
            "--report_to=none",
        ]
        results = {}
        if args.with_off:
            results["off"] = run_epoch("off", base / "run-off", common, "off")
        results["cold"] = run_epoch("cold", base / "run-cold", common, "readwrite")
        entries = {
            "text": count_entries(base / "cache", "text"),
            "latents": count_entries(base / "cache", "latents"),
        }
        results["warm"] = run_epoch("warm", base / "run-warm", common, "readwrite")
        cold, warm = results["cold"], results["warm"]
        speedup = cold["epoch_s"] / max(warm["epoch_s"], 1e-9)
        per_step = {k: round(1000 * warm["split_s"][k] / steps, 2) for k in ("text", "autoencoder")}
        print(
            f"cache: {entries['text']} text + {entries['latents']} latent entries; warm epoch "
            f"{speedup:.2f}x faster; warm text {per_step['text']} ms/step, autoencoder "
            f"{per_step['autoencoder']} ms/step ({steps} steps)"
        )
        print(
            json.dumps(
                {
                    "images": n,
                    "batch": args.batch,
                    "steps_per_epoch": steps,
                    "threads": torch.get_num_threads(),
                    "entries": entries,
                    **results,
                    "speedup_warm_vs_cold": round(speedup, 2),
                    "warm_ms_per_step": per_step,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
