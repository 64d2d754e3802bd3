"""`sanakit serve WORK_DIR [--host 127.0.0.1] [--port 7860]`: the run's web page."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from sanakit.cli.common import OneLineParser
from sanakit.errors import SanakitError

log = logging.getLogger("sanakit")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def serve_parser() -> OneLineParser:
    p = OneLineParser(prog="sanakit serve", description="Watch a run and sample its checkpoints.")
    p.add_argument("work_dir", help="the --work_dir of a run (finished or running)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    return p


def temp_dir_outside(work_dir: Path) -> Path:
    """A fresh private dir for the server's files, never inside WORK_DIR (which stays as it is)."""
    bases = [Path(tempfile.gettempdir()), Path.home() / ".cache"]
    work = os.path.realpath(work_dir)
    for base in bases:
        real = os.path.realpath(base)
        if not (real == work or real.startswith(work.rstrip("/") + "/")):
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="sanakit-serve-", dir=base))
    raise SanakitError(
        f"WORK_DIR {work_dir} contains the temp dir; set TMPDIR to a directory outside it"
    )


def cmd_serve(args: list[str]) -> int:
    opts = serve_parser().parse_args(args)
    if opts.host not in LOCAL_HOSTS:
        log.warning(
            "serving on %s: anyone who can reach this address can see the run and use this "
            "machine to sample; bind to 127.0.0.1 unless you mean it",
            opts.host,
        )
    if not 1 <= opts.port <= 65535:
        raise SanakitError(f"--port={opts.port} must be from 1 to 65535")
    from sanakit.serve.work_dir import check_run_dir

    work_dir = check_run_dir(Path(opts.work_dir))
    temp = temp_dir_outside(work_dir)
    # read by Gradio when imported: its cache and examples outside WORK_DIR, no telemetry
    os.environ["GRADIO_TEMP_DIR"] = str(temp)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(temp / "examples")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the clean-up below
    try:
        from sanakit.serve.app import serve

        serve(work_dir, opts.host, opts.port, temp)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    print("stopped", flush=True)
    sys.stderr.flush()
    # the server is closed and its files removed; tearing down the interpreter (Gradio, torch,
    # pandas) only garbage-collects, which took 8 s on a shared 2-core machine
    os._exit(0)
