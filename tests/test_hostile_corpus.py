"""Every CLI command under a generated hostile-input corpus (see ``hostile_corpus.py``).

Each case runs ``python -m sanakit ...`` as a real subprocess in its own scratch dir (a copy of
one real 2-step run, made once per module) with HOME/XDG pointed at an empty sentinel dir and
TMPDIR inside the scratch dir, and checks:

* it exits within the bound (a timeout is a hang) and is not killed by a signal,
* no ``Traceback`` anywhere in its output, at most one ``error:`` line, and exactly one when
  train / sample / export / cache build fail,
* nothing written outside the scratch dir (sentinel stays empty, nothing new beside scratch,
  the shared template run untouched, no planted payload ran),
* on failure (non-zero exit) every file that existed before is byte-identical (a
  ``.sanakit.lock`` may come and go); read-only commands (doctor, cache verify, export, sample)
  keep every pre-existing file outside their declared output even when they succeed.

Bounded: ``SANAKIT_FUZZ_CASES`` cases (default 24, for a suite under 10 minutes; set it higher
for a deeper run) from ``SANAKIT_FUZZ_SEED`` (default 16), two at a time
(``SANAKIT_FUZZ_WORKERS``), each killed after ``SANAKIT_FUZZ_TIMEOUT`` s (default 90).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import cli_env
from hostile_corpus import PWNED, Case, generate

import sanakit

SEED = int(os.environ.get("SANAKIT_FUZZ_SEED", "16"))
COUNT = int(os.environ.get("SANAKIT_FUZZ_CASES", "24"))
WORKERS = int(os.environ.get("SANAKIT_FUZZ_WORKERS", "2"))
TIMEOUT = float(os.environ.get("SANAKIT_FUZZ_TIMEOUT", "90"))
MEMORY_KB = 6 * 1024 * 1024  # address-space cap per case: a runaway case must not sink the host
LOCK = ".sanakit.lock"
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")  # "KeyError: ..."
CASES = {case.id: case for case in generate(SEED, COUNT)}
SETUP = [
    "train",
    "--work_dir=w",
    "--train.max_steps=2",
    "--train.save_model_steps=2",
    "--train.train_batch_size=4",
    "--train.visualize=false",
    "--report_to=none",
]
pytestmark = pytest.mark.slow


@dataclass
class Outcome:
    case: Case
    rc: int | None = None
    out: str = ""
    err: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """relpath -> sha256 (regular files), ``link:TARGET`` or ``fifo``; never follows links."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            path = Path(dirpath) / name
            if name == LOCK:
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[str(rel_dir / name)] = f"link:{os.readlink(path)}"
            elif stat.S_ISREG(mode):
                found[str(rel_dir / name)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(rel_dir / name)] = "special"
    return found


