"""`sanakit checkpoint consolidate CKPT [OUT]`: a sharded checkpoint in the full layout."""

from __future__ import annotations

from sanakit.cli.common import OneLineParser

CHECKPOINT_USAGE = """usage: sanakit checkpoint consolidate CHECKPOINT [OUT]

  consolidate  rewrite a sharded checkpoint (train.checkpoint_format=sharded) in the full
               layout that sample, eval and export read. CHECKPOINT is a checkpoint directory
               or a work_dir (its newest checkpoint); OUT defaults to CHECKPOINT-full beside it
               and must not exist. Needs memory for the largest part (AdamW: 8 bytes/param).
"""


def cmd_checkpoint(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(CHECKPOINT_USAGE)
        return 0 if args else 2
    parser = OneLineParser(prog="sanakit checkpoint", add_help=False)
    parser.add_argument("action", choices=["consolidate"])
    parser.add_argument("checkpoint")
    parser.add_argument("out", nargs="?", default=None)
    opts = parser.parse_args(args)
    from sanakit.train.consolidate import consolidate

    out = consolidate(opts.checkpoint, opts.out)
    print(f"wrote {out}")
    return 0
