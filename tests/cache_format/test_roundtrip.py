import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format import CacheError, ShardWriter, TopkV1, open_cache
from tests.helpers import random_row, write_synthetic_cache


def test_writer_reader_roundtrip(tmp_path):
    manifest = write_synthetic_cache(tmp_path / "c", {"code": 7, "prose": 4}, T=16, K=8, V=64, seed=3)
    cache = open_cache(tmp_path / "c")
    assert cache.domains("train") == ["code", "prose"]
    assert cache.domains("val") == ["code", "prose"]
    # regenerate the same rows with the same seed and compare, in write order
    rng = np.random.default_rng(3)
    expected = [random_row(rng, i, "code", 16, 8, 64) for i in range(7)]
    got = list(cache.iter_rows("train", "code"))
    assert len(got) == 7
    for e, g in zip(expected, got):
        assert g["domain"] == "code" and g["row_index"] == e["row_index"]
        assert g["input_ids"].dtype == np.int32 and g["input_ids"].shape == (16,)
        assert g["topk_ids"].dtype == np.int32 and g["topk_ids"].shape == (16, 8)
        assert g["topk_logprobs"].dtype == np.float32 and g["topk_logprobs"].shape == (16, 8)
        assert g["target_logprobs"].dtype == np.float32 and g["target_logprobs"].shape == (16,)
        np.testing.assert_array_equal(g["input_ids"], e["input_ids"])
        np.testing.assert_array_equal(g["topk_ids"], e["topk_ids"])
        np.testing.assert_array_equal(g["topk_logprobs"], e["topk_logprobs"])
        np.testing.assert_array_equal(g["target_logprobs"], e["target_logprobs"])
    assert np.isneginf(got[0]["topk_logprobs"][-1]).all() and np.isnan(got[0]["target_logprobs"][-1])
    all_rows = list(cache.iter_rows("train"))
    assert [r["domain"] for r in all_rows] == ["code"] * 7 + ["prose"] * 4
    assert manifest.splits["train"]["code"].tokens == 7 * 16
    assert len(manifest.splits["train"]["code"].shards) == 2      # 5 rows per shard


def test_unknown_split_and_domain_are_clear_errors(synthetic_cache):
    cache = open_cache(synthetic_cache)
    with pytest.raises(CacheError, match="unknown split 'test'"):
        list(cache.iter_rows("test"))
    with pytest.raises(CacheError, match="no domain 'math'"):
        list(cache.iter_rows("train", "math"))


def test_shard_appears_only_when_closed(tmp_path):
    codec = TopkV1(top_k=4)
    w = ShardWriter(tmp_path, "train/x/shard-00000.parquet", codec, row_group_rows=1)
    w.write(random_row(np.random.default_rng(0), 0, "x", 8, 4, 32))
    assert not (tmp_path / "train/x/shard-00000.parquet").exists()
    info = w.close()
    assert (tmp_path / info.path).stat().st_size == info.bytes and info.rows == 1 and info.tokens == 8
    assert not list(tmp_path.rglob("*.tmp"))


def test_writer_rejects_wrong_shapes(tmp_path):
    row = random_row(np.random.default_rng(0), 0, "x", 8, 4, 32)
    w = ShardWriter(tmp_path, "s.parquet", TopkV1(top_k=5), row_group_rows=1)
    with pytest.raises(ValueError, match="do not match T=8, K=5"):
        w.write(row)
    w.abort()
    assert not list(tmp_path.iterdir())


@settings(max_examples=25, deadline=None)
@given(T=st.integers(2, 40), K=st.integers(1, 12), n_rows=st.integers(1, 6), group=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_codec_roundtrip_property(tmp_path_factory, T, K, n_rows, group, seed):
    """Any shapes, any number of rows per row group: decode(encode(rows)) == rows exactly, padding kept."""
    V = K + int(np.random.default_rng(seed).integers(0, 20))
    rng = np.random.default_rng(seed)
    rows = [random_row(rng, i, "d", int(rng.integers(2, T + 1)), K, V) for i in range(n_rows)]
    d = tmp_path_factory.mktemp("prop")
    codec = TopkV1(top_k=K)
    w = ShardWriter(d, "s.parquet", codec, row_group_rows=group)
    for r in rows:
        w.write(r)
    info = w.close()
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(d / info.path)
    assert pf.metadata.num_row_groups == -(-n_rows // group)
    got = [r for g in range(pf.metadata.num_row_groups) for r in codec.decode(pf.read_row_group(g), "s")]
    assert len(got) == n_rows
    for e, g in zip(rows, got):
        for key in ("input_ids", "topk_ids", "topk_logprobs", "target_logprobs"):
            np.testing.assert_array_equal(g[key], e[key])
        # sorted descending, -inf only at the padded last position
        assert (np.diff(g["topk_logprobs"][:-1], axis=-1) <= 0).all()
        assert np.isfinite(g["topk_logprobs"][:-1]).all()
