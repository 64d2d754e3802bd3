"""Content-keyed text-embedding and latent caches: exactness, reuse, staleness, damage, CLI."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST, losses, run_sanakit
from PIL import Image
from safetensors.torch import save_file

import sanakit.models.tiny as hm
from sanakit.cli import main as cli_main
from sanakit.config import load_config
from sanakit.data.images import load_image
from sanakit.data.shapes import render
from sanakit.embeddings.captions import CaptionEncoder
from sanakit.embeddings.commands import Section, format_verify
from sanakit.embeddings.latents import LatentCache
from sanakit.embeddings.store import EntryStatus
from sanakit.embeddings.text import TextEmbeddingCache
from sanakit.embeddings.writer import flush_writes
from sanakit.io import artifacts
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text.minilm import MiniLMEncoder

CAPTIONS = ["a red circle", "a blue square", "a red circle", "a green triangle far away"]


class Counting:
    """Wraps a real encoder/autoencoder and counts its encode calls (and rows encoded);
    ``trimmed`` counts those that went through a text encoder's ``encode_trimmed``."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.rows, self.trimmed = inner, 0, 0, 0

    def encode(self, x):
        self.calls += 1
        self.rows += len(x)
        return self.inner.encode(x)

    def encode_trimmed(self, x):
        self.calls += 1
        self.rows += len(x)
        self.trimmed += 1
        return self.inner.encode_trimmed(x)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder(max_length=8)


@pytest.fixture(scope="module")
def dcae_dir(tmp_path_factory) -> Path:
    return hm.make_tiny_autoencoder("dc-ae", tmp_path_factory.mktemp("vae") / "dcae")


@pytest.fixture(scope="module")
def ae(dcae_dir):
    return build_autoencoder(
        SimpleNamespace(type="dc-ae", name_or_path=str(dcae_dir)), "cpu", "float32"
    )


def entries(root: Path, sub: str) -> list[Path]:
    return sorted((root / sub).glob("*/*.safetensors"))


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "sanakit"
    ]


def some_pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=g) * 2 - 1


# ----------------------------------------------------------------------------- exactness, reuse


def test_text_cached_equals_fresh_and_a_second_pass_reads(tmp_path, minilm):
    counted = Counting(minilm)
    first = CaptionEncoder(counted, store=TextEmbeddingCache(tmp_path, counted))
    embeds, mask = first.encode(CAPTIONS)
    assert counted.calls == 3 and counted.rows == 3  # distinct captions, one per call
    for i, caption in enumerate(CAPTIONS):
        fresh_e, fresh_m = minilm.encode([caption])
        assert torch.equal(embeds[i], fresh_e[0]) and torch.equal(mask[i], fresh_m[0])
    flush_writes()
    assert len(entries(tmp_path, "text")) == 3

    # a new run (fresh memo) reads every caption from disk, whatever the batch order
    again = Counting(minilm)
    store = TextEmbeddingCache(tmp_path, again)
    embeds2, mask2 = CaptionEncoder(again, store=store).encode(CAPTIONS[::-1])
    assert again.calls == 0 and store.stats.read == 3 and store.stats.computed == 0
    assert torch.equal(embeds2, embeds.flip(0)) and torch.equal(mask2, mask.flip(0))
    assert embeds2.dtype == embeds.dtype and mask2.dtype == mask.dtype


def test_latents_cached_equal_fresh_whatever_the_batch(tmp_path, ae):
    pixels = some_pixels(5)
    counted = Counting(ae)
    z = LatentCache(tmp_path, counted, "readwrite").encode(pixels[[0, 1, 2]])
    assert counted.calls == 3 and counted.rows == 3  # one image per call
    fresh = [ae.encode(pixels[i : i + 1])[0] for i in range(5)]
    for row, i in enumerate([0, 1, 2]):
        assert torch.equal(z[row], fresh[i])
    # another batch composition gives the same bits for image 0, with the cache off too
    z_off = LatentCache(tmp_path / "unused", ae, "off").encode(pixels[[3, 0, 4]])
    assert torch.equal(z_off[1], z[0])
    assert not (tmp_path / "unused").exists()  # off never touches the disk

    flush_writes()
    assert len(entries(tmp_path, "latents")) == 3
    again = Counting(ae)
    cache = LatentCache(tmp_path, again, "readwrite")
    z2 = cache.encode(pixels[[2, 0, 1]])
    assert again.calls == 0 and cache.stats.read == 3
    assert torch.equal(z2, z[[2, 0, 1]])


