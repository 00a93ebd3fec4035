"""AdaKD building blocks: Hellinger difficulty, LATF selection and ratio, IDTS temperatures."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.trainer.test_losses import as_product, far_tail_case, in_support, ref_buckets
from trainer.adakd import LATF, AdaKDConfig, adakd_token_weights, hellinger, idts_temperature, select_hardest
from trainer.losses import BUCKET_LOSSES, bucket_logprobs, chunked_buckets, logits_loss


def buckets(seed, N=8, V=12, K=5, scale=2.0, padded=0, gap=0.0, dtype=torch.float32, chunked=False):
    """(lp, lq, live) of a random teacher top-K (plus `padded` -inf slots) and student, and the teacher's full
    log-probs and the student's logits (in `dtype`). gap: the student's logits outside the teacher's ids are pushed
    that many nats down. chunked: the buckets from chunked_buckets (as training), else from bucket_logprobs."""
    g = torch.Generator().manual_seed(seed)
    t_logp = (torch.randn(N, V, generator=g) * scale).log_softmax(-1)
    s_logits = torch.randn(N, V, generator=g) * scale
    ids = t_logp.argsort(-1, descending=True)[:, :K]
    lps = t_logp.gather(-1, ids)
    ids = torch.cat([ids, torch.zeros(N, padded, dtype=ids.dtype)], -1)
    lps = torch.cat([lps, torch.full((N, padded), -math.inf)], -1)
    s_logits = torch.where(in_support(ids, lps, V), s_logits, s_logits - gap).to(dtype)   # (N, V)
    if chunked:
        return chunked_buckets(*as_product(s_logits), ids, lps, torch.zeros(N, dtype=torch.long))[0], t_logp, s_logits
    return bucket_logprobs(s_logits, ids, lps), t_logp, s_logits


def full_hellinger(t_logp, s_logits):
    """float64 Hellinger over the full vocabulary (Eq. 3)."""
    p, q = t_logp.double().exp(), s_logits.double().softmax(-1)
    return ((p.sqrt() - q.sqrt()).square().sum(-1) / 2).sqrt()


# ---------- Hellinger ----------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), V=st.integers(2, 20), k_frac=st.floats(0.05, 1.0),
       scale=st.sampled_from([0.1, 2.0, 50.0]), padded=st.integers(0, 2), gap=st.sampled_from([0.0, 120.0, 1e4]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_hellinger_in_unit_interval_and_below_full(seed, V, k_frac, scale, padded, gap, dtype):
    K = max(1, round(k_frac * V))
    kw = dict(V=V, K=K, scale=scale, padded=padded, gap=gap, dtype=dtype)
    (lp, lq, live), t_logp, s_logits = buckets(seed, **kw)
    s = hellinger(lp, lq, live)
    assert s.dtype == torch.float32 and s.shape == (8,)
    assert ((s >= 0) & (s <= 1)).all()
    # buckets give a lower bound, up to float32 rounding of the teacher's tail mass (~6e-8, sqrt'ed: ~2e-4)
    assert (s.double() <= full_hellinger(t_logp, s_logits) + 3e-4).all()
    # training scores the buckets of chunked_buckets: the same, however far below the max the student's tail lies
    torch.testing.assert_close(hellinger(*buckets(seed, chunked=True, **kw)[0]), s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", [-120.0, -300.0, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_hellinger_far_student_tail(tail, dtype):
    """The student's tail > 103 nats below its max: still a live bucket, on both paths (float64 reference)."""
    s_logits, ids, lps, targets = far_tail_case(tail)
    s_logits = s_logits.to(dtype)
    P, Q = ref_buckets(s_logits, ids, lps)                                          # (N, K+1) float64
    expected = ((P.sqrt() - Q.sqrt()).square().sum(-1) / 2).sqrt()
    chunked = chunked_buckets(*as_product(s_logits), ids, lps, targets, chunk_size=2)[0]
    for lp, lq, live in (bucket_logprobs(s_logits, ids, lps), chunked):
        torch.testing.assert_close(hellinger(lp, lq, live).double(), expected, rtol=1e-5, atol=1e-6)


def test_hellinger_equals_full_vocabulary_when_k_is_v():
    (lp, lq, live), t_logp, s_logits = buckets(0, V=12, K=12)
    torch.testing.assert_close(hellinger(lp, lq, live).double(), full_hellinger(t_logp, s_logits),
                               rtol=1e-5, atol=1e-6)


