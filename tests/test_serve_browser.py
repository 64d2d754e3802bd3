"""Issue 14 in a real browser: `sanakit serve` as a subprocess, driven by Debian's Chromium
through playwright. One tiny finished run (with validation grids, a corrupt and a half-written
checkpoint, and a symlink planted in vis/) and one server are shared by every test here."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import FAST, cli_env, run_sanakit, start_sanakit
from playwright.sync_api import Browser, expect, sync_playwright

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
RUN = [a for a in FAST if a != "--train.visualize=false"] + [
    "--train.visualize=true",
    "--train.max_steps=4",
    "--train.save_model_steps=2",
    "--train.eval_sampling_steps=2",
]
PROMPT, SEED, STEPS = "a red circle", 11, 4
WAIT_MS = 60_000


@dataclass
class Site:
    work: Path
    port: int
    server: subprocess.Popen
    before: dict
    cli_png: Path
    cli_sample: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` (symlinks not followed): type, size, mtime, content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            if path.is_symlink():
                digest = os.readlink(path)
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def wait_until_up(site_url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.stderr.read()[-3000:]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", int(site_url.split(":")[2][:-1]))
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    base = tmp_path_factory.mktemp("serve")
    work = base / "run"
    done = run_sanakit("train", f"--work_dir={work}", *RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpts = work / "checkpoints"
    (ckpts / "step_00000002" / "ema.safetensors").write_bytes(b"torn")  # no longer verifies
    (ckpts / ".step_00000006.tmp-999999-abcd").mkdir()  # what a killed save leaves
    outside = base / "outside.png"
    outside.write_bytes((work / "vis" / "step_00000004.png").read_bytes())
    os.symlink(outside, work / "vis" / "step_00000009.png")  # must never be shown or served
    before = tree(work)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sanakit", "serve", str(work), f"--port={port}"],
        cwd=work,  # Gradio must not write into its working directory either
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    cli_png = base / "cli.png"
    cli_sample = start_sanakit(
        "sample", f"--checkpoint={ckpts / 'step_00000004'}", f"--prompt={PROMPT}",
        f"--seed={SEED}", f"--steps={STEPS}", "--num_images=1", f"--out={cli_png}",
    )  # fmt: skip
    site = Site(work, port, server, before, cli_png, cli_sample)
    try:
        wait_until_up(site.url, server)
        yield site
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        cli_sample.kill()


@pytest.fixture(scope="module")
def browser() -> Browser:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield chromium
        chromium.close()


def call_sample(site: Site, *data) -> tuple[str, list]:
    """One request through Gradio's HTTP API: (event, outputs) of ``/sample``."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=120)
    body = json.dumps({"data": list(data)})
    conn.request("POST", "/gradio_api/call/sample", body, {"Content-Type": "application/json"})
    event_id = json.loads(conn.getresponse().read())["event_id"]
    conn.request("GET", f"/gradio_api/call/sample/{event_id}")
    event, payload = "", None
    for raw in conn.getresponse().read().decode().splitlines():
        if raw.startswith("event: "):
            event = raw[len("event: ") :]
        elif raw.startswith("data: ") and event in ("complete", "error"):
            payload = json.loads(raw[len("data: ") :])
    return event, payload


def request_fields(prompt: str = PROMPT, seed: int = SEED) -> list:
    return ["step_00000004", False, prompt, None, STEPS, None, seed, 1]


