"""Where the processes of a launch run, and which of their directories are the same storage.

A multi-node launch (torchrun or ``accelerate launch``, one launcher per node) gives every
process a global rank; its node is torchrun's ``GROUP_RANK`` (else its host name). Whether a
directory is shared by the nodes (a network filesystem) or private to each (node-local scratch)
cannot be told from its path, and on network filesystems file locks are unreliable, so
:func:`probe_roots` asks the storage itself: each node's leader (its lowest rank) writes a probe
file, named by a token new to this probe, into its own copy of the directory; after a barrier
each leader looks for every node's probe file; the answers are gathered. Nodes that see each
other's probes share the storage, and the lowest of them builds for all of them. A probe name is
never looked up before it was written, so no negative lookup cache can hide it.

:func:`agree` runs one step of the start-up on every rank and turns a failure on any rank into
the same one-line error on every rank: a rank never waits forever for a peer that gave up.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from sanakit.errors import SanakitError

T = TypeVar("T")


class LaunchError(SanakitError):
    """A start-up step failed on some rank; every rank of the launch reports it the same way."""


@dataclass(frozen=True)
class Topology:
    """This process's place in the launch: global rank, node, and the node of every rank."""

    rank: int
    node_of_rank: tuple[int, ...]  # node index of every global rank (rank 0 is on node 0)
    hosts: tuple[str, ...]  # host name of every node

    @property
    def world_size(self) -> int:
        return len(self.node_of_rank)

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def leader_of(self, node: int) -> int:
        """The lowest global rank on ``node``: it probes and builds for its node."""
        return self.node_of_rank.index(node)

    @property
    def leader(self) -> bool:
        return self.leader_of(self.node) == self.rank

    def where(self, rank: int) -> str:
        """Words that locate a rank for an error line: ``node 1 (host h, rank 1)``."""
        node = self.node_of_rank[rank]
        return f"node {node} (host {self.hosts[node]}, rank {rank})"

    def describe(self) -> str:
        per_node = [self.node_of_rank.count(n) for n in range(self.nodes)]
        counts = "x".join(str(c) for c in sorted(set(per_node)))
        return f"{self.world_size} process(es) on {self.nodes} node(s) ({counts} per node)"


def gather(topo: Topology, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable, small), in rank order; also a barrier."""
    if not topo.distributed:
        return [value]
    out: list[Any] = [None] * topo.world_size
    dist.all_gather_object(out, value)
    return out


def discover() -> Topology:
    """The topology of the running launch (one process when torch.distributed is not set up)."""
    host = socket.gethostname()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Topology(0, (0,), (host,))
    group = os.environ.get("GROUP_RANK", "").strip()  # torchrun: the node's rank in the launch
    key = f"group {group}" if group else f"host {host}"
    world = dist.get_world_size()
    table: list[Any] = [None] * world
    dist.all_gather_object(table, (key, host))
    keys: list[str] = []
    hosts: list[str] = []
    for k, h in table:  # nodes numbered in the order of their lowest rank
        if k not in keys:
            keys.append(k)
            hosts.append(h)
    node_of_rank = tuple(keys.index(k) for k, _ in table)
    return Topology(dist.get_rank(), node_of_rank, tuple(hosts))


def agree(topo: Topology, step: Callable[[], T]) -> T:
    """``step()`` on this rank; if it raised a SanakitError on any rank, every rank raises it.

    The error names the first failing rank's node. Use it for every start-up step that can
    fail on some ranks only (a directory one node cannot write, a file it cannot read).
    """
    result: Any = None
    error: tuple[str, int] | None = None
    try:
        result = step()
    except SanakitError as err:
        if not topo.distributed:
            raise
        error = (str(err), err.exit_code)
    failures = [(r, e) for r, e in enumerate(gather(topo, error)) if e is not None]
    if failures:
        rank, (message, code) = failures[0]
        more = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
        raise LaunchError(f"{topo.where(rank)}{more}: {message}", exit_code=code)
    return result


@dataclass(frozen=True)
class RootLayout:
    """How the nodes see one directory: for each node, the nodes whose probe files it saw."""

    name: str  # the setting, for messages: "train.null_embed_root"
    path: Path  # this rank's copy of the directory
    seen: tuple[frozenset[int], ...]  # per node; its own node is missing when it could not write
    problems: tuple[str, ...]  # per node: why it could not probe ("" when it could)

    @property
    def shared(self) -> bool:
        everyone = frozenset(range(len(self.seen)))
        return all(s == everyone for s in self.seen)

    @property
    def node_local(self) -> bool:
        return len(self.seen) > 1 and all(s == {n} for n, s in enumerate(self.seen))

    def builder_node(self, node: int) -> int:
        """The node whose leader builds what ``node`` reads from this directory."""
        return min(self.seen[node] | {node})

    def describe(self) -> str:
        n = len(self.seen)
        if n == 1:
            return "one node"
        if self.shared:
            return f"shared by all {n} nodes"
        if self.node_local:
            return f"node-local (each of the {n} nodes has its own)"
        parts = []
        for node in range(n):
            if self.problems[node]:
                parts.append(f"node {node} cannot write it ({self.problems[node]})")
            else:
                group = ",".join(str(m) for m in sorted(self.seen[node]))
                parts.append(f"node {node} shares it with nodes {group}")
        return "mixed: " + "; ".join(parts)


def probe_name(token: str, name: str, node: int) -> str:
    return f".sanakit-probe-{token}-{name.replace('.', '_')}-node{node}"


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return the ones this call created, deepest
    first (another node may create the same ones at the same time: those are not ours)."""
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
            created.append(d)
        except FileExistsError:
            pass
    return list(reversed(created))


