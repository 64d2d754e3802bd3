"""``sanakit ARGS`` with timestamps: when the heavy imports are done, when the model loading
starts and ends, when sampling ends. The last stdout line is one JSON of ``time.time()`` marks.

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

if __name__ == "__main__":
    code = main(sys.argv[1:])
    marks["loaded"] = marks.pop("load")
    marks["sampled"] = marks.pop("sample")
    print(json.dumps(marks))
    sys.exit(code)
