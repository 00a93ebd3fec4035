"""Codec topk-v3: round trip within the stated bounds, id order, the shared-code rule against the full distribution,
edges, a v3 cache on disk, and corrupted fields refused by the reader and by verify."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format import CacheError, TopkV2, TopkV3, codec_from_params, file_sha256, open_cache, verify_cache
from cache_format.codec_v2 import MAX_CODE, SQRT_SCALE, truncation_bound
from cache_format.codec_v3 import value_counts
from tests.cache_format.test_codec_v2 import depth_error_bound, full_row, roundtrip
from tests.helpers import write_synthetic_cache


def v3_order(ids: np.ndarray, values: np.ndarray, listed: np.ndarray):
    """Entries of a v1/v2 decode (descending log-prob, `listed` first) in topk-v3's decoded order: ascending id,
    then the top-1 swapped into slot 0."""
    order = np.argsort(np.where(listed, ids, np.iinfo(np.int64).max), axis=1, kind="stable")
    ids, values = np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)
    j = np.argmax(order == 0, axis=1)                                             # where the top-1 went
    rows = np.arange(len(ids))
    for a in (ids, values):
        a[rows, 0], a[rows, j] = a[rows, j], a[rows, 0].copy()
    return ids, values


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 24), K=st.integers(1, 40), scale=st.floats(0.1, 6.0))
def test_roundtrip_without_rule_is_v2s_decode_in_id_order(seed, T, K, scale):
    """No rule: every listed id keeps its own code, and the decode is topk-v2's (so within v2's error bounds,
    test_codec_v2) in v3's order: the top-1 in slot 0, the other ids ascending, padding last."""
    rng = np.random.default_rng(seed)
    row, _ = full_row(rng, T, K, 64, scale)
    (got,) = roundtrip(TopkV3(top_k=K, vocab_size=64), [row])
    (ref,) = roundtrip(TopkV2(top_k=K, vocab_size=64), [row])
    assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    listed = np.isfinite(ref["topk_logprobs"])
    ids, lps = v3_order(ref["topk_ids"].astype(np.int64), ref["topk_logprobs"], listed)
    np.testing.assert_array_equal(np.where(listed, got["topk_ids"], 0), np.where(listed, ids, 0))
    np.testing.assert_allclose(got["topk_logprobs"], lps, atol=1e-5)
    np.testing.assert_allclose(got["target_logprobs"], ref["target_logprobs"], atol=1e-5)
    live = listed[:, 0]
    assert (got["topk_logprobs"][live, :1] >= got["topk_logprobs"][live] - 1e-6).all()   # the top-1 first


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 24), K=st.integers(2, 40), scale=st.floats(0.1, 6.0),
       budget=st.sampled_from([1e-4, 1e-3, 1e-2, 1e-1]))
def test_roundtrip_with_shared_ids(seed, T, K, scale, budget):
    """With a rule: the listed ids are v2's, in v3's order; the first k_t by log-prob keep their value within v2's
    bound, the others share one value that is never above the last valued one and that carries their true mass;
    the target is decoded where it is a valued entry, float16 elsewhere."""
    rng = np.random.default_rng(seed)
    row, _ = full_row(rng, T, K, 64, scale)
    (got,) = roundtrip(TopkV3(top_k=K, vocab_size=64, kl_budget=budget), [row])
    (ref,) = roundtrip(TopkV2(top_k=K, vocab_size=64), [row])
    listed = np.isfinite(ref["topk_logprobs"])
    np.testing.assert_array_equal(np.isfinite(got["topk_logprobs"]), listed)
    lp = row["topk_logprobs"].astype(np.float64)
    valued = value_counts(lp[:-1], listed[:-1].sum(1), 64, budget, None)         # (T-1,)
    is_valued = np.arange(K) < np.append(valued, 0)[:, None]                     # (T, K) in log-prob order
    ids, exact = v3_order(row["topk_ids"].astype(np.int64), lp, listed)
    _, bound = v3_order(row["topk_ids"].astype(np.int64), np.vstack([depth_error_bound(lp[:-1]), np.zeros((1, K))]),
                        listed)
    _, where_valued = v3_order(row["topk_ids"].astype(np.int64), is_valued, listed)
    np.testing.assert_array_equal(np.where(listed, got["topk_ids"], 0), np.where(listed, ids, 0))
    dlp = got["topk_logprobs"].astype(np.float64)
    slack = np.where(listed, bound, 0).max(1, keepdims=True) + 1 / 512 + 1e-5
    with np.errstate(invalid="ignore"):                                           # -inf - -inf in padding
        assert (np.abs(np.where(where_valued, dlp - exact, 0)) <= bound + slack + 2 * budget).all()
    shared = listed & ~where_valued
    for t in range(T - 1):
        assert len(np.unique(dlp[t][shared[t]])) <= 1                               # one value
        assert dlp[t][shared[t]].max(initial=-np.inf) <= dlp[t][where_valued[t]].min() + 1e-5
    mass_true = np.where(shared, np.exp(exact), 0).sum(1)                         # what the shared ids carry
    mass_dec = np.where(shared, np.exp(np.where(shared, dlp, -np.inf)), 0).sum(1)
    assert (np.abs(mass_dec - mass_true) <= mass_true * (np.exp(4 * slack[:, 0] + 0.02) - 1) + 1e-5).all()
    t, tt = got["target_logprobs"][:-1], row["target_logprobs"][:-1]
    inside = ((row["topk_ids"][:-1] == row["input_ids"][1:, None]) & is_valued[:-1]).any(1)
    assert (np.abs(t - tt) <= np.where(inside, bound.max(1)[:-1] + slack[:-1, 0] + 2 * budget,
                                       np.abs(tt) * 2**-10 + 1e-6)).all()
    assert np.isneginf(got["topk_logprobs"][-1]).all() and np.isnan(got["target_logprobs"][-1])


