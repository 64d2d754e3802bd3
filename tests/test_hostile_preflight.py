"""Issue 16, items 10 and 11: every path problem fails train's preflight, before anything is
written into the work dir.

A real 2-step run's work dir is copied, one path is made unusable (a cache, null-embedding root,
checkpoints, vis or logs directory under or at a regular file; a log file that is a directory),
and the same ``train`` is run again. It must exit 2 with one ``error:`` line naming the path, no
traceback, and leave every file and directory that was there before byte-identical (before the
fix, ``config.yaml`` was rewritten with the rejected value and some cases failed only at the
first checkpoint save, after training).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY, run_sanakit, the_error_line

# the options of the good run that made the work dir (conftest's tiny_work_dir), so that a
# rejected run differs from an accepted one only by the bad path
RUN = [*TINY, "--train.max_steps=2", "--train.save_model_steps=2"]

pytestmark = pytest.mark.slow  # every case runs the CLI in a subprocess


def tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` (and root itself): sha256 of a file, else its kind."""
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    out = {}
    for p in paths:
        key = str(p.relative_to(root)) if p != root else "."
        if p.is_symlink():
            out[key] = "symlink " + str(p.readlink())
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir" if p.is_dir() else "missing"
    return out


def make_file(path: Path) -> None:
    """Replace whatever is at ``path`` with a regular file."""
    if path.is_dir():
        shutil.rmtree(path)
    path.write_text("a regular file where sanakit wants a directory\n")


def make_dir(path: Path) -> None:
    """Replace whatever is at ``path`` with a directory."""
    path.unlink(missing_ok=True)
    path.mkdir()


@dataclass
class Case:
    id: str
    args: list[str]  # {wd}: the work dir, {afile}: a regular file outside it
    names: str  # the path the error line must name
    setup: Callable[[Path], None] | None = None  # damage inside the work dir


CASES = [
    Case("cache-dir-under-a-file", ["--train.cache_dir={afile}/c"], "{afile}/c"),
    Case("cache-dir-is-a-file", ["--train.cache_dir={afile}"], "{afile}"),
    Case("default-cache-is-a-file", [], "{wd}/cache", lambda wd: make_file(wd / "cache")),
    Case("null-embed-root-under-a-file", ["--train.null_embed_root={afile}/n"], "{afile}/n"),
    Case("checkpoints-is-a-file", [], "{wd}/checkpoints", lambda wd: make_file(wd / "checkpoints")),
    Case(
        "vis-is-a-file",
        ["--train.visualize=true"],
        "{wd}/vis",
        lambda wd: make_file(wd / "vis"),
    ),
    Case(
        "logs-is-a-file",
        ["--report_to=tensorboard"],
        "{wd}/logs",
        lambda wd: make_file(wd / "logs"),
    ),
    Case("train-log-is-a-dir", [], "{wd}/train.log", lambda wd: make_dir(wd / "train.log")),
    Case("metrics-is-a-dir", [], "{wd}/metrics.jsonl", lambda wd: make_dir(wd / "metrics.jsonl")),
    Case("config-yaml-is-a-dir", [], "{wd}/config.yaml", lambda wd: make_dir(wd / "config.yaml")),
]


@pytest.fixture
def scratch(tiny_work_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a private copy of the good run's work dir, a regular file beside it)."""
    wd = tmp_path / "w"
    shutil.copytree(tiny_work_dir, wd)
    afile = tmp_path / "afile"
    afile.write_text("I am a file, not a directory\n")
    return wd, afile


def test_the_good_run_is_accepted_again(scratch: tuple[Path, Path]) -> None:
    """The control: without a bad path the same command runs (it resumes at its last step)."""
    wd, _ = scratch
    done = run_sanakit("train", f"--work_dir={wd}", *RUN, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_path_is_refused_before_anything_is_written(
    case: Case, scratch: tuple[Path, Path]
) -> None:
    wd, afile = scratch
    if case.setup is not None:
        case.setup(wd)

    def fill(text: str) -> str:
        return text.replace("{wd}", str(wd)).replace("{afile}", str(afile))

    before, file_before = tree(wd), tree(afile)
    done = run_sanakit("train", f"--work_dir={wd}", *RUN, *map(fill, case.args), timeout=240)
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    line = the_error_line(done)
    assert line.startswith("error: FAIL "), line  # refused by the preflight, not midway
    assert fill(case.names) in line, line
    assert tree(wd) == before, "the rejected run changed the work dir"
    assert tree(afile) == file_before


@pytest.mark.parametrize("where", ["afile", "afile/w"])
def test_a_work_dir_that_is_or_lies_under_a_file_is_refused(
    where: str, scratch: tuple[Path, Path]
) -> None:
    _, afile = scratch
    work_dir = afile.parent / where
    before = tree(afile)
    done = run_sanakit("train", f"--work_dir={work_dir}", *RUN)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(work_dir) in the_error_line(done)
    assert tree(afile) == before
