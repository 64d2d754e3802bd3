"""Hostile checkpoints and export destinations (issue 16, items 1, 7 and 8), on real tiny runs.

* item 1: ``export`` never deletes or overwrites a directory that is, contains or lies inside a
  sanakit run or checkpoint; ``--overwrite`` replaces only an earlier export.
* item 7: a manifest that cannot be parsed makes a checkpoint unverified (skipped with a
  warning); a re-sealed checkpoint (manifest recomputed to match) holding hostile content is one
  ``error:`` line naming the file, on ``train`` resume and on ``sample``.
* item 8: only files the manifest lists are loaded; an unlisted file is never read.

Every refused command must print exactly one ``error:`` line, no traceback, and leave the
checkpoints byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import CKPT, TINY, run_sanakit, the_error_line
from safetensors.torch import load_file, save_file

from sanakit.io.checkpoint import MANIFEST_NAME, find_latest, verify_checkpoint

RESUME = ["--train.max_steps=3", *TINY]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def reseal(ckpt: Path, names: list[str] | None = None) -> None:
    """Recompute the manifest so it matches the files now there (as an adversary would)."""
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    listed = names if names is not None else sorted(manifest["files"])
    manifest["files"] = {
        rel: {
            "size": (ckpt / rel).stat().st_size,
            "sha256": hashlib.sha256((ckpt / rel).read_bytes()).hexdigest(),
        }
        for rel in listed
    }
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify_checkpoint(ckpt) is None


@pytest.fixture
def run(tiny_work_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's real 2-step run."""
    work = tmp_path / "w"
    shutil.copytree(tiny_work_dir, work)
    return work


