"""LoRA through peft: adapter-only training, checkpoints, resume, DDP, sampling, export.

One tiny latent base (DC-AE, shapes without magenta) is trained once; a rank-4 LoRA learns a
folder of magenta shapes on top of it (the fine-tuning demo's mechanics, not its accuracy).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import slow_write
import torch
from conftest import (
    FAST,
    TORCHRUN,
    checkpoint_dir,
    cli_env,
    losses,
    run_launched,
    run_sanakit,
    the_error_line,
)
from safetensors.torch import load_file, save_file

from sanakit.config import load_config
from sanakit.errors import CheckpointError, ConfigError
from sanakit.io.checkpoint import verify_checkpoint
from sanakit.models.base_identity import identify_base
from sanakit.models.lora import add_lora, is_adapter_key, lora_parameter_count
from sanakit.models.tiny import make_tiny_autoencoder

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("demo", ROOT / "benchmarks" / "finetune_demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

LATENT = [*FAST, "--model.image_size=32", "--vae.type=dc-ae"]
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-step base that never saw magenta and a folder of 16 magenta shapes."""
    root = tmp_path_factory.mktemp("lora")
    vae = make_tiny_autoencoder("dc-ae", root / "dcae")
    base = root / "base"
    r = run_sanakit(
        "train", f"--work_dir={base}", *LATENT, f"--vae.name_or_path={vae}",
        "--train.max_steps=2", "--data.exclude_colors=[magenta]",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    folder = demo.write_hue_folder(root / "magenta", "magenta", 16, 32)
    return {"root": root, "vae": vae, "base": base, "folder": folder}


def lora_args(runs: dict[str, Path], work: Path, *extra: str) -> list[str]:
    return [
        "train", f"--work_dir={work}", *LATENT, f"--vae.name_or_path={runs['vae']}",
        f"--load_from={runs['base']}", "--lora.rank=4", "--data.type=image_folder",
        f"--data.data_dir=[{runs['folder']}]", "--train.ema_rate=0.9",
        "--train.save_model_steps=1", f"--train.max_steps={STEPS}", "--train.lr=1e-2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(runs) -> Path:
    """4 uninterrupted LoRA steps, one process x batch 8 (2 steps per epoch)."""
    work = runs["root"] / "lora"
    r = run_sanakit(*lora_args(runs, work, "--train.train_batch_size=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def test_config_checks_and_targets_name_what_exists() -> None:
    for bad, words in (
        (["--lora.rank=4"], "neither model.pretrained nor load_from"),
        (["--lora.rank=4", "--load_from=x", "--train.fsdp=true"], "train.fsdp=true"),
        (["--lora.rank=-1"], "lora.rank"),
        (["--lora.dropout=1.5"], "lora.dropout"),
        (["--data.exclude_colors=[pink]"], "pink"),
        (["--data.exclude_colors=[red,yellow,green,cyan,blue,magenta]"], "no colour"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config(None, bad)
    from sanakit.models.transformer import build_transformer

    cfg = load_config(None, [*FAST, "--lora.rank=2", "--load_from=x"])
    model = build_transformer(cfg, 3, 384, 1)
    with pytest.raises(ConfigError, match="matches no layer.*to_q, to_k, to_v, to_out.0"):
        add_lora(model, cfg.lora.__class__(rank=2, target_modules=["to_qq"]))
    total = sum(p.numel() for p in model.parameters())
    counted = lora_parameter_count(model, cfg.lora)  # what doctor and the benchmark use
    trainable = add_lora(model, cfg.lora)
    assert counted == trainable
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(is_adapter_key(n) for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    # every default target is adapted in the block: attention (self + cross) and the Mix-FFN
    for target in ("attn1.to_q", "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point"):
        assert any(f"{target}.lora_A" in n for n in names), target
    assert 0 < trainable < total / 5


def test_doctor_memory_estimate_counts_only_the_adapter_as_trained() -> None:
    from types import SimpleNamespace

    from sanakit.doctor.models import estimate_train_memory
    from sanakit.models.transformer import build_transformer

    frozen = SimpleNamespace(dtype=torch.float32, downsample_factor=1)
    full = load_config(None, [*FAST])
    lora = load_config(None, [*FAST, "--lora.rank=4", "--load_from=x"])
    probe = SimpleNamespace(
        transformer=build_transformer(full, 3, 384, 1), text_encoder=frozen, autoencoder=frozen
    )
    n = sum(p.numel() for p in probe.transformer.parameters())
    adapter = lora_parameter_count(probe.transformer, lora.lora)
    full_bytes, _ = estimate_train_memory(full, probe)
    lora_bytes, words = estimate_train_memory(lora, probe)
    # full: 20 B per parameter (weights, grads, AdamW, EMA); LoRA: 4 B frozen + 20 B per adapter
    assert full_bytes - lora_bytes == n * 20 - (n * 4 + adapter * 20)
    assert f"LoRA rank 4 ({adapter:,} params)" in words


def test_cli_option_errors_are_one_line(tmp_path) -> None:
    both = run_sanakit("export", str(tmp_path), str(tmp_path / "o"), "--lora", "--merge")
    assert "--lora and --merge" in the_error_line(both)
    scale = run_sanakit("sample", f"--checkpoint={tmp_path}", "--prompt=a", "--lora_scale=nan")
    assert "--lora_scale" in the_error_line(scale)


def test_shapes_exclude_colors_never_draws_them() -> None:
    from sanakit.config import SHAPES_COLOURS  # the config's list is the dataset's
    from sanakit.data.shapes import COLOURS, ShapesDataset

    assert tuple(COLOURS) == SHAPES_COLOURS
    data = ShapesDataset(16, seed=0, length=200, exclude_colors=("magenta", "red"))
    assert {data[i]["colour"] for i in range(200)} == {"yellow", "green", "cyan", "blue"}
    full = ShapesDataset(16, seed=0, length=5)
    assert [full[i]["caption"] for i in range(5)] == [
        ShapesDataset(16, seed=0, length=5, exclude_colors=())[i]["caption"] for i in range(5)
    ]


@pytest.mark.slow
def test_checkpoint_holds_the_adapter_and_the_base_identity(runs, lora_run) -> None:
    ckpt = checkpoint_dir(lora_run, STEPS)
    assert verify_checkpoint(ckpt) is None  # the manifest covers every file
    model, ema = (
        load_file(str(ckpt / "model.safetensors")),
        load_file(str(ckpt / "ema.safetensors")),
    )
    assert model.keys() == ema.keys() and all(is_adapter_key(k) for k in model)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in model.items())  # it learned
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(model)  # AdamW moments for the adapter only
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    base = identify_base(runs["base"])
    assert trainer["base_model"] == base.to_dict()
    assert trainer["lora"]["rank"] == 4 and trainer["lora"]["alpha"] == 4.0


@pytest.mark.slow
def test_kill_9_mid_save_then_resume_is_bit_identical(runs, lora_run, tmp_path) -> None:
    work = tmp_path / "killed"
    args = lora_args(runs, work, "--train.train_batch_size=8")
    proc = subprocess.Popen(
        slow_write.command(0.1, *args), env=cli_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((work / "checkpoints").glob(".step_00000002*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its step-2 save could be killed"
    proc.kill()  # inside the write of the step-2 checkpoint (every fsync takes 0.1 s)
    proc.wait()
    r = run_sanakit(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert losses(work) == losses(lora_run)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt"):
        mine, theirs = checkpoint_dir(work, STEPS) / name, checkpoint_dir(lora_run, STEPS) / name
        assert mine.read_bytes() == theirs.read_bytes(), name
    assert not [p for p in (work / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_two_ranks_equal_one_rank(runs, lora_run, tmp_path) -> None:
    work = tmp_path / "ddp"
    r = run_launched(TORCHRUN, *lora_args(runs, work, "--train.train_batch_size=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(work) == pytest.approx(losses(lora_run), rel=1e-6)
    a = load_file(str(checkpoint_dir(work, STEPS) / "model.safetensors"))
    b = load_file(str(checkpoint_dir(lora_run, STEPS) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def other_base(runs: dict[str, Path]) -> Path:
    """The base's weights with one tensor changed: another base."""
    other = runs["root"] / "other_base"
    if not other.exists():
        other.mkdir()
        weights = load_file(str(checkpoint_dir(runs["base"], 2) / "model.safetensors"))
        weights["proj_out.bias"] = weights["proj_out.bias"] + 1
        save_file(weights, str(other / "model.safetensors"))
    return other


@pytest.mark.slow
def test_another_base_at_sample_or_resume_is_one_line(runs, lora_run, tmp_path) -> None:
    from sanakit.inference import load_for_inference
    from sanakit.models.base_identity import BaseMismatch

    recorded = identify_base(runs["base"]).fingerprint[:16]
    other = identify_base(other_base(runs)).fingerprint[:16]
    with pytest.raises(BaseMismatch) as err:  # what `sample --base=OTHER` prints
        load_for_inference(lora_run, base=other_base(runs))
    assert recorded in str(err.value) and other in str(err.value)
    weights = checkpoint_dir(runs["base"], 2) / "model.safetensors"
    moved = runs["root"] / "moved.safetensors"
    weights.rename(moved)
    try:
        with pytest.raises(CheckpointError, match="is gone; pass --base"):
            load_for_inference(lora_run)
        load_for_inference(lora_run, base=moved)  # the same weights elsewhere: accepted
    finally:
        moved.rename(weights)

    work = tmp_path / "w"
    shutil.copytree(lora_run, work)
    before = sorted(p.name for p in (work / "checkpoints").iterdir())
    elsewhere = [f"--load_from={other_base(runs)}", "--train.max_steps=6"]
    r = run_sanakit(*lora_args(runs, work, "--train.train_batch_size=8", *elsewhere))
    line = the_error_line(r)
    assert recorded in line and other in line
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before  # nothing lost


@pytest.mark.slow
def test_lora_scale_zero_is_the_base_and_eval_scores_the_run(runs, lora_run, tmp_path) -> None:
    from sanakit.inference import load_for_inference

    prompts, kw = ["a magenta circle"], dict(cfg_scale=4.5, steps=3, sampler="flow_euler", seed=3)
    base = load_for_inference(runs["base"]).generate(prompts, **kw)
    off = load_for_inference(lora_run, lora_scale=0.0).generate(prompts, **kw)
    on = load_for_inference(lora_run).generate(prompts, **kw)
    assert torch.allclose(off, base, atol=1e-6)
    assert float((on - base).abs().max()) > 1e-3

    from sanakit.cli.images import cmd_eval

    out = tmp_path / "eval.json"  # a LoRA run trained on an image folder is scored too
    args = ["--samples_per_prompt=1", "--steps=2", "--cfg_scales=[1.0]", f"--out={out}"]
    assert cmd_eval([f"--checkpoint={lora_run}", *args]) == 0
    scores = demo.colour_scores(json.loads(out.read_text()), "magenta")
    assert set(scores["1.0"]) == {"new_hue", "old_hues"}


@pytest.mark.slow
def test_export_lora_and_merge_sample_like_sanakit(runs, lora_run, tmp_path) -> None:
    from diffusers import SanaPipeline

    from sanakit.export import ExportError, export_checkpoint
    from sanakit.export_lora import export_lora
    from sanakit.inference import load_for_inference

    export_checkpoint(runs["base"], tmp_path / "base")
    export_lora(lora_run, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    settings = json.loads((tmp_path / "adapter" / "sanakit.json").read_text())
    assert settings["base_model"] == identify_base(runs["base"]).to_dict()
    export_checkpoint(lora_run, tmp_path / "merged", merge=True)

    prompts = ["a magenta circle", "a red square"]
    kwargs = dict(
        height=32, width=32, use_resolution_binning=False, max_sequence_length=8,
        complex_human_instruction=None, guidance_scale=4.5, num_inference_steps=4,
        negative_prompt="", output_type="pt",
    )  # fmt: skip
    ours = load_for_inference(lora_run).generate(
        prompts, cfg_scale=4.5, steps=4, sampler="flow_dpm_solver", seed=7
    )
    ours = (ours + 1) / 2
    pipe = SanaPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(prompts, generator=torch.Generator().manual_seed(7), **kwargs).images
    pipe.load_lora_weights(tmp_path / "adapter")
    adapted = pipe(prompts, generator=torch.Generator().manual_seed(7), **kwargs).images
    merged_pipe = SanaPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    merged_pipe.set_progress_bar_config(disable=True)
    merged = merged_pipe(prompts, generator=torch.Generator().manual_seed(7), **kwargs).images
    assert float((adapted - ours).abs().max()) <= 1e-4
    assert float((merged - ours).abs().max()) <= 1e-4
    assert float((plain - ours).abs().max()) > 1e-3  # the adapter matters

    with pytest.raises(ExportError, match="--lora.*--merge"):  # a LoRA run needs one of them
        export_checkpoint(lora_run, tmp_path / "plain")
    with pytest.raises(ExportError, match="full fine-tune"):
        export_lora(runs["base"], tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
