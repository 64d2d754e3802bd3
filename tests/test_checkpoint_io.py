"""Crash-safety tests for sanakit.io.atomic and sanakit.io.checkpoint, on real files.

The kill tests run a real writer subprocess and SIGKILL it at seeded random moments; the writer
slows every fsync down (``tests/slow_write.py``, injected by the test, never read by sanakit) so
kills land mid-write.
"""

import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sanakit.errors import CheckpointError
from sanakit.io.atomic import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    free_bytes,
    remove_stale_temp_files,
    sha256_file,
)
from sanakit.io.checkpoint import (
    checkpoint_step,
    clean_stale,
    find_latest,
    has_room,
    list_checkpoints,
    read_manifest,
    recover_interrupted,
    rotate,
    verify_checkpoint,
    write_checkpoint,
)

# Prepended to a writer subprocess's script: every fsync sleeps, so a kill lands mid-write.
SLOW = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    "import slow_write; slow_write.install(0.05)\n"
)

# The deterministic content of each step's checkpoint, shared verbatim with the writer
# subprocess so the test can check that a recovered checkpoint holds exactly what was written.
PAYLOAD_SRC = textwrap.dedent(
    """
    import hashlib
    import json

    def payload(step):
        seed = hashlib.sha256(f"step-{step}".encode()).digest()
        size = 4096 + 37 * step
        return {
            "model.safetensors": (seed * (size // 32 + 1))[:size],
            "optim/state.bin": seed * 8 + bytes([step % 256]),
            "meta.json": json.dumps({"step": step}).encode(),
        }

    def blob(k):
        # Content of the atomically rewritten side file: header names k, body depends on k.
        return f"blob-{k:06d}\\n".encode() + hashlib.sha256(str(k).encode()).digest() * 2048

    def write_payload(step):
        def write(tmpdir):
            for rel, data in payload(step).items():
                path = tmpdir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return write
    """
)
_ns: dict = {}
exec(PAYLOAD_SRC, _ns)
payload = _ns["payload"]
blob = _ns["blob"]
write_payload = _ns["write_payload"]

# Writer loop for the kill test: resumes from find_latest like a real run, re-saves the latest
# step every third iteration (exercising replacement), rotates to 3, and atomically rewrites a
# side file. argv: checkpoints_dir, side_file, iterations (0 = forever).
WRITER_SRC = (
    SLOW
    + PAYLOAD_SRC
    + textwrap.dedent(
        """
    import sys
    from pathlib import Path
    from sanakit.io.atomic import atomic_write_bytes
    from sanakit.io.checkpoint import (
        checkpoint_step, find_latest, recover_interrupted, rotate, write_checkpoint,
    )

    d, side, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    recover_interrupted(d)  # as a resuming trainer does before it chooses
    latest, _ = find_latest(d)
    step = checkpoint_step(latest) if latest is not None else 0
    i = 0
    while n == 0 or i < n:
        i += 1
        if step == 0 or i % 3 != 0:
            step += 1
        path = write_checkpoint(d, step, write_payload(step))
        rotate(d, 3, path)
        atomic_write_bytes(side, blob(step))
    """
    )
)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def assert_payload(path: Path, step: int) -> None:
    for rel, data in payload(step).items():
        assert (path / rel).read_bytes() == data, f"{path / rel} differs from step {step}"


def dot_entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------
# atomic files
# ------------------------------------------------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "null_embedding.safetensors"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"first")

    atomic_write(target, write)
    assert target.read_bytes() == b"first"
    tmp = seen[0]
    assert tmp.parent == target.parent
    assert tmp.name.startswith(".") and ".tmp" in tmp.name
    assert tmp.suffix == ".safetensors"  # writers that infer a format from the suffix work
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert dot_entries(target.parent) == []


def test_atomic_write_failure_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "cache.bin"

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, failing)
    assert not target.exists()

    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"

    # A writer that never creates the temp file (e.g. np.save appending ".npy") must not
    # lead to an empty or missing target.
    with pytest.raises(RuntimeError, match="did not create"):
        atomic_write(target, lambda tmp: None)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]


