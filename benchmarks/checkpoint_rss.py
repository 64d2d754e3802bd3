"""Rank 0's peak memory while saving a checkpoint: full vs sharded (``train.checkpoint_format``).

Two FSDP ranks (torchrun, gloo, OMP_NUM_THREADS=1) train a transformer large enough for the
difference to show (default ~100M parameters: 1.6 GB of model + EMA + AdamW state) for one step
through the real ``sanakit train`` and save one checkpoint at the end, once per format. Around
``Checkpointer.save`` rank 0 resets its kernel peak-RSS counter (``/proc/self/clear_refs``,
``5``) and reads ``VmHWM`` afterwards, so the figure is the true peak of the save itself, not of
start-up. Printed: RSS before the save, peak during it, the growth, the save's wall time and
the checkpoint's size, per format, then a final JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_rss.py [--layers 6 --heads 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_saves(result_file: Path) -> None:
    """Inside a torchrun rank: wrap Checkpointer.save so rank 0 records its memory around it."""
    from sanakit.train import hooks

    original = hooks.Checkpointer.save

    def save(self, state):  # noqa: ANN001 - same signature as the method it wraps
        rank0 = self.accelerator.is_main_process
        if rank0:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            before, start = status_kib("VmRSS"), time.perf_counter()
        saved = original(self, state)
        if rank0:
            row = {
                "rss_before_mib": before / 1024,
                "peak_mib": status_kib("VmHWM") / 1024,
                "save_s": time.perf_counter() - start,
                "params": sum(p.numel() for p in state.model.parameters()),
            }
            result_file.write_text(json.dumps(row))
        return saved

    hooks.Checkpointer.save = save


def launch(fmt: str, work: Path, args: argparse.Namespace) -> dict:
    result = work / f"{fmt}.json"
    heads = args.heads
    overrides = [
        f"--work_dir={work / fmt}",
        "--model.image_size=16",
        "--model.patch_size=2",
        f"--model.num_layers={args.layers}",
        f"--model.num_attention_heads={heads}",
        "--model.attention_head_dim=64",
        f"--model.num_cross_attention_heads={heads}",
        "--model.cross_attention_head_dim=64",
        "--text_encoder.max_length=8",
        "--train.train_batch_size=2",
        "--data.max_samples=8",
        "--train.max_steps=1",
        "--train.visualize=false",
        "--report_to=none",
        "--train.fsdp=true",
        f"--train.checkpoint_format={fmt}",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [__file__, "--rank-mode", str(result), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{fmt} run failed:\n{done.stderr[-3000:]}")
    row = json.loads(result.read_text())
    ckpt = work / fmt / "checkpoints" / "step_00000001"
    row["checkpoint_mib"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / MIB
    row["growth_mib"] = row["peak_mib"] - row["rss_before_mib"]
    return row


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank-mode":
        measure_saves(Path(sys.argv[2]))
        from sanakit.cli import main as sanakit_main

        sys.exit(sanakit_main(["train", *sys.argv[3:]]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=16, help="x 64 = hidden size")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ckpt_rss_") as tmp:
        for fmt in ("full", "sharded"):
            rows[fmt] = launch(fmt, Path(tmp), args)
    params = rows["full"]["params"]
    print(f"2 FSDP ranks (gloo, CPU), {params / 1e6:.1f}M parameters, one save each")
    print(f"{'format':8} {'RSS before':>11} {'peak':>9} {'growth':>9} {'save':>7} {'on disk':>9}")
    for fmt, r in rows.items():
        print(
            f"{fmt:8} {r['rss_before_mib']:9.0f} M {r['peak_mib']:7.0f} M "
            f"{r['growth_mib']:7.0f} M {r['save_s']:6.1f}s {r['checkpoint_mib']:7.0f} M"
        )
    ratio = rows["sharded"]["growth_mib"] / max(rows["full"]["growth_mib"], 1e-9)
    print(f"rank 0's growth while saving, sharded / full: {ratio:.3f}")
    print(json.dumps({"params": params, **rows, "growth_ratio": ratio}))


if __name__ == "__main__":
    main()
