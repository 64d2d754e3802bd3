"""diffusers interop: `sanakit export` folders load in SanaPipeline and sample like `sanakit`;
`load_from` accepts a diffusers Sana transformer folder.

Real components throughout: tiny models trained by the real CLI in subprocesses, the real export
command, diffusers' own SanaPipeline.from_pretrained on the result.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import slow_write
import torch
from conftest import FAST, checkpoint_dir, cli_env, run_sanakit
from safetensors.torch import load_file

from sanakit.models.tiny import make_tiny_autoencoder

# A latent model: tiny random AutoencoderDC (factor 2), 32 px images -> 16x16x4 latents.
LATENT = [
    *FAST,
    "--model.image_size=32",
    "--vae.type=dc-ae",
    "--train.max_steps=4",
    "--train.lr=3e-3",
]
PIXEL = [*FAST, "--train.max_steps=2"]


def one_line_error(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    vae = make_tiny_autoencoder("dc-ae", root / "dcae")
    work = root / "work"
    r = run_sanakit("train", f"--work_dir={work}", *LATENT, f"--vae.name_or_path={vae}")
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def latent_export(latent_run: Path) -> Path:
    out = latent_run.parent / "exported"
    r = run_sanakit("export", str(latent_run), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note:" not in r.stdout  # a latent DC-AE model runs in SanaPipeline: no notice
    return out


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pixel") / "work"
    r = run_sanakit("train", f"--work_dir={work}", *PIXEL)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.mark.slow
def test_exported_pipeline_matches_sanakit_sampling(latent_run: Path, latent_export: Path) -> None:
    from diffusers import SanaPipeline

    from sanakit.inference import load_for_inference

    settings = json.loads((latent_export / "sanakit.json").read_text())
    assert settings["max_sequence_length"] == 8
    assert settings["complex_human_instruction"] is None
    assert settings["sampler"] == "flow_dpm_solver" and settings["num_inference_steps"] == 20
    assert settings["guidance_scale"] == 4.5 and settings["flow_shift"] == 3.0
    null = settings["null_embedding"]
    assert "null_embed.pth" in null["source"] and null["provenance"]["encoder"] == "minilm"
    assert null["exported_encoder_reproduces_it"] is True
    card = (latent_export / "README.md").read_text()
    assert "max_sequence_length 8" in card and "flow_dpm_solver, 20 steps" in card

    pipe = SanaPipeline.from_pretrained(latent_export, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue triangle"]
    kwargs = dict(
        height=32,
        width=32,
        use_resolution_binning=False,
        max_sequence_length=settings["max_sequence_length"],
        complex_human_instruction=None,
        guidance_scale=settings["guidance_scale"],
        num_inference_steps=settings["num_inference_steps"],
        negative_prompt="",
        output_type="pt",
    )
    theirs = pipe(prompts, generator=torch.Generator().manual_seed(7), **kwargs).images

    inf = load_for_inference(latent_run)
    ours = inf.generate(
        prompts,
        cfg_scale=settings["guidance_scale"],
        steps=settings["num_inference_steps"],
        sampler=settings["sampler"],
        seed=7,
    )
    ours = (ours + 1) / 2  # ours is in [-1, 1]; output_type="pt" is in [0, 1]
    assert theirs.shape == ours.shape == (2, 3, 32, 32)
    diff = float((theirs - ours).abs().max())
    print(f"round-trip max abs diff: {diff:.3e}")
    assert diff <= 1e-4

    # the comparison is sensitive: the trained transformer and the guidance change the images
    unguided = pipe(
        prompts, generator=torch.Generator().manual_seed(7), **{**kwargs, "guidance_scale": 1.0}
    ).images
    assert float((unguided - theirs).abs().max()) > 1e-2
    assert float((theirs[0] - theirs[1]).abs().max()) > 1e-2


@pytest.mark.slow
def test_export_ema_selects_ema_weights(latent_run: Path, tmp_path: Path) -> None:
    from sanakit.export import export_checkpoint

    out = tmp_path / "ema_export"
    result = export_checkpoint(latent_run, out, ema=True)
    assert result.pipeline_runnable and result.settings["weights"] == "ema"
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    step = checkpoint_dir(latent_run, 4)
    ema = load_file(str(step / "ema.safetensors"))
    model = load_file(str(step / "model.safetensors"))
    assert set(ema) <= set(exported)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(exported[k], model[k]) for k in ema)
    assert json.loads((out / "sanakit.json").read_text())["weights"] == "ema"
    assert [p.name for p in tmp_path.iterdir()] == ["ema_export"]  # no temp sibling left


@pytest.mark.slow
def test_export_pixel_model_layout_and_notice(pixel_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pixel_export"
    r = run_sanakit("export", str(pixel_run), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [ln for ln in r.stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "pixel" in notes[0] and "SanaPipeline" in notes[0]
    top = sorted(p.name for p in out.iterdir())
    assert top == [
        "README.md",
        "null_embed.pth",
        "sanakit.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "transformer",
    ]
    from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    transformer = SanaTransformer2DModel.from_pretrained(out, subfolder="transformer")
    saved = load_file(str(checkpoint_dir(pixel_run, 2) / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in transformer.state_dict().items())
    scheduler = DPMSolverMultistepScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.use_flow_sigmas and scheduler.config.flow_shift == 3.0
    AutoTokenizer.from_pretrained(out / "tokenizer")
    assert type(AutoModel.from_pretrained(out / "text_encoder")).__name__ == "BertModel"
    settings = json.loads((out / "sanakit.json").read_text())
    assert settings["pipeline_runnable"] is False and settings["vae_type"] == "pixel"
    assert settings["pipeline_kwargs"] is None
    assert "SanaPipeline cannot run this model (vae.type=pixel" in (out / "README.md").read_text()


@pytest.mark.slow
def test_export_destination_and_checkpoint_errors(pixel_run: Path, tmp_path: Path) -> None:
    # what --overwrite may replace is tested in test_hostile_checkpoints.py
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert "--overwrite" in one_line_error(run_sanakit("export", str(pixel_run), str(out)))
    assert (out / "keep.txt").read_text() == "user data"  # untouched

    missing = tmp_path / "no_such_run"
    assert str(missing) in one_line_error(run_sanakit("export", str(missing), str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


@pytest.mark.slow
def test_killed_export_leaves_no_half_folder(pixel_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # every fsync pauses 60 s: the kill lands after writing, before the rename
    proc = subprocess.Popen(
        slow_write.command(60, "export", str(pixel_run), str(out)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        written = None
        while written is None and proc.poll() is None and time.monotonic() < deadline:
            # the model card is the last file written before the pause
            written = next(iter(tmp_path.glob(".out.tmp-*/README.md")), None)
            time.sleep(0.05)
        assert written is not None, "export never reached its final rename"
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()  # killed before the rename: no OUT_DIR at all, let alone a half one

    from sanakit.export import export_checkpoint

    export_checkpoint(pixel_run, out)  # the next export cleans the dead one's temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def _diffusers_transformer(work: Path, overrides: list[str], dest: Path, seed: int) -> Path:
    """A random SanaTransformer2DModel for the config ``overrides`` say, save_pretrained'ed."""
    from diffusers import SanaTransformer2DModel

    from sanakit.config import load_config
    from sanakit.models.transformer import transformer_kwargs

    cfg = load_config(None, [f"--work_dir={work}", *overrides])
    torch.manual_seed(seed)
    # pixel space: 3 channels, factor 1; MiniLM captions: 384 wide
    model = SanaTransformer2DModel(**transformer_kwargs(cfg, 3, 384, 1))
    model.save_pretrained(dest)
    return dest