@pytest.mark.slow
def test_atomic_write_survives_sigkill(tmp_path: Path) -> None:
    """Killed mid-write, the target is absent or exactly one complete version; never partial."""
    side = tmp_path / "side.bin"
    script = (
        SLOW
        + PAYLOAD_SRC
        + textwrap.dedent(
            """
        import sys
        import time
        from pathlib import Path
        from sanakit.io.atomic import atomic_write

        def slow_writer(data):
            # Like a large torch.save: the file grows over time, so a kill can land mid-file.
            def write(tmp):
                with open(tmp, "wb") as fh:
                    for i in range(0, len(data), len(data) // 4):
                        fh.write(data[i : i + len(data) // 4])
                        fh.flush()
                        time.sleep(0.02)
            return write

        k = 0
        while True:
            k += 1
            atomic_write(Path(sys.argv[1]), slow_writer(blob(k)))
        """
        )
    )
    rng = random.Random(1234)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script, str(side)])
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if side.exists():
            data = side.read_bytes()
            k = int(data[5:11])
            assert data == blob(k)
    # The killed writers' temp files are garbage, never data; they can be swept.
    remove_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["side.bin"])


def test_remove_stale_temp_files_spares_live_writers(tmp_path: Path) -> None:
    dead = tmp_path / f".x.bin.tmp-{dead_pid()}-0123abcd.bin"
    mine_stale = tmp_path / f".y.bin.tmp-{os.getpid()}-0123abcd.bin"
    live = tmp_path / f".z.bin.tmp-{os.getppid()}-0123abcd.bin"
    real = tmp_path / "x.bin"
    for p in (dead, mine_stale, live, real):
        p.write_bytes(b"data")
    assert set(remove_stale_temp_files(tmp_path)) == {dead, mine_stale}
    assert live.exists() and real.exists()


def test_sha256_free_bytes_check_writable(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several streamed chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()

    assert free_bytes(tmp_path / "not" / "yet" / "there") == shutil.disk_usage(tmp_path).free

    new_dir = tmp_path / "out" / "ckpts"
    assert check_writable(new_dir) is None
    assert new_dir.is_dir() and list(new_dir.iterdir()) == []  # probe file removed

    reason = check_writable(f / "sub")  # parent is a regular file
    assert reason is not None and str(f / "sub") in reason and "\n" not in reason

    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            reason = check_writable(ro)
            assert reason is not None and str(ro) in reason
        finally:
            ro.chmod(0o700)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    paths = [write_checkpoint(d, step, write_payload(step)) for step in (1, 2, 10)]
    assert [p.name for p in paths] == ["step_00000001", "step_00000002", "step_00000010"]
    assert list_checkpoints(d) == paths
    for step, path in zip((1, 2, 10), paths, strict=True):
        assert verify_checkpoint(path) is None
        assert verify_checkpoint(path, deep=False) is None
        assert checkpoint_step(path) == step
        assert_payload(path, step)

    manifest = read_manifest(paths[-1])
    assert manifest["format"] == "sanakit-checkpoint" and manifest["version"] == 1
    assert manifest["step"] == 10 and isinstance(manifest["created"], str)
    assert manifest["files"]["optim/state.bin"] == {
        "size": len(payload(10)["optim/state.bin"]),
        "sha256": hashlib.sha256(payload(10)["optim/state.bin"]).hexdigest(),
    }
    assert find_latest(d) == (paths[-1], [])
    assert dot_entries(d) == []
    assert find_latest(tmp_path / "nothing") == (None, [])


@pytest.mark.parametrize("rel", ["model.safetensors", "optim/state.bin", "manifest.json"])
@pytest.mark.parametrize("damage", ["empty", "truncate", "flip"])
def test_damaged_checkpoint_falls_back(tmp_path: Path, rel: str, damage: str) -> None:
    d = tmp_path / "ck"
    good = write_checkpoint(d, 1, write_payload(1))
    bad = write_checkpoint(d, 2, write_payload(2))
    target = bad / rel
    data = target.read_bytes()
    if damage == "empty":
        target.write_bytes(b"")
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        i = len(data) // 2
        target.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])

    reason = verify_checkpoint(bad)
    assert reason is not None
    if rel != "manifest.json":
        if damage == "empty":
            assert reason == f"{rel}: size 0 != {len(data)}"
        elif damage == "flip":
            assert reason == f"{rel}: sha256 mismatch"
            assert verify_checkpoint(bad, deep=False) is None  # size-only fast path
    latest, skipped = find_latest(d)
    assert latest == good
    assert skipped == [(bad, reason)]
    assert bad.is_dir() and target.exists()  # reported, never deleted


def test_missing_manifest_or_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    good = write_checkpoint(d, 3, write_payload(3))
    no_manifest = d / "step_00000005"
    no_manifest.mkdir()
    (no_manifest / "model.safetensors").write_bytes(b"weights")
    missing = write_checkpoint(d, 4, write_payload(4))
    (missing / "meta.json").unlink()

    assert verify_checkpoint(no_manifest) == "no manifest.json"
    assert verify_checkpoint(missing) == "missing file meta.json"
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint_step(no_manifest)
    latest, skipped = find_latest(d)
    assert latest == good
    assert skipped == [(no_manifest, "no manifest.json"), (missing, "missing file meta.json")]


