"""Make docs/serve.png: train a short demo run, serve it, sample once in Chromium, screenshot.

    .venv/bin/python scripts/serve_screenshot.py [WORK_DIR] [OUT_PNG]

The run is the packaged default (shapes, MiniLM, pixel space) cut short: 150 steps of batch 8,
a checkpoint and a validation grid every 50 steps. Needs Debian's chromium (scripts/test.sh
installs it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

TRAIN = [
    "--train.max_steps=150",
    "--train.train_batch_size=8",
    "--train.save_model_steps=50",
    "--train.eval_sampling_steps=50",
    "--train.log_interval=1",
]


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "work/serve_demo")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/serve.png")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if not (work / "checkpoints" / "step_00000150").exists():
        sanakit = [sys.executable, "-m", "sanakit"]
        subprocess.run([*sanakit, "train", f"--work_dir={work}", *TRAIN], check=True, env=env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "sanakit", "serve", str(work), f"--port={port}"], env=env
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        shoot(url, out)
    finally:
        server.terminate()
        server.wait()
    print(f"wrote {out}")
    return 0


def shoot(url: str, out: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox"], headless=True
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("finished", timeout=60_000)
        page.fill("#prompts textarea", "a red circle\na blue triangle\na green square")
        page.fill("#num-images input", "3")  # a square 3 x 3 grid
        page.click("#generate")
        expect(page.locator("#sample-message")).to_contain_text("done in", timeout=120_000)
        time.sleep(2)  # let the plots and galleries settle
        page.screenshot(path=str(out), full_page=True)
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