def test_the_page_shows_a_finished_run(site: Site, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(site.url)
    status = page.locator("#status")
    expect(status).to_contain_text("step 4 / 4", timeout=WAIT_MS)
    expect(status).to_contain_text("finished")
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    grids = page.locator("#vis-grids img")
    expect(grids).to_have_count(3)  # steps 4, 2, 1; never the symlink planted as step 9
    expect(page.locator("#vis-grids")).to_contain_text("step 4")
    assert "step_00000009" not in page.content()
    table = page.locator("#checkpoints")
    state = json.loads((site.work / "checkpoints/step_00000004/trainer_state.json").read_text())
    fingerprint = state["null_embed_provenance"]["fingerprint"][:12]
    for text in ["step_00000004", "yes", "minilm", fingerprint, "NO: ema.safetensors: size"]:
        expect(table).to_contain_text(text)
    expect(table).to_contain_text("half-written")
    page.close()


def test_generate_gives_the_bytes_of_sanakit_sample(site: Site, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(site.url)
    expect(page.locator("#status")).to_contain_text("step 4 / 4", timeout=WAIT_MS)
    page.fill("#prompts textarea", PROMPT)
    page.fill("#seed input", str(SEED))
    page.fill("#steps input", str(STEPS))
    page.click("#generate")
    expect(page.locator("#sample-message")).to_contain_text("done in", timeout=WAIT_MS)
    expect(page.locator("#results img").first).to_be_visible()
    expect(page.locator("#results")).to_contain_text(f"seed {SEED}")  # the settings it shows
    with page.expect_download() as download:
        page.click("#download")
    web_png = Path(download.value.path()).read_bytes()
    assert site.cli_sample.wait(timeout=120) == 0, site.cli_sample.stderr.read()[-2000:]
    assert web_png == site.cli_png.read_bytes()
    page.close()


def test_bad_inputs_show_a_message_and_the_server_keeps_serving(
    site: Site, browser: Browser
) -> None:
    page = browser.new_page()
    page.goto(site.url)
    expect(page.locator("#status")).to_contain_text("step 4 / 4", timeout=WAIT_MS)
    message = page.locator("#sample-message")
    cases = [
        ("", "3", "1", "no prompt given"),
        (PROMPT, "0", "1", "steps must be a whole number from 1 to"),
        (PROMPT, "3", "10000", "images per prompt must be a whole number from 1 to 16"),
    ]
    for prompt, steps, images, expected in cases:
        page.fill("#prompts textarea", prompt)
        page.fill("#steps input", steps)
        page.fill("#num-images input", images)
        page.click("#generate")
        expect(message).to_contain_text(expected, timeout=WAIT_MS)
    corrupt = ["step_00000002", *request_fields()[1:]]  # listed, but it does not verify
    event, outputs = call_sample(site, *corrupt)
    assert event == "complete" and "does not verify (ema.safetensors: size" in outputs[0]
    event, outputs = call_sample(site, *request_fields())
    assert event == "complete" and outputs[0].startswith("done in")
    assert site.server.poll() is None
    page.close()


def raw_get(site: Site, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, response.read()


def test_no_route_serves_a_file_it_was_not_given(site: Site) -> None:
    work = site.work
    event, outputs = call_sample(site, *request_fields(seed=1))
    served = Path(outputs[1][0]["image"]["path"])  # a sample, in the server's temp dir
    temp = served.parent.parent
    assert not served.is_relative_to(work)
    status, body = raw_get(site, f"/gradio_api/file={served}")
    assert status == 200 and body.startswith(b"\x89PNG")  # what it serves, it serves
    link = temp / "samples" / "link.png"
    os.symlink(work / "config.yaml", link)  # a symlink out of what is served, into WORK_DIR
    secret = (work / "config.yaml").read_bytes()[:40]
    targets = [
        work / "config.yaml",
        work / "vis" / "step_00000004.png",
        work / "vis" / "step_00000009.png",
        work / "checkpoints" / "step_00000004" / "model.safetensors",
        link,
        "/etc/passwd",
        f"{temp}/../../etc/passwd",
        f"{temp}/samples/../../{work.name}/config.yaml",
        f"{temp}/%2e%2e/%2e%2e/etc/passwd",
        "../../../../../../etc/passwd",
        "file:///etc/passwd",
    ]
    for target in targets:
        for prefix in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            for path in (str(target), urllib.parse.quote(str(target), safe="")):
                status, body = raw_get(site, prefix + path)
                assert status in (400, 403, 404), (prefix + path, status)
                assert secret not in body and b"root:" not in body, prefix + path
    event, outputs = call_sample(site, "../../etc", False, PROMPT, None, 2, None, 0, 1)
    assert event == "complete" and "no checkpoint named '../../etc'" in outputs[0]


def test_twenty_concurrent_requests_are_answered_or_refused_as_busy(site: Site) -> None:
    server = psutil.Process(site.server.pid)
    rss = [server.memory_info().rss]
    for _round in range(2):
        answers: list = []

        def ask(seed: int, into: list = answers) -> None:
            into.append(call_sample(site, *request_fields(seed=seed)))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        messages = [outputs[0] for event, outputs in answers if event == "complete"]
        done = [m for m in messages if m.startswith("done in")]
        busy = [m for m in messages if m.startswith("**error:** busy:")]
        assert len(answers) == 20 and len(done) + len(busy) == 20, messages
        assert len(done) >= 1
        rss.append(server.memory_info().rss)
        print(f"round {_round + 1}: {len(done)} sampled, {len(busy)} refused as busy")
    print("server RSS MB before / after round 1 / after round 2:", [r >> 20 for r in rss])
    assert rss[2] - rss[1] < 64 << 20  # a second round of 20 does not grow it again
    assert site.server.poll() is None


def test_the_server_wrote_nothing_into_the_work_dir(site: Site) -> None:
    assert tree(site.work) == site.before


def test_the_step_increases_while_a_run_trains(site: Site, browser: Browser) -> None:
    page = browser.new_page()
    page.goto(site.url)
    status = page.locator("#status")
    expect(status).to_contain_text("finished", timeout=WAIT_MS)
    more = [a for a in RUN if "max_steps" not in a and "visualize" not in a]
    trainer = start_sanakit(
        "train", f"--work_dir={site.work}", *more, "--train.max_steps=100000",
        "--train.visualize=false", "--train.save_model_steps=100000",
        output=site.work.parent / "trainer.log",  # read by no one until it is killed
    )  # fmt: skip
    try:
        expect(status).to_contain_text("/ 100000", timeout=120_000)  # its config is written
        expect(status).to_contain_text("running")
        first = int(re.search(r"step (\d+) / 100000", status.inner_text()).group(1))
        expect(status).not_to_contain_text(f"step {first} / 100000", timeout=WAIT_MS)
        later = int(re.search(r"step (\d+) / 100000", status.inner_text()).group(1))
        assert later > first
    finally:
        trainer.kill()  # SIGKILL: the page must now call it crashed, from the record it left
        trainer.wait()
    expect(status).to_contain_text("crashed", timeout=WAIT_MS)
    expect(status).to_contain_text(f"pid {trainer.pid}")
    page.close()