def test_step_is_never_trusted_from_the_name(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    one = write_checkpoint(d, 1, write_payload(1))
    renamed = d / "step_00000009"
    shutil.copytree(one, renamed)
    assert verify_checkpoint(renamed) == "manifest step 1 != directory step 9"
    assert list_checkpoints(d) == [one]
    assert find_latest(d) == (one, [(renamed, "manifest step 1 != directory step 9")])
    # Outside the step_N naming scheme the manifest alone decides.
    elsewhere = tmp_path / "my_favourite"
    shutil.copytree(one, elsewhere)
    assert verify_checkpoint(elsewhere) is None and checkpoint_step(elsewhere) == 1


def test_rotation_keeps_newest_complete_and_never_touches_corrupt(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    paths = {s: write_checkpoint(d, s, write_payload(s)) for s in range(1, 7)}
    (paths[2] / "model.safetensors").write_bytes(b"")  # corrupt: left for the user
    assert rotate(d, None, paths[6]) == [] and rotate(d, 0, paths[6]) == []

    removed = rotate(d, 2, paths[6])
    assert removed == [paths[1], paths[3], paths[4]]
    assert list_checkpoints(d) == [paths[2], paths[5], paths[6]]
    assert dot_entries(d) == []

    # protect is never removed, even when it is not among the newest `keep`.
    assert rotate(d, 1, paths[5]) == []
    assert paths[5].is_dir()
    # An invalid protect means something went wrong: delete nothing.
    (paths[6] / "meta.json").unlink()
    assert rotate(d, 1, paths[6]) == []
    assert paths[5].is_dir() and paths[2].is_dir()


def test_resave_same_step_replaces_and_corrupt_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ck"
    first = write_checkpoint(d, 3, write_payload(3))
    again = write_checkpoint(d, 3, write_payload(103))  # different bytes, same step
    assert again == first
    assert verify_checkpoint(again) is None and checkpoint_step(again) == 3
    assert_payload(again, 103)
    assert sorted(p.name for p in d.iterdir()) == ["step_00000003"]

    (again / "optim" / "state.bin").write_bytes(b"xx")
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        third = write_checkpoint(d, 3, write_payload(3))
    assert_payload(third, 3)
    corrupt = [p for p in d.iterdir() if p.name.startswith("step_00000003.corrupt-")]
    assert len(corrupt) == 1
    assert (corrupt[0] / "optim" / "state.bin").read_bytes() == b"xx"  # kept, not deleted
    assert "does not verify" in caplog.text
    assert list_checkpoints(d) == [third]


def test_interrupted_resave_is_recovered(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    write_checkpoint(d, 2, write_payload(2))
    ck = write_checkpoint(d, 3, write_payload(3))
    pid = dead_pid()
    # Killed between "old aside" and "new into place": step 3 exists only as the old copy,
    # plus the complete-but-uncommitted temp dir.
    old = d / f".step_00000003.old-{pid}-0badc0de"
    ck.rename(old)
    shutil.copytree(old, d / f".step_00000003.tmp-{pid}-0badc0de")
    assert find_latest(d) == (d / "step_00000002", [])  # read-only: renames nothing
    assert recover_interrupted(d) == [ck]
    assert find_latest(d) == (ck, [])
    assert_payload(ck, 3)
    assert not old.exists()

    # Killed after the new copy was in place but before the old one was deleted.
    shutil.copytree(ck, old)
    write_checkpoint(d, 4, write_payload(4))
    assert dot_entries(d) == []


def test_stale_temp_dirs_are_cleaned_by_next_writer(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    pid = dead_pid()
    stale = [
        d / f".step_00000007.tmp-{pid}-abcdef01",
        d / f".step_00000008.tmp-{os.getpid()}-abcdef01",  # our pid, but not in use by us
        d / f".deleting-step_00000001-{pid}-abcdef01",
    ]
    live = d / f".step_00000009.tmp-{os.getppid()}-abcdef01"  # a running process's writer
    for p in [*stale, live]:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
        (p / "manifest.json").write_text("{}")
    assert set(clean_stale(d)) == set(stale)
    for p in stale[:1]:
        p.mkdir()
    write_checkpoint(d, 1, write_payload(1))
    assert dot_entries(d) == [live.name]


def test_writer_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    good = write_checkpoint(d, 1, write_payload(1))

    def boom(tmpdir: Path) -> None:
        (tmpdir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of memory while saving")

    with pytest.raises(RuntimeError, match="out of memory"):
        write_checkpoint(d, 2, boom)
    with pytest.raises(ValueError, match="no files"):
        write_checkpoint(d, 2, lambda tmpdir: None)
    with pytest.raises(ValueError, match="manifest.json"):
        write_checkpoint(d, 2, lambda tmpdir: (tmpdir / "manifest.json").write_text("{}"))
    with pytest.raises(ValueError, match="non-negative"):
        write_checkpoint(d, -1, write_payload(1))
    assert sorted(p.name for p in d.iterdir()) == [good.name]
    assert find_latest(d) == (good, [])


def test_has_room(tmp_path: Path) -> None:
    ok, free = has_room(tmp_path / "ck", 1)
    assert ok and free > 0
    ok, free = has_room(tmp_path / "ck", free * 2 + 1)
    assert not ok
    ok, _ = has_room(tmp_path, int(free / 1.05), margin=1.1)
    assert not ok


@pytest.mark.slow
def test_checkpoint_writer_survives_sigkill(tmp_path: Path) -> None:
    """SIGKILL a real writer at random moments; recovery is always exact and monotonic."""
    d = tmp_path / "checkpoints"
    side = tmp_path / "side.bin"
    argv = [sys.executable, "-c", WRITER_SRC, str(d), str(side)]
    rng = random.Random(20240611)
    best = 0
    for _ in range(12):
        proc = subprocess.Popen([*argv, "0"])
        time.sleep(rng.uniform(0.1, 0.9))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "writer exited before it was killed"

        recover_interrupted(d)  # what the next writer or trainer does first
        latest, skipped = find_latest(d)
        assert skipped == [], "a step_* name appeared for an incomplete checkpoint"
        if latest is not None:
            assert verify_checkpoint(latest, deep=True) is None
            step = checkpoint_step(latest)
            assert latest.name == f"step_{step:08d}"
            assert_payload(latest, step)
            assert step >= best, "resume point went backwards"
            best = step
        # Every visible checkpoint is complete: renames are the only way a step_* name appears.
        for path in list_checkpoints(d):
            assert verify_checkpoint(path) is None
            assert_payload(path, checkpoint_step(path))
        if side.exists():
            data = side.read_bytes()
            assert data == blob(int(data[5:11]))
    assert best > 0, "no checkpoint was ever completed; the kill window is too short"

    # A clean run resumes, cleans the killed writers' leftovers and finishes normally.
    result = subprocess.run([*argv, "2"], timeout=60)
    assert result.returncode == 0
    assert not [n for n in dot_entries(d) if ".tmp-" in n or ".old-" in n or "deleting" in n]
    latest, skipped = find_latest(d)
    assert skipped == [] and latest is not None and checkpoint_step(latest) > best
    assert len(list_checkpoints(d)) <= 3


# ------------------------------------------------------------------------------------------
# atomic directories
# ------------------------------------------------------------------------------------------


def test_atomic_directory_creates_replaces_and_keeps_aside(tmp_path: Path) -> None:
    from sanakit.io.atomic import Displace, Existing, Tag, atomic_directory, stale_siblings

    final = tmp_path / "out" / "folder"

    def fill(text: str):
        def write(tmp: Path) -> None:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.txt").write_text(text)

        return write

    assert atomic_directory(final, fill("one")) == final
    assert (final / "sub" / "a.txt").read_text() == "one"
    atomic_directory(final, fill("two"))  # REPLACE by default: old copy gone afterwards
    assert (final / "sub" / "a.txt").read_text() == "two"
    assert dot_entries(final.parent) == []

    aside = tmp_path / "out" / "kept"
    atomic_directory(final, fill("three"), lambda _: Displace(Existing.KEEP_ASIDE, aside))
    assert (aside / "sub" / "a.txt").read_text() == "two"
    assert (final / "sub" / "a.txt").read_text() == "three"

    def refuse(_: Path) -> Displace:
        raise CheckpointError("not replacing it")

    with pytest.raises(CheckpointError):
        atomic_directory(final, fill("four"), refuse)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_directory(final, lambda tmp: (_ for _ in ()).throw(OSError("disk on fire")))
    assert (final / "sub" / "a.txt").read_text() == "three"
    assert dot_entries(final.parent) == []

    pid = dead_pid()
    for tag in ("tmp", "old"):
        (final.parent / f".folder.{tag}-{pid}-0badc0de").mkdir()
    (final.parent / f".folder.tmp-{os.getppid()}-0badc0de").mkdir()  # a live writer's
    stale = stale_siblings(final.parent, Tag.TMP, "folder")
    assert [(s.name, s.tag, s.pid) for s in stale] == [("folder", Tag.TMP, pid)]
    assert [s.path.name for s in stale_siblings(final.parent, Tag.OLD)] == [
        f".folder.old-{pid}-0badc0de"
    ]
