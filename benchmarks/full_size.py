"""The real Sana-600M size on this machine: cache build, encoders released, training steps.

    .venv/bin/python benchmarks/full_size.py            # 14.8 GiB peak RSS; 68 min, 2 busy cores
    .venv/bin/python benchmarks/full_size.py --quick    # the same phases on tiny models (~10 s)
    .venv/bin/python benchmarks/full_size.py --dry      # the plan and doctor's estimate only

`configs/sana_600m_512.yaml` (packaged copy) with random-weight stand-ins of its two encoders,
built from their published configs (sources next to each value below), and a folder of 8 JPEGs
at 512 px. Phases, each in its own process so each phase's peak RSS is its own ``ru_maxrss``:

1. ``make``   build the random Gemma-2-2b-it (bf16) and DC-AE f32c32 and save them as model
              folders (``save_pretrained``), write the images and captions;
2. ``cache``  ``sanakit cache build`` (text embeddings and latents of every sample);
3. ``train``  the real ``sanakit.train.loop.train`` at batch 1 for 1 + 3 steps, gradient
              checkpointing off, then again with it on. The encoders are released once the
              caches cover the data (``train.release_encoders`` when this tree has it, else this
              script moves them to the meta device after the parts are built); the final
              checkpoint (model + EMA + CAME state, ~11 GB) is not written.

Prints a table, then one JSON line: ``s_per_step``, ``s_per_step_checkpointing``,
``peak_rss_gb`` (the largest phase peak), ``estimate_vs_measured`` (doctor's estimate over the
measured training peak, checkpointing off) and the per-phase details.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GB = 1024**3

# Gemma-2-2b-it, from its published config.json (google/gemma-2-2b-it): the same values are
# transformers' own Gemma2Config defaults (transformers 5.24, configuration_gemma2.py) and
# /work/shared/DESIGN.md; the rest (softcapping 50/30, query_pre_attn_scalar 256, sliding window
# 4096, gelu_pytorch_tanh, rms_norm_eps 1e-6) are left at those defaults, which match it too.
GEMMA_2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
)
GEMMA_TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

# DC-AE f32c32 as Sana uses it (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers; 1.1 has the same
# architecture): diffusers' scripts/convert_dcae_to_diffusers.py, convert_ae() and
# get_ae_config("dc-ae-f32c32-sana-1.0"). Block types, channels, layers and multi-scale attention
# there; "conv" down- / "interpolate" up-sampling (diffusers' AutoencoderDC defaults are
# pixel_unshuffle / pixel_shuffle and ResBlock everywhere: not Sana's); decoder RMSNorm + SiLU
# (the defaults); scaling_factor 0.41407 (also Sana's configs and DESIGN.md).
DCAE_F32C32_SANA = dict(
    in_channels=3,
    latent_channels=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
DCAE_TINY = dict(
    latent_channels=4,
    encoder_block_out_channels=(16, 32),
    decoder_block_out_channels=(16, 32),
    encoder_layers_per_block=(1, 1),
    decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), ()),
    decoder_qkv_multiscales=((), ()),
    scaling_factor=0.5,
)
CAPTIONS = [
    "a red fox in fresh snow at dawn",
    "a lighthouse on a rocky coast under storm clouds",
    "a bowl of ramen with a soft boiled egg, top view",
    "an old bicycle leaning on a yellow wall",
    "a snowy mountain lake reflecting pine trees",
    "a macro photo of a dew covered spider web",
    "a busy night market with paper lanterns",
    "a watercolor painting of a sailing boat",
]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- assets


def gemma_tokenizer(corpus: list[str]):
    """A BPE tokenizer trained on the instruction and captions, adding <bos> like Gemma's.

    Gemma's own tokenizer cannot be downloaded here. Only token counts matter for the cost: the
    sequence is padded to len(instruction tokens) + max_length - 2 whatever the caption.
    """
    from tokenizers import Tokenizer, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    bos = tk.token_to_id("<bos>")
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def instruction() -> list[str]:
    from sanakit.config import load_config

    return list(load_config(packaged_config(), []).text_encoder.complex_human_instruction)


def packaged_config() -> Path:
    from sanakit.config.schema import packaged_config_path

    return packaged_config_path("sana_600m_512")


def make_images(folder: Path, size: int) -> None:
    """8 JPEGs (smooth gradients + a few discs, so JPEG does real work) with .txt captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i, caption in enumerate(CAPTIONS):
        img = np.stack([xx * rng.random(), yy * rng.random(), (xx + yy) / 2], -1) * 255
        for _ in range(6):
            cx, cy, r = rng.random(3) * [size, size, size / 4]
            disc = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 < r**2
            img[disc] = rng.integers(0, 256, 3)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=90)
        (folder / f"{i:02d}.txt").write_text(caption + "\n")


