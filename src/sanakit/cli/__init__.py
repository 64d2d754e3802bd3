"""`sanakit train|sample|eval|doctor|cache|export|serve`: parse, call, map errors to exit codes.

A user error (``SanakitError``) prints one line ``error: ...`` and exits with its code (2 by
default), never a traceback.
"""

from __future__ import annotations

import sys

from sanakit.cli.checkpoint import cmd_checkpoint
from sanakit.cli.common import USAGE, setup_console_logging
from sanakit.cli.images import cmd_eval, cmd_export, cmd_sample
from sanakit.cli.run import cmd_cache, cmd_doctor, cmd_train
from sanakit.cli.serve import cmd_serve
from sanakit.errors import SanakitError

__all__ = ["COMMANDS", "main", "setup_console_logging"]

COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "export": cmd_export,
    "doctor": cmd_doctor,
    "cache": cmd_cache,
    "serve": cmd_serve,
    "checkpoint": cmd_checkpoint,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"error: unknown command '{command}'; use one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    setup_console_logging()
    try:
        return COMMANDS[command](rest)
    except SanakitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
