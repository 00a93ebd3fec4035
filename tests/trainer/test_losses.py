"""Property tests for the sparse-teacher losses against independent float64 references."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.losses import (BUCKET_LOSSES, bucket_logprobs, chunked_buckets, chunked_loss, cross_entropy,
                            logits_loss, masked_mean)

F_DIVERGENCES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}),
                 ("jsd", {"beta": 0.9}), ("jsd", {"beta": 1.0}), ("sfkl", {}), ("sfkl", {"alpha": 0.5}),
                 ("srkl", {}), ("srkl", {"alpha": 0.5}), ("tvd", {})]
ALL = F_DIVERGENCES + [("akl", {}), ("akl", {"mu": 0.9})]
ids_of = lambda cases: [f"{n}-{p}" for n, p in cases]


# ---------- float64 references on explicit distributions (N, B) ----------

def ref_div(name, p, q, beta=0.5, alpha=0.1, mu=0.5, tail_last=False):
    """The divergence between the rows of p and q (probabilities, float64), straight from papers.md §4.

    tail_last: for AKL on buckets, the last column (the tail bucket) ranks below every cached id.
    """
    kl = lambda a, b: torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)
    if name == "fkl" or (name == "jsd" and beta == 0):
        return kl(p, q)
    if name == "rkl" or (name == "jsd" and beta == 1):
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "sfkl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":  # AdaKD / DistiLLM get_ratio: sort by teacher prob, head = cumsum <= mu plus the top-1
        rank_key = torch.cat([p[:, :-1], torch.full_like(p[:, -1:], -1.0)], -1) if tail_last else p
        order = rank_key.argsort(-1, descending=True)
        p_sorted = p.gather(-1, order)
        err = (p_sorted - q.gather(-1, order)).abs()
        head = p_sorted.cumsum(-1) <= mu
        head[:, 0] = True
        g_head, g = torch.where(head, err, 0.0).sum(-1), err.sum(-1)
        return g_head / g * kl(p, q) + (1 - g_head / g) * kl(q, p)
    raise ValueError(name)


def in_support(ids, logprobs, V):
    """(N, V) bool: the ids of the valid (finite) slots, naively."""
    return ((torch.arange(V) == ids.long()[..., None]) & (logprobs > float("-inf"))[..., None]).any(-2)


def ref_buckets(student_logits, ids, logprobs):
    """K+1 bucket probabilities (N, K+1) built naively in float64; padded slots get 0 on both sides.

    The student's tail is its mass on the ids outside the valid slots, not 1 - head (which cancels to 0 in float64
    when the tail is below ~1e-16)."""
    z = student_logits.double()                                                     # (N, V)
    valid = logprobs > float("-inf")
    p = torch.where(valid, logprobs.double().exp(), 0.0)                            # (N, K)
    q = torch.where(valid, z.softmax(-1).gather(-1, ids.long()), 0.0)              # (N, K)
    q_tail = (z.masked_fill(in_support(ids, logprobs, z.shape[-1]), float("-inf")).logsumexp(-1)
              - z.logsumexp(-1)).exp()                                              # (N,) 0 for an empty tail
    return torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1), torch.cat([q, q_tail[:, None]], -1)


def ref_tempered(name, P, Q, tau, tau_squared=True, **params):
    """tau^2 D(P^tau || Q^tau) + (1 - tau^2) D(binary) with the head reshaped to softmax(log p_S / tau); without
    tau_squared, D(P^tau || Q^tau)."""
    def temper(B):
        head = B[:, :-1]
        shaped = torch.where(head > 0, head.log() / tau[:, None], float("-inf")).softmax(-1)
        return torch.cat([head.sum(-1, keepdim=True) * shaped, B[:, -1:]], -1)
    if not tau_squared:
        return ref_div(name, temper(P), temper(Q), **params)
    binary = lambda B: torch.stack([B[:, :-1].sum(-1), B[:, -1]], -1)
    t2 = tau.double() ** 2
    return t2 * ref_div(name, temper(P), temper(Q), **params) + (1 - t2) * ref_div(name, binary(P), binary(Q), **params)


# ---------- data ----------

def teacher_and_student(seed, N=6, V=12, K=5, scale=2.0, random_subset=False):
    """Teacher full log-probs (N, V), its top-K (or a random K-subset), and student logits (N, V)."""
    g = torch.Generator().manual_seed(seed)
    t_logp = (torch.randn(N, V, generator=g) * scale).log_softmax(-1)
    order = torch.rand(N, V, generator=g).argsort(-1) if random_subset else t_logp.argsort(-1, descending=True)
    ids = order[:, :K]
    s_logits = torch.randn(N, V, generator=g) * scale
    return t_logp, ids, t_logp.gather(-1, ids), s_logits


def pad(ids, logprobs, extra, seed):
    """Insert `extra` padded slots (id 0, -inf) at random positions of every row."""
    g = torch.Generator().manual_seed(seed)
    N, K = ids.shape
    perm = torch.rand(N, K + extra, generator=g).argsort(-1)
    ids = torch.cat([ids, torch.zeros(N, extra, dtype=ids.dtype)], -1).gather(-1, perm)
    logprobs = torch.cat([logprobs, torch.full((N, extra), float("-inf"))], -1).gather(-1, perm)
    return ids, logprobs


def far_tail_case(tail):
    """Student logits whose tail (the ids outside the teacher's) lies at `tail`, far below the max.

    Row 0 is the reproduction: V = 8, teacher top-2 (0.4, 0.3) on ids 0, 1 (p_tail = 0.3, a padded slot reusing id
    0), student logits (0, -1, tail x 6); row 1 has other ids and a padded slot whose id 0 is in the tail, and its
    target in the tail; row 2 is ordinary. Returns logits (3, 8), ids and log-probs (3, 3), targets (3,).
    """
    s = torch.full((3, 8), tail)
    s[0, :2] = torch.tensor([0.0, -1.0])
    s[1, [5, 2]] = torch.tensor([2.0, 0.5])
    s[2] = torch.randn(8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 1, 0], [5, 2, 0], [3, 6, 1]])
    lp = torch.tensor([[0.4, 0.3, 0.0], [0.55, 0.3, 0.0], [0.45, 0.2, 0.1]]).log()    # log 0 = -inf: padded slot
    return s, ids, lp, torch.tensor([0, 7, 4])


def as_product(logits):
    """(hidden, weight) leaves with hidden @ weight.T == logits exactly: hidden = I (N, N), weight = logits.T."""
    return (torch.eye(logits.shape[0], dtype=logits.dtype).requires_grad_(True),
            logits.detach().T.clone().requires_grad_(True))


def chunked_and_reference(logits, ids, lp, targets, name, params, tau, chunk_size=2):
    """((kd, ce, d(kd + ce)/dlogits) from chunked_buckets, the same from bucket_logprobs + cross_entropy on the full
    logits); logits in their own dtype (the hidden and weight of chunked_buckets have it)."""
    h, w = as_product(logits)
    buckets, ce = chunked_buckets(h, w, ids, lp, targets, chunk_size)
    kd = BUCKET_LOSSES[name](*buckets, tau, **params)                               # (N,)
    g_w, = torch.autograd.grad((kd + ce).sum(), w)                                  # (V, N) = dz.T, as h = I
    z = logits.detach().clone().requires_grad_(True)                               # (N, V)
    zf = z.float()                                                                  # one rounding of the gradient
    ref_kd = BUCKET_LOSSES[name](*bucket_logprobs(zf, ids, lp), tau, **params)
    ref_ce = cross_entropy(zf, targets)
    g_z, = torch.autograd.grad((ref_kd + ref_ce).sum(), z)
    return (kd, ce, g_w.T), (ref_kd, ref_ce, g_z)


def call(name, params, s, ids, lp, temperature=1.0, **kw):
    return logits_loss(name, s, ids, lp, temperature, **params, **kw)


# ---------- the tests ----------

def test_registry_names():
    assert set(BUCKET_LOSSES) == {"fkl", "rkl", "jsd", "sfkl", "srkl", "tvd", "akl"}


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_full_support_equals_full_vocabulary_divergence(name, params):
    t_logp, ids, lp, s = teacher_and_student(0, K=12)                              # K = V: no tail
    out = call(name, params, s, ids, lp)
    assert out.dtype == torch.float32 and out.shape == (6,)
    expected = ref_div(name, t_logp.double().exp(), s.double().softmax(-1), **params)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_fkl_full_support_matches_kl_div():
    t_logp, ids, lp, s = teacher_and_student(1, K=12)
    expected = F.kl_div(s.log_softmax(-1), t_logp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(logits_loss("fkl", s, ids, lp), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_fkl_full_support_tempered_is_hinton_kd(tau):
    t_logp, ids, lp, s = teacher_and_student(2, K=12)
    expected = tau**2 * F.kl_div((s / tau).log_softmax(-1), (t_logp / tau).log_softmax(-1), log_target=True,
                                 reduction="none").sum(-1)
    torch.testing.assert_close(logits_loss("fkl", s, ids, lp, tau), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_temperature_one_is_plain_bucket_divergence(name, params):
    _, ids, lp, s = teacher_and_student(3, V=20, K=6, random_subset=True)
    ids, lp = pad(ids, lp, 2, seed=3)
    P, Q = ref_buckets(s, ids, lp)
    expected = ref_div(name, P, Q, **params, tail_last=True)
    torch.testing.assert_close(call(name, params, s, ids, lp, 1.0).double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(call(name, params, s, ids, lp, torch.ones(6)), call(name, params, s, ids, lp, 1.0))
    assert torch.equal(call(name, params, s, ids, lp, torch.ones(6), tau_squared=False),
                       call(name, params, s, ids, lp, 1.0))


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_constant_temperature_tensor_equals_scalar(name, params):
    _, ids, lp, s = teacher_and_student(4, V=16, K=5)
    for tau in (0.7, 1.6):
        torch.testing.assert_close(call(name, params, s, ids, lp, torch.full((6,), tau)),
                                   call(name, params, s, ids, lp, tau), rtol=0, atol=0)


@pytest.mark.parametrize("tau_squared", [True, False], ids=["tau2", "weight1"])
@pytest.mark.parametrize("name,params", F_DIVERGENCES, ids=ids_of(F_DIVERGENCES))
def test_tempered_is_decoupled_form(name, params, tau_squared):
    _, ids, lp, s = teacher_and_student(5, V=16, K=5)
    ids, lp = pad(ids, lp, 2, seed=5)
    tau = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.65, 3.0])
    P, Q = ref_buckets(s, ids, lp)
    expected = ref_tempered(name, P, Q, tau, tau_squared, **params)
    torch.testing.assert_close(call(name, params, s, ids, lp, tau, tau_squared=tau_squared).double(), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_tempered_kl_matches_the_note(name):
    """papers.md §5.5: KL([P_S, p_tail] || [Q_S, q_tail]) + W tau^2 KL(cond), W = P_S (fkl) or Q_S (rkl)."""
    _, ids, lp, s = teacher_and_student(6, V=16, K=5)
    tau = torch.tensor([0.6, 0.8, 1.3, 1.65, 2.0, 0.61])
    P, Q = ref_buckets(s, ids, lp)
    PS, QS = P[:, :-1].sum(-1), Q[:, :-1].sum(-1)
    pc = (lp.double() / tau[:, None]).softmax(-1)                                   # p^tau(.|S)
    qc = (s.double().gather(-1, ids) / tau[:, None]).softmax(-1)                   # q^tau(.|S)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)
    if name == "fkl":
        expected = kl(torch.stack([PS, P[:, -1]], -1), torch.stack([QS, Q[:, -1]], -1)) + PS * tau**2 * kl(pc, qc)
    else:
        expected = kl(torch.stack([QS, Q[:, -1]], -1), torch.stack([PS, P[:, -1]], -1)) + QS * tau**2 * kl(qc, pc)
    torch.testing.assert_close(logits_loss(name, s, ids, lp, tau).double(), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16), V=st.integers(2, 24), k_frac=st.floats(0.05, 1.0),
       scale=st.sampled_from([0.5, 3.0, 30.0]), tau=st.sampled_from([1.0, 0.5, 2.0, "per-position"]),
       case=st.sampled_from(ALL))
def test_nonnegative(seed, V, k_frac, scale, tau, case):
    K = max(1, round(k_frac * V))
    _, ids, lp, s = teacher_and_student(seed, N=5, V=V, K=K, scale=scale, random_subset=seed % 2 == 0)
    ids, lp = pad(ids, lp, seed % 3, seed)
    if tau == "per-position":
        tau = torch.rand(5, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    out = call(*case, s, ids, lp, tau)
    # float32: with logits up to 30 / tau = 60 nats, the terms' rounding is a few 1e-6 (seen: -1.9e-6)
    assert torch.isfinite(out).all() and (out >= -1e-5).all(), out


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
@pytest.mark.parametrize("K", [3, 10])
def test_zero_when_student_equals_teacher(name, params, K):
    t_logp, ids, lp, _ = teacher_and_student(7, V=10, K=K)
    ids, lp = pad(ids, lp, 2, seed=7)
    for tau in (1.0, 0.5, torch.linspace(0.5, 2.0, 6)):
        torch.testing.assert_close(call(name, params, t_logp, ids, lp, tau), torch.zeros(6), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_teacher_mass_above_one_is_renormalised(name, params):
    """Rounded (e.g. bf16) teacher log-probs can sum above 1, or below 1 with no tail to take the rest (K = V): the
    head is renormalised, no negative loss."""
    t_logp, ids, lp, _ = teacher_and_student(19, V=10, K=10)
    for shift in (0.02, -0.02):
        out = call(name, params, t_logp, ids, lp + shift)
        torch.testing.assert_close(out, torch.zeros(6), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name,params", F_DIVERGENCES, ids=ids_of(F_DIVERGENCES))
@pytest.mark.parametrize("random_subset", [False, True])
def test_bucketed_is_at_most_full_data_processing(name, params, random_subset):
    t_logp, ids, lp, s = teacher_and_student(8, N=32, V=20, K=4, random_subset=random_subset)
    full = ref_div(name, t_logp.double().exp(), s.double().softmax(-1), **params)
    out = call(name, params, s, ids, lp).double()
    assert (out <= full + 1e-6).all()
    assert (out < full - 1e-4).any()                                               # a lower bound, not an equality


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_padded_slots_are_ignored(name, params):
    t_logp, _, _, s = teacher_and_student(9, V=16, K=5)
    ids = torch.rand(6, 15, generator=torch.Generator().manual_seed(9)).argsort(-1)[:, :5] + 1   # token 0 in tail
    ids[0, 0] = 0                                                                  # except in row 0
    lp = t_logp.gather(-1, ids)
    pids, plp = pad(ids, lp, 4, seed=9)                                             # padding ids are 0 everywhere
    tau = torch.linspace(0.5, 2.0, 6)
    for t in (1.0, tau):
        torch.testing.assert_close(call(name, params, s, pids, plp, t), call(name, params, s, ids, lp, t),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_finite_gradients_with_padding_extreme_logits_and_empty_tail(name, params):
    cases = [teacher_and_student(10, V=8, K=8),                                     # K = V: empty tail
             teacher_and_student(11, V=8, K=3, scale=300.0),                         # extreme, p_tail rounds to 0
             teacher_and_student(12, V=8, K=3, scale=1e-3)]                          # near-uniform
    for _, ids, lp, logits in cases:
        ids, lp = pad(ids, lp, 3, seed=10)
        lp[0] = float("-inf")                                                        # a fully padded row
        for tau in (1.0, 0.5, torch.linspace(0.5, 2.0, 6)):
            s = logits.clone().requires_grad_(True)
            out = call(name, params, s, ids, lp, tau)
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(s.grad).all(), (out, s.grad)


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
def test_bf16_inputs_give_float32_outputs(name, params):
    _, ids, lp, s = teacher_and_student(13, V=32, K=8)
    ids, lp = pad(ids, lp, 2, seed=13)
    tau = torch.linspace(0.5, 2.0, 6)
    out16 = call(name, params, s.bfloat16(), ids.int(), lp.bfloat16(), tau.bfloat16())
    assert out16.dtype == torch.float32
    upcast = call(name, params, s.bfloat16().float(), ids, lp.bfloat16().float(), tau.bfloat16().float())
    torch.testing.assert_close(out16, upcast, rtol=1e-6, atol=1e-7)                # upcast before any arithmetic
    torch.testing.assert_close(out16, call(name, params, s, ids, lp, tau), rtol=0.05, atol=0.02)


def test_cross_entropy_and_masked_mean():
    s = torch.randn(5, 7, generator=torch.Generator().manual_seed(14)).bfloat16()
    targets = torch.tensor([0, 3, 6, 2, 1])
    ce = cross_entropy(s, targets)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, -s.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0])
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_mean(x, mask, num_tokens=4).item() == 1.0
    out = masked_mean(x, torch.zeros_like(mask))
    assert out.item() == 0.0


def _chunked_inputs(seed, N=11, D=6, V=13, V_pad=0, K=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V + V_pad, D, generator=g, requires_grad=True)
    t_logp = (torch.randn(N, V, generator=g) * 2).log_softmax(-1)
    ids = t_logp.argsort(-1, descending=True)[:, :K]
    ids, lp = pad(ids, t_logp.gather(-1, ids), 2, seed)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    return hidden, w, ids, lp, targets, mask


def _unchunked(hidden, w, ids, lp, targets, mask, name, ce_weight, kd_weight, tau, **params):
    logits = hidden @ w.T
    ce = cross_entropy(logits, targets)
    if name == "ce":
        return masked_mean(ce, mask)
    return masked_mean(kd_weight * logits_loss(name, logits, ids, lp, tau, **params) + ce_weight * ce, mask)


@pytest.mark.parametrize("name,params", [("fkl", {}), ("jsd", {"beta": 0.3}), ("akl", {}), ("ce", {})])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
def test_chunked_equals_unchunked(name, params, chunk_size):
    hidden, w, ids, lp, targets, mask = _chunked_inputs(15)
    tau = torch.linspace(0.5, 2.0, 11)
    kw = dict(ce_weight=0.3, kd_weight=0.7, temperature=tau, **params)
    loss, stats = chunked_loss(hidden, w, ids, lp, targets, mask, name, chunk_size=chunk_size, **kw)
    g_hidden, g_w = torch.autograd.grad(loss, (hidden, w))
    ref = _unchunked(hidden, w, ids, lp, targets, mask, name, kw.pop("ce_weight"), kw.pop("kd_weight"),
                     kw.pop("temperature"), **params)
    r_hidden, r_w = torch.autograd.grad(ref, (hidden, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_hidden, r_hidden)
    torch.testing.assert_close(g_w, r_w)
    ce = masked_mean(cross_entropy(hidden @ w.T, targets), mask)
    torch.testing.assert_close(stats["ce_loss"], ce)
    assert not stats["ce_loss"].requires_grad and not stats["kd_loss"].requires_grad
    if name == "ce":
        torch.testing.assert_close(loss, ce)


def test_chunked_callable_and_scalar_temperature():
    hidden, w, ids, lp, targets, mask = _chunked_inputs(16)
    a, _ = chunked_loss(hidden, w, ids, lp, targets, mask, BUCKET_LOSSES["srkl"], temperature=2.0, chunk_size=5,
                        alpha=0.3)
    b = _unchunked(hidden, w, ids, lp, targets, mask, "srkl", 0.0, 1.0, 2.0, alpha=0.3)
    torch.testing.assert_close(a, b)


def test_chunked_padded_student_vocab_equals_slicing():
    hidden, w, ids, lp, targets, mask = _chunked_inputs(17, V_pad=3)
    loss, stats = chunked_loss(hidden, w, ids, lp, targets, mask, "rkl", ce_weight=0.5, chunk_size=4, vocab_size=13)
    g_w, = torch.autograd.grad(loss, w)
    w_sliced = w[:13].detach().requires_grad_(True)
    ref, ref_stats = chunked_loss(hidden, w_sliced, ids, lp, targets, mask, "rkl", ce_weight=0.5, chunk_size=4)
    r_w, = torch.autograd.grad(ref, w_sliced)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(stats["kd_loss"], ref_stats["kd_loss"])
    torch.testing.assert_close(g_w[:13], r_w)
    assert (g_w[13:] == 0).all()
    assert not torch.allclose(loss, chunked_loss(hidden, w, ids, lp, targets, mask, "rkl", ce_weight=0.5)[0])


@pytest.mark.parametrize("name", ["fkl", "rkl", "ce"])
def test_chunked_all_masked_is_zero(name):
    hidden, w, ids, lp, targets, mask = _chunked_inputs(18)
    lp[0] = float("-inf")
    loss, stats = chunked_loss(hidden, w, ids, lp, targets, torch.zeros_like(mask), name, ce_weight=1.0,
                               temperature=torch.full((11,), 0.5), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and stats["kd_loss"].item() == 0.0 and stats["ce_loss"].item() == 0.0
    assert torch.isfinite(hidden.grad).all() and (hidden.grad == 0).all() and (w.grad == 0).all()


def test_chunked_keeps_no_logits_for_backward():
    """Checkpointing: nothing of a chunk's (n, V) size is saved for backward; the logits are recomputed."""
    hidden, w, ids, lp, targets, mask = _chunked_inputs(20, N=32, V=400)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        loss, _ = chunked_loss(hidden, w, ids, lp, targets, mask, "akl", ce_weight=0.5, chunk_size=8,
                               temperature=torch.linspace(0.5, 2.0, 32))
    assert saved and max(saved) < 8 * 400
    loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd"])
def test_chunked_full_support_and_padding_ids_that_collide(name):
    """K = V (an empty tail) and padded slots whose ids repeat valid ids: still equal to the reference."""
    g = torch.Generator().manual_seed(21)
    N, D, V = 6, 5, 7
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    t_logp = (torch.randn(N, V, generator=g) * 2).log_softmax(-1)
    ids = t_logp.argsort(-1, descending=True)                                   # (N, V): all ids
    lp = t_logp.gather(-1, ids)
    ids = torch.cat([ids, ids[:, :2]], -1)                                      # 2 padded slots reuse valid ids
    lp = torch.cat([lp, torch.full((N, 2), float("-inf"))], -1)
    lp[0, 3:] = float("-inf")                                                    # a row with a live tail
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    loss, _ = chunked_loss(hidden, w, ids, lp, targets, mask, name, ce_weight=0.5, chunk_size=4)
    ref = _unchunked(hidden, w, ids, lp, targets, mask, name, 0.5, 1.0, 1.0)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, (hidden, w)), torch.autograd.grad(ref, (hidden, w))):
        torch.testing.assert_close(a, b)


