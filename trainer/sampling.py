"""Domain samplers: the weights each batch's rows are drawn with (trainer.data.choose_domain does the draw).

A sampler has `weights` ({domain: w}); `start(measure)` before the first step and `maybe_update(step, measure)`
after every optimizer step, each returning extra metrics (or None); and a JSON-able `state_dict()` /
`load_state_dict()` saved in checkpoints. `measure()` returns trainer.evaluate.evaluate's report for the current
student on the val split; a sampler calls it only when it needs the gaps.
"""

from cache_format import Cache
from trainer.data import natural_weights, uniform_weights
from trainer.ddk import DDKWeights
from trainer.profile import profile_domains


class FixedSampler:
    """The same weights for the whole run: `natural` (each domain's share of tokens) or `uniform`."""

    def __init__(self, cache: Cache, kind: str):
        self.weights = {"natural": natural_weights, "uniform": uniform_weights}[kind](cache, "train")

    def start(self, measure) -> dict | None:
        return None

    def maybe_update(self, step: int, measure) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = dict(state["weights"])


class DDKSampler:
    """DDK's domain-knowledge-guided sampling (Alg. 1 of Liu et al. 2024): rows are drawn with the discrepancy
    factor r_t; every `interval` steps the student's val CE per domain is re-measured (the teacher's comes from the
    cache) and r_t is updated with Eq. 2 (factor smooth updating, `alpha`). r_0 is Eq. 1 on a measurement before
    the first step, or the weights of a profile.json (`initial`)."""

    def __init__(self, cache: Cache, alpha: float, interval: int, initial: dict[str, float] | None = None):
        self.domains = profile_domains(cache, "val")
        self.alpha, self.interval = alpha, interval
        self.state = DDKWeights.from_weights(initial, alpha) if initial else None

    @property
    def weights(self) -> dict[str, float]:
        return self.state.as_dict()

    def start(self, measure) -> dict | None:
        if self.state is not None:                  # from a profile.json
            return {"ddk_updates": 0}
        student_ce, teacher_ce = _gaps(measure(), self.domains)
        self.state = DDKWeights.from_ce(student_ce, teacher_ce, self.alpha)                        # Eq. 1
        return {"ddk_ratio": self.state.ratios, "ddk_updates": 0}

    def maybe_update(self, step: int, measure) -> dict | None:
        if step % self.interval:
            return None
        self.state.update(*_gaps(measure(), self.domains))                                         # Eq. 2
        return {"ddk_ratio": self.state.ratios, "ddk_updates": self.state.updates}

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = DDKWeights(state["domains"], state["weights"], self.alpha)
        self.state.load_state_dict(state)


def _gaps(report: dict, domains: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """({domain: student CE}, {domain: teacher CE}) from an evaluate() report."""
    return ({d: report["domains"][d]["student_ce"] for d in domains},
            {d: report["domains"][d]["teacher_ce"] for d in domains})
