"""The checkpoint checks: what train resumes from, and whether it fits the configured model."""

from __future__ import annotations

from pathlib import Path

from sanakit.config import Config
from sanakit.doctor.check import FAIL, PASS, WARN, Check
from sanakit.doctor.probe import Probe
from sanakit.io.checkpoint import checkpoint_step, listed_files
from sanakit.io.shards import is_sharded_checkpoint
from sanakit.train.checkpoint_files import read_config
from sanakit.train.resume import FRESH

# model.* keys that change the transformer's tensor shapes (a checkpoint must match them)
ARCH_KEYS = (
    "patch_size",
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "mlp_ratio",
)


def check_resume_target(cfg: Config, probe: Probe) -> Check:
    r = probe.resume
    how = "verified" if probe.full else "sizes checked; contents are verified when loaded"
    if r.explicit and r.error:
        return Check(
            "resume",
            FAIL,
            f"resume_from={cfg.resume_from} does not verify ({r.error})",
            "use --resume_from=latest or a complete checkpoint directory",
        )
    note = f"; {len(r.skipped)} newer incomplete/corrupt checkpoint(s) skipped" if r.skipped else ""
    inspect = f"inspect {r.skipped[0][0]} ({r.skipped[0][1]})" if r.skipped else ""
    if r.path is None:
        if cfg.resume_from in FRESH:
            return Check("resume", PASS, "resume_from=none: the run starts fresh")
        if r.skipped:
            return Check(
                "resume", WARN, f"no complete checkpoint{note}; the run starts fresh", inspect
            )
        return Check("resume", PASS, "no checkpoint yet: the run starts fresh")
    verb = "will restore and resume from" if r.restores else "will resume from"
    layout = "sharded, " if is_sharded_checkpoint(listed_files(r.path)) else ""
    msg = f"{verb} {r.path} (step {checkpoint_step(r.path)}, {layout}{how}){note}"
    return Check("resume", WARN if r.skipped else PASS, msg, inspect)


def saved_config(path: Path) -> Config:
    """The config a checkpoint was trained with (one error line naming the file if unusable)."""
    return read_config(path)


def check_checkpoint_model(cfg: Config, probe: Probe) -> Check:
    """The checkpoint's weights must fit the configured model (else loading them fails)."""
    r = probe.resume
    if r.path is None:
        return Check("checkpoint_model", PASS, "no checkpoint to resume: nothing to compare")
    saved = saved_config(r.path)
    pairs = [(f"model.{k}", saved.model, cfg.model, k) for k in ARCH_KEYS]
    if bool(saved.model.pretrained) != bool(cfg.model.pretrained):  # a moved folder is fine
        pairs += [("model.pretrained", saved.model, cfg.model, "pretrained")]
    pairs += [("vae.type", saved.vae, cfg.vae, "type")]
    pairs += [("text_encoder.type", saved.text_encoder, cfg.text_encoder, "type")]
    diffs = [
        (key, getattr(was, attr), getattr(now, attr))
        for key, was, now, attr in pairs
        if getattr(was, attr) != getattr(now, attr)
    ]
    if diffs:
        words = "; ".join(f"{key}: checkpoint {was}, now {now}" for key, was, now in diffs)
        keys = " ".join(f"--{key}={was}" for key, was, _ in diffs)
        return Check(
            "checkpoint_model",
            FAIL,
            f"{r.path} was trained with other model settings ({words})",
            f"set {keys} as in the checkpoint, or use a new --work_dir (--resume_from=none)",
        )
    return Check("checkpoint_model", PASS, f"model settings match {r.path.name}")
