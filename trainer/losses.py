"""Distillation losses on a sparse teacher: top-K cached ids plus one tail bucket (DESIGN.md, papers.md §4-5).

Bucket projection. The cache holds the teacher's log-probs on K ids S (padded slots are -inf). Every divergence is
computed on K+1 buckets, the K ids plus the tail V \\ S:
    teacher  P = (p_1..p_K, p_tail),  p_tail = 1 - sum_k p_k      (from logsumexp, clamped; see bucket_logprobs)
    student  Q = (q_1..q_K, q_tail),  log q_tail = logsumexp(z over V \\ S) - logsumexp(z over V)
For f-divergences the bucketed value is a lower bound of the full-vocabulary one (data processing) and equals it
when K = V. All arithmetic is float32 in log space; dead buckets (padded slots, an empty tail) are masked out.

Temperature (papers.md §5.5, option 1, "decoupled"). The cache cannot temper the tail, so tau only reshapes the
head: P^tau = (P_S * softmax(log p_S / tau), p_tail) keeps the head mass P_S and the tail mass; Q^tau likewise.
Every loss D is
    L_tau = tau^2 * D(P^tau || Q^tau) + (1 - tau^2) * D_bin,   D_bin = D([P_S, p_tail] || [Q_S, q_tail]),
i.e. the untempered binary (head vs tail) term plus tau^2 times the rest. By the KL chain rule this is the note's
    fkl: D_bin + P_S * tau^2 * KL(p^tau(.|S) || q^tau(.|S)),   rkl: D_bin + Q_S * tau^2 * KL(q^tau(.|S) || p^tau(.|S));
jsd / sfkl / srkl (KLs to a mixture) get the chain-rule conditional term of each KL with the mixture's conditional
on S, and tvd the excess TVD(P^tau, Q^tau) - TVD_bin. That excess is >= 0 for any f-divergence (both pairs project
onto the same binary pair), so L_tau >= 0. akl mixes the tempered fkl and rkl with weights from (P^tau, Q^tau).
At tau == 1 (float or per-position tensor) every loss is exactly the plain K+1 bucket divergence; L_tau is
continuous in tau. tau_squared=False gives D(P^tau || Q^tau) itself (no tau^2 weight, no binary correction).

Sampled caches (Random-Sampling KD: p_hat = c / N, no tail mass): only fkl is unbiased there, at tau = 1
(check_sampled_targets).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cache_format import KdcacheError

NEG_INF = float("-inf")
TINY = torch.finfo(torch.float32).tiny
FAR_TAIL = -64.0        # nats: a tail max further below the row max gets its own shift (_StudentBuckets)


def bucket_logprobs(student_logits, topk_ids, topk_logprobs):
    """Teacher and student log-probs on the K+1 buckets (K cached ids, then the tail), float32.

    Returns (lp, lq, live), each (N, K+1). `live` marks buckets that exist: valid (finite) slots, and the tail
    unless the valid ids cover the whole vocabulary; dead buckets hold 0 and must be masked by the caller.
    The teacher's head is renormalised if rounding (e.g. bf16 log-probs) pushed its mass above 1, or away from 1
    when the tail is empty, and a live tail gets at least float32's smallest normal mass so that reverse-style
    terms stay finite. The student's tail is a logsumexp over its own logits, exact however far below the max
    they lie. This is the reference form on full logits; chunked_buckets computes the same from hidden states
    without keeping (N, V) logits.
    """
    z = student_logits.float()                                                      # (N, V)
    ids = topk_ids.long()                                                           # (N, K)
    valid = topk_logprobs != NEG_INF                                                # (N, K)
    in_s = z.new_zeros(z.shape).scatter_add(-1, ids, valid.float()) > 0            # (N, V) only valid slots mask
    log_z = z.logsumexp(-1, keepdim=True)                                           # (N, 1)
    lq_tail = torch.where(in_s, NEG_INF, z).logsumexp(-1, keepdim=True) - log_z     # (N, 1)
    lq = torch.cat([z.gather(-1, ids) - log_z, lq_tail], -1)                        # (N, K+1)
    lp, live = _teacher_buckets(topk_logprobs, ~in_s.all(-1))
    return lp, torch.where(live, lq, 0.0), live


def _teacher_buckets(topk_logprobs, tail_live):
    """(lp, live) each (N, K+1): the teacher's K cached log-probs plus its tail bucket; dead buckets hold 0."""
    lt = topk_logprobs.float()                                                      # (N, K)
    valid = lt != NEG_INF                                                           # (N, K)
    log_head = torch.where(valid, lt, NEG_INF).logsumexp(-1, keepdim=True)         # (N, 1) log sum_k p_k
    p_tail = (-torch.expm1(log_head)).clamp_min(TINY)                               # (N, 1)
    norm = torch.where(tail_live.reshape(-1, 1), log_head.clamp_min(0), log_head)   # (N, 1) no tail: head sums to 1
    lp = torch.cat([lt - norm, p_tail.log()], -1)                                   # (N, K+1)
    live = torch.cat([valid, tail_live.reshape(-1, 1)], -1)                         # (N, K+1)
    return torch.where(live, lp, 0.0), live


