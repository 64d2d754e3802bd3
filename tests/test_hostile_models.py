"""Hostile model folders (issue 16, item 9): pickles and broken configs are one `error:` line.

A folder whose weights exist only as a pickle is refused before anything unpickles it (a pickle
can run code, and ``weights_only`` unpickling failed with a traceback); a ``config.json`` that is
not a JSON object is named, not crashed on. Each case runs the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, run_sanakit, the_error_line
from transformers import AutoTokenizer, BertConfig, BertModel

from sanakit.errors import ModelLoadError
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text.minilm import MiniLMEncoder, packaged_minilm_path
from sanakit.models.tiny import tiny_dcae

BERT = BertConfig(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
)


class Planted:
    """Unpickling this opens (creates) a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT text encoder saved with safetensors, MiniLM's tokenizer beside it."""
    root = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    BertModel(BERT).save_pretrained(root)
    AutoTokenizer.from_pretrained(packaged_minilm_path()).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def dcae_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dcae") / "dcae"
    tiny_dcae().save_pretrained(root)
    return root


def as_pickle_only(src: Path, dst: Path, weights: str, payload: object) -> Path:
    """Copy ``src`` to ``dst`` with its safetensors replaced by the pickle ``weights``."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        path.unlink()
    torch.save(payload, dst / weights)
    return dst


def train_text(work: Path, encoder: Path):
    return run_sanakit(
        "train",
        f"--work_dir={work}",
        "--train.max_steps=1",
        *FAST,
        f"--text_encoder.name_or_path={encoder}",
    )


def train_vae(work: Path, vae: Path):
    return run_sanakit(
        "train",
        f"--work_dir={work}",
        "--train.max_steps=1",
        *FAST,
        "--model.image_size=32",
        "--vae.type=dc-ae",
        f"--vae.name_or_path={vae}",
    )


def test_text_encoder_folder_with_only_a_pickle_is_refused(tmp_path, bert_dir):
    state = BertModel.from_pretrained(bert_dir).state_dict()
    folder = as_pickle_only(bert_dir, tmp_path / "bert-bin", "pytorch_model.bin", state)
    line = the_error_line(train_text(tmp_path / "w", folder))
    assert str(folder) in line and "pytorch_model.bin" in line and "safetensors" in line
    assert "--text_encoder.name_or_path" in line


def test_a_planted_pickle_never_runs(tmp_path, bert_dir):
    marker = tmp_path / "PLANTED_CODE_RAN"
    payload = {"embeddings.word_embeddings.weight": Planted(marker)}
    folder = as_pickle_only(bert_dir, tmp_path / "bert-evil", "pytorch_model.bin", payload)
    line = the_error_line(train_text(tmp_path / "w", folder))
    assert str(folder) in line and not marker.exists()


def test_autoencoder_folder_with_only_a_pickle_is_refused(tmp_path, dcae_dir):
    state = tiny_dcae().state_dict()
    folder = as_pickle_only(dcae_dir, tmp_path / "ae-bin", "diffusion_pytorch_model.bin", state)
    line = the_error_line(train_vae(tmp_path / "w", folder))
    assert str(folder) in line and "diffusion_pytorch_model.bin" in line
    assert "safetensors" in line and "--vae.name_or_path" in line


@pytest.mark.parametrize(
    ("content", "says"),
    [("[1, 2]", "JSON list"), ("{{{ not json", "config.json")],
    ids=["list", "garbage"],
)
@pytest.mark.parametrize("role", ["text_encoder", "vae"])
def test_config_json_that_is_not_an_object_is_one_line(
    tmp_path, bert_dir, dcae_dir, role, content, says
):
    src = bert_dir if role == "text_encoder" else dcae_dir
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    (folder / "config.json").write_text(content)
    run = train_text if role == "text_encoder" else train_vae
    line = the_error_line(run(tmp_path / "w", folder))
    assert str(folder / "config.json") in line or str(folder) in line
    assert says in line and f"--{role}.name_or_path" in line


@pytest.mark.parametrize(
    "config",
    ['"bert"', '{"model_type": "bert", "hidden_size": "big"}', '{"model_type": 5}', "{}"],
    ids=["string", "wrong-type", "unknown-model-type", "empty"],
)
def test_text_encoder_config_values_are_one_line(tmp_path, bert_dir, config):
    folder = tmp_path / "model"
    shutil.copytree(bert_dir, folder)
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelLoadError) as err:
        MiniLMEncoder(str(folder), max_length=8)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_the_safetensors_folders_load(bert_dir, dcae_dir):
    """The folders the hostile cases start from are fine as they are (so the refusals above
    are about the pickle or the config, not about the tiny models)."""
    assert MiniLMEncoder(str(bert_dir), max_length=8).hidden_size == 32
    vae = SimpleNamespace(type="dc-ae", name_or_path=str(dcae_dir))
    assert build_autoencoder(vae, "cpu", torch.float32).latent_channels == 4
    json.loads((dcae_dir / "config.json").read_text())  # a real config to corrupt
