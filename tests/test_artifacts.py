"""The content-keyed artifact store and the null embedding built on it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from sanakit.errors import ArtifactError, CheckpointError
from sanakit.io.artifacts import Artifact, get_or_build
from sanakit.models.text.null_embedding import (
    EMBEDS,
    MASK,
    NullEmbedding,
    check_matches_checkpoint,
    obtain_null_embedding,
    sana_filename,
)


def counting_builder(value: float):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.full((2, 3), value)}

    return build, calls


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_built_once_then_loaded(tmp_path, suffix):
    build, calls = counting_builder(1.5)
    art = Artifact(tmp_path / f"a{suffix}", {"k": 1}, build)
    first = get_or_build(art)
    second = get_or_build(art)
    assert (first.status, second.status) == ("built", "loaded")
    assert len(calls) == 1
    assert torch.equal(second.tensors["x"], torch.full((2, 3), 1.5))
    assert second.provenance["key"] == {"k": 1}
    # written atomically: no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        f"a{suffix}"
    ]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "unreadable"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"not a torch file at all"), "unreadable"),
    ],
)
def test_damaged_files_are_rebuilt_with_one_warning(tmp_path, caplog, damage, reason):
    build, calls = counting_builder(2.0)
    art = Artifact(tmp_path / "a.pth", {"k": 1}, build, what="thing")
    get_or_build(art)
    damage(art.path)
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        got = get_or_build(art)
    assert got.status == "rebuilt" and len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.match(rf"thing at .*a\.pth is invalid: {reason}.*; rebuilding", warnings[0])


def test_stale_key_nan_and_validator_trigger_rebuild(tmp_path):
    build, calls = counting_builder(3.0)
    path = tmp_path / "a.pth"
    get_or_build(Artifact(path, {"k": 1}, build))
    assert get_or_build(Artifact(path, {"k": 2}, build)).status == "rebuilt"
    torch.save({"x": torch.tensor([float("nan")]), "sanakit_provenance": {}}, path)
    assert get_or_build(Artifact(path, {"k": 2}, build)).status == "rebuilt"

    def never_valid(tensors):
        return "x has the wrong shape"

    art = Artifact(path, {"k": 2}, build, validate=lambda t: None)
    assert get_or_build(art).status == "loaded"
    with pytest.raises(ArtifactError, match="wrong shape"):
        get_or_build(Artifact(tmp_path / "b.pth", {"k": 2}, build, validate=never_valid))
    assert len(calls) == 4


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    build, calls = counting_builder(1.0)
    with pytest.raises(ArtifactError, match="afile"):
        get_or_build(Artifact(blocker / "sub" / "a.pth", {"k": 1}, build))
    assert calls == []


@pytest.fixture(scope="module")
def minilm():
    from sanakit.config import TextEncoderConfig
    from sanakit.models.text import build_text_encoder

    return build_text_encoder(TextEncoderConfig(max_length=8))


def test_null_embedding_is_the_negative_prompt_path_in_sana_format(tmp_path, minilm):
    null = obtain_null_embedding(minilm, tmp_path)
    path = tmp_path / sana_filename(minilm)
    assert path.name == "null_embed_diffusers_minilm_8token_384.pth"
    data = torch.load(path, weights_only=True)
    assert data[EMBEDS].shape == (1, 8, 384) and data[MASK].shape == (1, 8)
    ref_e, ref_m = minilm.encode_negative([""])
    assert torch.equal(null.embeds, ref_e) and torch.equal(null.mask, ref_m)
    assert int(null.mask.sum()) == 2  # [CLS][SEP]
    assert null.provenance["encoder"] == "minilm"
    assert null.provenance["max_length"] == 8


def test_a_file_written_by_sana_is_accepted_with_a_warning(tmp_path, minilm, caplog):
    e, m = minilm.encode_negative([""])
    torch.save({EMBEDS: e, MASK: m}, tmp_path / sana_filename(minilm))  # no provenance
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        null = obtain_null_embedding(minilm, tmp_path)
    assert torch.equal(null.embeds, e)
    assert any("no provenance" in r.getMessage() for r in caplog.records)


def test_wrong_shape_from_another_max_length_is_rebuilt(tmp_path, minilm, caplog):
    torch.save(
        {EMBEDS: torch.zeros(1, 16, 384), MASK: torch.ones(1, 16)}, tmp_path / sana_filename(minilm)
    )
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        null = obtain_null_embedding(minilm, tmp_path)
    assert null.embeds.shape == (1, 8, 384)
    assert any("invalid: embeds shape" in r.getMessage() for r in caplog.records)


def test_checkpoint_provenance_mismatch_stops_unless_allowed(minilm):
    current = NullEmbedding(torch.zeros(1, 8, 384), torch.ones(1, 8), minilm.provenance(), "x")
    saved = dict(minilm.provenance(), max_length=16)
    with pytest.raises(CheckpointError) as err:
        check_matches_checkpoint(current, saved, allow_change=False)
    assert "max_length=16" in str(err.value) and "max_length=8" in str(err.value)
    assert "allow_encoder_change" in str(err.value)
    check_matches_checkpoint(current, saved, allow_change=True)
    check_matches_checkpoint(current, minilm.provenance(), allow_change=False)


def test_there_is_one_way_to_get_a_null_embedding():
    """Only models/text/null_embedding.py builds it; everything else calls obtain_null_embedding or
    reads a checkpoint's own copy (Sana #216: the file was only written inside `visualize`)."""
    src = Path(__file__).parent.parent / "src" / "sanakit"
    builders, obtainers = [], []
    for path in src.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(src).as_posix()
        if re.search(r"\.null_embedding\(\)", text):
            builders.append(rel)
        if "obtain_null_embedding(" in text and rel != "models/text/null_embedding.py":
            obtainers.append(rel)
    assert builders == ["models/text/null_embedding.py"]
    # train/nodes.py: built once per group of nodes sharing the root, loaded by the rest
    assert obtainers == ["train/nodes.py"]
    nodes = (src / "train" / "nodes.py").read_text()
    method = nodes[nodes.index("    def null_embedding(") :]
    method = method[: method.index("\n    def ", 10)] if "\n    def " in method[10:] else method
    assert "visualize" not in method and "debug" not in method
    loop = (src / "train" / "loop.py").read_text()
    call = loop.index("launch.null_embedding(")
    # obtained unconditionally, before the loop, never inside a visualize/debug branch
    before = loop[:call].split("\n")[-1]
    assert before.startswith("        null = ")
    # the only block around it is the work-dir ownership that wraps the whole run
    body = loop[loop.index("def train(") : call].split("\n")
    blocks = [ln.strip() for ln in body if ln.startswith("    ") and ln.rstrip().endswith(":")]
    assert [b for b in blocks if not b.startswith('"""')] == [
        'with own(Path(cfg.work_dir), "sanakit train", hint=BUSY_HINT) as owner:',
        "if owner is not None and is_fresh_start(cfg.resume_from):",
    ]
