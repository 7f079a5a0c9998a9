"""Example 1 of the paper: closed form, watershed, and the three clipped methods."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope import example1
from clipscope.math import theory

COEFS = (-2.0, -2.0, 10.0)  # gradients of f1 = f2 = -x^2, f3 = 5x^2


def clip_by_norm(g: float, eta: float) -> float:
    """C(g; η) = min{1, η/‖g‖}·g written out, C(0) = 0."""
    if g == 0.0:
        return 0.0
    return min(1.0, eta / abs(g)) * g


def brute_expected_step(x: float, eta: float) -> float:
    return sum(clip_by_norm(a * x, eta) for a in COEFS) / len(COEFS)


@pytest.mark.parametrize("alpha", [1e-4, 0.01, 0.1, 0.3, 1.0, 2.5])
def test_paper_expected_x1(alpha):
    """The paper: x0 = 1, η = 2 gives E[x1] = 1 + 2α/3 — a step away from 0."""
    assert theory.expected_x1(1.0, alpha, 2.0) == pytest.approx(1 + 2 * alpha / 3, rel=1e-15)
    assert theory.expected_x1(-1.0, alpha, 2.0) == pytest.approx(-(1 + 2 * alpha / 3), rel=1e-15)


def test_objective_is_x_squared():
    """The objective f = (1/3)(−x² − x² + 5x²) = x², so the mean gradient is 2x."""
    assert sum(COEFS) / 3 == 2.0
    assert theory.EXAMPLE1_COEFFICIENTS == COEFS


@settings(max_examples=200, deadline=None)
@given(x=st.floats(-50, 50), eta=st.floats(1e-3, 1e3))
def test_closed_form_matches_brute_force_average(x, eta):
    got = theory.expected_clipped_step(x, eta)
    assert got == pytest.approx(brute_expected_step(x, eta), rel=1e-12, abs=1e-12 * eta)


def test_closed_form_vectorised_and_against_project_clip():
    torch = pytest.importorskip("torch")
    from clipscope.clipping import clip

    xs = np.linspace(-3, 3, 61)
    got = theory.expected_clipped_step(xs, 2.0)
    assert got.shape == xs.shape
    ref = [
        sum(float(clip(torch.tensor([a * x], dtype=torch.float64), 2.0)) for a in COEFS) / 3
        for x in xs
    ]
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)


def test_no_clipping_is_the_full_gradient():
    xs = np.linspace(-100, 100, 41)
    np.testing.assert_allclose(theory.expected_clipped_step(xs, math.inf), 2 * xs, rtol=1e-14)
    assert theory.example1_watershed(math.inf) == math.inf


@settings(max_examples=200, deadline=None)
@given(x=st.floats(-20, 20), eta=st.floats(1e-2, 1e2))
def test_watershed_is_eta_over_4(x, eta):
    """x·E[C](x) > 0 (step toward 0) iff 0 < |x| < η/4; < 0 iff |x| > η/4."""
    w = theory.example1_watershed(eta)
    assert w == eta / 4
    step = theory.expected_clipped_step(x, eta)
    if abs(abs(x) - w) < 1e-9 * eta or x == 0:
        return
    toward = np.sign(step) == np.sign(x)
    assert toward == (abs(x) < w)
    assert (np.sign(step) == -np.sign(x)) == (abs(x) > w)


@pytest.mark.parametrize("eta", [0.5, 2.0, 7.0])
def test_watershed_is_a_zero_of_the_expected_step(eta):
    w = theory.example1_watershed(eta)
    assert theory.expected_clipped_step(w, eta) == pytest.approx(0, abs=1e-15 * eta)
    assert theory.expected_clipped_step(-w, eta) == pytest.approx(0, abs=1e-15 * eta)
    assert theory.example1_watershed(2.0) == 0.5  # DESIGN: |x| = 1/2 for η = 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: theory.expected_clipped_step(1.0, 0.0), "eta"),
        (lambda: theory.expected_clipped_step(1.0, math.nan), "eta"),
        (lambda: theory.expected_clipped_step(math.nan, 2.0), "x"),
        (lambda: theory.expected_x1(1.0, 0.0, 2.0), "alpha"),
        (lambda: theory.expected_x1(1.0, -1.0, 2.0), "alpha"),
        (lambda: theory.example1_watershed(-2.0), "eta"),
        (lambda: example1.simulate("adam", x0=1, alpha=0.1, eta=2, epochs=1), "adam"),
        (lambda: example1.simulate("sgd", x0=math.inf, alpha=0.1, eta=2, epochs=1), "x0"),
        (lambda: example1.simulate("sgd", x0=1, alpha=0, eta=2, epochs=1), "alpha"),
        (lambda: example1.simulate("sgd", x0=1, alpha=0.1, eta=0, epochs=1), "eta"),
        (lambda: example1.simulate("sgd", x0=1, alpha=0.1, eta=2, epochs=-1), "epochs"),
        (lambda: example1.simulate("sgd", x0=1, alpha=0.1, eta=2, epochs=1, runs=0), "runs"),
    ],
    ids=[
        "eta0", "etanan", "xnan", "alpha0", "alphaneg", "watershed", "method", "x0inf",
        "sim-alpha", "sim-eta", "sim-epochs", "sim-runs",
    ],
)  # fmt: skip
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------- simulations


def brute_run(x0, alpha, eta, orders):
    """One run at a time, plain Python floats, the operator written out."""
    epochs, m, runs = orders.shape
    out = np.empty((epochs + 1, runs))
    for r in range(runs):
        x = x0
        out[0, r] = x
        for k in range(epochs):
            for j in range(m):
                x = x - alpha * clip_by_norm(COEFS[orders[k, j, r]] * x, eta)
            out[k + 1, r] = x
    return out


@pytest.mark.parametrize("method", example1.METHODS)
@pytest.mark.parametrize("x0", [1.0, -0.3, 0.05])
def test_vectorised_runs_match_brute_force(method, x0):
    orders = example1.component_orders(method, 15, 7, np.random.default_rng(3))
    got = example1.run_orders(x0, 0.07, 2.0, orders)
    np.testing.assert_allclose(got, brute_run(x0, 0.07, 2.0, orders), rtol=1e-14, atol=1e-300)


def test_orders_per_method():
    rng = np.random.default_rng(1)
    igc = example1.component_orders("igc", 4, 9, rng)
    assert igc.shape == (4, 3, 1)
    assert (igc[:, :, 0] == [0, 1, 2]).all()
    rr = example1.component_orders("rr", 50, 9, rng)
    assert rr.shape == (50, 3, 9)
    assert (np.sort(rr, axis=1) == np.arange(3)[None, :, None]).all()  # each epoch a permutation
    assert len({tuple(rr[k, :, r]) for k in range(50) for r in range(9)}) == 6
    sgd = example1.component_orders("sgd", 50, 9, rng)
    assert set(np.unique(sgd)) == {0, 1, 2}
    assert any(len(set(sgd[k, :, r])) < 3 for k in range(50) for r in range(9))  # repeats


def test_seeded_and_reproducible():
    a = example1.simulate("sgd", x0=1.0, alpha=0.05, eta=2.0, epochs=20, runs=30, seed=5)
    b = example1.simulate("sgd", x0=1.0, alpha=0.05, eta=2.0, epochs=20, runs=30, seed=5)
    c = example1.simulate("sgd", x0=1.0, alpha=0.05, eta=2.0, epochs=20, runs=30, seed=6)
    np.testing.assert_array_equal(a.trajectory, b.trajectory)
    assert not np.array_equal(a.trajectory, c.trajectory)


def test_one_sgd_step_averages_to_expected_x1():
    """Monte Carlo of a single clipped SGD step against E[x1] = 1 + 2α/3."""
    alpha, n = 0.3, 200_000
    orders = np.random.default_rng(11).integers(0, 3, size=(1, 1, n))
    x1 = example1.run_orders(1.0, alpha, 2.0, orders)[1]
    stderr = x1.std() / math.sqrt(n)
    assert abs(x1.mean() - (1 + 2 * alpha / 3)) < 5 * stderr


def test_igc_from_one_moves_out_by_alpha_eta_per_epoch():
    """For |x| ≥ η/2 every component is clipped: +αη, +αη, −αη each epoch."""
    r = example1.simulate("igc", x0=1.0, alpha=0.01, eta=2.0, epochs=100)
    assert r.deterministic and r.runs == 1
    np.testing.assert_allclose(r.trajectory[:, 0], 1.0 + 0.02 * np.arange(101), rtol=1e-12)


@pytest.mark.parametrize("method", example1.METHODS)
def test_diverges_from_one_and_converges_inside_the_watershed(method):
    alpha, eta, epochs = 0.01, 2.0, 150
    out = example1.simulate(method, x0=1.0, alpha=alpha, eta=eta, epochs=epochs, runs=300)
    s = out.summary()
    assert s["fraction_away"] == 1.0
    # every run ends beyond x0 + a quarter of the all-clipped drift of αη per epoch
    assert s["min_abs_final"] > 1.0 + 0.25 * alpha * eta * epochs
    inside = example1.simulate(method, x0=0.25, alpha=alpha, eta=eta, epochs=epochs, runs=300)
    s = inside.summary()
    assert s["fraction_toward"] == 1.0
    assert s["median_abs_final"] < 1e-3
    assert s["max_abs_final"] < 0.25
    # the same from the negative side, by symmetry of Example 1
    neg = example1.simulate(method, x0=-0.25, alpha=alpha, eta=eta, epochs=epochs, runs=300)
    assert neg.summary()["fraction_toward"] == 1.0


def test_no_clipping_converges_from_one():
    """Without clipping the same start converges: clipping causes the divergence."""
    for method in example1.METHODS:
        r = example1.simulate(method, x0=1.0, alpha=0.01, eta=math.inf, epochs=150, runs=100)
        assert r.summary()["fraction_toward"] == 1.0


def test_unclipped_overflow_is_reported_not_hidden():
    """With η = ∞ and a large step the iterates overflow; the summary says so."""
    r = example1.simulate("igc", x0=1.0, alpha=5.0, eta=math.inf, epochs=300)
    s = r.summary()
    assert s["fraction_overflow"] == 1.0
    assert s["fraction_away"] == s["fraction_toward"] == 0.0
    assert s["median_abs_final"] is None
    clipped = example1.simulate("igc", x0=1.0, alpha=5.0, eta=2.0, epochs=300).summary()
    assert clipped["fraction_overflow"] == 0.0  # |x_T| <= |x_0| + 3Tαη
