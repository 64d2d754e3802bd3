"""sanakit benchmark suite: ratios measured in one run on one machine.

    .venv/bin/python benchmarks/run.py [--quick] [--compiled] [--json PATH]

Prints a table, then one JSON line. Every ratio is the median over >= 5 paired A/B
measurements taken next to each other (min and max under "spread"):
  trainer_vs_bare        steps/s of sanakit's real training loop / a bare loop (goal >= 0.97)
  train_flops_fraction   achieved FLOP/s of a training step / fp32 matmul FLOP/s (>= 0.5)
  bf16_speedup           fp32 step time / bf16-autocast step time (no goal)
  sample_vs_pipeline     images/s of sanakit sampling / diffusers SanaPipeline (>= 1.0)
  sample_model_fraction  time inside the transformer / time of the sampling call (>= 0.9)
and, when benchmarks/folder_bench.py is in the tree, what its ``measure()`` returns
(folder_trainer_vs_bare, cold_text_speedup). Also reported: the cold start of
``sanakit sample`` (imports / model loading / sampling) and the peak RSS of a training and a
sampling process. Start-up (imports, model loading, the first window) is never inside a ratio.
Speed targets live here only, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_sample import bench_sampling, cold_sample, train_process_rss  # noqa: E402
from bench_train import DEVICE, paired_training  # noqa: E402

# written by the data-path work (issue 13): included when the file is in the tree; an import
# error inside it is a failure, not an absent benchmark
if (Path(__file__).resolve().parent / "folder_bench.py").exists():
    import folder_bench
else:
    folder_bench = None

GOALS = {
    "trainer_vs_bare": 0.97,
    "train_flops_fraction": 0.5,
    "bf16_speedup": None,  # reported, no goal
    "sample_vs_pipeline": 1.0,
    "sample_model_fraction": 0.9,
    "folder_trainer_vs_bare": 0.90,
    "cold_text_speedup": 5.0,
}
GB = 1024**3


@dataclass
class Plan:
    """How long each part runs; --quick fits in about three minutes on 2 cores."""

    train_steps: int  # steps of the real loop (the first window is warm-up, not timed)
    window: int  # steps per timed window (= the loop's log_interval)
    bf16_pairs: int
    sample_trials: int
    sample_batch: int = 8


QUICK = Plan(train_steps=60, window=10, bf16_pairs=5, sample_trials=5)
FULL = Plan(train_steps=220, window=20, bf16_pairs=8, sample_trials=10)


def quiet_libraries() -> None:
    import transformers
    from diffusers.utils import logging as dlog

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "nproc": os.cpu_count(),
        "cpu": model,
        "device": DEVICE.type,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def folder_results(quick: bool) -> dict:
    """``folder_bench.measure()`` (a ratio, or lists / spreads of ratios per key)."""
    if folder_bench is None:
        return {}
    takes_quick = "quick" in inspect.signature(folder_bench.measure).parameters
    kwargs = {"quick": quick} if takes_quick else {}
    out = {}
    for key, value in folder_bench.measure(**kwargs).items():
        if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            out[key] = spread([float(v) for v in value])
        elif isinstance(value, dict) and "median" in value:
            out[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = {"median": float(value)}
    return out


def sig(value: float) -> float:
    """Four significant figures: keeps a 3.9e-06 difference that rounding to 4 places made 0."""
    return float(f"{value:.4g}")


def fmt_goal(key: str, value: float) -> str:
    goal = GOALS.get(key)
    if goal is None:
        return "-"
    return f">= {goal}: {'met' if value >= goal else 'NOT met'}"


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ms (min {min(values) * 1e3:.1f})"


def print_report(info: dict, train: dict, sample: dict, cold: dict, rss: dict, ratios: dict):
    n = sample["images_per_call"]
    rows = [
        ("training step, sanakit loop (median of windows)", ms(train["loop_s"])),
        ("training step, bare loop", ms(train["bare_s"])),
        ("training FLOPs per step (FlopCounterMode)", f"{train['flops'] / 1e9:.2f} GFLOP"),
        ("fp32 matmul peak (best burst)", f"{max(train['matmul_peak']) / 1e9:.1f} GFLOP/s"),
        ("bare step fp32 / bf16 autocast", f"{ms(train['fp32_s'])} / {ms(train['bf16_s'])}"),
        (
            f"sampling {n} images, {sample['size']} px, {sample['steps']} steps, CFG "
            f"{sample['cfg']}: sanakit",
            ms(sample["ours_s"]) + " per call",
        ),
        ("  SanaPipeline (from our export)", ms(sample["pipe_s"]) + " per call"),
        ("  inside the transformer (sanakit)", ms(sample["model_s"]) + " per call"),
        ("  sanakit vs SanaPipeline images, max abs diff", f"{sample['max_abs_diff']:.1e}"),
        (
            f"cold `sanakit sample` ({cold['images']} images) to PNG",
            f"{cold['to_png_s']:.2f} s = imports {cold['imports_s']:.2f} + loading "
            f"{cold['load_s']:.2f} + sampling {cold['sample_s']:.2f} (+ rest)",
        ),
        ("peak RSS, `sanakit sample` process", f"{cold['peak_rss_bytes'] / GB:.2f} GB"),
        (
            f"peak RSS, `sanakit train` process ({rss['steps']} default steps)",
            f"{rss['peak_rss_bytes'] / GB:.2f} GB",
        ),
    ]
    if "compile_s" in sample:
        rows.append(
            (
                "  sanakit, transformer torch.compile'd (info)",
                f"{ms(sample['compiled_s'])} per call after a {sample['compile_s']:.1f} s compile",
            )
        )
    width = max(len(r[0]) for r in rows)
    print(f"machine: {info}")
    print(f"{'measurement':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    print(f"{'ratio (median of pairs)':<26} {'median':>7} {'min':>7} {'max':>7}  n  goal")
    for key, s in ratios.items():
        lo, hi = s.get("min", float("nan")), s.get("max", float("nan"))
        print(
            f"{key:<26} {s['median']:>7.4g} {lo:>7.4g} {hi:>7.4g} {s.get('n', '-'):>2}  "
            f"{fmt_goal(key, s['median'])}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about three minutes on 2 cores")
    p.add_argument("--compiled", action="store_true", help="also time torch.compile sampling")
    p.add_argument("--json", default=None, help="also write the results to this file")
    opts = p.parse_args(argv)
    plan = QUICK if opts.quick else FULL
    quiet_libraries()
    info = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sanakit-bench-") as tmp:
        root = Path(tmp)
        train = paired_training(plan.train_steps, plan.window, plan.bf16_pairs, root)
        sample = bench_sampling(plan.sample_trials, plan.sample_batch, root, opts.compiled)
        cold = cold_sample(sample["work"], plan.sample_batch, root)
        rss = train_process_rss(root)
    ratios = {
        key: spread(values)
        for key, values in {**train, **sample}.items()
        if key in GOALS and isinstance(values, list)
    }
    ratios.update(folder_results(opts.quick))
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(info, train, sample, cold, rss, ratios)
    summary: dict = {k: sig(v["median"]) for k, v in ratios.items()}
    summary["spread"] = {
        k: [sig(v["min"]), sig(v["max"]), v["n"]] for k, v in ratios.items() if "n" in v
    }
    summary["cold_sample_s"] = {
        k: round(cold[k], 3) for k in ("imports_s", "load_s", "sample_s", "to_png_s")
    }
    summary["peak_rss_gb"] = {
        "train": round(rss["peak_rss_bytes"] / GB, 3),
        "sample": round(cold["peak_rss_bytes"] / GB, 3),
    }
    summary["images_per_s"] = round(plan.sample_batch / statistics.median(sample["ours_s"]), 2)
    summary["train_step_s"] = round(statistics.median(train["loop_s"]), 4)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["quick"] = opts.quick
    summary["machine"] = info
    line = json.dumps(summary)
    if opts.json:
        Path(opts.json).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
