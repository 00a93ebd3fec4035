"""DDK domain weights (Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient LLMs"; papers.md §1).

Per domain i, with CE = the mean token cross-entropy on the domain's validation rows (nats):
    l_S[i] / l_T[i] = exp(student_ce[i] - teacher_ce[i])              the perplexity ratio
    Eq. 1   r_0 = softmax(l_S / l_T)                                    initial domain discrepancy factor
    Eq. 2   psi = r_t * exp(l_S / l_T);  r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N

Both are computed in float64 as softmaxes with the max subtracted (Eq. 2 as softmax(log r_t + l_S / l_T)): a weak
student has ratios in the hundreds and a literal exp() overflows (papers.md §1.6). Pure numpy; arrays are (N,) in
the caller's domain order.
"""

import math

import numpy as np

MAX_LOG_PPL = 700.0     # exp(700) ~ 1e304: a perplexity or a ratio of two stays finite in float64 (and in JSON)


def perplexity(ce: float) -> float:
    """exp(mean token CE), capped at exp(MAX_LOG_PPL)."""
    return math.exp(min(ce, MAX_LOG_PPL))


def check_alpha(alpha: float) -> float:
    """alpha as a float; ValueError unless 0 <= alpha <= 1."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:   # also refuses NaN
        raise ValueError(f"DDK alpha must be in [0, 1] (0: uniform weights, 1: no uniform floor), got {alpha}")
    return alpha


def check_ce(student_ce, teacher_ce) -> tuple[np.ndarray, np.ndarray]:
    """Both CE vectors as float64 (N,) arrays; ValueError unless they are non-empty, 1-D, equally long and finite."""
    s = np.asarray(student_ce, dtype=np.float64)
    t = np.asarray(teacher_ce, dtype=np.float64)
    if s.ndim != 1 or t.ndim != 1 or len(s) == 0 or s.shape != t.shape:
        raise ValueError(f"student_ce and teacher_ce must be non-empty 1-D arrays of one length, "
                         f"got shapes {s.shape} and {t.shape}")
    for name, ce in (("student_ce", s), ("teacher_ce", t)):
        if not np.all(np.isfinite(ce)):
            raise ValueError(f"{name} must be finite, got {ce.tolist()}")
    return s, t


def check_weights(weights, n: int) -> np.ndarray:
    """weights as a float64 (n,) array; ValueError unless it is a distribution over n domains (sum 1 within 1e-6)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"domain weights must be a distribution over {n} domains (finite, >= 0, sum 1), "
                         f"got {w.tolist()}")
    return w


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def perplexity_ratio(student_ce, teacher_ce) -> np.ndarray:
    """l_S / l_T per domain = exp(student_ce - teacher_ce) (perplexity = exp(mean token CE)); (N,) float64.

    The log-ratio is capped at MAX_LOG_PPL so the ratio stays finite."""
    s, t = check_ce(student_ce, teacher_ce)
    return np.exp(np.minimum(s - t, MAX_LOG_PPL))


def initial_weights(student_ce, teacher_ce) -> np.ndarray:
    """Eq. 1: r_0 = softmax(l_S / l_T), max subtracted, float64; (N,) summing to 1."""
    return _softmax(perplexity_ratio(student_ce, teacher_ce))


def update_weights(weights, student_ce, teacher_ce, alpha: float) -> np.ndarray:
    """Eq. 2: r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N with psi = r_t * exp(l_S / l_T).

    psi / sum(psi) is computed as softmax(log r_t + l_S / l_T) in float64. Every domain keeps at least (1 - alpha) / N;
    once r_t itself came from Eq. 2, no weight moves by more than alpha in one update."""
    alpha = check_alpha(alpha)
    ratio = perplexity_ratio(student_ce, teacher_ce)
    r = check_weights(weights, len(ratio))
    with np.errstate(divide="ignore"):     # a zero weight (alpha = 1, or straight from Eq. 1) stays zero: log 0 = -inf
        psi = _softmax(np.log(r) + ratio)
    return alpha * psi + (1.0 - alpha) / len(r)