@pytest.mark.slow
def test_load_from_diffusers_transformer_folder(tmp_path: Path) -> None:
    work = tmp_path / "ft"
    args = [*FAST, "--train.max_steps=1", "--train.lr=0.0"]
    src = _diffusers_transformer(work, args, tmp_path / "pretrained", seed=123)
    r = run_sanakit("train", f"--work_dir={work}", *args, f"--load_from={src}")
    assert r.returncode == 0, r.stderr[-3000:]
    log_text = (work / "train.log").read_text()
    assert f"loaded weights from {src / 'diffusion_pytorch_model.safetensors'}" in log_text
    # lr=0: one optimizer step leaves the weights exactly as loaded
    pretrained = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(checkpoint_dir(work, 1) / "model.safetensors"))
    assert set(trained) == set(pretrained)
    assert all(torch.equal(trained[k], pretrained[k]) for k in trained)


@pytest.mark.slow
def test_load_from_shape_mismatch_is_one_line_error(tmp_path: Path) -> None:
    work = tmp_path / "ft"
    args = [*FAST, "--train.max_steps=1"]
    wider = [*args, "--model.attention_head_dim=8"]  # same keys, other shapes
    src = _diffusers_transformer(work, wider, tmp_path / "other", seed=0)
    line = one_line_error(run_sanakit("train", f"--work_dir={work}", *args, f"--load_from={src}"))
    assert "do not fit this model" in line and "shape" in line