def _write_probe(root: Path, file_name: str) -> tuple[list[Path], str]:
    """(directories created, "") after writing the probe file, or ([...], reason)."""
    created: list[Path] = []
    try:
        created = _make_dirs(root)
        with open(root / file_name, "xb") as fh:
            fh.write(b"sanakit probe\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        return created, f"{err.strerror or err}"
    return created, ""


def _remove_probes(roots: dict[str, Path], names: dict[str, str]) -> None:
    for name, root in roots.items():
        try:
            (Path(root) / names[name]).unlink(missing_ok=True)
        except OSError:
            pass


def _remove_dirs(created: list[Path]) -> None:
    # deepest first, across all roots; a directory someone filled meanwhile stays
    for d in sorted(created, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


def probe_roots(topo: Topology, roots: dict[str, Path]) -> dict[str, RootLayout]:
    """How the nodes see each directory in ``roots`` (setting name -> this rank's path).

    Collective: every rank calls it with the same names. Leaves nothing behind: probe files are
    removed, and so are directories made for them.
    """
    if topo.nodes == 1:
        return {n: RootLayout(n, Path(p), (frozenset({0}),), ("",)) for n, p in roots.items()}
    token = gather(topo, secrets.token_hex(8) if topo.rank == 0 else None)[0]
    mine = {n: probe_name(token, n, topo.node) for n in roots}
    created: list[Path] = []
    problems = {n: "" for n in roots}
    if topo.leader:
        for n, root in roots.items():
            made, problems[n] = _write_probe(Path(root), mine[n])
            created += made
    gather(topo, None)  # every probe file is written before anyone looks
    answer = None
    if topo.leader:
        answer = {
            n: (
                frozenset(
                    m for m in range(topo.nodes) if (Path(r) / probe_name(token, n, m)).exists()
                ),
                problems[n],
            )
            for n, r in roots.items()
        }
    answers = gather(topo, answer)
    if topo.leader:
        _remove_probes(roots, mine)
    gather(topo, None)  # every probe file is gone before directories are removed
    if topo.leader:
        _remove_dirs(created)
    leaders = [answers[topo.leader_of(node)] for node in range(topo.nodes)]
    return {
        n: RootLayout(
            n,
            Path(r),
            tuple(a[n][0] for a in leaders),
            tuple(a[n][1] for a in leaders),
        )
        for n, r in roots.items()
    }


def join() -> bool:
    """Join the launch's process group from the launcher's environment (for commands that do
    not train, e.g. ``sanakit doctor``); True when this call set it up."""
    if not dist.is_available() or dist.is_initialized() or not os.environ.get("MASTER_ADDR"):
        return False
    dist.init_process_group("gloo", timeout=timedelta(minutes=2))
    return True


def leave() -> None:
    """Leave the launch's process group, if this process joined one.

    A process that exits with the group still set up can abort in gloo's threads
    ("terminate called without an active exception") instead of exiting with its own code.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
