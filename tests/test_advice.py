"""η advice (clipscope.math.advice): the exact thresholds against ρ evaluated on a fine grid.

The slow twin evaluates ``D(η)`` directly (``ComponentStats.descent``, O(m) per η) on a
geometric grid that also holds every norm; the exact answers come from the pieces of the
η-profile. On such a grid the two must bracket each other within one grid step.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipscope.math.advice import (
    advice_grid,
    advise,
    advise_on_grid,
    check_target,
    grid_reversal_threshold,
    grid_safe_threshold,
    reversal_threshold,
    safe_threshold,
)
from clipscope.math.stats import ComponentStats, EtaProfile

SETTINGS = settings(deadline=None, max_examples=80)
PER_DECADE = 400
STEP = 10 ** (1 / PER_DECADE)  # ratio of neighbouring grid points


def from_vectors(g: np.ndarray) -> ComponentStats:
    """(n_i, d_i, ‖∇f‖) of explicit component vectors, float64."""
    g = np.asarray(g, dtype=np.float64)
    full = g.mean(axis=0)
    return ComponentStats(np.linalg.norm(g, axis=1), g @ full, float(np.linalg.norm(full)))


vectors = arrays(
    np.float64,
    st.tuples(st.integers(1, 10), st.integers(1, 4)),
    elements=st.floats(-100, 100, allow_subnormal=False),
)


def _ratio(stats: ComponentStats, etas) -> np.ndarray:
    return np.asarray(stats.descent(etas)) / float(stats.descent(math.inf))


@SETTINGS
@given(g=vectors, target=st.floats(0.02, 0.99))
def test_safe_threshold_is_bracketed_by_the_grid_twin(g, target):
    stats = from_vectors(g)
    total = float(stats.descent(math.inf))
    assume(total > 1e-9 * max(1.0, float(np.sum(np.abs(stats.dots)))))
    grid = advice_grid([stats.norms], per_decade=PER_DECADE)
    # no grid point sits on the target within rounding (ties are decided by rounding only)
    assume(np.min(np.abs(_ratio(stats, grid) - target)) > 1e-9)
    exact = safe_threshold(stats.profile(), target)
    slow = grid_safe_threshold(stats, target, grid)
    assert 0 < exact <= stats.norms.max() * (1 + 1e-12)
    assert slow >= exact * (1 - 1e-9)
    assert slow <= max(exact * STEP, grid[0]) * (1 + 1e-9)
    # the definition, directly: every η ≥ η* keeps the target; just below it, some η does not
    above = np.geomspace(exact, 10 * stats.norms.max(), 300)
    assert np.all(_ratio(stats, above) >= target - 1e-9)
    assert _ratio(stats, exact * (1 - 1e-6)) < target + 1e-9


@SETTINGS
@given(g=vectors)
def test_reversal_threshold_is_bracketed_by_the_grid_twin(g):
    stats = from_vectors(g)
    total = float(stats.descent(math.inf))
    assume(total > 1e-9 * max(1.0, float(np.sum(np.abs(stats.dots)))))
    grid = advice_grid([stats.norms], per_decade=PER_DECADE)
    values = np.asarray(stats.descent(grid))
    assume(np.min(np.abs(values)) > 1e-9 * total)
    exact = reversal_threshold(stats.profile())
    slow = grid_reversal_threshold(stats, grid)
    if exact == 0.0:
        assert slow == 0.0
        assert np.all(values >= 0)
    else:
        assert slow <= exact * (1 + 1e-9)
        assert slow >= exact / STEP * (1 - 1e-9)
        assert float(stats.descent(exact * (1 - 1e-6))) < 1e-9 * total
        after = np.geomspace(exact * (1 + 1e-9), exact * 1e3, 200)
        assert np.all(np.asarray(stats.descent(after)) >= -1e-9 * total)


@SETTINGS
@given(g=vectors, a=st.floats(0.02, 1.0), b=st.floats(0.02, 1.0))
def test_safe_threshold_grows_with_the_target_and_stops_at_the_largest_norm(g, a, b):
    stats = from_vectors(g)
    assume(float(stats.descent(math.inf)) > 1e-9)
    lo, hi = sorted((a, b))
    p = stats.profile()
    assert safe_threshold(p, lo) <= safe_threshold(p, hi) * (1 + 1e-12)
    assert safe_threshold(p, 1.0) <= stats.norms.max() * (1 + 1e-12)


@SETTINGS
@given(g=vectors, target=st.floats(0.02, 0.99))
def test_advise_over_points_is_the_max_of_the_points(g, target):
    points = [from_vectors(g), from_vectors(g * 2 + 1), from_vectors(-g + 0.5)]
    points = [s for s in points if float(s.descent(math.inf)) > 1e-9]
    assume(points)
    out = advise(points, target)
    per = [safe_threshold(s.profile(), target) for s in points]
    rev = [reversal_threshold(s.profile()) for s in points]
    assert out.eta_max == max(per)
    assert out.eta_reversal == max(rev)
    assert out.decided_by == f"point {per.index(max(per))}"
    json.dumps(out.to_dict(points=True), allow_nan=False)


def test_example_1_known_answers():
    # g = (-2, -2, 10) at x = 1, ∇f = 2: D(η) = -2η on [0, 2], 2η - 8 on [2, 10], 12 after
    p = EtaProfile([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)
    assert reversal_threshold(p) == 4.0
    assert safe_threshold(p, 0.5) == 7.0
    assert safe_threshold(p, 1.0) == 10.0
    out = advise([p], 0.9, labels=["x=1"])
    assert (out.eta_max, out.eta_reversal, out.decided_by, out.reversal_at) == (
        pytest.approx(9.4),
        4.0,
        "x=1",
        "x=1",
    )
    twin = advise_on_grid([ComponentStats([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)], 0.9)
    assert twin.eta_max == pytest.approx(9.4, rel=1e-3)
    assert twin.eta_reversal == pytest.approx(4.0, rel=2e-3) and twin.eta_reversal <= 4.0


def test_no_clipping_needed_when_every_component_points_the_same_way():
    # parallel components: D(η) > 0 for every η, ρ(η) reaches 1 only at the largest norm
    stats = ComponentStats([1.0, 3.0], [2.0, 6.0], 2.0)
    assert reversal_threshold(stats.profile()) == 0.0
    assert safe_threshold(stats.profile(), 0.75) == 2.0
    assert safe_threshold(stats.profile(), 1.0) == 3.0


def test_zero_full_gradient_points_are_skipped_and_named():
    zero = ComponentStats([1.0, 1.0], [0.0, 0.0], 0.0)
    good = ComponentStats([1.0, 3.0], [2.0, 6.0], 2.0)
    out = advise([zero, good], 0.75, labels=["flat", "good"])
    assert out.skipped == ("flat",)
    assert out.eta_max == 2.0 and out.decided_by == "good"
    assert math.isnan(advise([zero], 0.5).eta_max)
    assert advise([zero], 0.5).to_dict()["eta_max"] is None


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, math.nan, math.inf, True, "0.9", None])
def test_target_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="target"):
        check_target(bad)
    with pytest.raises(ValueError, match="target"):
        advise([([1.0], [1.0], 1.0)], bad)


def test_no_points_and_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="no probed points"):
        advise([])
    with pytest.raises(ValueError, match="labels"):
        advise([([1.0], [1.0], 1.0)], labels=["a", "b"])


def test_grid_covers_the_norms_and_holds_them():
    grid = advice_grid([np.array([0.0, 2.0, 0.5])], per_decade=10)
    assert grid[0] == pytest.approx(0.05) and grid[-1] == pytest.approx(20.0)
    assert {0.5, 2.0} <= set(grid.tolist())
    assert np.all(np.diff(grid) > 0)


def test_a_subnormal_component_does_not_divide_by_a_zero_slope():
    # found by hypothesis: rounding between neighbouring pieces left S = 0 where D(lo) < 0
    g = np.array([[-1.0], [2.0], [-1.17549435e-38]])
    for points in (g, g * 2 + 1, -g + 0.5):
        stats = from_vectors(points)
        p = stats.profile()
        assert math.isfinite(reversal_threshold(p)) and math.isfinite(safe_threshold(p, 0.5))
