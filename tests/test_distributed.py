"""Multi-process training on CPU (torchrun, gloo, one thread per rank)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import (
    FAST,
    TORCHRUN,
    checkpoint_dir,
    cli_env,
    losses,
    run_launched,
    run_sanakit,
    start_sanakit,
    the_error_line,
    wait_for_steps,
)
from safetensors.torch import load_file

from sanakit.io.checkpoint import find_latest, verify_checkpoint

BASE = [*FAST, "--data.max_samples=48", "--train.ema_rate=0.9"]  # 6 global batches of 8


def torchrun(work: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_launched(TORCHRUN, "train", f"--work_dir={work}", *BASE, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_process(work: Path, *extra: str) -> subprocess.CompletedProcess:
    """1 process x batch 8: the same global batch as 2 ranks x 4."""
    result = run_sanakit("train", f"--work_dir={work}", *BASE, "--train.train_batch_size=8", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """2 ranks x batch 4, 8 steps uninterrupted (crosses an epoch: 6 steps per epoch)."""
    work = tmp_path_factory.mktemp("ddp")
    torchrun(work, "--train.train_batch_size=4", "--train.max_steps=8")
    return work


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_ranks, tmp_path):
    """Same samples, sigmas, noise and dropout per global batch; only the all-reduce order
    differs. Tolerance: losses within 1e-6 relative; weights within 1e-4 absolute, a tenth of
    one AdamW step at lr 1e-3 (Adam's normalisation turns last-bit gradient differences on
    near-zero gradients into differences of that order; measured 3e-5 after 8 steps)."""
    one_process(tmp_path, "--train.max_steps=8")
    assert losses(tmp_path) == pytest.approx(losses(two_ranks), rel=1e-6)
    diff = max_weight_diff(
        checkpoint_dir(tmp_path, 8) / "model.safetensors",
        checkpoint_dir(two_ranks, 8) / "model.safetensors",
    )
    assert diff < 1e-4, diff


@pytest.mark.slow
def test_two_rank_stop_and_resume_is_exact(two_ranks, tmp_path):
    torchrun(tmp_path, "--train.train_batch_size=4", "--train.max_steps=3")
    out = torchrun(tmp_path, "--train.train_batch_size=4", "--train.max_steps=8")
    assert "resumed from" in out.stderr
    assert losses(tmp_path) == losses(two_ranks)
    assert (
        max_weight_diff(
            checkpoint_dir(tmp_path, 8) / "model.safetensors",
            checkpoint_dir(two_ranks, 8) / "model.safetensors",
        )
        == 0.0
    )
    ckpt = checkpoint_dir(tmp_path, 8)
    assert {p.name for p in ckpt.glob("sampler_rank*.json")} == {
        "sampler_rank0.json",
        "sampler_rank1.json",
    }


@pytest.mark.slow
def test_resume_on_one_rank_with_the_same_global_batch_reshards(two_ranks, tmp_path):
    torchrun(tmp_path, "--train.train_batch_size=4", "--train.max_steps=3")
    result = one_process(tmp_path, "--train.max_steps=8")
    assert "resuming with 1 processes from a checkpoint written by 2" in result.stderr
    assert losses(tmp_path) == pytest.approx(losses(two_ranks), rel=1e-6)


@pytest.mark.slow
def test_resume_with_another_global_batch_stops_with_one_line(two_ranks, tmp_path):
    torchrun(tmp_path, "--train.train_batch_size=4", "--train.max_steps=2")
    result = run_sanakit(
        "train",
        f"--work_dir={tmp_path}",
        *BASE,
        "--train.train_batch_size=4",
        "--train.max_steps=4",
    )
    assert result.returncode == 2
    assert "global batch" in the_error_line(result)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_all_ranks_at_one_step(tmp_path):
    proc = start_sanakit(
        "train",
        f"--work_dir={tmp_path}",
        *BASE,
        "--train.train_batch_size=4",
        "--train.max_steps=100000",
        "--train.save_model_steps=100000",
        launcher=TORCHRUN,
    )
    wait_for_steps(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    # torchrun itself reports the signal with a non-zero code; our ranks exit cleanly
    assert stdout.count("stopped by SIGTERM at step") == 1, stdout
    latest, skipped = find_latest(tmp_path / "checkpoints")
    assert latest is not None and skipped == [] and verify_checkpoint(latest) is None
    step = int(latest.name.split("_")[1])
    assert len(losses(tmp_path)) == step
    samplers = [(latest / f"sampler_rank{r}.json").read_text() for r in (0, 1)]
    assert samplers[0] == samplers[1]  # one consistent position: both ranks stopped together


@pytest.mark.slow
def test_concurrent_builders_share_one_null_embedding_build(tmp_path):
    """Two unrelated processes (no barrier, e.g. two runs sharing null_embed_root) race for the
    same artifact: the file lock makes exactly one build and the other load a complete file."""
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from pathlib import Path
        from sanakit.io.artifacts import Artifact, get_or_build
        def build():
            time.sleep(1.0)  # a slow builder widens the race window
            return {{"x": torch.arange(1000.0)}}
        got = get_or_build(Artifact(Path({str(tmp_path)!r}) / "a.pth", {{"k": 1}}, build))
        assert torch.equal(got.tensors["x"], torch.arange(1000.0))
        print(got.status)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=cli_env()
        )
        for _ in range(2)
    ]
    statuses = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert statuses == ["built", "loaded"]


@pytest.mark.slow
def test_a_rank_whose_whole_share_is_unreadable_keeps_step_with_the_others(tmp_path):
    """Batch 1 per rank and a corrupt image: some rank gets nothing readable for a micro-batch.
    It must still take part in the gradient all-reduce (zero-weight stand-in). Skipping it
    instead silently paired gradients of different batches and left the ranks an epoch apart
    (seen: sampler positions epoch 1 / batch 3 vs epoch 2 / batch 2)."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (40 * i, 200, 30)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a picture number {i}")
    (root / "bad.png").write_bytes(b"\x89PNG broken")
    (root / "bad.txt").write_text("a broken picture")
    result = run_launched(
        TORCHRUN,
        "train",
        f"--work_dir={tmp_path / 'w'}",
        *FAST,
        "--data.type=image_folder",
        f"--data.data_dir=[{root}]",
        "--train.train_batch_size=1",
        "--train.max_steps=6",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unreadable" in result.stderr
    assert len(losses(tmp_path / "w")) == 6
    final = checkpoint_dir(tmp_path / "w", 6)
    positions = [(final / f"sampler_rank{r}.json").read_text() for r in (0, 1)]
    assert positions[0] == positions[1]  # both ranks consumed the same global batches
