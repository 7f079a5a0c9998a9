"""ComponentStats and EtaProfile against explicit component vectors (float64 brute force).

The reference :class:`Brute` holds the vectors g_1..g_m themselves and computes every
quantity from its definition (explicit clipping of each vector, explicit sums and
angles); :class:`ComponentStats` only ever sees ``(n, d, ‖∇f‖)``.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipscope.errors import NonFiniteError
from clipscope.math.stats import ComponentStats, DirectionStats, EtaProfile

RTOL = 1e-10
SETTINGS = settings(deadline=None, max_examples=60)


def vnorm(v: np.ndarray) -> float:
    return math.hypot(*np.ravel(v).tolist())


class Brute:
    """Every statistic of DESIGN §2 from the component vectors, by definition."""

    def __init__(self, g: np.ndarray):
        self.g = np.asarray(g, dtype=np.float64)
        self.m = len(self.g)
        self.full = self.g.sum(axis=0) / self.m
        self.fn = vnorm(self.full)
        self.n = np.array([vnorm(v) for v in self.g])
        self.d = np.array([float(np.dot(v, self.full)) for v in self.g])

    def stats(self) -> ComponentStats:
        return ComponentStats(self.n, self.d, self.fn)

    def unit(self, v):
        return v / vnorm(v)

    def cos(self):
        return np.array(
            [
                float(np.dot(self.unit(v), self.unit(self.full))) if vnorm(v) > 0 else np.nan
                for v in self.g
            ]
        )

    def t_vectors(self):
        u = self.unit(self.full)
        return np.array([v - np.dot(v, u) * u for v in self.g])

    def beta(self):
        # coefficient of the orthogonal decomposition g_i = β_i ∇f + t_i (18)
        u = self.unit(self.full)
        return np.array([np.dot(v, u) / self.fn for v in self.g])

    def clip(self, v, eta):
        nv = vnorm(v)
        return v if nv <= eta else v * (eta / nv)

    def descent(self, eta):
        s = np.zeros_like(self.full)
        for v in self.g:
            s = s + self.clip(v, eta)
        return float(np.dot(s, self.full))

    def ratio(self, eta):
        return self.descent(eta) / (self.m * self.fn**2)

    def zhang(self):
        return max(vnorm(v - self.full) / vnorm(v) for v in self.g)

    def scale(self, eta):
        """Size of the terms of D(η): an absolute tolerance unit for cancellation."""
        return sum(min(vnorm(v), eta) for v in self.g) * self.fn + 1e-300


def gaussian_components(seed: int, m: int, dim: int, shift: float, spread: float) -> np.ndarray:
    """Vectors with lognormal norms: often some component cosines negative."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(m, dim)) + shift * np.eye(dim)[0]
    return g * np.exp(spread * rng.normal(size=(m, 1)))


CASES = [
    # (id, m, dim, shift, spread, seed)
    ("m1", 1, 3, 0.0, 0.0, 0),
    ("m2", 2, 4, 0.3, 1.0, 1),
    ("m3_dim1", 3, 1, 0.5, 1.0, 2),
    ("m7_aligned", 7, 5, 3.0, 0.2, 3),
    ("m50_noisy", 50, 20, 0.2, 1.5, 4),
    ("m50_dim2", 50, 2, 1.0, 2.0, 5),
    ("m200_dim100", 200, 100, 0.05, 1.0, 6),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request) -> Brute:
    _, m, dim, shift, spread, seed = request.param
    return Brute(gaussian_components(seed, m, dim, shift, spread))


def eta_grid(b: Brute) -> list[float]:
    pos = b.n[b.n > 0]
    lo, hi = (pos.min(), pos.max()) if pos.size else (1.0, 1.0)
    grid = np.geomspace(lo / 10, hi * 10, 25).tolist()
    return [*grid, *pos.tolist(), math.inf]


