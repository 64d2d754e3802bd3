"""Issue 14 without a browser: what the page reads from a work dir (state, curves, checkpoints),
the bounds on a sample request, and `sanakit serve`'s start-up errors. The page itself, driven
in Chromium, is tested in test_serve_browser.py."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import CKPT, run_sanakit, the_error_line
from PIL import Image

from sanakit.inference import load_for_inference, sample_grid
from sanakit.io.ownership import LOCK_NAME, abandoned_owner, own
from sanakit.serve.checkpoints import CheckpointList, checkpoint_path
from sanakit.serve.files import PublicFiles
from sanakit.serve.metrics import MetricsTail
from sanakit.serve.run_view import RunState, RunView
from sanakit.serve.sampling import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    Busy,
    RequestRefused,
    SampleService,
    parse_request,
)
from sanakit.serve.work_dir import NotARun, check_run_dir


@pytest.fixture
def run(tiny_work_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's finished 2-step run (max_steps=2)."""
    work = tmp_path / "run"
    shutil.copytree(tiny_work_dir, work, symlinks=True)
    return work


def view_of(work: Path, tmp_path: Path) -> RunView:
    return RunView(work, PublicFiles(tmp_path / "served", work))


def set_max_steps(work: Path, steps: int) -> None:
    path = work / "config.yaml"
    path.write_text(path.read_text().replace("max_steps: 2\n", f"max_steps: {steps}\n"))


def append_rows(work: Path, *rows: dict) -> None:
    with (work / "metrics.jsonl").open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_the_state_of_a_run_comes_from_what_is_on_disk(run: Path, tmp_path: Path) -> None:
    status = view_of(run, tmp_path).snapshot().status
    assert (status.state, status.step, status.max_steps) == (RunState.FINISHED, 2, 2)

    set_max_steps(run, 10)  # a checkpoint at the last step, steps left, no owner: stopped
    assert view_of(run, tmp_path).snapshot().status.state is RunState.STOPPED

    append_rows(run, {"step": 3, "loss": 1.0})  # a step after the newest checkpoint
    status = view_of(run, tmp_path).snapshot().status
    assert status.state is RunState.CRASHED and "step 3" in status.detail

    # a record left in the lock file by a job that died holding it (kill -9)
    record = {"pid": 4242, "host": "h", "what": "sanakit train", "command": "c", "started": "t"}
    (run / LOCK_NAME).write_text(json.dumps(record))
    status = view_of(run, tmp_path).snapshot().status
    assert status.state is RunState.CRASHED and "pid 4242" in status.detail

    with own(run, "sanakit train"):  # held: running, whatever else is on disk
        status = view_of(run, tmp_path).snapshot().status
        assert status.state is RunState.RUNNING and f"pid {os.getpid()}" in status.detail
        assert abandoned_owner(run) is None
    assert abandoned_owner(run) is None  # a job that ends normally empties its record

    append_rows(run, {"step": 4, "loss": float("nan")})
    status = view_of(run, tmp_path).snapshot().status
    assert status.state is RunState.DIVERGED and "step 4" in status.detail


def test_metrics_are_read_incrementally_and_survive_torn_lines_and_rewrites(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    tail = MetricsTail(path)
    assert tail.read() and list(tail.loss.raw.steps) == [1, 2]
    with path.open("a") as fh:  # the torn line completes; held-out losses in two spellings
        fh.write('ss": 4.0}\n{"step": 3, "kind": "heldout", "loss": 0.5, "ema_loss": 0.4}\n')
        fh.write('{"step": 4, "loss": 3.0, "val_loss": 0.3, "lr": 0.1}\n')
    assert tail.read() and list(tail.loss.raw.values) == [2.0, 1.0, 4.0, 3.0]
    assert {k: list(v.values) for k, v in tail.extra.items()} == {
        "heldout loss": [0.5],
        "heldout ema_loss": [0.4],
        "val_loss": [0.3],
    }
    assert not tail.read()  # nothing new: nothing parsed
    smoothed = list(tail.loss.smoothed.values)
    assert smoothed[0] == 2.0 and 1.0 < smoothed[2] < 4.0 and len(smoothed) == 4
    # a resume rewrites the file (a new inode) without the killed run's rows
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 1, "loss": 9.0}\n')
    os.replace(tmp, path)
    assert tail.read() and list(tail.loss.raw.values) == [9.0] and tail.extra == {}


def test_checkpoints_show_verification_and_provenance_and_leftovers(
    run: Path, tmp_path: Path
) -> None:
    ckpts = run / "checkpoints"
    (ckpts / ".step_00000003.tmp-999999-abcd").mkdir()  # a save in progress / killed
    listing = CheckpointList(ckpts)
    first = {r.name: r for r in listing.read()}["step_00000002"]
    assert first.pending and not first.verified and first.usable  # sizes checked, hashing
    listing.settle(timeout=60)
    rows = {r.name: r for r in listing.read()}
    good = rows["step_00000002"]
    assert good.verified and good.problem == "" and good.size > 0
    assert (good.encoder, good.max_length, good.instruction) == ("minilm", "16", "none")
    assert len(good.fingerprint) == 12
    assert "half-written" in rows[".step_00000003.tmp-999999-abcd"].problem
    ema = run / CKPT / "ema.safetensors"
    ema.write_bytes(bytes(ema.stat().st_size))  # the right size, the wrong bytes
    listing = CheckpointList(ckpts)
    assert {r.name: r for r in listing.read()}["step_00000002"].pending
    listing.settle(timeout=60)
    bad = {r.name: r for r in listing.read()}["step_00000002"]
    assert (
        not bad.verified and not bad.pending and bad.problem == "ema.safetensors: sha256 mismatch"
    )
    assert bad.encoder == "minilm"  # its provenance is still shown
    ema.write_bytes(b"torn")  # half a file: refused at once, without hashing
    torn = {r.name: r for r in CheckpointList(ckpts).read()}["step_00000002"]
    assert not torn.verified and not torn.pending and "ema.safetensors: size" in torn.problem
    assert checkpoint_path(ckpts, "step_00000002") == ckpts / "step_00000002"
    os.symlink(ckpts / "step_00000002", ckpts / "step_00000007")
    for name in ["../checkpoints/step_00000002", "/etc", "step_00000007", "step_2", "", None, 3]:
        assert checkpoint_path(ckpts, name) is None, name