def kl_full(logp: np.ndarray, got: dict) -> np.ndarray:
    """(T-1,) KL(full distribution || decoded cache), the decoded tail spread uniformly over the ids not listed."""
    V = logp.shape[1]
    dlp = got["topk_logprobs"][:-1].astype(np.float64)
    listed = np.isfinite(dlp)
    q = np.full_like(logp, 0.0)
    tail = np.clip(1 - np.where(listed, np.exp(dlp), 0).sum(1), 0, None)          # (T-1,)
    q[:] = (tail / np.maximum(V - listed.sum(1), 1))[:, None]
    rows = np.repeat(np.arange(len(logp)), listed.sum(1))
    q[rows, got["topk_ids"][:-1][listed]] = np.exp(dlp[listed])
    p = np.exp(logp)
    return (p * (logp - np.log(np.maximum(q, 1e-300)))).sum(1)


@pytest.mark.parametrize("budget", [1e-4, 1e-3, 1e-2])
def test_shared_code_rule_matches_the_full_distribution(budget):
    """value_counts' dKL is what sharing really costs: measured against the full distribution, the extra KL over
    the all-valued decode is within the budget (plus quantisation noise) at every position, and fewer entries
    are valued as the budget grows."""
    rng = np.random.default_rng(3)
    row, logp = full_row(rng, 40, 32, 512, scale=2.0)
    (all_valued,) = roundtrip(TopkV3(top_k=32, vocab_size=512), [row])
    (shared,) = roundtrip(TopkV3(top_k=32, vocab_size=512, kl_budget=budget), [row])
    extra = kl_full(logp, shared) - kl_full(logp, all_valued)                     # (T-1,)
    assert (extra <= budget + 2e-3).all(), extra.max()
    lp = row["topk_logprobs"][:-1].astype(np.float64)
    k = value_counts(lp, np.full(len(lp), 32), 512, budget, None)
    assert (k < 32).any() and (k >= 1).all()
    assert value_counts(lp, np.full(len(lp), 32), 512, budget * 10, None).sum() <= k.sum()


def test_kl_scale_is_the_budget_rule_with_the_rows_truncation_bound():
    rng = np.random.default_rng(4)
    row, _ = full_row(rng, 30, 16, 300, scale=1.5)
    lp, n = row["topk_logprobs"][:-1].astype(np.float64), np.full(29, 16)
    u = truncation_bound(lp, 300)
    assert u > 0
    np.testing.assert_array_equal(value_counts(lp, n, 300, None, 0.05), value_counts(lp, n, 300, 0.05 * u, None))
    a = TopkV3(top_k=16, vocab_size=300, kl_scale=0.05).encode([row])
    b = TopkV3(top_k=16, vocab_size=300, kl_budget=0.05 * u).encode([row])
    assert a.column("values").equals(b.column("values")) and a.column("shared").equals(b.column("shared"))