# --- brute force -----------------------------------------------------------------
def test_per_component_quantities(case):
    s = case.stats()
    assert s.m == case.m
    np.testing.assert_allclose(s.cos, case.cos(), rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(s.beta, case.beta(), rtol=RTOL, atol=1e-14)
    t = np.array([vnorm(v) for v in case.t_vectors()])
    # ‖t_i‖ from (n, d, ‖∇f‖) loses half the digits when g_i ∥ ∇f (m = 1): sqrt(eps)·n
    np.testing.assert_allclose(s.t_norm, t, rtol=RTOL, atol=1e-7 * case.n.max())
    assert s.c1 == pytest.approx(float(np.mean(case.cos())), rel=RTOL, abs=1e-14)
    assert s.c2 == pytest.approx(case.n.min() / case.n.max(), rel=RTOL)
    assert s.a3_holds == bool((case.cos() >= 0).all() and case.cos().mean() > 0)
    assert s.b2_holds == bool(case.cos().sum() > 0)
    assert s.zhang_ratio == pytest.approx(case.zhang(), rel=RTOL, abs=1e-7)


def test_identities(case):
    s = case.stats()
    assert s.beta.sum() == pytest.approx(case.m, rel=1e-12)  # (20)
    t = case.t_vectors()
    np.testing.assert_allclose(t.sum(axis=0), 0.0, atol=1e-12 * case.n.sum())  # Σ t_i = 0
    np.testing.assert_allclose(t @ case.full, 0.0, atol=1e-12 * case.n.max() * case.fn)
    assert s.descent(math.inf) == pytest.approx(case.m * case.fn**2, rel=1e-12)
    assert s.ratio(math.inf) == pytest.approx(1.0, rel=1e-12)
    assert s.profile()(math.inf) == pytest.approx(case.m * case.fn**2, rel=1e-12)


def test_functions_of_eta(case):
    s = case.stats()
    grid = eta_grid(case)
    D = s.descent(np.array(grid))
    P = s.profile()(np.array(grid))
    for eta, d_ours, p_ours in zip(grid, D, P, strict=True):
        expect = case.descent(eta)
        tol = 1e-12 * case.scale(eta)
        assert d_ours == pytest.approx(expect, rel=RTOL, abs=tol)
        assert p_ours == pytest.approx(expect, rel=RTOL, abs=tol)
        assert s.descent(eta) == d_ours
        assert s.ratio(eta) == pytest.approx(case.ratio(eta), rel=RTOL, abs=tol / case.fn**2)
        assert s.clipped_fraction(eta) == np.mean([vnorm(v) > eta for v in case.g])
        gam = s.gamma(eta)
        assert gam.shape == (case.m,)
        for gi, v in zip(gam, case.g, strict=True):
            np.testing.assert_allclose(gi * v, case.clip(v, eta), rtol=1e-13)
        c1 = case.cos().mean()
        c2 = case.n.min() / case.n.max()
        bound = case.m * min(eta * c1, c2 * case.fn) * case.fn
        assert s.bound33(eta) == pytest.approx(bound, rel=RTOL)


def test_torch_and_numpy_inputs_agree(case):
    s = case.stats()
    t = ComponentStats(
        torch.from_numpy(case.n),
        torch.from_numpy(case.d),
        torch.tensor(case.fn, dtype=torch.float64),
    )
    f32 = ComponentStats(torch.from_numpy(case.n).float(), list(case.d), np.float32(case.fn))
    np.testing.assert_array_equal(t.cos, s.cos)
    assert t.descent(1.0) == s.descent(1.0)
    np.testing.assert_allclose(f32.beta, s.beta, rtol=1e-5)


# --- paper facts ---------------------------------------------------------------------
def example1_components(x: float) -> np.ndarray:
    # f_1 = f_2 = −x², f_3 = 5x²: gradients −2x, −2x, 10x (1-D vectors)
    return np.array([[-2 * x], [-2 * x], [10 * x]])


def test_example1_clipping_reverses_descent():
    b = Brute(example1_components(1.0))
    s = b.stats()
    assert s.descent(2.0) == pytest.approx(b.descent(2.0), rel=RTOL)
    assert s.descent(2.0) < 0 and s.ratio(2.0) < 0
    assert not s.a3_holds and not s.b2_holds
    (lo, hi), *rest = s.profile().negative_intervals()
    assert rest == [] and lo == 0.0
    # the interval ends exactly where the brute-force D crosses zero
    assert abs(b.descent(hi)) <= 1e-12 * b.scale(hi)
    assert b.descent(hi * (1 + 1e-9)) > 0 and b.descent(hi * (1 - 1e-9)) < 0


@pytest.mark.parametrize("x", [0.05, 0.3, 0.45, 0.55, 0.8, 1.0, 3.0, 100.0])
def test_example1_watershed_at_one_half(x):
    # at η = 2 the expected clipped step points away from 0 exactly when |x| > 1/2
    s = Brute(example1_components(x)).stats()
    assert (s.descent(2.0) < 0) == (x > 0.5)


@SETTINGS
@given(
    g=arrays(np.float64, st.tuples(st.just(2), st.integers(1, 6)), elements=st.floats(-1e3, 1e3)),
    eta=st.floats(1e-4, 1e4),
)
def test_m2_result(g, eta):
    # for any two vectors and any η: Σ γ_i β_i ≥ 0, i.e. D(η) ≥ 0
    b = Brute(g)
    assume(b.fn > 1e-6)
    s = b.stats()
    tol = 1e-12 * b.scale(eta)
    assert s.descent(eta) >= -tol
    assert b.descent(eta) >= -tol
    assert (s.gamma(eta) * s.beta).sum() >= -tol / b.fn**2


def b1_components(seed: int, pairs: int, dim: int) -> np.ndarray:
    """Pairs with β_{2j−1} + β_{2j} > 0 and ‖t_{2j−1}‖ = ‖t_{2j}‖ around ∇f = h.

    Built as g = β h + t with t ⊥ h, Σ β = m and Σ t = 0, so that the mean of the
    vectors is exactly h (up to rounding).
    """
    rng = np.random.default_rng(seed)
    m = 2 * pairs
    h = rng.normal(size=dim) * math.exp(rng.normal())
    u = h / vnorm(h)

    def perp(v):
        return v - np.dot(v, u) * u

    s = rng.exponential(size=pairs) + 1e-3
    s *= m / s.sum()
    delta = rng.normal(size=pairs) * rng.exponential(size=pairs) * 5
    betas = np.ravel(np.column_stack([s / 2 + delta, s / 2 - delta]))
    ts = []
    for _ in range(pairs - 1):
        a = perp(rng.normal(size=dim)) * math.exp(2 * rng.normal())
        r = perp(rng.normal(size=dim))
        r = r / vnorm(r) * vnorm(a) if vnorm(r) > 0 else -a  # same norm, other direction
        ts += [a, r]
    rest = -np.sum(ts, axis=0) / 2 if ts else np.zeros(dim)
    ts += [rest, rest]
    return np.array([bi * h + ti for bi, ti in zip(betas, ts, strict=True)])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), pairs=st.integers(1, 6), dim=st.integers(2, 5))
