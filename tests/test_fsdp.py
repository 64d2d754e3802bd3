"""FSDP2 training on CPU (gloo, two ranks, one thread each): sharded, equal, resumable.

Every run uses gradient accumulation 2 (so the no-gradient-sync path is exercised) and EMA
0.9 on 48 samples: 3 optimizer steps per epoch, so 8 steps cross two epoch boundaries. 8 more
samples are held out: the held-out loss (a sharded forward on every rank, model and EMA) runs
at steps 3 and 6.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    TORCHRUN,
    checkpoint_dir,
    losses,
    run_launched,
    run_sanakit,
    the_error_line,
)
from PIL import Image
from safetensors.torch import load_file

from sanakit.config import packaged_config_path

BASE = [*FAST, "--data.max_samples=56", "--train.ema_rate=0.9"]
BASE += ["--train.gradient_accumulation_steps=2"]
BASE += ["--data.val_split=8", "--train.eval_sampling_steps=3"]
STEPS = 8
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def launch(launcher: list[str], work: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_launched(launcher, "train", f"--work_dir={work}", *BASE, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def fsdp(work: Path, *extra: str) -> subprocess.CompletedProcess:
    """2 ranks x batch 4, sharded by ``train.fsdp=true``."""
    return launch(TORCHRUN, work, "--train.fsdp=true", *extra)


def single(work: Path, *extra: str) -> subprocess.CompletedProcess:
    """1 process x batch 8: the same global batch."""
    return launch([sys.executable], work, "--train.train_batch_size=8", *extra)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, str]:
    """Uninterrupted 2-rank FSDP run; returns its work_dir and stderr."""
    work = tmp_path_factory.mktemp("fsdp")
    return work, fsdp(work, f"--train.max_steps={STEPS}").stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """Uninterrupted 1-process run with checkpoints at steps 3, 6 and 8."""
    work = tmp_path_factory.mktemp("single")
    single(work, f"--train.max_steps={STEPS}", "--train.save_model_steps=3")
    return work


@pytest.fixture(scope="module")
def fsdp_stopped_at_3(tmp_path_factory) -> Path:
    """2 ranks stopped at step 3, launched the way users do it: `accelerate launch` with the
    shipped FSDP config (which sets ACCELERATE_USE_FSDP=true instead of train.fsdp), and with
    validation sampling on (every rank must join a sharded forward). Tests copy this dir."""
    work = tmp_path_factory.mktemp("fsdp3")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    accelerate += [
        "--config_file",
        str(packaged_config_path("accelerate_fsdp")),
        "--num_processes=2",
    ]
    out = launch(
        accelerate,
        work,
        "--train.max_steps=3",
        "--train.visualize=true",
        "--train.sampling_steps=2",
    )
    assert "sharded over 2 ranks" in out.stderr
    assert (work / "vis" / "step_00000001.png").is_file()
    return work


def copy_work(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of a work_dir whose newest checkpoint is ``keep_step``."""
    shutil.copytree(src, dst)
    for path in (dst / "checkpoints").iterdir():
        if path.name.startswith("step_") and int(path.name.split("_")[1]) > keep_step:
            shutil.rmtree(path)
    return dst


def max_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two safetensors files of the same layout."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype for k in wa)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def assert_close_run(work: Path, reference: Path) -> None:
    """Same losses and weights up to the all-reduce order. Tolerance: losses within 1e-6
    relative (measured 7.5e-8), model and EMA weights within 1e-4 absolute (measured 1.2e-5
    after 8 steps): FSDP's reduce-scatter sums the two ranks' gradients in another order than
    one process's backward does, and AdamW's normalisation turns those last-bit differences on
    near-zero gradients into weight differences of this order (a tenth of one lr=1e-3 step)."""
    assert losses(work) == pytest.approx(losses(reference), rel=1e-6)
    for name in WEIGHT_FILES:
        diff = max_diff(checkpoint_dir(work, STEPS) / name, checkpoint_dir(reference, STEPS) / name)
        assert diff < 1e-4, (name, diff)


@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process_with_the_same_global_batch(fsdp_run, single_run):
    work, _ = fsdp_run
    assert_close_run(work, single_run)
    # the optimizer file is the single-process one: same parameter indices, groups and shapes
    a = torch.load(checkpoint_dir(work, STEPS) / "optimizer.pt", weights_only=True)
    b = torch.load(checkpoint_dir(single_run, STEPS) / "optimizer.pt", weights_only=True)
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, values in b["state"].items():
        assert {k: v.shape for k, v in a["state"][index].items()} == {
            k: v.shape for k, v in values.items()
        }
        assert torch.equal(a["state"][index]["step"], values["step"])