# Divergences on live buckets: (lp, lq, live) each (N, B) -> (N,).

def _kl(la, lb, live):
    """KL(a || b) = sum a (log a - log b) over live buckets."""
    return torch.where(live, la.exp() * (la - lb), 0.0).sum(-1)


def _log_mix(la, lb, w):
    """log(w * a + (1 - w) * b), with the end points exact."""
    if w == 0:
        return lb
    if w == 1:
        return la
    return torch.logaddexp(math.log(w) + la, math.log1p(-w) + lb)


def _fkl(lp, lq, live):
    """Forward KL(p || q)."""
    return _kl(lp, lq, live)


def _rkl(lp, lq, live):
    """Reverse KL(q || p)."""
    return _kl(lq, lp, live)


def _jsd(lp, lq, live, beta=0.5):
    """Generalised JSD, TRL GKD convention: m = beta p + (1-beta) q; beta KL(p||m) + (1-beta) KL(q||m); 0 fkl, 1 rkl."""
    if beta == 0:
        return _fkl(lp, lq, live)
    if beta == 1:
        return _rkl(lp, lq, live)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl(lp, lm, live) + (1 - beta) * _kl(lq, lm, live)


def _sfkl(lp, lq, live, alpha=0.1):
    """Skew forward KL (DistiLLM): KL(p || alpha p + (1-alpha) q)."""
    return _kl(lp, _log_mix(lp, lq, alpha), live)


