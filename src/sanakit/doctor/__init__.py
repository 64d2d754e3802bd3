"""Preflight checks: say what is wrong before compute is spent.

Each check returns a ``Check`` (PASS / WARN / FAIL, a message, and for non-PASS what to do),
printed as one line ``STATUS name: message -> what to do``. ``preflight`` runs the cheap subset
at the start of ``train`` before any model is loaded and refuses to start on a FAIL; ``sanakit
doctor`` runs them all, loading the encoders on the CPU.

A check leaves no trace: nothing is written into ``work_dir`` or the null-embedding root
(writability is probed with a file that is removed at once, and directories created for the
probe are removed again), and checkpoints are found without the housekeeping renames that
``train`` performs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanakit.config import Config, from_yaml_text, null_embed_root
from sanakit.errors import SanakitError
from sanakit.io.atomic import check_writable, free_bytes

log = logging.getLogger("sanakit")

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
CHECKPOINTS_NEEDED = 3  # free disk the doctor asks for, in checkpoints of this model
DECODE_SAMPLE = 32  # images decoded by the data check (evenly spaced over the dataset)
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


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status} {self.name}: {self.message}"
        return f"{text} -> {self.fix}" if self.fix and self.status != PASS else text


class Skipped(Exception):
    """A check cannot run because something it needs failed earlier (already reported)."""


@dataclass
class Resume:
    """Which checkpoint ``train`` would continue from, found without touching the disk."""

    path: Path | None  # None: the run starts fresh
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer ones that fail to verify
    explicit: bool = False  # resume_from=PATH (else latest or none)
    restores: bool = False  # the target is an interrupted re-save that train will rename back
    error: str = ""  # an explicit resume_from that does not verify


class Probe:
    """What several checks need, built at most once per doctor run (failures are remembered)."""

    def __init__(self, cfg: Config, *, full: bool) -> None:
        self.cfg = cfg
        self.full = full  # doctor (deep verification, models loaded) vs the train preflight
        self._memo: dict[str, Any] = {}

    def _get(self, name: str, what: str, build: Callable[[], Any]) -> Any:
        if name not in self._memo:
            try:
                self._memo[name] = (True, build())
            except Exception as err:
                self._memo[name] = (False, err)
                raise
        ok, value = self._memo[name]
        if isinstance(value, Skipped):
            raise value  # name the root cause, not the part that needed it
        if not ok:
            raise Skipped(f"{what} is not available (see its line above)")
        return value

    @property
    def text_encoder(self) -> Any:
        from sanakit.models.text import build_text_encoder

        return self._get(
            "text_encoder", "the text encoder", lambda: build_text_encoder(self.cfg.text_encoder)
        )

    @property
    def autoencoder(self) -> Any:
        def build() -> Any:
            import torch

            from sanakit.models.autoencoder import build_autoencoder

            return build_autoencoder(self.cfg.vae, "cpu", torch.float32)

        return self._get("autoencoder", "the autoencoder", build)

    @property
    def dataset(self) -> Any:
        """The training dataset as train indexes it (same samples, same max_samples cap).

        Aspect-ratio buckets are not assigned: that reads every image header and changes
        neither the count nor which files decode.
        """
        from dataclasses import replace

        from sanakit.train.components import build_dataset

        flat = replace(self.cfg, model=replace(self.cfg.model, multi_scale=False))
        return self._get("dataset", "the dataset", lambda: build_dataset(flat)[0])

    @property
    def transformer(self) -> Any:
        """The configured transformer on the meta device: shapes and counts, no memory."""

        def build() -> Any:
            import torch

            from sanakit.models.transformer import build_transformer

            enc, ae = self.text_encoder, self.autoencoder
            with torch.device("meta"):
                return build_transformer(
                    self.cfg, ae.latent_channels, enc.hidden_size, ae.downsample_factor
                )

        return self._get("transformer", "the transformer", build)

    @property
    def resume(self) -> Resume:
        return self._get("resume", "the resume target", lambda: find_resume(self.cfg, self.full))


# ---- helpers ---------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _writable_without_trace(directory: Path) -> str | None:
    """check_writable, but remove directories it had to create (a check must leave no trace)."""
    created = []
    probe = Path(directory)
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    reason = check_writable(directory)
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass
    return reason


def _env_int(name: str, default: int) -> int | None:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def _modules(obj: Any) -> list[Any]:
    """The torch modules an adapter object holds (to count a frozen model's parameters)."""
    import torch

    return [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]


def _params(obj: Any) -> int:
    return sum(p.numel() for m in _modules(obj) for p in m.parameters())


def find_resume(cfg: Config, deep: bool = True) -> Resume:
    """The checkpoint ``train`` would resume from, without the renames ``find_latest`` may do."""
    from sanakit.io import checkpoint as ckpt

    target = cfg.resume_from
    if target in ("", "none", "null", None):
        return Resume(None)
    if target != "latest":
        path = Path(target)
        reason = ckpt.verify_checkpoint(path, deep=deep)
        return Resume(path if not reason else None, explicit=True, error=reason or "")
    d = Path(cfg.work_dir) / "checkpoints"
    candidates = [(step, path, False) for step, path in ckpt.candidates(d)]
    # a re-save killed between its two renames leaves ``.step_N.old-*`` and no step_N; train
    # renames it back before choosing, so it is a candidate too
    for step, old in ckpt.interrupted_replacements(d):
        candidates.append((step, old, True))
    skipped = []
    for _, path, restores in sorted(candidates, key=lambda c: c[0], reverse=True):
        reason = ckpt.verify_checkpoint(path, deep=deep)
        if reason is None:
            return Resume(path, skipped, restores=restores)
        skipped.append((path, reason))
    return Resume(None, skipped)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SanakitError(f"{path} is unreadable ({type(err).__name__})") from None
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence per-sample warnings while the data check counts bad samples itself."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---- the checks ------------------------------------------------------------------------------


def check_work_dir(cfg: Config, probe: Probe) -> Check:
    work_dir = Path(cfg.work_dir)
    reason = _writable_without_trace(work_dir)
    if reason:
        return Check(
            "work_dir",
            FAIL,
            f"work_dir={work_dir} is not writable ({reason})",
            "choose a writable --work_dir or fix its permissions",
        )
    state = "exists" if work_dir.is_dir() else "can be created"
    return Check("work_dir", PASS, f"{work_dir} {state} and is writable")


def check_null_embed_root(cfg: Config, probe: Probe) -> Check:
    root = null_embed_root(cfg)
    reason = _writable_without_trace(root)
    if reason:
        return Check(
            "null_embed_root",
            FAIL,
            f"{root} is not writable ({reason})",
            "set --train.null_embed_root to a writable directory",
        )
    return Check("null_embed_root", PASS, f"{root} is writable")


def check_data(cfg: Config, probe: Probe) -> Check:
    """Cheap: roots exist (and the built-in dataset accepts its settings). Full: see below."""
    if not probe.full:
        if cfg.data.type == "shapes":
            from sanakit.data.shapes import ShapesDataset

            try:
                ShapesDataset(image_size=cfg.model.image_size, seed=cfg.seed)
            except ValueError as err:
                key = "seed" if "seed" in str(err) else "model.image_size"
                return Check(
                    "data", FAIL, f"built-in shapes dataset: {err}", f"set --{key} to a valid value"
                )
            return Check("data", PASS, "built-in shapes dataset")
        missing = [d for d in cfg.data.data_dir if not Path(d).expanduser().exists()]
        if missing:
            return Check(
                "data",
                FAIL,
                f"data root {missing[0]} does not exist (data.data_dir)",
                "fix --data.data_dir to point at existing folders",
            )
        for root in cfg.data.data_dir:
            if not _looks_populated(cfg.data.type, Path(root).expanduser()):
                from sanakit.data.formats import _HINTS

                return Check(
                    "data",
                    FAIL,
                    f"data root {root} holds no {cfg.data.type} samples (data.data_dir)",
                    _HINTS.get(cfg.data.type, "fix --data.data_dir"),
                )
        return Check("data", PASS, f"{len(cfg.data.data_dir)} data root(s) exist")
    return check_data_full(cfg, probe)


def _looks_populated(kind: str, root: Path) -> bool:
    """Whether ``root`` holds at least the first file its format needs (stops at the first).

    Cheap enough for the preflight: an empty or wrong folder fails before models load (and
    before train writes anything); a full index with caption checks is the doctor's job.
    """
    from sanakit.data.formats import _HF_METADATA_NAMES, IMAGE_EXTENSIONS

    if kind == "sana_img":
        return (root / "meta_data.json").is_file()
    if kind == "webdataset" and root.is_file():
        return root.suffix == ".tar"
    wanted: Callable[[str], bool] = {
        "image_folder": lambda name: name.lower().endswith(IMAGE_EXTENSIONS),
        "hf_imagefolder": lambda name: name in _HF_METADATA_NAMES,
        "webdataset": lambda name: name.endswith(".tar"),
    }.get(kind, lambda name: True)
    for _dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(wanted(f) for f in filenames):
            return True
    return False


def check_data_full(cfg: Config, probe: Probe) -> Check:
    """Index the dataset, count samples and caption coverage, decode a sample of images."""
    try:
        dataset = probe.dataset
    except ValueError as err:  # the built-in dataset rejects its settings
        return Check("data", FAIL, f"dataset: {err}", "fix --model.image_size or --seed")
    except SanakitError as err:
        return Check("data", FAIL, str(err), "fix --data.data_dir / --data.type")
    n = len(dataset)
    inner = getattr(dataset, "dataset", dataset)  # a Subset when data.max_samples is set
    skips = getattr(dataset, "skips", None)
    facts = [f"{n} samples"]
    status, fix = PASS, ""
    if skips is not None and skips.total:
        no_caption = sum(v for k, v in skips.counts.items() if "caption" in k)
        indexed = len(inner) + no_caption
        facts.append(f"caption coverage {100 * len(inner) / max(1, indexed):.1f}%")
        facts.append(skips.summary())
        status, fix = WARN, "the skipped samples are not trained on; fix or remove them"
    else:
        facts.append("caption coverage 100%")
    k = min(DECODE_SAMPLE, n)
    picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    bad = []
    with _quiet("sanakit.data.formats"):
        for i in picks:
            if dataset[i] is None:
                rec = getattr(inner, "records", None)
                bad.append(rec[i].path if rec else str(i))
    facts.append(f"{len(picks) - len(bad)}/{len(picks)} sampled images decode")
    if bad and len(bad) == len(picks):
        return Check("data", FAIL, ", ".join(facts) + f" (e.g. {bad[0]})", "check the image files")
    if bad:
        status = WARN
        fix = f"unreadable images are skipped at train time; e.g. check {bad[0]}"
    return Check("data", status, ", ".join(facts), fix)


def check_text_encoder(cfg: Config, probe: Probe) -> Check:
    te = cfg.text_encoder
    try:
        enc = probe.text_encoder
    except Exception as err:  # noqa: BLE001 - transformers raises many types for bad folders
        where = te.name_or_path or "(packaged MiniLM)"
        return Check(
            "text_encoder",
            FAIL,
            f"{te.type} from {where} does not load: {err}",
            "set --text_encoder.name_or_path to a local folder holding the model "
            "(models load offline)",
        )
    name = te.type if enc.name == te.type else f"{te.type} {enc.name}"
    return Check(
        "text_encoder",
        PASS,
        f"{name} loads (hidden {enc.hidden_size}, max_length {enc.max_length}, "
        f"{_params(enc) / 1e6:.1f}M params, fingerprint {enc.fingerprint()[:12]})",
    )


def check_autoencoder(cfg: Config, probe: Probe) -> Check:
    try:
        ae = probe.autoencoder
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for bad folders
        return Check(
            "autoencoder",
            FAIL,
            f"vae.type={cfg.vae.type} from {cfg.vae.name_or_path or '(unset)'} does not load: "
            f"{err}",
            "set --vae.name_or_path to a local diffusers autoencoder folder",
        )
    factor, patch, size = ae.downsample_factor, cfg.model.patch_size, cfg.model.image_size
    if size % (factor * patch):
        return Check(
            "autoencoder",
            FAIL,
            f"model.image_size={size} is not divisible by the autoencoder factor {factor} x "
            f"model.patch_size {patch}",
            f"set --model.image_size to a multiple of {factor * patch}",
        )
    return Check(
        "autoencoder",
        PASS,
        f"{ae.name} loads ({ae.latent_channels} latent channels, factor {factor}; "
        f"{size}px -> {size // factor}x{size // factor} latents)",
    )


def check_model(cfg: Config, probe: Probe) -> Check:
    model = probe.transformer
    n = sum(p.numel() for p in model.parameters())
    side = cfg.model.image_size // probe.autoencoder.downsample_factor // cfg.model.patch_size
    return Check(
        "model",
        PASS,
        f"SanaTransformer2DModel {n / 1e6:.2f}M params, {cfg.model.num_layers} layers, "
        f"{side * side} tokens per image",
    )


def checkpoint_bytes(model: Any) -> int:
    from sanakit.train.components import estimate_checkpoint_bytes

    return estimate_checkpoint_bytes(model)


def check_disk(cfg: Config, probe: Probe) -> Check:
    one = checkpoint_bytes(probe.transformer)
    where = Path(cfg.work_dir) / "checkpoints"
    free = free_bytes(where)
    fits = free // max(1, one)
    msg = (
        f"{human_bytes(free)} free for {where}; one checkpoint is about {human_bytes(one)} "
        f"(model + EMA + AdamW moments, fp32): room for {fits}"
    )
    fix = (
        f"free space or choose another --work_dir (keep room for {CHECKPOINTS_NEEDED}; "
        f"train.checkpoints_total_limit={cfg.train.checkpoints_total_limit})"
    )
    if fits < 1:
        return Check("disk", FAIL, msg, fix)
    if fits < CHECKPOINTS_NEEDED:
        return Check("disk", WARN, msg, fix)
    return Check("disk", PASS, msg)


def estimate_train_memory(cfg: Config, probe: Probe) -> tuple[int, str]:
    """Rough bytes for one training process, and the parts in words.

    fp32 master weights + grads (8 B/param), optimizer moments (AdamW 8 B/param, CAME ~4), the
    fp32 EMA (4), the frozen encoders at their dtype, and activations: per layer and token about
    (26 + 5 * mlp_ratio) * hidden values kept for backward, in bf16 or fp32 (calibrated on CPU
    fp32 with autograd's saved-tensor hooks: 38-39 at mlp_ratio 2.5 for hidden 128 and 256,
    4 and 8 layers); with gradient checkpointing only each layer's input plus one layer's worth.
    """
    import torch

    from sanakit.train.components import autocast_dtype

    m, t = cfg.model, cfg.train
    model = probe.transformer
    n = sum(p.numel() for p in model.parameters())
    moments = 8 if t.optimizer == "adamw" else 4
    weights = n * (8 + moments + 4)
    from sanakit.models.text.base import resolve_dtype

    enc = probe.text_encoder
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the doctor loaded the encoder on the CPU; training puts it on `device` at its dtype there
    cuda_default = getattr(type(enc), "cuda_default_dtype", enc.dtype)
    enc_dtype = resolve_dtype(cfg.text_encoder.dtype, device, cuda_default)
    frozen = _params(enc) * torch.finfo(enc_dtype).bits // 8 + _params(probe.autoencoder) * 4
    act_bytes = 2 if autocast_dtype(cfg, device) == torch.bfloat16 else 4
    side = m.image_size // probe.autoencoder.downsample_factor // m.patch_size
    hidden = m.num_attention_heads * m.attention_head_dim
    per_layer = t.train_batch_size * side * side * hidden * act_bytes
    width = 26 + 5 * m.mlp_ratio
    if m.gradient_checkpointing:
        acts = int(per_layer * (m.num_layers + width))
    else:
        acts = int(per_layer * m.num_layers * width)
    total = weights + frozen + acts
    parts = (
        f"model+grads+{t.optimizer}+EMA {human_bytes(weights)}, encoders {human_bytes(frozen)}, "
        f"activations ~{human_bytes(acts)} ({'bf16' if act_bytes == 2 else 'fp32'}, batch "
        f"{t.train_batch_size}{', checkpointed' if m.gradient_checkpointing else ''})"
    )
    return total, parts


def available_memory() -> tuple[int, str]:
    """(bytes, where) that one training process can use: the GPU's, else free system RAM."""
    import torch

    if torch.cuda.is_available():
        index = _env_int("LOCAL_RANK", 0) or 0
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"{props.name} (cuda:{index})"
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        avail = int(pages)
    local = _env_int("LOCAL_WORLD_SIZE", 1) or 1  # CPU processes share the machine's RAM
    return avail // local, "available RAM" + (f" / {local} processes" if local > 1 else "")


def check_memory(cfg: Config, probe: Probe) -> Check:
    need, parts = estimate_train_memory(cfg, probe)
    have, where = available_memory()
    msg = f"about {human_bytes(need)} per process ({parts}); {human_bytes(have)} {where}"
    fix = (
        "lower --train.train_batch_size (raise gradient_accumulation_steps to keep the batch), "
        "set --model.gradient_checkpointing=true, or --train.mixed_precision=bf16"
    )
    if need > have:
        return Check("memory", FAIL, msg, fix)
    if need > 0.8 * have:
        return Check("memory", WARN, msg, fix)
    return Check("memory", PASS, msg)


def check_null_embedding(cfg: Config, probe: Probe) -> Check:
    from sanakit.io.artifacts import Invalid, load_valid
    from sanakit.models.text.null_embedding import describe, null_embedding_artifact

    root = null_embed_root(cfg)
    work_dir = Path(cfg.work_dir).absolute()
    if root.absolute().is_relative_to(work_dir) and _writable_without_trace(work_dir):
        raise Skipped(f"{root} is inside work_dir, which is not writable (see above)")
    artifact = null_embedding_artifact(probe.text_encoder, root)
    try:
        got = load_valid(artifact)
    except Invalid as bad:
        reason = _writable_without_trace(root)
        if reason:
            return Check(
                "null_embedding",
                FAIL,
                f"{artifact.path} is {bad} and cannot be built there ({reason})",
                "set --train.null_embed_root to a writable directory",
            )
        if str(bad) == "missing":
            return Check(
                "null_embedding", PASS, f"not built yet: train builds it in {root} (writable)"
            )
        return Check(
            "null_embedding",
            WARN,
            f"{artifact.path} cannot be used ({bad}); train rebuilds it",
            "nothing to do (the rebuilt file replaces it)",
        )
    if got.status == "loaded-unkeyed":
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
        if cfg.resume_from in ("", "none", "null"):
            return Check("resume", PASS, "resume_from=none: the run starts fresh")
        if r.skipped:
            return Check(
                "resume", WARN, f"no complete checkpoint{note}; the run starts fresh", inspect
            )
        return Check("resume", PASS, "no checkpoint yet: the run starts fresh")
    from sanakit.io.checkpoint import checkpoint_step

    verb = "will restore and resume from" if r.restores else "will resume from"
    msg = f"{verb} {r.path} (step {checkpoint_step(r.path)}, {how}){note}"
    return Check("resume", WARN if r.skipped else PASS, msg, inspect)


def _saved_config(path: Path) -> Config:
    from sanakit.train.state import CONFIG_FILE

    try:
        return from_yaml_text((path / CONFIG_FILE).read_text())
    except Exception as err:  # noqa: BLE001 - any unreadable config means "cannot compare"
        raise SanakitError(f"{path / CONFIG_FILE} is unreadable ({type(err).__name__})") from None


def check_checkpoint_model(cfg: Config, probe: Probe) -> Check:
    """The checkpoint's weights must fit the configured model (else loading them fails)."""
    r = probe.resume
    if r.path is None:
        return Check("checkpoint_model", PASS, "no checkpoint to resume: nothing to compare")
    saved = _saved_config(r.path)
    pairs = [(f"model.{k}", saved.model, cfg.model, k) for k in ARCH_KEYS]
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


def check_null_embed_provenance(cfg: Config, probe: Probe) -> Check:
    from sanakit.models.text.null_embedding import IDENTITY, encoder_identity
    from sanakit.train.state import TRAINER_FILE

    r = probe.resume
    if r.path is None:
        return Check("null_embed_provenance", PASS, "no checkpoint to resume: nothing to compare")
    saved = _read_json(r.path / TRAINER_FILE).get("null_embed_provenance") or {}
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

    def short(v: Any) -> str:
        return str(v)[:12]

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


def check_distributed(cfg: Config, probe: Probe) -> Check:
    """World size and global batch vs the checkpoint (the sampler needs the same global batch)."""
    from sanakit.train.state import TRAINER_FILE

    world = _env_int("WORLD_SIZE", 1)
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
    saved = _read_json(r.path / "sampler_rank0.json")
    saved_world = int(_read_json(r.path / TRAINER_FILE).get("world_size", 1))
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


CheckFn = Callable[[Config, Probe], Check]

# train's preflight: no model is loaded, nothing is hashed
CHEAP_CHECKS: tuple[CheckFn, ...] = (
    check_work_dir,
    check_null_embed_root,
    check_data,
    check_resume_target,
    check_checkpoint_model,
    check_distributed,
)

DOCTOR_CHECKS: tuple[CheckFn, ...] = (
    check_work_dir,
    check_data,
    check_text_encoder,
    check_autoencoder,
    check_model,
    check_disk,
    check_memory,
    check_null_embedding,
    check_resume_target,
    check_checkpoint_model,
    check_null_embed_provenance,
    check_distributed,
)


def _name(check: CheckFn) -> str:
    return check.__name__.removeprefix("check_").removesuffix("_target")


def run_check(check: CheckFn, cfg: Config, probe: Probe, crashed: str = FAIL) -> Check:
    """One check; an error inside it becomes its line (the doctor never shows tracebacks).

    ``crashed`` is the status of a check that raised something unexpected: FAIL for the doctor,
    WARN for train's preflight (a bug in a check must not block training).
    """
    name = _name(check)
    try:
        return check(cfg, probe)
    except Skipped as why:
        return Check(name, WARN, f"not checked: {why}", "fix the FAIL above first")
    except SanakitError as err:
        return Check(name, FAIL, str(err), "fix the setting or file named above")
    except Exception as err:  # noqa: BLE001 - a crashing check must still produce its line
        first = (str(err).splitlines() or [""])[0][:200]
        return Check(
            name,
            crashed,
            f"the check crashed ({type(err).__name__}: {first})",
            "this is a sanakit bug or an unusual setup; please report this line",
        )


class PreflightFailed(SanakitError):
    pass


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def preflight(cfg: Config, echo: bool = True) -> list[Check]:
    """The cheap checks, before any model is loaded; raise on the first FAIL with its line.

    Prints the PASS/WARN lines (main process only) in the doctor's format; the FAIL line becomes
    the ``error:`` line of the refusing ``train``.
    """
    if not _is_main_process():
        # the probes create and remove directories: concurrent ranks would race on them. Rank 0
        # checks for everyone; if it refuses, the launcher tears the other ranks down.
        return []
    probe = Probe(cfg, full=False)
    results = []
    for check in CHEAP_CHECKS:
        result = run_check(check, cfg, probe, crashed=WARN)
        if result.status == FAIL:
            raise PreflightFailed(result.line())
        if echo and _is_main_process():
            print(result.line(), flush=True)
        results.append(result)
    return results


def run_doctor(cfg: Config, source: str = "") -> int:
    """Print one line per check as it completes; exit code 0 when nothing FAILs, else 1."""
    started = time.monotonic()
    where = source or "the packaged default config"
    print(Check("config", PASS, f"{where} resolves and type-checks").line(), flush=True)
    probe = Probe(cfg, full=True)
    failed = False
    for check in DOCTOR_CHECKS:
        result = run_check(check, cfg, probe)
        failed |= result.status == FAIL
        print(result.line(), flush=True)
    log.debug("doctor took %.1f s", time.monotonic() - started)
    return 1 if failed else 0
