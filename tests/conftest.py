"""Shared test helpers: run the real CLI in a subprocess, fast training settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


@pytest.fixture
def fast() -> list[str]:
    return list(FAST)
