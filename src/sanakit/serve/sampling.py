"""Sampling for the page: the same code path as ``sanakit sample`` (``load_for_inference`` +
``sample_grid`` + PIL's PNG writer), so the same settings give the same PNG bytes.

A loaded model is kept (per checkpoint directory and EMA choice, the newest ``MAX_LOADED``);
one model call runs at a time; at most ``MAX_WAITING`` requests wait behind it and the rest are
refused at once as busy. Every bound has its own one-line message for the page.
"""

from __future__ import annotations

import io
import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sanakit.config import SEED_MAX, Config, Sampler
from sanakit.errors import SanakitError
from sanakit.inference import MAX_BATCH, Inference, load_for_inference, sample_grid
from sanakit.serve.checkpoints import checkpoint_path, identity
from sanakit.serve.files import PublicFiles
from sanakit.train.checkpoint_files import read_config

MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 500
MAX_STEPS = 100
MAX_IMAGES = 16  # prompts x images per prompt in one request: one model call (MAX_BATCH)
MAX_CFG = 30.0
MAX_WAITING = 4  # requests queued behind the running one; more are refused as busy
MAX_LOADED = 2  # models kept in memory

Progress = Callable[[float, str], None]


class RequestRefused(SanakitError):
    """A sample request the page does not run, and why (shown on the page)."""


class Busy(RequestRefused):
    """The sampling queue is full."""


@dataclass(frozen=True)
class SampleRequest:
    checkpoint: Path
    ema: bool
    prompts: tuple[str, ...]
    cfg_scale: float
    steps: int
    sampler: str
    seed: int
    num_images: int

    def describe(self) -> str:
        weights = "EMA" if self.ema else "model"
        return (
            f"{self.checkpoint.name} ({weights}), CFG {self.cfg_scale:g}, {self.steps} steps "
            f"{self.sampler}, seed {self.seed}, {self.num_images} per prompt: "
            + " | ".join(self.prompts)
        )


@dataclass(frozen=True)
class SampleResult:
    request: SampleRequest
    path: Path  # the PNG (a grid: a row per prompt), in the server's temp dir
    seconds: float