def test_chunked_bf16_hidden_close_to_float32():
    hidden, w, ids, lp, targets, mask = _chunked_inputs(19, N=32, D=16, V=50, K=6)
    loss32, _ = chunked_loss(hidden, w, ids, lp, targets, mask, "fkl", ce_weight=0.2)
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    loss16, _ = chunked_loss(h16, w, ids, lp, targets, mask, "fkl", ce_weight=0.2)
    g16, gw16 = torch.autograd.grad(loss16, (h16, w))
    g32, gw32 = torch.autograd.grad(loss32, (hidden, w))
    assert g16.dtype == torch.bfloat16 and gw16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=0.05, atol=0.02)
    torch.testing.assert_close(gw16, gw32, rtol=0.1, atol=0.02)


def test_chunked_ignores_negative_targets_like_cross_entropy():
    hidden, w, ids, lp, targets, mask = _chunked_inputs(23)
    targets[::3] = -100
    loss, stats = chunked_loss(hidden, w, ids, lp, targets, mask, "ce", chunk_size=4)
    ref = masked_mean(cross_entropy(hidden @ w.T, targets), mask)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, (hidden, w)), torch.autograd.grad(ref, (hidden, w))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,params", ALL, ids=ids_of(ALL))
@pytest.mark.parametrize("tail", [-30.0, -120.0, -300.0, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_chunked_far_tail_equals_reference(name, params, tail, dtype):
    """A student tail far below the max is a live bucket with exact value and gradient: q_tail ~ 1e-13 (-30: the
    gradient on the K ids must not cancel two terms of size g_tail / q_tail), or 0 in float32 as exp(z - max)
    (below -103 nats)."""
    s, ids, lp, targets = far_tail_case(tail)
    for tau in (torch.tensor([0.6, 1.0, 1.7]), 1.0):
        (kd, ce, g), (ref_kd, ref_ce, ref_g) = chunked_and_reference(s.to(dtype), ids, lp, targets, name, params, tau)
        torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce, ref_ce)
        torch.testing.assert_close(g, ref_g)
        assert (kd >= -1e-6).all(), kd                                               # divergences: never negative
    if tail > -1e3:                                                                 # float64 can hold q_tail
        P, Q = ref_buckets(s.to(dtype), ids, lp)                                    # tau = 1: plain K+1 divergence
        torch.testing.assert_close(kd.double(), ref_div(name, P, Q, **params, tail_last=True), rtol=1e-5, atol=1e-6)
    if name == "fkl" and tail == -120.0 and dtype == torch.float32:                # the reproduction, row 0
        assert kd[0].item() == pytest.approx(34.987, abs=1e-3)
        # d fkl / dz_v = q_v - p_tail q_v / q_tail on the tail (+ CE's q_v ~ 0): -0.3 over the 6 tail ids
        torch.testing.assert_close(g[0, 2:], torch.full((6,), -0.05), rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), V=st.integers(2, 24), k_frac=st.floats(0.05, 1.0),
       gap=st.sampled_from([0.0, 30.0, 70.0, 120.0, 300.0, 1e4]), bf16=st.booleans(),
       tau=st.sampled_from([1.0, 0.5, "per-position"]), case=st.sampled_from(ALL))
def test_chunked_equals_reference_with_far_tails(seed, V, k_frac, gap, bf16, tau, case):
    """Student logits outside the teacher's ids pushed `gap` nats down: chunked_buckets == bucket_logprobs."""
    K = max(1, round(k_frac * V))
    _, ids, lp, s = teacher_and_student(seed, N=5, V=V, K=K, random_subset=seed % 2 == 0)
    ids, lp = pad(ids, lp, seed % 3, seed)
    s = torch.where(in_support(ids, lp, V), s, s - gap)                            # (N, V)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (5,), generator=g)
    targets[0] = -100
    if tau == "per-position":
        tau = torch.rand(5, generator=g) * 2 + 0.3
    logits = s.bfloat16() if bf16 else s
    (kd, ce, grad), (ref_kd, ref_ce, ref_grad) = chunked_and_reference(logits, ids, lp, targets, *case, tau)
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.isfinite(kd).all() and (kd >= -1e-5).all(), kd
