"""Text encoders: MiniLM (real packaged weights), tiny random Gemma-2 and T5 (built in code).

The Gemma encoder is checked bit for bit against diffusers' own ``SanaPipeline.encode_prompt``
running on the same tiny model and tokenizer, with and without the complex human instruction.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from sanakit.errors import ConfigError, ModelLoadError
from sanakit.models import fingerprint
from sanakit.models.text import (
    SANA_COMPLEX_HUMAN_INSTRUCTION,
    TextEncoder,
    build_text_encoder,
    instruction_hash,
)
from sanakit.models.text.gemma import GemmaEncoder
from sanakit.models.text.t5 import T5Encoder

TEXT_LOGGER = "sanakit.models.text.base"
SHORT_CHI = ["Describe the scene below in vivid detail:", "User Prompt: "]
# Different lengths, mixed case and surrounding blanks (the pipeline lower-cases and strips), the
# empty prompt, and one prompt long enough to be truncated at max_length=16.
GEMMA_PROMPTS = [
    "A cat",
    "  a Red car driving through a rainy city at night  ",
    "",
    "portrait of an old man with a hat, " * 4,
]


def _cfg(**kw: object) -> SimpleNamespace:
    base = {
        "type": "minilm",
        "name_or_path": "",
        "max_length": 32,
        "complex_human_instruction": None,
        "dtype": "auto",
    }
    base.update(kw)
    return SimpleNamespace(**base)


# ---------------------------------------------------------------------------------------------
# MiniLM (the real packaged model)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(_cfg(type="minilm", max_length=32))


def test_minilm_shapes_and_right_padding(minilm: TextEncoder) -> None:
    prompts = ["a cat", "a red car driving through a rainy city at night", "portrait"]
    embeds, mask = minilm.encode(prompts)
    assert embeds.shape == (3, 32, 384) and embeds.dtype == torch.float32
    assert mask.shape == (3, 32) and mask.dtype == torch.int64
    assert minilm.hidden_size == 384 and minilm.max_length == 32 and minilm.name == "minilm"
    assert embeds.device == minilm.device == torch.device("cpu")
    for i, p in enumerate(prompts):
        n = len(minilm.tokenizer(p)["input_ids"])  # includes [CLS] and [SEP]
        assert int(mask[i].sum()) == n
        assert mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()  # right padding
    assert not embeds.requires_grad


def test_minilm_deterministic_and_null(minilm: TextEncoder) -> None:
    prompts = ["a cat", "", "a dog on a skateboard"]
    e1, m1 = minilm.encode(prompts)
    e2, m2 = minilm.encode(prompts)
    assert torch.equal(e1, e2) and torch.equal(m1, m2)

    null, null_mask = minilm.null_embedding()
    assert null.shape == (1, 32, 384) and null_mask.shape == (1, 32)
    assert int(null_mask.sum()) == 2  # [CLS][SEP]
    ids = minilm.tokenizer("")["input_ids"]
    assert ids == [minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id]
    neg, neg_mask = minilm.encode_negative([""])
    assert torch.equal(null, neg) and torch.equal(null_mask, neg_mask)


def test_minilm_truncation_warns_once(
    minilm: TextEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    long = "a very long prompt " * 40
    with caplog.at_level(logging.WARNING, logger=TEXT_LOGGER):
        _, mask = minilm.encode([long, "short", long])
    records = [r for r in caplog.records if r.name == TEXT_LOGGER]
    assert len(records) == 1
    assert "2 of 3 prompts" in records[0].getMessage()
    assert mask[0].sum() == 32 and mask[1].sum() < 32

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=TEXT_LOGGER):
        minilm.encode(["short"])
    assert not [r for r in caplog.records if r.name == TEXT_LOGGER]


def test_minilm_provenance_is_json(minilm: TextEncoder) -> None:
    prov = minilm.provenance()
    assert json.loads(json.dumps(prov)) == prov
    assert prov["encoder"] == "minilm" and prov["max_length"] == 32
    assert prov["hidden_size"] == 384 and prov["dtype"] == "float32"
    assert prov["instruction_sha256"] is None and len(prov["fingerprint"]) == 64
    assert prov["fingerprint"] == minilm.fingerprint()  # stable


# ---------------------------------------------------------------------------------------------
# Tiny Gemma-2 vs. diffusers SanaPipeline.encode_prompt
# ---------------------------------------------------------------------------------------------


def _gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A sentencepiece-like BPE (spaces -> '▁', no pre-splitting) that prepends <bos> like Gemma."""
    corpus = [
        *SANA_COMPLEX_HUMAN_INSTRUCTION,
        "\n".join(SANA_COMPLEX_HUMAN_INSTRUCTION),
        "\n".join(SHORT_CHI),
        *[p.lower() for p in GEMMA_PROMPTS],
    ]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], show_progress=False
    )
    tk.train_from_iterator(corpus, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tk.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def _gemma_model(seed: int = 0) -> Gemma2Model:
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return Gemma2Model(config).eval()


@pytest.fixture(scope="module")
def gemma_parts() -> tuple[Gemma2Model, PreTrainedTokenizerFast]:
    return _gemma_model(), _gemma_tokenizer()


@pytest.fixture(scope="module")
def sana_pipe(gemma_parts: tuple[Gemma2Model, PreTrainedTokenizerFast]):
    """The real diffusers pipeline around the same tiny Gemma; no transformer/VAE needed."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    model, tok = gemma_parts
    return SanaPipeline(
        tokenizer=tok,
        text_encoder=model,
        vae=None,
        transformer=None,
        scheduler=DPMSolverMultistepScheduler(),
    )


def test_default_instruction_matches_diffusers() -> None:
    import inspect

    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"]
    assert SANA_COMPLEX_HUMAN_INSTRUCTION == default.default


@pytest.mark.parametrize(
    "chi",
    [None, SHORT_CHI, SANA_COMPLEX_HUMAN_INSTRUCTION],
    ids=["no-chi", "short-chi", "sana-chi"],
)
def test_gemma_matches_sana_pipeline(gemma_parts, sana_pipe, chi) -> None:
    model, tok = gemma_parts
    max_len = 16
    enc = GemmaEncoder(model=model, tokenizer=tok, max_length=max_len, instruction=chi)
    embeds, mask = enc.encode(GEMMA_PROMPTS)

    ref_e, ref_m, neg_e, neg_m = sana_pipe.encode_prompt(
        GEMMA_PROMPTS,
        do_classifier_free_guidance=True,
        negative_prompt="",
        device=torch.device("cpu"),
        max_sequence_length=max_len,
        complex_human_instruction=chi,
    )
    assert embeds.shape == (len(GEMMA_PROMPTS), max_len, 64) and mask.dtype == torch.int64
    assert torch.equal(embeds, ref_e)
    assert torch.equal(mask, ref_m)
    if chi:
        # the CHI path really differs from the plain one (context of the instruction is kept)
        plain, _ = GemmaEncoder(model=model, tokenizer=tok, max_length=max_len).encode(
            GEMMA_PROMPTS
        )
        assert not torch.equal(plain, embeds)

    null, null_mask = enc.null_embedding()
    assert null.shape == (1, max_len, 64) and null_mask.shape == (1, max_len)
    assert torch.equal(null, neg_e[:1]) and torch.equal(null_mask, neg_m[:1])
    assert int(null_mask.sum()) == 1  # "" -> <bos> only, no instruction
    neg, neg_mask = enc.encode_negative(["", ""])
    assert torch.equal(neg, neg_e[:2]) and torch.equal(neg_mask, neg_m[:2])


def test_gemma_causal_lm_and_empty_batch(gemma_parts) -> None:
    """A *ForCausalLM is unwrapped to its decoder (hidden states, not logits)."""
    model, tok = gemma_parts
    lm = Gemma2ForCausalLM(model.config)
    lm.model.load_state_dict(model.state_dict())
    enc = GemmaEncoder(model=lm, tokenizer=tok, max_length=16, instruction=SHORT_CHI)
    ref, _ = GemmaEncoder(model=model, tokenizer=tok, max_length=16, instruction=SHORT_CHI).encode(
        GEMMA_PROMPTS
    )
    assert torch.equal(enc.encode(GEMMA_PROMPTS)[0], ref)
    embeds, mask = enc.encode([])
    assert embeds.shape == (0, 16, 64) and mask.shape == (0, 16)
    with pytest.raises(TypeError):
        enc.encode("a cat")  # type: ignore[arg-type]


def test_gemma_truncation_warns_once(gemma_parts, caplog: pytest.LogCaptureFixture) -> None:
    model, tok = gemma_parts
    enc = GemmaEncoder(model=model, tokenizer=tok, max_length=16, instruction=SHORT_CHI)
    with caplog.at_level(logging.WARNING, logger=TEXT_LOGGER):
        enc.encode(GEMMA_PROMPTS)
    records = [r for r in caplog.records if r.name == TEXT_LOGGER]
    assert len(records) == 1 and "1 of 4 prompts" in records[0].getMessage()


def test_gemma_trimmed_runs_over_the_longest_prompt_unless_an_instruction_is_kept(
    gemma_parts, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, tok = gemma_parts
    plain = GemmaEncoder(model=model, tokenizer=tok, max_length=16)
    calls = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda ids, **kw: calls.append((ids.shape[1], kw)) or forward(ids, **kw)
    )
    prompts = ["A cat", "", "  a CAT  "]  # lower-cased and stripped as encode does
    full, full_mask = plain.encode(prompts)
    embeds, mask = plain.encode_trimmed(prompts)
    n = int(mask.sum(1).max())
    assert n < 16 and [c[0] for c in calls] == [16, n]  # the model saw n positions only
    assert calls[1][1]["use_cache"] is False  # Gemma's own forward
    assert torch.equal(mask, full_mask) and embeds.shape == full.shape
    assert (embeds[mask == 0] == 0).all() and (full[:, n:] != 0).any()
    assert (embeds - full)[mask == 1].abs().max() < 1e-5
    with caplog.at_level(logging.WARNING, logger=TEXT_LOGGER):
        plain.encode_trimmed(GEMMA_PROMPTS)
    (record,) = [r for r in caplog.records if r.name == TEXT_LOGGER]
    assert "1 of 4 prompts" in record.getMessage()

    # with an instruction, BOS + the last L-1 positions depend on the padding: full length
    chi = GemmaEncoder(model=model, tokenizer=tok, max_length=16, instruction=SHORT_CHI)
    for got, want in zip(chi.encode_trimmed(GEMMA_PROMPTS), chi.encode(GEMMA_PROMPTS), strict=True):
        assert torch.equal(got, want)


def test_gemma_fingerprint(gemma_parts) -> None:
    model, tok = _gemma_model(seed=1), gemma_parts[1]

    def fp(m: Gemma2Model = model, **kw: object) -> str:
        settings = {"max_length": 16, "instruction": SHORT_CHI, **kw}
        return GemmaEncoder(model=m, tokenizer=tok, **settings).fingerprint()

    base = fp()
    assert fp() == base  # stable across instances
    assert fp(max_length=17) != base
    assert fp(instruction=SANA_COMPLEX_HUMAN_INSTRUCTION) != base
    assert fp(instruction=None) != base
    assert fp(copy.deepcopy(model), dtype="bfloat16") != base  # the encoder casts its model
    assert fp() == base
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert fp() != base
    assert instruction_hash(None) is None and instruction_hash([]) is None
    assert instruction_hash(SHORT_CHI) != instruction_hash(["\n".join(SHORT_CHI)])


def test_gemma_from_disk(gemma_parts, tmp_path: Path) -> None:
    """Loading a saved folder (plain and diffusers pipeline layout) reproduces the objects."""
    model, tok = gemma_parts
    plain = tmp_path / "gemma-2-tiny"
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    pipe_root = tmp_path / "Sana_tiny_diffusers"
    model.save_pretrained(pipe_root / "text_encoder")
    tok.save_pretrained(pipe_root / "tokenizer")

    ref_e, ref_m = GemmaEncoder(model=model, tokenizer=tok, max_length=16).encode(GEMMA_PROMPTS)
    disk = GemmaEncoder(plain, max_length=16)
    assert disk.name == "gemma-2-tiny" and disk.dtype == torch.float32
    e, m = disk.encode(GEMMA_PROMPTS)
    assert torch.equal(e, ref_e) and torch.equal(m, ref_m)
    layout = GemmaEncoder(pipe_root, max_length=16)
    e2, _ = layout.encode(GEMMA_PROMPTS)
    assert torch.equal(e2, ref_e)

    # fingerprints from folders: stable, sensitive to settings and to the weight bytes
    fp = disk.fingerprint()
    assert GemmaEncoder(plain, max_length=16).fingerprint() == fp
    assert GemmaEncoder(plain, max_length=12).fingerprint() != fp
    assert GemmaEncoder(plain, max_length=16, instruction=SHORT_CHI).fingerprint() != fp
    weights = plain / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("up_proj.weight"))
    state[key][0, 0] += 1.0  # one value: small files are hashed in full
    save_file(state, weights, metadata={"format": "pt"})
    fp_edited = GemmaEncoder(plain, max_length=16).fingerprint()
    assert fp_edited != fp


def test_large_weight_files_are_sampled(
    gemma_parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the full-hash limit files are sampled: stable, and a fine-tune still changes it."""
    model, tok = gemma_parts
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT", 1024)  # sample everything above 1 KiB
    fp = GemmaEncoder(tmp_path, max_length=16).fingerprint()
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    save_file(state, weights, metadata={"format": "pt"})  # same bytes again
    assert GemmaEncoder(tmp_path, max_length=16).fingerprint() == fp
    save_file({k: v * 1.01 for k, v in state.items()}, weights, metadata={"format": "pt"})
    assert GemmaEncoder(tmp_path, max_length=16).fingerprint() != fp


def test_gemma_build_from_cfg(gemma_parts, tmp_path: Path) -> None:
    model, tok = gemma_parts
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    enc = build_text_encoder(
        _cfg(
            type="gemma-2",
            name_or_path=str(tmp_path / "g"),
            max_length=16,
            complex_human_instruction=SHORT_CHI,
            dtype="float32",
        )
    )
    assert isinstance(enc, GemmaEncoder) and enc.instruction == SHORT_CHI
    assert enc.provenance()["instruction_sha256"] == instruction_hash(SHORT_CHI)


# ---------------------------------------------------------------------------------------------
# Tiny T5
# ---------------------------------------------------------------------------------------------


def test_t5_shapes_mask_and_load(tmp_path: Path) -> None:
    words = "a cat sitting on the mat red car old man portrait city night".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0
    )
    enc = T5Encoder(model=T5EncoderModel(config), tokenizer=tok, max_length=12)
    prompts = ["a cat", "a red car in the city at night", ""]
    embeds, mask = enc.encode(prompts)
    assert embeds.shape == (3, 12, 32) and mask.shape == (3, 12) and mask.dtype == torch.int64
    assert mask.sum(1).tolist() == [3, 9, 1]  # words + </s>
    assert mask[0, :3].eq(1).all() and mask[0, 3:].eq(0).all()
    null, null_mask = enc.null_embedding()
    assert torch.equal(null, embeds[2:3]) and torch.equal(null_mask, mask[2:3])
    assert enc.instruction is None and enc.provenance()["hidden_size"] == 32

    enc.model.save_pretrained(tmp_path / "t5-tiny")
    tok.save_pretrained(tmp_path / "t5-tiny")
    disk = build_text_encoder(
        _cfg(type="t5", name_or_path=str(tmp_path / "t5-tiny"), max_length=12)
    )
    assert isinstance(disk, T5Encoder) and disk.name == "t5-tiny"
    e2, m2 = disk.encode(prompts)
    assert torch.equal(e2, embeds) and torch.equal(m2, mask)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_path_and_repo_raise_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        build_text_encoder(_cfg(type="gemma-2", name_or_path=str(missing), max_length=16))
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert "--text_encoder.name_or_path=PATH" in str(err.value)

    repo = "sanakit-tests/definitely-not-cached"
    with pytest.raises(ModelLoadError, match="not available offline") as err:
        build_text_encoder(_cfg(type="t5", name_or_path=repo, max_length=16))
    assert f"'{repo}'" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        build_text_encoder(_cfg(type="gemma-2", name_or_path=str(empty), max_length=16))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"type": "clip"}, "minilm, gemma-2, t5"),
        ({"type": "minilm", "complex_human_instruction": SHORT_CHI}, "only supported"),
        ({"type": "t5", "name_or_path": ""}, "name_or_path is required"),
        ({"type": "minilm", "dtype": "float16"}, "dtype"),
        ({"type": "minilm", "max_length": 0}, "max_length"),
        ({"type": "minilm", "max_length": 100_000}, "max_length"),
    ],
)
def test_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_text_encoder(_cfg(**kw))
