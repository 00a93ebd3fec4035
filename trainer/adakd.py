"""AdaKD building blocks: token difficulty, LATF focus, IDTS temperatures (papers.md §2, §5.4-5.5).

Xie et al., "LLM-Oriented Token-Adaptive Knowledge Distillation" (AAAI 2026). One difficulty score per position
(Hellinger distance between teacher and student, Eq. 3) drives two modules that wrap any loss of trainer.losses:
    LATF  keeps only the hardest fraction r of the valid positions (Eq. 4-5); r follows an EMA of the distillation
          loss (Eq. 6-7): shrink r while the loss clearly falls, grow it (capped at 1) while it clearly rises.
    IDTS  gives each selected position its own temperature, lower for harder ones (Eq. 9-10).
The temperatures go to the losses as a per-position (N,) tensor (decoupled head tempering, see trainer/losses.py);
the caller averages the loss over the selected positions only. docs/algorithms.md (AdaKD) lists our choices.
"""

import math
from dataclasses import dataclass

import torch

SCORE_EPS = 1e-12       # IDTS: scores (the median is one of them) are clamped to this before the log: no 0 / 0


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"AdaKD: {name}={value!r} is invalid, it must be {rule}")


def _check_latf(beta: float, eps: float, delta: float, min_ratio: float) -> None:
    _check("beta", beta, 0 < beta < 1, "in (0, 1)")
    _check("eps", eps, eps >= 0, ">= 0")
    _check("delta", delta, 0 < delta < 1, "in (0, 1)")
    _check("min_ratio", min_ratio, 0 < min_ratio <= 1, "in (0, 1]")


@dataclass(frozen=True)
class AdaKDConfig:
    """AdaKD options (defaults: the official scripts, papers.md §2.4); docs/algorithms.md (AdaKD) has the flags."""

    latf: bool = True               # token selection by difficulty (off: every valid position is distilled)
    idts: bool = True               # per-token temperatures (off: tau_base everywhere)
    tau_base: float = 1.0           # Eq. 10 base temperature
    c: float = 0.5                  # Eq. 10 intensity: tau in [tau_base e^-c, tau_base e^c]
    beta: float = 0.99              # Eq. 6 EMA decay
    eps: float = 0.05               # Eq. 7 tolerance
    delta: float = 0.05             # Eq. 7 multiplicative step of the ratio
    min_ratio: float = 0.1          # floor of the ratio (official code)
    warmup_fraction: float = 0.05   # fraction of the optimizer steps with r = 1 before LATF adapts

    def __post_init__(self):
        _check("tau_base", self.tau_base, 0 < self.tau_base < math.inf, "finite and > 0")
        _check("c", self.c, 0 <= self.c < math.inf, "finite and >= 0")
        _check_latf(self.beta, self.eps, self.delta, self.min_ratio)
        _check("warmup_fraction", self.warmup_fraction, 0 <= self.warmup_fraction < 1, "in [0, 1)")


@torch.no_grad()
def hellinger(lp, lq, live):
    """Hellinger distance on the K+1 buckets (Eq. 3, papers.md §5.4), detached float32 (N,) in [0, 1].

    lp, lq, live (N, K+1) from trainer.losses.chunked_buckets (or bucket_logprobs, its full-logits reference).
    s = sqrt(0.5 * sum (sqrt P - sqrt Q)^2) over live buckets, which equals sqrt(1 - BC) with BC = sum sqrt(P Q) on
    normalised buckets, but has no cancellation (exactly 0 when P == Q). A lower bound of the full-vocabulary
    distance, exact when K = V.
    """
    diff = torch.where(live, (0.5 * lp.float()).exp() - (0.5 * lq.float()).exp(), 0.0)    # (N, K+1)
    return (0.5 * diff.square().sum(-1)).sqrt().clamp_max(1.0)                        # (N,)


def select_hardest(scores, mask, ratio: float):
    """LATF selection (Eq. 5, Alg. 1 step 4): the top max(1, floor(n_valid * ratio)) masked positions by score.

    scores (N,) finite, mask (N,) bool, 0 < ratio <= 1 -> (N,) bool; all False when no position is valid. Ties go
    to the lower index (a stable sort instead of torch.topk, whose tie order is unspecified); the count stays on the
    device (no host sync).
    """
    _check("ratio", ratio, 0 < ratio <= 1, "in (0, 1]")
    order = torch.where(mask, scores.float(), -math.inf).sort(descending=True, stable=True).indices   # (N,)
    k = (mask.sum().double() * ratio).floor().clamp_min(1)                            # () as int(n * ratio) in python
    top = torch.arange(scores.shape[0], device=scores.device) < k                     # (N,) by rank
    return torch.zeros_like(mask).scatter(0, order, top) & mask


