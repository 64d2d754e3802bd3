"""Starting from released models: a SanaPipeline folder (sharded transformer, DC-AE, Gemma-2),
a cached repo id, a bare transformer folder, and NVlabs/Sana trainer checkpoints (.pth).

Everything is built in code (``sanakit.models.tiny``); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file

from sanakit.cli.common import load_run_config
from sanakit.config import load_config, user_set_keys
from sanakit.errors import CheckpointError, ConfigError, ModelLoadError
from sanakit.models.pretrained import BaseModelIdentity, base_identity, locate_pretrained
from sanakit.models.pretrained_config import SANA_MAX_LENGTH
from sanakit.models.sana_checkpoint import convert_state, to_nvlabs_names
from sanakit.models.text import SANA_COMPLEX_HUMAN_INSTRUCTION
from sanakit.models.tiny import make_tiny_pipeline, tiny_sana_transformer
from sanakit.models.transformer import load_weights

# a fast run on the tiny pipeline (32 px through the tiny DC-AE, Gemma-2 at 8 tokens)
QUICK = [
    "--text_encoder.max_length=8",
    "--train.train_batch_size=2",
    "--data.max_samples=8",
    "--train.visualize=false",
    "--train.log_interval=1",
    "--train.warmup_steps=2",
    "--report_to=none",
]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("released") / "tiny-sana")


def resolved(*overrides: str, config: str | None = None):
    return load_run_config(config, list(overrides))


def test_a_pipeline_folder_gives_the_architecture_and_every_part(pipe: Path) -> None:
    assert len(list((pipe / "transformer").glob("*.safetensors"))) > 1  # sharded, with index
    cfg = resolved(f"--model.pretrained={pipe}")
    theirs = json.loads((pipe / "transformer" / "config.json").read_text())
    for key in ("patch_size", "num_layers", "num_attention_heads", "cross_attention_head_dim"):
        assert getattr(cfg.model, key) == theirs[key]
    assert (cfg.model.patch_size, cfg.model.num_layers) == (2, 2)  # not the packaged 4 / 4
    assert cfg.model.image_size == theirs["sample_size"] * 2  # the tiny DC-AE's factor
    assert (cfg.vae.type, cfg.vae.name_or_path) == ("dc-ae", str(pipe))
    assert (cfg.text_encoder.type, cfg.text_encoder.name_or_path) == ("gemma-2", str(pipe))
    assert cfg.text_encoder.max_length == SANA_MAX_LENGTH
    assert cfg.text_encoder.complex_human_instruction == SANA_COMPLEX_HUMAN_INSTRUCTION
    # what the user set is kept: max length, and an own autoencoder
    mine = resolved(f"--model.pretrained={pipe}", "--text_encoder.max_length=8", "--vae.type=pixel")
    assert (mine.text_encoder.max_length, mine.vae.type, mine.vae.name_or_path) == (8, "pixel", "")


def test_a_set_model_key_must_agree(pipe: Path, tmp_path: Path) -> None:
    assert resolved(f"--model.pretrained={pipe}", "--model.num_layers=2").model.num_layers == 2
    with pytest.raises(ConfigError) as err:
        resolved(f"--model.pretrained={pipe}", "--model.num_layers=4")
    assert "model.num_layers=4" in str(err.value) and "num_layers=2" in str(err.value)
    # a key set in the user's own config file counts too; the packaged default's never does
    yaml = tmp_path / "mine.yaml"
    yaml.write_text(f"model:\n  pretrained: {pipe}\n  patch_size: 4\n")
    assert user_set_keys(yaml, []) == {"model", "model.pretrained", "model.patch_size"}
    with pytest.raises(ConfigError, match=r"model\.patch_size=4 .* patch_size=2"):
        resolved(config=str(yaml))


def test_a_repo_id_is_found_in_the_local_cache_offline(pipe: Path, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-sana"
    shutil.copytree(pipe, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = locate_pretrained("tiny-org/tiny-sana")
    assert source.root == repo / "snapshots" / "0123abcd" and source.sharded
    cfg = resolved("--model.pretrained=tiny-org/tiny-sana")  # parts named by the repo id too
    assert cfg.vae.name_or_path == cfg.text_encoder.name_or_path == "tiny-org/tiny-sana"
    # the same bytes are the same base model, wherever they live
    assert base_identity("tiny-org/tiny-sana").fingerprint == base_identity(str(pipe)).fingerprint
    with pytest.raises(ModelLoadError, match="not available offline.*model.pretrained"):
        locate_pretrained("tiny-org/not-there")


def test_bad_folders_are_one_line(pipe: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist.*--model.pretrained"):
        locate_pretrained(str(tmp_path / "missing"))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ModelLoadError, match="describes a UNet2DConditionModel, not a Sana"):
        locate_pretrained(str(unet))
    pickled = tmp_path / "pickled"
    shutil.copytree(pipe / "transformer", pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        locate_pretrained(str(pickled))
    huge = tmp_path / "huge"
    shutil.copytree(pipe / "transformer", huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "num_layers": 10**9}))
    with pytest.raises(ModelLoadError, match="num_layers=1000000000, not a size"):
        locate_pretrained(str(huge))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text('["a list"]')
    with pytest.raises(ModelLoadError, match="unreadable"):
        locate_pretrained(str(garbage))


def test_sharded_weights_load_and_a_bare_folder_works(pipe: Path, tmp_path: Path) -> None:
    from sanakit.train.components import build_models, initial_weights

    bare = tmp_path / "bare"
    shutil.copytree(pipe / "transformer", bare)
    cfg = resolved(
        f"--model.pretrained={bare}",
        "--vae.type=dc-ae",
        f"--vae.name_or_path={pipe}",
        "--text_encoder.type=gemma-2",
        f"--text_encoder.name_or_path={pipe}",
        *QUICK,
    )
    models = build_models(cfg, torch.device("cpu"))
    assert initial_weights(cfg, models.transformer) is None  # logged, no EMA of its own
    want = SanaTransformer2DModel.from_pretrained(pipe / "transformer").state_dict()
    got = models.transformer.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the transformer must take the autoencoder's latents: pixel space has 3 channels, not 4
    with pytest.raises(ModelLoadError, match="in_channels=4 but the latent channels .* 3"):
        build_models(resolved(f"--model.pretrained={bare}", *QUICK), torch.device("cpu"))


# ---------------------------------------------------------------------------- NVlabs .pth


# NVlabs/Sana's names for a one-block model, as diffusers' conversion script reads them
SANA_TOP = {
    *(f"{m}.{p}" for m in ("x_embedder.proj", "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2",
                           "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1",
                           "final_layer.linear") for p in ("weight", "bias")),
    "attention_y_norm.weight", "final_layer.scale_shift_table",
}  # fmt: skip
SANA_BLOCK = {
    "scale_shift_table", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
    "cross_attn.q_linear.weight", "cross_attn.q_linear.bias", "cross_attn.kv_linear.weight",
    "cross_attn.kv_linear.bias", "cross_attn.proj.weight", "cross_attn.proj.bias",
    "mlp.inverted_conv.conv.weight", "mlp.inverted_conv.conv.bias", "mlp.depth_conv.conv.weight",
    "mlp.depth_conv.conv.bias", "mlp.point_conv.conv.weight",
}  # fmt: skip


def test_the_key_map_covers_diffusers_names_and_splits_fused_projections() -> None:
    one = to_nvlabs_names(tiny_sana_transformer(num_layers=1).state_dict())
    assert one.keys() == SANA_TOP | {f"blocks.0.{name}" for name in SANA_BLOCK}
    # Sana 1.5's q/k norms too: every diffusers tensor maps there and back, no other
    for model in (tiny_sana_transformer(num_layers=2), qk_norm_transformer()):
        state = model.state_dict()
        back, unknown = convert_state(to_nvlabs_names(state))
        assert unknown == [] and back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
    # the fused layouts as NVlabs/Sana writes them: q, k, v stacked on the output dim
    qkv = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(12, 2)
    kv = torch.arange(2 * 4, dtype=torch.float32).reshape(8)
    split, _ = convert_state(
        {"blocks.0.attn.qkv.weight": qkv, "blocks.0.cross_attn.kv_linear.bias": kv}
    )
    assert torch.equal(split["transformer_blocks.0.attn1.to_k.weight"], qkv[4:8])
    assert torch.equal(split["transformer_blocks.0.attn2.to_v.bias"], kv[4:])


def qk_norm_transformer() -> SanaTransformer2DModel:
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=8, sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads",
    )  # fmt: skip


def nvlabs_file(path: Path, model: torch.nn.Module, ema_offset: float = 0.5) -> Path:
    """A checkpoint laid out as NVlabs/Sana's trainer saves it (numpy RNG state included)."""
    state = to_nvlabs_names(model.state_dict())
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    torch.save(
        {
            "state_dict": {
                **state,
                "pos_embed": torch.zeros(1, 4, 8),
                "y_embedder.y_embedding": torch.zeros(3, 8),
            },
            "state_dict_ema": {k: v + ema_offset for k, v in state.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": {"last_epoch": 3},
            "epoch": 3,
            "rng_state": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        },
        path,
    )
    return path


def test_an_nvlabs_checkpoint_loads_model_and_ema(tmp_path: Path) -> None:
    original = tiny_sana_transformer(seed=1)
    path = nvlabs_file(tmp_path / "epoch_3_step_300.pth", original)
    fresh = tiny_sana_transformer(seed=2)
    loaded = load_weights(fresh, path)
    want = original.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], want[k]) for k in want)
    assert loaded.ema is not None and all(torch.equal(loaded.ema[k], want[k] + 0.5) for k in want)
    assert "not loaded: optimizer, scheduler, epoch, rng_state, pos_embed, y_embedder" in (
        loaded.description
    )
    # a released .pth (state_dict alone) and a DDP one ("module." prefixes) load as well
    released = tmp_path / "Sana_released.pth"
    nvlabs = to_nvlabs_names(want)
    torch.save({"state_dict": {f"module.{k}": v for k, v in nvlabs.items()}}, released)
    again = load_weights(tiny_sana_transformer(seed=3), released)
    assert again.ema is None and "(no EMA in it); not loaded: nothing" in again.description


