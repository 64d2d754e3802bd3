"""`sanakit train|doctor|cache`: commands that take a config and overrides."""

from __future__ import annotations

from sanakit.cli.common import USAGE, load_run_config, pop_dry_run, split_config_args
from sanakit.errors import SanakitError


def cmd_train(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    config, overrides = split_config_args(args)
    dry, overrides = pop_dry_run(overrides)
    cfg = load_run_config(config, overrides)
    if dry:
        from sanakit.train.dry_run import dry_run

        return dry_run(cfg)
    from sanakit.doctor import preflight

    # before importing the training stack: a FAIL then costs ~1 s instead of ~5 s
    preflight(cfg)
    from sanakit.io.topology import leave
    from sanakit.train.loop import train

    try:
        train(cfg)
    except SanakitError:
        # an error agreed by every rank of a launch: exit with its code, not an abort in gloo's
        # threads (after a peer crashed, tearing the group down could block: not done then)
        leave()
        raise
    return 0


def cmd_doctor(args: list[str]) -> int:
    """``sanakit doctor [CONFIG] [overrides]``: one PASS/WARN/FAIL line per check; 1 on a FAIL."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from sanakit.doctor import run_doctor

    try:
        config, overrides = split_config_args(args)
        cfg = load_run_config(config, overrides)
    except SanakitError as err:
        # a config that does not resolve is itself a failed check, in the same line format
        print(f"FAIL config: {err} -> fix the config file or override named here", flush=True)
        return 1
    return run_doctor(cfg, config or "")


CACHE_USAGE = """usage: sanakit cache build|verify [CONFIG.yaml] [--group.key=value ...]

  build   compute and write every caption embedding and latent of the dataset
  verify  report missing, corrupt and stale entries; exit 0 if complete, 1 if not
The cache lives in train.cache_dir (default WORK_DIR/cache).
"""


def cmd_cache(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(CACHE_USAGE)
        return 0 if args else 2
    action, rest = args[0], args[1:]
    if action not in ("build", "verify"):
        raise SanakitError(f"unknown cache action '{action}'; use `sanakit cache build|verify`")
    if any(a in ("-h", "--help") for a in rest):
        print(CACHE_USAGE)
        return 0
    from sanakit.embeddings.commands import build_caches, format_verify, open_caches, verify_caches
    from sanakit.embeddings.store import cache_root
    from sanakit.io.ownership import own

    config, overrides = split_config_args(rest)
    cfg = load_run_config(config, overrides)
    if action == "build":
        with own(cache_root(cfg), "sanakit cache build", subject="cache dir"):
            r = build_caches(open_caches(cfg, "readwrite"))
        text, latents = r["text"], r["latents"]
        print(f"cache {r['root']}: {r['samples']} samples ({r['unreadable']} unreadable)")
        print(
            f"text embeddings: {r['captions']} captions, {text['computed']} computed "
            f"({text['invalid']} replaced invalid entries), {text['read']} already valid"
        )
        if latents is None:
            print("latents: skipped (vae.type=pixel trains on pixels: no latent cache)")
        else:
            print(
                f"latents: {r['images']} images{' (both flips)' if r['flip_variants'] else ''}, "
                f"{latents['computed']} computed ({latents['invalid']} replaced invalid "
                f"entries), {latents['read']} already valid"
            )
        held = r["heldout"]
        if held is not None:  # its entries are in the counts above
            print(
                f"held-out set (data.val_dir): {held['samples']} samples ({held['unreadable']} "
                f"unreadable), {held['captions_alone']} captions outside the training ones, "
                f"{held['images']} images"
            )
        print(f"done in {r['seconds']:.1f}s")
        return 0
    sections, unreadable = verify_caches(open_caches(cfg, "read"))
    print(format_verify(sections, unreadable, cache_root(cfg)))
    return 1 if any(s.problems() for s in sections) else 0
