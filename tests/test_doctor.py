"""`sanakit doctor`, train's preflight, and `sanakit train --dry_run`.

The default config must pass quickly and leave no trace; each FAIL kind is provoked for real
(missing files, a truncated checkpoint, a changed encoder, a different process count, sizes that
cannot fit) and must name what is wrong; the dry run must show bit-equal losses on the CPU
without touching the user's work_dir.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CKPT, TINY, cli_env, run_sanakit

from sanakit.cli import main
from sanakit.config import load_config
from sanakit.doctor import preflight
from sanakit.errors import CheckpointError
from sanakit.io.atomic import free_bytes
from sanakit.train.dry_run import DryRunResult, format_report
from sanakit.train.resume import find_resume, resolve_resume

LINE = re.compile(r"^(PASS|WARN|FAIL) [a-z_]+: \S.*$")
ALL_CHECKS = [
    "config",
    "work_dir",
    "cache",
    "data",
    "text_encoder",
    "autoencoder",
    "model",
    "pretrained",
    "disk",
    "memory",
    "null_embedding",
    "resume",
    "checkpoint_model",
    "base_model",
    "null_embed_provenance",
    "distributed",
    "precision",
    "nodes",
]


@pytest.fixture
def work(tiny_work_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run's work_dir (cases may damage it)."""
    wd = tmp_path / "work"
    shutil.copytree(tiny_work_dir, wd)
    return wd


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def doctor(capsys, *args: str) -> tuple[int, dict[str, str]]:
    """Run `sanakit doctor` in this process; (exit code, {check name: its line})."""
    capsys.readouterr()
    logger = logging.getLogger("sanakit")
    before = list(logger.handlers)
    try:
        code = main(["doctor", *args])
    finally:
        # main() attaches a console handler to this test's captured stderr: detach it
        for handler in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(handler)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert all(LINE.match(ln) for ln in lines), out
    return code, {ln.split()[1].rstrip(":"): ln for ln in lines}


def failing(lines: dict[str, str]) -> dict[str, str]:
    return {name: ln for name, ln in lines.items() if ln.startswith("FAIL")}


# ---- the default config -------------------------------------------------------------------------


@pytest.mark.slow
def test_doctor_passes_on_the_default_config_quickly_and_leaves_no_trace(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_sanakit("doctor", cwd=str(tmp_path))  # default work_dir work/shapes, below cwd
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(LINE.match(ln) and not ln.startswith("FAIL") for ln in lines), done.stdout
    assert [ln.split()[1].rstrip(":") for ln in lines] == ALL_CHECKS
    assert "Traceback" not in done.stderr
    assert seconds < 30, f"doctor took {seconds:.1f} s"
    assert list(tmp_path.iterdir()) == [], "doctor must not create work_dir or anything else"
    print(f"doctor on the default config: {seconds:.1f} s\n{done.stdout}")


@pytest.mark.slow
def test_doctor_on_a_real_checkpoint_passes_and_writes_nothing(work: Path, capsys) -> None:
    before = snapshot(work)
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY)
    assert code == 0, lines
    assert "will resume from" in lines["resume"] and "step 2, verified" in lines["resume"]
    assert lines["null_embed_provenance"].startswith("PASS")
    assert lines["distributed"].startswith("PASS") and "global batch 4" in lines["distributed"]
    assert lines["null_embedding"].startswith("PASS") and "is valid" in lines["null_embedding"]
    assert snapshot(work) == before  # same files, same bytes: no lock, probe or temp file left


# ---- each FAIL kind ---------------------------------------------------------------------------


def test_fail_missing_data_root(tmp_path: Path, capsys) -> None:
    root = tmp_path / "no_such_data"
    code, lines = doctor(
        capsys,
        f"--work_dir={tmp_path}/w",
        *TINY,
        "--data.type=image_folder",
        f"--data.data_dir=[{root}]",
    )
    assert code == 1
    assert list(failing(lines)) == ["data"] and str(root) in lines["data"]


def test_fail_images_that_do_not_decode(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"not a png at all" * 8)
        (data / f"{i}.txt").write_text(f"caption {i}")
    (data / "3.png").write_bytes(b"\x89PNG no caption")  # indexed out: no caption
    code, lines = doctor(
        capsys, f"--work_dir={tmp_path}/w", *TINY, "--data.type=image_folder",
        f"--data.data_dir=[{data}]",
    )  # fmt: skip
    assert code == 1
    line = lines["data"]
    assert line.startswith("FAIL") and "3 samples" in line and "0/3 sampled images decode" in line
    assert "caption coverage 75.0%" in line and "1 missing caption" in line


