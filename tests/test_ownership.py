"""Issue 16 items 2 and 3: one job per work dir / export destination / cache dir (an OS lock that
dies with its process), and a fresh start never replaces an existing run's checkpoints."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slow_write
from conftest import (
    FAST,
    TORCHRUN,
    checkpoint_dir,
    cli_env,
    losses,
    run_sanakit,
    start_sanakit,
    the_error_line,
    wait_for_steps,
)

from sanakit.io.checkpoint import find_latest
from sanakit.io.ownership import (
    LOCK_NAME,
    OwnershipError,
    WorkDirBusy,
    current_owner,
    destination_lock_file,
    lock_owner,
    own,
    own_destination,
    remove_stale_lock,
)
from sanakit.io.run_dir import PREVIOUS_RUNS, RunExists, prepare_fresh_start

TINY_RUN = [*FAST, "--train.max_steps=2", "--train.save_model_steps=2"]
HOST = socket.gethostname()


def wait_for_owner(proc: subprocess.Popen, lock: Path, timeout: float = 120) -> None:
    """Block until ``proc`` holds ``lock`` (its record names it and the OS lock is held)."""
    deadline = time.monotonic() + timeout
    while True:
        owner = lock_owner(lock)
        if owner is not None and owner.pid == proc.pid:
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        assert time.monotonic() < deadline, f"{lock} not taken within {timeout} s"
        time.sleep(0.05)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- the lock itself (in-process and one tiny holder process) --------------------------------


def test_a_second_owner_is_refused_with_pid_and_host(tmp_path):
    work = tmp_path / "w"
    with own(work, "sanakit train") as me:
        assert me is not None and me.pid == os.getpid()
        assert current_owner(work) == me
        before = (work / LOCK_NAME).read_bytes()
        with pytest.raises(WorkDirBusy) as busy:
            with own(work, "sanakit train"):
                pass
        line = str(busy.value)
        assert "\n" not in line and f"pid {os.getpid()}" in line and HOST in line
        assert "sanakit train" in line and str(work) in line
        assert (work / LOCK_NAME).read_bytes() == before  # the refused job wrote nothing
    assert current_owner(work) is None  # released, and the record emptied
    assert (work / LOCK_NAME).read_bytes() == b""
    with own(work, "sanakit train"):  # and it can be taken again
        pass


def test_kill_9_of_the_owner_leaves_no_stale_lock(tmp_path):
    work = tmp_path / "w"
    code = (
        "import sys, time\nfrom sanakit.io.ownership import own\n"
        f"with own({str(work)!r}, 'sanakit train'):\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stderr=subprocess.PIPE)
    try:
        wait_for_owner(proc, work / LOCK_NAME, timeout=60)
        with pytest.raises(WorkDirBusy, match=f"pid {proc.pid} on host"):
            with own(work, "sanakit train"):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert current_owner(work) is None
    with own(work, "sanakit train") as me:
        assert me.pid == os.getpid()


def test_a_forked_child_does_not_keep_a_killed_owners_lock(tmp_path):
    work = tmp_path / "w"
    code = (
        "import os, sys, time\nfrom sanakit.io.ownership import own\n"
        f"with own({str(work)!r}, 'sanakit train'):\n"
        "    if os.fork() == 0:\n        time.sleep(20)\n        os._exit(0)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stderr=subprocess.PIPE)
    try:
        wait_for_owner(proc, work / LOCK_NAME, timeout=60)
    finally:
        proc.kill()  # the forked child (a DataLoader worker, say) lives on
        proc.wait()
    assert current_owner(work) is None


def test_a_killed_exports_lock_file_is_removed_by_the_next_one_only_when_free(tmp_path):
    out = tmp_path / "out"
    lock = destination_lock_file(out)
    code = (
        "import sys, time\nfrom sanakit.io.ownership import own_destination\n"
        f"with own_destination({str(out)!r}, 'sanakit export'):\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stderr=subprocess.PIPE)
    try:
        wait_for_owner(proc, lock, timeout=60)
        assert not remove_stale_lock(lock) and lock_owner(lock).pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert lock.exists() and lock_owner(lock) is None  # kill -9: the file stays, unlocked
    assert remove_stale_lock(lock) and not lock.exists()
    with own_destination(out, "sanakit export"):
        assert lock.exists()
    assert not lock.exists()  # a finished export leaves no lock file


def test_follower_ranks_share_rank_0s_ownership(tmp_path, monkeypatch):
    work = tmp_path / "w"
    with own(work, "sanakit train"):
        monkeypatch.setenv("RANK", "1")
        with own(work, "sanakit train") as follower:  # not refused: rank 0 owns for the job
            assert follower is None
        with own_destination(tmp_path / "out", "sanakit export") as follower:
            assert follower is None
        assert not destination_lock_file(tmp_path / "out").exists()


def test_a_planted_symlink_lock_file_is_refused_and_its_target_untouched(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("data")
    (work / LOCK_NAME).symlink_to(target)
    with pytest.raises(OwnershipError, match="lock file"):
        with own(work, "sanakit train"):
            pass
    assert target.read_text() == "data"
    assert current_owner(work) is None


def test_prepare_fresh_start_refuses_then_moves_aside(tmp_path):
    work = tmp_path / "w"
    assert prepare_fresh_start(work, overwrite=False) is None  # nothing there: nothing to do
    (work / "checkpoints" / "step_00000002").mkdir(parents=True)
    (work / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"weights")
    (work / "metrics.jsonl").write_text('{"step": 1}\n')
    (work / "cache").mkdir()
    with pytest.raises(RunExists, match="overwrite_run=true"):
        prepare_fresh_start(work, overwrite=False)
    assert (work / "checkpoints" / "step_00000002" / "model.safetensors").exists()
    first = prepare_fresh_start(work, overwrite=True)
    assert first is not None and first.parent == work / PREVIOUS_RUNS
    assert (first / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes() == (
        b"weights"
    )
    assert (first / "metrics.jsonl").exists() and not (work / "checkpoints").exists()
    assert (work / "cache").is_dir()  # reusable artifacts stay
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "step_00000004").mkdir()
    second = prepare_fresh_start(work, overwrite=True)  # same second: a distinct folder
    assert second != first and (second / "checkpoints" / "step_00000004").is_dir()


# ---- the real commands ------------------------------------------------------------------------


def test_two_trains_on_one_work_dir(tmp_path):
    work = tmp_path / "w"
    first = start_sanakit("train", f"--work_dir={work}", *FAST, "--train.max_steps=100000")
    try:
        wait_for_owner(first, work / LOCK_NAME)
        wait_for_steps(first, work, 1)
        config = (work / "config.yaml").read_bytes()
        second = run_sanakit(
            "train", f"--work_dir={work}", *FAST, "--train.lr=0.5", "--train.max_steps=3"
        )
        assert second.returncode != 0
        line = the_error_line(second)
        assert f"pid {first.pid} on host {HOST}" in line and "sanakit train" in line, line
        assert str(work) in line
        assert (work / "config.yaml").read_bytes() == config  # not rewritten by the second
        assert current_owner(work).pid == first.pid  # its record not overwritten either
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    assert len(losses(work)) >= 1  # asserts steps 1, 2, ..., N: no interleaving
    starts = [ln for ln in (work / "train.log").read_text().splitlines() if " device " in ln]
    assert len(starts) == 1, starts  # no log lines from the refused run
    assert "lr: 0.5" not in (work / "config.yaml").read_text()


def test_after_kill_9_of_a_run_the_rerun_resumes(tmp_path):
    work = tmp_path / "w"
    args = ["train", f"--work_dir={work}", *FAST, "--train.max_steps=40"]
    proc = start_sanakit(*args, "--train.save_model_steps=2")
    try:
        wait_for_steps(proc, work, 3)
        assert current_owner(work).pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert current_owner(work) is None  # the OS dropped the lock with the process
    latest, _ = find_latest(work / "checkpoints")
    assert latest is not None
    rerun = run_sanakit(*args, "--train.save_model_steps=100")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {latest}" in rerun.stderr
    assert len(losses(work)) == 40


def test_two_exports_to_one_destination(tiny_work_dir, tmp_path):
    out = tmp_path / "out"
    lock = destination_lock_file(out)
    first = subprocess.Popen(
        slow_write.command(1.5, "export", str(tiny_work_dir), str(out)),  # slow fsyncs
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        wait_for_owner(first, lock)
        second = run_sanakit("export", str(tiny_work_dir), str(out), "--overwrite")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode != 0 and "wrote" not in second.stdout
    line = the_error_line(second)
    assert f"pid {first.pid} on host {HOST}" in line and "sanakit export" in line, line
    assert first.returncode == 0, stderr[-2000:]
    assert "wrote" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file gone with it
    assert (out / "transformer").is_dir()


def test_two_cache_builds_on_one_cache_dir(tmp_path):
    work = tmp_path / "w"
    args = ["cache", "build", f"--work_dir={work}", *FAST, "--data.max_samples=8"]
    first = subprocess.Popen(
        slow_write.command(5, *args),  # slow cache writes keep the first build (and its lock)
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        wait_for_owner(first, work / "cache" / LOCK_NAME)
        second = run_sanakit(*args)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode != 0
    line = the_error_line(second)
    assert "cache dir" in line and f"pid {first.pid} on host {HOST}" in line, line
    assert first.returncode == 0, stderr[-2000:]
    assert "computed" in stdout


def test_torchrun_ranks_share_one_ownership(tmp_path):
    work = tmp_path / "w"
    args = ["train", f"--work_dir={work}", *FAST, "--data.max_samples=16"]
    job = start_sanakit(*args, "--train.max_steps=100000", launcher=TORCHRUN)
    try:
        wait_for_steps(job, work, 2)  # both ranks run: the follower was not refused
        owner = current_owner(work)  # rank 0 (a worker, not the launcher) owns for the job
        assert owner is not None and owner.what == "sanakit train" and owner.pid != job.pid
        intruder = run_sanakit(*args, "--train.max_steps=3")
        assert f"pid {owner.pid} on host {HOST}" in the_error_line(intruder)
        job.send_signal(signal.SIGTERM)  # the launcher stops both ranks at one step
        stdout, stderr = job.communicate(timeout=180)
    finally:
        job.kill()
    # torchrun itself reports the signal with a non-zero code; our ranks exit cleanly
    assert stdout.count("stopped by SIGTERM at step") == 1, stdout + stderr[-3000:]
    assert not [ln for ln in stderr.splitlines() if ln.startswith("error:")], stderr[-3000:]
    assert current_owner(work) is None
    assert len(losses(work)) >= 2


# ---- a fresh start over an existing run --------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished") / "w"
    done = run_sanakit("train", f"--work_dir={work}", *TINY_RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    return work


def test_resume_from_none_over_checkpoints_refuses(finished_run, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(finished_run, work)
    before = snapshot(work)
    result = run_sanakit("train", f"--work_dir={work}", *TINY_RUN, "--resume_from=none")
    assert result.returncode != 0
    line = the_error_line(result)
    assert "overwrite_run=true" in line and "step_00000002" in line, line
    assert snapshot(work) == before  # checkpoint bytes, metrics, config.yaml, train.log, lock


def test_overwrite_run_moves_the_old_run_aside(finished_run, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(finished_run, work)
    old = snapshot(work / "checkpoints")
    result = run_sanakit(
        "train",
        f"--work_dir={work}",
        *TINY_RUN,
        "--resume_from=none",
        "--train.overwrite_run=true",
        "--seed=7",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (moved,) = (work / PREVIOUS_RUNS).iterdir()
    assert snapshot(moved / "checkpoints") == old  # found intact, byte for byte
    assert (moved / "metrics.jsonl").exists() and (moved / "train.log").exists()
    assert losses(work) != losses(moved)  # a new run from step 1 with another seed
    assert len(losses(work)) == 2
    assert checkpoint_dir(work, 2).is_dir()