@torch.no_grad()
def idts_temperature(scores, selected, tau_base: float = 1.0, c: float = 0.5):
    """IDTS temperatures (Eq. 9-10), detached float32 (N,).

    tau_i = tau_base * exp(-c * tanh(log(s_i / m))), m the (lower, as torch.median) median of the scores of the
    selected positions. Harder than the median -> below tau_base, easier -> above, the median position exactly
    tau_base; range [tau_base e^-c, tau_base e^c]. Scores (so m too) are clamped to SCORE_EPS first, so zero scores
    give no NaN/inf. Positions not selected (unused by the loss) get tau_base.
    """
    s = scores.float().clamp_min(SCORE_EPS)                                           # (N,)
    n = selected.sum()
    ascending = torch.where(selected, s, math.inf).sort().values                      # (N,) selected first
    median = ascending.gather(0, ((n - 1) // 2).clamp_min(0).reshape(1))             # (1,) no host sync
    tau = tau_base * torch.exp(-c * torch.tanh(s.log() - median.log()))
    return torch.where(selected, tau, tau_base)


@dataclass
class LATF:
    """Loss-driven adaptive token focusing: the selection ratio r (Eq. 6-7, papers.md §2.3).

    Call update(loss, step) once per optimizer step with the distillation loss of that step (averaged over ranks and
    accumulation micro-batches); it returns the ratio for the next step. step counts optimizer steps from 1 (the
    official global_step): steps <= warmup_steps keep r; the first step after them sets ref to the EMA.
    """

    warmup_steps: int = 0
    beta: float = 0.99
    eps: float = 0.05
    delta: float = 0.05
    min_ratio: float = 0.1
    ratio: float = 1.0              # r, used for the next step
    ema: float | None = None        # Lbar (Eq. 6); None until the first loss
    ref: float | None = None        # L_ref (Eq. 7); None until warm-up ends

    def __post_init__(self):
        _check("warmup_steps", self.warmup_steps, isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               "an integer >= 0")
        _check_latf(self.beta, self.eps, self.delta, self.min_ratio)
        _check("ratio", self.ratio, self.min_ratio <= self.ratio <= 1, "in [min_ratio, 1]")

    @classmethod
    def from_config(cls, cfg: AdaKDConfig, total_steps: int) -> "LATF":
        """Warm-up = floor(warmup_fraction * total_steps), i.e. the official `step > fraction * total` test."""
        return cls(warmup_steps=math.floor(cfg.warmup_fraction * total_steps), beta=cfg.beta, eps=cfg.eps,
                   delta=cfg.delta, min_ratio=cfg.min_ratio)

    def update(self, loss: float, step: int) -> float:
        """Eq. 6 (the first loss is taken as is), then Eq. 7 after warm-up; returns the ratio for the next step."""
        loss = float(loss)
        _check("loss", loss, math.isfinite(loss), "finite")
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        if step <= self.warmup_steps:
            return self.ratio
        if self.ref is None:
            self.ref = self.ema
            return self.ratio
        ratio = self.ratio
        if self.ema < self.ref * (1 - self.eps):            # loss clearly fell: stable, focus on fewer tokens
            ratio = max(ratio * (1 - self.delta), self.min_ratio)
        elif self.ema > self.ref * (1 + self.eps):          # loss clearly rose: struggling, include easier tokens
            ratio = min(ratio * (1 + self.delta), 1.0)
        if ratio != self.ratio:
            self.ratio, self.ref = ratio, self.ema
        return self.ratio

    def state_dict(self) -> dict:
        """{"ratio", "ema", "ref"} as python floats (or None): exact through JSON."""
        return {"ratio": self.ratio, "ema": self.ema, "ref": self.ref}

    def load_state_dict(self, state: dict) -> None:
        as_float = lambda v: None if v is None else float(v)
        self.ratio, self.ema, self.ref = float(state["ratio"]), as_float(state["ema"]), as_float(state["ref"])


@torch.no_grad()
def adakd_token_weights(lp, lq, live, mask, ratio: float, cfg: AdaKDConfig):
    """Difficulty -> LATF selection -> IDTS temperature for one micro-batch, flattened to N positions.

    lp, lq, live (N, K+1) from chunked_buckets (or bucket_logprobs), mask (N,) bool (valid positions), ratio from
    LATF.
    Returns (selected (N,) bool, tau, stats). selected is `mask` when cfg.latf is off; tau is the (N,) float32 IDTS
    temperatures, or the float tau_base when cfg.idts is off (the losses' untempered fast path at 1): pass it to the
    loss as it is. The caller averages the KD loss over `selected` (Eq. 4).
    stats are detached 0-dim float32 tensors (one host sync for all of them): focus_ratio (the r used, 1 without
    LATF), selected_tokens, tau_mean / tau_min / tau_max over the selected positions (tau_base if none) and
    difficulty_mean over the valid positions (0 if none).
    """
    scores = hellinger(lp, lq, live)                                                  # (N,)
    selected = select_hardest(scores, mask, ratio) if cfg.latf else mask.clone()
    tau = idts_temperature(scores, selected, cfg.tau_base, cfg.c) if cfg.idts else cfg.tau_base   # (N,) or float
    n_sel, any_sel = selected.sum(), selected.any()
    tau_stat = lambda v: torch.where(any_sel, v, cfg.tau_base)
    stats = {
        "focus_ratio": scores.new_full((), ratio if cfg.latf else 1.0),
        "selected_tokens": n_sel.float(),
        "tau_mean": tau_stat(torch.where(selected, tau, 0.0).sum() / n_sel.clamp_min(1)),
        "tau_min": tau_stat(torch.where(selected, tau, math.inf).amin()),
        "tau_max": tau_stat(torch.where(selected, tau, -math.inf).amax()),
        "difficulty_mean": torch.where(mask, scores, 0.0).sum() / mask.sum().clamp_min(1),
    }
    return selected, tau, stats
