"""Domain samplers: the weights each batch's rows are drawn with (trainer.data.choose_domain does the draw).

A sampler has `weights` ({domain: w}), `maybe_update(step, measure) -> dict | None` called after every optimizer
step (`measure()` returns the current student's per-domain val losses; a sampler calls it only when it updates),
and a JSON-able `state_dict()` / `load_state_dict()` saved in checkpoints.
"""

from cache_format import Cache
from trainer.data import natural_weights, uniform_weights


class FixedSampler:
    """The same weights for the whole run: `natural` (each domain's share of tokens) or `uniform`."""

    def __init__(self, cache: Cache, kind: str):
        self.weights = {"natural": natural_weights, "uniform": uniform_weights}[kind](cache, "train")

    def maybe_update(self, step: int, measure) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = dict(state["weights"])
