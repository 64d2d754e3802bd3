"""The null-embedding checks (doctor only): the artifact train uses, and that the text encoder
is the one the resumed checkpoint was trained with.
"""

from __future__ import annotations

from typing import Any

from sanakit.config import Config, null_embed_root
from sanakit.doctor.check import FAIL, PASS, WARN, Check
from sanakit.doctor.check import writable_without_trace as writable
from sanakit.doctor.paths import skip_inside_bad_work_dir
from sanakit.doctor.probe import Probe
from sanakit.io.artifacts import Invalid, InvalidKind, LoadStatus, load_valid
from sanakit.models.text.null_embedding import (
    IDENTITY,
    describe,
    encoder_identity,
    null_embedding_artifact,
)
from sanakit.train.checkpoint_files import read_trainer_state


def check_null_embedding(cfg: Config, probe: Probe) -> Check:
    root = null_embed_root(cfg)
    skip_inside_bad_work_dir(cfg, root)
    artifact = null_embedding_artifact(probe.text_encoder, root)
    try:
        got = load_valid(artifact)
    except Invalid as bad:
        reason = writable(root)
        if reason:
            return Check(
                "null_embedding",
                FAIL,
                f"{artifact.path} is {bad} and cannot be built there ({reason})",
                "set --train.null_embed_root to a writable directory",
            )
        if bad.kind is InvalidKind.MISSING:
            return Check(
                "null_embedding", PASS, f"not built yet: train builds it in {root} (writable)"
            )
        return Check(
            "null_embedding",
            WARN,
            f"{artifact.path} cannot be used ({bad}); train rebuilds it",
            "nothing to do (the rebuilt file replaces it)",
        )
    if got.status is LoadStatus.LOADED_UNKEYED:
        return Check(
            "null_embedding",
            WARN,
            f"{artifact.path} has no provenance (written by another tool?); its shape fits, "
            "so train uses it as is",
            "delete it to have sanakit build one that records its encoder",
        )
    return Check(
        "null_embedding", PASS, f"{artifact.path} is valid ({describe(got.provenance['key'])})"
    )


def short(value: Any) -> str:
    return str(value)[:12]


def check_null_embed_provenance(cfg: Config, probe: Probe) -> Check:
    r = probe.resume
    if r.path is None:
        return Check("null_embed_provenance", PASS, "no checkpoint to resume: nothing to compare")
    saved = read_trainer_state(r.path).get("null_embed_provenance") or {}
    if not saved:
        return Check(
            "null_embed_provenance",
            WARN,
            f"{r.path.name} records no null-embedding provenance: the encoder cannot be compared",
            "make sure text_encoder.* is what the checkpoint was trained with",
        )
    was, now = encoder_identity(saved), encoder_identity(probe.text_encoder.provenance())
    if was == now:
        return Check("null_embed_provenance", PASS, f"current text encoder matches {r.path.name}'s")
    changed = [k for k in IDENTITY if was[k] != now[k]]
    diffs = "; ".join(f"{k}: checkpoint {short(was[k])}, now {short(now[k])}" for k in changed)
    msg = f"the text encoder differs from the one {r.path.name} was trained with ({diffs})"
    if cfg.train.allow_encoder_change:
        return Check(
            "null_embed_provenance",
            WARN,
            msg + " (allowed by train.allow_encoder_change)",
            "expect a fine-tune across encoders, not an exact resume",
        )
    hint = "use the checkpoint's text_encoder settings"
    if "max_length" in changed:
        hint += f" (--text_encoder.max_length={was['max_length']})"
    return Check(
        "null_embed_provenance",
        FAIL,
        msg,
        hint + ", or pass --train.allow_encoder_change=true to fine-tune across encoders",
    )
