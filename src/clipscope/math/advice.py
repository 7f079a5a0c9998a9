r"""η advice: which clipping thresholds keep descent, exactly, from the η-profiles of a run.

At a probed point ``x_k`` the descent product of the clipped sum is the
piecewise-linear η-profile ``D_k(η) = Σ_i min{n_i, η}·d_i/n_i`` (23)
(:class:`~clipscope.math.stats.EtaProfile`); the unclipped descent is
``D_k(∞) = Σ_i d_i`` (``= m‖∇f_k‖²`` by (20)) and the share of it that
clipping at η keeps is

.. math:: ρ_k(η) = D_k(η) / D_k(∞).

(The report's ``ρ`` divides by ``m‖∇f_k‖²`` instead; the two agree to the
rounding of the stored ``d_i`` -- :class:`~clipscope.math.stats.ComponentStats`
flags ``dots_sum_mismatch`` when they do not. Dividing by ``D_k(∞)`` makes
``ρ_k(η) = 1`` exactly for ``η ≥ max_i n_i``, so a target of 1 is well posed.)

Two thresholds per point, both exact functions of the profile:

* the **safe threshold** for a target share ``τ ∈ (0, 1]``,

  .. math:: η_k(τ) = \inf\{η > 0 : ρ_k(η') ≥ τ \text{ for every } η' ≥ η\},

  the smallest η from which on every larger threshold keeps at least ``τ`` of
  the descent (ρ need not be monotone, so "from which on" matters). It is
  finite (``ρ_k = 1`` past the largest norm) and positive (``ρ_k(0^+) = 0``);
* the **reversal threshold** ``r_k = \sup\{η > 0 : D_k(η) < 0\}`` (``0.0``
  when no η reverses descent at ``x_k``).

Over the probes ``k`` of a run (or of several runs):

* ``eta_max = max_k η_k(τ)``: the threshold every probe needs -- every
  ``η ≥ eta_max`` keeps ``ρ_k(η) ≥ τ`` at every probe, and just below it some
  probe keeps less;
* ``eta_reversal = max_k r_k``: every ``η > eta_reversal`` keeps ``D_k(η) ≥ 0``
  at every probe; just below it (when > 0) clipping reverses descent at some probe.

Both are computed piece by piece from the sorted norms (O(m log m) per
point); :func:`advise_on_grid` is the slow twin that evaluates ρ directly
(:meth:`ComponentStats.descent`) on a fine grid and is compared with
:func:`advise` in the tests.

The advice describes the points the run visited -- a trajectory that itself
depends on the η it was trained with -- not other trajectories.

Example 1 of the paper at ``x = 1`` (``g = (−2, −2, 10)``, ``∇f = 2``,
``D(∞) = 12``): ``D(η) = −2η`` for ``η ≤ 2`` and ``2η − 8`` for ``2 ≤ η ≤ 10``, so
clipping reverses descent for every ``η < 4`` and keeps half of it from ``η = 7`` on:

>>> from clipscope.math.stats import EtaProfile
>>> p = EtaProfile([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)
>>> reversal_threshold(p), safe_threshold(p, 0.5)
(4.0, 7.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipscope.math.stats import ComponentStats, DirectionStats, EtaProfile

__all__ = [
    "DEFAULT_TARGET",
    "EtaAdvice",
    "PointAdvice",
    "advice_grid",
    "advise",
    "advise_on_grid",
    "check_target",
    "grid_reversal_threshold",
    "grid_safe_threshold",
    "reversal_threshold",
    "safe_threshold",
    "unclipped_descent",
]

#: The default target share of the unclipped descent.
DEFAULT_TARGET = 0.9


def check_target(target: Any) -> float:
    """Validate a target share ``τ ∈ (0, 1]`` and return it as a float.

    >>> check_target(0.9)
    0.9
    >>> check_target(1.5)
    Traceback (most recent call last):
    ...
    ValueError: target must be in (0, 1], got 1.5
    """
    if isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise ValueError(f"target must be a number in (0, 1], got {target!r}")
    value = float(target)
    if not (0.0 < value <= 1.0):  # also NaN
        raise ValueError(f"target must be in (0, 1], got {target!r}")
    return value


def unclipped_descent(profile: EtaProfile) -> float:
    """``D(∞) = Σ_i d_i`` over the non-zero components (the last piece's constant)."""
    return float(profile.pieces[2][-1])


def _pieces(profile: EtaProfile):
    lo, hi, A, S = profile.pieces
    return [tuple(map(float, piece)) for piece in zip(lo, hi, A, S, strict=True)]


def safe_threshold(profile: EtaProfile, target: float = DEFAULT_TARGET) -> float:
    """``η(τ) = inf{η > 0 : ρ(η') ≥ τ for all η' ≥ η}`` with ``ρ = D/D(∞)``: exact.

    Walks the linear pieces of ``D`` from the last (``η ≥ max n_i``, where
    ``ρ = 1``) towards 0; the first piece whose left end falls below ``τ·D(∞)``
    holds the answer, the root of ``A + Sη = τ·D(∞)`` there. Returns NaN when
    ``D(∞) ≤ 0`` (a zero full gradient: ρ is undefined).

    Raises
    ------
    ValueError
        A target outside (0, 1].
    """
    target = check_target(target)
    total = unclipped_descent(profile)
    if not total > 0:
        return math.nan
    level = target * total
    for lo, hi, A, S in reversed(_pieces(profile)):
        if A + S * lo >= level:  # the whole piece keeps the target (its right end did)
            continue
        # D(lo) < level <= D(hi): S > 0 and the crossing lies in [lo, hi] (S <= 0 only by
        # rounding between neighbouring pieces' constants: then the crossing is at hi)
        return min(hi, max(lo, (level - A) / S)) if S > 0 else hi
    return 0.0  # pragma: no cover - D(0+) = 0 < level always stops the walk


def reversal_threshold(profile: EtaProfile) -> float:
    """``sup{η > 0 : D(η) < 0}``: exact; ``0.0`` when ``D(η) ≥ 0`` for every ``η > 0``.

    Walks the pieces from the last towards 0; in the first piece where ``D``
    is negative at its left end, ``D`` crosses 0 at ``−A/S`` (``S > 0``
    because ``D`` is ``≥ 0`` at the right end). Returns NaN when ``D(∞) ≤ 0``.
    """
    total = unclipped_descent(profile)
    if not total > 0:
        return math.nan
    for lo, hi, A, S in reversed(_pieces(profile)):
        if A + S * lo >= 0:
            continue
        return min(hi, max(lo, -A / S)) if S > 0 else hi  # S <= 0: rounding, see above
    return 0.0


@dataclass(frozen=True)
class PointAdvice:
    """The two thresholds at one probed point.

    Attributes
    ----------
    label : str
        Which point (e.g. ``"igc-B16 epoch 3"``).
    safe : float
        ``η_k(τ)`` (NaN when ``‖∇f_k‖ = 0``).
    reversal : float
        ``r_k`` (0.0: no reversal at any η; NaN when ``‖∇f_k‖ = 0``).
    """

    label: str
    safe: float
    reversal: float


@dataclass(frozen=True)
class EtaAdvice:
    """The η advice over a set of probed points (see the module docstring).

    Attributes
    ----------
    target : float
        ``τ``.
    eta_max : float
        ``max_k η_k(τ)`` over the points with a defined ρ (NaN when none).
    eta_reversal : float
        ``max_k r_k`` (0.0: clipping reverses descent at no η and no point).
    points : tuple of PointAdvice
        Per point, in the order given.
    decided_by : str or None
        The label of the point that sets ``eta_max``.
    reversal_at : str or None
        The label of the point that sets ``eta_reversal`` (None when 0).
    skipped : tuple of str
        Points left out because ρ is undefined there (``‖∇f_k‖ = 0``).
    """

    target: float
    eta_max: float
    eta_reversal: float
    points: tuple[PointAdvice, ...] = field(default=())
    decided_by: str | None = None
    reversal_at: str | None = None
    skipped: tuple[str, ...] = ()

    def to_dict(self, points: bool = False) -> dict[str, Any]:
        """JSON-ready values (NaN → ``None``); with ``points`` the per-point thresholds too."""
        out: dict[str, Any] = {
            "target": self.target,
            "eta_max": _json(self.eta_max),
            "eta_reversal": _json(self.eta_reversal),
            "decided_by": self.decided_by,
            "reversal_at": self.reversal_at,
            "n_points": len(self.points) - len(self.skipped),
            "skipped": list(self.skipped),
        }
        if points:
            out["points"] = [
                {"label": p.label, "safe": _json(p.safe), "reversal": _json(p.reversal)}
                for p in self.points
            ]
        return out


def _json(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _combine(target: float, labels: Sequence[str], safe, reversal) -> EtaAdvice:
    points = tuple(
        PointAdvice(label, float(s), float(r))
        for label, s, r in zip(labels, safe, reversal, strict=True)
    )
    good = [p for p in points if math.isfinite(p.safe)]
    skipped = tuple(p.label for p in points if not math.isfinite(p.safe))
    if not good:
        return EtaAdvice(target, math.nan, math.nan, points, None, None, skipped)
    top = max(good, key=lambda p: p.safe)
    rev = max(good, key=lambda p: p.reversal)
    return EtaAdvice(
        target,
        top.safe,
        rev.reversal,
        points,
        top.label,
        rev.label if rev.reversal > 0 else None,
        skipped,
    )


def _labels(n: int, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return [f"point {k}" for k in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} points")
    return [str(label) for label in labels]


def _profile(point: Any) -> EtaProfile:
    if isinstance(point, EtaProfile):
        return point
    if isinstance(point, DirectionStats):  # ComponentStats too (the case u = ∇f)
        return point.profile()
    norms, dots, grad_norm = point
    return EtaProfile(norms, dots, grad_norm)


def advise(
    points: Iterable[Any], target: float = DEFAULT_TARGET, labels: Sequence[str] | None = None
) -> EtaAdvice:
    """Exact η advice over probed points.

    Parameters
    ----------
    points : iterable
        :class:`EtaProfile`, :class:`ComponentStats`, :class:`DirectionStats`
        (the preconditioned dots ``d^P_i = ⟨g_i, P⁻¹∇f⟩``: then ρ is ρ_P) or
        ``(norms, dots, grad_norm)`` triples, one per probed point.
    target : float
        ``τ ∈ (0, 1]``, the share of the unclipped descent to keep.
    labels : sequence of str, optional
        Names of the points (default ``"point k"``).

    Returns
    -------
    EtaAdvice

    Raises
    ------
    ValueError
        A target outside (0, 1], no points, bad point data.

    Two components ``g = (1, 0), (3, 0)``: ``∇f = (2, 0)``, ``D(η) = 2 + 2η`` on ``[1, 3]``.

    >>> a = advise([([1.0, 3.0], [2.0, 6.0], 2.0)], target=0.75)
    >>> a.eta_max, a.eta_reversal
    (2.0, 0.0)
    """
    target = check_target(target)
    profiles = [_profile(p) for p in points]
    if not profiles:
        raise ValueError("no probed points to advise on")
    safe = [safe_threshold(p, target) for p in profiles]
    rev = [reversal_threshold(p) for p in profiles]
    return _combine(target, _labels(len(profiles), labels), safe, rev)


# -- the slow twin: ρ on a fine grid ------------------------------------------------


def advice_grid(norms_list: Iterable[Any], per_decade: int = 2000) -> np.ndarray:
    """Return a fine geometric grid of η covering every point's norms, plus the norms themselves.

    From a tenth of the smallest positive norm to ten times the largest, with
    ``per_decade`` points per factor of 10 (ratio ``10^(1/per_decade)`` between
    neighbours), and every norm added so that each linear piece of ``D`` has its
    ends on the grid.
    """
    norms = np.concatenate([np.asarray(n, dtype=np.float64).ravel() for n in norms_list])
    positive = norms[norms > 0]
    if positive.size == 0:
        return np.array([1.0])
    lo, hi = positive.min() / 10, positive.max() * 10
    decades = math.log10(hi / lo)
    grid = np.geomspace(lo, hi, max(2, math.ceil(decades * per_decade) + 1))
    return np.unique(np.concatenate([grid, positive]))


def _grid_ratio(stats: DirectionStats, grid: np.ndarray) -> np.ndarray:
    total = float(stats.descent(math.inf))
    return np.asarray(stats.descent(grid)) / total


def grid_safe_threshold(stats: DirectionStats, target: float, grid: np.ndarray) -> float:
    """Return the smallest grid η from which on every grid η keeps ``ρ ≥ τ`` (direct evaluation).

    ``grid`` must be sorted and reach past ``max n_i``. NaN when ``D(∞) ≤ 0``.
    """
    target = check_target(target)
    if not float(stats.descent(math.inf)) > 0:
        return math.nan
    bad = np.flatnonzero(_grid_ratio(stats, grid) < target)
    if bad.size == 0:
        return float(grid[0])
    if bad[-1] + 1 >= grid.size:
        return math.inf
    return float(grid[bad[-1] + 1])


def grid_reversal_threshold(stats: DirectionStats, grid: np.ndarray) -> float:
    """Return the largest grid η with ``D(η) < 0`` (direct evaluation); 0.0 when there is none."""
    if not float(stats.descent(math.inf)) > 0:
        return math.nan
    bad = np.flatnonzero(np.asarray(stats.descent(grid)) < 0)
    return float(grid[bad[-1]]) if bad.size else 0.0


def advise_on_grid(
    points: Iterable[Any],
    target: float = DEFAULT_TARGET,
    labels: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
) -> EtaAdvice:
    """Advise as :func:`advise` does, from ρ evaluated directly on a fine grid of η.

    ``points`` are :class:`ComponentStats`, :class:`DirectionStats` or
    ``(norms, dots, grad_norm)`` triples; ``grid`` defaults to :func:`advice_grid`
    of their norms. On a grid that holds every norm, the grid answers bracket the exact ones:
    ``η(τ) ≤ grid safe ≤ the next grid point`` and ``the previous grid point ≤
    grid reversal ≤ r`` (each linear piece of ``D`` has its ends on the grid).
    """
    target = check_target(target)
    stats = [p if isinstance(p, DirectionStats) else ComponentStats(*p) for p in points]
    if not stats:
        raise ValueError("no probed points to advise on")
    if grid is None:
        grid = advice_grid(s.norms for s in stats)
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    safe = [grid_safe_threshold(s, target, grid) for s in stats]
    rev = [grid_reversal_threshold(s, grid) for s in stats]
    return _combine(target, _labels(len(stats), labels), safe, rev)
