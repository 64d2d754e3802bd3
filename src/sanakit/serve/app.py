"""The page: a run view that refreshes itself (a Gradio timer, no reload) above a sample form.

Gradio is given no path inside WORK_DIR to serve (``allowed_paths`` is empty and WORK_DIR is a
blocked path): every image on the page is a copy in the server's own temp dir (``files.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from sanakit.config import Sampler
from sanakit.errors import SanakitError
from sanakit.serve.files import PublicFiles
from sanakit.serve.metrics import Series
from sanakit.serve.run_view import RunView, Snapshot
from sanakit.serve.sampling import (
    MAX_IMAGES,
    MAX_PROMPTS,
    SampleService,
    page_defaults,
    parse_request,
)
from sanakit.units import human_bytes

log = logging.getLogger("sanakit")

REFRESH_SECONDS = 2.0
MAX_HISTORY = 12  # sampled grids kept in a page's gallery
QUEUE_MAX = 64  # events Gradio itself queues (refreshes and samples together)
SESSIONS_KEPT = 100  # open pages (and API callers) whose state is kept, the oldest dropped
CHECKPOINT_COLUMNS = [
    "step",
    "checkpoint",
    "size",
    "verified",
    "encoder",
    "max length",
    "fingerprint",
    "instruction",
]


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def status_markdown(snap: Snapshot) -> str:
    s = snap.status
    total = f" / {s.max_steps}" if s.max_steps is not None else ""
    parts = [f"step {s.step}{total}"]
    if s.steps_per_second:
        parts.append(f"{s.steps_per_second:.2f} steps/s")
    if s.eta_seconds is not None:
        parts.append(f"ETA {duration(s.eta_seconds)}")
    return f"## {snap.name}\n`{snap.work_dir}`\n\n**{s.state.value}**: {s.detail}\n\n" + " · ".join(
        parts
    )


def frame(curves: dict[str, Series]) -> pd.DataFrame:
    rows = [(step, value, name) for name, c in curves.items() for step, value in c.sampled()]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def checkpoint_rows(snap: Snapshot) -> list[list[Any]]:
    return [
        [
            c.step,
            c.name,
            human_bytes(c.size),
            "yes" if c.verified else (c.problem if c.pending else f"NO: {c.problem}"),
            c.encoder,
            c.max_length,
            c.fingerprint,
            c.instruction,
        ]
        for c in snap.checkpoints
    ]


def picker_update(snap: Snapshot, chosen: str | None) -> Any:
    """Every step directory (unverified ones marked); the choice kept, else newest verified."""
    names = [c.name for c in snap.checkpoints if c.name.startswith("step_") and "." not in c.name]
    labels = {
        c.name: f"step {c.step}"
        + ("" if c.verified else " (checking)" if c.pending else " (NOT verified)")
        for c in snap.checkpoints
    }
    if chosen not in names:
        chosen = next((c.name for c in snap.checkpoints if c.verified), None)
    return gr.update(choices=[(labels[n], n) for n in names], value=chosen)


def signature(curve: Series) -> tuple:
    return (len(curve), curve.last())


def view_parts(snap: Snapshot, chosen: str | None) -> dict[str, tuple[Any, Any]]:
    """Each output of a refresh as (signature, value-maker): values are built only if changed."""
    heldout, scalars = snap.heldout, snap.scalars
    curves = {"raw": snap.loss_raw, "smoothed": snap.loss_smoothed}
    return {
        "status": (status_markdown(snap), lambda: status_markdown(snap)),
        "loss": (tuple(signature(c) for c in curves.values()), lambda: frame(curves)),
        "heldout": (tuple((k, signature(v)) for k, v in heldout.items()), lambda: frame(heldout)),
        **{
            name: (signature(curve), lambda curve=curve, name=name: frame({name: curve}))
            for name, curve in scalars.items()
        },
        "grids": (
            tuple(snap.grids),
            lambda: [(str(path), f"step {step}") for step, path in snap.grids],
        ),
        "checkpoints": (
            tuple(snap.checkpoints),
            lambda: pd.DataFrame(checkpoint_rows(snap), columns=CHECKPOINT_COLUMNS),
        ),
        "picker": (
            (tuple((c.name, c.verified) for c in snap.checkpoints), chosen),
            lambda: picker_update(snap, chosen),
        ),
    }


def build_page(view: RunView, service: SampleService) -> gr.Blocks:
    snap = view.snapshot()
    cfg_scale, steps, sampler = page_defaults(snap.config)
    with gr.Blocks(title=f"sanakit · {snap.name}", delete_cache=(600, 3600)) as page:
        seen = gr.State({})
        history = gr.State([])
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            plots = {
                "loss": line_plot("training loss (exact, and smoothed)", "loss-plot", "series"),
                "heldout": line_plot(
                    "held-out loss (runs with a held-out set)", "heldout-plot", "series"
                ),
            }
        with gr.Row():
            for name in snap.scalars:
                plots[name] = line_plot(name, name.split()[0] + "-plot", None)
        grids = gr.Gallery(
            label="validation grids, newest first",
            elem_id="vis-grids",
            columns=4,
            height=260,
            object_fit="contain",
        )
        table = gr.Dataframe(
            headers=CHECKPOINT_COLUMNS, label="checkpoints", elem_id="checkpoints", wrap=True
        )
        form = sample_form(cfg_scale, steps, sampler)
        message = gr.Markdown(elem_id="sample-message")
        results = gr.Gallery(
            label="samples",
            elem_id="results",
            columns=4,
            height=360,
            object_fit="contain",
            preview=False,
        )
        download = gr.DownloadButton("Download PNG", elem_id="download", visible=False)
        outputs = [status, *plots.values(), grids, table, form["checkpoint"], seen]
        order = ["status", *plots, "grids", "checkpoints", "picker"]
        refresh = refresher(view, order)
        page.load(
            refresh, [seen, form["checkpoint"]], outputs, queue=False, api_visibility="private"
        )
        timer = gr.Timer(REFRESH_SECONDS)
        timer.tick(
            refresh, [seen, form["checkpoint"]], outputs, queue=False, api_visibility="private"
        )
        form["generate"].click(
            sampler_fn(view, service),
            [*(form[k] for k in FORM_FIELDS), history],
            [message, results, download, history],
            api_name="sample",
            concurrency_limit=None,  # the service queues and refuses by itself, with a message
        )
    return page


def line_plot(title: str, elem_id: str, color: str | None) -> gr.LinePlot:
    return gr.LinePlot(x="step", y="value", color=color, elem_id=elem_id, height=240, label=title)


FORM_FIELDS = ["checkpoint", "ema", "prompts", "cfg_scale", "steps", "sampler", "seed", "num"]


def sample_form(cfg_scale: float, steps: int, sampler: str) -> dict[str, Any]:
    gr.Markdown("### Sample a checkpoint")
    with gr.Row():
        checkpoint = gr.Dropdown(
            label="checkpoint", choices=[], elem_id="checkpoint", allow_custom_value=True
        )  # checked by name on the server: the page sends a name, never a path
        ema = gr.Checkbox(label="EMA weights", value=False, elem_id="ema")
    prompts = gr.Textbox(
        label=f"prompts (one per line, at most {MAX_PROMPTS})", lines=2, elem_id="prompts"
    )
    with gr.Row():
        fields = {
            "cfg_scale": gr.Number(label="CFG scale", value=cfg_scale, elem_id="cfg-scale"),
            "steps": gr.Number(label="steps", value=steps, precision=0, elem_id="steps"),
            "sampler": gr.Dropdown(
                label="sampler", choices=[s.value for s in Sampler], value=sampler
            ),
            "seed": gr.Number(label="seed", value=0, precision=0, elem_id="seed"),
            "num": gr.Number(
                label=f"images per prompt (at most {MAX_IMAGES} per request)",
                value=1,
                precision=0,
                elem_id="num-images",
            ),
        }
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    return {"checkpoint": checkpoint, "ema": ema, "prompts": prompts, **fields, "generate": go}


def refresher(view: RunView, order: list[str]):
    """The refresh of one page: only the outputs whose signature changed are sent."""

    def refresh(seen: dict, chosen: str | None) -> list[Any]:
        try:
            parts = view_parts(view.snapshot(), chosen)
        except Exception as err:  # noqa: BLE001 - a refresh that fails must not stop the page
            log.exception("cannot read %s", view.work_dir)
            note = f"**cannot read the run right now** ({type(err).__name__}: {err})"
            return [note, *[gr.skip()] * (len(order) - 1), {}]
        seen = dict(seen or {})
        values = []
        for key in order:
            sig, make = parts[key]
            if seen.get(key) == sig:
                values.append(gr.skip())
            else:
                seen[key] = sig
                values.append(make())
        return [*values, seen]

    return refresh


def sampler_fn(view: RunView, service: SampleService):
    def generate(
        checkpoint, ema, prompts, cfg_scale, steps, sampler, seed, num, history,
        progress=gr.Progress(),
    ):  # fmt: skip
        try:
            request = parse_request(
                view.work_dir / "checkpoints", checkpoint, ema, prompts, cfg_scale, steps,
                sampler, seed, num,
            )  # fmt: skip
            result = service.run(request, lambda f, what: progress(f, desc=what))
        except SanakitError as err:  # refused, or a checkpoint that fails to load
            return f"**error:** {err}", gr.skip(), gr.skip(), history
        except Exception as err:  # noqa: BLE001 - the server keeps serving whatever happens
            log.exception("sampling failed")
            failed = f"**error:** sampling failed ({type(err).__name__}: {err})"
            return failed, gr.skip(), gr.skip(), history
        caption = result.request.describe()
        history = [(str(result.path), caption), *(history or [])][:MAX_HISTORY]
        note = f"done in {result.seconds:.1f} s: {caption}"
        return note, history, gr.DownloadButton(value=str(result.path), visible=True), history

    return generate


def serve(work_dir: Path, host: str, port: int, temp_dir: Path) -> None:
    """Build the page, listen, and block until interrupted (KeyboardInterrupt)."""
    files = PublicFiles(temp_dir, work_dir)
    view = RunView(work_dir, files)
    page = build_page(view, SampleService(files))
    page.queue(max_size=QUEUE_MAX, default_concurrency_limit=1)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            quiet=True,
            allowed_paths=[],
            blocked_paths=[str(work_dir)],
            max_file_size="1mb",  # the page has no upload; Gradio's upload route stays small
            # each page or API call is a session whose state Gradio keeps (default 10,000)
            state_session_capacity=SESSIONS_KEPT,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
        )
    except OSError as err:
        raise SanakitError(f"cannot listen on {host}:{port} ({err}); pass another --port") from None
    print(f"serving {work_dir} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        page.close()