def test_flat_part_costs_less_and_keeps_the_mass():
    """A flat teacher: most listed ids share one code; the shared ids' decoded mass equals their true mass (to the
    quantiser's step), and the head plus tail still sums to 1."""
    rng = np.random.default_rng(6)
    row, logp = full_row(rng, 30, 48, 1000, scale=0.3)
    codec = TopkV3(top_k=48, vocab_size=1000, kl_scale=0.015)
    table = codec.encode([row])
    valued = np.frombuffer(table.column("valued")[0].as_py(), np.uint8)
    listed = np.frombuffer(table.column("counts")[0].as_py(), np.uint8)
    assert valued.sum() < 0.5 * listed.sum()
    (got,) = roundtrip(codec, [row])
    dlp = got["topk_logprobs"][:-1].astype(np.float64)
    listed = np.isfinite(dlp)
    tail = 1 - np.exp(np.where(listed, dlp, -np.inf)).sum(1)
    true_tail = 1 - np.exp(row["topk_logprobs"][:-1].astype(np.float64)).sum(1)
    np.testing.assert_allclose(tail, true_tail, rtol=0.02)
    (all_valued,) = roundtrip(TopkV3(top_k=48, vocab_size=1000), [row])
    assert kl_full(logp, got).mean() <= 1.1 * kl_full(logp, all_valued).mean()


def test_edges_k1_kV_one_token_uniform_and_empty():
    rng = np.random.default_rng(7)
    for K, V, scale in ((1, 50, 2.0), (20, 20, 2.0), (8, 30, 0.0)):            # k = 1, k = V, a uniform teacher
        row, logp = full_row(rng, 9, K, V, scale)
        (got,) = roundtrip(TopkV3(top_k=K, vocab_size=V, kl_scale=0.015), [row])
        dlp = got["topk_logprobs"][:-1]
        assert np.isfinite(dlp[:, 0]).all()
        np.testing.assert_allclose(np.exp(dlp.astype(np.float64)).sum(1) <= 1 + 1e-5, True)
        assert (kl_full(logp, got) >= -1e-6).all()
    one = {"row_index": 0, "domain": "d", "input_ids": np.array([3], np.int32),
           "topk_ids": np.zeros((1, 4), np.int32), "topk_logprobs": np.full((1, 4), -np.inf, np.float32),
           "target_logprobs": np.array([np.nan], np.float32)}
    (got,) = roundtrip(TopkV3(top_k=4, vocab_size=10), [one])
    assert np.isneginf(got["topk_logprobs"]).all() and np.isnan(got["target_logprobs"][0])
    assert list(TopkV3(top_k=4, vocab_size=10).decode(TopkV3(top_k=4, vocab_size=10).encode([]), "t")) == []


def test_depth_beyond_the_quantiser_is_not_listed():
    rng = np.random.default_rng(8)
    row, _ = full_row(rng, 6, 16, 64, scale=30.0)                                # very peaked: deep entries
    lp = row["topk_logprobs"][:-1].astype(np.float64)
    (got,) = roundtrip(TopkV3(top_k=16, vocab_size=64), [row])
    reach = (np.rint(np.sqrt(lp[:, :1] - lp) * SQRT_SCALE) <= MAX_CODE).sum(1)
    np.testing.assert_array_equal(np.isfinite(got["topk_logprobs"][:-1]).sum(1), reach)


def test_v3_cache_on_disk_reads_and_verifies_and_corruption_is_refused(tmp_path):
    codec = TopkV3(top_k=8, vocab_size=70000, kl_scale=0.015)                     # 4-byte ids
    write_synthetic_cache(tmp_path / "c", {"code": 7, "prose": 3}, T=16, K=8, V=70000, codec=codec)
    cache = open_cache(tmp_path / "c")
    assert cache.codec == codec and cache.manifest.codec["name"] == "topk-v3"
    assert codec_from_params(codec.params(), 8) == codec
    rows = list(cache.iter_rows("train", "code"))
    assert [r["row_index"] for r in rows] == list(range(7))
    assert all(r["topk_ids"].shape == (16, 8) and r["topk_ids"].max() < 70000 for r in rows)
    assert verify_cache(tmp_path / "c").rows == 14
    shard = cache.shards("train", "code")[0]
    path = tmp_path / "c" / shard.path
    assert pq.ParquetFile(path).metadata.row_group(0).column(5).compression == "ZSTD"
    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):                                          # one dictionary per row group
        (first, *rest) = pf.read_row_group(g).column("dictionary").to_pylist()
        assert len(first) > 0 and rest == [b""] * len(rest)


