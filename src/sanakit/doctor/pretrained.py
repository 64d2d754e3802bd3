"""What the transformer starts from, and whether a resume still matches its base model.

``check_pretrained`` (doctor only: it hashes the base weights and maps a ``.pth``) says where the
weights will come from: the checkpoint resumed, ``load_from``, ``model.pretrained`` (size,
sharding, base fingerprint, where the encoders load from) or the seeded random init.
``check_base_model`` (also train's preflight: it reads one small JSON file) refuses a resume whose
base model's architecture changed since the checkpoint was written.
"""

from __future__ import annotations

from pathlib import Path

from sanakit.config import Config
from sanakit.doctor.check import FAIL, PASS, Check
from sanakit.doctor.probe import Probe
from sanakit.models.pretrained import (
    BaseModelIdentity,
    architecture_of,
    base_identity,
    locate_pretrained,
)
from sanakit.models.sana_checkpoint import read_nvlabs_checkpoint
from sanakit.models.transformer import TORCH_SUFFIXES
from sanakit.train.state import read_trainer_state
from sanakit.units import human_bytes

BASE_KEY = "pretrained_model"  # trainer_state.json: the base a run started from (LoRA: base_model)


def _from_pretrained(cfg: Config) -> str:
    source = locate_pretrained(cfg.model.pretrained)
    identity = base_identity(cfg.model.pretrained)
    params = sum(p.numel() for p in source.meta_model().parameters())
    kind = "SanaPipeline folder" if source.is_pipeline else "transformer folder"
    files = f"{len(source.weight_files)} safetensors shards" if source.sharded else "1 file"
    parts = [f"autoencoder {cfg.vae.type} from {cfg.vae.name_or_path or '(none)'}"]
    parts.append(f"text encoder {cfg.text_encoder.type} from {cfg.text_encoder.name_or_path}")
    return (
        f"transformer from {source.transformer_dir} ({kind}): {params / 1e6:.2f}M params, "
        f"{human_bytes(source.weight_bytes)} in {files}, base fingerprint "
        f"{identity.fingerprint[:12]}; {', '.join(parts)}"
    )


def _from_load_from(cfg: Config, probe: Probe) -> str:
    path = Path(cfg.load_from)
    if not (path.is_file() and path.suffix in TORCH_SUFFIXES):
        return f"weights from load_from={path} (sanakit checkpoint, diffusers folder or file)"
    shapes = {k: v.shape for k, v in probe.transformer.state_dict().items()}
    found = read_nvlabs_checkpoint(path, shapes)  # maps every tensor: a misfit FAILs here
    ema = f" + EMA ({len(found.ema)})" if found.ema is not None else ", no EMA"
    skipped = ", ".join(found.not_loaded) or "nothing"
    return (
        f"weights from NVlabs/Sana checkpoint {path}: model ({len(found.model)} tensors){ema}; "
        f"not loaded: {skipped}"
    )


def check_pretrained(cfg: Config, probe: Probe) -> Check:
    """Where the transformer's weights come from on this run."""
    resume = probe.resume
    base = f"architecture of {cfg.model.pretrained}; " if cfg.model.pretrained else ""
    if resume.path is not None:
        return Check(
            "pretrained", PASS, f"{base}every weight comes from {resume.path} (resumed run)"
        )
    if cfg.load_from:
        return Check("pretrained", PASS, base + _from_load_from(cfg, probe))
    if cfg.model.pretrained:
        return Check("pretrained", PASS, _from_pretrained(cfg))
    return Check(
        "pretrained",
        PASS,
        f"no model.pretrained or load_from: the transformer starts from random weights "
        f"(seed {cfg.seed})",
    )


def check_base_model(cfg: Config, probe: Probe) -> Check:
    """A resume must rebuild the architecture its checkpoint was trained with."""
    resume = probe.resume
    if resume.path is None or not cfg.model.pretrained:
        return Check(
            "base_model", PASS, "no resumed run from a pretrained model: nothing to compare"
        )
    recorded = BaseModelIdentity.from_dict(read_trainer_state(resume.path).get(BASE_KEY))
    if recorded is None:
        return Check("base_model", PASS, f"{resume.path.name} records no base model")
    now = architecture_of(cfg.model.pretrained)
    where = locate_pretrained(cfg.model.pretrained).transformer_dir
    if recorded.architecture != now:
        return Check(
            "base_model",
            FAIL,
            f"the base model's config changed since {resume.path.name} was written "
            f"(architecture {recorded.architecture[:12]} there, "
            f"{now[:12]} in {where})",
            "restore that model's config.json, point --model.pretrained at the original, or "
            "start a new --work_dir",
        )
    return Check("base_model", PASS, f"architecture of {where} matches {resume.path.name}")
