"""Training side of the benchmark suite: the real loop paired with a bare loop, FLOPs, peak.

Pairing: the loop's own "step N/M" log line calls back into :class:`PairedMarks`, which runs a
bare-loop window of the same length and a short fp32 matmul burst right there, then lets the
loop go on. Each loop window (from the end of that bare window to the next log line) thus has a
bare window and a matmul peak measured next to it: one A/B pair, under the same machine load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work, so a wall-clock window covers it (no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def default_config(work_dir: Path, extra: list[str] = ()):
    from sanakit.config import load_config

    return load_config(None, [f"--work_dir={work_dir}", *extra])


class BareLoop:
    """Plain fwd/bwd/optimizer step on tensors already in memory: the same model, batch, loss
    and optimizer (built by sanakit's own ``build_optimizer``, so a fused/foreach choice there
    applies to both sides)."""

    def __init__(self, work_dir: Path) -> None:
        from sanakit.data.dataset import index_dataset
        from sanakit.embeddings.captions import CaptionEncoder
        from sanakit.train.components import build_models, build_optimizer, latent_shape

        cfg = default_config(work_dir)
        self.cfg = cfg
        models = build_models(cfg, DEVICE)
        self.model = models.transformer.train()
        self.batch = cfg.train.train_batch_size
        dataset = index_dataset(cfg.data, cfg.model.image_size, cfg.seed)
        items = [dataset[i] for i in range(self.batch)]
        pixels = torch.stack([it["pixels"] for it in items]).to(DEVICE)
        self.x0 = models.autoencoder.encode(pixels)
        captions = CaptionEncoder(models.text_encoder)
        embeds, mask = captions.encode([it["caption"] for it in items])
        self.embeds, self.mask = embeds.to(DEVICE), mask.to(DEVICE)
        self.shape = latent_shape(cfg, models.autoencoder)
        self.optimizer = build_optimizer(cfg, self.model)
        self.generator = torch.Generator().manual_seed(0)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sanakit.flow import sample_sigmas

        s = self.cfg.scheduler
        sigmas = sample_sigmas(
            self.batch, s.weighting_scheme, self.generator, s.logit_mean, s.logit_std, s.flow_shift
        )
        noise = torch.randn((self.batch, *self.shape), generator=self.generator)
        return sigmas.to(DEVICE), noise.to(DEVICE)

    def step(self, amp: torch.dtype = torch.float32) -> None:
        from sanakit.flow import flow_matching_loss

        sigmas, noise = self.inputs()
        with torch.autocast(DEVICE.type, dtype=amp, enabled=amp != torch.float32):
            out = flow_matching_loss(self.model, self.x0, self.embeds, self.mask, sigmas, noise)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def window(self, size: int, amp: torch.dtype = torch.float32) -> float:
        """Seconds per step over ``size`` steps."""
        sync()
        t0 = time.perf_counter()
        for _ in range(size):
            self.step(amp)
        sync()
        return (time.perf_counter() - t0) / size

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


def matmul_peak(seconds: float = 0.5, n: int = 1024) -> float:
    """Best fp32 matmul FLOP/s over repeated n x n products (all torch threads; on a GPU
    TF32 stays at torch's default, off for matmuls)."""
    if DEVICE.type == "cuda":
        n *= 8  # a GPU needs a larger product to reach its peak
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    out = torch.empty(n, n, device=DEVICE)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


class PairedMarks(logging.Handler):
    """At each of the loop's "step N/M" log lines: close the loop window that ends there, then
    run ``partner()`` (the B side of the pair), then open the next loop window."""

    def __init__(self, partner: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.partner = partner
        self.loop_windows: list[tuple[int, float]] = []  # (steps, seconds)
        self._opened: tuple[int, float] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and record.msg.startswith("step ") and record.args):
            return
        sync()
        step, now = int(record.args[0]), time.perf_counter()
        if self._opened is not None:  # the first mark ends the warm-up window: not timed
            self.loop_windows.append((step - self._opened[0], now - self._opened[1]))
        if step < int(record.args[1]):  # after the last mark no loop window follows
            self.partner()
        self._opened = (step, time.perf_counter())


def run_sanakit_loop(
    train_steps: int, window: int, work_dir: Path, partner: Callable[[], None]
) -> list[float]:
    """The real ``train.loop.train`` on the default config; seconds per step of each window.

    Only what keeps the run inside the benchmark changes: max_steps, log_interval (the timing
    marks), no validation images and no checkpoint inside the timed steps (the final save
    happens after the last mark).
    """
    from sanakit.train.loop import train

    cfg = default_config(
        work_dir,
        [
            f"--train.max_steps={train_steps}",
            f"--train.log_interval={window}",
            f"--train.save_model_steps={train_steps}",
            "--train.visualize=false",
        ],
    )
    log = logging.getLogger("sanakit")
    marks = PairedMarks(partner)
    old_level, before = log.level, list(log.handlers)
    log.setLevel(logging.INFO)
    log.addHandler(marks)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
    finally:
        log.removeHandler(marks)
        log.setLevel(old_level)
        for h in set(log.handlers) - set(before):  # the loop's train.log handler
            log.removeHandler(h)
            h.close()
    return [seconds / steps for steps, seconds in marks.loop_windows]


def paired_training(train_steps: int, window: int, bf16_pairs: int, root: Path) -> dict:
    """trainer_vs_bare, train_flops_fraction and bf16_speedup, one value per A/B pair."""
    bare = BareLoop(root / "bare")
    bare.step()  # warm-up (allocator)
    bare_t: list[float] = []
    peaks: list[float] = []

    def partner() -> None:
        bare_t.append(bare.window(window))
        peaks.append(matmul_peak())

    loop_t = run_sanakit_loop(train_steps, window, root / "loop", partner)
    flops = bare.count_flops()
    fp32, bf16 = [], []
    bare.step(torch.bfloat16)  # warm-up (autocast weight casts)
    for _ in range(bf16_pairs):
        fp32.append(bare.window(window // 2, torch.float32))
        bf16.append(bare.window(window // 2, torch.bfloat16))
    return {
        "loop_s": loop_t,
        "bare_s": bare_t,
        "matmul_peak": peaks,
        "flops": flops,
        "fp32_s": fp32,
        "bf16_s": bf16,
        "trainer_vs_bare": [b / a for a, b in zip(loop_t, bare_t, strict=True)],
        "train_flops_fraction": [flops / a / p for a, p in zip(loop_t, peaks, strict=True)],
        "bf16_speedup": [a / b for a, b in zip(fp32, bf16, strict=True)],
    }