def test_unknown_layouts_misfits_and_code_are_refused_in_one_line(tmp_path: Path) -> None:
    model = tiny_sana_transformer()
    odd = tmp_path / "odd.pth"
    torch.save({"model": {"w": torch.ones(1)}, "step": 7}, odd)
    with pytest.raises(
        CheckpointError, match=r"layout sanakit does not know.*model: dict, step: int"
    ):
        load_weights(model, odd)
    smaller = nvlabs_file(tmp_path / "one_layer.pth", tiny_sana_transformer(num_layers=1))
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        load_weights(model, smaller)
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": to_nvlabs_names(model.state_dict()), "x": RunsCode()}, evil)
    with pytest.raises(CheckpointError, match="without running code.*references .*system") as err:
        load_weights(model, evil)
    assert not marker.exists() and "\n" not in str(err.value)


# ---------------------------------------------------------------------------- runs


def train_quick(pipe: Path, work: Path, *extra: str):
    from sanakit.train.loop import train

    try:
        return train(resolved(f"--model.pretrained={pipe}", f"--work_dir={work}", *QUICK, *extra))
    finally:  # train() leaves its train.log handler on the logger (one run per process)
        logger = logging.getLogger("sanakit")
        for handler in [
            h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)
        ]:
            handler.close()
            logger.removeHandler(handler)