def test_pixel_autoencoder_is_never_cached(tmp_path, caplog):
    pixel = build_autoencoder(SimpleNamespace(type="pixel"), "cpu", "float32")
    cfg = load_config(None, [f"--work_dir={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="sanakit"):
        cache = LatentCache.from_config(cfg, pixel)
    assert any("latent cache not used" in r.getMessage() for r in caplog.records)
    pixels = some_pixels(2, 8)
    assert torch.equal(cache.encode(pixels), pixels)
    assert not (tmp_path / "cache" / "latents").exists()


# ----------------------------------------------------------------------------- staleness


def test_text_entries_go_stale_with_max_length_or_fingerprint(tmp_path, minilm, caplog):
    # encoders load from folders, as in training (folder fingerprints hash files and settings)
    store = TextEmbeddingCache(tmp_path, minilm)
    CaptionEncoder(minilm, store=store).encode(["a red circle"])
    flush_writes()
    longer = MiniLMEncoder(max_length=12)
    finetuned = copy.deepcopy(minilm.model)
    with torch.no_grad():
        for p in finetuned.parameters():  # a fine-tune changes bytes throughout the file
            p.add_(1e-3)
    finetuned.save_pretrained(tmp_path / "finetuned")
    minilm.tokenizer.save_pretrained(tmp_path / "finetuned")
    tweaked = MiniLMEncoder(str(tmp_path / "finetuned"), max_length=8, name="minilm")
    assert tweaked.fingerprint() != minilm.fingerprint()

    for other, field in ((longer, "max_length"), (tweaked, "fingerprint")):
        counted = Counting(other)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sanakit"):
            got, _ = CaptionEncoder(counted, store=TextEmbeddingCache(tmp_path, counted)).encode(
                ["a red circle"]
            )
        assert counted.calls == 1  # the old entry was not used
        assert torch.equal(got[0], other.encode(["a red circle"])[0][0])
        (line,) = warnings_of(caplog)
        assert "built for a different" in line and field in line and "rewriting" in line
        flush_writes()
        # rewritten under the new key: the same settings now read it
        reread = Counting(other)
        CaptionEncoder(reread, store=TextEmbeddingCache(tmp_path, reread)).encode(["a red circle"])
        assert reread.calls == 0


def test_latent_entries_go_stale_with_autoencoder_and_differ_by_size_and_flip(tmp_path, ae, caplog):
    img = tmp_path / "img.png"
    Image.fromarray(render("red", "triangle", 64, np.random.default_rng(3))).save(img)
    small = load_image(img, 32, 32)
    flipped = load_image(img, 32, 32, flip=True)
    # what `cache build` relies on to precompute both flips from one decode
    assert torch.equal(flipped, torch.flip(small, dims=[-1]))
    root = tmp_path / "cache"
    LatentCache(root, ae, "readwrite").encode(small[None])
    flush_writes()

    for variant in (load_image(img, 64, 64), flipped):  # other resolution, other flip
        counted = Counting(ae)
        got = LatentCache(root, counted, "readwrite").encode(variant[None])
        assert counted.calls == 1 and torch.equal(got[0], ae.encode(variant[None])[0])

    torch.manual_seed(1)
    other_module = hm.tiny_dcae()
    with torch.no_grad():
        next(other_module.parameters()).mul_(1.5)
    other = build_autoencoder(
        SimpleNamespace(type="dc-ae", name_or_path=other_module), "cpu", "float32"
    )
    assert other.fingerprint() != ae.fingerprint()
    counted = Counting(other)
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        got = LatentCache(root, counted, "readwrite").encode(small[None])
    assert counted.calls == 1 and torch.equal(got[0], other.encode(small[None])[0])
    (line,) = warnings_of(caplog)
    assert "built for a different fingerprint" in line


# ----------------------------------------------------------------------------- damage, modes


def _nan_entry(path: Path) -> None:
    """Same key and shapes, NaN values: only the NaN check can catch it."""
    tensors, provenance = artifacts._read(path)
    poisoned = {
        k: (v.clone().fill_(float("nan")) if v.is_floating_point() else v)
        for k, v in tensors.items()
    }
    artifacts._write(path, poisoned, provenance)


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    "zero-byte": (lambda p: p.write_bytes(b""), "empty file"),
    "nan": (_nan_entry, "NaN"),
}


@pytest.mark.parametrize("kind", ["text", "latents"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entries_are_warned_and_rebuilt(tmp_path, minilm, ae, caplog, kind, damage):
    pixels = some_pixels(1)

    def run(counted):
        if kind == "text":
            store = TextEmbeddingCache(tmp_path, counted)
            return CaptionEncoder(counted, store=store).encode(["a red circle"])[0][0]
        return LatentCache(tmp_path, counted, "readwrite").encode(pixels)[0]

    inner = minilm if kind == "text" else ae
    expected = run(Counting(inner))
    flush_writes()
    (path,) = entries(tmp_path, kind)
    mutate, reason = DAMAGE[damage]
    mutate(path)
    counted = Counting(inner)
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        got = run(counted)
    assert counted.calls == 1 and torch.equal(got, expected)
    (line,) = warnings_of(caplog)
    assert str(path) in line and reason in line and "recomputing and rewriting" in line
    flush_writes()
    reread = Counting(inner)
    assert torch.equal(run(reread), expected) and reread.calls == 0


def test_read_mode_never_writes_and_off_mode_never_reads(tmp_path, minilm, caplog):
    cfg = load_config(None, [f"--work_dir={tmp_path}", "--train.cache_mode=read"])
    counted = Counting(minilm)
    CaptionEncoder(counted, store=TextEmbeddingCache.from_config(cfg, counted)).encode(CAPTIONS)
    flush_writes()
    assert counted.calls == 3 and not (tmp_path / "cache").exists()

    writer = TextEmbeddingCache(tmp_path / "cache", minilm)  # readwrite fills it
    CaptionEncoder(minilm, store=writer).encode(CAPTIONS)
    flush_writes()
    damaged = entries(tmp_path / "cache", "text")[0]
    damaged.write_bytes(b"")
    counted = Counting(minilm)
    with caplog.at_level(logging.WARNING, logger="sanakit"):
        CaptionEncoder(counted, store=TextEmbeddingCache.from_config(cfg, counted)).encode(CAPTIONS)
    flush_writes()
    assert counted.calls == 1  # only the damaged entry is recomputed...
    assert damaged.stat().st_size == 0  # ...and it is not rewritten in read mode
    assert "not rewritten" in warnings_of(caplog)[0]

    off = load_config(None, [f"--work_dir={tmp_path}", "--train.cache_mode=off"])
    assert off.train.cache_mode == "off" and TextEmbeddingCache.from_config(off, minilm) is None
    counted = Counting(minilm)
    CaptionEncoder(counted, store=None).encode(CAPTIONS)
    assert counted.calls == 3


def test_entry_status_is_a_type_from_the_store_kind_not_its_words(tmp_path, minilm):
    """missing / corrupt / stale come from ``Invalid.kind``; reports print the same words."""
    cache = TextEmbeddingCache(tmp_path, minilm, "read")
    caption = "a red circle"
    section = Section("text embeddings")
    found = cache.inspect_caption(caption)
    assert found.status is EntryStatus.MISSING
    section.record(found, "caption")
    CaptionEncoder(minilm, store=TextEmbeddingCache(tmp_path, minilm)).encode([caption])
    flush_writes()
    assert cache.inspect_caption(caption).status is EntryStatus.VALID
    path = cache.path_for(caption)
    tensors, _ = artifacts._read(path)
    save_file(tensors, str(path))  # the same tensors, written without a provenance key
    found = cache.inspect_caption(caption)
    assert found.status is EntryStatus.STALE and found.reason == "no provenance recorded"
    section.record(found, "caption")
    path.write_bytes(b"")
    found = cache.inspect_caption(caption)
    assert found.status is EntryStatus.CORRUPT
    section.record(found, "caption")
    assert section.counts == {s: 1 for s in (EntryStatus.MISSING, EntryStatus.STALE, found.status)}
    assert section.problems() == 3
    report = format_verify([section], 0, tmp_path)
    assert "3 needed, 0 valid, 1 missing, 1 corrupt, 1 stale" in report
    assert f"stale: {path} (caption): no provenance recorded" in report
    assert f"corrupt: {path} (caption): empty file" in report


# ----------------------------------------------------------------------------- CLI and training


def make_image_folder(root: Path, n: int, size: int = 32) -> Path:
    root.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow"]
    for i in range(n):
        rng = np.random.default_rng([5, i])
        shape = ["circle", "square", "triangle"][i % 3]
        colour = colours[i % 4]
        Image.fromarray(render(colour, shape, size, rng)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a {colour} {shape} number {i}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", 8)


def latent_args(work: Path, folder: Path, vae: Path) -> list[str]:
    return [
        f"--work_dir={work}",
        *FAST,
        "--data.type=image_folder",
        f"--data.data_dir=[{folder}]",
        "--vae.type=dc-ae",
        f"--vae.name_or_path={vae}",
        "--model.image_size=32",
    ]


@pytest.mark.slow
def test_cache_build_and_verify_exit_codes(tmp_path, folder, dcae_dir, capsys):
    args = latent_args(tmp_path, folder, dcae_dir) + ["--data.random_flip=true"]
    cache = tmp_path / "cache"

    def verify(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli_main(["cache", "verify", *args, *extra])
        return code, capsys.readouterr().out

    code, out = verify()
    assert code == 1 and "8 needed, 0 valid, 8 missing" in out and "16 needed" in out
    built = run_sanakit("cache", "build", *args)  # the real entry point, once
    assert built.returncode == 0, built.stderr[-2000:]
    assert "8 captions, 8 computed" in built.stdout
    assert "16 images (both flips), 16 computed" in built.stdout
    assert len(entries(cache, "text")) == 8 and len(entries(cache, "latents")) == 16

    code, out = verify()
    assert code == 0 and "cache complete and valid" in out, out
    entries(cache, "latents")[0].unlink()
    code, out = verify()
    assert code == 1 and "1 missing" in out and "missing: " in out
    text_entry = entries(cache, "text")[0]
    text_entry.write_bytes(text_entry.read_bytes()[:100])
    code, out = verify()
    assert code == 1 and "1 corrupt" in out and f"corrupt: {text_entry}" in out
    code, out = verify("--text_encoder.max_length=6")
    assert code == 1 and "1 corrupt, 7 stale" in out and "built for a different" in out

    # a second build repairs exactly what is broken
    capsys.readouterr()
    assert cli_main(["cache", "build", *args]) == 0
    out = capsys.readouterr().out
    assert "1 computed (1 replaced invalid entries), 7 already valid" in out
    assert "1 computed (0 replaced invalid entries), 15 already valid" in out
    assert verify()[0] == 0

    assert cli_main(["cache", "verify", str(tmp_path / "nope.yaml")]) == 2
    assert cli_main(["cache", "verify", *args, "--train.cache_mod=off"]) == 2
    assert cli_main(["cache", "prune"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err


@pytest.mark.slow
def test_resumed_run_with_readwrite_cache_equals_an_uninterrupted_one(tmp_path, folder, dcae_dir):
    """8 images, batch 4: epoch 2 (steps 3-4) reads every entry epoch 1 wrote."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    def train(work: Path, *extra: str) -> str:
        out = run_sanakit("train", *latent_args(work, folder, dcae_dir), *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stderr

    released = "caches cover the dataset: released the text encoder"
    assert released not in train(reference, "--train.max_steps=4", "--train.cache_mode=off")
    assert released not in train(resumed, "--train.max_steps=2")
    written = {p: p.stat().st_mtime_ns for p in entries(resumed / "cache", "latents")}
    assert len(written) == 8 and len(entries(resumed / "cache", "text")) >= 8
    # the second part runs on cached values alone (encoders freed) and still matches exactly
    assert released in train(resumed, "--train.max_steps=4")
    assert losses(resumed) == losses(reference) and len(losses(reference)) == 4
    # the second part read the entries; it did not rebuild them
    assert {p: p.stat().st_mtime_ns for p in entries(resumed / "cache", "latents")} == written
    assert not (reference / "cache").exists()
