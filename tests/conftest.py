"""Shared test helpers: run the real CLI in a subprocess, fast training settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import conftest helpers

# A tiny, fast training setup that still goes through every part of the real loop.
FAST = [
    "--model.image_size=16",
    "--model.num_layers=1",
    "--model.num_attention_heads=2",
    "--model.num_cross_attention_heads=2",
    "--model.attention_head_dim=16",
    "--model.cross_attention_head_dim=16",
    "--text_encoder.max_length=8",
    "--train.train_batch_size=4",
    "--train.visualize=false",
    "--train.log_interval=1",
    "--train.warmup_steps=2",
    "--report_to=none",
]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_sanakit(
    *args: str, env: dict | None = None, timeout: float = 300, cwd: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sanakit", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        cwd=cwd,
    )


def losses(work_dir: Path) -> list[float]:
    rows = [json.loads(r) for r in (Path(work_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def checkpoint_dir(work_dir: Path, step: int) -> Path:
    return Path(work_dir) / "checkpoints" / f"step_{step:08d}"


# FAST but with the default text_encoder.max_length (16), for tests that change it later
TINY = [a for a in FAST if not a.startswith("--text_encoder.max_length")]
CKPT = "checkpoints/step_00000002"


@pytest.fixture(scope="session")
def tiny_work_dir(tmp_path_factory) -> Path:
    """A real 2-step TINY run, made once per test worker (bad-input and doctor tests)."""
    from sanakit.io.checkpoint import verify_checkpoint

    work = tmp_path_factory.getbasetemp() / "tiny_run_len16"
    if verify_checkpoint(work / CKPT) is None:
        return work
    shutil.rmtree(work, ignore_errors=True)
    done = run_sanakit("train", f"--work_dir={work}", "--train.max_steps=2", *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert verify_checkpoint(work / CKPT) is None
    return work


@pytest.fixture
def fast() -> list[str]:
    return list(FAST)


# torchrun with two CPU ranks on a free port
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_launched(launcher: list[str], *args: str, timeout: float = 300):
    """``sanakit ARGS`` under a launcher (torchrun, accelerate launch)."""
    return subprocess.run(
        [*launcher, "-m", "sanakit", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def start_sanakit(
    *args: str, launcher: list[str] | None = None, output: Path | None = None
) -> subprocess.Popen:
    """A running ``sanakit ARGS`` (plain or under a launcher) whose output is captured.

    Captured in pipes that only ``communicate()`` drains: a run nobody reads for long (one log
    line per step) fills the pipe and blocks in ``write``, so such tests pass ``output``, a file
    that takes stdout and stderr instead.
    """
    prefix = [*launcher, "-m", "sanakit"] if launcher else [sys.executable, "-m", "sanakit"]
    if output is not None:
        with open(output, "ab") as sink:  # the child keeps its own descriptor
            return subprocess.Popen([*prefix, *args], stdout=sink, stderr=sink, env=cli_env())
    return subprocess.Popen(
        [*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )


def wait_for_steps(proc: subprocess.Popen, work_dir: Path, steps: int, timeout: float = 120):
    """Block until ``metrics.jsonl`` shows ``steps`` optimizer steps (needs log_interval=1)."""
    metrics = Path(work_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, f"no {steps} steps within {timeout} s"
        time.sleep(0.05)


def the_error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line a refused command prints (and no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    return errors[0]