def test_hellinger_zero_for_equal_distributions():
    for K in (4, 12):
        (_, _, _), t_logp, _ = buckets(1, V=12, K=K)
        ids = t_logp.argsort(-1, descending=True)[:, :K]
        lp, lq, live = bucket_logprobs(t_logp, ids, t_logp.gather(-1, ids))
        torch.testing.assert_close(hellinger(lp, lq, live), torch.zeros(8), rtol=0, atol=1e-5)


def test_hellinger_one_for_disjoint_supports():
    g = torch.Generator().manual_seed(8)
    V, K = 10, 3
    t_lp = torch.randn(16, K, generator=g).log_softmax(-1)                          # teacher only on ids 0..2
    ids = torch.arange(K).expand(16, K)
    s_logits = torch.randn(16, V, generator=g)
    s_logits[:, :K] = -1e4                                                          # student only on ids 3..9
    lp, lq, live = bucket_logprobs(s_logits, ids, t_lp)
    # the teacher's tail keeps its float32 rounding (mass <= ~6e-8, sqrt'ed: <= ~2.5e-4)
    torch.testing.assert_close(hellinger(lp, lq, live), torch.ones(16), rtol=0, atol=3e-4)


def test_hellinger_is_detached():
    (lp, lq, live), _, _ = buckets(2)
    out = hellinger(lp, lq.requires_grad_(True), live)
    assert not out.requires_grad


# ---------- LATF selection ----------

def reference_selection(scores, mask, ratio):
    valid = [i for i in range(len(scores)) if mask[i]]
    k = max(1, math.floor(len(valid) * ratio)) if valid else 0
    keep = sorted(valid, key=lambda i: (-scores[i], i))[:k]                         # ties: lower index first
    return [i in keep for i in range(len(scores))]


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=40),
       ratio=st.floats(0.01, 1.0))
def test_select_hardest_keeps_the_hardest_valid_positions(data, ratio):
    scores = torch.tensor([s / 4 for s, _ in data])                                 # few values: many ties
    mask = torch.tensor([m for _, m in data])
    out = select_hardest(scores, mask, ratio)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert out.tolist() == reference_selection(scores.tolist(), mask.tolist(), ratio)
    n = int(mask.sum())
    assert int(out.sum()) == (max(1, math.floor(n * ratio)) if n else 0)
    assert not (out & ~mask).any()
    if out.any() and (mask & ~out).any():
        assert scores[out].min() >= scores[mask & ~out].max()


def test_select_hardest_no_valid_position_and_full_ratio():
    scores = torch.rand(6, generator=torch.Generator().manual_seed(9))
    assert not select_hardest(scores, torch.zeros(6, dtype=torch.bool), 0.5).any()
    mask = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(select_hardest(scores, mask, 1.0), mask)
    assert int(select_hardest(scores, mask, 0.01).sum()) == 1                     # at least one
    with pytest.raises(ValueError, match="ratio"):
        select_hardest(scores, mask, 0.0)


# ---------- IDTS ----------

def test_idts_monotone_bounded_and_median_exact():
    tau_base, c = 1.3, 0.5
    scores = torch.rand(41, generator=torch.Generator().manual_seed(3)).sort().values   # ascending difficulty
    selected = torch.ones(41, dtype=torch.bool)
    selected[::5] = False
    tau = idts_temperature(scores, selected, tau_base, c)
    assert tau.dtype == torch.float32
    t = tau[selected]
    assert (t[1:] <= t[:-1]).all()                                                  # harder -> lower temperature
    assert (t >= tau_base * math.exp(-c) - 1e-6).all() and (t <= tau_base * math.exp(c) + 1e-6).all()
    assert (tau[~selected] == tau_base).all()
    median = scores[selected].median()                                             # lower median, as torch
    assert (tau[scores == median] == tau_base).all() and (scores[selected] == median).sum() == 1
    expected = tau_base * torch.exp(-c * torch.tanh(torch.log(scores.double() / median.double())))
    torch.testing.assert_close(t.double(), expected[selected], rtol=1e-6, atol=1e-6)


def test_idts_even_count_uses_lower_median():
    scores = torch.tensor([0.1, 0.4, 0.2, 0.3])
    tau = idts_temperature(scores, torch.ones(4, dtype=torch.bool))
    assert tau[2] == 1.0 and tau[3] < 1.0                                           # median 0.2, not 0.25


