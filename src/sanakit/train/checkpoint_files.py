"""Reading a checkpoint's files back: only what its manifest lists, every value checked.

A checkpoint that verifies (its manifest matches its files) can still hold anything: a re-sealed
manifest makes wrong types, 1e30, Infinity, weights of another model or a hostile safetensors
header "verified". Every reader here therefore opens only files the manifest lists
(:class:`sanakit.io.checkpoint.ListedFiles`; an unlisted file is never loaded, whatever its
name), checks what it parsed, and turns anything unusable into one :class:`CheckpointError`
naming the file. ``train`` resume (``TrainState.load``), ``sample``/``eval``/``export``
(``inference.load_for_inference``) all read through here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sanakit.config import Config, from_yaml_text
from sanakit.errors import CheckpointError, SanakitError
from sanakit.io.artifacts import PROVENANCE
from sanakit.io.checkpoint import ListedFiles, listed_files
from sanakit.models.text.null_embedding import EMBEDS, MASK, NullEmbedding, shape_check

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
NULL_EMBED_FILE = "null_embed.pth"
TRAINER_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"

MAX_SMALL_FILE = 16 << 20  # JSON/YAML side files are a few KB; more is not ours
MAX_COUNT = 1 << 53  # steps, epochs, batches: beyond this a count is not a real one
MAX_WORLD = 1 << 20


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0][:160]


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Whatever a verified-but-hostile file makes a loader raise becomes one line naming it."""
    try:
        yield
    except SanakitError:
        raise
    except Exception as err:  # noqa: BLE001 - torch/safetensors/json raise many types
        raise CheckpointError(
            f"checkpoint file {path} is unusable ({type(err).__name__}: {_first_line(err)}); "
            "use a checkpoint sanakit wrote for this config"
        ) from None


def bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {path} {what}; use a checkpoint sanakit wrote for this config"
    )


def read_small_text(path: Path) -> str:
    with reading(path):
        if path.stat().st_size > MAX_SMALL_FILE:
            raise bad(path, f"is larger than {MAX_SMALL_FILE} bytes")
        return path.read_bytes().decode("utf-8")


def read_json(path: Path) -> Any:
    """Parsed JSON of a small listed file (deep nesting, NaN, Infinity: one clean error)."""
    text = read_small_text(path)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    with reading(path):
        return json.loads(text, parse_constant=no_constant)