def whole_number(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a message naming the field and the range."""
    wrong = RequestRefused(f"{name} must be a whole number from {low} to {high} (got {value!r})")
    if isinstance(value, bool) or value is None:
        raise wrong
    if isinstance(value, str):
        value = value.strip()
        if not value.lstrip("-").isdigit() or len(value) > 30:
            raise wrong
        value = int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise wrong
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise wrong
    return value


def parse_prompts(text: Any) -> tuple[str, ...]:
    if not isinstance(text, str) or not text.strip():
        raise RequestRefused("no prompt given: type a prompt (one per line for several)")
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(prompts) > MAX_PROMPTS:
        raise RequestRefused(f"{len(prompts)} prompts given; at most {MAX_PROMPTS} per request")
    longest = max(len(p) for p in prompts)
    if longest > MAX_PROMPT_CHARS:
        raise RequestRefused(
            f"a prompt of {longest} characters is too long; at most {MAX_PROMPT_CHARS}"
        )
    return prompts


def parse_request(
    checkpoints_dir: Path,
    checkpoint: Any,
    ema: Any,
    prompts: Any,
    cfg_scale: Any,
    steps: Any,
    sampler: Any,
    seed: Any,
    num_images: Any,
) -> SampleRequest:
    """The page's fields checked in order; the first problem is refused with its message.

    ``cfg_scale``, ``steps`` and ``sampler`` left empty take the checkpoint's training values,
    as ``sanakit sample`` does.
    """
    texts = parse_prompts(prompts)
    per_prompt = whole_number(num_images, "images per prompt", 1, MAX_IMAGES)
    if len(texts) * per_prompt > MAX_IMAGES:
        raise RequestRefused(
            f"{len(texts)} prompt(s) x {per_prompt} images is {len(texts) * per_prompt} images; "
            f"at most {MAX_IMAGES} per request"
        )
    seed = whole_number(seed, "seed", 0, SEED_MAX)
    steps = None if steps in (None, "") else whole_number(steps, "steps", 1, MAX_STEPS)
    if cfg_scale not in (None, ""):
        try:
            cfg_scale = float(cfg_scale)
        except (TypeError, ValueError):
            cfg_scale = math.nan
        if not 0 <= cfg_scale <= MAX_CFG:  # NaN fails too
            raise RequestRefused(f"CFG scale must be a number from 0 to {MAX_CFG:g}")
    if sampler not in (None, "") and sampler not in set(Sampler):
        raise RequestRefused(f"unknown sampler {sampler!r}; use one of {', '.join(Sampler)}")
    path = checkpoint_path(checkpoints_dir, checkpoint)
    if path is None:
        raise RequestRefused(
            f"no checkpoint named {str(checkpoint)[:80]!r} in {checkpoints_dir}; pick one "
            "from the list"
        )
    train = training_defaults(path)
    return SampleRequest(
        checkpoint=path,
        ema=bool(ema),
        prompts=texts,
        cfg_scale=train.cfg_scale if cfg_scale in (None, "") else cfg_scale,
        steps=steps or train.sampling_steps,
        sampler=str(sampler or train.sampler),
        seed=seed,
        num_images=per_prompt,
    )


def training_defaults(path: Path) -> Any:
    """The checkpoint's ``train`` config (its CFG, steps and sampler are the defaults)."""
    try:
        return read_config(path).train
    except SanakitError as err:
        raise RequestRefused(f"{path.name} cannot be used: {err}") from None


def encode_png(grid: Any) -> bytes:
    """PNG bytes of a uint8 grid, written as ``sanakit sample`` writes its --out file."""
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()


class ModelCache:
    """Loaded checkpoints, newest use last; the oldest is dropped beyond ``capacity``."""

    def __init__(self, capacity: int = MAX_LOADED) -> None:
        self.capacity = capacity
        self._models: OrderedDict[tuple, Inference] = OrderedDict()
        self.loads = 0  # how many times a model was loaded (tests: once per checkpoint)

    def get(self, path: Path, ema: bool) -> Inference:
        key = (str(path), identity(path), ema)  # a re-saved step is another directory
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        inference = load_for_inference(path, ema=ema)  # verifies the checkpoint first
        self.loads += 1
        self._models[key] = inference
        while len(self._models) > self.capacity:
            self._models.popitem(last=False)
        return inference


class SampleService:
    """One model call at a time; a short line of waiting requests; the rest refused as busy."""

    def __init__(self, files: PublicFiles, models: ModelCache | None = None) -> None:
        self.files = files
        self.models = models or ModelCache()
        self._gate = threading.Lock()  # held for the duration of one model call
        self._count = threading.Lock()
        self.waiting = 0

    def run(self, request: SampleRequest, progress: Progress) -> SampleResult:
        with self._count:
            if self.waiting >= MAX_WAITING:
                raise Busy(
                    f"busy: {self.waiting} requests are already waiting for the model (at most "
                    f"{MAX_WAITING}); try again in a moment"
                )
            self.waiting += 1
        try:
            while not self._gate.acquire(timeout=0.5):
                progress(0.0, f"waiting for the model ({self.waiting} in line)")
        finally:
            with self._count:
                self.waiting -= 1
        try:
            start = time.monotonic()
            progress(0.1, f"loading {request.checkpoint.name}")
            inference = self.models.get(request.checkpoint, request.ema)
            progress(0.3, f"sampling {len(request.prompts) * request.num_images} image(s)")
            png = encode_png(self.sample(inference, request, progress))
            seconds = time.monotonic() - start
        finally:
            self._gate.release()
        label = f"{request.checkpoint.name}-seed{request.seed}"
        return SampleResult(request, self.files.add_sample(png, label), seconds)

    @staticmethod
    def sample(inference: Inference, request: SampleRequest, progress: Progress) -> Any:
        """``sample_grid`` as ``sanakit sample`` calls it; a forward hook on the transformer
        (one call per denoising step and batch) moves the progress bar without touching the
        computation."""
        images = len(request.prompts) * request.num_images
        total = request.steps * math.ceil(images / MAX_BATCH)
        calls = itertools.count(1)

        def step_done(*_: Any) -> None:
            done = next(calls)
            progress(0.3 + 0.65 * done / total, f"denoising step {done} of {total}")

        hook = inference.models.transformer.register_forward_hook(step_done)
        try:
            return sample_grid(
                inference,
                list(request.prompts),
                request.num_images,
                cfg_scale=request.cfg_scale,
                steps=request.steps,
                sampler=request.sampler,
                seed=request.seed,
            )
        finally:
            hook.remove()


def page_defaults(cfg: Config | None) -> tuple[float, int, str]:
    """CFG scale, steps and sampler the page starts with: the run's own."""
    train = (cfg or Config()).train
    return float(train.cfg_scale), int(train.sampling_steps), str(train.sampler)
