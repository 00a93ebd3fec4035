"""Codec topk-v2: encode -> decode error bounds, ordering, padding, adaptive k, sampled targets, edges, bad input."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format import CacheError, TopkV2, codec_from_params, open_cache, verify_cache
from cache_format.codec_v2 import SQRT_SCALE, keep_counts
from tests.helpers import write_synthetic_cache


def full_row(rng, T: int, K: int, V: int, scale: float = 3.0, index: int = 0):
    """(row for the codec, the full (T-1, V) float64 log-probs behind it)."""
    logits = rng.normal(size=(T - 1, V)) * scale
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))                # (T-1, V)
    return row_from_logp(rng, logp, K, index), logp


def row_from_logp(rng, logp: np.ndarray, K: int, index: int = 0) -> dict:
    T, V = logp.shape[0] + 1, logp.shape[1]
    input_ids = rng.integers(0, V, size=T).astype(np.int32)                      # (T,)
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :K]                         # (T-1, K)
    lps = np.take_along_axis(logp, ids, -1)
    target = logp[np.arange(T - 1), input_ids[1:]]
    return {"row_index": index, "domain": "d", "input_ids": input_ids,
            "topk_ids": np.concatenate([ids, np.zeros((1, K))]).astype(np.int32),
            "topk_logprobs": np.concatenate([lps, np.full((1, K), -np.inf)]).astype(np.float32),
            "target_logprobs": np.append(target, np.nan).astype(np.float32)}


def roundtrip(codec: TopkV2, rows: list[dict]) -> list[dict]:
    return list(codec.decode(codec.encode(rows), "test"))


def depth_error_bound(lp: np.ndarray) -> np.ndarray:
    """Max |decoded depth - depth| of each entry: half a code step in sqrt space."""
    depth = np.maximum(lp[:, :1] - lp, 0.0)
    return np.sqrt(depth) / SQRT_SCALE + 0.25 / SQRT_SCALE**2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 24), K=st.integers(1, 40), scale=st.floats(0.1, 6.0))
def test_roundtrip_error_bounds_ordering_padding(seed, T, K, scale):
    rng = np.random.default_rng(seed)
    row, logp = full_row(rng, T, K, 64, scale)
    codec = TopkV2(top_k=K, vocab_size=64)
    (got,) = roundtrip(codec, [row])
    lp = row["topk_logprobs"][:-1].astype(np.float64)                             # (T-1, K) exact
    dlp = got["topk_logprobs"][:-1].astype(np.float64)
    kept = np.isfinite(dlp)
    assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
    assert got["topk_ids"].shape == (T, K) and got["target_logprobs"].shape == (T,)
    np.testing.assert_array_equal(got["input_ids"], row["input_ids"])
    # kept entries are a prefix, in the input's order, with the input's ids; the rest is padding
    assert (kept[:, 0]).all() and (np.diff(kept.astype(int), axis=1) <= 0).all()
    np.testing.assert_array_equal(np.where(kept, got["topk_ids"][:-1], 0), np.where(kept, row["topk_ids"][:-1], 0))
    assert (got["topk_ids"][:-1][~kept] == 0).all()
    assert (np.diff(np.where(kept, dlp, -1e9), axis=1) <= 1e-6).all()             # sorted descending
    # everything shallower than the quantiser's reach is kept (no rule given)
    assert (kept == (np.rint(np.sqrt(lp[:, :1] - lp) * SQRT_SCALE) <= 254)).all()
    # error bound: the entry's depth error plus the normaliser's (at most the largest depth error + tail's)
    bound = depth_error_bound(lp)
    slack = bound.max(1, keepdims=True) + 1 / 512 + 1e-5
    assert (np.abs(np.where(kept, dlp - lp, 0)) <= bound + slack).all()
    # the tail mass is recovered: decoded head + tail == 1, tail close to the true mass outside the kept ids
    tail_true = 1 - np.where(kept, np.exp(lp), 0).sum(1)
    tail_dec = 1 - np.exp(dlp).sum(1)
    assert (np.abs(tail_dec - tail_true) <= np.maximum(tail_true, 1e-12) * (np.exp(3 * slack[:, 0]) - 1) + 1e-5).all()
    # last position: no distribution
    assert np.isneginf(got["topk_logprobs"][-1]).all() and (got["topk_ids"][-1] == 0).all()
    assert np.isnan(got["target_logprobs"][-1])
    # target: the decoded logprob when among the kept ids (within the bound), else float16 of the exact one
    t, tt = got["target_logprobs"][:-1], row["target_logprobs"][:-1]
    inside = (row["topk_ids"][:-1] == row["input_ids"][1:, None]) & kept
    assert (np.abs(t - tt) <= np.where(inside.any(1), bound.max(1) + slack[:, 0], np.abs(tt) * 2**-10 + 1e-6)).all()


def test_fidelity_close_to_exact_topk():
    rng = np.random.default_rng(0)
    row, logp = full_row(rng, 65, 32, 500, 2.5)
    (got,) = roundtrip(TopkV2(top_k=32, vocab_size=500), [row])

    def kl(lp):  # mean KL(full || lp with the rest spread uniformly), (T-1, K) float64
        kept = np.isfinite(lp)
        p = np.exp(np.take_along_axis(logp, row["topk_ids"][:-1].astype(int), 1))
        rest = np.log(np.clip(1 - np.exp(lp).sum(1), 1e-300, None) / (500 - kept.sum(1)))
        cross = np.where(kept, p * np.where(kept, lp, 0), 0).sum(1) + (1 - np.where(kept, p, 0).sum(1)) * rest
        return np.mean((np.exp(logp) * logp).sum(1) - cross)

    exact = kl(row["topk_logprobs"][:-1].astype(np.float64))
    assert exact < kl(got["topk_logprobs"][:-1].astype(np.float64)) <= 1.02 * exact


@pytest.mark.parametrize("budget", [0.0, 1e-4, 1e-2])
def test_kl_budget_rule_matches_the_full_distribution(budget):
    """keep_counts' dKL(k) (from the top-K alone) equals the true KL difference; the kept k respects the budget
    and is the smallest that does."""
    rng = np.random.default_rng(1)
    V, K = 200, 40
    _, logp = full_row(rng, 33, K, V, 2.0)
    order = np.argsort(-logp, 1)
    lp = np.take_along_axis(logp, order, 1)                                       # (T-1, V) sorted
    k = keep_counts(lp[:, :K], V, None, budget)

    def true_kl(n):  # KL(p || first n entries + uniform rest), per position
        p = np.exp(lp)
        tail = p[:, n:].sum(1)
        return (p[:, n:] * (lp[:, n:] - np.log(tail[:, None] / (V - n)))).sum(1)

    base = true_kl(K)
    extra = np.array([true_kl(int(n))[i] for i, n in enumerate(k)]) - base
    assert (extra <= budget + 1e-9).all()
    smaller = np.array([true_kl(int(n) - 1)[i] if n > 1 else np.inf for i, n in enumerate(k)]) - base
    assert (smaller > budget - 1e-9).all()
    if budget == 0.0:
        assert (k >= K - 1).all()        # dropping a last entry equal in mass to the tail's can cost exactly 0


def test_kl_scale_rule_is_the_budget_rule_with_the_rows_truncation_bound():
    rng = np.random.default_rng(6)
    V, K = 300, 32
    _, logp = full_row(rng, 41, K, V, 2.0)
    lp = -np.sort(-logp, 1)[:, :K]                                                 # (T-1, K)
    t_K = 1 - np.exp(lp).sum(1)
    u = t_K * np.log((V - K) * np.minimum(np.exp(lp[:, -1]) / t_K, 1))             # the bound U_K
    np.testing.assert_array_equal(keep_counts(lp, V, None, None, 0.05), keep_counts(lp, V, None, 0.05 * u.mean()))
    assert keep_counts(lp, V, None, None, 0.05).mean() < K
    np.testing.assert_array_equal(keep_counts(lp, V, None, 1e-9, 0.05), keep_counts(lp, V, None, None, 0.05))
    np.testing.assert_array_equal(keep_counts(lp, V, 0.5, 1e-9, 0.05),                   # rules: the smallest k
                                  np.minimum(keep_counts(lp, V, 0.5, None), keep_counts(lp, V, None, None, 0.05)))


def test_top_p_rule_and_fewer_entries_for_confident_positions():
    rng = np.random.default_rng(2)
    confident = full_row(rng, 17, 32, 300, 12.0)[0]
    flat = full_row(rng, 17, 32, 300, 0.3)[0]
    codec = TopkV2(top_k=32, vocab_size=300, top_p=0.9)
    a, b = roundtrip(codec, [confident, flat])
    mass = np.exp(confident["topk_logprobs"][:-1].astype(np.float64)).cumsum(1)
    k = np.isfinite(a["topk_logprobs"][:-1]).sum(1)
    assert ((mass[np.arange(16), k - 1] >= 0.9) | (k == 32)).all()
    assert (k == 1 + (mass < 0.9).sum(1)).all()
    assert k.mean() < np.isfinite(b["topk_logprobs"][:-1]).sum(1).mean()
    budget = TopkV2(top_k=32, vocab_size=300, kl_budget=1e-4)
    assert sum(len(b) for b in budget.encode([confident]).column("ids").to_pylist()) \
        < sum(len(b) for b in budget.encode([flat]).column("ids").to_pylist())


def test_edges_k1_kV_one_token_uniform():
    rng = np.random.default_rng(3)
    V = 16
    # k = 1: the top-1 and the tail
    row, logp = full_row(rng, 9, 1, V)
    (got,) = roundtrip(TopkV2(top_k=1, vocab_size=V), [row])
    np.testing.assert_allclose(got["topk_logprobs"][:-1], row["topk_logprobs"][:-1], atol=1 / 256)
    # k = V: no tail at all, the decoded distribution sums to 1
    row, logp = full_row(rng, 9, V, V, 1.0)
    (got,) = roundtrip(TopkV2(top_k=V, vocab_size=V), [row])
    np.testing.assert_allclose(np.exp(got["topk_logprobs"][:-1].astype(np.float64)).sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(got["topk_ids"], row["topk_ids"])
    # all the mass on one token: one entry kept, log p = 0
    logp = np.full((8, V), -200.0)
    logp[:, 3] = 0.0
    (got,) = roundtrip(TopkV2(top_k=4, vocab_size=V), [row_from_logp(rng, logp, 4)])
    assert (got["topk_ids"][:-1, 0] == 3).all() and (got["topk_logprobs"][:-1, 0] == 0).all()
    assert np.isneginf(got["topk_logprobs"][:-1, 1:]).all()
    # uniform: every kept entry equal, tail = the rest
    logp = np.full((8, V), -np.log(V))
    (got,) = roundtrip(TopkV2(top_k=4, vocab_size=V), [row_from_logp(rng, logp, 4)])
    np.testing.assert_allclose(got["topk_logprobs"][:-1], -np.log(V), atol=1 / 512)      # the tail code's step


def test_row_of_one_token_and_empty_table():
    codec = TopkV2(top_k=4, vocab_size=300)
    row = {"row_index": 0, "domain": "d", "input_ids": np.array([299], np.int32),
           "topk_ids": np.zeros((1, 4), np.int32), "topk_logprobs": np.full((1, 4), -np.inf, np.float32),
           "target_logprobs": np.array([np.nan], np.float32)}
    (got,) = roundtrip(codec, [row])
    assert got["input_ids"].tolist() == [299] and np.isnan(got["target_logprobs"]).all()
    assert list(codec.decode(codec.encode([]), "x")) == []


def test_sampled_targets_roundtrip_exact_counts():
    rng = np.random.default_rng(4)
    N, T = 12, 10
    counts = np.zeros((T - 1, N), int)
    for t in range(T - 1):
        c = np.sort(rng.multinomial(N, np.ones(N) / N))[::-1]
        counts[t] = c
    ids = np.argsort(rng.random((T - 1, 300)), 1)[:, :N]
    with np.errstate(divide="ignore"):
        lp = np.log(counts / N)
    row = {"row_index": 0, "domain": "d", "input_ids": rng.integers(0, 300, T).astype(np.int32),
           "topk_ids": np.concatenate([ids, np.zeros((1, N))]).astype(np.int32),
           "topk_logprobs": np.concatenate([lp, np.full((1, N), -np.inf)]).astype(np.float32),
           "target_logprobs": np.append(-rng.random(T - 1) * 5, np.nan).astype(np.float32)}
    codec = TopkV2(top_k=N, vocab_size=300, targets="sampled", samples=N)
    (got,) = roundtrip(codec, [row])
    np.testing.assert_array_equal(got["topk_logprobs"], row["topk_logprobs"])
    kept = counts > 0
    np.testing.assert_array_equal(np.where(kept, got["topk_ids"][:-1], 0), np.where(kept, ids, 0))
    np.testing.assert_allclose(np.exp(got["topk_logprobs"][:-1].astype(np.float64)).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got["target_logprobs"], row["target_logprobs"], rtol=2**-10)


def test_v2_cache_on_disk_reads_and_verifies(tmp_path):
    codec = TopkV2(top_k=8, vocab_size=70000, kl_budget=1e-3)      # 3-byte ids
    write_synthetic_cache(tmp_path / "c", {"code": 7, "prose": 3}, T=16, K=8, V=70000, codec=codec)
    cache = open_cache(tmp_path / "c")
    assert cache.codec == codec and cache.manifest.codec["name"] == "topk-v2"
    rows = list(cache.iter_rows("train", "code"))
    assert [r["row_index"] for r in rows] == list(range(7))
    assert all(r["topk_ids"].shape == (16, 8) and r["topk_ids"].max() < 70000 for r in rows)
    assert verify_cache(tmp_path / "c").rows == 14


def test_codec_params_roundtrip_and_bad_params():
    codec = TopkV2(top_k=64, vocab_size=4096, top_p=0.99, kl_budget=1e-4, kl_scale=0.015)
    assert codec_from_params(codec.params(), 64) == codec
    with pytest.raises(CacheError, match="bad parameters"):
        codec_from_params({"name": "topk-v2", "vocab_size": 10, "colour": 1}, 4)
    with pytest.raises(CacheError, match="targets 'both'"):
        codec_from_params({"name": "topk-v2", "vocab_size": 10, "targets": "both"}, 4)
    with pytest.raises(CacheError, match="top_k 40 out of range"):
        TopkV2(top_k=40, vocab_size=10)
    with pytest.raises(CacheError, match="unknown codec 'topk-v9'"):
        codec_from_params({"name": "topk-v9"}, 4)


def test_unsorted_input_and_corrupt_fields_are_named():
    rng = np.random.default_rng(5)
    row, _ = full_row(rng, 6, 4, 50)
    codec = TopkV2(top_k=4, vocab_size=50)
    bad = {**row, "topk_logprobs": row["topk_logprobs"][:, ::-1].copy()}
    bad["topk_logprobs"][-1] = -np.inf
    with pytest.raises(ValueError, match="not sorted"):
        codec.encode([bad])
    table = codec.encode([row])
    for field, blob in (("ids", b"\x01\x02\x03"), ("counts", b"\x09" * 6), ("targets", b"\x00")):
        broken = table.set_column(table.schema.get_field_index(field), field, pa.array([blob], pa.binary()))
        with pytest.raises(CacheError, match=f"test.*'{field}'"):
            list(codec.decode(broken, "test"))