def test_b1_pairs_descend_for_every_eta(seed, pairs, dim):
    b = Brute(b1_components(seed, pairs, dim))
    s = b.stats()
    beta, t = s.beta, np.array([vnorm(v) for v in b.t_vectors()])
    assert (beta[0::2] + beta[1::2] > 0).all()
    np.testing.assert_allclose(t[0::2], t[1::2], rtol=1e-9, atol=1e-12 * b.n.max())
    for eta in eta_grid(b):
        tol = 1e-9 * b.scale(eta)
        assert s.descent(eta) >= -tol
        assert b.descent(eta) >= -tol


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    m=st.integers(1, 30),
    dim=st.integers(1, 6),
    orthant=st.booleans(),
    zero=st.booleans(),
)
def test_bound33_holds_under_a3(seed, m, dim, orthant, zero):
    rng = np.random.default_rng(seed)
    g = gaussian_components(seed, m, dim, shift=2.0, spread=1.0)
    if orthant:  # every dot product ≥ 0: A3 holds by construction
        g = np.abs(g)
    if zero and m > 1:
        g[rng.integers(m)] = 0.0
    b = Brute(g)
    s = b.stats()
    assume(s.a3_holds)
    for eta in eta_grid(b):
        assert s.descent(eta) >= s.bound33(eta) - 1e-10 * b.scale(eta)


