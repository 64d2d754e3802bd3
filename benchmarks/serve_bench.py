"""`sanakit serve` under load: a sample request to the page (model kept loaded) against a
`sanakit sample` process for the same settings, and the server's memory over rounds of 20
concurrent requests.

    .venv/bin/python benchmarks/serve_bench.py [--work_dir=W] [--rounds=5]

Without --work_dir a tiny 4-step run is trained in a temp dir first (image_size 16, 1 layer).
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

TINY = [
    "--model.image_size=16", "--model.num_layers=1", "--model.num_attention_heads=2",
    "--model.num_cross_attention_heads=2", "--model.attention_head_dim=16",
    "--model.cross_attention_head_dim=16", "--text_encoder.max_length=8",
    "--train.train_batch_size=4", "--train.max_steps=4", "--report_to=none",
]  # fmt: skip
SANAKIT = [sys.executable, "-m", "sanakit"]


def call(port: int, data: list) -> str:
    """The message output of one /sample request through Gradio's HTTP API."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"data": data})
    conn.request("POST", "/gradio_api/call/sample", body, {"Content-Type": "application/json"})
    event_id = json.loads(conn.getresponse().read())["event_id"]
    conn.request("GET", f"/gradio_api/call/sample/{event_id}")
    lines = conn.getresponse().read().decode().splitlines()
    data_lines = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    return str(data_lines[-1][0]) if data_lines and isinstance(data_lines[-1], list) else "?"


def start_server(work: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([*SANAKIT, "serve", str(work), f"--port={port}"])
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work_dir", default=None)
    p.add_argument("--rounds", type=int, default=5)
    opts = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    work = Path(opts.work_dir) if opts.work_dir else scratch / "run"
    if opts.work_dir is None:
        subprocess.run([*SANAKIT, "train", f"--work_dir={work}", *TINY], check=True)
    ckpt = sorted((work / "checkpoints").glob("step_*"))[-1]
    fields = [ckpt.name, False, "a red circle", None, None, None, 0, 1]
    server, port = start_server(work)
    try:
        first = timed(lambda: call(port, fields))
        warm = [timed(lambda: call(port, fields)) for _ in range(5)]
        cli = [
            timed(lambda: subprocess.run(
                [*SANAKIT, "sample", f"--checkpoint={ckpt}", "--prompt=a red circle",
                 "--num_images=1", f"--out={scratch / 'cli.png'}"], check=True,
                capture_output=True,
            ))
            for _ in range(3)
        ]  # fmt: skip
        rss, answered = load_rounds(server.pid, port, fields, opts.rounds)
    finally:
        server.terminate()
        server.wait()
    report = {
        "first_request_s": first,
        "warm_request_s": statistics.median(warm),
        "sanakit_sample_s": statistics.median(cli),
        "cli_over_warm": statistics.median(cli) / statistics.median(warm),
        "rss_mb_per_round": rss,
        "sampled_busy_per_round": answered,
        "load_average": os.getloadavg()[0],
    }
    for key, value in report.items():
        print(f"{key:24s} {value}")
    print(json.dumps(report))
    return 0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_rounds(pid: int, port: int, fields: list, rounds: int) -> tuple[list, list]:
    """RSS (MB) before and after each round of 20 concurrent requests; (sampled, busy) each."""
    process = psutil.Process(pid)
    rss, answered = [process.memory_info().rss >> 20], []
    for r in range(rounds):
        messages: list[str] = []

        def ask(seed: int, into: list = messages) -> None:
            into.append(call(port, [*fields[:6], seed, 1]))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(20 * r, 20 * r + 20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = sum(m.startswith("done in") for m in messages)
        busy = sum("busy:" in m for m in messages)
        answered.append((done, busy))
        rss.append(process.memory_info().rss >> 20)
    return rss, answered


if __name__ == "__main__":
    sys.exit(main())
