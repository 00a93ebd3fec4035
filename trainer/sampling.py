"""Domain samplers: the weights each batch's rows are drawn with (trainer.data.choose_domain does the draw).

A sampler has `weights` ({domain: w}); `start(measure)` before the first step and `maybe_update(step, measure)`
after every optimizer step, each returning extra metrics (or None); and a JSON-able `state_dict()` /
`load_state_dict()` saved in checkpoints. `measure()` returns trainer.evaluate.evaluate's report for the current
student on the val split; a sampler calls it only when it needs the gaps.
"""

import json
from pathlib import Path

from cache_format import Cache, KdcacheError, weights_fingerprint
from trainer.data import natural_weights, uniform_weights
from trainer.ddk import DDKWeights, check_weights

KIND, VERSION = "kdcache-profile", 1          # profile.json, written by `kdcache profile`
VAL_HINT = "DDK needs val data per domain: capture with --val-fraction > 0"


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


def profile_domains(cache: Cache, split: str) -> list[str]:
    """The domains DDK weights: the train split's (those training samples from), each of which must have `split`
    rows; a cache without train rows is profiled over the split's own domains."""
    have = cache.domains(split)
    if not have:
        raise KdcacheError(f"{cache.root}: split {split!r} has no rows; {VAL_HINT}")
    train = cache.domains("train")
    missing = [d for d in train if d not in have]
    if missing:
        raise KdcacheError(f"{cache.root}: train domain(s) {', '.join(missing)} have no {split!r} rows; {VAL_HINT}")
    return train or have


def student_fingerprint(path) -> str:
    """files_fingerprint of the student's config.json and weight files; KdcacheError if they cannot be read."""
    try:
        return weights_fingerprint(str(path))
    except OSError as e:
        raise KdcacheError(f"{path}: cannot fingerprint the student's weights ({e.strerror}: {e.filename})") from None


def load_profile(path, cache: Cache, student_path) -> dict[str, float]:
    """DDK's initial weights {domain: w} from a profile.json; KdcacheError (one line naming the file) if it is not a
    profile, or was measured on another cache or student, or its domains are not the cache's train domains."""
    try:
        profile = json.loads(Path(path).read_text())
    except OSError as e:
        raise KdcacheError(f"{path}: cannot read the profile ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdcacheError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(profile, dict) or profile.get("kind") != KIND:
        raise KdcacheError(f"{path}: not a kdcache profile (expected kind {KIND!r}; write one with kdcache profile)")
    if profile.get("version") != VERSION:
        raise KdcacheError(f"{path}: unsupported profile version {profile.get('version')!r} (expected {VERSION})")
    try:
        cache_fp, student_fp = profile["cache"]["fingerprint"], profile["student"]["fingerprint"]
        weights = profile["weights"]
    except (KeyError, TypeError) as e:
        raise KdcacheError(f"{path}: malformed profile (missing field {e})") from None
    if cache_fp != cache.fingerprint:
        raise KdcacheError(f"{path}: measured on another cache ({profile['cache'].get('path')}), not {cache.root} "
                           f"(fingerprint {str(cache_fp)[:12]} vs {cache.fingerprint[:12]}); re-run kdcache profile")
    current = student_fingerprint(student_path)
    if student_fp != current:
        raise KdcacheError(f"{path}: measured with another student ({profile['student'].get('path')}), not "
                           f"{student_path} (fingerprint {str(student_fp)[:12]} vs {current[:12]}); "
                           f"re-run kdcache profile")
    if not isinstance(weights, dict):
        raise KdcacheError(f"{path}: malformed profile (weights must be a {{domain: weight}} mapping)")
    train = cache.domains("train")
    if sorted(weights) != train:
        raise KdcacheError(f"{path}: profile domains {sorted(weights)} differ from the cache's train domains {train}")
    try:
        w = check_weights([weights[d] for d in train], len(train))
    except (TypeError, ValueError) as e:
        raise KdcacheError(f"{path}: {e}") from None
    return dict(zip(train, w.tolist()))