def test_fail_uncreatable_work_dir(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("a regular file: nothing can be created below it, even as root")
    code, lines = doctor(capsys, f"--work_dir={afile}/sub", *TINY)
    assert code == 1
    assert list(failing(lines)) == ["work_dir"] and f"{afile}/sub" in lines["work_dir"]
    assert afile.read_text().startswith("a regular file")


def test_fail_unwritable_null_embed_root(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, lines = doctor(
        capsys, f"--work_dir={tmp_path}/w", *TINY, f"--train.null_embed_root={afile}/null"
    )
    assert code == 1
    assert list(failing(lines)) == ["null_embedding"]
    assert f"{afile}/null" in lines["null_embedding"]


@pytest.mark.slow
def test_fail_corrupt_resume_target(work: Path, capsys) -> None:
    model = work / CKPT / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # a torn write
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY, f"--resume_from={work / CKPT}")
    assert code == 1
    assert list(failing(lines)) == ["resume"]
    assert str(work / CKPT) in lines["resume"] and "model.safetensors" in lines["resume"]
    # with resume_from=latest the same damage is a WARN: train would skip it and start fresh
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY)
    assert code == 0 and lines["resume"].startswith("WARN") and "starts fresh" in lines["resume"]


@pytest.mark.slow
def test_fail_encoder_changed_since_the_checkpoint(work: Path, capsys) -> None:
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY, "--text_encoder.max_length=8")
    assert code == 1
    line = lines["null_embed_provenance"]
    assert list(failing(lines)) == ["null_embed_provenance"]
    assert "max_length: checkpoint 16, now 8" in line and "--text_encoder.max_length=16" in line
    # allowed explicitly: a WARN, and the doctor passes
    code, lines = doctor(
        capsys,
        f"--work_dir={work}",
        *TINY,
        "--text_encoder.max_length=8",
        "--train.allow_encoder_change=true",
    )
    assert code == 0 and lines["null_embed_provenance"].startswith("WARN")


@pytest.mark.slow
def test_fail_world_size_changes_the_global_batch(work: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY)
    assert code == 1
    line = lines["distributed"]
    assert list(failing(lines)) == ["distributed"]
    assert "global batch 4" in line and "global batch 8" in line
    assert "--train.train_batch_size=2" in line  # the fix keeps the global batch
    # the suggested fix is consistent: 2 processes x 2 = the checkpoint's global batch of 4
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY, "--train.train_batch_size=2")
    assert code == 0 and lines["distributed"].startswith("WARN")


@pytest.mark.slow
def test_fail_model_settings_differ_from_the_checkpoint(work: Path, capsys) -> None:
    code, lines = doctor(capsys, f"--work_dir={work}", *TINY, "--model.num_layers=2")
    assert code == 1
    assert list(failing(lines)) == ["checkpoint_model"]
    assert "model.num_layers: checkpoint 1, now 2" in lines["checkpoint_model"]


def test_fail_models_that_do_not_load(tmp_path: Path, capsys) -> None:
    missing_vae = tmp_path / "no_vae"
    code, lines = doctor(
        capsys,
        f"--work_dir={tmp_path}/w",
        *TINY,
        "--model.image_size=32",
        "--vae.type=dc-ae",
        f"--vae.name_or_path={missing_vae}",
    )
    assert code == 1 and list(failing(lines)) == ["autoencoder"]
    assert str(missing_vae) in lines["autoencoder"]
    # what needs the autoencoder says so instead of failing a second time
    assert lines["disk"].startswith("WARN disk: not checked: the autoencoder is not available")
    missing_t5 = tmp_path / "no_t5"
    code, lines = doctor(
        capsys,
        f"--work_dir={tmp_path}/w",
        *TINY,
        "--text_encoder.type=t5",
        f"--text_encoder.name_or_path={missing_t5}",
    )
    assert code == 1 and list(failing(lines)) == ["text_encoder"]
    assert str(missing_t5) in lines["text_encoder"]


def test_fail_memory_and_disk_estimates(tmp_path: Path, capsys) -> None:
    # memory: a batch whose activations alone need terabytes
    code, lines = doctor(capsys, f"--work_dir={tmp_path}/w", "--train.train_batch_size=200000")
    assert code == 1 and list(failing(lines)) == ["memory"]
    assert "batch 200000" in lines["memory"] and "train_batch_size" in lines["memory"]
    # disk: a model whose single checkpoint exceeds the free space (Sana-1.6B-wide layers,
    # ~78M parameters each, 16 bytes per parameter in a checkpoint; built on the meta device)
    layers = math.ceil(free_bytes(tmp_path) / (16 * 75e6)) + 4
    if layers > 3000:
        pytest.skip(f"{free_bytes(tmp_path) / 1e12:.1f} TB free: too much to provoke cheaply")
    code, lines = doctor(
        capsys,
        f"--work_dir={tmp_path}/w",
        f"--model.num_layers={layers}",
        "--model.num_attention_heads=70",
        "--model.num_cross_attention_heads=20",
        "--model.cross_attention_head_dim=112",
    )
    assert code == 1 and lines["disk"].startswith("FAIL") and "room for 0" in lines["disk"]


