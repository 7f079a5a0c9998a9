r"""Adaptive clipping thresholds: descent-safe (from the exact η-profile) and AutoClip.

Two rules that set the threshold η while training (``eta = "descent-safe"`` and
``eta = "autoclip"`` in :class:`clipscope.config.FitConfig`; the loop's units
are :mod:`clipscope.loop.thresholds`). Both are pure functions of numbers the
run stores, so every decision can be recomputed from the run directory.

**Descent-safe** (at each probe x_k; η stays fixed until the next probe). With
the exact descent profile ``D_k(η) = Σ_i min{n_i, η}·d_i/n_i`` (23)
(:class:`~clipscope.math.stats.EtaProfile`) and its share of the unclipped
descent ``ρ_k(η) = D_k(η)/D_k(∞)``, the rule takes, for a target ``ρ* ∈ (0, 1]``,

.. math:: η_k = \mathrm{clamp}\bigl(η^*_k,\ η_{min},\ η_{max}\bigr), \qquad
          η^*_k = \inf\{η > 0 : ρ_k(η') ≥ ρ^* \text{ for every } η' ≥ η\},

the smallest threshold from which on every larger one keeps at least ``ρ*`` of
the descent (:func:`clipscope.math.advice.safe_threshold`: ρ is not monotone, so
"from which on" matters). Then ``ρ_k(η_k) ≥ ρ*`` and, unless a bound is active,
some η just below η_k keeps less. Cases:

* ``ρ*`` in (0, 1] is always reached (``ρ_k = 1`` for η ≥ max n_i) and η*_k > 0
  (``ρ_k(0^+) = 0``): there is always exactly one answer when ρ is defined;
* ρ undefined (``D_k(∞) ≤ 0``: a zero full gradient, or with Adam/AdamW a zero
  ⟨∇f, u⟩): no η reaches ρ*; the rule takes ``η_max`` (``∞`` = no clipping when
  unset) and says so (``reason = "undefined"``);
* η*_k below ``η_min`` or above ``η_max``: the bound, ``reason = "eta_min"`` /
  ``"eta_max"`` (ρ_k at the bound may then be below ρ*).

With an adaptive optimizer (Adam, AdamW) the profile is the preconditioned one:
dots ``d^P_i = ⟨g_i, u⟩`` with ``u = P⁻¹∇f`` (``dots_p`` of the component file),
so the rule keeps ρ_P (:class:`~clipscope.math.stats.DirectionStats`).

**AutoClip** (Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive
Gradient Clipping for Source Separation Networks", IEEE MLSP 2020): at step t,
after the backward pass, append ‖∇f_{i_t}(x_t)‖ to the history of all gradient
norms observed so far and clip at

.. math:: η_t = \mathrm{percentile}_p(\{‖g_1‖, …, ‖g_t‖\}),

computed with :func:`numpy.percentile`'s default ("linear") interpolation, as
the paper's code does (``np.percentile(grad_history, clip_percentile)``). The
current step's norm is part of the history, so ``p = 100`` never clips.

>>> from clipscope.math.stats import EtaProfile
>>> p = EtaProfile([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)  # Example 1 at x = 1
>>> descent_safe_threshold(p, 0.5).eta
7.0
>>> autoclip_threshold([1.0, 2.0, 3.0, 4.0], 50)
2.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.math.advice import check_target, safe_threshold, unclipped_descent
from clipscope.math.stats import EtaProfile, check_eta

__all__ = [
    "RULES",
    "EtaDecision",
    "autoclip_threshold",
    "check_percentile",
    "descent_safe_threshold",
    "replay_descent_safe",
    "stored_profile",
]

#: The names ``eta`` may take besides a number.
RULES = ("descent-safe", "autoclip")


def check_percentile(p: Any) -> float:
    """Validate AutoClip's percentile ``p ∈ (0, 100]`` and return it as a float.

    >>> check_percentile(10)
    10.0
    >>> check_percentile(0)
    Traceback (most recent call last):
    ...
    ValueError: the percentile must be in (0, 100], got 0
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(f"the percentile must be a number in (0, 100], got {p!r}")
    value = float(p)
    if not 0.0 < value <= 100.0:  # also NaN
        raise ValueError(f"the percentile must be in (0, 100], got {p!r}")
    return value


def autoclip_threshold(history: Sequence[float] | np.ndarray, p: float) -> float:
    """AutoClip's η: the ``p``-th percentile of the gradient norms ``history`` (linear).

    ``history`` holds every norm observed so far, the current step's included
    (Seetharaman et al., 2020). ``numpy.percentile``'s default interpolation:
    with the sorted norms ``s_0 ≤ … ≤ s_{t−1}`` and ``h = (t − 1)·p/100``,
    ``η = s_⌊h⌋ + (h − ⌊h⌋)(s_⌊h⌋+1 − s_⌊h⌋)``.

    Raises
    ------
    ValueError
        An empty history, or ``p`` outside (0, 100].
    """
    p = check_percentile(p)
    values = np.asarray(history, dtype=np.float64)
    if values.size == 0:
        raise ValueError("AutoClip needs at least one observed gradient norm")
    return float(np.percentile(values, p))


