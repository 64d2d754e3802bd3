"""Bad input across train / sample / doctor / cache: a clear one-line error, the documented exit
code, no traceback, and the user's files left exactly as they were.

Every case runs the real CLI in a subprocess against a pre-populated work_dir (a copy of a real
2-step run made once per session) and checks:
  * the exit code (2 for bad input; doctor reports a FAIL line and exits 1),
  * exactly one ``error:`` line on stderr (doctor: exactly one ``FAIL`` line on stdout) naming
    the offending key or path,
  * no ``Traceback`` in stdout or stderr,
  * every file that was in the work_dir before is still there, byte-identical.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CKPT, TINY, run_sanakit

from sanakit.cli import COMMANDS

# FAST with the default text length (16): the provenance the doctor tests compare against
BOUNDED = ["--train.max_steps=3"]  # should a case wrongly start training, it stays short
NO_CACHE = "cache" not in COMMANDS
CACHE_XFAIL = pytest.mark.xfail(
    NO_CACHE, reason="`sanakit cache` (build|verify) is not in sanakit.cli yet", strict=True
)


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Case:
    id: str
    args: list[str]  # placeholders: {wd} work_dir, {ck} its checkpoint, {tmp} scratch dir
    names: str  # what the error / FAIL line must mention ({tmp}/{wd} allowed)
    code: int = 2
    setup: tuple[str, ...] = ()  # named preparations, see prepare()
    marks: list = field(default_factory=list)


def prepare(steps: tuple[str, ...], wd: Path, tmp: Path) -> None:
    for step in steps:
        if step == "afile":  # a regular FILE: nothing can be created below it, even as root
            (tmp / "afile").write_text("I am a file, not a directory\n")
        elif step == "corrupt_yaml":
            (tmp / "bad.yaml").write_text("train:\n  lr: [1e-4\n  max_steps: : 3\n")
        elif step == "list_yaml":
            (tmp / "list.yaml").write_text("- work_dir: x\n- train: {}\n")
        elif step == "unknown_key_yaml":
            (tmp / "unknown.yaml").write_text("train:\n  bogus_key: 1\n")
        elif step == "wrong_type_yaml":
            (tmp / "wrong.yaml").write_text("train:\n  lr: fast\n")
        elif step == "empty_data":  # an image_folder root holding only a caption
            (tmp / "empty_data").mkdir()
            (tmp / "empty_data" / "a.txt").write_text("a caption without an image\n")
        elif step == "empty_work":  # a work_dir with files but no checkpoint
            (tmp / "empty_work").mkdir()
            (tmp / "empty_work" / "notes.txt").write_text("no checkpoints here\n")
        elif step == "truncate":  # a torn write of the model weights
            model = wd / CKPT / "model.safetensors"
            data = model.read_bytes()
            model.write_bytes(data[: len(data) // 2])
        else:  # pragma: no cover
            raise AssertionError(step)


def t(id: str, args: list[str], names: str, **kw) -> Case:
    return Case(f"train-{id}", ["train", "--work_dir={wd}", *TINY, *BOUNDED, *args], names, **kw)


def s(id: str, args: list[str], names: str, **kw) -> Case:
    return Case(f"sample-{id}", ["sample", *args], names, **kw)


def d(id: str, args: list[str], names: str, **kw) -> Case:
    return Case(f"doctor-{id}", ["doctor", "--work_dir={wd}", *TINY, *args], names, code=1, **kw)


def c(id: str, args: list[str], names: str, **kw) -> Case:
    return Case(f"cache-{id}", ["cache", *args], names, marks=[CACHE_XFAIL], **kw)


PROMPT = "--prompt=a red circle"
CASES = [
    # ---- train: config keys, types, values -------------------------------------------------
    t("unknown-key", ["--train.foo=1"], "train.foo"),
    t("unknown-group", ["--modle.num_layers=2"], "modle.num_layers"),
    t("wrong-type-float", ["--train.lr=fast"], "train.lr"),
    t("wrong-type-int", ["--train.max_steps=many"], "train.max_steps"),
    t("wrong-type-bool", ["--train.visualize=maybe"], "train.visualize"),
    t("zero-batch", ["--train.train_batch_size=0"], "train.train_batch_size"),
    t("negative-steps", ["--train.max_steps=-5"], "train.max_steps"),
    t("negative-lr", ["--train.lr=-1e-4"], "train.lr"),
    t("negative-cfg-scale", ["--train.cfg_scale=-1"], "train.cfg_scale"),
    t("unknown-sampler", ["--train.sampler=ddim"], "train.sampler"),
    t("size-not-divisible-by-patch", ["--model.image_size=17"], "model.image_size"),
    t(
        "size-not-multiple-of-latent-factor",
        ["--vae.type=dc-ae", "--vae.name_or_path=/nowhere", "--model.image_size=48"],
        "model.image_size",
    ),
    t("shapes-image-too-small", ["--model.image_size=4"], "model.image_size"),
    # ---- train: config files -----------------------------------------------------------------
    t("missing-config-file", ["{tmp}/nope.yaml"], "{tmp}/nope.yaml"),
    t("corrupt-yaml", ["{tmp}/bad.yaml"], "{tmp}/bad.yaml", setup=("corrupt_yaml",)),
    t("yaml-is-a-list", ["{tmp}/list.yaml"], "{tmp}/list.yaml", setup=("list_yaml",)),
    t("yaml-unknown-key", ["{tmp}/unknown.yaml"], "train.bogus_key", setup=("unknown_key_yaml",)),
    t("yaml-wrong-type", ["{tmp}/wrong.yaml"], "train.lr", setup=("wrong_type_yaml",)),
    t("two-config-files", ["{tmp}/a.yaml", "{tmp}/b.yaml"], "{tmp}/b.yaml"),
    # ---- train: data, directories, checkpoints -------------------------------------------------
    t(
        "data-root-missing",
        ["--data.type=image_folder", "--data.data_dir=[{tmp}/no_such_data]"],
        "{tmp}/no_such_data",
    ),
    t(
        "empty-dataset",
        ["--data.type=image_folder", "--data.data_dir=[{tmp}/empty_data]"],
        "{tmp}/empty_data",
        setup=("empty_data",),
    ),
    t("data-dir-required", ["--data.type=image_folder"], "data.data_dir"),
    Case(
        "train-uncreatable-work-dir",
        ["train", "--work_dir={tmp}/afile/sub", *TINY, *BOUNDED],
        "{tmp}/afile/sub",
        setup=("afile",),
    ),
    t(
        "uncreatable-null-embed-root",
        ["--train.null_embed_root={tmp}/afile/null"],
        "{tmp}/afile/null",
        setup=("afile",),
    ),
    t("corrupt-resume-target", ["--resume_from={ck}"], "{ck}", setup=("truncate",)),
    t("missing-resume-target", ["--resume_from={tmp}/no_ckpt"], "{tmp}/no_ckpt"),
    t("model-differs-from-checkpoint", ["--model.num_layers=2"], "model.num_layers"),
    t("global-batch-differs", ["--train.train_batch_size=8"], "train_batch_size"),
    # ---- sample --------------------------------------------------------------------------------
    s("missing-checkpoint-flag", [PROMPT], "--checkpoint"),
    s("checkpoint-does-not-exist", ["--checkpoint={tmp}/nope", PROMPT], "{tmp}/nope"),
    s(
        "work-dir-without-checkpoint",
        ["--checkpoint={tmp}/empty_work", PROMPT],
        "{tmp}/empty_work",
        setup=("empty_work",),
    ),
    s("corrupt-checkpoint", ["--checkpoint={ck}", PROMPT], "{ck}", setup=("truncate",)),
    s("unknown-sampler", ["--checkpoint={wd}", PROMPT, "--sampler=ddim"], "--sampler"),
    s("negative-cfg-scale", ["--checkpoint={wd}", PROMPT, "--cfg_scale=-1"], "--cfg_scale"),
    s("empty-prompt-list", ["--checkpoint={wd}"], "--prompt"),
    s("blank-prompt", ["--checkpoint={wd}", "--prompt=   "], "--prompt"),
    s("zero-steps", ["--checkpoint={wd}", PROMPT, "--steps=0"], "--steps"),
    s("wrong-type-steps", ["--checkpoint={wd}", PROMPT, "--steps=many"], "--steps"),
    s("out-not-png", ["--checkpoint={wd}", PROMPT, "--out={tmp}/x.jpg"], "--out"),
    s("out-dir-missing", ["--checkpoint={wd}", PROMPT, "--out={tmp}/nodir/x.png"], "{tmp}/nodir"),
    s("unknown-option", ["--checkpoint={wd}", PROMPT, "--bogus=1"], "--bogus"),
    # ---- doctor: a config that does not resolve, and two failed checks -------------------------
    d("unknown-key", ["--train.foo=1"], "train.foo"),
    d("wrong-type", ["--train.train_batch_size=lots"], "train.train_batch_size"),
    Case("doctor-missing-config", ["doctor", "{tmp}/nope.yaml"], "{tmp}/nope.yaml", code=1),
    Case(
        "doctor-corrupt-yaml",
        ["doctor", "{tmp}/bad.yaml"],
        "{tmp}/bad.yaml",
        code=1,
        setup=("corrupt_yaml",),
    ),
    d(
        "data-root-missing",
        ["--data.type=image_folder", "--data.data_dir=[{tmp}/no_such_data]"],
        "{tmp}/no_such_data",
    ),
    Case(
        "doctor-uncreatable-work-dir",
        ["doctor", "--work_dir={tmp}/afile/sub", *TINY],
        "{tmp}/afile/sub",
        code=1,
        setup=("afile",),
    ),
    # ---- cache (another engineer's command; robust cases only) ---------------------------------
    c("unknown-subcommand", ["frobnicate"], "frobnicate"),
    c("build-missing-config", ["build", "{tmp}/nope.yaml"], "{tmp}/nope.yaml"),
    c("verify-missing-config", ["verify", "{tmp}/nope.yaml"], "{tmp}/nope.yaml"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(k, id=k.id, marks=k.marks) for k in CASES])
def test_bad_input(case: Case, tiny_work_dir: Path, tmp_path: Path) -> None:
    wd = tmp_path / "work"
    shutil.copytree(tiny_work_dir, wd)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    prepare(case.setup, wd, scratch)
    ck = wd / CKPT

    def fill(text: str) -> str:
        return text.replace("{wd}", str(wd)).replace("{ck}", str(ck)).replace("{tmp}", str(scratch))

    before = snapshot(wd)
    assert before, "the work_dir is pre-populated"
    started = time.monotonic()
    done = run_sanakit(*[fill(a) for a in case.args], timeout=120)
    seconds = time.monotonic() - started
    out, err = done.stdout, done.stderr
    assert "Traceback" not in out + err, out + err
    assert done.returncode == case.code, f"exit {done.returncode}\n{out}\n{err}"
    if case.args[0] == "doctor":
        lines = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
        assert not [ln for ln in err.splitlines() if ln.startswith("error:")], err
    else:
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one error line, got {lines}\n{out}\n{err}"
    assert fill(case.names) in lines[0], lines[0]
    after = snapshot(wd)
    changed = [f for f, digest in before.items() if after.get(f) != digest]
    assert not changed, f"files in work_dir changed or vanished: {changed}"
    print(f"{case.id}: {seconds:.2f} s")


@pytest.mark.slow
def test_overlong_prompt_is_truncated_with_a_warning_not_an_error(
    tiny_work_dir: Path, tmp_path: Path
) -> None:
    wd = tmp_path / "work"
    shutil.copytree(tiny_work_dir, wd)
    before = snapshot(wd)
    out = tmp_path / "long.png"
    long_prompt = "a red circle on a dark background " * 20  # far beyond 16 tokens
    done = run_sanakit(
        "sample",
        f"--checkpoint={wd}",
        f"--prompt={long_prompt}",
        "--num_images=1",
        "--steps=2",
        f"--out={out}",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    warnings = [ln for ln in done.stderr.splitlines() if "truncated" in ln]
    assert len(warnings) == 1 and "max_length=16" in warnings[0], done.stderr
    assert out.stat().st_size > 0
    assert snapshot(wd) == before


def test_bad_input_fails_fast_before_heavy_imports(tmp_path: Path) -> None:
    """A config error must not wait for torch/transformers/diffusers to import."""
    started = time.monotonic()
    done = run_sanakit("train", f"--work_dir={tmp_path}/w", "--train.foo=1")
    seconds = time.monotonic() - started
    assert done.returncode == 2 and "train.foo" in done.stderr
    assert seconds < 2.0, f"a config error took {seconds:.2f} s"
