"""A run whose loss stops being finite stops with one line and never saves the poisoned state
(issue 16, item 10: `--train.lr=.inf` used to write NaN checkpoints and exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, run_sanakit
from safetensors.torch import load_file

from sanakit.io.checkpoint import list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.slow


def test_a_nan_loss_stops_the_run_and_keeps_only_finite_checkpoints(tmp_path: Path) -> None:
    work = tmp_path / "w"
    # an absurd but finite learning rate: the first update blows the weights up, the second
    # step's loss is NaN
    args = [*FAST, "--train.warmup_steps=0", "--train.lr=1e30", "--train.save_model_steps=1"]
    result = run_sanakit("train", f"--work_dir={work}", "--train.max_steps=6", *args)
    assert result.returncode != 0
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "loss became nan at step 2" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    saved = list_checkpoints(work / "checkpoints")
    assert [p.name for p in saved] == ["step_00000001"]  # nothing at or after the NaN step
    for path in saved:
        assert verify_checkpoint(path) is None
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(path / name).values())
