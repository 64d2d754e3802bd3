"""Sampling side of the benchmark suite: sanakit vs SanaPipeline (paired calls), the share of a
call spent inside the transformer, and the cold start of a real ``sanakit sample`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_train import DEVICE, sync

from sanakit.models.tiny import make_tiny_autoencoder

HERE = Path(__file__).resolve().parent


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


class ModelClock:
    """Seconds spent inside a module's forward calls (forward hooks; synchronised on a GPU)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        self._hooks = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave),
        ]

    def _enter(self, *_: object) -> None:
        sync()
        self._start = time.perf_counter()

    def _leave(self, *_: object) -> None:
        sync()
        self.total += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def bench_sampling(trials: int, batch: int, root: Path, compiled: bool = False) -> dict:
    """Per trial, one call of ``Inference.generate`` and one of SanaPipeline (loaded with
    ``from_pretrained`` from our export), same prompts/seed/steps, order alternating; and the
    time inside the transformer during sanakit's call."""
    from diffusers import SanaPipeline

    from sanakit.export import export_checkpoint
    from sanakit.inference import load_for_inference

    work = make_latent_checkpoint(root)
    exported = export_checkpoint(work, root / "exported").settings
    pipe = SanaPipeline.from_pretrained(root / "exported", local_files_only=True).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    ours = load_for_inference(work, device=DEVICE)
    kwargs = exported["pipeline_kwargs"]
    steps, scale = kwargs["num_inference_steps"], kwargs["guidance_scale"]

    def prompts(trial: int) -> list[str]:
        # fresh prompts every call: both sides pay for text encoding (no memo hits)
        return [f"a shape number {trial} {i}" for i in range(batch)]

    def run_ours(trial: int) -> torch.Tensor:
        return ours.generate(
            prompts(trial), cfg_scale=scale, steps=steps, sampler=exported["sampler"], seed=trial
        )

    def run_pipe(trial: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(trial)
        return pipe(prompts(trial), generator=generator, output_type="pt", **kwargs).images

    def timed(fn, trial: int) -> float:
        sync()
        t0 = time.perf_counter()
        fn(trial)
        sync()
        return time.perf_counter() - t0

    a, b = run_ours(-1), run_pipe(-1)  # warm-up, and a correctness check on the same seed
    max_diff = float(((a.cpu() + 1) / 2 - b.cpu()).abs().max())
    ours_t, pipe_t, model_t = [], [], []
    for trial in range(trials):
        sides = [(run_ours, ours_t), (run_pipe, pipe_t)]
        # alternate which side goes first so drift in machine load favours neither
        for fn, sink in sides if trial % 2 == 0 else sides[::-1]:
            clock = ModelClock(ours.models.transformer) if fn is run_ours else None
            sink.append(timed(fn, -2 - trial))
            if clock is not None:
                clock.remove()
                model_t.append(clock.total)
    out = {
        "ours_s": ours_t,
        "pipe_s": pipe_t,
        "model_s": model_t,
        "sample_vs_pipeline": [p / o for o, p in zip(ours_t, pipe_t, strict=True)],
        "sample_model_fraction": [m / o for o, m in zip(ours_t, model_t, strict=True)],
        "images_per_call": batch,
        "steps": steps,
        "cfg": scale,
        "size": kwargs["height"],
        "max_abs_diff": max_diff,
        "work": work,
    }
    if compiled:
        out.update(bench_compiled(ours, run_ours, trials))
    return out


def bench_compiled(ours, run_ours, trials: int) -> dict:
    """For information: the same calls with the transformer under ``torch.compile``."""
    eager = ours.models.transformer
    ours.models.transformer = torch.compile(eager)
    t0 = time.perf_counter()
    run_ours(-1000)  # the compile
    compile_s = time.perf_counter() - t0
    times = []
    for trial in range(trials):
        t0 = time.perf_counter()
        run_ours(-1001 - trial)
        times.append(time.perf_counter() - t0)
    ours.models.transformer = eager
    return {"compiled_s": times, "compile_s": compile_s}


def cold_sample(work: Path, batch: int, out_dir: Path) -> dict:
    """``sanakit sample`` in a fresh process, from process start to the PNG on disk, split by
    ``cold_sample.py`` into imports, model loading and sampling; plus that process's peak RSS
    (its own VmHWM)."""
    out = out_dir / "cold.png"
    cmd = [
        sys.executable,
        str(HERE / "cold_sample.py"),
        "sample",
        f"--checkpoint={work}",
        "--prompt=a red circle",
        f"--num_images={batch}",
        f"--out={out}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"sanakit sample failed:\n{done.stderr[-2000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    png = out.stat().st_mtime
    return {
        "imports_s": marks["imports_done"] - start,
        "load_s": marks["loaded"] - marks["load_start"],
        "sample_s": marks["sampled"] - marks["loaded"],
        "to_png_s": png - start,
        "process_s": time.time() - start,
        "peak_rss_bytes": marks["peak_rss_bytes"],
        "images": batch,
    }


def train_process_rss(root: Path, steps: int = 20) -> dict:
    """Peak RSS of a real ``sanakit train`` process on the default config (``steps`` steps)."""
    cmd = [
        sys.executable,
        str(HERE / "cold_sample.py"),  # reports the process's own peak (VmHWM)
        "train",
        f"--work_dir={root / 'rss_train'}",
        f"--train.max_steps={steps}",
        f"--train.save_model_steps={steps}",
        "--train.visualize=false",
        "--report_to=none",
    ]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sanakit train failed:\n{done.stderr[-2000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    return {"peak_rss_bytes": marks["peak_rss_bytes"], "steps": steps, "s": time.time() - start}
