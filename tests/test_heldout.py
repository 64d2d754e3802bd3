"""Held-out loss (data.val_split / data.val_dir) and a training step free of host syncs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST, checkpoint_dir, losses, run_sanakit, the_error_line
from PIL import Image

from sanakit.config import load_config
from sanakit.data.dataset import build_dataset, set_epoch
from sanakit.data.shapes import render
from sanakit.data.split import heldout_count, heldout_indices, split_heldout
from sanakit.errors import ConfigError, DataError
from sanakit.train.heldout import RISES_TO_WARN, HeldOut, Trend

HELD = ["--data.max_samples=40", "--data.val_split=8", "--train.eval_sampling_steps=2"]


def config(tmp_path: Path, *extra: str):
    return load_config(None, [f"--work_dir={tmp_path / 'work'}", *FAST, *HELD, *extra])


# ----------------------------------------------------------------------------- the split


def test_split_is_seeded_disjoint_and_keeps_training_out(tmp_path):
    assert heldout_count(0.2, 50) == 10 and heldout_count(7, 50) == 7
    assert heldout_count(0.001, 50) == 1 and heldout_count(0, 50) == 0
    with pytest.raises(DataError, match="leaves none to train on"):
        heldout_count(50, 50)
    held = heldout_indices(0.25, 40, seed=3)
    assert held == heldout_indices(0.25, 40, seed=3) != heldout_indices(0.25, 40, seed=4)
    cfg = config(tmp_path, "--data.random_flip=true")
    dataset, groups = build_dataset(cfg)
    split = split_heldout(cfg, dataset, groups)
    train_ids = {split.train[i]["id"] for i in range(len(split.train))}
    held_ids = {split.heldout[i]["id"] for i in range(len(split.heldout))}
    assert len(train_ids) == 32 and len(held_ids) == 8 and not train_ids & held_ids
    assert train_ids | held_ids == {dataset[i]["id"] for i in range(40)}
    assert held_ids == {f"shapes/0/{i}" for i in heldout_indices(8, 40, 0)}
    batched = split.train.__getitems__([0, 5])  # batched rendering reaches through the split
    assert torch.equal(batched[1]["pixels"], split.train[5]["pixels"])
    set_epoch(split.train, 3)  # reaches the dataset under both Subsets


def folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(render("red", "circle", 32, rng)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red circle")
    return root


def test_val_dir_is_a_separate_unflipped_folder(tmp_path):
    train_dir, val_dir = folder(tmp_path / "train", 6), folder(tmp_path / "val", 3)
    args = ["--data.type=image_folder", f"--data.data_dir=[{train_dir}]", "--data.val_split=0"]
    cfg = config(tmp_path, *args, f"--data.val_dir={val_dir}", "--data.random_flip=true")
    split = split_heldout(cfg, *build_dataset(cfg))
    assert len(split.train) == 6 and len(split.heldout) == 3
    assert not split.heldout.random_flip and split.train.random_flip
    missing = config(tmp_path, *args, f"--data.val_dir={tmp_path / 'nope'}")
    with pytest.raises(DataError, match=r"^data.val_dir: data root .*nope does not exist"):
        split_heldout(missing, *build_dataset(missing))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.val_split=2.5"], "neither a fraction below 1 nor a whole count"),
        (["--data.val_split=-0.1"], "'data.val_split' must be >= 0"),
        (
            ["--data.val_split=0", "--data.val_dir=/tmp"],
            "data.val_dir needs a folder-based data.type",
        ),
    ],
)
def test_bad_heldout_settings_are_one_line_each(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *args)


def test_preflight_refuses_an_empty_val_dir_before_any_model_loads(tmp_path):
    from sanakit.doctor.runner import PreflightFailed, preflight

    train_dir, empty = folder(tmp_path / "train", 2), tmp_path / "empty"
    empty.mkdir()
    args = ["--data.type=image_folder", f"--data.data_dir=[{train_dir}]", "--data.val_split=0"]
    cfg = config(tmp_path, *args, f"--data.val_dir={empty}")
    with pytest.raises(PreflightFailed, match="data.val_dir .*empty is missing or holds no"):
        preflight(cfg, echo=False)
    assert not (tmp_path / "work").exists()


def test_both_split_and_dir_is_refused_by_the_cli(tmp_path):
    result = run_sanakit(
        "train", f"--work_dir={tmp_path}", "--data.type=image_folder",
        f"--data.data_dir=[{tmp_path}]", "--data.val_split=0.1", f"--data.val_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "data.val_split and data.val_dir are both set" in the_error_line(result)
    assert not (tmp_path / "checkpoints").exists()


def test_trend_flags_consecutive_rises_and_survives_a_restart(caplog):
    trend = Trend(None)
    for step, value in enumerate([1.0, 0.8, 0.9, 0.95], start=1):
        trend.update(step * 10, {"model": value, "ema": 1.0 - step / 10})
    assert RISES_TO_WARN == 3 and trend.rising() == []  # two rises so far
    trend.update(50, {"model": 0.97, "ema": 0.4})
    assert trend.rising() == ["model rose 3 evaluations in a row (lowest 0.8000 at step 20)"]
    again = Trend(json.loads(json.dumps(trend.state())))  # through trainer_state.json
    assert again.state() == trend.state() and again.rising() == trend.rising()
    again.update(60, {"model": 0.5, "ema": 0.3})
    assert again.rising() == []
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        assert Trend({"model": {"last": "x"}}).state() == {}
    assert "held-out loss history is unreadable" in caplog.text


# ----------------------------------------------------------------------------- the evaluation


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The real parts of a tiny run with 8 held-out samples (one process, CPU)."""
    from sanakit.models.text.null_embedding import obtain_null_embedding
    from sanakit.train.components import build_models, build_parts

    cfg = config(tmp_path_factory.mktemp("parts"), "--train.train_batch_size=3")
    cpu = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    models = build_models(cfg, cpu.device)
    root = Path(cfg.work_dir) / "null"
    null = obtain_null_embedding(models.text_encoder, root, is_builder=True, barrier=lambda: None)
    return cfg, build_parts(cfg, cpu, models, null, resuming=False)


