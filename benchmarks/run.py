"""sanakit benchmark suite: ratios measured in one run on one machine.

    .venv/bin/python benchmarks/run.py [--quick] [--json PATH]

Prints a table, then one JSON line with the keys
  trainer_vs_bare       steps/s of sanakit's real training loop / a bare PyTorch loop (goal >= 0.97)
  sample_vs_pipeline    images/s of sanakit sampling / diffusers SanaPipeline (goal >= 1.2)
  train_flops_fraction  achieved FLOP/s of a training step / measured fp32 matmul FLOP/s (>= 0.4)
  bf16_speedup          fp32 step time / bf16-autocast step time, on this CPU

Every comparison alternates or brackets its two sides over equal-sized windows (training: steps
between the loop's own log lines; sampling: whole calls, text encoding and decoding included).
Ratios use each side's best window: other processes on a shared machine only ever slow a window
down, so the fastest sustained window is the stable estimate; medians are printed alongside.
Start-up (imports, model loading, the first window) is never timed. Speed targets live here
only, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sanakit.models.tiny import make_tiny_autoencoder  # noqa: E402

GOALS = {
    "trainer_vs_bare": 0.97,
    "sample_vs_pipeline": 1.2,
    "train_flops_fraction": 0.4,
    "bf16_speedup": None,  # reported, no goal
    "sample_vs_pipeline_compiled": None,  # information: what torch.compile would give
}


@dataclass
class Plan:
    """How long each part runs; --quick fits in about two minutes on 2 cores."""

    train_steps: int  # steps of the real loop (the first window is warm-up, not timed)
    window: int  # steps per timed window (= the loop's log_interval)
    bf16_windows: int
    sample_trials: int
    sample_prompts: int


QUICK = Plan(train_steps=50, window=10, bf16_windows=3, sample_trials=4, sample_prompts=4)
FULL = Plan(train_steps=220, window=20, bf16_windows=6, sample_trials=10, sample_prompts=4)


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
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def default_config(work_dir: Path, extra: list[str] = ()):
    from sanakit.config import load_config

    return load_config(None, [f"--work_dir={work_dir}", *extra])


# ----------------------------------------------------------------------------- training


class StepTimes(logging.Handler):
    """Collects (step, time) from the loop's own "step N/M ..." log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("step ") and record.args:
            self.marks.append((int(record.args[0]), record.created))


def window_times(marks: list[tuple[int, float]]) -> list[float]:
    """Seconds per step in each window between consecutive marks (the first mark = warm-up)."""
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:], strict=False)]


def run_sanakit_loop(plan: Plan, work_dir: Path, extra: list[str] = ()) -> list[float]:
    """The real ``train.loop.train`` on the default config; per-step seconds per window.

    Only what keeps the run inside the benchmark changes: max_steps, log_interval (the timing
    marks), no validation images and no checkpoint inside the timed steps (the final save
    happens after the last mark).
    """
    from sanakit.train.loop import train

    cfg = default_config(
        work_dir,
        [
            f"--train.max_steps={plan.train_steps}",
            f"--train.log_interval={plan.window}",
            f"--train.save_model_steps={plan.train_steps}",
            "--train.visualize=false",
            *extra,
        ],
    )
    log = logging.getLogger("sanakit")
    marks = StepTimes()
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(marks)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
    finally:
        log.removeHandler(marks)
        log.setLevel(old_level)
        for h in list(log.handlers):  # the loop's train.log file handler
            if isinstance(h, logging.FileHandler):
                log.removeHandler(h)
                h.close()
    return window_times(marks.marks)