def phase_make(root: Path, quick: bool) -> dict:
    """Random-weight encoders saved as model folders, and the image folder."""
    from diffusers import AutoencoderDC
    from transformers import Gemma2Config, Gemma2Model

    t0 = time.perf_counter()
    torch.manual_seed(0)
    chi = instruction()
    tokenizer = gemma_tokenizer([*chi, "\n".join(chi), *CAPTIONS])
    config = Gemma2Config(**(GEMMA_TINY if quick else GEMMA_2_2B))
    with default_dtype(torch.bfloat16):  # built in bf16: fp32 first would need 10 GB
        gemma = Gemma2Model(config).eval()
    gemma_params = sum(p.numel() for p in gemma.parameters())
    gemma.save_pretrained(root / "gemma")
    tokenizer.save_pretrained(root / "gemma")
    del gemma
    vae = AutoencoderDC(**(DCAE_TINY if quick else DCAE_F32C32_SANA))
    vae_params = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(root / "dcae")
    del vae
    make_images(root / "images", 64 if quick else 512)
    return {
        "seconds": time.perf_counter() - t0,
        "gemma_params": gemma_params,
        "dcae_params": vae_params,
        "instruction_tokens": len(tokenizer.encode("\n".join(chi))),
    }


# ----------------------------------------------------------------------------- config


def overrides(root: Path, quick: bool, checkpointing: bool) -> list[str]:
    """What differs from configs/sana_600m_512.yaml, and why."""
    args = [
        f"--work_dir={root / ('work_ckpt' if checkpointing else 'work')}",
        f"--vae.name_or_path={root / 'dcae'}",
        f"--text_encoder.name_or_path={root / 'gemma'}",
        "--text_encoder.dtype=bfloat16",  # Gemma in bf16 (5.2 GB), as on a GPU
        "--data.type=image_folder",
        f"--data.data_dir=[{root / 'images'}]",
        f"--train.cache_dir={root / 'cache'}",  # both runs share the one built cache
        f"--train.null_embed_root={root / 'null'}",
        "--train.train_batch_size=1",
        f"--train.max_steps={1 + STEPS}",
        "--train.log_interval=1",  # every step is a timing mark
        "--train.visualize=false",
        "--report_to=none",
        f"--model.gradient_checkpointing={str(checkpointing).lower()}",
    ]
    if has_native_release():
        args.append("--train.release_encoders=true")
    if quick:  # the same phases on a model that runs in milliseconds
        args += [
            "--model.image_size=64",
            "--model.num_layers=1",
            "--model.num_attention_heads=2",
            "--model.num_cross_attention_heads=2",
            "--model.attention_head_dim=16",
            "--model.cross_attention_head_dim=16",
            "--text_encoder.max_length=16",
        ]
    return args


def has_native_release() -> bool:
    """Whether this tree's training releases the encoders itself (issue 13, item 2)."""
    from sanakit.config.schema import schema_types

    return "train.release_encoders" in schema_types()


STEPS = 3  # timed steps, after one warm-up step (it allocates the optimizer state)


def load(root: Path, quick: bool, checkpointing: bool):
    from sanakit.config import load_config

    return load_config(packaged_config(), overrides(root, quick, checkpointing))


# ----------------------------------------------------------------------------- memory


class PeakRSS:
    """The process's resident set, sampled every 10 ms, with a running peak per named part."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peaks: dict[str, int] = {}
        self.part = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            rss = self.now()
            self.peaks[self.part] = max(self.peaks.get(self.part, 0), rss)

    def mark(self, part: str) -> None:
        self.peaks[self.part] = max(self.peaks.get(self.part, 0), self.now())
        self.part = part

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mark("end")
        self._stop.set()
        self._thread.join()


def ru_maxrss() -> int:
    """This process's own peak resident set in bytes: VmHWM on Linux (``ru_maxrss`` carries the
    parent's RSS at fork across ``execve``; the two agree once a phase outgrows its parent)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB elsewhere


def module_bytes(obj: object) -> int:
    mods = [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


def release(obj: object) -> None:
    """Free an encoder's weights: every torch module it holds moves to the meta device."""
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.nn.Module):
            setattr(obj, name, value.to("meta"))


# ----------------------------------------------------------------------------- phases


def phase_cache(root: Path, quick: bool) -> dict:
    """`sanakit cache build` on the run's config, in this process."""
    from sanakit.cli import main as sanakit_main

    t0 = time.perf_counter()
    config = packaged_config()
    code = sanakit_main(["cache", "build", str(config), *overrides(root, quick, False)])
    if code != 0:
        raise SystemExit(f"cache build failed with exit code {code}")
    return {"seconds": time.perf_counter() - t0}