def rank(r: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"), process_index=r, num_processes=world, is_main_process=r == 0
    )


def test_ranks_share_the_fixed_batches_and_sum_to_one_process_exactly(parts):
    cfg, p = parts
    state = p.state
    one = HeldOut(cfg, rank(0, 1), p, state, writer=None)
    assert [len(b) for b in one.batches] == [3, 3, 2]  # fixed, whatever the world size
    alone, counted = one.local_losses(state.model)
    assert counted.tolist() == [1.0] * 8
    shares = [
        HeldOut(cfg, rank(r, 2), p, state, writer=None).local_losses(state.model) for r in (0, 1)
    ]
    assert torch.equal(shares[0][0] + shares[1][0], alone)  # disjoint entries: an exact sum
    assert torch.equal(shares[0][1] + shares[1][1], counted)
    assert one.mean_loss(state.model) == one.mean_loss(state.model)  # fixed sigmas and noise


def test_ema_evaluation_leaves_the_weights_and_training_randomness_alone(parts):
    cfg, p = parts
    state = p.state
    before = [t.clone() for t in state.model.state_dict().values()]
    rng = state.generator.get_state(), torch.get_rng_state()
    with torch.no_grad():  # an EMA that differs from the model
        for shadow in state.ema.shadow:
            shadow.add_(0.01)
    values = HeldOut(cfg, rank(0, 1), p, state, writer=None).run(state)
    assert values["heldout_loss"] != values["heldout_loss_ema"]
    assert all(
        torch.equal(a, b) for a, b in zip(before, state.model.state_dict().values(), strict=True)
    )
    assert torch.equal(rng[0], state.generator.get_state())
    assert torch.equal(rng[1], torch.get_rng_state())
    assert state.extra["heldout"]["model"]["last"] == values["heldout_loss"]


# ----------------------------------------------------------------------------- in the loop

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__")
# functions that run at every step: none may read a tensor back on the host (on a GPU each read
# waits for all queued work); reads belong to log, evaluation and checkpoint intervals
PER_STEP = {
    "train/step.py": None,  # every function
    "train/batches.py": None,
    "flow.py": {"drop_captions", "flow_matching_loss", "interpolate", "sample_sigmas"},
    "train/parallel.py": {"clip_grad_norm", "no_gradient_sync", "local"},
    "train/hooks.py": {"record", "check", "maybe_run", "due"},
    "train/heldout.py": {"maybe_run"},
    "train/state.py": {"update"},
}
PACKAGE = f"{os.sep}sanakit{os.sep}"