@SETTINGS
@given(
    g=arrays(
        np.float64, st.tuples(st.integers(1, 8), st.integers(1, 5)), elements=st.floats(-1e4, 1e4)
    )
)
def test_cos_in_unit_interval(g):
    s = Brute(g).stats()
    c = s.cos[s.cos_defined]
    assert ((c >= -1) & (c <= 1)).all()
    assert np.isnan(s.cos[~s.cos_defined]).all()


# --- the η-profile ------------------------------------------------------------------
profile_inputs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(1, 40),
    st.integers(1, 5),
    st.floats(0.0, 1.5),
    st.floats(0.0, 2.5),
)


def _profile_case(params) -> Brute:
    seed, m, dim, shift, spread = params
    g = gaussian_components(seed, m, dim, shift, spread)
    if m > 2 and seed % 3 == 0:
        g[1] = g[2]  # repeated norms: one breakpoint for two components
    return Brute(g)


@SETTINGS
@given(params=profile_inputs, etas=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=10))
def test_profile_matches_descent(params, etas):
    b = _profile_case(params)
    s = b.stats()
    p = s.profile()
    pts = np.array([*etas, *p.breakpoints, math.inf])
    direct = s.descent(pts)
    fast = p(pts)
    for eta, x, y in zip(pts, direct, fast, strict=True):
        assert y == pytest.approx(x, rel=1e-10, abs=1e-11 * b.scale(eta))
    np.testing.assert_allclose(
        p.values, s.descent(p.breakpoints), rtol=1e-10, atol=1e-11 * b.scale(math.inf)
    )
    np.testing.assert_allclose(
        p.ratio_curve(pts), s.ratio(pts), rtol=1e-9, atol=1e-10 * b.scale(math.inf) / b.fn**2
    )
    assert np.array_equal(p.breakpoints, np.unique(b.n[b.n > 0]))
    assert np.array_equal(p.descent(pts), fast, equal_nan=True)
    assert np.array_equal(p.ratio(pts), p.ratio_curve(pts), equal_nan=True)


def _dense_grid(p: EtaProfile, b: Brute) -> np.ndarray:
    bp = p.breakpoints
    grid = [np.geomspace(bp[0] / 100, bp[-1] * 100, 400)]
    for lo, hi in zip(
        np.concatenate([[bp[0] / 100], bp]), np.concatenate([bp, [bp[-1] * 100]]), strict=True
    ):
        grid.append(np.linspace(lo, hi, 12))
    return np.unique(np.concatenate(grid))


@SETTINGS
@given(params=profile_inputs)
def test_negative_intervals_match_grid_signs(params):
    b = _profile_case(params)
    p = b.stats().profile()
    ivs = p.negative_intervals()
    for (lo1, hi1), (lo2, _) in itertools.pairwise(ivs):
        assert lo1 <= hi1 < lo2  # sorted, disjoint, merged
    grid = _dense_grid(p, b)
    D = np.array([b.descent(e) for e in grid])
    for eta, d in zip(grid, D, strict=True):
        if abs(d) <= 1e-9 * b.scale(eta):
            continue  # too close to a root to judge the sign
        inside = any(lo <= eta <= hi for lo, hi in ivs)
        assert inside == (d < 0), (eta, d, ivs)
    for lo, hi in ivs:
        mid = (lo + hi) / 2 if math.isfinite(hi) else lo * 2 + 1
        assert b.descent(mid) <= 1e-9 * b.scale(mid)