def refused(result, *names: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    line = the_error_line(result)
    for name in names:
        assert name in line, line
    return line


# ------------------------------------------------------------------------------------------
# item 1: export destinations
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dest",
    ["{w}", "{w}/" + CKPT, "{w}/checkpoints", "{w}/cache", ".", "{w}/" + CKPT + "/inner"],
    ids=["run-itself", "checkpoint-itself", "checkpoints-folder", "inside-run", "cwd", "in-ckpt"],
)
def test_export_never_touches_a_run(run: Path, tmp_path: Path, dest: str) -> None:
    before = snapshot(tmp_path)
    out = dest.format(w=run)
    source = str(run / CKPT) if "checkpoint" in dest else str(run)
    result = run_sanakit("export", source, out, "--overwrite", cwd=str(tmp_path))
    refused(result)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_an_earlier_export(run: Path, tmp_path: Path) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    line = refused(run_sanakit("export", str(run), str(mine), "--overwrite"), str(mine))
    assert "not an earlier sanakit export" in line
    assert (mine / "keep.txt").read_text() == "user data"

    # a fake export marker does not make a folder holding a run replaceable
    fake = tmp_path / "fake"
    shutil.copytree(run, fake / "inner_run")
    (fake / "sanakit.json").write_text(json.dumps({"format": "sanakit-export"}))
    before = snapshot(fake)
    refused(run_sanakit("export", str(run), str(fake), "--overwrite"), "inner_run")
    assert snapshot(fake) == before

    out = tmp_path / "exported"
    first = run_sanakit("export", str(run), str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "sanakit.json").read_text())["format"] == "sanakit-export"
    (out / "stray.txt").write_text("from the earlier export's folder")
    again = run_sanakit("export", str(run), str(out), "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "transformer").is_dir() and not (out / "stray.txt").exists()  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "fake", "notes", "w"]


# ------------------------------------------------------------------------------------------
# item 7: manifests that cannot be parsed
# ------------------------------------------------------------------------------------------

GOOD_FILE = {"size": 1, "sha256": "0" * 64}
MANIFESTS = {
    "deep-nesting": "[" * 100_000,
    "deep-object": '{"a":' * 100_000,
    "list": "[1, 2]",
    "step-string": json.dumps({"format": "sanakit-checkpoint", "version": 1, "step": "2"}),
    "step-float": '{"format": "sanakit-checkpoint", "version": 1, "step": 1e30, "files": {}}',
    "step-inf": '{"format": "sanakit-checkpoint", "version": 1, "step": Infinity, "files": {}}',
    "version-huge": '{"format": "sanakit-checkpoint", "version": 1e999, "step": 2}',
    "digits": '{"format": "sanakit-checkpoint", "version": 1, "step": ' + "9" * 5000 + "}",
    "files-list": json.dumps(
        {"format": "sanakit-checkpoint", "version": 1, "step": 2, "files": ["a"]}
    ),
    "size-huge": json.dumps(
        {
            "format": "sanakit-checkpoint",
            "version": 1,
            "step": 2,
            "files": {"model.safetensors": {"size": 10**40, "sha256": "0" * 64}},
        }
    ),
    "nul-name": json.dumps(
        {"format": "sanakit-checkpoint", "version": 1, "step": 2, "files": {"a\x00b": GOOD_FILE}}
    ),
    "long-name": json.dumps(
        {"format": "sanakit-checkpoint", "version": 1, "step": 2, "files": {"x" * 5000: GOOD_FILE}}
    ),
    "not-utf8": b"\xff\xfe{",
}


@pytest.mark.parametrize("text", list(MANIFESTS.values()), ids=list(MANIFESTS))
def test_unparseable_manifest_is_unverified(tmp_path: Path, text: str | bytes) -> None:
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x")
    data = text if isinstance(text, bytes) else text.encode()
    (ckpt / MANIFEST_NAME).write_bytes(data)
    reason = verify_checkpoint(ckpt)
    assert isinstance(reason, str) and reason
    assert find_latest(tmp_path) == (None, [(ckpt, reason)])


def test_deeply_nested_manifest_is_skipped_by_train_and_sample(run: Path) -> None:
    newer = run / "checkpoints" / "step_00000003"
    shutil.copytree(run / CKPT, newer)
    (newer / MANIFEST_NAME).write_text("[" * 100_000)
    out = run_sanakit("sample", f"--checkpoint={run}", "--prompt=a red circle", "--steps=1",
                      f"--out={run / 'a.png'}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"skipping checkpoint {newer}" in out.stderr and "Traceback" not in out.stderr
    direct = run_sanakit("sample", f"--checkpoint={newer}", "--prompt=a", f"--out={run / 'b.png'}")
    refused(direct, str(newer))
    resumed = run_sanakit("train", f"--work_dir={run}", *RESUME)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping checkpoint {newer}" in resumed.stderr
    assert f"resumed from {run / CKPT} at step 2" in resumed.stderr
    assert "Traceback" not in resumed.stderr


# ------------------------------------------------------------------------------------------
# item 7: re-sealed checkpoints with hostile content
# ------------------------------------------------------------------------------------------


def edit_json(name: str, change) -> Callable:
    def apply(ckpt: Path) -> None:
        path = ckpt / name
        data = json.loads(path.read_text())
        path.write_text(change(data) if callable(change) else change)

    return apply


def set_key(key: str, raw: str):
    """JSON text of the object with ``key`` set to the raw JSON ``raw`` (e.g. 1e30, Infinity)."""

    def change(data: dict) -> str:
        data[key] = "@@"
        return json.dumps(data).replace('"@@"', raw)

    return change


def edit_weights(change) -> Callable:
    def apply(ckpt: Path) -> None:
        path = ckpt / "model.safetensors"
        tensors = load_file(str(path))
        save_file(change(tensors), str(path))

    return apply


def huge_header(ckpt: Path) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    ).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


def huge_header_length(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")


def another_depth(tensors: dict) -> dict:
    extra = {
        k.replace("transformer_blocks.0.", "transformer_blocks.1."): v.clone()
        for k, v in tensors.items()
        if "transformer_blocks.0." in k
    }
    return {**tensors, **extra}


def missing_block(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if "transformer_blocks.0." not in k}


def wider(tensors: dict) -> dict:
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    return {**tensors, name: torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])}


def torch_save(name: str, obj) -> Callable:
    return lambda ckpt: torch.save(obj, ckpt / name)


TRAIN_CASES = {
    "trainer-step-string": (
        "trainer_state.json",
        edit_json("trainer_state.json", set_key("step", '"2"')),
    ),
    "trainer-step-1e30": (
        "trainer_state.json",
        edit_json("trainer_state.json", set_key("step", "1e30")),
    ),
    "trainer-world-inf": (
        "trainer_state.json",
        edit_json("trainer_state.json", set_key("world_size", "Infinity")),
    ),
    "trainer-nested": ("trainer_state.json", edit_json("trainer_state.json", "[" * 100_000)),
    "sampler-epoch-1e30": (
        "sampler_rank0.json",
        edit_json("sampler_rank0.json", set_key("epoch", "1e30")),
    ),
    "sampler-seed-huge": (
        "sampler_rank0.json",
        edit_json("sampler_rank0.json", set_key("seed", str(10**30))),
    ),
    "sampler-batches-huge": (
        "sampler_rank0.json",
        edit_json("sampler_rank0.json", set_key("batches_done", str(10**9))),
    ),
    "weights-huge-header": ("model.safetensors", huge_header),
    "weights-huge-header-length": ("model.safetensors", huge_header_length),
    "weights-another-depth": ("model.safetensors", edit_weights(another_depth)),
    "weights-missing-block": ("model.safetensors", edit_weights(missing_block)),
    "weights-wrong-shape": ("model.safetensors", edit_weights(wider)),
    "optimizer-wrong-type": ("optimizer.pt", torch_save("optimizer.pt", {"state": "x"})),
    "scheduler-1e30": ("lr_scheduler.pt", torch_save("lr_scheduler.pt", {"last_epoch": 1e30})),
    "rng-garbage": ("rng_rank0.pt", torch_save("rng_rank0.pt", {"python": 1})),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES), ids=list(TRAIN_CASES))