def count(path: Path, data: dict, key: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """``data[key]`` if it is an int in [low, high]; else one error naming the file and key."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(path, f"holds {key}={value!r}, not an integer in [{low}, {high}]")
    return value


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - corrupt pickle/zip: report which file
        raise CheckpointError(
            f"checkpoint file {path} is unreadable ({type(err).__name__})"
        ) from None


def read_trainer_state(directory: Path) -> dict:
    """The checkpoint's trainer_state.json, its counts checked (step = the manifest's step)."""
    files = listed_files(directory)
    path = files.path(TRAINER_FILE)
    data = read_json(path)
    if not isinstance(data, dict):
        raise bad(path, f"holds a {type(data).__name__}, not an object")
    step = count(path, data, "step")
    if step != files.step:
        raise bad(path, f"says step {step} but the manifest says {files.step}")
    if "epoch" in data:
        count(path, data, "epoch")
    if "world_size" in data:
        count(path, data, "world_size", 1, MAX_WORLD)
    if not isinstance(data.get("null_embed_provenance", {}), dict):
        raise bad(path, "holds a null_embed_provenance that is not an object")
    return data


def read_sampler_state(files: ListedFiles, rank: int) -> dict:
    """``sampler_rank{rank}.json`` with every field the sampler uses checked."""
    path = files.path(f"sampler_rank{rank}.json")
    data = read_json(path)
    if not isinstance(data, dict):
        raise bad(path, f"holds a {type(data).__name__}, not an object")
    epoch = count(path, data, "epoch", 0, 1 << 31)
    count(path, data, "batches_done")
    # the sampler seeds torch with seed * 1_000_003 + epoch + 7_919: it must fit in 64 bits
    count(path, data, "seed", 0, ((1 << 64) - 1 - 7_919 - epoch) // 1_000_003)
    for key in ("num_samples", "global_batch"):
        if key in data:
            count(path, data, key)
    if not isinstance(data.get("grouped", False), bool):
        raise bad(path, "holds a grouped flag that is not true/false")
    return data


def read_config(directory: Path) -> Config:
    """The resolved config saved in a checkpoint."""
    path = listed_files(directory).path(CONFIG_FILE)
    text = read_small_text(path)
    with reading(path):
        return from_yaml_text(text, where=str(path))


def read_null_embedding(directory: Path, encoder: Any = None) -> NullEmbedding:
    """The checkpoint's own copy of the null embedding (resume and sample never need another).

    With ``encoder`` (a TextEncoder) its shape must be the one that encoder produces.
    """
    path = listed_files(directory).path(NULL_EMBED_FILE)
    data = torch_load(path)
    if not isinstance(data, dict):
        raise bad(path, f"holds a {type(data).__name__}, not a dict of tensors")
    embeds, mask, meta = data.get(EMBEDS), data.get(MASK), data.get(PROVENANCE) or {}
    if not isinstance(embeds, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise bad(path, f"lacks the tensors {EMBEDS} and {MASK}")
    if embeds.dim() != 3 or tuple(mask.shape) != tuple(embeds.shape[:2]) or embeds.shape[0] != 1:
        raise bad(path, f"holds embeds {tuple(embeds.shape)} / mask {tuple(mask.shape)}")
    if not embeds.is_floating_point() or not torch.isfinite(embeds).all():
        raise bad(path, "holds embeds that are not finite floating-point numbers")
    reason = shape_check(encoder.max_length, encoder.hidden_size)(data) if encoder else None
    if reason:
        raise bad(path, f"does not fit the text encoder ({reason})")
    if not isinstance(meta, dict) or not isinstance(meta.get("key", {}), dict):
        raise bad(path, "holds a provenance that is not an object")
    return NullEmbedding(embeds, mask, meta.get("key", {}), str(path))


def read_weights(
    files: ListedFiles, name: str, expected: dict[str, torch.Size], partial: bool = False
) -> dict[str, torch.Tensor]:
    """A safetensors file whose keys and shapes are ``expected`` (a subset if ``partial``).

    The header is checked before any tensor is read, so a file claiming huge or foreign
    tensors never allocates them.
    """
    path = files.path(name)
    with reading(path), safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    missing = [] if partial else sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in shapes.keys() & expected.keys() if shapes[k] != tuple(expected[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {keys[:3]}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape of", wrong),
            )
            if keys
        )
        raise bad(
            path, f"holds weights of another model ({detail}); use the config it was written with"
        )
    with reading(path):
        return load_file(str(path))


def check_optimizer_state(path: Path, state: Any, params: list[torch.Tensor]) -> None:
    """An optimizer state dict (full layout) whose per-parameter tensors fit ``params``."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise bad(path, "is not an optimizer state dict")
    if not isinstance(state.get("param_groups"), list):
        raise bad(path, "is not an optimizer state dict")
    for index, per_param in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise bad(path, f"holds state for parameter {index!r} of {len(params)}")
        if not isinstance(per_param, dict):
            raise bad(path, f"holds state for parameter {index} that is not a dict")
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() > 0 and tuple(value.shape) != tuple(params[index].shape):
                raise bad(
                    path,
                    f"holds {key} of shape {tuple(value.shape)} for a parameter "
                    f"of shape {tuple(params[index].shape)}",
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise bad(path, f"holds a non-finite {key}")


def check_plain_state(path: Path, state: Any, current: dict[str, Any]) -> None:
    """A small state dict (LR scheduler, grad scaler): same keys, same types, finite numbers."""
    if not isinstance(state, dict) or not set(state) <= set(current):
        raise bad(path, "does not hold this run's state (other keys)")
    for key, value in state.items():
        now = current[key]
        if now is not None and type(value) is not type(now):
            raise bad(path, f"holds {key} of type {type(value).__name__}, not {type(now).__name__}")
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if isinstance(v, float) and not math.isfinite(v):
                raise bad(path, f"holds a non-finite {key}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_COUNT:
                raise bad(path, f"holds {key}={v}, beyond any real count")
