"""The cache stream: shapes, determinism, rank slicing, exact resume, domain choice, padding, corrupt shards."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache_format import CacheError, DomainInfo, ShardWriter, TopkV1, open_cache, read_manifest, write_manifest
from tests.helpers import random_row, write_synthetic_cache
from trainer.data import (CacheBatches, CacheStream, PrefetchStream, check_cache, choose_domain, natural_weights,
                          uniform_weights)

T, K = 16, 8


@pytest.fixture
def cache(tmp_path):
    write_synthetic_cache(tmp_path / "cache", {"code": 7, "prose": 4}, T=T, K=K, V=64, rows_per_shard=5,
                          row_group_rows=2)
    return open_cache(tmp_path / "cache")


def row_ids(cache, split="train") -> dict[bytes, tuple[str, int]]:
    """input_ids bytes -> (domain, row_index): identifies the rows a batch holds (random rows are unique)."""
    return {r["input_ids"].astype(np.int64).tobytes(): (r["domain"], r["row_index"]) for r in cache.iter_rows(split)}


def batch_rows(batch, ids) -> list[tuple[str, int]]:
    return [ids[row.numpy().tobytes()] for row in batch["input_ids"]]


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a["domains"] == b["domains"]
    for key in ("input_ids", "attention_mask", "topk_ids", "topk_logprobs", "target_logprobs", "loss_mask"):
        assert torch.equal(a[key].nan_to_num(), b[key].nan_to_num()) if a[key].is_floating_point() \
            else torch.equal(a[key], b[key]), key


def test_shapes_and_dtypes(cache):
    batch = CacheStream(cache, "train", batch_size=3, seed=0).next_batch(natural_weights(cache, "train"))
    assert batch["input_ids"].shape == (3, T) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (3, T) and batch["attention_mask"].dtype == torch.int64
    assert batch["topk_ids"].shape == (3, T, K) and batch["topk_ids"].dtype == torch.int64
    assert batch["topk_logprobs"].shape == (3, T, K) and batch["topk_logprobs"].dtype == torch.float32
    assert batch["target_logprobs"].shape == (3, T) and batch["target_logprobs"].dtype == torch.float32
    assert batch["loss_mask"].shape == (3, T) and batch["loss_mask"].dtype == torch.bool
    assert batch["loss_mask"][:, :-1].all() and not batch["loss_mask"][:, -1].any()   # full rows: last has none
    assert len(batch["domains"]) == 3 and set(batch["domains"]) <= {"code", "prose"}


def test_same_seed_same_batches_other_seed_other_batches(cache):
    w = uniform_weights(cache, "train")
    a, b, c = (CacheStream(cache, "train", 4, seed=s) for s in (1, 1, 2))
    batches_a, batches_b, batches_c = ([s.next_batch(w) for _ in range(6)] for s in (a, b, c))
    for x, y in zip(batches_a, batches_b):
        assert_batches_equal(x, y)
    assert any(not torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(batches_a, batches_c))


@pytest.mark.parametrize("world_size", [2, 3])   # 3 ranks > prose's 2 units: rows are split by row_index
def test_each_row_once_per_epoch_across_ranks(cache, world_size):
    ids = row_ids(cache)
    for domain, n in (("code", 7), ("prose", 4)):
        epochs: list[list[tuple[str, int]]] = [[], []]
        for rank in range(world_size):
            stream = CacheStream(cache, "train", batch_size=1, seed=5, rank=rank, world_size=world_size)
            while (epoch := stream.state_dict()["domains"][domain]["epoch"]) < 2:
                epochs[epoch] += batch_rows(stream.next_batch({domain: 1.0}), ids)
        for seen in epochs:
            assert sorted(seen) == [(domain, i) for i in range(n)]   # disjoint and complete


def test_epochs_are_reshuffled(cache):
    ids = row_ids(cache)
    stream = CacheStream(cache, "train", batch_size=7, seed=0)
    first, second = (batch_rows(stream.next_batch({"code": 1.0}), ids) for _ in range(2))
    assert sorted(first) == sorted(second) and first != second


def test_resume_gives_identical_batches(cache):
    weights = lambda step: {"code": 0.2 + 0.1 * step, "prose": 1.0}   # weights that change over training
    uninterrupted = CacheStream(cache, "train", batch_size=3, seed=7)
    expected = [uninterrupted.next_batch(weights(s)) for s in range(12)]

    first = CacheStream(cache, "train", batch_size=3, seed=7)
    for s in range(5):
        first.next_batch(weights(s))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = CacheStream(open_cache(cache.root), "train", batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for s in range(5, 12):
        assert_batches_equal(resumed.next_batch(weights(s)), expected[s])


def test_prefetch_gives_the_same_batches_and_counts_consumed_ones(cache):
    weights = lambda step: {"code": 1.0 + step // 3, "prose": 1.0}    # changes every 3 batches
    plain = CacheStream(cache, "train", batch_size=3, seed=7)
    with PrefetchStream(CacheStream(cache, "train", batch_size=3, seed=7)) as prefetch:
        for s in range(8):
            assert_batches_equal(prefetch.next_batch(weights(s)), plain.next_batch(weights(s)))
            assert prefetch.state_dict() == plain.state_dict()
        state = prefetch.state_dict()
    resumed = PrefetchStream(CacheStream(cache, "train", batch_size=3, seed=7))
    resumed.load_state_dict(state)
    with resumed:
        for s in range(8, 12):
            assert_batches_equal(resumed.next_batch(weights(s)), plain.next_batch(weights(s)))


def test_prefetch_raises_reader_errors_unchanged(cache, monkeypatch):
    error = CacheError(f"{cache.root}/train/code/shard-00000.parquet: sha256 mismatch (shard corrupted)")

    def broken(shard, index):
        raise error
        yield

    with PrefetchStream(CacheStream(cache, "train", batch_size=2, seed=0)) as prefetch:
        monkeypatch.setattr(cache, "read_row_group", broken)
        with pytest.raises(CacheError) as raised:
            prefetch.next_batch({"code": 1.0})
        assert raised.value is error


def test_load_state_dict_refuses_another_configuration(cache):
    state = CacheStream(cache, "train", batch_size=3, seed=7).state_dict()
    with pytest.raises(ValueError, match="seed"):
        CacheStream(cache, "train", batch_size=3, seed=8).load_state_dict(state)


def test_choose_domain_follows_weights():
    assert {choose_domain(np.array([1.0, 0.0]), 0, step, 0) for step in range(200)} == {0}
    draws = Counter(choose_domain(np.array([0.7, 0.3]), 3, step, slot) for step in range(500) for slot in range(8))
    assert abs(draws[0] / 4000 - 0.7) < 0.03
    assert choose_domain(np.array([0.5, 0.5]), 1, 2, 3) == choose_domain(np.array([5.0, 5.0]), 1, 2, 3)
    with pytest.raises(ValueError):
        choose_domain(np.array([0.0, 0.0]), 0, 0, 0)


def test_stream_draws_only_weighted_domains(cache):
    stream = CacheStream(cache, "train", batch_size=4, seed=0)
    assert all(d == "code" for _ in range(5) for d in stream.next_batch({"code": 1.0, "prose": 0.0})["domains"])
    assert all(d == "prose" for _ in range(5) for d in stream.next_batch(np.array([0.0, 1.0]))["domains"])
    with pytest.raises(ValueError, match="unknown domain"):
        stream.next_batch({"math": 1.0})


def test_natural_and_uniform_weights(cache):
    assert natural_weights(cache, "train") == pytest.approx({"code": 7 / 11, "prose": 4 / 11})
    assert uniform_weights(cache, "train") == {"code": 0.5, "prose": 0.5}


def write_ragged_cache(cache_dir: Path, lengths: list[int]) -> list[dict]:
    """A cache whose one train domain holds rows of the given lengths (in one shard); returns the rows."""
    write_synthetic_cache(cache_dir, {"code": 1}, T=T, K=K)
    manifest = read_manifest(cache_dir)
    rng = np.random.default_rng(9)
    rows = [random_row(rng, i, "code", n, K, 64) for i, n in enumerate(lengths)]
    with ShardWriter(cache_dir, "train/code/shard-00000.parquet", TopkV1(top_k=K), row_group_rows=2) as w:
        for row in rows:
            w.write(row)
        shard = w.close()
    manifest.splits["train"]["code"] = DomainInfo(rows=shard.rows, tokens=shard.tokens, shards=[shard])
    write_manifest(cache_dir, manifest)
    return rows


def test_short_rows_are_padded_and_masked(tmp_path):
    rows = write_ragged_cache(tmp_path / "cache", [T, 10])
    batch = CacheStream(open_cache(tmp_path / "cache"), "train", batch_size=2, seed=0).next_batch({"code": 1.0})
    by_len = {int(m.sum()): b for b, m in enumerate(batch["attention_mask"])}
    for row in rows:
        n, b = len(row["input_ids"]), by_len[len(row["input_ids"])]
        assert torch.equal(batch["input_ids"][b, :n], torch.from_numpy(row["input_ids"]).long())
        assert torch.equal(batch["topk_ids"][b, :n], torch.from_numpy(row["topk_ids"]).long())
        assert torch.equal(batch["topk_logprobs"][b, :n], torch.from_numpy(row["topk_logprobs"]))
        assert batch["loss_mask"][b, :n - 1].all() and not batch["loss_mask"][b, n - 1:].any()
        assert (batch["input_ids"][b, n:] == 0).all()                        # eos id of the synthetic tokenizer
        assert torch.isneginf(batch["topk_logprobs"][b, n:]).all()
        assert torch.isnan(batch["target_logprobs"][b, n - 1:]).all()
    assert torch.isfinite(batch["target_logprobs"][batch["loss_mask"]]).all()


def test_truncated_shard_is_refused_at_start(cache):
    shard = cache.shards("train", "prose")[0]
    path = cache.root / shard.path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=shard.path):
        check_cache(cache, "train")
    with pytest.raises(CacheError, match=shard.path):
        CacheStream(cache, "train", batch_size=2, seed=0)


def test_corrupted_shard_raises_cache_error_naming_it(cache):
    shard = cache.shards("train", "code")[1]
    path = cache.root / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                                                # same size, other bytes
    path.write_bytes(bytes(data))
    check_cache(cache, "train")                                                # sizes still match
    stream = CacheStream(cache, "train", batch_size=1, seed=0)                 # start-up does not hash shards
    rows = cache.manifest.splits["train"]["code"].rows
    with pytest.raises(CacheError, match=f"{shard.path}: sha256 mismatch"):  # its first read does
        for _ in range(rows):
            stream.next_batch({"code": 1.0})


def test_iterable_dataset_with_dataloader(cache):
    stream = CacheStream(cache, "train", batch_size=2, seed=4)
    expected = [stream.next_batch(natural_weights(cache, "train")) for _ in range(3)]
    dataset = CacheBatches(cache.root, "train", batch_size=2, seed=4, weights="natural", steps=3)
    got = list(DataLoader(dataset, batch_size=None))
    assert len(got) == 3
    for a, b in zip(got, expected):
        assert_batches_equal(a, b)


def test_iterable_dataset_workers_read_disjoint_slices(cache):
    dataset = CacheBatches(cache.root, "train", batch_size=1, seed=4, weights={"code": 1.0}, steps=6)
    ids = row_ids(cache)
    got = [r for batch in DataLoader(dataset, batch_size=None, num_workers=2) for r in batch_rows(batch, ids)]
    assert len(got) == 6 and len(set(got)) == 6                                 # 7 code rows: no repeats yet
