"""The real-data path: sanakit's loop on a folder of JPEGs vs a bare loop; cold captions batched.

    .venv/bin/python benchmarks/folder_bench.py [--images 256] [--pairs 7]

``measure()`` returns (and ``__main__`` prints as its last line) one JSON object:

  folder_trainer_vs_bare  s/step of a bare loop / s/step of ``train.loop.train`` (goal >= 0.90):
      an image folder of JPEGs (48x64, resized and cropped to 32 px), tiny random DC-AE, MiniLM,
      caches warmed by ``cache build`` first, so every epoch is a warm one; the bare loop is the
      same model, batch, loss and AdamW fed the same latents and embeddings from memory.
      Paired: one epoch of the trainer, then (inside the trainer's own log call) the same number
      of bare steps, repeated; the ratio is per pair, reported as median and min-max.
  folder_trainer_vs_bare_workers2  the same with ``data.num_workers=2`` (the default picks
      0 workers on a machine with 2 cores, up to 2 beyond; ``num_workers_auto`` says which).
  cold_text_speedup  seconds to encode every caption one at a time (full length) / seconds of
      the batched cold pass (fixed chunks of 64 ordered by length, the model run over each
      chunk's longest caption only), MiniLM, max_length 16 (goal >= 5); paired, median, min-max.
  batched_vs_single_max_abs  largest |batched - single| over every real-token value (mask 1).
  cold_text_padding_rows_zero  whether every padded row (mask 0) of the batched pass is zero.
  released  the log line of ``train.release_encoders`` (what it freed).

Numbers are ratios measured in one run; on a shared machine both sides of a pair share the load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOALS = {"folder_trainer_vs_bare": 0.90, "cold_text_speedup": 5.0}
BATCH = 32


def make_jpegs(root: Path, n: int) -> Path:
    """``n`` 48x64 JPEGs of coloured shapes, each with its own caption."""
    from PIL import Image

    from sanakit.data.shapes import COLOURS, SHAPES, render

    root.mkdir(parents=True, exist_ok=True)
    colours = tuple(COLOURS)
    for i in range(n):
        rng = np.random.default_rng([13, i])
        colour, shape = colours[i % len(colours)], SHAPES[i % len(SHAPES)]
        img = Image.fromarray(render(colour, shape, 64, rng)).resize((64, 48))
        img.save(root / f"img_{i:05d}.jpg", quality=90)
        (root / f"img_{i:05d}.txt").write_text(f"a {colour} {shape}, picture number {i}")
    return root


def config(work: Path, folder: Path, vae: Path, extra: list[str] = ()):
    from sanakit.config import load_config

    return load_config(
        None,
        [
            f"--work_dir={work}",
            "--data.type=image_folder",
            f"--data.data_dir=[{folder}]",
            "--vae.type=dc-ae",
            f"--vae.name_or_path={vae}",
            "--model.image_size=32",
            "--model.patch_size=2",
            f"--train.train_batch_size={BATCH}",
            "--train.visualize=false",
            "--report_to=none",
            f"--train.cache_dir={work.parent / 'cache'}",
            *extra,
        ],
    )


class BareLoop:
    """fwd/bwd/AdamW of the same model on latents and embeddings held in memory."""

    def __init__(self, cfg, latents: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor):
        from sanakit.train.components import build_models

        models = build_models(cfg, torch.device("cpu"))
        self.model = models.transformer.train()
        self.cfg, self.latents, self.embeds, self.mask = cfg, latents, embeds, mask
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> None:
        from sanakit.flow import flow_matching_loss, sample_sigmas

        s, n = self.cfg.scheduler, len(self.latents)
        pick = torch.randperm(n, generator=self.generator)[:BATCH]
        sigmas = sample_sigmas(
            BATCH, s.weighting_scheme, self.generator, s.logit_mean, s.logit_std, s.flow_shift
        )
        x0 = self.latents[pick]
        noise = torch.randn(x0.shape, generator=self.generator)
        out = flow_matching_loss(self.model, x0, self.embeds[pick], self.mask[pick], sigmas, noise)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Paired(logging.Handler):
    """At each of the loop's log lines (one per epoch): close the trainer's window, run the
    same number of bare steps, then open the trainer's next window."""

    def __init__(self, bare: BareLoop, window: int) -> None:
        super().__init__(logging.INFO)
        self.bare, self.window = bare, window
        self.start: float | None = None
        self.trainer: list[float] = []
        self.bare_times: list[float] = []
        self.released = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "released the text encoder" in message:
            self.released = message
        if not message.startswith("step "):
            return
        now = time.perf_counter()
        if self.start is not None:  # the first window (start-up, warm-up) is not timed
            self.trainer.append((now - self.start) / self.window)
            t0 = time.perf_counter()
            for _ in range(self.window):
                self.bare.step()
            self.bare_times.append((time.perf_counter() - t0) / self.window)
        else:
            for _ in range(2):
                self.bare.step()  # warm-up of the bare side
        self.start = time.perf_counter()


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def in_memory(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every latent and embedding of the dataset, read from the warm cache."""
    from sanakit.embeddings.captions import CaptionEncoder
    from sanakit.embeddings.commands import open_caches
    from sanakit.embeddings.loader import CachedSamples, collate_cached

    parts = open_caches(cfg, "read")
    text = CaptionEncoder(parts.text.encoder, store=parts.text)
    samples = CachedSamples(parts.dataset, parts.latents, parts.sources, text)
    batch = collate_cached([samples[i] for i in range(len(samples))])
    embeds = torch.stack([t[0] for t in batch["found_text"]])
    mask = torch.stack([t[1] for t in batch["found_text"]])
    return batch["pixels"].stacked, embeds, mask


def trainer_vs_bare(root: Path, folder: Path, vae: Path, pairs: int, extra: list[str]) -> dict:
    from sanakit.train.loop import train

    window = len(list(folder.glob("*.jpg"))) // BATCH  # one epoch per window
    steps = window * (pairs + 1)
    work = root / f"work{len(extra)}"
    args = [f"--train.max_steps={steps}", f"--train.log_interval={window}", *extra]
    args.append(f"--train.save_model_steps={steps}")
    cfg = config(work, folder, vae, args)
    paired = Paired(BareLoop(cfg, *in_memory(cfg)), window)
    log = logging.getLogger("sanakit")
    old = log.level
    log.setLevel(logging.INFO)
    log.addHandler(paired)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
    finally:
        log.removeHandler(paired)
        log.setLevel(old)
        for h in list(log.handlers):
            if isinstance(h, logging.FileHandler):
                log.removeHandler(h)
                h.close()
    ratios = [b / t for b, t in zip(paired.bare_times, paired.trainer, strict=True)]
    return {
        "ratio": spread(ratios),
        "trainer_s_per_step": spread(paired.trainer),
        "bare_s_per_step": spread(paired.bare_times),
        "released": paired.released,
    }


def cold_text(folder: Path, pairs: int) -> dict:
    """Every caption one at a time (full length) vs the batched cold pass (trimmed chunks),
    alternating, fresh memos."""
    from sanakit.embeddings.captions import CaptionChunks, CaptionEncoder
    from sanakit.models.text.minilm import MiniLMEncoder

    encoder = MiniLMEncoder(max_length=16)
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    chunks = CaptionChunks(captions)
    encoder.encode(captions[:4])  # warm-up
    single_s, batched_s = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        single = torch.stack([encoder.encode([c])[0][0] for c in chunks.ordered])
        single_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched = CaptionEncoder(encoder, chunks=chunks)
        batched.prefill()
        batched_s.append(time.perf_counter() - t0)
    rows = torch.stack([batched.pinned[c][0] for c in chunks.ordered])
    real = torch.stack([batched.pinned[c][1] for c in chunks.ordered]) == 1
    return {
        "speedup": spread([s / b for s, b in zip(single_s, batched_s, strict=True)]),
        "single_s": spread(single_s),
        "batched_s": spread(batched_s),
        "captions": len(chunks.ordered),
        # padding is zero in the batched rows, the model's output on pad tokens in single ones
        "max_abs_diff": float((rows - single)[real].abs().max()),
        "padding_rows_zero": bool((rows[~real] == 0).all()),
    }


def loader_workers_here() -> int:
    from sanakit.config import load_config
    from sanakit.embeddings.loader import loader_workers

    return loader_workers(load_config(None, ["--data.type=image_folder", "--data.data_dir=[x]"]))


def measure(images: int = 256, pairs: int = 7) -> dict:
    """Build the folder, warm the caches, run both comparisons; returns the figures."""
    import transformers

    from sanakit.embeddings.commands import build_caches, open_caches
    from sanakit.models.tiny import make_tiny_autoencoder

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="sanakit-folder-bench-") as tmp:
        root = Path(tmp)
        folder = make_jpegs(root / "jpegs", images)
        vae = make_tiny_autoencoder("dc-ae", root / "dcae")
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            build_caches(open_caches(config(root / "build", folder, vae), "readwrite"), False)
        warm_s = time.perf_counter() - t0
        auto = trainer_vs_bare(root, folder, vae, pairs, [])
        two = trainer_vs_bare(root, folder, vae, pairs, ["--data.num_workers=2"])
        text = cold_text(folder, max(5, pairs))
    return {
        "folder_trainer_vs_bare": auto["ratio"]["median"],
        "folder_trainer_vs_bare_spread": auto["ratio"],
        "folder_trainer_s_per_step": auto["trainer_s_per_step"],
        "folder_bare_s_per_step": auto["bare_s_per_step"],
        "num_workers_auto": loader_workers_here(),
        "folder_trainer_vs_bare_workers2": two["ratio"]["median"],
        "folder_trainer_vs_bare_workers2_spread": two["ratio"],
        "cold_text_speedup": text["speedup"]["median"],
        "cold_text_speedup_spread": text["speedup"],
        "cold_text_single_s": text["single_s"],
        "cold_text_batched_s": text["batched_s"],
        "batched_vs_single_max_abs": text["max_abs_diff"],
        "cold_text_padding_rows_zero": text["padding_rows_zero"],
        "images": images,
        "captions": text["captions"],
        "cache_build_s": round(warm_s, 2),
        "released": auto["released"],
        "cores": len(os.sched_getaffinity(0)),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "goals": GOALS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=7)
    opts = parser.parse_args()
    print(json.dumps(measure(opts.images, opts.pairs)))


if __name__ == "__main__":
    main()