@SETTINGS
@given(params=profile_inputs, target=st.floats(-0.5, 1.3))
def test_min_eta_for_ratio_matches_grid(params, target):
    b = _profile_case(params)
    p = b.stats().profile()
    eta_star = p.min_eta_for_ratio(target)
    grid = _dense_grid(p, b)
    rho = np.array([b.ratio(e) for e in grid])
    tol = 1e-9 * b.scale(math.inf) / (b.m * b.fn**2)
    if target < 0:
        assert eta_star == 0.0
    if eta_star == math.inf:
        assert (rho < target + tol).all() and b.ratio(math.inf) < target + tol
        return
    if eta_star > 0:
        assert b.ratio(eta_star) >= target - tol
        before = grid < eta_star * (1 - 1e-9)
        assert (rho[before] < target + tol).all()
    else:  # arbitrarily small thresholds reach the target: ρ(0+) = 0 ≥ target
        # (or a positive target so small that its η underflows to 0: 5e-324 was found)
        assert target <= 0 or target < 1e-300
        if target == 0:
            assert b.ratio(b.n[b.n > 0].min() * 1e-6) >= -tol


def test_min_eta_for_ratio_when_ratio_exceeds_one():
    # clipping a large anti-aligned component can make ρ(η) > 1 for a finite η
    b = Brute(np.array([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [-4.0, 0.0]]))
    p = b.stats().profile()
    peak = max(b.ratio(e) for e in _dense_grid(p, b))
    assert peak > 1
    eta = p.min_eta_for_ratio(1.0 + (peak - 1) / 2)
    assert math.isfinite(eta) and b.ratio(eta) >= 1.0 + (peak - 1) / 2 - 1e-12
    assert p.min_eta_for_ratio(peak * 2) == math.inf


# --- degenerate inputs ----------------------------------------------------------------
def _no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def _exercise(s: ComponentStats) -> None:
    for eta in (0.1, 1.0, math.inf, np.array([0.5, 2.0])):
        s.descent(eta), s.ratio(eta), s.bound33(eta), s.clipped_fraction(eta), s.gamma(eta)
    p = s.profile()
    p(np.array([0.1, math.inf])), p.negative_intervals(), p.min_eta_for_ratio(0.5), p.values
    s.summary(), s.zhang_ratio, s.a3_holds, s.b2_holds


def test_zero_component():
    g = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    b = Brute(g)
    s = _no_warnings(b.stats)
    _no_warnings(lambda: _exercise(s))
    assert "zero_component_norm" in s.flags and "undefined_cosine" in s.flags
    assert np.isnan(s.cos[0]) and not s.cos_defined[0] and s.cos_defined[1:].all()
    assert s.c1 == pytest.approx(np.nanmean(b.cos()), rel=RTOL)
    assert s.c2 == 0.0 and s.zhang_ratios[0] == math.inf and s.zhang_ratio == math.inf
    assert s.beta[0] == 0.0 and s.t_norm[0] == 0.0
    for eta in (0.5, 2.0, math.inf):
        assert s.descent(eta) == pytest.approx(b.descent(eta), rel=RTOL)
        assert s.profile()(eta) == pytest.approx(b.descent(eta), rel=RTOL)
    assert s.gamma(1.0)[0] == 1.0
    assert s.bound33(1.0) == 0.0


def test_zero_full_gradient():
    v = np.array([1.0, -2.0])
    s = _no_warnings(lambda: Brute(np.array([v, -v, 2 * v, -2 * v])).stats())
    _no_warnings(lambda: _exercise(s))
    assert {"zero_full_gradient", "undefined_cosine", "no_defined_cosine"} <= set(s.flags)
    assert np.isnan(s.cos).all() and np.isnan(s.beta).all() and np.isnan(s.t_norm).all()
    assert math.isnan(s.c1) and math.isnan(s.ratio(1.0)) and math.isnan(s.bound33(1.0))
    assert not s.a3_holds and not s.b2_holds
    assert s.descent(1.0) == 0.0 and s.descent(math.inf) == 0.0
    assert s.profile().negative_intervals() == [(0.0, math.inf)]  # D ≡ 0
    assert math.isnan(s.profile().min_eta_for_ratio(0.5))
    assert s.zhang_ratio == pytest.approx(1.0)  # ‖g_i − 0‖/n_i
    assert s.c2 == 0.5


