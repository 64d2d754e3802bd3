"""Sana #216 regressions through the CLI: the null embedding can never be the reason a run dies.

Each case starts from an empty work_dir and runs the real `sanakit train` in a subprocess.
"""

from __future__ import annotations

import shutil
import subprocess
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

NULL_NAME = "null_embed_diffusers_minilm_8token_384.pth"  # FAST uses max_length 8
SANA_216 = [
    "--debug",
    "--train.visualize=false",
    "--train.validation_prompts=[]",
    "--train.save_model_steps=2",
]


def train(work: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_sanakit("train", f"--work_dir={work}", *FAST, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """(a)'s first half: the exact Sana #216 command, 4 steps, from an empty work_dir."""
    work = tmp_path_factory.mktemp("sana216") / "work"
    out = train(work, *SANA_216, "--train.max_steps=4")
    assert "built null embedding" in out.stderr
    assert (work / "pretrained_models" / NULL_NAME).is_file()
    return work


def resume_copy(first_run: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(first_run, work)
    return work


@pytest.mark.slow
def test_a_debug_without_visualize_resumes(first_run, tmp_path):
    work = resume_copy(first_run, tmp_path)
    out = train(work, *SANA_216, "--train.max_steps=6")
    assert f"resumed from {checkpoint_dir(work, 4)}" in out.stderr
    assert "loaded null embedding" in out.stderr
    assert len(losses(work)) == 6
    # --debug turned tensorboard on: the caption-dropout rate actually applied is a scalar there
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "logs"))
    events.Reload()
    rates = [e.value for e in events.Scalars("train/caption_dropout_rate")]
    assert len(rates) == 6 and all(0.0 <= r <= 1.0 for r in rates)
    assert any(t.startswith("loss_by_sigma/") for t in events.Tags()["scalars"])


@pytest.mark.slow
def test_b_external_file_deleted_between_runs(first_run, tmp_path):
    work = resume_copy(first_run, tmp_path)
    (work / "pretrained_models" / NULL_NAME).unlink()
    out = train(work, *SANA_216, "--train.max_steps=6")
    assert "built null embedding" in out.stderr
    assert f"resumed from {checkpoint_dir(work, 4)}" in out.stderr
    assert (work / "pretrained_models" / NULL_NAME).is_file()


@pytest.mark.slow
def test_c_external_file_truncated(first_run, tmp_path):
    work = resume_copy(first_run, tmp_path)
    path = work / "pretrained_models" / NULL_NAME
    path.write_bytes(path.read_bytes()[:64])
    out = train(work, *SANA_216, "--train.max_steps=6")
    warnings = [line for line in out.stderr.splitlines() if "is invalid" in line]
    assert len(warnings) == 1
    assert f"null embedding at {path} is invalid: unreadable" in warnings[0]
    assert warnings[0].endswith("; rebuilding")
    assert torch.load(path, weights_only=True)["uncond_prompt_embeds"].shape == (1, 8, 384)


@pytest.mark.slow
def test_d_external_file_from_another_max_length(first_run, tmp_path):
    work = resume_copy(first_run, tmp_path)
    path = work / "pretrained_models" / NULL_NAME
    other = torch.load(path, weights_only=True)
    other["uncond_prompt_embeds"] = torch.zeros(1, 16, 384)
    other["uncond_prompt_embeds_mask"] = torch.ones(1, 16, dtype=torch.long)
    torch.save(other, path)
    out = train(work, *SANA_216, "--train.max_steps=6")
    assert "is invalid: embeds shape (1, 16, 384) != (1, 8, 384); rebuilding" in out.stderr
    assert len(losses(work)) == 6


@pytest.mark.slow
def test_checkpoint_from_another_encoder_length_stops_with_both_provenances(first_run, tmp_path):
    work = resume_copy(first_run, tmp_path)
    result = run_sanakit(
        "train",
        f"--work_dir={work}",
        *FAST,
        *SANA_216,
        "--train.max_steps=6",
        "--text_encoder.max_length=12",
    )
    assert result.returncode == 2
    error = the_error_line(result)
    assert "max_length=8" in error and "max_length=12" in error


@pytest.mark.slow
def test_debug_run_writes_the_same_artifacts_as_a_normal_run(first_run, tmp_path):
    """--debug changes observability only: same null embedding, same checkpoints, same weights."""
    normal = tmp_path / "normal"
    train(normal, "--train.visualize=false", "--train.save_model_steps=2", "--train.max_steps=4")

    def files(work: Path) -> set[str]:
        skip = ("logs/", "train.log", "config.yaml", "metrics.jsonl")
        return {
            p.relative_to(work).as_posix()
            for p in work.rglob("*")
            if p.is_file()
            and not p.relative_to(work).as_posix().startswith(skip)
            and not p.name.endswith(".lock")
        }

    assert files(normal) == files(first_run)
    # same tensors (the provenance records a creation time and pid, so bytes may differ)
    ours = torch.load(normal / "pretrained_models" / NULL_NAME, weights_only=True)
    theirs = torch.load(first_run / "pretrained_models" / NULL_NAME, weights_only=True)
    for key in ("uncond_prompt_embeds", "uncond_prompt_embeds_mask"):
        assert torch.equal(ours[key], theirs[key])
    for name in ("model.safetensors", "ema.safetensors", "null_embed.pth"):
        a = (checkpoint_dir(normal, 4) / name).read_bytes()
        b = (checkpoint_dir(first_run, 4) / name).read_bytes()
        assert a == b, name
    assert losses(normal) == losses(first_run)


@pytest.mark.slow
def test_e_two_processes_on_a_fresh_work_dir_build_it_once(tmp_path):
    work = tmp_path / "work"
    result = run_launched(
        TORCHRUN, "train", f"--work_dir={work}", *FAST, *SANA_216, "--train.max_steps=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("built null embedding") == 1
    null_files = list((work / "pretrained_models").glob("null_embed_*.pth"))
    assert [p.name for p in null_files] == [NULL_NAME]
    assert sorted(p.name for p in checkpoint_dir(work, 2).glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