def test_runs_record_the_base_and_resume_rebuilds_the_same_model(
    pipe: Path, tmp_path: Path
) -> None:
    # NVlabs .pth on the pipeline's architecture: its EMA is the run's EMA (rate 1: kept as is)
    base = SanaTransformer2DModel.from_pretrained(pipe / "transformer")
    pth = nvlabs_file(tmp_path / "sana.pth", base, ema_offset=0.25)
    train_quick(
        pipe, tmp_path / "nv", f"--load_from={pth}", "--train.ema_rate=1.0", "--train.max_steps=1"
    )
    ema = load_file(tmp_path / "nv/checkpoints/step_00000001/ema.safetensors")
    assert all(torch.equal(ema[k], v + 0.25) for k, v in base.state_dict().items())

    a = tmp_path / "a"
    train_quick(pipe, a, "--train.max_steps=2", "--train.save_model_steps=1")
    trainer = json.loads((a / "checkpoints/step_00000002/trainer_state.json").read_text())
    recorded = BaseModelIdentity.from_dict(trainer["pretrained_model"])
    assert recorded == base_identity(str(pipe)) and recorded.path == str(pipe / "transformer")
    b = tmp_path / "b"
    train_quick(pipe, b, "--train.max_steps=2", f"--resume_from={a}/checkpoints/step_00000001")
    want = load_file(a / "checkpoints/step_00000002/model.safetensors")
    got = load_file(b / "checkpoints/step_00000002/model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)

    from sanakit.doctor.checkpoints import check_checkpoint_model
    from sanakit.doctor.pretrained import check_base_model
    from sanakit.doctor.probe import Probe
    from sanakit.models.transformer import build_transformer

    # resuming without model.pretrained, or building from a config not resolved against it
    plain = load_config(None, [f"--work_dir={a}", *QUICK])
    line = check_checkpoint_model(plain, Probe(plain, full=False)).line()
    assert (
        line.startswith("FAIL checkpoint_model:") and f"model.pretrained: checkpoint {pipe}" in line
    )
    with pytest.raises(
        ConfigError, match="model.patch_size=4 but model.pretrained=.* patch_size=2"
    ):
        build_transformer(load_config(None, [f"--model.pretrained={pipe}"]), 4, 64, 2)

    changed = tmp_path / "changed"
    shutil.copytree(pipe, changed)
    config = json.loads((changed / "transformer/config.json").read_text())
    (changed / "transformer/config.json").write_text(json.dumps({**config, "timestep_scale": 2.0}))
    cfg = resolved(f"--model.pretrained={changed}", f"--work_dir={a}", *QUICK)
    line = check_base_model(cfg, Probe(cfg, full=False)).line()
    assert line.startswith("FAIL base_model: the base model's config changed since step_00000002")


def test_doctor_says_what_is_loaded_from_where(pipe: Path, tmp_path: Path, capsys) -> None:
    from sanakit.doctor import run_doctor

    run_doctor(resolved(f"--model.pretrained={pipe}", f"--work_dir={tmp_path / 'w'}", *QUICK))
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith("PASS pretrained:"))
    fingerprint = base_identity(str(pipe)).fingerprint[:12]
    assert "(SanaPipeline folder)" in line and "in 6 safetensors shards" in line
    assert f"base fingerprint {fingerprint}" in line and f"text encoder gemma-2 from {pipe}" in line