def test_idts_zero_scores_give_no_nan():
    zeros = torch.zeros(5)
    all_sel = torch.ones(5, dtype=torch.bool)
    assert (idts_temperature(zeros, all_sel) == 1.0).all()                        # 0 / 0: all at the median
    mostly_zero = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.9])                           # median 0
    tau = idts_temperature(mostly_zero, all_sel, 2.0, 0.5)
    assert torch.isfinite(tau).all() and (tau[:3] == 2.0).all()
    torch.testing.assert_close(tau[3:], torch.full((2,), 2.0 * math.exp(-0.5)))
    some_zero = torch.tensor([0.0, 0.2, 0.3])
    tau = idts_temperature(some_zero, all_sel[:3], 1.0, 0.5)
    assert torch.isfinite(tau).all() and tau[0] == pytest.approx(math.exp(0.5))
    assert (idts_temperature(zeros, torch.zeros(5, dtype=torch.bool)) == 1.0).all()   # nothing selected


# ---------- temperatures into the losses ----------

@pytest.mark.parametrize("name", sorted(BUCKET_LOSSES))
@pytest.mark.parametrize("tau_base", [1.0, 1.4, 0.7])
def test_constant_temperature_tensor_equals_scalar_in_every_loss(name, tau_base):
    (lp, lq, live), t_logp, s_logits = buckets(4, V=16, K=5, padded=1)
    ids = t_logp.argsort(-1, descending=True)[:, :5]
    mask = torch.ones(8, dtype=torch.bool)
    _, tau, _ = adakd_token_weights(lp, lq, live, mask, 0.5, AdaKDConfig(c=0.0, tau_base=tau_base))
    assert tau.shape == (8,) and tau.dtype == torch.float32
    out = logits_loss(name, s_logits, ids, t_logp.gather(-1, ids), tau)
    assert torch.allclose(out, logits_loss(name, s_logits, ids, t_logp.gather(-1, ids), tau_base))
    _, tau, _ = adakd_token_weights(lp, lq, live, mask, 0.5, AdaKDConfig(idts=False, tau_base=tau_base))
    assert tau == tau_base                                                          # IDTS off: the scalar itself


# ---------- adakd_token_weights ----------

def test_token_weights_switches_and_stats():
    (lp, lq, live), _, _ = buckets(5, N=20, V=16, K=4)
    mask = torch.arange(20) % 4 != 3                                                # 15 valid positions
    scores = hellinger(lp, lq, live)

    selected, tau, stats = adakd_token_weights(lp, lq, live, mask, 0.5, AdaKDConfig())
    assert torch.equal(selected, select_hardest(scores, mask, 0.5)) and int(selected.sum()) == 7
    torch.testing.assert_close(tau, idts_temperature(scores, selected))
    assert set(stats) == {"focus_ratio", "selected_tokens", "tau_mean", "tau_min", "tau_max", "difficulty_mean"}
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert stats["focus_ratio"].item() == 0.5 and stats["selected_tokens"].item() == 7
    torch.testing.assert_close(stats["tau_mean"], tau[selected].mean())
    assert stats["tau_min"] == tau[selected].min() and stats["tau_max"] == tau[selected].max()
    torch.testing.assert_close(stats["difficulty_mean"], scores[mask].mean())

    selected, tau, stats = adakd_token_weights(lp, lq, live, mask, 0.5, AdaKDConfig(latf=False, idts=False))
    assert torch.equal(selected, mask) and tau == 1.0 and stats["focus_ratio"].item() == 1.0

    selected, tau, _ = adakd_token_weights(lp, lq, live, mask, 0.5, AdaKDConfig(latf=False))
    assert torch.equal(selected, mask)
    torch.testing.assert_close(tau, idts_temperature(scores, mask))

    selected, tau, stats = adakd_token_weights(lp, lq, live, mask, 0.5, AdaKDConfig(idts=False, tau_base=2.0))
    assert int(selected.sum()) == 7 and tau == 2.0 and stats["tau_mean"].item() == 2.0


def test_token_weights_empty_mask():
    (lp, lq, live), _, _ = buckets(6)
    selected, tau, stats = adakd_token_weights(lp, lq, live, torch.zeros(8, dtype=torch.bool), 0.3,
                                               AdaKDConfig(tau_base=1.5))
    assert not selected.any() and (tau == 1.5).all()
    assert {k: v.item() for k, v in stats.items()} == {"focus_ratio": pytest.approx(0.3), "selected_tokens": 0.0,
                                                       "tau_mean": 1.5, "tau_min": 1.5, "tau_max": 1.5,
                                                       "difficulty_mean": 0.0}


# ---------- LATF ratio ----------

def test_latf_ema_matches_hand_computation():
    latf = LATF(warmup_steps=10, beta=0.9)
    for step, (loss, ema) in enumerate([(2.0, 2.0), (1.0, 1.9), (4.0, 2.11)], start=1):
        assert latf.update(loss, step) == 1.0
        assert latf.ema == pytest.approx(ema, abs=1e-12)
    assert latf.ref is None                                                         # still warming up