@dataclass(frozen=True)
class EtaDecision:
    """One descent-safe decision at a probe.

    Attributes
    ----------
    eta : float
        The threshold in force from this probe on (``inf``: no clipping).
    unbounded : float
        η*_k before the bounds (NaN when ρ is undefined).
    rho : float
        ``ρ_k(eta) = D_k(eta)/D_k(∞)`` (NaN when undefined).
    reason : str
        ``"target"`` (η = η*_k), ``"eta_min"`` / ``"eta_max"`` (a bound is
        active), ``"undefined"`` (``D_k(∞) ≤ 0``: η = η_max).
    """

    eta: float
    unbounded: float
    rho: float
    reason: str


def _check_bounds(eta_min: float | None, eta_max: float | None) -> tuple[float, float]:
    lo = 0.0 if eta_min is None else check_eta(eta_min)
    hi = math.inf if eta_max is None else check_eta(eta_max)
    if lo > hi:
        raise ValueError(f"eta_min = {lo!r} is above eta_max = {hi!r}")
    return lo, hi


def descent_safe_threshold(
    profile: EtaProfile,
    target: float = 0.9,
    eta_min: float | None = None,
    eta_max: float | None = None,
) -> EtaDecision:
    """Return the descent-safe η at one probe: the smallest η keeping ``ρ ≥ ρ*`` from then on.

    Parameters
    ----------
    profile : EtaProfile
        The exact η-profile at the probe (with ``inner`` for the preconditioned dots).
    target : float
        ``ρ* ∈ (0, 1]``.
    eta_min, eta_max : float, optional
        Bounds (``> 0``; ``eta_max`` may be ``inf``); the result is clamped into them.

    Returns
    -------
    EtaDecision

    Raises
    ------
    ValueError
        ``target`` outside (0, 1], a bound ``≤ 0`` or NaN, ``eta_min > eta_max``.

    >>> from clipscope.math.stats import EtaProfile
    >>> p = EtaProfile([1.0, 3.0], [2.0, 6.0], 2.0)  # D = 2 + 2η on [1, 3], D(∞) = 8
    >>> d = descent_safe_threshold(p, 0.75)
    >>> d.eta, d.rho, d.reason
    (2.0, 0.75, 'target')
    >>> descent_safe_threshold(p, 0.75, eta_min=2.5).reason
    'eta_min'
    """
    target = check_target(target)
    lo, hi = _check_bounds(eta_min, eta_max)
    total = unclipped_descent(profile)
    if not total > 0:
        return EtaDecision(hi, math.nan, math.nan, "undefined")
    star = safe_threshold(profile, target)
    if star < lo:
        eta, reason = lo, "eta_min"
    elif star > hi:
        eta, reason = hi, "eta_max"
    else:
        eta, reason = star, "target"
    rho = 1.0 if math.isinf(eta) else float(profile(eta)) / total
    return EtaDecision(float(eta), float(star), rho, reason)


def stored_profile(arrays: Mapping[str, Any], preconditioned: bool) -> EtaProfile:
    """Return the η-profile of a probe's component arrays: of ρ, or of ρ_P (preconditioned).

    ``arrays`` holds ``norms``, ``dots``, ``grad_norm`` and, for ρ_P, ``dots_p``,
    ``u_norm`` and ``grad_u_inner`` (``components/epoch_XXXX.npz``).

    Raises
    ------
    KeyError
        ``preconditioned`` and the file has no preconditioned arrays.
    """
    if preconditioned:
        return EtaProfile(
            arrays["norms"],
            arrays["dots_p"],
            float(arrays["u_norm"]),
            inner=float(arrays["grad_u_inner"]),
        )
    return EtaProfile(arrays["norms"], arrays["dots"], float(arrays["grad_norm"]))


def replay_descent_safe(
    probes: Iterable[Mapping[str, Any]],
    target: float = 0.9,
    eta_min: float | None = None,
    eta_max: float | None = None,
    *,
    preconditioned: bool = False,
) -> list[EtaDecision]:
    """Recompute every descent-safe decision of a run from its stored component arrays.

    ``probes`` are the component files of the probes, in order (each as for
    :func:`stored_profile`); the result has one :class:`EtaDecision` per probe,
    the same the run took (it computed them from the same arrays).
    """
    return [
        descent_safe_threshold(stored_profile(a, preconditioned), target, eta_min, eta_max)
        for a in probes
    ]
