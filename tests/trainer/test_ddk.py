"""DDK's domain weights (papers.md §1.2): Eq. 1, Eq. 2, their stable forms, the state and the interval K."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.ddk import (DDKWeights, ddk_interval, initial_weights, perplexity_ratio, update_weights)

# A 3-domain example, worked out by hand (math.exp):
#   student_ce = [2.5, 2.2, 3.0], teacher_ce = [2.0, 2.0, 2.2]  -> gaps [0.5, 0.2, 0.8]
#   ratio l_S/l_T = exp(gap)              = [1.648721, 1.221403, 2.225541]
#   Eq. 1: exp(ratio)                     = [5.200326, 3.391942, 9.258490], sum 17.850758
#          r_0 = exp(ratio) / sum         = [0.291322, 0.190017, 0.518661]
#   re-measured student_ce = [2.3, 2.1, 2.5] -> ratio = exp([0.3, 0.1, 0.3]) = [1.349859, 1.105171, 1.349859]
#   Eq. 2: psi = r_0 * exp(ratio)         = [1.123596, 0.573801, 2.000413], sum 3.697810
#          r_1 = 0.5 * psi / sum + 0.5/3  = [0.318594, 0.244253, 0.437153]
S0, T = [2.5, 2.2, 3.0], [2.0, 2.0, 2.2]
S1 = [2.3, 2.1, 2.5]
RATIO0 = [1.648721, 1.221403, 2.225541]
R0 = [0.291322, 0.190017, 0.518661]
R1 = [0.318594, 0.244253, 0.437153]
DOMAINS = ["code", "math", "prose"]

ces = st.lists(st.floats(0.0, 50.0), min_size=1, max_size=8)


def test_eq1_and_eq2_match_hand_computed_values():
    np.testing.assert_allclose(perplexity_ratio(S0, T), RATIO0, atol=1e-6)
    r0 = initial_weights(S0, T)
    np.testing.assert_allclose(r0, R0, atol=1e-6)
    np.testing.assert_allclose(update_weights(r0, S1, T, alpha=0.5), R1, atol=1e-6)
    assert r0.dtype == np.float64


def test_the_class_applies_the_same_equations():
    ddk = DDKWeights.from_ce(dict(zip(DOMAINS, S0)), dict(zip(DOMAINS, T)), alpha=0.5)
    assert ddk.domains == DOMAINS and ddk.updates == 0
    np.testing.assert_allclose(list(ddk.as_dict().values()), R0, atol=1e-6)
    np.testing.assert_allclose(list(ddk.ratios.values()), RATIO0, atol=1e-6)
    ddk.update(dict(zip(DOMAINS, S1)), dict(zip(DOMAINS, T)))
    assert ddk.updates == 1
    np.testing.assert_allclose(ddk.weights, R1, atol=1e-6)
    assert ddk.ratios["code"] == pytest.approx(1.349859, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_weights_stay_a_distribution_with_the_floor_and_bounded_steps(data):
    s = data.draw(ces)
    n = len(s)
    t = data.draw(st.lists(st.floats(0.0, 50.0), min_size=n, max_size=n))
    s1, s2 = (data.draw(st.lists(st.floats(0.0, 50.0), min_size=n, max_size=n)) for _ in range(2))
    alpha = data.draw(st.floats(0.0, 1.0))
    r0 = initial_weights(s, t)
    r1 = update_weights(r0, s1, t, alpha)
    r2 = update_weights(r1, s2, t, alpha)
    for r in (r0, r1, r2):
        assert np.all(np.isfinite(r)) and np.all(r >= 0) and r.sum() == pytest.approx(1.0, abs=1e-12)
    for r in (r1, r2):
        assert np.all(r >= (1 - alpha) / n - 1e-12)                # the uniform floor
    # r1 = alpha * x + (1 - alpha) / N for a distribution x, so Eq. 2 moves each weight by at most alpha
    assert np.all(np.abs(r2 - r1) <= alpha + 1e-12)


def test_a_larger_gap_gets_more_weight():
    w = initial_weights([3.0, 3.5, 4.0], [2.0, 2.0, 2.0])
    assert w[0] < w[1] < w[2]
    w = update_weights(np.full(3, 1 / 3), [3.0, 3.5, 4.0], [2.0, 2.0, 2.0], alpha=0.5)
    assert w[0] < w[1] < w[2]
    # the same gap on an easier teacher domain weighs the same: only the ratio counts
    assert initial_weights([3.0, 5.0], [2.0, 4.0]) == pytest.approx([0.5, 0.5])


def test_huge_gaps_stay_finite():
    w = initial_weights([40.0, 3.0, 2.5], [2.0, 2.0, 2.0])         # ratio e^38 ~ 3e16
    assert np.all(np.isfinite(w)) and w[0] == pytest.approx(1.0)
    w = update_weights(w, [40.0, 900.0, 2.5], [2.0, 2.0, 2.0], alpha=0.5)   # exp(898) overflows without care
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    assert w[2] == pytest.approx(0.5 / 3)                          # kept alive by the floor only
    assert np.all(np.isfinite(perplexity_ratio([1000.0], [0.0])))
    # alpha = 1 and a weight that is exactly zero: no NaN from log(0)
    assert update_weights([1.0, 0.0], [5.0, 9.0], [2.0, 2.0], alpha=1.0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        update_weights([0.5, 0.5], [3.0, 3.0], [2.0, 2.0], alpha)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DDKWeights(["a", "b"], [0.5, 0.5], alpha=alpha)


@pytest.mark.parametrize("weights, student, teacher, match", [
    ([0.5, 0.6], [3.0, 3.0], [2.0, 2.0], "distribution over 2 domains"),
    ([1.5, -0.5], [3.0, 3.0], [2.0, 2.0], "distribution over 2 domains"),
    ([1.0], [3.0, 3.0], [2.0, 2.0], "distribution over 2 domains"),
    ([0.5, 0.5], [3.0, float("nan")], [2.0, 2.0], "student_ce must be finite"),
    ([0.5, 0.5], [3.0, 3.0], [2.0, float("inf")], "teacher_ce must be finite"),
    ([0.5, 0.5], [3.0, 3.0], [2.0], "one length"),
    ([], [], [], "non-empty"),
])
def test_bad_inputs_are_refused(weights, student, teacher, match):
    with pytest.raises(ValueError, match=match):
        update_weights(weights, student, teacher, 0.5)


def test_class_refuses_mismatched_domains():
    ddk = DDKWeights.from_weights({"a": 0.25, "b": 0.75})
    with pytest.raises(ValueError, match=r"student_ce has domains \['a'\], expected \['a', 'b'\]"):
        ddk.update({"a": 3.0}, {"a": 2.0, "b": 2.0})
    with pytest.raises(ValueError, match="distinct domains"):
        DDKWeights(["a", "a"], [0.5, 0.5])
    other = DDKWeights.from_weights({"a": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match="DDK state is for domains"):
        ddk.load_state_dict(other.state_dict())


def test_state_dict_round_trips_exactly_through_json():
    ddk = DDKWeights.from_ce({"a": 3.1, "b": 2.7, "c": 5.3}, {"a": 2.0, "b": 2.1, "c": 2.9}, alpha=0.3)
    for s in ([3.0, 2.6, 4.1], [2.9, 2.6, 3.3]):
        ddk.update(dict(zip(ddk.domains, s)), {"a": 2.0, "b": 2.1, "c": 2.9})
    restored = DDKWeights.from_weights({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    restored.load_state_dict(json.loads(json.dumps(ddk.state_dict())))
    assert restored.state_dict() == ddk.state_dict()
    assert restored.weights.tolist() == ddk.weights.tolist() and restored.updates == 2 and restored.alpha == 0.3
    # the next update continues bitwise
    nxt = ({"a": 2.5, "b": 2.5, "c": 3.0}, {"a": 2.0, "b": 2.1, "c": 2.9})
    assert restored.update(*nxt).tolist() == ddk.update(*nxt).tolist()


def test_ddk_interval():
    assert ddk_interval(300) == 10
    assert ddk_interval(30_000) == 1000                            # the paper's K
    assert ddk_interval(10) == 1                                   # never 0
    assert ddk_interval(300, interval=7) == 7
    assert ddk_interval(300, updates=3) == 100
    for k in (0, -5):
        with pytest.raises(ValueError, match="K must be >= 1"):
            ddk_interval(300, interval=k)