def test_fail_config_that_does_not_resolve(capsys) -> None:
    code, lines = doctor(capsys, "--train.lr=fast")
    assert code == 1 and list(lines) == ["config"] and "train.lr" in lines["config"]


# ---- train's preflight --------------------------------------------------------------------------


@pytest.mark.slow
def test_train_preflight_prints_doctor_lines_and_refuses_on_a_fail(work: Path, capsys) -> None:
    cfg = load_config(None, [f"--work_dir={work}", *TINY])
    checks = preflight(cfg)
    out = capsys.readouterr().out.splitlines()
    assert out == [c.line() for c in checks] and all(LINE.match(ln) for ln in out)
    assert [c.name for c in checks] == [
        "work_dir", "null_embed_root", "cache", "data", "resume", "checkpoint_model",
        "base_model", "distributed", "precision",
    ]  # fmt: skip
    assert "sizes checked" in out[4]  # the preflight never hashes a multi-GB checkpoint
    # the same failure doctor reports stops train before any model loads, as one error line
    done = run_sanakit("train", f"--work_dir={work}", *TINY, "--model.num_layers=2")
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: FAIL checkpoint_model: ")
    assert "model.num_layers: checkpoint 1, now 2" in errors[0]


# ---- the one resume resolver (doctor reads, train recovers) --------------------------------------


def test_one_resume_resolver_doctor_reads_train_recovers(work: Path, caplog) -> None:
    d = work / "checkpoints"
    ck = d / "step_00000002"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    # a re-save killed between its two renames: only the old copy of step 2 is left
    old = d / f".step_00000002.old-{int(gone.stdout)}-0badc0de"
    ck.rename(old)
    torn = d / "step_00000004"  # and a newer checkpoint that does not verify
    shutil.copytree(old, torn)
    cfg = load_config(None, [f"--work_dir={work}", *TINY])
    before = snapshot(work)
    found = find_resume(cfg)
    assert found.path == old and found.restores and not found.explicit
    assert [p for p, _ in found.skipped] == [torn] and "step 2" in found.skipped[0][1]
    assert snapshot(work) == before and old.is_dir()  # read-only
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        assert resolve_resume(cfg) == ck  # the trainer renames the old copy back first
    assert not old.exists() and ck.is_dir()
    skips = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert skips == [f"skipping checkpoint {torn}: {found.skipped[0][1]} (left on disk)"]
    missing = work / "no_such_checkpoint"
    bad = load_config(None, [f"--work_dir={work}", *TINY, f"--resume_from={missing}"])
    assert find_resume(bad).explicit and find_resume(bad).error
    with pytest.raises(CheckpointError, match=f"resume_from={missing} is not a usable checkpoint"):
        resolve_resume(bad)


# ---- the dry run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_on_the_default_config(tmp_path: Path) -> None:
    user_dir = tmp_path / "user_work"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    started = time.monotonic()
    done = run_sanakit(
        "train", "--dry_run", f"--work_dir={user_dir}", env=cli_env(TMPDIR=str(scratch))
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert "losses bit-equal: yes" in done.stdout
    rows = [ln.split() for ln in done.stdout.splitlines() if re.match(r"^\s+[123]\s", ln)]
    assert [r[0] for r in rows] == ["1", "2", "3"] and all(r[1] == r[2] for r in rows)
    assert not user_dir.exists(), "a dry run must not touch the user's work_dir"
    assert list(scratch.iterdir()) == [], "temporary files must be removed"
    print(f"dry run on the default config: {seconds:.1f} s\n{done.stdout}")


@pytest.mark.slow
def test_dry_run_override_form_and_single_process_only(tmp_path: Path) -> None:
    done = run_sanakit(
        "train",
        "--train.dry_run=true",
        f"--work_dir={tmp_path}/w",
        env=cli_env(WORLD_SIZE="2"),
    )
    assert done.returncode == 2 and "WORLD_SIZE=2" in done.stderr
    assert not (tmp_path / "w").exists()


def test_dry_run_report_flags_a_mismatch() -> None:
    same = DryRunResult([1.0, 0.5, 0.25], [1.0, 0.5, 0.25], Path("step_00000002"), 10, {}, True)
    assert same.equal and "losses bit-equal: yes" in format_report(same, 1.0)
    off = DryRunResult([1.0, 0.5, 0.25], [1.0, 0.5, 0.25000001], Path("x"), 10, {}, True)
    report = format_report(off, 1.0)
    assert not off.equal and "losses bit-equal: NO" in report
    assert [ln for ln in report.splitlines() if "differs" in ln][0].split()[0] == "3"
    gpu = DryRunResult([1.0, 0.5, 0.25], [1.0, 0.5, 0.25000001], Path("x"), 10, {}, False)
    assert gpu.equal  # GPU kernels are not bit-deterministic: 1e-5 relative there
    short = DryRunResult([1.0, 0.5, 0.25], [1.0, 0.5], Path("x"), 10, {}, True)
    assert not short.equal
