"""``sanakit ARGS`` with timestamps and its own peak RSS: when the heavy imports are done, when
the model loading starts and ends, when sampling ends. The last stdout line is one JSON of
``time.time()`` marks and ``peak_rss_bytes``.

The imports are those ``sanakit sample`` makes anyway (``sanakit.inference`` pulls in torch,
diffusers and transformers), made here first so they can be timed apart from the loading.
"""

from __future__ import annotations

import json
import sys
import time

import sanakit.inference as inference  # noqa: E402 - the timed heavy imports
from sanakit.cli import main

marks = {"imports_done": time.time()}


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        marks.setdefault(f"{name}_start", time.time())
        out = fn(*args, **kwargs)
        marks[name] = time.time()
        return out

    return wrapper


inference.load_for_inference = timed("load", inference.load_for_inference)
# rename the marks the caller reads: load_start / loaded / sampled
inference.sample_grid = timed("sample", inference.sample_grid)


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries the high-water mark
    across ``execve``, so a child reports at least its parent's RSS at fork time."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if "load" in marks:  # `sample` (other commands only report their peak)
        marks["loaded"] = marks.pop("load")
        marks["sampled"] = marks.pop("sample")
    marks["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(marks))
    sys.exit(code)
