"""Checkpoint cost on the default config, measured in one run on this machine.

- save: seconds to write one crash-safe checkpoint (temp dir, fsync of every file, manifest,
  rename, dir fsync) of the default model's full state, mean of several saves;
- resume start-up: launch of `sanakit train` to its first optimizer step, resuming from a
  checkpoint, versus the same launch starting fresh (both through the real CLI, timed from the
  launch to the step's line in train.log).

Prints a table and a final JSON line. Usage: python benchmarks/checkpoint_bench.py [--saves N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

FAST_RUN = ["--train.visualize=false", "--report_to=none", "--train.log_interval=1"]


def sanakit(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-m", "sanakit", *args],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def seconds_to_step(work: Path, step: int, launched: float) -> float:
    """From launch to the log line of optimizer step ``step`` (train.log timestamps)."""
    for line in (work / "train.log").read_text().splitlines():
        if f" step {step}/" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return stamp - launched
    raise RuntimeError(f"no step {step} in {work / 'train.log'}")


def launch_to_step(work: Path, max_steps: int, step: int) -> float:
    launched = time.time()
    sanakit("train", f"--work_dir={work}", f"--train.max_steps={max_steps}", *FAST_RUN)
    return seconds_to_step(work, step, launched)


def save_seconds(work: Path, saves: int) -> tuple[float, int]:
    """Mean time of write_checkpoint on the state of the checkpoint `work` holds."""
    import torch

    from sanakit.config import from_yaml_text
    from sanakit.data.sampler import ResumableSampler
    from sanakit.io import checkpoint as ckpt
    from sanakit.train.components import build_lr_scheduler, build_models, build_optimizer
    from sanakit.train.state import EMA, TrainState, read_null_embedding

    latest, _ = ckpt.find_latest(work / "checkpoints")
    cfg = from_yaml_text((latest / "config.yaml").read_text())
    models = build_models(cfg, torch.device("cpu"))
    optimizer = build_optimizer(cfg, models.transformer)
    state = TrainState(
        model=models.transformer,
        ema=EMA(models.transformer, cfg.train.ema_rate),
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(cfg, optimizer),
        sampler=ResumableSampler(60000, cfg.train.train_batch_size, cfg.seed),
        generator=torch.Generator().manual_seed(0),
        null=read_null_embedding(latest),
        config_yaml=(latest / "config.yaml").read_text(),
    )
    state.load(latest)
    ranks = [state.per_rank_state()]
    out = work / "bench_checkpoints"
    times = []
    for i in range(saves):
        start = time.perf_counter()
        path = ckpt.write_checkpoint(out, 1000 + i, lambda d: state.write(d, ranks))
        times.append(time.perf_counter() - start)
    size = sum(p.stat().st_size for p in path.iterdir())
    return sum(times) / len(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = launch_to_step(Path(tmp) / "fresh", max_steps=2, step=1)
        resumed_dir = Path(tmp) / "fresh"  # holds step_00000002 now
        resumed = launch_to_step(resumed_dir, max_steps=3, step=3)
        save, size = save_seconds(resumed_dir, opts.saves)
    rows = [
        ("checkpoint save (default config)", f"{save * 1000:.0f} ms", f"{size / 1e6:.1f} MB"),
        ("launch -> first step, fresh", f"{fresh:.2f} s", ""),
        ("launch -> first step, resumed", f"{resumed:.2f} s", f"{resumed / fresh:.2f}x fresh"),
    ]
    for name, value, note in rows:
        print(f"{name:<36} {value:>10}  {note}")
    print(
        json.dumps(
            {
                "checkpoint_save_s": round(save, 4),
                "checkpoint_bytes": size,
                "first_step_fresh_s": round(fresh, 3),
                "first_step_resumed_s": round(resumed, 3),
                "resume_vs_fresh": round(resumed / fresh, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