def request(run: Path, **fields):
    values = {
        "checkpoint": "step_00000002",
        "ema": False,
        "prompts": "a red circle",
        "cfg_scale": 4.5,
        "steps": 3,
        "sampler": "flow_euler",
        "seed": 0,
        "num_images": 1,
    }
    values.update(fields)
    return parse_request(run / "checkpoints", *values.values())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompts": "  \n "}, "no prompt given"),
        ({"prompts": "x" * (MAX_PROMPT_CHARS + 1)}, "too long"),
        ({"prompts": "\n".join("p" * 9)}, "at most 8 per request"),
        ({"steps": 0}, f"steps must be a whole number from 1 to {MAX_STEPS}"),
        ({"steps": 2.5}, "steps must be a whole number"),
        (
            {"num_images": 10_000},
            f"images per prompt must be a whole number from 1 to {MAX_IMAGES}",
        ),
        ({"prompts": "a\nb\nc", "num_images": 6}, "18 images; at most 16"),
        ({"seed": -1}, "seed must be a whole number from 0"),
        ({"cfg_scale": float("nan")}, "CFG scale must be a number"),
        ({"sampler": "ddim"}, "unknown sampler 'ddim'"),
        ({"checkpoint": "../../etc"}, "no checkpoint named '../../etc'"),
    ],
)
def test_bad_requests_are_refused_with_a_message(run: Path, fields: dict, message: str) -> None:
    with pytest.raises(RequestRefused, match=None) as err:
        request(run, **fields)
    assert message in str(err.value)


def test_defaults_are_the_checkpoint_s_own(run: Path) -> None:
    req = request(run, cfg_scale=None, steps="", sampler=None, seed="7", num_images=2.0)
    assert (req.cfg_scale, req.steps, req.sampler, req.seed, req.num_images) == (
        4.5,
        20,
        "flow_dpm_solver",
        7,
        2,
    )


def test_the_progress_bar_follows_the_denoising_steps_without_changing_the_image(
    run: Path,
) -> None:
    req = request(run, prompts="a red circle\na blue square", steps=3, num_images=2)
    inference = load_for_inference(req.checkpoint)
    seen: list[tuple[float, str]] = []
    grid = SampleService.sample(inference, req, lambda f, what: seen.append((f, what)))
    assert [what for _, what in seen] == [f"denoising step {i} of 3" for i in (1, 2, 3)]
    assert seen[-1][0] == pytest.approx(0.95)
    plain = sample_grid(inference, ["a red circle", "a blue square"], 2, cfg_scale=4.5,
                        steps=3, sampler="flow_euler", seed=0)  # fmt: skip
    assert (grid == plain).all()
    assert not inference.models.transformer._forward_hooks  # the hook is gone again


def test_a_full_queue_is_refused_as_busy(tmp_path: Path) -> None:
    service = SampleService(PublicFiles(tmp_path / "served", tmp_path / "work"))
    service.waiting = 4
    with pytest.raises(Busy, match="busy: 4 requests are already waiting"):
        service.run(None, lambda *_: None)  # type: ignore[arg-type]  # refused before use


def test_only_complete_png_grids_that_are_regular_files_are_copied(tmp_path: Path) -> None:
    work, vis = tmp_path / "work", tmp_path / "work" / "vis"
    vis.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    (vis / "step_00000003.png").write_bytes(png.getvalue())
    (vis / "step_00000004.png").write_bytes(png.getvalue()[:-20])  # still being written
    (vis / "step_00000005.png").symlink_to(vis / "step_00000003.png")
    (vis / "notes.png").write_bytes(png.getvalue())  # not a grid's name
    files = PublicFiles(tmp_path / "served", work)
    grids = files.grids(limit=8)
    assert [step for step, _ in grids] == [3]
    copy = grids[0][1]
    assert copy.read_bytes() == png.getvalue() and copy.is_relative_to(tmp_path / "served")
    (vis / "step_00000004.png").write_bytes(png.getvalue())  # finished meanwhile
    assert [step for step, _ in files.grids(limit=1)] == [4]


def test_work_dir_must_be_a_run(tmp_path: Path) -> None:
    with pytest.raises(NotARun, match="does not exist"):
        check_run_dir(tmp_path / "missing")
    with pytest.raises(NotARun, match="is not a sanakit run"):
        check_run_dir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert check_run_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="must not be inside"):
        PublicFiles(tmp_path / "tmp", tmp_path)


def test_serve_refuses_a_missing_or_foreign_work_dir_in_one_line(tmp_path: Path) -> None:
    missing = run_sanakit("serve", str(tmp_path / "nope"), "--host=0.0.0.0")
    assert missing.returncode == 2
    assert "does not exist" in the_error_line(missing)
    assert "serving on 0.0.0.0: anyone who can reach this address" in missing.stderr
    foreign = run_sanakit("serve", str(tmp_path))
    assert foreign.returncode == 2 and "is not a sanakit run" in the_error_line(foreign)
    bad_port = run_sanakit("serve", str(tmp_path), "--port=70000")
    assert bad_port.returncode == 2 and "--port=70000" in the_error_line(bad_port)
    assert list(tmp_path.iterdir()) == []  # nothing written