def test_resealed_hostile_file_is_one_line_on_resume(run: Path, case: str) -> None:
    name, damage = TRAIN_CASES[case]
    ckpt = run / CKPT
    damage(ckpt)
    reseal(ckpt)
    before = snapshot(run / "checkpoints")
    refused(run_sanakit("train", f"--work_dir={run}", *RESUME), str(ckpt / name))
    assert snapshot(run / "checkpoints") == before


def null_of_wrong_shape(ckpt: Path) -> None:
    data = torch.load(ckpt / "null_embed.pth", weights_only=True)
    data["uncond_prompt_embeds"] = torch.zeros(1, 3, 5)
    data["uncond_prompt_embeds_mask"] = torch.ones(1, 3, dtype=torch.long)
    torch.save(data, ckpt / "null_embed.pth")


SAMPLE_CASES = {
    "config-list": ("config.yaml", lambda ckpt: (ckpt / "config.yaml").write_text("- 1\n- 2\n")),
    "null-wrong-shape": ("null_embed.pth", null_of_wrong_shape),
    "null-not-a-dict": ("null_embed.pth", torch_save("null_embed.pth", [1, 2])),
    "weights-another-depth": ("model.safetensors", edit_weights(another_depth)),
    "weights-huge-header": ("model.safetensors", huge_header),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES), ids=list(SAMPLE_CASES))
def test_resealed_hostile_file_is_one_line_on_sample(run: Path, case: str) -> None:
    name, damage = SAMPLE_CASES[case]
    ckpt = run / CKPT
    damage(ckpt)
    reseal(ckpt)
    before = snapshot(run / "checkpoints")
    result = run_sanakit("sample", f"--checkpoint={ckpt}", "--prompt=a red circle", "--steps=1",
                         f"--out={run / 'x.png'}")  # fmt: skip
    refused(result, str(ckpt / name))
    assert snapshot(run / "checkpoints") == before and not (run / "x.png").exists()


def test_config_list_in_checkpoint_is_one_line_on_resume(run: Path) -> None:
    ckpt = run / CKPT
    (ckpt / "config.yaml").write_text("- 1\n- 2\n")
    reseal(ckpt)
    refused(run_sanakit("train", f"--work_dir={run}", *RESUME), str(ckpt / "config.yaml"))


# ------------------------------------------------------------------------------------------
# item 8: only listed files are loaded
# ------------------------------------------------------------------------------------------


def test_unlisted_files_are_never_loaded(run: Path) -> None:
    ckpt = run / CKPT
    # an extra, unlisted rng file for a rank that does not exist: ignored, resume works
    torch.save({"python": "not an rng state"}, ckpt / "rng_rank5.pt")
    listed = sorted(json.loads((ckpt / MANIFEST_NAME).read_text())["files"])
    # the real rng file present but dropped from the manifest: refused, not loaded unverified
    reseal(ckpt, [n for n in listed if n != "rng_rank0.pt"])
    refused(run_sanakit("train", f"--work_dir={run}", *RESUME), "rng_rank0.pt", "does not list")

    # the weights listed under another name, an unlisted model.safetensors in their place
    (ckpt / "model.safetensors").rename(ckpt / "model_listed.safetensors")
    tensors = load_file(str(ckpt / "model_listed.safetensors"))
    save_file(
        {k: torch.full_like(v, 7.0) for k, v in tensors.items()}, str(ckpt / "model.safetensors")
    )
    swapped = ["model_listed.safetensors" if n == "model.safetensors" else n for n in listed]
    reseal(ckpt, swapped)
    sample = run_sanakit("sample", f"--checkpoint={ckpt}", "--prompt=a", f"--out={run / 'x.png'}")
    refused(sample, "model.safetensors", "does not list")
    refused(
        run_sanakit("train", f"--work_dir={run}", *RESUME), "model.safetensors", "does not list"
    )


def test_extra_unlisted_file_is_ignored_on_resume(run: Path) -> None:
    ckpt = run / CKPT
    torch.save({"python": "not an rng state"}, ckpt / "rng_rank5.pt")
    (ckpt / "sampler_rank5.json").write_text("[" * 100_000)
    assert verify_checkpoint(ckpt) is None  # unlisted files do not affect verification
    resumed = run_sanakit("train", f"--work_dir={run}", *RESUME)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step 2" in resumed.stderr
