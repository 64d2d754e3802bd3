"""The full-size benchmark and the GPU check in their dry modes: every phase runs (tiny models),
the JSON they promise comes out, and the full-size plan has the published model sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_runs_full_size_phases_and_writes_one_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", str(out)],
        capture_output=True,
        text=True,
        env=cli_env(PYTHON=sys.executable),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == result
    assert result["dry"] is True
    full = result["full_size"]
    # each phase ran: steps were timed with and without checkpointing, memory was measured
    assert full["s_per_step"] > 0 and full["s_per_step_checkpointing"] > 0
    assert result["full_size_s_per_step"] == full["s_per_step"]
    assert set(full["phase_peak_rss_gb"]) == {"make", "cache", "train", "train_checkpointing"}
    assert full["peak_rss_gb"] == max(full["phase_peak_rss_gb"].values())
    assert full["estimate_vs_measured"] > 0
    # the full-size plan: Gemma-2-2b, DC-AE f32c32 and Sana-600M at their published sizes
    plan = full["full_size_plan"]
    assert abs(plan["params"]["gemma"] / 2.614e9 - 1) < 0.01
    assert abs(plan["params"]["dcae"] / 312.25e6 - 1) < 0.01
    assert abs(plan["params"]["transformer"] / 591.7e6 - 1) < 0.01
    assert plan["downsample_factor"] == 32
    # checkpointing saves activations; releasing the encoders saves them during the steps
    ckpt, plain = plan["estimate_checkpointing"], plan["estimate"]
    assert ckpt["if_encoders_kept_bytes"] < plain["if_encoders_kept_bytes"]
    assert plain["bytes"] < plain["if_encoders_kept_bytes"]


def test_gpu_check_refuses_an_unknown_option() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown option --fast; use --dry and/or an output path"