class StepMarks(logging.Handler):
    """(step, time) of the loop's own "step N/M" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("step ") and record.args:
            self.marks.append((int(record.args[0]), time.perf_counter()))


def phase_train(root: Path, quick: bool, checkpointing: bool) -> dict:
    """The real training loop at batch 1; encoders released once the parts are built."""
    from sanakit.doctor.models import estimate_train_memory
    from sanakit.train import hooks, loop

    cfg = load(root, quick, checkpointing)
    built: dict = {}
    native_release = has_native_release()
    original_build_parts = loop.build_parts

    def build_parts_then_release(cfg, accelerator, models, null, resuming):
        parts = original_build_parts(cfg, accelerator, models, null, resuming)
        probe = SimpleNamespace(
            text_encoder=models.text_encoder,
            autoencoder=models.autoencoder,
            transformer=models.transformer,
        )
        built["estimate"] = estimate_train_memory(cfg, probe, released=True)
        built["estimate_kept"] = estimate_train_memory(cfg, probe, released=False)[0]
        built["encoder_bytes"] = module_bytes(models.text_encoder) + module_bytes(
            models.autoencoder
        )
        rss.mark("release")
        before = rss.now()
        if not native_release:  # the caches are complete: nothing calls the encoders again
            release(models.text_encoder)
            release(models.autoencoder)
        built["freed_bytes"] = before - rss.now()
        rss.mark("steps")
        return parts

    marks = StepMarks()
    log = logging.getLogger("sanakit")
    log.setLevel(logging.INFO)
    log.addHandler(marks)
    saves = []
    loop.build_parts = build_parts_then_release
    original_save = hooks.Checkpointer.save
    # a Sana-600M checkpoint is ~11 GB of writes that says nothing about the step
    hooks.Checkpointer.save = lambda self, state: saves.append(state.step) or True
    handlers = list(log.handlers)
    t0 = time.perf_counter()
    try:
        with PeakRSS() as rss, contextlib.redirect_stdout(io.StringIO()):
            rss.mark("load")
            loop.train(cfg)
    finally:
        loop.build_parts = original_build_parts
        hooks.Checkpointer.save = original_save
        log.removeHandler(marks)
        for h in set(log.handlers) - set(handlers):  # the loop's train.log handler
            log.removeHandler(h)
            h.close()
    times = [t1 - t0_ for (_, t0_), (_, t1) in zip(marks.marks, marks.marks[1:], strict=False)]
    need, parts = built["estimate"]
    return {
        "seconds": time.perf_counter() - t0,
        "step_seconds": times,
        "first_step_seconds": marks.marks[0][1] - t0 if marks.marks else None,
        "s_per_step": sum(times) / len(times) if times else None,
        "estimate_bytes": need,
        "estimate_parts": parts,
        "estimate_if_encoders_kept_bytes": built["estimate_kept"],
        "encoder_bytes": built["encoder_bytes"],
        "freed_bytes": built["freed_bytes"],
        "released_by": "train.release_encoders" if native_release else "this script",
        "peak_bytes": dict(rss.peaks),
        "checkpoints_skipped": saves,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


PHASES = {
    "make": lambda root, quick: phase_make(root, quick),
    "cache": lambda root, quick: phase_cache(root, quick),
    "train": lambda root, quick: phase_train(root, quick, checkpointing=False),
    "train_checkpointing": lambda root, quick: phase_train(root, quick, checkpointing=True),
}


def run_phase(name: str, root: Path, quick: bool, isolate: bool) -> dict:
    """One phase, in a fresh process when ``isolate`` (its ru_maxrss is then its own peak)."""
    if not isolate:
        out = PHASES[name](root, quick)
        out["ru_maxrss_bytes"] = ru_maxrss()  # the whole process so far
        return out
    cmd = [sys.executable, __file__, "--phase", name, "--root", str(root)]
    done = subprocess.run([*cmd, *(["--quick"] if quick else [])], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- plan (--dry)


def dry_plan(quick: bool) -> dict:
    """Parameter counts on the meta device and doctor's estimate: no weights, no disk."""
    from diffusers import AutoencoderDC
    from transformers import Gemma2Config, Gemma2Model

    from sanakit.doctor.models import estimate_train_memory
    from sanakit.models.transformer import build_transformer

    with torch.device("meta"):
        gemma = Gemma2Model(Gemma2Config(**(GEMMA_TINY if quick else GEMMA_2_2B)))
        vae = AutoencoderDC(**(DCAE_TINY if quick else DCAE_F32C32_SANA))
    factor = 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    root = Path("/nonexistent")  # only the config is read
    out = {}
    for name, checkpointing in (("estimate", False), ("estimate_checkpointing", True)):
        cfg = load(root, quick, checkpointing)
        with torch.device("meta"):
            transformer = build_transformer(
                cfg, vae.config.latent_channels, gemma.config.hidden_size, factor
            )
        probe = SimpleNamespace(
            text_encoder=SimpleNamespace(model=gemma, dtype=torch.bfloat16),
            autoencoder=SimpleNamespace(module=vae, downsample_factor=factor),
            transformer=transformer,
        )
        need, parts = estimate_train_memory(cfg, probe, released=True)
        kept = estimate_train_memory(cfg, probe, released=False)[0]
        out[name] = {"bytes": need, "parts": parts, "if_encoders_kept_bytes": kept}
    out["params"] = {
        "gemma": sum(p.numel() for p in gemma.parameters()),
        "dcae": sum(p.numel() for p in vae.parameters()),
        "transformer": sum(p.numel() for p in transformer.parameters()),
    }
    out["downsample_factor"] = factor
    return out


