"""The real-data path: latents keyed by file bytes (a warm epoch decodes nothing), captions
encoded in fixed chunks (exact whatever the resume point), encoders released."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel
from PIL import Image
from test_caches import Counting, make_image_folder

import sanakit.embeddings.loader as loader_mod
import sanakit.models.tiny as hm
from sanakit.data.dataset import index_dataset
from sanakit.data.images import load_image
from sanakit.data.shapes import render
from sanakit.embeddings.captions import BATCHING, CaptionChunks, CaptionEncoder
from sanakit.embeddings.latents import LatentCache
from sanakit.embeddings.loader import CachedSamples, collate_cached, covered
from sanakit.embeddings.sources import SourceIndex
from sanakit.embeddings.store import EntryStatus
from sanakit.embeddings.text import TextEmbeddingCache
from sanakit.embeddings.writer import flush_writes
from sanakit.models.autoencoder import build_autoencoder
from sanakit.models.text.minilm import MiniLMEncoder


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    folder = hm.make_tiny_autoencoder("dc-ae", tmp_path_factory.mktemp("vae") / "dcae")
    return build_autoencoder(
        SimpleNamespace(type="dc-ae", name_or_path=str(folder)), "cpu", "float32"
    )


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder(max_length=8)


def one_epoch(dataset, cache: LatentCache, sources: SourceIndex) -> torch.Tensor:
    """Every sample through the worker-side lookup (in-process) and the main-process encode."""
    samples = CachedSamples(dataset, cache, sources)
    batch = collate_cached([samples[i] for i in range(len(samples))])
    return cache.encode(batch["pixels"])


def test_warm_epoch_decodes_nothing_and_changed_bytes_are_encoded_again(tmp_path, ae, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", 6, size=40)  # 40 px: resized + cropped
    dataset = index_dataset(SimpleNamespace(type="image_folder", data_dir=[str(folder)]), 32, 0)
    decodes, opens = [], []
    monkeypatch.setattr(
        loader_mod, "load_image", lambda *a, **k: decodes.append(1) or load_image(*a, **k)
    )
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(1) or real_open(*a, **k))
    root = tmp_path / "cache"
    counted = Counting(ae)
    cold = one_epoch(
        dataset, LatentCache(root, counted, "readwrite"), SourceIndex(root, "readwrite")
    )
    flush_writes()
    assert len(decodes) == 6 and counted.calls == 6
    # the values are the autoencoder's, image by image, on the decoded and cropped pixels
    for i, rec in enumerate(dataset.records):
        assert torch.equal(cold[i], ae.encode(load_image(rec.path, 32, 32)[None])[0])
    assert covered(dataset, LatentCache(root, ae, "read"), SourceIndex(root, "read"))

    decodes.clear()
    opens.clear()
    counted = Counting(ae)
    warm = one_epoch(
        dataset, LatentCache(root, counted, "readwrite"), SourceIndex(root, "readwrite")
    )
    assert decodes == [] and opens == [] and counted.calls == 0  # not even a header is read
    assert torch.equal(warm, cold)

    # touched (same bytes): hashed again, not decoded, not encoded
    first = Path(dataset.records[0].path)
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    warm = one_epoch(
        dataset, LatentCache(root, counted, "readwrite"), SourceIndex(root, "readwrite")
    )
    assert decodes == [] and counted.calls == 0 and torch.equal(warm, cold)
    # new bytes under the same name and size class: decoded and encoded again, only that one
    Image.fromarray(render("blue", "circle", 40, np.random.default_rng(99))).save(first)
    again = one_epoch(
        dataset, LatentCache(root, counted, "readwrite"), SourceIndex(root, "readwrite")
    )
    assert len(decodes) == 1 and counted.calls == 1
    assert torch.equal(again[0], ae.encode(load_image(first, 32, 32)[None])[0])
    assert not torch.equal(again[0], cold[0]) and torch.equal(again[1:], cold[1:])


def test_random_flip_entries_and_coverage(tmp_path, ae):
    folder = make_image_folder(tmp_path / "imgs", 4)
    cfg = SimpleNamespace(type="image_folder", data_dir=[str(folder)], random_flip=True)
    dataset = index_dataset(cfg, 32, 0)
    root = tmp_path / "cache"
    cache, sources = LatentCache(root, ae, "readwrite"), SourceIndex(root, "readwrite")
    flips = [dataset.flip_for(i) for i in range(4)]
    z = one_epoch(dataset, cache, sources)
    flush_writes()
    for i, rec in enumerate(dataset.records):
        assert torch.equal(z[i], ae.encode(load_image(rec.path, 32, 32, flip=flips[i])[None])[0])
    assert not covered(dataset, cache, sources)  # the other side of each image is not built
    for epoch in range(1, 12):  # enough epochs to draw both sides of every image
        dataset.set_epoch(epoch)
        one_epoch(dataset, cache, sources)
    flush_writes()
    assert covered(dataset, cache, sources)


CAPTIONS = [f"a red circle number {i}" for i in range(20)] + [
    f"caption {i} with some longer words in it" for i in range(28)
]


def test_chunked_captions_are_exact_whatever_was_cached_before(tmp_path, minilm):
    chunks = CaptionChunks(CAPTIONS, size=16)
    assert len(chunks) == 3
    # an uninterrupted run: one cold pass over every chunk
    root_a = tmp_path / "a"
    full = CaptionEncoder(minilm, store=TextEmbeddingCache(root_a, minilm), chunks=chunks)
    full.prefill()
    flush_writes()
    reference = {c: TextEmbeddingCache(root_a, minilm).find(c) for c in CAPTIONS}

    # a run killed after some entries were written (scattered over chunks), then resumed
    root_b = tmp_path / "b"
    partial = TextEmbeddingCache(root_b, minilm)
    for caption in CAPTIONS[::3]:
        partial.put(caption, *reference[caption])
    flush_writes()
    counted = Counting(minilm)
    resumed = CaptionEncoder(counted, store=TextEmbeddingCache(root_b, counted), chunks=chunks)
    resumed.prefill()
    flush_writes()
    assert counted.calls == 3 and counted.rows == 48  # whole chunks, one call each
    assert counted.trimmed == 3  # chunks go through encode_trimmed
    for c in CAPTIONS:
        got = TextEmbeddingCache(root_b, minilm).find(c)
        assert torch.equal(got[0], reference[c][0]) and torch.equal(got[1], reference[c][1])

    # no disk at all (cache_mode=off): prefilled rows and a lazy miss give the same bits
    memory = CaptionEncoder(minilm, chunks=chunks)
    memory.prefill()
    lazy = CaptionEncoder(minilm, chunks=chunks)
    e_mem, _ = memory.encode(CAPTIONS[:5])
    e_lazy, _ = lazy.encode(CAPTIONS[:5])
    assert torch.equal(e_mem, e_lazy)
    assert torch.equal(e_mem, torch.stack([reference[c][0] for c in CAPTIONS[:5]]))

    # against encoding one caption at a time: real tokens equal up to float rounding
    single = torch.stack([minilm.encode([c])[0][0] for c in CAPTIONS])
    batched = torch.stack([reference[c][0] for c in CAPTIONS])
    masks = torch.stack([reference[c][1] for c in CAPTIONS])
    assert torch.equal(masks, minilm.encode(CAPTIONS)[1])
    diff = (single - batched)[masks == 1].abs().max().item()
    print(f"max |batched - single| = {diff:.3g}")
    assert diff < 1e-4


@pytest.fixture(scope="module")
def minilm16() -> MiniLMEncoder:
    return MiniLMEncoder(max_length=16)  # every test caption fits: trimming has room to act


def trimmed_and_full(encoder: MiniLMEncoder, chunks: CaptionChunks) -> list[tuple]:
    """Per chunk: its captions, the rows the cold pass made, the full-length batched encode."""
    counted = Counting(encoder)
    cold = CaptionEncoder(counted, chunks=chunks)
    cold.prefill()
    assert counted.trimmed == len(chunks) == counted.calls
    out = []
    for k in range(len(chunks)):
        chunk = chunks.chunk(k)
        rows = [cold.pinned[c] for c in chunk]
        trimmed = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        out.append((chunk, trimmed, encoder.encode(chunk)))
    return out


def test_trimmed_chunks_are_zero_past_the_longest_caption_and_match_full_length(minilm16):
    longest = []
    for chunk, (embeds, mask), (full, full_mask) in trimmed_and_full(
        minilm16, CaptionChunks(CAPTIONS, size=16)
    ):
        assert embeds.shape == full.shape and embeds.dtype == full.dtype
        assert torch.equal(mask, full_mask) and mask.dtype == torch.int64
        n = int(mask.sum(1).max())
        longest.append(n)
        assert (embeds[:, n:] == 0).all() and (embeds[mask == 0] == 0).all()
        assert (full[:, n:] != 0).any()  # what the full-length pass leaves there is not zero
        diff = (embeds - full)[mask == 1].abs().max().item()
        print(f"chunk {chunk[0]!r}..: n={n}, max |trimmed - full| on real tokens = {diff:.3g}")
        assert diff < 1e-5
    assert longest == [7, 11, 11] and max(longest) < minilm16.max_length


def tiny_transformer(caption_channels: int) -> SanaTransformer2DModel:
    torch.manual_seed(0)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=caption_channels, sample_size=8, patch_size=1,
    ).eval()  # fmt: skip


@torch.no_grad()
def test_padded_rows_never_reach_the_transformer_output(minilm16):
    """Zeros or the full-length pass's padded rows at masked positions: the same output bits."""
    (chunk, (embeds, mask), (full, _)), *_ = trimmed_and_full(
        minilm16, CaptionChunks(CAPTIONS[15:25], size=10)
    )
    assert len(set(mask.sum(1).tolist())) == 2  # short and long captions share the chunk
    padded = torch.where(mask[..., None] == 1, embeds, full)
    assert not torch.equal(padded, embeds)
    model = tiny_transformer(minilm16.hidden_size)
    x = torch.randn(len(chunk), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(100, 900, len(chunk))

    def out(ctx, ctx_mask):
        return model(x, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask, timestep=t)[0]

    assert torch.equal(out(embeds, mask), out(padded, mask))
    assert not torch.equal(out(embeds, None), out(padded, None))  # unmasked, they would show


def test_chunks_are_ordered_by_length_then_text_whatever_the_input_order():
    captions = ["bb", "a", "ccc", "ab", "b", "a", "ba"]
    expected = ["a", "b", "ab", "ba", "bb", "ccc"]
    for order in (captions, captions[::-1], sorted(captions), [captions[i] for i in (3, 6, 0, 5)]):
        chunks = CaptionChunks(order + captions, size=4)
        assert chunks.ordered == expected
        assert [chunks.chunk(k) for k in range(len(chunks))] == [expected[:4], expected[4:]]
        assert chunks.chunk_of("ccc") == ["bb", "ccc"]
    assert BATCHING == "chunks-64-by-length-trimmed"


def test_entries_of_the_old_scheme_are_stale_and_encoded_again(tmp_path, minilm16):
    chunks = CaptionChunks(CAPTIONS, size=16)
    old = TextEmbeddingCache(tmp_path, minilm16)
    embeds, mask = minilm16.encode(CAPTIONS)  # what the old scheme wrote: full length rows
    for i, caption in enumerate(CAPTIONS):  # under its key, which had no batching
        key = {k: v for k, v in old.key_for(caption).items() if k != "batching"}
        old.store(old.path_for(caption), key, {"embeds": embeds[i], "mask": mask[i]})
    flush_writes()
    found = old.inspect_caption(CAPTIONS[0])
    assert found.status is EntryStatus.STALE and found.reason == "built for a different batching"

    counted = Counting(minilm16)
    store = TextEmbeddingCache(tmp_path, counted)
    assert CaptionEncoder(counted, store=store, chunks=chunks).prefill(thorough=True) == {
        EntryStatus.VALID: 0,
        EntryStatus.MISSING: 0,
        EntryStatus.CORRUPT: 0,
        EntryStatus.STALE: len(CAPTIONS),
    }
    assert counted.trimmed == len(chunks) and store.stats.computed == len(CAPTIONS)
    flush_writes()
    fresh = CaptionEncoder(minilm16, chunks=chunks)
    fresh.prefill()
    again = TextEmbeddingCache(tmp_path, minilm16)
    for caption in CAPTIONS:  # rewritten under the new key, with the new scheme's values
        assert again.probe_caption(caption) is EntryStatus.VALID
        got = again.find(caption)
        assert torch.equal(got[0], fresh.pinned[caption][0])
    assert again.stats.invalid == 0
