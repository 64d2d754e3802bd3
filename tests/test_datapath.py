"""The real-data path: latents keyed by file bytes (a warm epoch decodes nothing), captions
encoded in fixed chunks (exact whatever the resume point), encoders released."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_caches import Counting, make_image_folder

import sanakit.embeddings.loader as loader_mod
import sanakit.models.tiny as hm
from sanakit.data.dataset import index_dataset
from sanakit.data.images import load_image
from sanakit.data.shapes import render
from sanakit.embeddings.captions import CaptionChunks, CaptionEncoder
from sanakit.embeddings.latents import LatentCache
from sanakit.embeddings.loader import CachedSamples, collate_cached, covered
from sanakit.embeddings.sources import SourceIndex
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

    # against encoding one caption at a time: equal up to float rounding, as close as it gets
    single = torch.stack([minilm.encode([c])[0][0] for c in CAPTIONS])
    batched = torch.stack([reference[c][0] for c in CAPTIONS])
    masks = torch.stack([reference[c][1] for c in CAPTIONS])
    assert torch.equal(masks, minilm.encode(CAPTIONS)[1])
    diff = (single - batched).abs().max().item()
    print(f"max |batched - single| = {diff:.3g}")
    assert diff < 1e-4
