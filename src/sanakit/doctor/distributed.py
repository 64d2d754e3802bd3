"""World size and global batch vs the checkpoint (the sampler needs the same global batch);
under a multi-node launch, the nodes and how they see the artifact and checkpoint roots."""

from __future__ import annotations

import os

from sanakit.config import Config
from sanakit.doctor.check import FAIL, PASS, WARN, Check, env_int
from sanakit.doctor.probe import Probe
from sanakit.io.checkpoint import listed_files
from sanakit.io.topology import discover, join, leave, probe_roots
from sanakit.train.checkpoint_files import read_sampler_state, read_trainer_state
from sanakit.train.nodes import CHECKPOINTS, describe_layouts, run_roots, unshared_checkpoints


def check_distributed(cfg: Config, probe: Probe) -> Check:
    world = env_int("WORLD_SIZE", 1)
    if world is None:
        return Check(
            "distributed",
            FAIL,
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a positive integer",
            "launch with torchrun / accelerate launch, or unset WORLD_SIZE",
        )
    bs = cfg.train.train_batch_size
    now = f"{world} process(es) x train_batch_size {bs} = global batch {bs * world}"
    r = probe.resume
    if r.path is None:
        return Check("distributed", PASS, f"{now}; fresh start")
    saved = read_sampler_state(listed_files(r.path), 0)
    saved_world = int(read_trainer_state(r.path).get("world_size", 1))
    saved_global = int(saved.get("global_batch", 0))
    if saved_global != bs * world:
        fit = (
            f"--train.train_batch_size={saved_global // world}"
            if saved_global % world == 0
            else f"a world size dividing {saved_global}"
        )
        return Check(
            "distributed",
            FAIL,
            f"{r.path.name} was written with global batch {saved_global} ({saved_world} "
            f"process(es)); now {now}",
            f"keep the global batch: use {fit} with {world} process(es), or a new --work_dir",
        )
    if probe.full:
        n = len(probe.dataset)
        if int(saved.get("num_samples", n)) != n:
            return Check(
                "distributed",
                FAIL,
                f"{r.path.name} was written for a dataset of {saved['num_samples']} samples; "
                f"it now has {n}",
                "restore the dataset (data.data_dir, data.max_samples) or use a new --work_dir",
            )
    if saved_world != world:
        return Check(
            "distributed",
            WARN,
            f"{now}; {r.path.name} was written by {saved_world}: same global batch, so the data "
            "order and noise continue exactly (per-rank global RNG streams are re-derived)",
            "nothing to do if the process count change is intended",
        )
    return Check("distributed", PASS, f"{now}, as in {r.path.name}")


def check_nodes(cfg: Config, probe: Probe) -> Check:
    """Under a launch (every rank runs it: it is a collective): world size, nodes, and whether
    each root is shared by the nodes or node-local, probed as ``train`` probes them."""
    if env_int("WORLD_SIZE", 1) in (None, 1):
        return Check("nodes", PASS, "one process: nothing to share between nodes")
    joined = join()
    try:
        topo = discover()
        layouts = probe_roots(topo, run_roots(cfg))
    finally:
        if joined:
            leave()
    message = f"{topo.describe()}; {describe_layouts(layouts)}"
    problem = unshared_checkpoints(topo, layouts[CHECKPOINTS])
    if problem:
        return Check("nodes", FAIL, f"{message}; {problem}", "share work_dir between the nodes")
    return Check("nodes", PASS, message)
