"""What the processes of a launch agree on before the first step, across nodes too.

Ranks on different nodes may see different files under the same path. Before training every
rank takes part in three decisions, and a problem with any of them is one error line on every
rank (never one node training while another waits forever):

1. How the nodes see the artifact roots and ``work_dir/checkpoints`` (``io/topology.py``
   probes them). Rank 0 writes every checkpoint and every rank reads it at resume, so a
   checkpoints directory some node does not share is refused at start.
2. Which checkpoint the run continues from. Rank 0 chooses (it alone performs the one write a
   resume may need and the deep verification); every rank then checks that it sees the same
   list of checkpoints and that exact checkpoint (same manifest). Any difference is refused,
   naming the path and the node.
3. Where the null embedding is built: once for each group of nodes sharing its root (once in
   all when shared, once per node when node-local). The others load it once the builders are
   done. Caches need no such election: entries are content-keyed files that each rank writes
   atomically for the samples it encodes, correct in a shared and in a node-local cache dir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sanakit.config import Config, null_embed_root
from sanakit.embeddings.store import cache_root
from sanakit.errors import CheckpointError
from sanakit.io.atomic import sha256_file
from sanakit.io.checkpoint import candidates, verify_checkpoint
from sanakit.io.manifest import MANIFEST_NAME
from sanakit.io.topology import RootLayout, Topology, agree, discover, gather, probe_roots
from sanakit.models.text.base import TextEncoder
from sanakit.models.text.null_embedding import NullEmbedding, obtain_null_embedding
from sanakit.train.resume import checkpoints_dir, resolve_resume

log = logging.getLogger("sanakit")

NULL_ROOT, CACHE_DIR, CHECKPOINTS = "train.null_embed_root", "train.cache_dir", "checkpoints"
SHARE_HINT = "put work_dir on storage that every node mounts at the same path"


def run_roots(cfg: Config) -> dict[str, Path]:
    """The directories whose layout across nodes matters, by the setting that names them."""
    return {
        NULL_ROOT: null_embed_root(cfg),
        CACHE_DIR: cache_root(cfg),
        CHECKPOINTS: checkpoints_dir(cfg),
    }


def describe_layouts(layouts: dict[str, RootLayout]) -> str:
    return "; ".join(f"{name} {lay.path}: {lay.describe()}" for name, lay in layouts.items())


def unshared_checkpoints(topo: Topology, layout: RootLayout) -> str:
    """Why ``layout`` (of work_dir/checkpoints) cannot hold this launch's checkpoints, or ""."""
    if layout.shared:
        return ""
    blind = [n for n in range(topo.nodes) if 0 not in layout.seen[n]]
    node = blind[0] if blind else 0
    problem = layout.problems[node]
    sees = f"cannot write there ({problem})" if problem else "does not see what rank 0 writes there"
    return (
        f"{layout.path} is not shared by all {topo.nodes} nodes: "
        f"{topo.where(topo.leader_of(node))} {sees}; rank 0 writes every checkpoint and every "
        f"node reads it to resume: {SHARE_HINT}"
    )


@dataclass(frozen=True)
class CheckpointView:
    """What one rank sees of the checkpoints: the ``step_N`` names, and rank 0's choice."""

    directory: str
    listing: tuple[str, ...]
    problem: str  # why this rank cannot use rank 0's choice ("" when it can)
    manifest_sha256: str


def view_of(cfg: Config, chosen: Path | None) -> CheckpointView:
    d = checkpoints_dir(cfg)
    latest = cfg.resume_from == "latest"
    listing = tuple(p.name for _, p in candidates(d)) if latest else ()
    if chosen is None:
        return CheckpointView(str(d), listing, "", "")
    problem = verify_checkpoint(chosen, deep=False)  # rank 0 hashed every file already
    sha = "" if problem else sha256_file(chosen / MANIFEST_NAME)
    return CheckpointView(str(d), listing, problem or "", sha)


def _names(names: set[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


def disagreement(topo: Topology, views: list[CheckpointView], chosen: Path | None) -> str:
    """The first rank whose view differs from rank 0's, in words; "" when all agree."""
    ref = views[0]
    for rank, view in enumerate(views):
        where = topo.where(rank)
        if view.listing != ref.listing:
            diff = [
                f"only there: {_names(set(view.listing) - set(ref.listing))}"
                if set(view.listing) - set(ref.listing) else "",
                f"missing there: {_names(set(ref.listing) - set(view.listing))}"
                if set(ref.listing) - set(view.listing) else "",
            ]  # fmt: skip
            return (
                f"{where} sees other checkpoints in {view.directory} than rank 0 in "
                f"{ref.directory} ({'; '.join(d for d in diff if d)}): the ranks would resume "
                f"from different steps; {SHARE_HINT}"
            )
        if chosen is not None and (view.problem or view.manifest_sha256 != ref.manifest_sha256):
            why = view.problem or "its manifest differs from rank 0's"
            return (
                f"{where} cannot use the checkpoint rank 0 resumes from, {chosen} ({why} "
                f"there); {SHARE_HINT}"
            )
    return ""


def agree_on_resume(cfg: Config, topo: Topology) -> Path | None:
    """The checkpoint every rank continues from (None: fresh start), or one error on all."""
    if not topo.distributed:
        return resolve_resume(cfg)
    mine = agree(topo, lambda: resolve_resume(cfg) if topo.rank == 0 else None)
    chosen = gather(topo, mine)[0]
    problem = disagreement(topo, gather(topo, view_of(cfg, chosen)), chosen)
    if problem:
        raise CheckpointError(problem)
    return chosen


@dataclass
class Launch:
    """The agreed start of a run: topology, how the nodes see each root, the resume point."""

    topo: Topology
    layouts: dict[str, RootLayout]
    resume_dir: Path | None

    @classmethod
    def agree(cls, cfg: Config) -> Launch:
        """Collective: every rank calls it once, after torch.distributed is set up."""
        topo = discover()
        layouts = probe_roots(topo, run_roots(cfg))
        if topo.nodes > 1:
            log.info("%s; %s", topo.describe(), describe_layouts(layouts))
        problem = unshared_checkpoints(topo, layouts[CHECKPOINTS])
        if problem:  # every rank computed the same layouts: all raise the same line
            raise CheckpointError(problem)
        return cls(topo, layouts, agree_on_resume(cfg, topo))

    def null_embedding(self, encoder: TextEncoder, root: Path) -> NullEmbedding:
        """Built by one leader per group of nodes sharing ``root``, then loaded by the rest."""
        topo, layout = self.topo, self.layouts[NULL_ROOT]
        builds = topo.leader and layout.builder_node(topo.node) == topo.node
        built = agree(topo, lambda: obtain_null_embedding(encoder, root) if builds else None)
        loaded = agree(
            topo, lambda: None if builds else obtain_null_embedding(encoder, root, is_builder=False)
        )
        return built if builds else loaded
