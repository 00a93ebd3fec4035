"""Domain samplers: fixed natural/uniform weights, and DDK's Eq. 1 start, Eq. 2 updates every K steps and state."""

import dataclasses
import json

import numpy as np
import pytest

from cache_format import KdcacheError, open_cache, read_manifest, write_manifest
from trainer.ddk import initial_weights, update_weights
from trainer.sampling import DDKSampler, FixedSampler


def report(student_ce: dict[str, float], teacher_ce: dict[str, float]) -> dict:
    """What trainer.evaluate.evaluate returns, reduced to the fields a sampler reads."""
    return {"domains": {d: {"student_ce": student_ce[d], "teacher_ce": teacher_ce[d]} for d in student_ce}}


class Measure:
    """A stand-in for the val measurement: returns the next report and counts the calls."""

    def __init__(self, *reports: dict):
        self.reports, self.calls = list(reports), 0

    def __call__(self) -> dict:
        self.calls += 1
        return self.reports.pop(0)


def test_fixed_samplers_are_token_shares_or_uniform_and_never_measure(synthetic_cache):
    cache = open_cache(synthetic_cache)                                 # train rows: code 7, prose 4 (same T)
    natural, uniform = FixedSampler(cache, "natural"), FixedSampler(cache, "uniform")
    assert natural.weights == pytest.approx({"code": 7 / 11, "prose": 4 / 11})
    assert uniform.weights == {"code": 0.5, "prose": 0.5}
    measure = Measure()
    assert natural.start(measure) is None and natural.maybe_update(10, measure) is None and measure.calls == 0
    restored = FixedSampler(cache, "uniform")
    restored.load_state_dict(json.loads(json.dumps(natural.state_dict())))
    assert restored.weights == natural.weights


def test_ddk_starts_with_eq1_and_updates_with_eq2_every_interval(synthetic_cache):
    cache = open_cache(synthetic_cache)
    s0, t0 = {"code": 3.0, "prose": 2.0}, {"code": 1.0, "prose": 1.5}
    s1 = {"code": 2.0, "prose": 1.9}
    sampler = DDKSampler(cache, alpha=0.5, interval=4)
    measure = Measure(report(s0, t0), report(s1, t0))
    started = sampler.start(measure)
    w0 = initial_weights([3.0, 2.0], [1.0, 1.5])                         # Eq. 1, domains sorted
    assert list(sampler.weights.values()) == pytest.approx(w0.tolist(), abs=0)
    assert started["ddk_updates"] == 0 and started["ddk_ratio"]["code"] == pytest.approx(np.exp(2.0))
    for step in (1, 2, 3):
        assert sampler.maybe_update(step, measure) is None              # not a multiple of the interval
    assert measure.calls == 1
    updated = sampler.maybe_update(4, measure)
    assert measure.calls == 2 and updated["ddk_updates"] == 1
    w1 = update_weights(w0, np.array([2.0, 1.9]), np.array([1.0, 1.5]), 0.5)   # Eq. 2
    assert list(sampler.weights.values()) == pytest.approx(w1.tolist(), abs=0)

    restored = DDKSampler(cache, alpha=0.5, interval=4)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))   # exact through JSON (checkpoints)
    assert restored.weights == sampler.weights


def test_ddk_from_a_profile_does_not_measure_first(synthetic_cache):
    sampler = DDKSampler(open_cache(synthetic_cache), 0.5, 10, initial={"code": 0.25, "prose": 0.75})
    measure = Measure()
    assert sampler.start(measure) == {"ddk_updates": 0} and measure.calls == 0
    assert sampler.weights == {"code": 0.25, "prose": 0.75}


def test_ddk_needs_val_rows_for_every_train_domain(synthetic_cache):
    m = read_manifest(synthetic_cache)
    write_manifest(synthetic_cache, dataclasses.replace(m, splits={"train": m.splits["train"],
                                                                   "val": {"code": m.splits["val"]["code"]}}))
    with pytest.raises(KdcacheError, match=r"train domain\(s\) prose have no 'val' rows"):
        DDKSampler(open_cache(synthetic_cache), 0.5, 10)
