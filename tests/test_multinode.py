"""Two "nodes" on this machine: two torchrun launchers (``--nnodes=2``, static rendezvous on
127.0.0.1, one gloo process each). A node whose copy of a directory is private runs in its own
mount namespace with a tmpfs over that path (``unshare --mount``; needs root, as CI has)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST, checkpoint_dir, cli_env, losses, run_sanakit
from safetensors.torch import load_file

from sanakit.io.topology import RootLayout, Topology
from sanakit.train.nodes import CheckpointView, disagreement, unshared_checkpoints

STEPS = 8  # 6 global batches of 8 per epoch: the runs cross an epoch
BASE = [
    *FAST, "--data.max_samples=48", "--train.ema_rate=0.9", "--train.save_model_steps=2",
    f"--train.max_steps={STEPS}",
]  # fmt: skip
NULL_FILE = "null_embed_diffusers_minilm_8token_384.pth"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a private view of a path needs `unshare --mount` (root)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(node: int, port: int, args: list[str], restarts: int = 0) -> list[str]:
    """torchrun for one node: static rendezvous (node ranks as given), or with restarts the
    c10d one (torch reuses the static rendezvous's store across restarts; see README)."""
    if restarts:
        rdzv = ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test"]
    else:
        rdzv = [f"--node_rank={node}", "--rdzv_backend=static", "--master_addr=127.0.0.1"]
        rdzv.append(f"--master_port={port}")
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        *rdzv, f"--max_restarts={restarts}", "-m", "sanakit", *args,
    ]  # fmt: skip


def start_node(command: list[str], hide: list[Path] = (), report: Path | None = None):
    """One launcher; with ``hide``, in a mount namespace where each path is a fresh tmpfs.
    ``report`` gets the files this node saw under the hidden paths when it ended. Output goes
    to a file: a pipe that nobody reads while the other node runs could fill and stall it."""
    if hide:
        mounts = " && ".join(f"mkdir -p '{p}' && mount -t tmpfs none '{p}'" for p in hide)
        after = f"; find {' '.join(map(str, hide))} -type f > '{report}'" if report else ""
        script = f'{mounts} && {{ "$@"; rc=$?{after}; exit $rc; }}'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"] + [
            *command
        ]
    log = tempfile.TemporaryFile("w+")
    env = cli_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # a fresh store per restart round
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    """(exit code, output) of each launcher; a hang kills them all and fails."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q.pid)
            tails = [output(q)[-1500:] for q in procs]
            pytest.fail(f"the launchers hung for {timeout} s: " + "\n----\n".join(tails))
    return [(p.returncode, output(p)) for p in procs]


def kill_tree(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        for child in proc.children(recursive=True) + [proc]:
            child.kill()
    except psutil.NoSuchProcess:
        pass


def two_nodes(work: Path, per_node: list[list[str]], hide1=(), restarts=0, report=None):
    port = free_port()
    return [
        start_node(
            node_command(n, port, ["train", f"--work_dir={work}", *BASE, *per_node[n]], restarts),
            hide=hide1 if n == 1 else (),
            report=report,
        )
        for n in (0, 1)
    ]


def worker_of(launcher: subprocess.Popen) -> psutil.Process:
    """The training process a launcher (or its namespace shell) started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            cmd = p.cmdline()
            if "sanakit" in cmd and "torch.distributed.run" not in cmd:
                return p
        time.sleep(0.05)
    raise AssertionError("no worker process")


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def cache_entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """2 nodes x batch 4, each node given its own null_embed_root and cache_dir."""
    base = tmp_path_factory.mktemp("multinode")
    per_node = [
        [f"--train.null_embed_root={base / f'null{n}'}", f"--train.cache_dir={base / f'cache{n}'}"]
        for n in (0, 1)
    ]
    results = finish(two_nodes(base / "work", per_node))
    for code, out in results:
        assert code == 0, out[-3000:]
    (base / "node0.log").write_text(results[0][1])
    return base