def test_latf_ratio_follows_the_loss():
    latf = LATF(warmup_steps=2, beta=0.5, eps=0.05, delta=0.1)
    trace = []
    for step, loss in enumerate([1.0, 0.2, 0.6, 0.4, 0.5, 0.7, 0.8, 1.0], start=1):
        trace.append((latf.update(loss, step), latf.ema, latf.ref))
    expected = [(1.0, 1.0, None), (1.0, 0.6, None),                                 # warm-up: r = 1 however it moves
                (1.0, 0.6, 0.6),                                                    # first step after: ref = EMA
                (0.9, 0.5, 0.5),                                                    # fell > 5%: shrink, ref reset
                (0.9, 0.5, 0.5),                                                    # inside the band: unchanged
                (0.99, 0.6, 0.6),                                                   # rose > 5%: grow, ref reset
                (1.0, 0.7, 0.7),                                                    # grow, capped at 1
                (1.0, 0.85, 0.7)]                                                   # at the cap: no change, ref kept
    for got, want in zip(trace, expected):
        assert got == pytest.approx(want, abs=1e-12)


def test_latf_respects_min_ratio():
    latf = LATF(warmup_steps=0, beta=0.5, delta=0.3, min_ratio=0.2)
    ratios = [latf.update(0.5**step, step) for step in range(1, 30)]
    assert min(ratios) == 0.2 and ratios[-1] == 0.2
    assert ratios == sorted(ratios, reverse=True)


@settings(max_examples=100, deadline=None)
@given(losses=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=60), warmup=st.integers(0, 5),
       eps=st.sampled_from([0.0, 0.05, 0.2]))
def test_latf_ratio_bounded_and_changes_only_outside_the_band(losses, warmup, eps):
    latf = LATF(warmup_steps=warmup, beta=0.8, eps=eps, min_ratio=0.1)
    for step, loss in enumerate(losses, start=1):
        before, ref = latf.ratio, latf.ref
        ratio = latf.update(loss, step)
        assert 0.1 <= ratio <= 1.0
        if step <= warmup + 1:
            assert ratio == 1.0
        if ratio != before:
            assert abs(latf.ema - ref) > eps * ref and latf.ref == latf.ema
        elif ref is not None:
            assert latf.ref == ref


def test_latf_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(7)
    losses = (2.0 * torch.rand(80, generator=g) + torch.linspace(3, 0.5, 80)).tolist()
    a = LATF(warmup_steps=5, beta=0.7, delta=0.1)
    for step in range(1, 41):
        a.update(losses[step - 1], step)
    assert a.ratio < 1.0                                                            # the ratio has moved
    state = json.loads(json.dumps(a.state_dict()))
    assert state == a.state_dict()
    b = LATF(warmup_steps=5, beta=0.7, delta=0.1)
    b.load_state_dict(state)
    for step in range(41, 81):
        assert a.update(losses[step - 1], step) == b.update(losses[step - 1], step)
        assert a.state_dict() == b.state_dict()


def test_latf_from_config_and_non_finite_loss():
    cfg = AdaKDConfig(beta=0.9, eps=0.1, delta=0.2, min_ratio=0.3, warmup_fraction=0.05)
    latf = LATF.from_config(cfg, total_steps=1000)
    assert (latf.warmup_steps, latf.beta, latf.eps, latf.delta, latf.min_ratio) == (50, 0.9, 0.1, 0.2, 0.3)
    assert LATF.from_config(cfg, total_steps=10).warmup_steps == 0
    with pytest.raises(ValueError, match="loss"):
        latf.update(float("nan"), 1)


# ---------- option validation ----------

@pytest.mark.parametrize("field,value", [
    ("beta", 0.0), ("beta", 1.0), ("eps", -0.01), ("delta", 0.0), ("delta", 1.0), ("min_ratio", 0.0),
    ("min_ratio", 1.5), ("tau_base", 0.0), ("tau_base", -1.0), ("tau_base", math.inf), ("c", -0.1),
    ("c", math.nan), ("warmup_fraction", -0.1), ("warmup_fraction", 1.0)])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        AdaKDConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("beta", 1.0), ("eps", -1.0), ("delta", 1.0), ("min_ratio", 0.0),
                                         ("warmup_steps", -1), ("warmup_steps", 1.5), ("ratio", 0.05)])
def test_bad_latf_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        LATF(**{field: value})
