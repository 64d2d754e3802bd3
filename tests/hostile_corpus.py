"""A deterministic hostile-input corpus: mutated configs, overrides, checkpoints and data files.

``generate(seed, count)`` returns :class:`Case` objects. Each one names the CLI arguments to run
(after ``python -m sanakit``) from inside a scratch directory laid out as::

    w/            a copy of a real 2-step run (checkpoint ``w/checkpoints/step_00000002``)
    data/img/     a tiny image_folder root     (made by data cases only)
    data/sana/    a tiny sana_img root         (made by data cases only)
    cfg.yaml      a mutated config             (config cases only)
    afile         a regular file, for paths that lie "under a file"

and a ``prepare(scratch)`` that writes the mutation into that directory. Re-sealed checkpoint
mutations recompute the manifest's size and sha256 so the damage passes verification and reaches
the loaders. Nothing here depends on the wall clock or global random state: the same seed gives
the same cases byte for byte (modulo the contents of the copied run they start from).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hostile_checkpoints_corpus import (
    JSON_VALUES,
    mutate_config,
    write_checkpoint_mutation,
)
from hostile_data_corpus import write_data_mutations

from sanakit.config import Config

CK = "w/checkpoints/step_00000002"
# appended after a config / before a hostile override: a run that is accepted stays short
TRAIN_BOUNDS = (
    "--train.max_steps=3",
    "--train.save_model_steps=2",
    "--train.train_batch_size=4",
    "--train.visualize=false",
    "--report_to=none",
)
# keys the bounds override anyway, and the work dir (a hostile one could point outside scratch)
MASKED = {"work_dir", "report_to"} | {b.split("=")[0][2:] for b in TRAIN_BOUNDS}
# a huge value here is a legitimate request for a very long run, not hostile input
DURATION = {"train.max_steps", "train.num_epochs", "train.sampling_steps", "data.max_samples"}
NUMERIC = [".nan", ".inf", "-.inf", "-1", "0", "1e309", "-1e30", "18446744073709551616", "1e-320"]
WRONG_TYPE = ["fast", "[1, 2]", "{a: 1}", "null", "true", "''", "2026-12-02", "0x10", "~"]
TAGS = [
    "!!python/object/apply:os.system ['touch PWNED']",
    "!!python/name:os.system",
    "!!set {a, b}",
    "!!binary aGVsbG8=",
    "!!float nan",
]
TEXT = ["[1.0", "]]]", "{{{", "&a [*a]", "*a", "afile/sub", "\t", "\u202ex", "x" * 50000]
PWNED = "PWNED"  # a planted payload would create this file in the scratch dir


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    prepare: Callable[[Path], None]
    # files a successful run may write; on success every OTHER pre-existing file must stay put
    # (read-only commands); None: the command may legitimately rewrite its work dir (train)
    outputs: tuple[str, ...] | None = None


def config_keys() -> list[tuple[str, Any]]:
    """(dotted key, default) for every leaf of the config schema."""

    def walk(node: Any, prefix: str) -> list[tuple[str, Any]]:
        out = []
        for f in fields(node):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if is_dataclass(default):
                out.extend(walk(type(default), f"{prefix}{f.name}."))
            else:
                out.append((f"{prefix}{f.name}", default))
        return out

    return walk(Config, "")


# ------------------------------------------------------------------------------ small helpers


def slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text)
    return keep.strip("_")[:24] or "x"


def config_mutation(rng: random.Random, keys: list[tuple[str, Any]]) -> tuple[str, str, str]:
    """A random (op, key, value) for :func:`mutate_config`."""
    key, default = rng.choice(keys)
    op = rng.choice(
        ["set", "set", "set", "list", "unknown", "delete", "group_scalar", "document"]
        + ["truncate", "non_utf8", "alias_bomb"]
    )
    if op in ("set", "list", "group_scalar"):
        pool = NUMERIC if isinstance(default, int | float) else WRONG_TYPE
        pool = pool + TAGS + WRONG_TYPE[:3]
        if key in DURATION:
            pool = [v for v in pool if v not in ("18446744073709551616", "1e309")]
        return op, key, rng.choice(pool)
    if op == "document":
        doc = rng.choice(["- a\n- b\n", "42\n", "'text'\n", "[" * 5000 + "\n", "{a: 1}\n", ""])
        return op, key, doc
    if op == "truncate":
        return op, key, rng.choice(["0.1", "0.33", "0.5", "0.77", "0.99"])
    if op == "alias_bomb":
        return op, key, rng.choice(["2x3", "4x4", "9x9"])
    return op, key, rng.choice(["bogus", "lr2", "_"])


def write_config(scratch: Path, op: str, key: str, value: str, target: str) -> None:
    source = scratch / "w" / "config.yaml"
    (scratch / target).write_bytes(mutate_config(source.read_bytes(), op, key, value))


def override_value(rng: random.Random, key: str, default: Any) -> str:
    numeric = isinstance(default, int | float) and not isinstance(default, bool)
    pool = NUMERIC * 3 + WRONG_TYPE + TAGS[:3] + TEXT if numeric else WRONG_TYPE + TAGS + TEXT
    if key in DURATION:
        pool = [v for v in pool if v not in ("18446744073709551616", "1e309")]
    return rng.choice(pool)


SAMPLE_HOSTILE = {
    "--seed": ["18446744073709551616", "-1", "nan", "1e3"],
    "--cfg_scale": ["nan", "inf", "-inf", "1e309", "x"],
    "--steps": ["0", "-3", "nan", "1.5"],
    "--num_images": ["0", "-1", "100000", "1e9", "18446744073709551616"],
    "--out": ["dir.png", "afile/x.png", "", "x.PNG.txt", "nodir/x.png", "w", "w/config.yaml"],
    "--sampler": ["nope", "", "../../x"],
    "--prompt": ["", " ", "x" * 50000, "\u202e", "{a: 1}"],
}


# ------------------------------------------------------------------------------- the generator

SAMPLE = ("sample", "--prompt=a red circle", "--num_images=1", "--steps=2", "--out=o.png")
RESUME = ("train", "--work_dir=w", *TRAIN_BOUNDS)
DOCTOR = ("doctor", "--work_dir=w", "--train.train_batch_size=4")
# families and how often each comes up in every 20 cases
CYCLE = (
    "override checkpoint config sample data override checkpoint override export checkpoint "
    "config data override checkpoint sample data override checkpoint config sample"
).split()


def config_case(rng: random.Random, keys: list[tuple[str, Any]]) -> tuple[str, tuple, Callable]:
    op, key, value = config_mutation(rng, [kv for kv in keys if kv[0] not in MASKED])
    args = rng.choice(
        [
            ("train", "cfg.yaml", "--work_dir=w", *TRAIN_BOUNDS),
            ("train", "cfg.yaml", "--work_dir=fresh", *TRAIN_BOUNDS),
            ("doctor", "cfg.yaml", "--work_dir=w", "--train.train_batch_size=4"),
        ]
    )
    prepare = partial(write_config, op=op, key=key, value=value, target="cfg.yaml")
    return f"{op}-{key}-{slug(value)}", args, prepare


def override_case(rng: random.Random, keys: list[tuple[str, Any]]) -> tuple[str, tuple]:
    key, default = rng.choice([kv for kv in keys if kv[0] != "work_dir"])
    value = override_value(rng, key, default)
    base = rng.choice([RESUME, DOCTOR, RESUME])
    return f"{base[0]}-{key}-{slug(value)}", (*base, f"--{key}={value}")


def checkpoint_case(rng: random.Random) -> tuple[str, tuple, Callable]:
    kind = rng.choice(["raw", "raw", "manifest", "json", "json", "yaml", "safetensors", "torch"])
    extra: tuple[int, ...] = ()
    if kind == "raw":
        rel = rng.choice(
            ["manifest.json", "trainer_state.json", "sampler_rank0.json"] * 2
            + ["config.yaml", "model.safetensors", "null_embed.pth", "ema.safetensors"]
        )
        how = rng.choice(["truncate", "empty", "flip", "garbage", "append", "non_utf8"])
    elif kind == "manifest":
        rel = "manifest.json"
        how = rng.choice(
            ["deep", "traversal", "absolute", "huge_size", "step_type"]
            + ["step_other", "version", "files_list", "unlisted", "nan_size"]
        )
    elif kind == "json":
        rel = rng.choice(["trainer_state.json", "sampler_rank0.json"])
        how = rng.choice(["set", "set", "set", "delete", "deep", "document"])
        extra = (rng.randrange(20), rng.randrange(len(JSON_VALUES)))
    elif kind == "yaml":
        rel = "config.yaml"
        how = "|".join(config_mutation(rng, config_keys()))
    elif kind == "safetensors":
        rel = rng.choice(["model.safetensors", "ema.safetensors"])
        how = rng.choice(
            ["header_len", "dtype", "shape", "offsets", "drop", "rename"] + ["metadata", "not_json"]
        )
    else:
        rel = rng.choice(["null_embed.pth", "null_embed.pth", "optimizer.pt", "rng_rank0.pt"])
        how = rng.choice(["shape", "dtype", "dict", "nan", "list", "pickle"])
    ema = ("--ema",) if rel.startswith("ema") else ()
    sample = [(*SAMPLE, "--checkpoint=w", *ema), (*SAMPLE, f"--checkpoint={CK}", *ema)]
    export = [("export", "w", "exported", *ema), ("export", CK, "exported", *ema)]
    args = rng.choice([RESUME, RESUME, RESUME, DOCTOR, *sample, *sample, *export])
    prepare = partial(write_checkpoint_mutation, rel=rel, kind=kind, how=how, extra=extra)
    detail = f"{kind}-{rel.split('.')[0]}-{slug(how)}"
    return f"{detail}-{slug(args[0])}", args, prepare


DATA_DAMAGE = {
    "image": ["truncate", "empty", "text", "wrong_ext", "bomb", "directory", "symlink_loop"]
    + ["mode:I;16", "mode:CMYK", "mode:P", "mode:LA", "mode:1", "mode:RGBA", "mode:F"],
    "caption": ["nul", "invalid_utf8", "huge_line", "empty", "whitespace", "bom", "control"]
    + ["fifo", "directory"],
    "meta": ["nul_name", "escape", "numbers", "not_list", "huge", "dupes", "deep"]
    + ["invalid_utf8", "truncate"],
    "jsonl": ["nul_name", "escape", "numbers", "bad_line", "deep", "invalid_utf8", "huge_text"]
    + ["missing_key", "absolute"],
}
FORMATS = {"img": "image_folder", "sana": "sana_img", "hf": "hf_imagefolder"}


def data_case(rng: random.Random) -> tuple[str, tuple, Callable]:
    root = rng.choice(sorted(FORMATS))
    damages = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(
            {"img": ["image", "caption"], "sana": ["image", "caption", "meta"]}.get(
                root, ["image", "meta", "meta"]
            )
        )
        pool = DATA_DAMAGE["jsonl" if kind == "meta" and root == "hf" else kind]
        damages.append((root, kind, rng.choice(pool)))
    data = (f"--data.type={FORMATS[root]}", f"--data.data_dir=[data/{root}]", "--work_dir=run")
    bounds = (*TRAIN_BOUNDS, "--train.max_steps=2")
    train, build = ("train", *data, *bounds), ("cache", "build", *data)
    args = rng.choice([train, train, build, ("doctor", *data), ("cache", "verify", *data)])
    prepare = partial(write_data_mutations, damages=tuple(damages))
    detail = "-".join(f"{k}-{slug(h)}" for _, k, h in damages)
    return (
        f"{root}-{detail}-{slug('_'.join(args[:2]) if args[0] == 'cache' else args[0])}",
        args,
        prepare,
    )


def sample_case(rng: random.Random) -> tuple[str, tuple, tuple[str, ...]]:
    option = rng.choice(sorted(SAMPLE_HOSTILE))
    value = rng.choice(SAMPLE_HOSTILE[option])
    outputs = ("o.png", value) if option == "--out" else ("o.png",)
    return f"{option[2:]}-{slug(value)}", (*SAMPLE, "--checkpoint=w", f"{option}={value}"), outputs


def export_case(rng: random.Random) -> tuple[str, tuple]:
    source = rng.choice(["w", CK])
    dest = rng.choice(["w", ".", "w/checkpoints", CK, "afile", "afile/sub", "w/inside", "data"])
    flags = rng.choice([("--overwrite",), (), ("--overwrite", "--ema")])
    return f"{slug(source)}-to-{slug(dest)}{''.join(flags)}", ("export", source, dest, *flags)


def nothing(scratch: Path) -> None:
    """No file mutation: the hostility is in the arguments."""


def generate(seed: int, count: int) -> list[Case]:
    """``count`` hostile cases, the same ones for the same seed."""
    keys = config_keys()
    cases: list[Case] = []
    for i in range(count):
        for attempt in range(20):  # redraw a case identical to an earlier one
            case = one_case(f"{seed}:{i}:{attempt}", CYCLE[i % len(CYCLE)], keys, i)
            if case.id[3:] not in {c.id[3:] for c in cases}:  # ids are "NN-..."
                break
        cases.append(case)
    return cases


def one_case(seed: str, family: str, keys: list[tuple[str, Any]], index: int) -> Case:
    rng = random.Random(seed)
    prepare: Callable[[Path], None] = nothing
    outputs: tuple[str, ...] | None = ()
    if family == "config":
        name, args, prepare = config_case(rng, keys)
    elif family == "override":
        name, args = override_case(rng, keys)
    elif family == "checkpoint":
        name, args, prepare = checkpoint_case(rng)
    elif family == "data":
        name, args, prepare = data_case(rng)
    elif family == "sample":
        name, args, outputs = sample_case(rng)
    else:
        name, args = export_case(rng)
    if args[0] in ("train", "cache") and args[:2] != ("cache", "verify"):
        outputs = None  # may legitimately rewrite its work dir
    elif args[0] == "sample" and family != "sample":
        outputs = ("o.png",)
    return Case(f"{index:02d}-{family}-{name}", tuple(args), prepare, outputs)