def _srkl(lp, lq, live, alpha=0.1):
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1-alpha) p)."""
    return _kl(lq, _log_mix(lq, lp, alpha), live)


def _tvd(lp, lq, live):
    """Total variation 0.5 sum |p - q|."""
    return 0.5 * torch.where(live, (lp.exp() - lq.exp()).abs(), 0.0).sum(-1)


@torch.no_grad()
def _akl_head_weight(lp, lq, live, mu):
    """AKL's g_head / (g_head + g_tail) on the buckets (0.5 where p == q).

    Head = cached ids in decreasing teacher order whose inclusive cumulative mass is <= mu, plus the top-1. The
    tail bucket always ranks last (each of its tokens is below every cached id), so it is always in the tail group.
    """
    err = torch.where(live, (lp.exp() - lq.exp()).abs(), 0.0)                       # (N, K+1)
    p_sorted, order = torch.where(live, lp.exp(), 0.0)[:, :-1].sort(-1, descending=True)  # (N, K)
    in_head = p_sorted.cumsum(-1) <= mu                                             # (N, K)
    in_head[:, 0] = True
    g_head = torch.where(in_head, err[:, :-1].gather(-1, order), 0.0).sum(-1)      # (N,)
    g = err.sum(-1)                                                                 # (N,)
    return torch.where(g > 0, g_head / torch.where(g > 0, g, 1.0), 0.5)


# Temperature.

def _tau(temperature, like):
    """None for the scalar 1 (no tempering), else a float32 (N,) tensor."""
    if not torch.is_tensor(temperature) and temperature == 1:
        return None
    return torch.as_tensor(temperature, dtype=torch.float32, device=like.device).reshape(-1).expand(like.shape[0])


def _log_head_mass(l, live):
    """log of the total mass on the cached ids, (N, 1)."""
    return torch.where(live[:, :-1], l[:, :-1], NEG_INF).logsumexp(-1, keepdim=True)


def _temper(l, live, tau):
    """Buckets with the head reshaped to softmax(log p_S / tau), head and tail masses kept; exact l where tau == 1."""
    if tau is None:
        return l
    head = live[:, :-1]                                                             # (N, K)
    x = torch.where(head, l[:, :-1] / tau[:, None], NEG_INF)                        # (N, K)
    l_head = torch.where(head, x.log_softmax(-1) + _log_head_mass(l, live), 0.0)    # (N, K)
    return torch.where((tau == 1)[:, None], l, torch.cat([l_head, l[:, -1:]], -1))


def _binary(lp, lq, live):
    """The (head, tail) pair of bucket distributions: (lp2, lq2, live2), each (N, 2)."""
    live2 = torch.stack([live[:, :-1].any(-1), live[:, -1]], -1)                    # (N, 2)
    pair = lambda l: torch.where(live2, torch.cat([_log_head_mass(l, live), l[:, -1:]], -1), 0.0)
    return pair(lp), pair(lq), live2


def _decoupled(div, lp, lq, live, tau, tau_squared=True, **params):
    """tau^2 * D(P^tau || Q^tau) + (1 - tau^2) * D_binary; the plain D when tau is None or 1.

    tau_squared=False drops Hinton's tau^2 weight: D(P^tau || Q^tau) itself (the weight-1 case of the same form).
    """
    if tau is None:
        return div(lp, lq, live, **params)
    tempered = div(_temper(lp, live, tau), _temper(lq, live, tau), live, **params)
    if not tau_squared:
        return tempered
    t2 = tau**2
    return t2 * tempered + (1 - t2) * div(*_binary(lp, lq, live), **params)


# Bucket losses: (lp, lq, live) each (N, K+1), temperature (float or (N,)) -> (N,). Public: BUCKET_LOSSES.

def _bucket(div):
    def loss(lp, lq, live, temperature=1.0, tau_squared=True, **params):
        return _decoupled(div, lp, lq, live, _tau(temperature, lp), tau_squared, **params)
    loss.__name__, loss.__doc__ = div.__name__.lstrip("_"), div.__doc__
    return loss


def _akl(lp, lq, live, temperature=1.0, tau_squared=True, mu=0.5):
    """Adaptive KL (Wu et al. 2024): w_head FKL + w_tail RKL, weights g_head/g, g_tail/g without gradient."""
    tau = _tau(temperature, lp)
    w = _akl_head_weight(_temper(lp, live, tau), _temper(lq, live, tau), live, mu)   # (N,)
    return w * _decoupled(_fkl, lp, lq, live, tau, tau_squared) + (1 - w) * _decoupled(_rkl, lp, lq, live, tau,
                                                                                       tau_squared)


BUCKET_LOSSES: dict[str, Callable] = {"fkl": _bucket(_fkl), "rkl": _bucket(_rkl), "jsd": _bucket(_jsd),
                                      "sfkl": _bucket(_sfkl), "srkl": _bucket(_srkl), "tvd": _bucket(_tvd),
                                      "akl": _akl}


def logits_loss(name, student_logits, topk_ids, topk_logprobs, temperature=1.0, **params):
    """BUCKET_LOSSES[name] on full student logits: (N, V), topk_ids (N, K), topk_logprobs (N, K) -> (N,) float32.

    The reference form, holding the (N, V) logits; chunked_loss computes the same from hidden states."""
    return BUCKET_LOSSES[name](*bucket_logprobs(student_logits, topk_ids, topk_logprobs), temperature, **params)


def check_sampled_targets(codec: dict, loss: str, temperature, adakd: bool = False) -> None:
    """Refuse what a sampled cache (codec targets "sampled", Random-Sampling KD) cannot estimate without bias.

    Such a cache holds p_hat_i = c_i / N for the distinct ids of N draws from the teacher; the tail bucket is then
    empty (p_tail = 0). Since E[c_i / N] = p_i, fkl on these buckets, sum_i p_hat_i (log p_hat_i - log q_i), has
    the expected gradient of the full-vocabulary KL(p || q) (its expected value is KL(p || q) plus the
    student-independent H(p) - E[H(p_hat)] >= 0); tests/trainer/test_sampled_targets.py checks it. Every other
    loss, tempering the teacher, and AdaKD's difficulty are nonlinear in p_hat: biased, so refused.
    """
    if codec.get("targets") != "sampled":
        return
    if loss not in ("fkl", "ce"):
        raise KdcacheError(f"--loss {loss}: the cache holds sampled targets, on which only fkl (or ce) is unbiased")
    if (torch.is_tensor(temperature) or temperature != 1) and loss != "ce":
        raise KdcacheError(f"--temperature {temperature}: the cache holds sampled targets; use temperature 1")
    if adakd:
        raise KdcacheError("--adakd: the cache holds sampled targets; AdaKD's difficulty and temperatures would be "
                           "biased on them")


def cross_entropy(student_logits, targets):
    """Per-position cross-entropy with the actual next tokens, float32 (N,); targets of -100 give 0."""
    return F.cross_entropy(student_logits.float(), targets.long(), reduction="none")


def masked_mean(per_token, mask, num_tokens=None):
    """Sum of per_token where mask is True, over mask.sum() (or num_tokens), at least 1: all-masked gives 0."""
    total = torch.where(mask, per_token.float(), 0.0).sum()
    count = mask.sum() if num_tokens is None else num_tokens
    return total / torch.as_tensor(count, device=total.device).clamp_min(1)


class _StudentBuckets(torch.autograd.Function):
    """Fused lm_head + student bucket projection + CE for one chunk of positions; the (n, V) logits live only
    inside forward and backward (recomputed there), never between them.

    forward(h (n, D), w (V, D), ids (n, K), valid (n, K), targets (n,)) -> (lq (n, K+1), ce (n,), tail_live (n,));
    a target of -100 (or any negative) gives ce 0 and no gradient, like cross_entropy's ignore_index;
    lq = log-probs of the K ids (0 where not valid) and of the tail (0 where the tail is empty); matmuls in h's dtype.
    The tail is live unless the valid ids (distinct) cover all V rows of w, as in bucket_logprobs. Its log-sum
    lt = logsumexp(z over V \\ S) is exact however far below the max the tail lies: a row whose tail max is more than
    -FAR_TAIL nats below its max (there exp(z - max) is subnormal or 0 on the whole tail) shifts the exponentials by
    the tail max and gets log Z = logaddexp(logsumexp(z_S), lt); other rows shift by the row max, as before.
    Backward, with q = softmax(z), G = sum_k g_k, q_tail the tail mass and a = g_ce - G - g_tail:
        dz_v = q_v a + [v not in S] q_v g_tail / q_tail + [v = s_k] g_k - [v = target] g_ce
    computed as exp(z_v - lt) (g_tail + a q_tail) on V \\ S (q_v / q_tail relative to the tail's own log-sum) and
    q_k a + g_k on the K ids: no underflow of q_v, and no cancellation of two O(g_tail / q_tail) terms on S.
    """

    @staticmethod
    def forward(ctx, h, w, ids, valid, targets):
        w_c = w.to(h.dtype)
        z = (h @ w_c.T).float()                                                     # (n, V)
        z_s, z_t = z.gather(-1, ids), z.gather(-1, targets.clamp_min(0)[:, None])[:, 0]  # (n, K), (n,)
        tail_live = valid.sum(-1) < z.shape[1]                                      # (n,) valid ids are distinct
        m = z.amax(-1, keepdim=True)                                                # (n, 1)
        z.scatter_reduce_(-1, ids, torch.where(valid, NEG_INF, math.inf), "amin")   # valid ids -> -inf
        m_tail = z.amax(-1, keepdim=True)                                           # (n, 1) max over V \ S
        far = tail_live[:, None] & (m_tail < m + FAR_TAIL)                          # (n, 1)
        z.scatter_reduce_(-1, ids, torch.where(valid & ~far, z_s, NEG_INF), "amax")  # restore S, not in far rows
        shift = torch.where(far, m_tail, m)                                         # (n, 1)
        e = z.sub_(shift).exp_()                                                    # (n, V) in place: exp(z - shift)
        log_sum = e.sum(-1).log()                                                   # (n,) far rows: the tail only
        e.scatter_reduce_(-1, ids, (~valid).float(), "prod")                        # zero the valid ids only
        log_tail = e.sum(-1).log()                                                  # (n,) -inf when empty
        del z, e
        far, shift = far[:, 0], shift[:, 0]
        lt = shift + log_tail                                                       # (n,) logsumexp over V \ S
        log_z = torch.where(far, torch.logaddexp(torch.where(valid, z_s, NEG_INF).logsumexp(-1), lt),
                            shift + log_sum)                                        # (n,)
        lq_tail = torch.where(far, lt - log_z, log_tail - log_sum)                  # (n,)
        lq = torch.cat([torch.where(valid, z_s - log_z[:, None], 0.0),
                        torch.where(tail_live, lq_tail, 0.0)[:, None]], -1)         # (n, K+1)
        ctx.save_for_backward(h, w, ids, valid, targets, lq, tail_live, lt)
        ctx.mark_non_differentiable(tail_live)
        return lq, torch.where(targets >= 0, log_z - z_t, 0.0), tail_live         # target -100: no CE

    @staticmethod
    def backward(ctx, g_lq, g_ce, _):
        h, w, ids, valid, targets, lq, tail_live, lt = ctx.saved_tensors
        K = ids.shape[1]
        g_head = torch.where(valid, g_lq[:, :K], 0.0)                              # (n, K)
        g_ce = torch.where(targets >= 0, g_ce, 0.0)                                 # (n,)
        g_tail = torch.where(tail_live, g_lq[:, K], 0.0)                           # (n,)
        a = g_ce - g_head.sum(-1) - g_tail                                          # (n,)
        q_s = torch.where(valid, lq[:, :K].exp(), 0.0)                              # (n, K)
        q_tail = torch.where(tail_live, lq[:, K].exp(), 0.0)                        # (n,)
        w_c = w.to(h.dtype)
        z = (h @ w_c.T).float()                                                     # (n, V) recomputed
        z.scatter_reduce_(-1, ids, torch.where(valid, NEG_INF, math.inf), "amin")   # valid ids -> -inf
        dz = z.sub_(torch.where(tail_live, lt, 0.0)[:, None]).exp_()                # (n, V) q_v / q_tail, 0 on S
        dz.mul_((g_tail + a * q_tail)[:, None])                                     # the tail ids done
        dz.scatter_add_(-1, ids, g_head + q_s * a[:, None])                         # the K ids (0 for padded slots)
        dz.scatter_add_(-1, targets.clamp_min(0)[:, None], -g_ce[:, None])
        dz = dz.to(h.dtype)
        return dz @ w_c, (dz.T @ h).to(w.dtype), None, None, None


def chunked_buckets(hidden, lm_head_weight, topk_ids, topk_logprobs, targets, chunk_size=1024, vocab_size=None,
                    buckets=True):
    """The teacher's and student's K+1 bucket log-probs and the student's CE without (N, V) logits at once.

    hidden (N, D), lm_head_weight (V', D) sliced to its first vocab_size rows (padding rows ignored), topk_* (N, K)
    (ids distinct among valid slots), targets (N,). Per chunk of positions a fused autograd function computes the
    logits, keeps only (chunk, K+1) buckets and CE, and recomputes the logits in backward. Returns
    ((lp, lq, live) each (N, K+1), or None when buckets=False; ce (N,)): every BUCKET_LOSSES entry and AdaKD's
    difficulty then cost (N, K+1) memory, not (N, V). Equals bucket_logprobs + cross_entropy on full logits.
    """
    w = lm_head_weight if vocab_size is None else lm_head_weight[:vocab_size]      # (V, D)
    ids = topk_ids.long() if buckets else topk_ids[:, :0].long()                    # (N, K) or (N, 0): CE only
    valid = topk_logprobs[:, :ids.shape[1]] != NEG_INF                              # (N, K)
    lq, ce, tail_live = (torch.cat(x) for x in zip(*(
        _StudentBuckets.apply(hidden[s:s + chunk_size], w, ids[s:s + chunk_size], valid[s:s + chunk_size],
                              targets[s:s + chunk_size].long())
        for s in range(0, hidden.shape[0], chunk_size))))
    if not buckets:
        return None, ce
    lp, live = _teacher_buckets(topk_logprobs, tail_live)
    return (lp, lq, live), ce


def chunked_loss(hidden, lm_head_weight, topk_ids, topk_logprobs, targets, mask, loss_fn, ce_weight=0.0,
                 kd_weight=1.0, temperature=1.0, chunk_size=1024, vocab_size=None, **params):
    """Masked mean of kd_weight * KD + ce_weight * CE without holding all (N, V) logits at once.

    hidden (N, D), lm_head_weight (V', D) sliced to its first vocab_size rows, topk_* (N, K), targets and mask (N,),
    temperature a float or (N,). loss_fn is a BUCKET_LOSSES name, a bucket-loss callable
    (lp, lq, live, temperature, **params) -> (N,), or "ce" (CE only). See chunked_buckets for the memory.
    Returns (loss, {"kd_loss", "ce_loss"}): the stats are detached masked means, as tensors.
    """
    if loss_fn == "ce":
        _, ce = chunked_buckets(hidden, lm_head_weight, topk_ids, topk_logprobs, targets, chunk_size, vocab_size,
                                buckets=False)
        kd, kd_weight, ce_weight = torch.zeros_like(ce), 0.0, 1.0
    else:
        kd_fn = BUCKET_LOSSES[loss_fn] if isinstance(loss_fn, str) else loss_fn
        buckets, ce = chunked_buckets(hidden, lm_head_weight, topk_ids, topk_logprobs, targets, chunk_size,
                                      vocab_size)
        kd = kd_fn(*buckets, temperature, **params)                                 # (N,)
    loss, kd_loss, ce_loss, _ = kd_ce_objective(kd, ce, mask, mask, kd_weight, ce_weight)
    return loss, {"kd_loss": kd_loss, "ce_loss": ce_loss}


def kd_ce_objective(kd, ce, kd_mask, mask, kd_weight: float, ce_weight: float):
    """The training objective, kd_weight * mean of kd over kd_mask + ce_weight * mean of ce over mask (DDK's Eq. 3
    with kd_weight = gamma; AdaKD's Eq. 4 with kd_mask = LATF's selection). kd, ce, kd_mask, mask (N,).
    Returns (loss, kd_loss, ce_loss, per_position (N,)): the two means and per_position, each position's share
    kd_weight * kd + ce_weight * ce over its masks, detached (per-row and per-domain statistics)."""
    kd_loss, ce_loss = masked_mean(kd, kd_mask), masked_mean(ce, mask)
    loss = kd_weight * kd_loss + ce_weight * ce_loss
    per_position = kd_weight * torch.where(kd_mask, kd, 0.0) + ce_weight * torch.where(mask, ce, 0.0)
    return loss, kd_loss.detach(), ce_loss.detach(), per_position.detach()


def chunk_likelihood_kl(ce, chunk_id, chunk_logprob):
    """Cross-tokenizer distillation of unaligned chunks (trainer/cross_tokenizer.py): at each chunk's last
    position, the Bernoulli KL(p || q) between the teacher's probability p of the chunk's text (exp chunk_logprob)
    and the student's q (the product of its probabilities of the chunk's tokens, exp -sum ce). Zero iff q = p.
    ce (N,) the student's CE at each position; chunk_id (N,) int64, the chunk (unique in the batch) a position's
    next token is in, -1 none; chunk_logprob (N,) NaN except at a chunk's last position.
    Returns (per-position KL (N,), 0 off the last positions; the last positions (N,) bool)."""
    inside = chunk_id >= 0
    index = torch.where(inside, chunk_id, 0)
    lq_chunk = torch.zeros_like(ce, dtype=torch.float32).index_add(0, index, torch.where(inside, -ce.float(), 0.0))
    last = ~torch.isnan(chunk_logprob)                                           # (N,)
    lp = torch.where(last, chunk_logprob.float(), -1.0).clamp(max=-1e-6)         # (N,) log p < 0
    lq = torch.where(last, lq_chunk[index], -1.0).clamp(max=-1e-6)               # (N,) log q < 0
    p = lp.exp()
    kl = p * (lp - lq) + (1 - p) * (torch.log(-torch.expm1(lp)) - torch.log(-torch.expm1(lq)))
    return torch.where(last, kl, 0.0), last