def ddk_interval(steps: int, interval: int | None = None, updates: int = 30) -> int:
    """The DDK update interval K in steps (Alg. 1): `interval` if given, else max(1, steps // updates).

    The paper uses K = 1000 of ~30,000 steps, i.e. 30 updates per run; the default keeps that count for any run length.
    """
    if interval is not None:
        if interval < 1:
            raise ValueError(f"DDK interval K must be >= 1, got {interval}")
        return int(interval)
    if updates < 1:
        raise ValueError(f"DDK updates per run must be >= 1, got {updates}")
    return max(1, int(steps) // updates)


class DDKWeights:
    """The current DDK sampling weights over named domains, updated with Eq. 2; JSON-able state for checkpoints.

    domains: names, in the order of `weights`; weights: (N,) float64 distribution; alpha: Eq. 2's smoothing;
    updates: Eq. 2 steps applied so far; ratios: {domain: l_S / l_T} from the last measurement ({} if none).
    """

    def __init__(self, domains: list[str], weights, alpha: float = 0.5, updates: int = 0,
                 ratios: dict[str, float] | None = None):
        if len(domains) == 0 or len(set(domains)) != len(domains):
            raise ValueError(f"DDK needs a non-empty list of distinct domains, got {list(domains)}")
        self.domains = list(domains)
        self.weights = check_weights(weights, len(self.domains))
        self.alpha = check_alpha(alpha)
        self.updates = int(updates)
        self.ratios = dict(ratios or {})

    @classmethod
    def from_ce(cls, student_ce: dict[str, float], teacher_ce: dict[str, float], alpha: float = 0.5) -> "DDKWeights":
        """Eq. 1 from measured per-domain CEs; domains in sorted order."""
        domains = sorted(student_ce)
        s, t = _vectors(domains, student_ce, teacher_ce)
        ratio = perplexity_ratio(s, t)
        return cls(domains, _softmax(ratio), alpha, ratios=dict(zip(domains, ratio.tolist())))

    @classmethod
    def from_weights(cls, weights: dict[str, float], alpha: float = 0.5) -> "DDKWeights":
        """Given initial weights {domain: w} (e.g. a profile.json's); domains in sorted order."""
        domains = sorted(weights)
        return cls(domains, [weights[d] for d in domains], alpha)

    def update(self, student_ce: dict[str, float], teacher_ce: dict[str, float]) -> np.ndarray:
        """Apply Eq. 2 with freshly measured CEs ({domain: nats}, every domain present); returns the new weights."""
        s, t = _vectors(self.domains, student_ce, teacher_ce)
        self.weights = update_weights(self.weights, s, t, self.alpha)
        self.ratios = dict(zip(self.domains, perplexity_ratio(s, t).tolist()))
        self.updates += 1
        return self.weights

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.domains, self.weights.tolist()))

    def state_dict(self) -> dict:
        """Plain python (floats round-trip exactly through json)."""
        return {"domains": list(self.domains), "alpha": self.alpha, "weights": self.weights.tolist(),
                "updates": self.updates, "ratios": dict(self.ratios)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; ValueError if it was saved for other domains."""
        if list(state["domains"]) != self.domains:
            raise ValueError(f"DDK state is for domains {list(state['domains'])}, expected {self.domains}")
        self.weights = check_weights(state["weights"], len(self.domains))
        self.alpha = check_alpha(state["alpha"])
        self.updates = int(state["updates"])
        self.ratios = {d: float(r) for d, r in state["ratios"].items()}


def _vectors(domains: list[str], student_ce: dict[str, float], teacher_ce: dict[str, float]):
    """(N,) float64 CE arrays in `domains` order; ValueError naming the domains if either dict has other keys."""
    for name, ce in (("student_ce", student_ce), ("teacher_ce", teacher_ce)):
        if set(ce) != set(domains):
            raise ValueError(f"{name} has domains {sorted(ce)}, expected {sorted(domains)}")
    return check_ce([student_ce[d] for d in domains], [teacher_ce[d] for d in domains])
