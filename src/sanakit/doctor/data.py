"""The dataset checks: roots exist and hold samples (preflight); index and decode (doctor)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sanakit.config import Config
from sanakit.data.formats import FORMAT_HINTS, HF_METADATA_NAMES, IMAGE_EXTENSIONS
from sanakit.data.shapes import ShapesDataset
from sanakit.doctor.check import FAIL, PASS, WARN, Check
from sanakit.doctor.probe import Probe
from sanakit.errors import SanakitError

DECODE_SAMPLE = 32  # images decoded by the data check (evenly spaced over the dataset)


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence per-sample warnings while the data check counts bad samples itself."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_shapes(cfg: Config) -> Check:
    """The built-in dataset accepts its settings (it needs no files)."""
    if cfg.seed < 0:  # checked here so the line can name the key without parsing the error
        return Check("data", FAIL, f"seed must be >= 0, got {cfg.seed}", "set --seed to >= 0")
    try:
        ShapesDataset(image_size=cfg.model.image_size, seed=cfg.seed)
    except ValueError as err:
        return Check(
            "data",
            FAIL,
            f"built-in shapes dataset: {err}",
            "set --model.image_size to a valid value",
        )
    return Check("data", PASS, "built-in shapes dataset")


def check_data(cfg: Config, probe: Probe) -> Check:
    """Cheap: roots exist and hold samples (or the built-in dataset accepts its settings).

    The doctor indexes the dataset and decodes a sample of images (``check_data_full``).
    """
    if cfg.data.type == "shapes":
        shapes = check_shapes(cfg)
        if shapes.status == FAIL or not probe.full:
            return shapes
    if probe.full:
        return check_data_full(cfg, probe)
    missing = [d for d in cfg.data.data_dir if not Path(d).expanduser().exists()]
    if missing:
        return Check(
            "data",
            FAIL,
            f"data root {missing[0]} does not exist (data.data_dir)",
            "fix --data.data_dir to point at existing folders",
        )
    for root in cfg.data.data_dir:
        if not looks_populated(cfg.data.type, Path(root).expanduser()):
            return Check(
                "data",
                FAIL,
                f"data root {root} holds no {cfg.data.type} samples (data.data_dir)",
                FORMAT_HINTS.get(cfg.data.type, "fix --data.data_dir"),
            )
    val = cfg.data.val_dir
    if val and not looks_populated(cfg.data.type, Path(val).expanduser()):
        return Check(
            "data",
            FAIL,
            f"data.val_dir {val} is missing or holds no {cfg.data.type} samples",
            "fix --data.val_dir, or hold out part of the data with --data.val_split",
        )
    return Check("data", PASS, f"{len(cfg.data.data_dir)} data root(s) exist")


def looks_populated(kind: str, root: Path) -> bool:
    """Whether ``root`` holds at least the first file its format needs (stops at the first).

    Cheap enough for the preflight: an empty or wrong folder fails before models load (and
    before train writes anything); a full index with caption checks is the doctor's job.
    """
    if kind == "sana_img":
        return (root / "meta_data.json").is_file()
    if kind == "webdataset" and root.is_file():
        return root.suffix == ".tar"
    wanted: Callable[[str], bool] = {
        "image_folder": lambda name: name.lower().endswith(IMAGE_EXTENSIONS),
        "hf_imagefolder": lambda name: name in HF_METADATA_NAMES,
        "webdataset": lambda name: name.endswith(".tar"),
    }.get(kind, lambda name: True)
    for _dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(wanted(f) for f in filenames):
            return True
    return False


def coverage(dataset: Any, inner: Any) -> tuple[list[str], bool]:
    """Facts about indexing (samples, caption coverage, skips) and whether any were skipped."""
    facts = [f"{len(dataset)} samples"]
    skips = getattr(dataset, "skips", None)
    if skips is None or not skips.total:
        return facts + ["caption coverage 100%"], False
    no_caption = sum(v for k, v in skips.counts.items() if "caption" in k)
    indexed = len(inner) + no_caption
    facts.append(f"caption coverage {100 * len(inner) / max(1, indexed):.1f}%")
    facts.append(skips.summary())
    return facts, True


def undecodable(dataset: Any, inner: Any) -> tuple[int, list[str]]:
    """(images tried, the ones that did not decode) over an even spread of the dataset."""
    n = len(dataset)
    k = min(DECODE_SAMPLE, n)
    picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    bad = []
    with quiet("sanakit.data"):
        for i in picks:
            if dataset[i] is None:
                rec = getattr(inner, "records", None)
                bad.append(rec[i].path if rec else str(i))
    return len(picks), bad


def check_data_full(cfg: Config, probe: Probe) -> Check:
    """Index the dataset, count samples and caption coverage, decode a sample of images."""
    try:
        dataset = probe.dataset
    except ValueError as err:  # the built-in dataset rejects its settings
        return Check("data", FAIL, f"dataset: {err}", "fix --model.image_size or --seed")
    except SanakitError as err:
        return Check("data", FAIL, str(err), "fix --data.data_dir / --data.type")
    inner = getattr(dataset, "dataset", dataset)  # a Subset when data.max_samples is set
    facts, skipped = coverage(dataset, inner)
    status, fix = (WARN, "the skipped samples are not trained on; fix or remove them")
    if not skipped:
        status, fix = PASS, ""
    tried, bad = undecodable(dataset, inner)
    facts.append(f"{tried - len(bad)}/{tried} sampled images decode")
    if bad and len(bad) == tried:
        return Check("data", FAIL, ", ".join(facts) + f" (e.g. {bad[0]})", "check the image files")
    if bad:
        status = WARN
        fix = f"unreadable images are skipped at train time; e.g. check {bad[0]}"
    return Check("data", status, ", ".join(facts), fix)