# ----------------------------------------------------------------------------- main


def summarize(phases: dict) -> dict:
    train, ckpt = phases["train"], phases["train_checkpointing"]
    peaks = {name: p["ru_maxrss_bytes"] for name, p in phases.items()}
    out = {
        "s_per_step": round(train["s_per_step"], 3),
        "s_per_step_checkpointing": round(ckpt["s_per_step"], 3),
        "peak_rss_gb": round(max(peaks.values()) / GB, 3),
        "estimate_vs_measured": round(train["estimate_bytes"] / train["ru_maxrss_bytes"], 3),
        "estimate_vs_measured_checkpointing": round(
            ckpt["estimate_bytes"] / ckpt["ru_maxrss_bytes"], 3
        ),
        "phase_peak_rss_gb": {k: round(v / GB, 3) for k, v in peaks.items()},
        "encoders_freed_gb": round(train["freed_bytes"] / GB, 3),
        "released_by": train["released_by"],
    }
    if train["cuda_peak_bytes"] is not None:  # training's peak GPU memory (torch allocator)
        out["peak_gpu_gb"] = round(train["cuda_peak_bytes"] / GB, 3)
        out["peak_gpu_gb_checkpointing"] = round(ckpt["cuda_peak_bytes"] / GB, 3)
    return out


def gigabytes(values: dict) -> dict:
    return {k: round(v / GB, 2) for k, v in values.items()}


def report(phases: dict, summary: dict) -> None:
    make, cache = phases["make"], phases["cache"]
    print(
        f"models: Gemma-2 {make['gemma_params'] / 1e9:.3f}B params (bf16), DC-AE "
        f"{make['dcae_params'] / 1e6:.1f}M (fp32); instruction {make['instruction_tokens']} tokens"
    )
    print(f"{'phase':<22} {'seconds':>8} {'peak RSS GB':>12}")
    for name, p in phases.items():
        print(f"{name:<22} {p['seconds']:>8.1f} {p['ru_maxrss_bytes'] / GB:>12.2f}")
    for name in ("train", "train_checkpointing"):
        p = phases[name]
        steps = ", ".join(f"{t:.2f}" for t in p["step_seconds"])
        print(
            f"{name}: first step at {p['first_step_seconds']:.1f} s, then {steps} s/step; "
            f"estimate {p['estimate_bytes'] / GB:.2f} GB ({p['estimate_parts']}) vs measured "
            f"{p['ru_maxrss_bytes'] / GB:.2f} GB; encoders freed {p['freed_bytes'] / GB:.2f} GB "
            f"by {p['released_by']}; peak per part {gigabytes(p['peak_bytes'])}"
        )
    del cache


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, phases in this process")
    p.add_argument("--dry", action="store_true", help="parameter counts and estimates only")
    p.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the JSON line to this file")
    opts = p.parse_args(argv)
    logging.getLogger("sanakit").setLevel(logging.INFO)
    if opts.phase:  # a child process of the full run
        out = PHASES[opts.phase](Path(opts.root), opts.quick)
        out["ru_maxrss_bytes"] = ru_maxrss()
        print(json.dumps(out))
        return 0
    if opts.dry:
        summary = {"dry": True, "quick": opts.quick, **dry_plan(opts.quick)}
    else:
        summary = full_run(opts)
    line = json.dumps(summary)
    if opts.json:
        Path(opts.json).write_text(line + "\n")
    print(line)
    return 0


def full_run(opts: argparse.Namespace) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sanakit-full-size-", dir=opts.root) as tmp:
        root = Path(tmp)
        phases = {}
        for name in PHASES:
            phases[name] = run_phase(name, root, opts.quick, isolate=not opts.quick)
            print(f"{name}: {phases[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
        summary = summarize(phases)
        report(phases, summary)
    summary["quick"] = opts.quick
    if opts.quick:  # the full-size plan too: parameter counts and doctor's estimates (meta)
        summary["full_size_plan"] = dry_plan(quick=False)
    summary["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        summary["gpu"] = torch.cuda.get_device_name(0)
    return summary


if __name__ == "__main__":
    sys.exit(main())