class BareLoop:
    """Plain fwd/bwd/AdamW on tensors already in memory: the same model, batch, loss, optimizer."""

    def __init__(self, work_dir: Path) -> None:
        from sanakit.data.dataset import index_dataset
        from sanakit.embeddings.captions import CaptionEncoder
        from sanakit.train.components import build_models, latent_shape

        cfg = default_config(work_dir)
        self.cfg = cfg
        models = build_models(cfg, torch.device("cpu"))
        self.model = models.transformer.train()
        self.batch = cfg.train.train_batch_size
        dataset = index_dataset(cfg.data, cfg.model.image_size, cfg.seed)
        items = [dataset[i] for i in range(self.batch)]
        self.x0 = models.autoencoder.encode(torch.stack([it["pixels"] for it in items]))
        captions = CaptionEncoder(models.text_encoder)
        self.embeds, self.mask = captions.encode([it["caption"] for it in items])
        self.shape = latent_shape(cfg, models.autoencoder)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.generator = torch.Generator().manual_seed(0)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sanakit.flow import sample_sigmas

        s = self.cfg.scheduler
        sigmas = sample_sigmas(
            self.batch, s.weighting_scheme, self.generator, s.logit_mean, s.logit_std, s.flow_shift
        )
        noise = torch.randn((self.batch, *self.shape), generator=self.generator)
        return sigmas, noise

    def step(self, amp: torch.dtype = torch.float32) -> None:
        from sanakit.flow import flow_matching_loss

        sigmas, noise = self.inputs()
        with torch.autocast("cpu", dtype=amp, enabled=amp != torch.float32):
            out = flow_matching_loss(self.model, self.x0, self.embeds, self.mask, sigmas, noise)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def windows(self, n: int, size: int, amp: torch.dtype = torch.float32) -> list[float]:
        self.step(amp)  # warm-up (allocator, autocast weight casts)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            for _ in range(size):
                self.step(amp)
            times.append((time.perf_counter() - t0) / size)
        return times

    def count_flops(self) -> int:
        """FLOPs of one training step (forward + backward) by FlopCounterMode.

        torch 2.13's formula for ``convolution_backward`` ignores ``groups``, so it counts the
        Mix-FFN depthwise 3x3 conv's backward as a dense 640x640 conv (258 of 288 "GFLOP" per
        step here); :func:`conv_backward_flops` replaces it with the grouped count.
        """
        from torch.utils.flop_counter import FlopCounterMode

        from sanakit.flow import flow_matching_loss

        sigmas, noise = self.inputs()
        counter = FlopCounterMode(
            display=False,
            custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops},
        )
        with counter:
            out = flow_matching_loss(self.model, self.x0, self.embeds, self.mask, sigmas, noise)
            out.loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: list[bool],
    out_shape: object = None,
    **_: object,
) -> int:
    """Grouped-conv-aware backward FLOPs: each requested gradient costs one forward conv.

    ``w_shape`` is ``[c_out, c_in / groups, *k]``, so ``prod(w_shape[1:])`` multiply-adds per
    output element is already the per-group count.
    """
    per_output = 1
    for d in w_shape[1:]:
        per_output *= d
    outputs = 1
    for d in x_shape if transposed else grad_out_shape:
        outputs *= d
    return 2 * outputs * per_output * (int(output_mask[0]) + int(output_mask[1]))