def test_all_zero():
    s = _no_warnings(lambda: ComponentStats([0.0, 0.0], [0.0, 0.0], 0.0))
    _no_warnings(lambda: _exercise(s))
    assert math.isnan(s.c1) and math.isnan(s.c2) and math.isnan(s.zhang_ratio)
    assert s.profile().breakpoints.size == 0 and s.profile()(3.0) == 0.0
    assert s.clipped_fraction(1.0) == 0.0


def test_m_is_1():
    s = Brute(np.array([[3.0, 4.0]])).stats()
    assert "m_is_1" in s.flags
    assert s.cos[0] == pytest.approx(1.0) and s.beta[0] == pytest.approx(1.0)
    assert s.ratio(1.0) == pytest.approx(1 / 5)


def test_consistency_flags():
    assert ComponentStats([1.0, 1.0], [1.0, 1.0], 1.0).flags == []
    assert "cauchy_schwarz_violation" in ComponentStats([1.0, 1.0], [2.0, 0.0], 1.0).flags
    assert "dots_sum_mismatch" in ComponentStats([1.0, 1.0], [0.5, 0.5], 1.0).flags


def test_summary_and_round_trip(case):
    s = case.stats()
    summ = s.summary()
    json.dumps(summ)
    assert summ["m"] == case.m and summ["a3_holds"] == s.a3_holds
    assert all(type(v) in (int, float, bool, list) for v in summ.values())
    r = ComponentStats.from_dict(json.loads(json.dumps(s.to_dict())))
    np.testing.assert_array_equal(r.norms, s.norms)
    np.testing.assert_array_equal(r.dots, s.dots)
    assert r.grad_norm == s.grad_norm
    with pytest.raises(ValueError):
        s.cos[0] = 1.0  # read-only


# --- bad inputs --------------------------------------------------------------------
@pytest.mark.parametrize(
    "norms, dots, grad_norm, match",
    [
        ([], [], 1.0, "m = 0"),
        ([1.0, 2.0], [1.0], 1.0, "differ in length"),
        ([[1.0]], [[1.0]], 1.0, "1-D"),
        ([1.0, -0.5], [0.0, 0.0], 1.0, r"norms\[1\] = -0.5"),
        ([1.0, math.nan], [0.0, 0.0], 1.0, r"norms\[1\] = nan"),
        ([1.0, 1.0], [0.0, math.inf], 1.0, r"dots\[1\] = inf"),
        ([1.0], [1.0], -1.0, "grad_norm"),
        ([1.0], [1.0], math.nan, "grad_norm"),
        ([1.0], [1.0], [1.0, 2.0], "grad_norm"),
        (["a"], [1.0], 1.0, "norms"),
        ([1.0], [1j], 1.0, "dots"),
        (None, [1.0], 1.0, "norms"),
        (torch.tensor([1j]), [1.0], 1.0, "norms"),
    ],
)
def test_bad_inputs(norms, dots, grad_norm, match):
    with pytest.raises(ValueError, match=match):
        ComponentStats(norms, dots, grad_norm)
    with pytest.raises(ValueError, match=match):
        EtaProfile(norms, dots, grad_norm)


@pytest.mark.parametrize(
    "eta", [0.0, -1.0, math.nan, "1", None, True, np.array([1.0, -1.0]), [0.5, math.nan]], ids=repr
)
def test_bad_eta(eta):
    s = ComponentStats([1.0, 2.0], [1.0, 3.5], 1.5)
    for fn in (
        s.descent,
        s.ratio,
        s.bound33,
        s.clipped_fraction,
        s.gamma,
        s.profile(),
        s.profile().ratio_curve,
    ):
        with pytest.raises(ValueError, match="eta"):
            fn(eta)


@pytest.mark.parametrize("target", [math.nan, "0.5", None, True])
def test_bad_target(target):
    with pytest.raises(ValueError, match="target"):
        EtaProfile([1.0], [1.0], 1.0).min_eta_for_ratio(target)