def spy(name: str, seen: list):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        code = sys._getframe(1).f_code
        if PACKAGE in code.co_filename:
            where = code.co_filename.rsplit(PACKAGE, 1)[1].replace(os.sep, "/")
            seen.append((where, code.co_name))
        return original(self, *args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 6-step run in this process (one thread, like the CLI tests), every tensor read on
    the host recorded as (module, function)."""
    from sanakit.train.loop import train

    seen: list = []
    cfg = config(tmp_path_factory.mktemp("run"), *RUN)
    log, threads = logging.getLogger("sanakit"), torch.get_num_threads()
    before = list(log.handlers)
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in CONVERSIONS:
                patch.setattr(torch.Tensor, name, spy(name, seen))
            train(cfg)
    finally:
        torch.set_num_threads(threads)
        for handler in [h for h in log.handlers if h not in before]:
            log.removeHandler(handler)
            handler.close()
    return Path(cfg.work_dir), seen


RUN = ["--train.max_steps=6", "--train.log_interval=3", "--train.save_model_steps=2"]


def test_steps_read_no_tensor_on_the_host_and_rows_carry_heldout_losses(trained):
    work, seen = trained
    per_step = [
        (where, fn)
        for where, fn in seen
        if where in PER_STEP and (PER_STEP[where] is None or fn in PER_STEP[where])
    ]
    assert per_step == []
    assert ("train/hooks.py", "append") in seen  # the spy sees the log interval's one read
    assert len(losses(work)) == 6
    rows = [json.loads(r) for r in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_loss" in r] == [2, 4, 6]
    assert all(np.isfinite(r["heldout_loss_ema"]) for r in rows if "heldout_loss" in r)
    sampler = json.loads((checkpoint_dir(work, 6) / "sampler_rank0.json").read_text())
    assert sampler["num_samples"] == 32  # training draws from the 32 samples not held out


@pytest.mark.slow
def test_a_resumed_run_computes_the_same_heldout_losses(trained, tmp_path):
    full, part = trained[0], tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(checkpoint_dir(part, 6))  # as if killed during step 6: resume from step 4
    again = run_sanakit("train", f"--work_dir={part}", *FAST, *HELD, *RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoint_dir(part, 4)}" in again.stderr
    assert "held-out loss" in again.stderr and "over 8 samples" in again.stderr
    # steps 5-6 and the evaluation at 6 again: the same rows, bit for bit
    assert (part / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    trend = [
        json.loads((checkpoint_dir(w, 6) / "trainer_state.json").read_text())["heldout"]
        for w in (full, part)
    ]
    assert trend[0] == trend[1] and set(trend[0]) == {"model", "ema"}


def test_a_cached_val_dir_is_evaluated_with_the_encoders_released(tmp_path, caplog):
    """`cache build` fills a val_dir's entries; training then frees the encoders, and the
    evaluations read the held-out files by their bytes, as training reads its own: no decode
    and no reload of the autoencoder (the pixel-keyed path reloaded it at the first one)."""
    from sanakit.embeddings.commands import build_caches, open_caches, verify_caches
    from sanakit.models.tiny import make_tiny_autoencoder
    from sanakit.train.loop import train

    train_dir, val_dir = folder(tmp_path / "train", 6), folder(tmp_path / "val", 3, seed=1)
    (val_dir / "0.txt").write_text("a blue square")  # a caption training never encodes
    vae = make_tiny_autoencoder("dc-ae", tmp_path / "dcae")
    cfg_args = [
        f"--work_dir={tmp_path / 'work'}", *FAST, *HELD, "--data.type=image_folder",
        f"--data.data_dir=[{train_dir}]", "--data.val_split=0", "--vae.type=dc-ae",
        f"--vae.name_or_path={vae}", "--model.image_size=32", "--train.max_steps=2",
        "--train.train_batch_size=3", f"--train.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    cfg = load_config(None, [*cfg_args, f"--data.val_dir={val_dir}"])
    built = build_caches(open_caches(cfg, "readwrite"), progress=False)
    assert built["heldout"] == {"samples": 3, "captions_alone": 1, "images": 3, "unreadable": 0}
    sections, _ = verify_caches(open_caches(cfg, "read"), progress=False)
    assert [(s.total, s.problems()) for s in sections] == [(2, 0), (9, 0)]
    log, before = logging.getLogger("sanakit"), list(logging.getLogger("sanakit").handlers)
    try:
        with caplog.at_level(logging.INFO, logger="sanakit"):
            train(cfg)
    finally:
        for handler in [h for h in log.handlers if h not in before]:
            log.removeHandler(handler)
            handler.close()
    assert "released the text encoder and the autoencoder's encoder" in caplog.text
    assert "reloading" not in caplog.text
    rows = [json.loads(r) for r in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if np.isfinite(r.get("heldout_loss", np.nan))] == [2]
    # a val_dir the cache lacks keeps the encoders: evaluation will need them
    other = folder(tmp_path / "val2", 2, seed=2)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="sanakit"):
            train(
                load_config(
                    None, [*cfg_args, f"--data.val_dir={other}", f"--work_dir={tmp_path / 'w2'}"]
                )
            )
    finally:
        for handler in [h for h in log.handlers if h not in before]:
            log.removeHandler(handler)
            handler.close()
    assert "held-out loss" in caplog.text and "released" not in caplog.text
