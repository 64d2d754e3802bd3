"""Aspect-ratio bucket tables, assignment, and the resumable, rank-sharded batch sampler."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from PIL import Image

from sanakit.data.buckets import BucketBatchSampler, assign_bucket, bucket_table
from sanakit.data.formats import build_dataset, collate
from sanakit.errors import CheckpointError, ConfigError

# 3 buckets of unequal size, interleaved so grouping has real work to do.
KEYS = ["a", "b", "c", "a", "a", "b", "c", "a", "b", "a", "a", "c", "a", "b", "a", "a", "b"]


def test_tables() -> None:
    assert bucket_table(512) == {k: (int(h), int(w)) for k, (h, w) in ASPECT_RATIO_512_BIN.items()}
    assert bucket_table(1024) == {
        k: (int(h), int(w)) for k, (h, w) in ASPECT_RATIO_1024_BIN.items()
    }
    small = bucket_table(64)
    assert small["1.0"] == (64, 64)
    assert all(h % 32 == 0 and w % 32 == 0 and h >= 32 and w >= 32 for h, w in small.values())
    assert len(set(small.values())) == len(small)  # collapsed buckets were merged
    for key, (h, w) in small.items():
        assert float(key) == round(h / w, 2)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in bucket_table(96, multiple=16).values())
    # 512 with multiple 64: Sana's table has 32-multiples, so it is derived by scaling.
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in bucket_table(512, multiple=64).values())


def test_assign_bucket_closest_ratio() -> None:
    table = bucket_table(512)
    assert assign_bucket(512, 512, table) == "1.0"
    assert assign_bucket(100, 400, table) == "0.25"
    assert assign_bucket(4000, 100, table) == "4.0"  # beyond the table: the extreme bucket
    assert assign_bucket(300, 200, table) == "1.46"  # 1.5 is nearer 608/416 than 640/384
    assert assign_bucket(200, 300, table) == "0.68"
    with pytest.raises(ValueError):
        assign_bucket(0, 10, table)


def all_batches(sampler: BucketBatchSampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def test_batches_never_mix_buckets_and_cover_each_index_once() -> None:
    for drop_last in (False, True):
        ranks = [
            BucketBatchSampler(KEYS, 3, seed=7, rank=r, world_size=2, drop_last=drop_last)
            for r in range(2)
        ]
        per_rank = [all_batches(s) for s in ranks]
        assert [len(b) for b in per_rank] == [len(s) for s in ranks]
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))  # nobody sees an index twice
        for batches in per_rank:
            for b in batches:
                assert len({KEYS[i] for i in b}) == 1 and 1 <= len(b) <= 3
        if drop_last:
            assert len(per_rank[0]) == len(per_rank[1])
            assert all(len(b) == 3 for batches in per_rank for b in batches)
        else:
            assert sorted(seen) == list(range(len(KEYS)))
        # Rank r holds batches r, r + 2, ... of the shared epoch order.
        everything = ranks[0].epoch_batches(0)
        assert per_rank[0] == everything[0::2] and per_rank[1] == everything[1::2]


def test_deterministic_by_seed_and_epoch() -> None:
    def epoch(seed: int, e: int) -> list[list[int]]:
        s = BucketBatchSampler(KEYS, 2, seed=seed)
        s.set_epoch(e)
        return all_batches(s)

    assert epoch(1, 0) == epoch(1, 0)
    assert epoch(1, 0) != epoch(1, 1)
    assert epoch(1, 0) != epoch(2, 0)


def test_state_dict_resume_gives_exactly_the_remaining_batches() -> None:
    full = BucketBatchSampler(KEYS, 2, seed=3, rank=1, world_size=2)
    full.set_epoch(4)
    expected = all_batches(full)
    assert full.state_dict() == {"epoch": 4, "batches_done": len(expected)}

    run = BucketBatchSampler(KEYS, 2, seed=3, rank=1, world_size=2)
    run.set_epoch(4)
    it = iter(run)
    head = [next(it) for _ in range(2)]
    state = run.state_dict()
    assert state == {"epoch": 4, "batches_done": 2}

    resumed = BucketBatchSampler(KEYS, 2, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the usual call at the top of the epoch loop must not rewind
    assert head + all_batches(resumed) == expected
    resumed.set_epoch(5)  # a new epoch starts from its first batch
    assert resumed.state_dict() == {"epoch": 5, "batches_done": 0}
    assert len(all_batches(resumed)) == len(resumed)
    # A loop that prefetches reports what it actually consumed.
    assert run.state_dict(batches_done=1) == {"epoch": 4, "batches_done": 1}
    with pytest.raises(CheckpointError):
        resumed.load_state_dict({"epoch": 1})


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        BucketBatchSampler(KEYS, 0)
    with pytest.raises(ValueError):
        BucketBatchSampler(KEYS, 2, rank=2, world_size=2)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 128, 255)).save(buf, format="PNG")
    return buf.getvalue()


def test_from_dataset_resizes_each_index_to_its_bucket(tmp_path: Path) -> None:
    sizes = [(64, 64), (128, 32), (40, 100), (64, 60), (30, 120), (100, 40), (80, 81)]  # (w, h)
    for i, (w, h) in enumerate(sizes):
        (tmp_path / f"{i}.png").write_bytes(png(w, h))
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    cfg = SimpleNamespace(type="image_folder", data_dir=[str(tmp_path)], random_flip=False)
    ds = build_dataset(cfg, 64, seed=0)
    table = bucket_table(64)
    sampler = BucketBatchSampler.from_dataset(ds, 2, table=table, seed=0)
    assert sampler.target_sizes == [ds.target_size_for(i) for i in range(len(ds))]
    assert ds.target_size_for(1) == (32, 128) and ds.target_size_for(0) == (64, 64)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen = []
    for batch in loader:
        h, w = batch["pixels"].shape[-2:]
        assert all(
            ds.target_size_for(int(i.split(":")[1].split(".")[0])) == (h, w) for i in batch["id"]
        )
        seen += batch["id"]
    assert sorted(seen) == sorted(f"0:{i}.png" for i in range(len(sizes)))
    # No table: one bucket, square default size.
    plain = BucketBatchSampler.from_dataset(build_dataset(cfg, 64, seed=0), 3)
    assert sorted(i for b in plain for i in b) == list(range(len(sizes)))

    class NoSizes(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

    with pytest.raises(ConfigError, match="multi_scale"):
        BucketBatchSampler.from_dataset(NoSizes(), 2, table=table)
