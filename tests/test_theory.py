"""Theorem 3.1/3.2 conditions and bounds: hand-computed values, properties, bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope.math import theory

# One worked set of numbers; every expected value below is computed by hand.
#   eta = 2, c1 = 0.5, c2 = 0.25, L0 = 3, L1 = 0.5, alpha = 0.1, gap = 4
#   grad norms [4, 1, 0]  (T = 2)
#   lhs terms: min{1, 1}*4 = 4, min{1, 0.25}*1 = 0.25, 0 -> lhs = 4.25 / 3
#   (37): c1/(4 eta L1) = 0.5/4 = 0.125
#   (38): 2*4/(3*0.1) = 80/3; 5*0.1*4*3 = 6; 0.1*8*0.5*0.5/0.25 = 0.8
SGD = {"L0": 3.0, "L1": 0.5, "c1": 0.5, "c2": 0.25, "eta": 2.0, "alpha": 0.1, "gap": 4.0}
NORMS = [4.0, 1.0, 0.0]
#   IGC adds m = 2, L0i = [1, 2] (max 2), L1i = [0.25, 0.125] (max 0.25):
#   G (43) = 5*2 + 16*2*0.25 = 18
#   (44): c1/(2m(2 eta L1 + G)) = 0.5/(4*(2 + 18)) = 1/160
#         1/(5 m L0i) = 1/20;  1/(8 m eta L1i) = 1/8
#   (45): 2*4/(3*0.1*2) = 40/3; 5*0.1*2*4*3 = 12; 0.1*2*4*0.5*(2 + 18)/(2*0.25) = 16
IGC = {**SGD, "m": 2, "L0i": [1.0, 2.0], "L1i": [0.25, 0.125]}


def test_sgd_condition_and_bound_hand_computed():
    cond = theory.sgd_step_condition(alpha=0.1, c1=0.5, L1=0.5, eta=2.0)
    assert cond.alpha_max == pytest.approx(0.125)
    assert cond.holds
    assert not theory.sgd_step_condition(alpha=0.126, c1=0.5, L1=0.5, eta=2.0).holds
    b = theory.sgd_bound(NORMS, **SGD, T=2)
    assert (b.method, b.equation, b.T) == ("sgd", "(38)", 2)
    assert b.lhs == pytest.approx(4.25 / 3)
    assert b.gap_term == pytest.approx(80 / 3)
    assert b.l0_term == pytest.approx(6.0)
    assert b.l1_term == pytest.approx(0.8)
    assert b.rhs == pytest.approx(80 / 3 + 6.8)
    assert b.holds and b.condition.holds


def test_sgd_bound_keeps_the_printed_c2():
    """(38) as printed divides the last term by c2; the later sentence drops it."""
    with_c2 = theory.sgd_bound(NORMS, **{**SGD, "c2": 0.25})
    full_c2 = theory.sgd_bound(NORMS, **{**SGD, "c2": 1.0})
    assert with_c2.l1_term == pytest.approx(4 * full_c2.l1_term)


def test_igc_condition_bound_and_drift_hand_computed():
    assert theory.igc_G(L0i=IGC["L0i"], L1i=IGC["L1i"], eta=2.0) == pytest.approx(18.0)
    cond = theory.igc_step_condition(
        alpha=0.1, c1=0.5, L1=0.5, L0i=IGC["L0i"], L1i=IGC["L1i"], eta=2.0, m=2
    )
    terms = dict(cond.terms)
    assert list(terms.values()) == pytest.approx([1 / 160, 1 / 20, 1 / 8])
    assert cond.alpha_max == pytest.approx(1 / 160)
    assert not cond.holds
    b = theory.igc_bound(NORMS, **IGC)
    assert (b.method, b.equation, b.T) == ("igc", "(45)", 2)
    assert b.lhs == pytest.approx(4.25 / 3)
    assert b.gap_term == pytest.approx(40 / 3)
    assert b.l0_term == pytest.approx(12.0)
    assert b.l1_term == pytest.approx(16.0)
    assert b.holds and not b.condition.holds
    # (42): alpha eta m^2 G |grad f_k| = 0.1*2*4*18*|g| = 14.4 |g|
    drift = theory.drift_bound(NORMS, alpha=0.1, eta=2.0, m=2, L0i=IGC["L0i"], L1i=IGC["L1i"])
    np.testing.assert_allclose(drift, [57.6, 14.4, 0.0])
    assert theory.drift_bound(1.0, alpha=0.1, eta=2.0, m=2, L0i=2.0, L1i=0.25) == pytest.approx(
        14.4
    )


def test_scalar_constants_mean_max_over_components():
    lists = theory.igc_bound(NORMS, **IGC)
    scalars = theory.igc_bound(NORMS, **{**IGC, "L0i": 2.0, "L1i": 0.25})
    assert lists == scalars


def test_zero_constants_remove_their_limits():
    assert theory.sgd_step_limit(c1=0.5, L1=0.0, eta=2.0) == math.inf
    limit = theory.igc_step_limit(c1=0.5, L1=0.0, L0i=0.0, L1i=0.0, eta=2.0, m=3)
    assert limit == math.inf
    # only L0i > 0: the first two terms remain, 0.5/(6*5) and 1/15
    limit = theory.igc_step_limit(c1=0.5, L1=0.0, L0i=1.0, L1i=0.0, eta=2.0, m=3)
    assert limit == pytest.approx(min(0.5 / 30, 1 / 15))
    d = theory.sgd_step_condition(alpha=1e9, c1=0.5, L1=0.0, eta=2.0).to_dict()
    assert d["alpha_max"] is None and d["holds"] is True


def test_to_dict_is_json():
    for b in (theory.sgd_bound(NORMS, **SGD), theory.igc_bound(NORMS, **IGC)):
        d = json.loads(json.dumps(b.to_dict(), allow_nan=False))
        assert d["lhs"] == pytest.approx(b.lhs)
        assert d["rhs"] == pytest.approx(b.rhs)
        assert d["holds"] is b.holds
        assert d["condition"]["holds"] is b.condition.holds
        assert sum(d["terms"].values()) == pytest.approx(b.rhs)


def test_lhs_against_explicit_loop():
    rng = np.random.default_rng(0)
    norms = rng.exponential(size=50)
    expected = sum(min(2.0 * 0.3, 0.7 * g) * g for g in norms) / len(norms)
    assert theory.bound_lhs(norms, c1=0.3, c2=0.7, eta=2.0) == pytest.approx(expected, rel=1e-14)


positive = st.floats(1e-3, 1e3)
unit = st.floats(1e-3, 1.0)


@settings(max_examples=60, deadline=None)
@given(a=positive, b=positive, c1=unit, L1=positive, eta=positive)
def test_sgd_condition_monotone_in_alpha(a, b, c1, L1, eta):
    small, large = sorted((a, b))
    holds_large = theory.sgd_step_condition(alpha=large, c1=c1, L1=L1, eta=eta).holds
    holds_small = theory.sgd_step_condition(alpha=small, c1=c1, L1=L1, eta=eta).holds
    assert holds_small or not holds_large


@settings(max_examples=60, deadline=None)
@given(
    a=positive, b=positive, c1=unit, L1=positive, L0i=positive, L1i=positive, eta=positive,
    m=st.integers(1, 50),
)  # fmt: skip
def test_igc_condition_monotone_in_alpha_and_tighter_than_each_term(a, b, c1, L1, L0i, L1i, eta, m):
    small, large = sorted((a, b))
    kw = {"c1": c1, "L1": L1, "L0i": L0i, "L1i": L1i, "eta": eta, "m": m}
    cl, cs = (
        theory.igc_step_condition(alpha=large, **kw),
        theory.igc_step_condition(alpha=small, **kw),
    )
    assert cs.holds or not cl.holds
    assert cl.alpha_max == min(v for _, v in cl.terms)
    # more components -> a smaller allowed step (every term scales with 1/m)
    assert theory.igc_step_limit(**{**kw, "m": m + 1}) <= cl.alpha_max


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 40), extra=st.integers(1, 40), norm=st.floats(0, 10), alpha=positive,
    m=st.integers(1, 10),
)  # fmt: skip
def test_gap_terms_decrease_in_T(T, extra, norm, alpha, m):
    kw = {**IGC, "alpha": alpha, "m": m, "L0i": 2.0, "L1i": 0.25}
    short = theory.igc_bound([norm] * (T + 1), **kw)
    long = theory.igc_bound([norm] * (T + 1 + extra), **kw)
    assert long.gap_term < short.gap_term
    assert (long.l0_term, long.l1_term) == (short.l0_term, short.l1_term)
    assert long.lhs == pytest.approx(short.lhs)
    s_short = theory.sgd_bound([norm] * (T + 1), **{**SGD, "alpha": alpha})
    s_long = theory.sgd_bound([norm] * (T + 1 + extra), **{**SGD, "alpha": alpha})
    assert s_long.gap_term < s_short.gap_term


@settings(max_examples=60, deadline=None)
@given(norms=st.lists(st.floats(0, 1e3), min_size=1, max_size=20), c1=unit, c2=unit, eta=positive)
def test_lhs_bounded_by_both_arms_of_the_min(norms, c1, c2, eta):
    lhs = theory.bound_lhs(norms, c1=c1, c2=c2, eta=eta)
    g = np.asarray(norms)
    assert 0 <= lhs
    assert lhs <= np.mean(eta * c1 * g) * (1 + 1e-12)
    assert lhs <= np.mean(c2 * g**2) * (1 + 1e-12)


BAD_SGD = [
    ({"L0": -1.0}, ValueError, "L0"),
    ({"L1": -0.5}, ValueError, "L1"),
    ({"L1": math.inf}, ValueError, "L1"),
    ({"c1": 0.0}, ValueError, "c1"),
    ({"c1": 1.5}, ValueError, "c1"),
    ({"c2": 0.0}, ValueError, "c2"),
    ({"c2": 2.0}, ValueError, "c2"),
    ({"c2": math.nan}, ValueError, "c2"),
    ({"eta": 0.0}, ValueError, "eta"),
    ({"eta": -2.0}, ValueError, "eta"),
    ({"eta": math.nan}, ValueError, "eta"),
    ({"eta": math.inf}, ValueError, "finite"),
    ({"alpha": 0.0}, ValueError, "alpha"),
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"alpha": math.inf}, ValueError, "alpha"),
    ({"gap": -1.0}, ValueError, "gap"),
    ({"T": 3}, ValueError, "T \\+ 1"),
    ({"T": -1}, ValueError, "T"),
    ({"T": 1.5}, TypeError, "T"),
    ({"alpha": "0.1"}, TypeError, "alpha"),
    ({"L0": True}, TypeError, "L0"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_SGD, ids=lambda v: str(v)[:30])
def test_sgd_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        theory.sgd_bound(NORMS, **{**SGD, **change})


BAD_IGC = [
    ({"m": 0}, ValueError, "m"),
    ({"m": 2.0}, TypeError, "m"),
    ({"m": 3}, ValueError, "L0i has 2 entries but m = 3"),
    ({"L0i": [1.0, -1.0]}, ValueError, r"L0i\[1\]"),
    ({"L1i": []}, ValueError, "L1i"),
    ({"L1i": "0.5"}, TypeError, "L1i"),
    ({"L0i": -1.0}, ValueError, "L0i"),
    ({"eta": math.inf}, ValueError, "finite"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD_IGC, ids=lambda v: str(v)[:30])
def test_igc_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        theory.igc_bound(NORMS, **{**IGC, **change})


@pytest.mark.parametrize(
    ("norms", "match"),
    [([], "non-empty"), ([[1.0]], "1-D"), ([1.0, -1.0], r"grad_norms\[1\]"),
     ([1.0, math.nan], r"grad_norms\[1\]"), ([math.inf], r"grad_norms\[0\]")],
)  # fmt: skip
def test_bad_grad_norms(norms, match):
    with pytest.raises(ValueError, match=match):
        theory.sgd_bound(norms, **SGD)
    with pytest.raises(ValueError, match=match):
        theory.igc_bound(norms, **IGC)


def test_drift_bad_inputs():
    kw = {"alpha": 0.1, "eta": 2.0, "m": 2, "L0i": 1.0, "L1i": 0.1}
    with pytest.raises(ValueError, match="grad_norm"):
        theory.drift_bound(-1.0, **kw)
    with pytest.raises(ValueError, match="finite"):
        theory.drift_bound(1.0, **{**kw, "eta": math.inf})
    with pytest.raises(ValueError, match="alpha"):
        theory.drift_bound(1.0, **{**kw, "alpha": 0})