def test_array_eta_shapes():
    s = ComponentStats([1.0, 2.0], [1.0, 3.5], 1.5)
    etas = np.array([[0.5, 1.0], [2.0, math.inf]])
    assert s.descent(etas).shape == (2, 2)
    assert s.profile()(etas).shape == (2, 2)
    np.testing.assert_allclose(s.descent(etas), s.profile()(etas), rtol=1e-14)
    assert isinstance(s.descent(1.0), float) and isinstance(s.profile()(np.float64(1.0)), float)
    np.testing.assert_allclose(s.descent(torch.tensor([0.5, 1.0])), s.descent([0.5, 1.0]))


# --- the preconditioned direction u = P⁻¹∇f (DirectionStats; issue 22) ------------------
class BrutePreconditioned(Brute):
    """The components with a diagonal P: u = ∇f / P, every quantity by its definition."""

    def __init__(self, g: np.ndarray, p: np.ndarray):
        super().__init__(g)
        self.p = np.asarray(p, dtype=np.float64)
        self.u = self.full / self.p
        self.un = vnorm(self.u)
        self.inner = float(np.dot(self.full, self.u))
        self.dp = np.array([float(np.dot(v, self.u)) for v in self.g])

    def pstats(self) -> DirectionStats:
        return DirectionStats(self.n, self.dp, self.un, self.inner)

    def pdescent(self, eta):
        s = np.zeros_like(self.full)
        for v in self.g:
            s = s + self.clip(v, eta)
        return float(np.dot(s / self.p, self.full))  # ⟨P⁻¹ Σ C(g_i; η), ∇f⟩

    def pratio(self, eta):
        return self.pdescent(eta) / (self.m * self.inner)


precond_inputs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(1, 30),
    st.integers(1, 6),
    st.floats(0.0, 1.5),
    st.floats(0.0, 2.0),
    st.floats(0.0, 3.0),  # the spread of log P
)


def _precond_case(params) -> BrutePreconditioned:
    seed, m, dim, shift, spread, p_spread = params
    g = gaussian_components(seed, m, dim, shift, spread)
    rng = np.random.default_rng(seed + 1)
    return BrutePreconditioned(g, np.exp(p_spread * rng.normal(size=dim)))


@SETTINGS
@given(params=precond_inputs, etas=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8))
def test_preconditioned_ratio_is_the_descent_of_the_preconditioned_clipped_step(params, etas):
    b = _precond_case(params)
    assume(b.inner > 1e-12 * max(1.0, float(np.max(b.n)) ** 2))
    s = b.pstats()
    scale = sum(vnorm(v) for v in b.g) * b.un + 1e-300
    for eta in [*etas, math.inf]:
        assert s.descent(eta) == pytest.approx(b.pdescent(eta), rel=1e-9, abs=1e-11 * scale)
        assert s.profile().ratio(eta) == pytest.approx(
            s.ratio(eta), rel=1e-9, abs=1e-11 * scale / (b.m * b.inner)
        )
    # Σ d^P_i = m⟨∇f, u⟩ (the identity the engine checks) and ρ_P(∞) = 1
    assert float(np.sum(b.dp)) == pytest.approx(b.m * b.inner, rel=1e-9, abs=1e-12 * scale)
    assert "dots_sum_mismatch" not in s.flags and "cauchy_schwarz_violation" not in s.flags
    assert s.ratio(math.inf) == pytest.approx(1.0, rel=1e-9, abs=1e-9 * scale / (b.m * b.inner))
    assert float(np.sum(s.beta)) == pytest.approx(b.m, rel=1e-9, abs=1e-9 * scale / b.inner)
    ok = s.cos[s.cos_defined]
    assert np.all((-1 <= ok) & (ok <= 1))