def matmul_peak(seconds: float = 3.0, n: int = 1024) -> float:
    """Best fp32 matmul FLOP/s over repeated n x n products (all torch threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------- sampling


def make_latent_checkpoint(root: Path) -> Path:
    """A 1-step latent (DC-AE) run of the default model at 64 px, via the real CLI."""
    vae = make_tiny_autoencoder("dc-ae", root / "dcae")
    work = root / "latent"
    cmd = [
        sys.executable,
        "-m",
        "sanakit",
        "train",
        f"--work_dir={work}",
        "--vae.type=dc-ae",
        f"--vae.name_or_path={vae}",
        "--model.image_size=64",
        "--train.max_steps=1",
        "--train.train_batch_size=4",
        "--train.visualize=false",
        "--report_to=none",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"latent training failed:\n{result.stderr[-2000:]}")
    return work


def bench_sampling(plan: Plan, root: Path) -> dict:
    """Images/s of Inference.generate vs SanaPipeline loaded from our export, same everything.

    Then, for information, the same with the transformer under ``torch.compile`` (its compile
    time is reported separately; sanakit does not compile by default, see BENCHMARKS.md).
    """
    from diffusers import SanaPipeline

    from sanakit.export import export_checkpoint
    from sanakit.inference import load_for_inference

    work = make_latent_checkpoint(root)
    exported = export_checkpoint(work, root / "exported").settings
    pipe = SanaPipeline.from_pretrained(root / "exported", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = load_for_inference(work, device="cpu")
    kwargs = exported["pipeline_kwargs"]
    steps, scale = kwargs["num_inference_steps"], kwargs["guidance_scale"]
    n = plan.sample_prompts

    def prompts(trial: int) -> list[str]:
        # fresh prompts every call: both sides pay for text encoding (no memo hits)
        return [f"a shape number {trial} {i}" for i in range(n)]

    def run_ours(trial: int) -> torch.Tensor:
        return ours.generate(
            prompts(trial), cfg_scale=scale, steps=steps, sampler=exported["sampler"], seed=trial
        )

    def run_pipe(trial: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(trial)
        return pipe(prompts(trial), generator=generator, output_type="pt", **kwargs).images

    a, b = run_ours(-1), run_pipe(-1)  # warm-up, and a correctness check on the same seed
    max_diff = float(((a + 1) / 2 - b).abs().max())
    ours_t, pipe_t = [], []
    for trial in range(plan.sample_trials):
        # alternate which side goes first so drift in machine load favours neither
        order = [(run_ours, ours_t), (run_pipe, pipe_t)]
        for fn, sink in order if trial % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn(-2 - trial)
            sink.append(time.perf_counter() - t0)

    eager = ours.models.transformer
    ours.models.transformer = torch.compile(eager)
    t0 = time.perf_counter()
    run_ours(-1000)  # the compile
    compile_s = time.perf_counter() - t0
    compiled_t = []
    for trial in range(plan.sample_trials):
        t0 = time.perf_counter()
        run_ours(-1001 - trial)
        compiled_t.append(time.perf_counter() - t0)
    ours.models.transformer = eager
    return {
        "ours_s": ours_t,
        "pipe_s": pipe_t,
        "compiled_s": compiled_t,
        "compile_s": compile_s,
        "images_per_call": n,
        "steps": steps,
        "cfg": scale,
        "size": kwargs["height"],
        "max_abs_diff": max_diff,
    }


# ----------------------------------------------------------------------------- main


def fmt_goal(key: str, value: float) -> str:
    goal = GOALS.get(key)
    if goal is None:
        return "-"
    return f">= {goal}: {'met' if value >= goal else 'NOT met'}"


def best_and_median(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about two minutes on 2 cores")
    p.add_argument("--json", default=None, help="also write the results to this file")
    opts = p.parse_args(argv)
    plan = QUICK if opts.quick else FULL
    quiet_libraries()
    info = machine()
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sanakit-bench-") as tmp:
        root = Path(tmp)
        # training: bare, sanakit, bare (bracketing), then FLOPs and bf16
        bare = BareLoop(root / "bare")
        # as many bare windows as loop windows (half before, half after): a best-of-N
        # estimate must compare equal N
        windows = plan.train_steps // plan.window - 1
        bare_t = bare.windows(windows - windows // 2, plan.window)
        loop_t = run_sanakit_loop(plan, root / "loop")
        bare_t += bare.windows(windows // 2, plan.window)
        bare_best, bare_med = best_and_median(bare_t)
        loop_best, loop_med = best_and_median(loop_t)
        results["trainer_vs_bare"] = bare_best / loop_best

        flops = bare.count_flops()
        peak = matmul_peak()
        results["train_flops_fraction"] = flops / loop_best / peak

        fp32, bf16 = [], []
        for _ in range(plan.bf16_windows):  # interleaved windows
            fp32 += bare.windows(1, plan.window // 2, torch.float32)
            bf16 += bare.windows(1, plan.window // 2, torch.bfloat16)
        results["bf16_speedup"] = min(fp32) / min(bf16)

        sampling = bench_sampling(plan, root)
        n = sampling["images_per_call"]
        ours_best, ours_med = best_and_median(sampling["ours_s"])
        pipe_best, pipe_med = best_and_median(sampling["pipe_s"])
        comp_best, _ = best_and_median(sampling["compiled_s"])
        results["sample_vs_pipeline"] = pipe_best / ours_best
        results["sample_vs_pipeline_compiled"] = pipe_best / comp_best

    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    saved_per_call = ours_best - comp_best
    break_even = sampling["compile_s"] / saved_per_call * n if saved_per_call > 0 else float("inf")
    rows = [
        (
            "training step, sanakit loop",
            f"{loop_best * 1e3:.1f} ms/step (median {loop_med * 1e3:.1f})",
        ),
        (
            "training step, bare loop",
            f"{bare_best * 1e3:.1f} ms/step (median {bare_med * 1e3:.1f})",
        ),
        ("training FLOPs per step (FlopCounterMode)", f"{flops / 1e9:.2f} GFLOP"),
        ("achieved training FLOP/s", f"{flops / loop_best / 1e9:.1f} GFLOP/s"),
        ("fp32 matmul peak (1024^3 mm)", f"{peak / 1e9:.1f} GFLOP/s"),
        ("bare step fp32 / bf16 autocast", f"{min(fp32) * 1e3:.1f} / {min(bf16) * 1e3:.1f} ms"),
        (
            f"sampling {n} images, {sampling['size']} px, {sampling['steps']} steps, "
            f"CFG {sampling['cfg']}: sanakit",
            f"{n / ours_best:.2f} img/s (median {n / ours_med:.2f})",
        ),
        (
            "  SanaPipeline (from our export)",
            f"{n / pipe_best:.2f} img/s (median {n / pipe_med:.2f})",
        ),
        (
            "  sanakit, transformer torch.compile'd (info)",
            f"{n / comp_best:.2f} img/s after a {sampling['compile_s']:.1f} s compile "
            f"(pays after ~{break_even:.0f} images)",
        ),
        ("  sanakit vs SanaPipeline images, max abs diff", f"{sampling['max_abs_diff']:.1e}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"machine: {info}")
    print(f"{'measurement (best window; median in brackets)':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    print(f"{'ratio':<28} {'value':>7}  goal")
    for key in results:
        print(f"{key:<28} {results[key]:>7.3f}  {fmt_goal(key, results[key])}")
    summary = {k: round(v, 4) for k, v in results.items()}
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