def test_the_cli_refuses_a_disagreeing_key_in_one_line(pipe: Path, tmp_path: Path, capsys) -> None:
    from sanakit.cli import main

    work = tmp_path / "work"
    code = main(
        ["train", f"--model.pretrained={pipe}", "--model.num_layers=4", f"--work_dir={work}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model.num_layers=4 ")
    assert "num_layers=2" in err[0] and not work.exists()


def test_lora_on_a_released_sharded_pipeline_trains_and_samples(pipe: Path, tmp_path: Path) -> None:
    from sanakit.inference import load_for_inference
    from sanakit.models.base_identity import identify_base
    from sanakit.models.transformer import find_weight_files

    assert len(find_weight_files(pipe)[1]) > 1  # the released base is sharded
    work = tmp_path / "lora"
    train_quick(pipe, work, "--lora.rank=2", "--train.max_steps=2", "--train.save_model_steps=2")
    ckpt = work / "checkpoints/step_00000002"
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    base = identify_base(pipe / "transformer")
    assert trainer["base_model"] == base.to_dict() and base.path == str(pipe / "transformer")
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all("lora" in k for k in saved)  # the adapter only, never the base
    model = load_for_inference(ckpt).models.transformer  # base + adapter, by itself
    released = SanaTransformer2DModel.from_pretrained(pipe / "transformer").state_dict()
    mine = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert all(torch.equal(mine[k], v) for k, v in released.items())