def sandbox_env(scratch: Path) -> dict[str, str]:
    """Every per-user location inside the scratch dir; sanakit from this very checkout."""
    home, tmp = scratch / "home", scratch / "tmp"
    env = {k: v for k, v in cli_env().items() if not k.startswith(("XDG_", "HF_", "TORCH_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    for var in ("CACHE", "CONFIG", "DATA", "STATE", "RUNTIME"):
        env[f"XDG_{var}_{'DIR' if var == 'RUNTIME' else 'HOME'}"] = str(home)
    src = str(Path(sanakit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def execute(args: tuple[str, ...], scratch: Path) -> tuple[int | None, str, str]:
    """Run ``python -m sanakit ARGS`` in ``scratch``; (None, ...) if it outlived TIMEOUT."""
    wrapper = f'ulimit -v {MEMORY_KB} && exec "$0" -m sanakit "$@"'
    proc = subprocess.Popen(
        ["bash", "-c", wrapper, sys.executable, *args],
        cwd=scratch,
        env=sandbox_env(scratch),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so a hung case and its workers can be killed together
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace")


def stage(case: Case, template: Path, base: Path) -> Path:
    scratch = base / "scratch"
    shutil.copytree(template / "w", scratch / "w", symlinks=True)
    (scratch / "afile").write_text("I am a file, not a directory\n")
    (scratch / "dir.png").mkdir()
    (scratch / "home").mkdir()
    (scratch / "tmp").mkdir()
    case.prepare(scratch)
    return scratch


def output_problems(outcome: Outcome) -> list[str]:
    """Exit status and console checks."""
    args, rc, text = outcome.case.args, outcome.rc, outcome.out + outcome.err
    if rc is None:
        return [f"hang: still running after {TIMEOUT:.0f} s (killed)"]
    problems = []
    if rc < 0:
        problems.append(f"killed by signal {-rc}")
    if "Traceback" in text:
        last = [line for line in text.splitlines() if EXCEPTION.match(line)]
        problems.append(f"traceback: {last[-1][:160] if last else '?'}")
    errors = [line for line in outcome.err.splitlines() if line.startswith("error:")]
    errors += [line for line in outcome.out.splitlines() if line.startswith("error:")]
    reporting = args[0] == "doctor" or args[:2] == ("cache", "verify")  # FAIL / report lines
    if len(errors) > 1:
        problems.append(f"{len(errors)} error: lines: {errors[0][:120]} | {errors[1][:120]}")
    elif rc > 0 and not errors and not reporting and "Traceback" not in text:
        tail = (outcome.err.strip().splitlines() or ["(no output)"])[-1][:160]
        problems.append(f"exit {rc} without an error: line: {tail}")
    return problems


def file_problems(case: Case, rc: int | None, before: dict, after: dict) -> list[str]:
    """Pre-existing files lost or changed (on failure; always for read-only commands)."""
    failed = rc != 0
    if not failed and case.outputs is None:
        return []
    allowed = () if failed else tuple(case.outputs or ())

    lost = [rel for rel in before if rel not in after and rel not in allowed]
    changed = [r for r in before if r in after and after[r] != before[r] and r not in allowed]
    problems = []
    when = "failed run" if failed else "read-only command (exit 0)"
    if lost:
        problems.append(f"{when} deleted {len(lost)} pre-existing file(s), e.g. {lost[0]}")
    if changed:
        problems.append(f"{when} changed {len(changed)} pre-existing file(s), e.g. {changed[0]}")
    return problems


def run_case(case: Case, template: Path, template_files: dict, base: Path) -> Outcome:
    scratch = stage(case, template, base)
    before = snapshot(scratch, skip=("tmp", "home"))
    started = time.monotonic()
    rc, out, err = execute(case.args, scratch)
    outcome = Outcome(case, rc, out, err, time.monotonic() - started)
    after = snapshot(scratch, skip=("tmp", "home"))
    outcome.problems = output_problems(outcome) + file_problems(case, rc, before, after)
    sentinel = sorted(p.name for p in (scratch / "home").iterdir())
    if sentinel:
        outcome.problems.append(f"wrote outside the scratch dir: $HOME/{sentinel[0]}")
    beside = sorted(p.name for p in base.iterdir() if p.name != "scratch")
    if beside:
        outcome.problems.append(f"wrote beside the scratch dir: {beside[0]}")
    if any(Path(rel).name == PWNED for rel in after) or (base / PWNED).exists():
        outcome.problems.append("a planted payload ran (PWNED exists)")
    if snapshot(template) != template_files:
        outcome.problems.append("the shared template run (outside scratch) changed")
    return outcome


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One real tiny run (the issue's setup), copied into every case's scratch dir."""
    root = tmp_path_factory.mktemp("hostile_template")
    done = subprocess.run(
        [sys.executable, "-m", "sanakit", *SETUP],
        cwd=root,
        env=sandbox_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.rmtree(root / "home", ignore_errors=True)
    shutil.rmtree(root / "tmp", ignore_errors=True)
    return root


@pytest.fixture(scope="module")
def outcomes(request, template, tmp_path_factory) -> dict[str, Outcome]:
    """Run every selected case, WORKERS at a time (each test then reports its own)."""
    selected = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    (template / "home").mkdir()
    (template / "tmp").mkdir()
    template_files = snapshot(template)
    started = time.monotonic()

    def one(case_id: str) -> Outcome:
        base = tmp_path_factory.mktemp(f"case{case_id[:2]}")
        try:
            outcome = run_case(CASES[case_id], template, template_files, base)
        except Exception as err:  # one broken case must not hide the other cases' results
            return Outcome(CASES[case_id], problems=[f"HARNESS error (not sanakit): {err!r}"])
        if not outcome.problems:  # ~20 MB each; failing cases stay for inspection
            shutil.rmtree(base, ignore_errors=True)
        return outcome

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = {o.case.id: o for o in pool.map(one, selected)}
    yield results
    failed = [o for o in results.values() if o.problems]
    lines = [
        f"hostile corpus (seed {SEED}): {len(results)} generated cases ran in "
        f"{time.monotonic() - started:.0f} s; {len(failed)} found problems"
    ] + [f"  {o.case.id}: {'; '.join(o.problems)}" for o in failed]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


@pytest.mark.parametrize("case_id", list(CASES))
def test_hostile_case(case_id: str, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case_id]
    shown = " ".join(a if len(a) < 80 else a[:77] + "..." for a in outcome.case.args)
    assert not outcome.problems, (
        f"`sanakit {shown}` (exit {outcome.rc}, {outcome.seconds:.1f} s): "
        + "; ".join(outcome.problems)
        + f"\n--- stderr tail ---\n{outcome.err[-1500:]}\n--- stdout tail ---\n{outcome.out[-500:]}"
    )


def test_generator_is_deterministic() -> None:
    again = generate(SEED, COUNT)
    assert [c.id for c in again] == list(CASES)
    assert [c.args for c in again] == [c.args for c in CASES.values()]
    assert len(CASES) == COUNT
