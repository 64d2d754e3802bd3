"""Crash-safe checkpoints and exact resume, through the real CLI in subprocesses."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import slow_write
from conftest import (
    FAST,
    checkpoint_dir,
    cli_env,
    losses,
    run_sanakit,
    start_sanakit,
    the_error_line,
    wait_for_steps,
)

from sanakit.io.checkpoint import find_latest, verify_checkpoint

# accumulation 2 x batch 4 over 40 samples: 5 optimizer steps per epoch, so 12 steps cross
# two epoch boundaries; EMA on.
RESUME = [
    *FAST,
    "--train.gradient_accumulation_steps=2",
    "--data.max_samples=40",
    "--train.ema_rate=0.9",
    "--train.save_model_steps=100",
]
STEPS = 12


def train(work_dir: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    result = run_sanakit("train", f"--work_dir={work_dir}", *RESUME, *extra, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run of STEPS steps."""
    work = tmp_path_factory.mktemp("reference")
    train(work, f"--train.max_steps={STEPS}")
    return work


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("k", [3, 5, 8])
def test_stop_at_k_and_resume_is_bit_identical(reference, tmp_path, k):
    """k=3 and 8 stop mid-epoch; k=5 exactly at an epoch boundary."""
    train(tmp_path, f"--train.max_steps={k}")
    assert checkpoint_dir(tmp_path, k).is_dir()
    out = train(tmp_path, f"--train.max_steps={STEPS}")
    assert f"resumed from {checkpoint_dir(tmp_path, k)} at step {k}" in out.stderr
    assert losses(tmp_path) == losses(reference)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt"):
        assert same_bytes(
            checkpoint_dir(tmp_path, STEPS) / name, checkpoint_dir(reference, STEPS) / name
        ), name


@pytest.mark.slow
def test_truncated_file_in_newest_checkpoint_falls_back_with_a_warning(reference, tmp_path):
    work = tmp_path / "w"
    train(work, "--train.max_steps=4", "--train.save_model_steps=2")
    newest = checkpoint_dir(work, 4)
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    out = train(work, f"--train.max_steps={STEPS}", "--train.save_model_steps=2")
    assert f"skipping checkpoint {newest}" in out.stderr
    assert f"resumed from {checkpoint_dir(work, 2)} at step 2" in out.stderr
    assert losses(work) == losses(reference)
    # the damaged checkpoint was never silently deleted: it is kept aside for the user
    kept = [p for p in (work / "checkpoints").iterdir() if p.name.startswith("step_00000004")]
    assert any("corrupt" in p.name for p in kept), kept


@pytest.mark.slow
def test_explicit_resume_from_a_corrupt_checkpoint_is_an_error(tmp_path):
    train(tmp_path, "--train.max_steps=2", "--train.save_model_steps=2")
    ckpt = checkpoint_dir(tmp_path, 2)
    (ckpt / "optimizer.pt").write_bytes(b"")
    result = run_sanakit("train", f"--work_dir={tmp_path}", *RESUME, f"--resume_from={ckpt}")
    assert result.returncode == 2
    assert str(ckpt) in the_error_line(result)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    proc = start_sanakit("train", f"--work_dir={tmp_path}", *RESUME, "--train.max_steps=100000")
    wait_for_steps(proc, tmp_path, 3)  # real training progress, not just start-up
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    line = [x for x in stdout.splitlines() if x.startswith("stopped by SIGTERM")]
    assert len(line) == 1, stdout
    latest, skipped = find_latest(tmp_path / "checkpoints")
    assert latest is not None and skipped == []
    step = int(latest.name.split("_")[1])
    assert f"at step {step}; checkpoint: {latest}" in line[0]
    assert len(losses(tmp_path)) == step


@pytest.mark.slow
def test_kill_9_loop_then_the_final_run_equals_an_uninterrupted_one(tmp_path):
    """At least 10 SIGKILLs at random moments, many inside checkpoint writes (slowed down by
    tests/slow_write.py, which delays every fsync), then one run to the end."""
    steps = 16
    extra = [f"--train.max_steps={steps}", "--train.save_model_steps=1"]
    reference = tmp_path / "reference"
    train(reference, *extra)
    work = tmp_path / "killed"
    env = cli_env()
    rng = random.Random(1234)
    kills = 0
    progress = []
    while kills < 10:
        proc = subprocess.Popen(
            slow_write.command(0.03, "train", f"--work_dir={work}", *RESUME, *extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        # start-up takes a few seconds; kill somewhere in start-up, training or a save
        time.sleep(rng.uniform(2.0, 9.0))
        if proc.poll() is not None:
            break  # finished before we could kill it: fine, the final run below checks
        proc.kill()
        proc.wait()
        kills += 1
        latest, _ = find_latest(work / "checkpoints")
        if latest is not None:
            assert verify_checkpoint(latest) is None
        progress.append(latest.name if latest else None)
    assert kills >= 10 or progress, progress
    out = train(work, *extra, env=env)
    assert "Traceback" not in out.stderr
    assert losses(work) == losses(reference)
    assert same_bytes(
        checkpoint_dir(work, steps) / "model.safetensors",
        checkpoint_dir(reference, steps) / "model.safetensors",
    )
    assert same_bytes(
        checkpoint_dir(work, steps) / "ema.safetensors",
        checkpoint_dir(reference, steps) / "ema.safetensors",
    )
    leftovers = [p.name for p in (work / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


@pytest.mark.slow
def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    train(
        tmp_path,
        "--train.max_steps=6",
        "--train.save_model_steps=1",
        "--train.checkpoints_total_limit=2",
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000005", "step_00000006"]


@pytest.mark.slow
def test_copying_a_work_dir_elsewhere_still_resumes(reference, tmp_path):
    """Checkpoints carry everything: config, null embedding, RNG — nothing outside is needed."""
    work = tmp_path / "moved"
    shutil.copytree(reference, work)
    shutil.rmtree(work / "pretrained_models")
    out = train(work, f"--train.max_steps={STEPS + 2}")
    assert f"at step {STEPS}" in out.stderr
    assert len(losses(work)) == STEPS + 2