@pytest.mark.parametrize("field,blob,match", [
    ("values", b"\xfe" * 3, "'ids', 'valued_at', 'values' or 'targets'"),
    ("shared", b"\x01", "'shared', 'tail' or 'slots'"),
    ("counts", b"\x09" * 6, "'counts'"),
    ("valued", b"\x05" * 6, "'valued'"),
    ("valued_at", b"\x00" * 20, "'valued_at'"),
    ("targets", b"\x00", "'ids', 'valued_at', 'values' or 'targets'"),
])
def test_corrupt_fields_are_named_by_the_reader(field, blob, match):
    rng = np.random.default_rng(5)
    row, _ = full_row(rng, 6, 4, 50)
    codec = TopkV3(top_k=4, vocab_size=50)
    table = codec.encode([row])
    broken = table.set_column(table.schema.get_field_index(field), field, pa.array([blob], pa.binary()))
    with pytest.raises(CacheError, match=f"test.*{match}"):
        list(codec.decode(broken, "test"))


def test_valued_at_past_the_list_or_twice_is_refused():
    rng = np.random.default_rng(5)
    row, _ = full_row(rng, 6, 8, 50, scale=0.5)
    codec = TopkV3(top_k=8, vocab_size=50)                                        # every listed id valued
    table = codec.encode([row])
    valued_at = np.frombuffer(table.column("valued_at")[0].as_py(), np.uint8).copy()
    assert np.frombuffer(table.column("valued")[0].as_py(), np.uint8)[0] >= 2     # two valued ids at position 0
    for value, match in ((9, "points past its position's ids"), (valued_at[1], "does not pick distinct ids")):
        broken_at = valued_at.copy()
        broken_at[0] = value
        broken = with_first_row(table, "valued_at", broken_at.tobytes())
        with pytest.raises(CacheError, match=f"test: field 'valued_at' {match}"):
            list(codec.decode(broken, "test"))


def with_first_row(table: pa.Table, field: str, blob: bytes) -> pa.Table:
    column = pa.array([blob] + table.column(field).to_pylist()[1:], pa.binary())
    return table.set_column(table.schema.get_field_index(field), field, column)


def dictionary_of(table: pa.Table) -> np.ndarray:
    return np.frombuffer(table.column("dictionary")[0].as_py(), "<u1").copy()


@pytest.mark.parametrize("corrupt,match", [
    ("codes", "field 'values' or 'shared' holds a depth code above 254"),
    ("dictionary repeats an id", "field 'dictionary' is not a set of ids below vocab_size=64"),
    ("dictionary beyond the vocabulary", "field 'dictionary' is not a set of ids below vocab_size=64"),
    ("dictionary cut short", "field 'ids' points past the"),
])
def test_corrupted_model_tables_are_refused_by_the_reader_and_verify(tmp_path, corrupt, match):
    """A shard that is well-formed Parquet with a manifest that matches its bytes (what a writer bug or a tampered
    cache would give, not a flipped byte, which the checksum catches), but whose row group's dictionary or codes
    are wrong: the reader and verify both refuse it, naming the shard and field."""
    codec = TopkV3(top_k=8, vocab_size=64)
    write_synthetic_cache(tmp_path / "c", {"code": 3}, T=16, K=8, V=64, codec=codec, rows_per_shard=3,
                          row_group_rows=3)
    manifest_path = tmp_path / "c" / "manifest.json"
    d = json.loads(manifest_path.read_text())
    entry = d["splits"]["train"]["code"]["shards"][0]
    path = tmp_path / "c" / entry["path"]
    table = pq.read_table(path)
    if corrupt == "codes":
        shared = np.frombuffer(table.column("shared")[0].as_py(), np.uint8).copy()
        shared[0] = 255                                                           # beyond the quantiser's reach
        table = with_first_row(table, "shared", shared.tobytes())
    else:
        deltas = dictionary_of(table)                                             # 1-byte ids (V = 64)
        if corrupt == "dictionary repeats an id":
            deltas[1] = 0
        elif corrupt == "dictionary beyond the vocabulary":
            deltas[-1] += 64
        else:
            deltas = deltas[:-5]
        table = with_first_row(table, "dictionary", deltas.tobytes())
    pq.write_table(table, path, compression="zstd")
    entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    manifest_path.write_text(json.dumps(d))
    with pytest.raises(CacheError, match=f"{entry['path']}: {match}"):
        list(open_cache(tmp_path / "c").iter_rows("train", "code"))
    with pytest.raises(CacheError, match=match):
        verify_cache(tmp_path / "c")


def test_bad_params():
    with pytest.raises(CacheError, match="top_k 40 out of range"):
        TopkV3(top_k=40, vocab_size=10)
    with pytest.raises(CacheError, match="bad parameters"):
        codec_from_params({"name": "topk-v3", "vocab_size": 10, "targets": "sampled"}, 4)
    with pytest.raises(CacheError, match="must be >= 0"):
        TopkV3(top_k=4, vocab_size=10, kl_scale=-1.0)
