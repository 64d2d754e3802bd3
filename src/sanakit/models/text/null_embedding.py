"""The null embedding: the text encoder's output for the empty prompt.

It is the unconditional branch of CFG at sampling and what a dropped caption becomes in training,
so it must come from exactly the path used for the negative prompt at sampling (no instruction
prefix, padded to max length, its own mask). ``obtain_null_embedding`` is the only way anything in
sanakit gets one: it is built on first need, keyed by the encoder's provenance, validated on load
and rebuilt when stale — never a side effect of an option (NVlabs/Sana#216).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sanakit.errors import CheckpointError
from sanakit.io.artifacts import Artifact, LoadStatus, get_or_build
from sanakit.models.text.base import TextEncoder

log = logging.getLogger("sanakit")

EMBEDS = "uncond_prompt_embeds"  # Sana's key names, so Sana users can bring their files
MASK = "uncond_prompt_embeds_mask"
# provenance fields whose change means the unconditional branch is a different function
IDENTITY = ("encoder", "fingerprint", "max_length", "hidden_size", "instruction_sha256")


@dataclass
class NullEmbedding:
    embeds: torch.Tensor  # [1, L, D]
    mask: torch.Tensor  # [1, L]
    provenance: dict  # the encoder provenance it was built under ({} if unknown)
    source: str  # where it came from, for log lines

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> NullEmbedding:
        return NullEmbedding(
            self.embeds.to(device=device, dtype=dtype or self.embeds.dtype),
            self.mask.to(device),
            self.provenance,
            self.source,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {EMBEDS: self.embeds.contiguous(), MASK: self.mask.contiguous()}


def sana_filename(encoder: TextEncoder) -> str:
    """Sana's file name: null_embed_diffusers_{encoder}_{max_len}token_{dim}.pth."""
    return (
        f"null_embed_diffusers_{encoder.name}_{encoder.max_length}token_{encoder.hidden_size}.pth"
    )


def shape_check(max_length: int, hidden_size: int) -> Callable[[dict], str | None]:
    def check(tensors: dict[str, torch.Tensor]) -> str | None:
        if EMBEDS not in tensors or MASK not in tensors:
            return f"missing {EMBEDS} or {MASK}"
        embeds, mask = tensors[EMBEDS], tensors[MASK]
        if tuple(embeds.shape) != (1, max_length, hidden_size):
            return f"embeds shape {tuple(embeds.shape)} != (1, {max_length}, {hidden_size})"
        if tuple(mask.shape) != (1, max_length):
            return f"mask shape {tuple(mask.shape)} != (1, {max_length})"
        if mask.sum() == 0:
            return "mask is all zero"
        return None

    return check


def encoder_identity(provenance: dict) -> dict:
    return {k: provenance.get(k) for k in IDENTITY}


def null_embedding_artifact(encoder: TextEncoder, root: Path) -> Artifact:
    """The artifact declaration of ``encoder``'s null embedding under ``root``.

    Exposed so that read-only callers (``sanakit doctor``) can check the very file
    ``obtain_null_embedding`` would use; building stays ``obtain_null_embedding``'s job.
    """

    def build() -> dict[str, torch.Tensor]:
        embeds, mask = encoder.null_embedding()
        return {EMBEDS: embeds.detach().cpu(), MASK: mask.detach().cpu().long()}

    return Artifact(
        path=Path(root) / sana_filename(encoder),
        key=encoder_identity(encoder.provenance()),
        build=build,
        validate=shape_check(encoder.max_length, encoder.hidden_size),
        accept_unkeyed=True,  # a file written by Sana itself
        what="null embedding",
    )


def obtain_null_embedding(
    encoder: TextEncoder,
    root: Path,
    *,
    is_builder: bool = True,
    barrier: Callable[[], None] | None = None,
) -> NullEmbedding:
    """Load the null embedding for ``encoder`` from ``root``, building it if missing or stale."""
    artifact = null_embedding_artifact(encoder, root)
    path = artifact.path
    got = get_or_build(artifact, is_builder=is_builder, barrier=barrier)
    if got.status is LoadStatus.LOADED_UNKEYED:
        log.warning(
            "null embedding at %s has no provenance (written by another tool?); its shape "
            "matches, so it is used as the empty-prompt embedding of %s",
            path,
            encoder.name,
        )
        provenance = {}
    else:
        provenance = got.provenance["key"]
        word = "loaded" if got.status is LoadStatus.LOADED else "built"
        log.info("%s null embedding %s (%s)", word, path, describe(provenance))
    return NullEmbedding(
        got.tensors[EMBEDS].to(encoder.device, encoder.dtype),
        got.tensors[MASK].to(encoder.device),
        provenance,
        str(path),
    )


def describe(provenance: dict) -> str:
    if not provenance:
        return "provenance unknown"
    instr = provenance.get("instruction_sha256")
    return (
        f"encoder={provenance.get('encoder')} fingerprint={str(provenance.get('fingerprint'))[:12]}"
        f" max_length={provenance.get('max_length')} dim={provenance.get('hidden_size')}"
        f" instruction={'none' if not instr else str(instr)[:12]}"
    )


def check_matches_checkpoint(current: NullEmbedding, saved: dict, allow_change: bool) -> None:
    """Stop when the checkpoint was trained with another encoder's unconditional branch."""
    if not saved or not current.provenance:
        return  # unknown provenance on either side: nothing to compare
    if encoder_identity(saved) == encoder_identity(current.provenance):
        return
    if allow_change:
        log.warning(
            "text encoder changed since the checkpoint (checkpoint: %s; now: %s); continuing "
            "because train.allow_encoder_change=true",
            describe(saved),
            describe(current.provenance),
        )
        return
    raise CheckpointError(
        f"the checkpoint's null embedding was built by a different text encoder (checkpoint: "
        f"{describe(saved)}; now: {describe(current.provenance)}); use the same text_encoder "
        "settings, or pass --train.allow_encoder_change=true to fine-tune across encoders"
    )