@pytest.mark.slow
def test_two_nodes_with_their_own_roots_equal_one_process(uninterrupted, tmp_path):
    base = uninterrupted
    log = (base / "node0.log").read_text()
    assert "train.null_embed_root " + str(base / "null0") + ": node-local" in log
    assert "train.cache_dir " + str(base / "cache0") + ": node-local" in log
    assert "checkpoints: shared by all 2 nodes" in log
    assert not list(base.rglob(".sanakit-probe-*"))
    for n in (0, 1):  # each node built its own null embedding and cached its own captions
        assert (base / f"null{n}" / NULL_FILE).is_file()
        assert cache_entries(base / f"cache{n}")
    # 1 process x batch 8: the same global batches
    done = run_sanakit(
        "train",
        f"--work_dir={tmp_path}",
        *BASE,
        "--train.train_batch_size=8",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    multi, single = losses(base / "work"), losses(tmp_path)
    assert multi == pytest.approx(single, rel=1e-6)
    diff = max_diff(
        checkpoint_dir(base / "work", STEPS) / "model.safetensors",
        checkpoint_dir(tmp_path, STEPS) / "model.safetensors",
    )
    worst = max(abs(a - b) for a, b in zip(multi, single, strict=True))
    print(f"2 nodes vs 1 process: max |loss diff| {worst:.3g}, max |weight diff| {diff:.3g}")
    assert diff < 1e-4, diff  # as test_distributed: a tenth of one AdamW step at lr 1e-3


@needs_root
@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_newest_checkpoint_with_the_same_results(
    uninterrupted, tmp_path
):
    """torchrun --max_restarts=1 on both nodes; one node's worker is killed (-9) after a
    checkpoint; both nodes restart and resume. The second launcher keeps its artifacts at the
    SAME path as the first, private to it (a tmpfs in its mount namespace): each builds its own."""
    art = tmp_path / "artifacts"
    roots = [f"--train.null_embed_root={art / 'null'}", f"--train.cache_dir={art / 'cache'}"]
    report = tmp_path / "node1_saw.txt"
    work = tmp_path / "work"
    procs = two_nodes(work, [roots, roots], hide1=[art], restarts=1, report=report)
    metrics = work / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, "no 3 steps"
        time.sleep(0.02)
    worker_of(procs[1]).send_signal(signal.SIGKILL)  # step 2's checkpoint is complete
    results = finish(procs)
    for code, out in results:
        assert code == 0, out[-3000:]
    both = results[0][1] + results[1][1]  # c10d numbers the nodes in its own order
    assert "resumed from" in both, both[-3000:]  # the kill came before the end
    assert f"train.null_embed_root {art / 'null'}: node-local" in both
    assert losses(work) == losses(uninterrupted / "work")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = checkpoint_dir(work, STEPS) / name, checkpoint_dir(uninterrupted / "work", STEPS)
        assert max_diff(a, b / name) == 0.0
    seen = report.read_text()  # node 1's private copy
    assert NULL_FILE in seen and "/cache/text/" in seen
    assert (art / "null" / NULL_FILE).is_file() and cache_entries(art / "cache")  # node 0's


@needs_root
@pytest.mark.slow
def test_a_node_that_does_not_see_the_checkpoints_stops_both_launchers(uninterrupted, tmp_path):
    """Resume where node 1 sees no checkpoints (its own empty checkpoints/), or all but the
    newest one: one error naming the path and the node on both launchers, no hang, nothing
    written. Also `sanakit doctor` on two nodes with node 1's null_embed_root private."""
    runs = {}
    for case, hidden in (("dir", "checkpoints"), ("newest", f"checkpoints/step_{STEPS:08d}")):
        work = tmp_path / case
        shutil.copytree(uninterrupted / "work", work)
        runs[case] = (work, two_nodes(work, [[], []], hide1=[work / hidden]))
    doctor_work = tmp_path / "doctor"
    shutil.copytree(uninterrupted / "work", doctor_work)
    port = free_port()
    doctor = [
        start_node(
            node_command(n, port, ["doctor", f"--work_dir={doctor_work}", *BASE]),
            hide=[doctor_work / "pretrained_models", doctor_work / "checkpoints"] if n else [],
        )
        for n in (0, 1)
    ]
    expected = {
        "dir": f"error: {tmp_path / 'dir' / 'checkpoints'} is not shared by all 2 nodes: node 1 ",
        "newest": (
            "error: node 1 (host {host}, rank 1) cannot use the checkpoint rank 0 resumes from, "
            f"{checkpoint_dir(tmp_path / 'newest', STEPS)} (no manifest.json there)"
        ).format(host=socket.gethostname()),
    }
    for case, (work, procs) in runs.items():
        before = sorted(p.name for p in (work / "checkpoints").iterdir())
        results = finish(procs, timeout=120)
        lines = []
        for code, out in results:
            assert code != 0, out[-3000:]  # torchrun's own code: 1
            errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1, out[-3000:]
            lines.append(errors[0])
        assert lines[0] == lines[1] and lines[0].startswith(expected[case]), lines
        assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before
        assert not list(work.rglob(".sanakit-probe-*"))  # the probes leave nothing behind
        assert len(losses(work)) == STEPS
    for code, out in finish(doctor, timeout=120):
        line = next(ln for ln in out.splitlines() if " nodes: " in ln)
        assert code == 1 and line.startswith("FAIL nodes: 2 process(es) on 2 node(s)"), out
        assert "train.null_embed_root " in line and "pretrained_models: node-local" in line
        assert "cache: shared by all 2 nodes" in line
        assert "checkpoints: node-local" in line


# ---- the decisions themselves, from what the nodes reported (no processes) ----------------------
TOPO = Topology(rank=0, node_of_rank=(0, 0, 1, 1, 2, 2), hosts=("a", "b", "c"))


def layout(*seen: set[int], problems=("", "", "")) -> RootLayout:
    return RootLayout("train.cache_dir", Path("/x"), tuple(map(frozenset, seen)), problems)


def test_each_group_of_nodes_sharing_a_root_has_one_builder() -> None:
    shared = layout({0, 1, 2}, {0, 1, 2}, {0, 1, 2})
    assert shared.shared and [shared.builder_node(n) for n in range(3)] == [0, 0, 0]
    local = layout({0}, {1}, {2})
    assert local.node_local and [local.builder_node(n) for n in range(3)] == [0, 1, 2]
    mixed = layout({0}, {1, 2}, {1, 2})  # nodes 1 and 2 share storage node 0 does not see
    assert [mixed.builder_node(n) for n in range(3)] == [0, 1, 1]
    assert mixed.describe() == (
        "mixed: node 0 shares it with nodes 0; node 1 shares it with nodes 1,2; "
        "node 2 shares it with nodes 1,2"
    )
    # a node that cannot write its probe but reads node 0's files loads what node 0 built
    read_only = layout({0, 2}, {0, 2}, {0, 2}, problems=("", "Read-only file system", ""))
    assert [read_only.builder_node(n) for n in range(3)] == [0, 0, 0]
    assert [TOPO.leader_of(n) for n in range(3)] == [0, 2, 4]
    assert TOPO.where(3) == "node 1 (host b, rank 3)"


def test_checkpoints_must_be_seen_by_every_node() -> None:
    assert unshared_checkpoints(TOPO, layout({0, 1, 2}, {0, 1, 2}, {0, 1, 2})) == ""
    line = unshared_checkpoints(TOPO, layout({0, 1}, {0, 1}, {2}))
    assert line.startswith("/x is not shared by all 3 nodes: node 2 (host c, rank 4) does not see")


def view(listing=("step_00000002", "step_00000004"), problem="", sha="s") -> CheckpointView:
    return CheckpointView("/w/checkpoints", listing, problem, sha)


def test_every_rank_must_see_the_checkpoint_rank_0_resumes_from() -> None:
    chosen = Path("/w/checkpoints/step_00000004")
    same = [view() for _ in range(6)]
    assert disagreement(TOPO, same, chosen) == ""
    missing = [*same[:3], view(listing=("step_00000002",)), *same[4:]]
    assert disagreement(TOPO, missing, chosen).startswith(
        "node 1 (host b, rank 3) sees other checkpoints in /w/checkpoints than rank 0 in "
        "/w/checkpoints (missing there: step_00000004)"
    )
    torn = [*same[:5], view(problem="missing file model.safetensors", sha="")]
    assert disagreement(TOPO, torn, chosen).startswith(
        f"node 2 (host c, rank 5) cannot use the checkpoint rank 0 resumes from, {chosen} "
        "(missing file model.safetensors there)"
    )
    other = [*same[:5], view(sha="t")]
    assert "its manifest differs from rank 0's" in disagreement(TOPO, other, chosen)
    assert disagreement(TOPO, [view(listing=())] * 6, None) == ""  # all start fresh


AGREE_SCRIPT = """
import os, sys
from pathlib import Path
import torch.distributed as dist
from sanakit.errors import ArtifactError, SanakitError
from sanakit.io.topology import agree, discover, probe_roots
rank = int(sys.argv[1])
os.environ["GROUP_RANK"] = sys.argv[1]  # each process is its own node
address = "tcp://127.0.0.1:" + sys.argv[2]
dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
topo = discover()
shared, own = Path(sys.argv[3]) / "shared", Path(sys.argv[3]) / f"own{rank}"
layouts = probe_roots(topo, {"a": shared, "b": own})
print(layouts["a"].describe(), "|", layouts["b"].describe(), "|", layouts["b"].builder_node(rank))
def build():
    if rank == 1:
        raise ArtifactError("cannot create null embedding in /x: read-only file system")
    return "built"
try:
    agree(topo, build)
except SanakitError as err:  # the same LaunchError on both
    print("error:", err, err.exit_code)
"""


@pytest.mark.slow
def test_a_step_failing_on_one_node_is_the_same_error_on_every_node(tmp_path):
    """probe_roots on real files (one directory both see, one per process) and ``agree``: the
    failure of one node is raised, naming it, on every node instead of a hang."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGREE_SCRIPT, str(r), port, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )  # fmt: skip
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (out, err) in enumerate(outs):
        lines = out.splitlines()
        assert lines[0] == (
            f"shared by all 2 nodes | node-local (each of the 2 nodes has its own) | {r}"
        ), err[-2000:]
        assert lines[1] == (
            f"error: node 1 (host {socket.gethostname()}, rank 1): cannot create null embedding "
            "in /x: read-only file system 2"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # probes and their dirs removed