@SETTINGS
@given(params=profile_inputs, etas=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8))
def test_identity_preconditioner_gives_back_rho(params, etas):
    b = _profile_case(params)
    s = b.stats()
    p = DirectionStats(b.n, b.d, b.fn, b.fn**2)  # P = 1: u = ∇f
    pts = np.array([*etas, math.inf])
    np.testing.assert_allclose(p.ratio(pts), s.ratio(pts), rtol=1e-12, atol=0, equal_nan=True)
    np.testing.assert_allclose(p.cos, s.cos, rtol=1e-12, atol=0, equal_nan=True)
    assert p.a3_holds == s.a3_holds and p.b2_holds == s.b2_holds
    assert p.profile().negative_intervals() == s.profile().negative_intervals()
    fast = EtaProfile(b.n, b.d, b.fn, inner=b.fn**2)
    np.testing.assert_allclose(
        fast.ratio(pts), s.profile().ratio(pts), rtol=1e-12, atol=0, equal_nan=True
    )
    if b.fn > 0:  # the same threshold for a target share, with the same denominator
        assert fast.min_eta_for_ratio(0.5) == pytest.approx(
            s.profile().min_eta_for_ratio(0.5), rel=1e-12
        )


@SETTINGS
@given(
    params=precond_inputs,
    s_spread=st.floats(0.0, 2.0),
    c=st.floats(1e-3, 1e3),
    etas=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=6),
)
def test_preconditioned_ratio_under_diagonal_rescaling(params, s_spread, c, etas):
    """Rescale x = S y with S a positive diagonal: gradients become S g, a metric P becomes S P S.

    The dots d^P (and ⟨∇f, u⟩) are invariant, so ρ_P(∞) = 1 in both coordinates;
    ρ_P(η) changes only through the norms the clip uses (n'_i = ‖S g_i‖). A
    constant factor c on P leaves ρ_P unchanged for every η.
    """
    b = _precond_case(params)
    assume(b.inner > 1e-12 * max(1.0, float(np.max(b.n)) ** 2))
    rng = np.random.default_rng(params[0] + 2)
    scale = np.exp(s_spread * rng.normal(size=b.g.shape[1]))
    y = BrutePreconditioned(b.g * scale, b.p * scale**2)
    np.testing.assert_allclose(y.dp, b.dp, rtol=1e-9, atol=1e-12 * np.max(np.abs(b.dp)))
    assert y.inner == pytest.approx(b.inner, rel=1e-9)
    direct = [
        sum(min(1.0, e / n) * d for n, d in zip(y.n, b.dp, strict=True) if n > 0) / (b.m * b.inner)
        for e in etas
    ]
    np.testing.assert_allclose(
        y.pstats().ratio(np.array(etas)), direct, rtol=1e-8, atol=1e-10 * float(np.max(y.n))
    )
    assert y.pstats().ratio(math.inf) == pytest.approx(1.0, rel=1e-8)
    scaled = BrutePreconditioned(b.g, b.p * c)
    np.testing.assert_allclose(
        scaled.pstats().ratio(np.array([*etas, math.inf])),
        b.pstats().ratio(np.array([*etas, math.inf])),
        rtol=1e-9,
        atol=1e-11,
    )


def test_direction_stats_conventions_and_errors():
    s = DirectionStats([1.0, 0.0], [0.0, 0.0], 0.0, 0.0)  # ∇f = 0: u = 0
    assert "zero_direction" in s.flags and math.isnan(s.ratio(1.0)) and not s.a3_holds
    assert math.isnan(s.profile().min_eta_for_ratio(0.5))
    with pytest.raises(ValueError, match="inner"):
        DirectionStats([1.0], [1.0], 1.0, -1.0)
    with pytest.raises(NonFiniteError):
        DirectionStats([1.0], [1.0], 1.0, math.nan)
    with pytest.raises(ValueError, match="direction_norm"):
        DirectionStats([1.0], [1.0], -1.0, 1.0)
    bad = DirectionStats([1.0, 1.0], [1.0, 1.0], 0.5, 0.5)  # |d| > n‖u‖, Σd ≠ m⟨∇f, u⟩
    assert "cauchy_schwarz_violation" in bad.flags and "dots_sum_mismatch" in bad.flags
    again = DirectionStats.from_dict(json.loads(json.dumps(bad.to_dict())))
    assert again.to_dict() == bad.to_dict() and again.summary()["flags"] == bad.flags