def heldout_rows(work: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(r) for r in (work / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: (r["heldout_loss"], r["heldout_loss_ema"]) for r in rows if "heldout_loss" in r
    }


@pytest.mark.slow
def test_fsdp_heldout_loss_equals_one_process(fsdp_run, single_run):
    """Every rank joins each sharded forward (model, then EMA swapped in shard by shard); the
    values match one process up to the weights' all-reduce-order differences."""
    sharded, alone = heldout_rows(fsdp_run[0]), heldout_rows(single_run)
    assert sorted(sharded) == sorted(alone) == [3, 6]
    for step, values in alone.items():
        assert sharded[step] == pytest.approx(values, rel=1e-5)


@pytest.mark.slow
def test_parameters_are_sharded_across_the_ranks(fsdp_run):
    work, stderr = fsdp_run
    line = next(row for row in stderr.splitlines() if "sharded over 2 ranks" in row)
    counts = [tuple(map(int, m)) for m in re.findall(r"rank\d (\d+)/(\d+)", line)]
    assert len(counts) == 2, line
    full = sum(
        t.numel() for t in load_file(str(checkpoint_dir(work, STEPS) / WEIGHT_FILES[0])).values()
    )
    assert all(total == full for _, total in counts), (counts, full)
    assert sum(mine for mine, _ in counts) == full  # each weight lives on exactly one rank
    assert all(mine < 0.6 * full for mine, _ in counts), counts  # about half each


@pytest.mark.slow
def test_fsdp_stop_and_resume_is_exact(fsdp_run, fsdp_stopped_at_3, tmp_path):
    """Bit-exact: a resumed rank gets exactly its slices back (checkpoints hold full tensors,
    re-cut the same way) plus its RNG and sampler state; gloo reduces deterministically."""
    reference, _ = fsdp_run
    work = copy_work(fsdp_stopped_at_3, tmp_path / "w", keep_step=3)
    out = fsdp(work, f"--train.max_steps={STEPS}")
    assert f"resumed from {checkpoint_dir(work, 3)} at step 3" in out.stderr
    assert losses(work) == losses(reference)
    for name in (*WEIGHT_FILES, "optimizer.pt"):
        a = (checkpoint_dir(work, STEPS) / name).read_bytes()
        assert a == (checkpoint_dir(reference, STEPS) / name).read_bytes(), name


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(fsdp_run, fsdp_stopped_at_3, tmp_path):
    reference, _ = fsdp_run
    work = copy_work(fsdp_stopped_at_3, tmp_path / "w", keep_step=3)
    out = single(work, f"--train.max_steps={STEPS}")
    assert "resuming with 1 processes from a checkpoint written by 2" in out.stderr
    assert_close_run(work, reference)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp(fsdp_run, single_run, tmp_path):
    reference, _ = fsdp_run
    work = copy_work(single_run, tmp_path / "w", keep_step=3)
    out = fsdp(work, f"--train.max_steps={STEPS}")
    assert f"resumed from {checkpoint_dir(work, 3)} at step 3" in out.stderr
    assert "resuming with 2 processes from a checkpoint written by 1" in out.stderr
    assert_close_run(work, reference)


@pytest.mark.slow
def test_fsdp_checkpoint_samples_in_one_process(fsdp_run, tmp_path):
    work, _ = fsdp_run
    out = tmp_path / "grid.png"
    for extra in ([], ["--ema"]):
        result = run_sanakit(
            "sample",
            f"--checkpoint={work}",
            "--prompt=a red circle",
            "--steps=2",
            "--num_images=2",
            f"--out={out}",
            *extra,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"loaded {'EMA' if extra else 'model'} weights" in result.stderr
        with Image.open(out) as image:
            assert min(image.size) >= 16


# --------------------------------------------------------------------------------------------
# train.checkpoint_format=sharded: every rank writes its own shards (torch.distributed.checkpoint)
# --------------------------------------------------------------------------------------------
SHARDED = ["--train.checkpoint_format=sharded"]


@pytest.fixture(scope="module")
def sharded_stopped_at_3(tmp_path_factory) -> Path:
    """2 FSDP ranks, sharded checkpoints, stopped at step 3. Tests copy this dir."""
    work = tmp_path_factory.mktemp("sharded3")
    fsdp(work, "--train.max_steps=3", *SHARDED)
    return work


@pytest.mark.slow
def test_sharded_checkpoint_is_sealed_by_its_manifest(sharded_stopped_at_3, tmp_path):
    from sanakit.io.checkpoint import read_manifest, verify_checkpoint
    from sanakit.io.shards import missing_shard_files

    step3 = checkpoint_dir(sharded_stopped_at_3, 3)
    listed = read_manifest(step3)["files"]
    # each rank wrote its own file; DCP's metadata and every shard are hashed like the rest
    assert {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"} <= listed.keys()
    assert not {"model.safetensors", "ema.safetensors", "optimizer.pt"} & listed.keys()
    assert verify_checkpoint(step3) is None
    copy = shutil.copytree(step3, tmp_path / "step_00000003")
    (copy / "shards" / "__1_0.distcp").unlink()  # what rank 0 sees when shards are node-local
    assert missing_shard_files(copy / "shards") == ["__1_0.distcp"]
    assert "missing file shards/__1_0.distcp" in verify_checkpoint(copy)


@pytest.mark.slow
def test_sharded_resume_is_exact_and_consolidates_to_the_full_format(
    fsdp_run, sharded_stopped_at_3, tmp_path
):
    """Resumed from step 3's shards, the run equals the uninterrupted full-format FSDP run bit
    for bit; `checkpoint consolidate` gives the full format's files, and the same images."""
    reference, _ = fsdp_run
    work = copy_work(sharded_stopped_at_3, tmp_path / "w", keep_step=3)
    out = fsdp(work, f"--train.max_steps={STEPS}", *SHARDED)
    assert f"resumed from {checkpoint_dir(work, 3)} at step 3" in out.stderr
    assert losses(work) == losses(reference)
    sharded8 = checkpoint_dir(work, STEPS)
    from sanakit.errors import CheckpointError
    from sanakit.export import export_checkpoint
    from sanakit.inference import load_for_inference, sample_grid
    from sanakit.io.checkpoint import read_manifest, verify_checkpoint
    from sanakit.train.consolidate import consolidate

    for refused in (
        lambda: load_for_inference(sharded8),
        lambda: export_checkpoint(sharded8, tmp_path / "e"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(f"checkpoint consolidate {sharded8}`")):
            refused()  # before any model is built
    full = consolidate(sharded8, tmp_path / "full")  # in process: `sanakit checkpoint` calls it
    assert (
        verify_checkpoint(full) is None and "shards/.metadata" not in read_manifest(full)["files"]
    )
    for name in WEIGHT_FILES:
        assert (full / name).read_bytes() == (checkpoint_dir(reference, STEPS) / name).read_bytes()
    a = torch.load(full / "optimizer.pt", weights_only=True)
    b = torch.load(checkpoint_dir(reference, STEPS) / "optimizer.pt", weights_only=True)
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index, moments in b["state"].items():
        assert list(a["state"][index]) == list(moments)
        assert all(torch.equal(a["state"][index][k], v) for k, v in moments.items())
    grids = [
        sample_grid(
            load_for_inference(path, ema=True, device="cpu"),
            ["a red circle"],
            2,
            cfg_scale=4.5,
            steps=2,
            sampler="flow_euler",
            seed=0,
        )
        for path in (full, checkpoint_dir(reference, STEPS))
    ]
    assert (grids[0] == grids[1]).all()
    with pytest.raises(CheckpointError, match="already exists"):
        consolidate(sharded8, full)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process(fsdp_run, sharded_stopped_at_3, tmp_path):
    """DCP re-cuts the shards: two ranks' files load into one unsharded process."""
    reference, _ = fsdp_run
    work = copy_work(sharded_stopped_at_3, tmp_path / "w", keep_step=3)
    out = single(work, f"--train.max_steps={STEPS}")
    assert "resuming with 1 processes from a checkpoint written by 2" in out.stderr
    assert_close_run(work, reference)


def test_checkpoint_command_is_registered():
    result = run_sanakit("checkpoint", "consolidate")  # no CHECKPOINT: refused before any import
    assert "the following arguments are required: checkpoint" in the_error_line(result)
    assert "consolidate CHECKPOINT [OUT]" in run_sanakit("checkpoint", "--help").stdout


def test_sharded_format_needs_fsdp_over_several_processes():
    from sanakit.config import load_config
    from sanakit.errors import ConfigError
    from sanakit.train.sharded import check_checkpoint_format

    cfg = load_config(None, ["--train.checkpoint_format=sharded", "--train.fsdp=true"])
    check_checkpoint_format(cfg, 2)
    for world, fsdp_flag in ((1, "true"), (2, "false")):
        cfg = load_config(None, SHARDED + [f"--train.fsdp={fsdp_flag}"])
        with pytest.raises(ConfigError, match="checkpoint_format=full"):
            check_checkpoint_format(cfg, world)


@pytest.mark.slow
def test_hostile_shard_metadata_is_refused_without_running_it(sharded_stopped_at_3, tmp_path):
    """DCP unpickles .metadata; ours allows only DCP's record types, and slices in listed files."""
    import pickle

    from sanakit.errors import CheckpointError
    from sanakit.io.checkpoint import seal
    from sanakit.train.consolidate import consolidate

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name, data in (("pickle", pickle.dumps(Payload())), ("garbage", b"\x80\x04junk")):
        copy = shutil.copytree(
            checkpoint_dir(sharded_stopped_at_3, 3), tmp_path / name / "step_00000003"
        )
        (copy / "shards" / ".metadata").write_bytes(data)
        (copy / "manifest.json").unlink()
        seal(copy, 3)  # re-sealed: it verifies, so only the reader stands in the way
        with pytest.raises(CheckpointError, match="unusable shards"):
            consolidate(copy, tmp_path / name / "out")
        assert not marker.exists() and not (tmp_path / name / "out").exists()
