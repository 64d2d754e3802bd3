"""Config tree: YAML + dotted overrides, errors naming the key, and the debug policy."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from sanakit.config import (
    CacheMode,
    Config,
    VaeType,
    from_yaml_text,
    load_config,
    packaged_config_path,
    parse_override,
    to_dict,
    to_yaml,
)
from sanakit.errors import ConfigError

REQUIRED = [
    "model.image_size", "data.type", "data.data_dir", "train.train_batch_size",
    "train.max_steps", "train.num_epochs", "train.lr", "train.warmup_steps",
    "train.gradient_clip", "train.gradient_accumulation_steps", "train.save_model_steps",
    "train.checkpoints_total_limit", "train.log_interval", "train.eval_sampling_steps",
    "train.visualize", "train.validation_prompts", "train.cfg_scale", "train.null_embed_root",
    "train.ema_rate", "train.mixed_precision", "model.class_dropout_prob",
    "scheduler.flow_shift", "scheduler.weighting_scheme",
]  # fmt: skip


def test_required_keys_exist_in_the_schema():
    flat = to_dict(Config())
    for key in REQUIRED:
        node = flat
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    for top in ("work_dir", "name", "seed", "debug", "resume_from", "load_from", "report_to"):
        assert top in flat
    assert flat["resume_from"] == "latest"


def test_packaged_default_loads_and_is_the_shapes_model():
    cfg = load_config()
    assert cfg.data.type == "shapes" and cfg.vae.type == "pixel"
    assert cfg.text_encoder.type == "minilm"
    assert packaged_config_path().is_file()


def test_overrides_in_sana_form_including_lists(tmp_path):
    cfg = load_config(
        None,
        [
            "--train.train_batch_size=8",
            '--data.data_dir="[a,b]"',
            "--train.validation_prompts=[x y, z]",
            "--work_dir=" + str(tmp_path),
        ],
    )
    assert cfg.train.train_batch_size == 8
    assert cfg.data.data_dir == ["a", "b"]
    assert cfg.train.validation_prompts == ["x y", "z"]
    assert parse_override("--debug") == ("debug", True)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  max_steps: 7\nmodel:\n  num_layers: 2\n")
    cfg = load_config(path, ["--train.max_steps=9"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.model.num_layers) == (0.5, 9, 2)


@pytest.mark.parametrize(
    "override, words",
    [
        ("--train.lrr=1", ["train.lrr", "train.lr"]),
        ("--modell.image_size=3", ["modell.image_size"]),
        ("--train.lr=abc", ["train.lr", "float"]),
        ("--train.visualize=maybe", ["train.visualize", "bool"]),
        ("--model.image_size=1.5", ["model.image_size", "int"]),
        ("--train.train_batch_size=0", ["train.train_batch_size", "> 0"]),
        ("--train.cfg_scale=-1", ["train.cfg_scale", ">= 0"]),
        ("--train.sampler=ddim", ["train.sampler", "flow_euler"]),
        ("--model.image_size=33", ["model.image_size", "patch_size"]),
        ("--text_encoder.max_length=1", ["text_encoder.max_length", ">= 2"]),
        ("--vae.type=vqgan", ["vae.type", "pixel, dc-ae, sd-vae"]),
        ("--train.lr=nan", ["train.lr", "finite"]),
        ("--train.lr=.inf", ["train.lr", "finite"]),
        ("--vae.scaling_factor=-.inf", ["vae.scaling_factor", "finite"]),
        ("--model.mlp_ratio=0", ["model.mlp_ratio", "> 0"]),
        ("--model.num_cross_attention_heads=0", ["model.num_cross_attention_heads", "> 0"]),
        ("--model.cross_attention_head_dim=-2", ["model.cross_attention_head_dim", "> 0"]),
        ("--data.num_workers=-1", ["data.num_workers", ">= 0"]),
        ("--data.max_samples=-5", ["data.max_samples", ">= 0"]),
        ("--seed=18446744073709551616", ["seed", "4294967295"]),
        ("--seed=-1", ["seed", "range"]),
        ("--work_dir", ["--work_dir", "no value"]),
        ("--train.validation_prompts=[&a x, *a]", ["anchor or alias"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert err.value.exit_code == 2


def test_choices_are_enums_that_compare_as_text(tmp_path):
    cfg = load_config(None, ["--vae.type=dc-ae", "--vae.name_or_path=x", "--model.image_size=64"])
    assert cfg.vae.type is VaeType.DC_AE and cfg.vae.type == "dc-ae"
    assert f"{cfg.vae.type}" == "dc-ae" and "vae.type=dc-ae" in f"vae.type={cfg.vae.type}"
    assert "type: dc-ae" in to_yaml(cfg) and to_dict(cfg)["vae"]["type"] == "dc-ae"
    assert type(to_dict(cfg)["vae"]["type"]) is str  # plain text in YAML and JSON
    # YAML 1.1 reads a bare `off` / `no` as false: they still mean the choice spelled so
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  cache_mode: off\n  mixed_precision: no\n")
    cfg = load_config(path)
    assert cfg.train.cache_mode is CacheMode.OFF and cfg.train.mixed_precision == "no"
    assert load_config(None, ["--name=1e-4"]).name == "1e-4"  # text stays text


def test_dry_run_is_not_part_of_the_config_but_old_saved_configs_still_load():
    assert "dry_run" not in to_dict(Config())["train"]
    with pytest.raises(ConfigError, match="train.dry_run"):
        load_config(None, ["--train.dry_run=true"])
    saved = to_yaml(Config()).replace("train:\n", "train:\n  dry_run: false\n")
    assert "dry_run" in saved and from_yaml_text(saved) == Config()


def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path):
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "train:\n  validation_prompts: [" + ", ".join(levels) + "]\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="anchor or alias") as err:
        load_config(path)
    assert str(path) in str(err.value) and time.monotonic() - started < 1.0
    with pytest.raises(ConfigError, match="anchor or alias"):
        from_yaml_text("work_dir: &w x\nname: *w\n")


def test_unknown_key_in_yaml_names_the_full_dotted_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_step.*train\.max_steps"):
        load_config(path)


def test_corrupt_or_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_debug_changes_exactly_log_interval_batch_and_report_to():
    base = to_dict(load_config(None, ["--train.train_batch_size=100", "--report_to=none"]))
    debug = to_dict(
        load_config(None, ["--train.train_batch_size=100", "--report_to=none", "--debug"])
    )
    changed = {
        f"{group}.{key}" if isinstance(base[group], dict) else group
        for group in base
        for key in (base[group] if isinstance(base[group], dict) else [None])
        if (base[group][key] if key else base[group])
        != (debug[group][key] if key else debug[group])
    }
    assert changed == {"debug", "train.log_interval", "train.train_batch_size", "report_to"}
    assert debug["train"]["log_interval"] == 1
    assert debug["train"]["train_batch_size"] == 64
    assert debug["report_to"] == "tensorboard"
    assert debug["train"]["visualize"] == base["train"]["visualize"]
    small = load_config(None, ["--train.train_batch_size=8", "--debug"])
    assert small.train.train_batch_size == 8


def test_resolved_yaml_round_trips():
    cfg = load_config(None, ["--train.lr=0.25", "--data.data_dir=[x]"])
    again = from_yaml_text(to_yaml(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("name", ["sana_600m_512", "sana_1600m_1024"])
def test_sana_configs_build_on_the_meta_device(name):
    from sanakit.models.transformer import build_transformer, count_parameters

    cfg = load_config(packaged_config_path(name))
    with torch.device("meta"):
        model = build_transformer(cfg, in_channels=32, caption_channels=2304, factor=32)
    params = count_parameters(model)
    hidden = cfg.model.num_attention_heads * cfg.model.attention_head_dim
    if name == "sana_600m_512":
        assert (cfg.model.num_layers, hidden) == (28, 1152)
        assert 0.55e9 < params < 0.65e9, params
    else:
        assert (cfg.model.num_layers, hidden) == (20, 2240)
        assert 1.5e9 < params < 1.7e9, params
    assert model.config.sample_size == cfg.model.image_size // 32


REPO = Path(__file__).resolve().parent.parent


def test_configs_dir_is_the_packaged_one():
    assert (REPO / "configs").resolve() == packaged_config_path().parent.resolve()


def test_max_length_floor_is_the_encoders_floor():
    from sanakit.models.text.base import MIN_MAX_LENGTH

    load_config(None, [f"--text_encoder.max_length={MIN_MAX_LENGTH}"])
    with pytest.raises(ConfigError, match="text_encoder.max_length"):
        load_config(None, [f"--text_encoder.max_length={MIN_MAX_LENGTH - 1}"])
