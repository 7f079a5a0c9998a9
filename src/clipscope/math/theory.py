r"""The convergence theorems of the paper and its Example 1, as pure functions.

Equation numbers are those of Qian, Wu, Zhuang, Wang, Xiao, "Understanding
Gradient Clipping in Incremental Gradient Methods" (AISTATS 2021). This module
uses only :mod:`math` and :mod:`numpy`: no autograd, no models.

Constants
---------
* ``L0, L1``: relaxed smoothness of ``f`` (A2), ``‖∇²f(x)‖ ≤ L0 + L1‖∇f(x)‖``.
* ``L0i, L1i``: the same for every component ``f_i`` (A5). A scalar means
  ``max_i``; a sequence holds one value per component and its maximum is used.
* ``c1 ∈ (0, 1]``: lower bound on ``(1/m) Σ_i cos θ_ki`` over the run (A3, (31)).
* ``c2 ∈ (0, 1]``: lower bound on ``min_i ‖g_ki‖ / max_i ‖g_ki‖`` (A4, (32)).
* ``eta``: the clipping threshold η. The theorems need a *finite* η: η = ∞
  (no clipping) is accepted by the clipping operator but rejected here with a
  :class:`ValueError`, since every bound below grows without limit in η.
* ``gap``: ``f(x_0) − f*`` (≥ 0).

Step-size conditions
--------------------
* SGD-clip, Theorem 3.1, (37): ``α ≤ c1 / (4 η L1)``.
* IGC-clip, Theorem 3.2, (44):
  ``α ≤ min{c1 / (2m(2ηL1 + G)), 1/(5 m L0i), 1/(8 m η L1i)}`` with
  ``G = 5 max_i L0i + 16 η max_i L1i`` (43).

A constant equal to 0 removes its constraint (the limit is ``math.inf``).

Bounds
------
Both theorems bound the same left side over ``T + 1`` points
``x_0 .. x_T`` (iterates for SGD-clip, epoch starts for IGC-clip)::

    (1/(T+1)) Σ_{k=0..T} min{η c1, c2 ‖∇f(x_k)‖} · ‖∇f(x_k)‖

* (38) ``≤ 2 gap/((T+1)α) + 5αη²L0 + αη³L1 c1/c2``;
* (45) ``≤ 2 gap/((T+1)αm) + 5αmη²L0 + αmη²c1(2ηL1 + G)/(2c2)``;
* drift of one IGC epoch (39) is at most ``αηm²G‖∇f_k‖`` (42).

Example 1
---------
``f_1 = f_2 = −x²``, ``f_3 = 5x²``, ``f = (1/3)Σ f_i = x²``; the component
gradients are ``−2x, −2x, 10x``. See :func:`expected_clipped_step`.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipscope.math.stats import check_eta  # the one validator of η; clipping re-exports it

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "ADAPTIVE_REASON",
    "EXAMPLE1_COEFFICIENTS",
    "THEOREMS",
    "THEOREM_SCOPE",
    "ConvergenceBound",
    "StepCondition",
    "bound_lhs",
    "drift_bound",
    "example1_watershed",
    "expected_clipped_step",
    "expected_x1",
    "igc_G",
    "igc_bound",
    "igc_step_condition",
    "igc_step_limit",
    "sgd_bound",
    "sgd_step_condition",
    "sgd_step_limit",
    "theorem_scope",
]

#: The methods a theorem of the paper covers, and the theorem.
THEOREMS = {"sgd": "Theorem 3.1 (SGD-clip)", "igc": "Theorem 3.2 (IGC-clip)"}

#: What each theorem covers besides (A2)-(A5): its update rule, exactly. A run outside
#: it gets the verdict "not applicable: <reason>" (:func:`theorem_scope`), never a bound.
THEOREM_SCOPE = {
    "sgd": (
        "SGD-clip (9): x_{k+1} = x_k − α C(∇f_{i_k}(x_k); η), i_k uniform with replacement, "
        "a constant step α, a finite η, plain SGD steps (no momentum, no weight decay)"
    ),
    "igc": (
        "IGC-clip (10)/(11): components in cyclic order 1..m every epoch, each step "
        "x ← x − α C(∇f_i(x); η), a constant step α, a finite η, plain SGD steps (no "
        "momentum, no weight decay)"
    ),
}
#: Optimizers whose step is ``P⁻¹ C(g; η)`` with a preconditioner P: no theorem of the paper.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw")
ADAPTIVE_REASON = "not covered by the paper's theorems (adaptive method)"


def theorem_scope(
    method: str,
    eta: float,
    *,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    milestones: Sequence[int] = (),
    schedule_gamma: float = 0.1,
) -> str | None:
    r"""Return None for a run inside its theorem's scope (:data:`THEOREM_SCOPE`), else why not.

    Theorem 3.1 covers SGD-clip (``method = "sgd"``) and Theorem 3.2 IGC-clip
    (``"igc"``), both with a constant step α, a finite η and the plain clipped
    step: no momentum, no weight decay, the SGD optimizer (Qian et al., (9),
    (10)/(11)). A ``"step"`` schedule without milestones (or with
    ``schedule_gamma = 1``) keeps α constant and is inside. Every reason that
    applies is given, joined by ``"; "``; an adaptive optimizer (Adam, AdamW)
    gives :data:`ADAPTIVE_REASON` first.

    >>> theorem_scope("igc", 0.5) is None
    True
    >>> print(theorem_scope("igc", 0.5, momentum=0.9, schedule="cosine").replace("; ", "\n"))
    momentum = 0.9 (the theorems cover plain steps without momentum)
    schedule = cosine (the theorems take a constant step α)
    >>> theorem_scope("sgd", 0.5, optimizer="adam")
    "not covered by the paper's theorems (adaptive method)"
    >>> theorem_scope("igc", 0.5, optimizer="AdamW") == theorem_scope("igc", 0.5, optimizer="adamw")
    True
    """
    reasons = []
    optimizer = str(optimizer).lower()  # a Monitor records the class name ("AdamW")
    if optimizer in ADAPTIVE_OPTIMIZERS:
        reasons.append(ADAPTIVE_REASON)
    elif optimizer != "sgd":
        reasons.append(f"optimizer = {optimizer} (the theorems cover plain SGD steps)")
    if method not in THEOREMS:
        who = (
            "a training loop of your own (Monitor): its update rule is not recorded"
            if method == "external"
            else f"method = {method}"
        )
        reasons.append(f"{who} (Theorem 3.1 covers method sgd, Theorem 3.2 method igc)")
    if not math.isfinite(eta):
        reasons.append("no clipping (η = ∞): the theorems are stated for a finite η")
    if momentum:
        reasons.append(f"momentum = {momentum:g} (the theorems cover plain steps without momentum)")
    if weight_decay:
        reasons.append(f"weight_decay = {weight_decay:g} (the theorems cover steps without it)")
    constant = schedule == "constant" or (
        schedule == "step" and (not milestones or schedule_gamma == 1)
    )
    if not constant:
        reasons.append(f"schedule = {schedule} (the theorems take a constant step α)")
    return "; ".join(reasons) or None


# ---------------------------------------------------------------------------
# input checks: each names the bad argument and runs before any arithmetic


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _nonneg(name: str, value: Any) -> float:
    value = _real(name, value)
    if not (0.0 <= value < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    value = _real(name, value)
    if not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def _unit(name: str, value: Any) -> float:
    value = _real(name, value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return value


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _finite_eta(eta: Any) -> float:
    eta = check_eta(eta)
    if math.isinf(eta):
        raise ValueError(
            "eta = inf (no clipping) is outside Theorems 3.1/3.2: they need a finite "
            "clipping threshold"
        )
    return eta


def _component_max(name: str, value: Any, m: int | None) -> float:
    """Return ``max_i`` of a per-component constant given as a scalar or a sequence."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _nonneg(name, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}")
    values = [_nonneg(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not values:
        raise ValueError(f"{name} must not be empty")
    if m is not None and len(values) != m:
        raise ValueError(f"{name} has {len(values)} entries but m = {m}")
    return max(values)


def _grad_norms(grad_norms: Any, T: int | None) -> np.ndarray:
    norms = np.asarray(grad_norms, dtype=np.float64)
    if norms.ndim != 1 or norms.size == 0:
        raise ValueError(
            f"grad_norms must be a non-empty 1-D sequence of ‖∇f(x_k)‖, got shape {norms.shape}"
        )
    if not np.all(np.isfinite(norms)) or np.any(norms < 0):
        bad = int(np.flatnonzero(~np.isfinite(norms) | (norms < 0))[0])
        raise ValueError(f"grad_norms[{bad}] must be finite and >= 0, got {norms[bad]!r}")
    if T is not None:
        T = _count("T", T, 0)
        if norms.size != T + 1:
            raise ValueError(f"grad_norms has {norms.size} entries but T + 1 = {T + 1}")
    return norms


def _json_float(value: float) -> float | None:
    """``None`` stands for ∞ (no constraint) or an undefined value in JSON output."""
    return float(value) if math.isfinite(value) else None


def _safe_div(num: float, den: float) -> float:
    """``num / den`` with ``x / 0 = ∞`` for ``x > 0``: a zero constant removes a limit."""
    return math.inf if den == 0.0 else num / den


# ---------------------------------------------------------------------------
# step-size conditions


@dataclass(frozen=True)
class StepCondition:
    """A step-size condition ``α ≤ alpha_max`` and the terms of its minimum.

    Attributes
    ----------
    method : str
        ``"sgd"`` (Theorem 3.1) or ``"igc"`` (Theorem 3.2).
    equation : str
        The paper's equation number, ``"(37)"`` or ``"(44)"``.
    alpha : float
        The step size that was checked.
    alpha_max : float
        The largest allowed step; ``math.inf`` when no constant constrains it.
    terms : tuple of (str, float)
        Every term whose minimum is ``alpha_max``.
    """

    method: str
    equation: str
    alpha: float
    alpha_max: float
    terms: tuple[tuple[str, float], ...]

    @property
    def holds(self) -> bool:
        """Whether ``alpha <= alpha_max``."""
        return self.alpha <= self.alpha_max

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (``None`` stands for ∞)."""
        return {
            "method": self.method,
            "equation": self.equation,
            "alpha": self.alpha,
            "alpha_max": _json_float(self.alpha_max),
            "holds": self.holds,
            "terms": {name: _json_float(value) for name, value in self.terms},
        }


def sgd_step_limit(*, c1: float, L1: float, eta: float) -> float:
    """Largest step of Theorem 3.1 (SGD-clip), (37): ``c1 / (4 η L1)``.

    Returns ``math.inf`` when ``L1 = 0``.

    >>> sgd_step_limit(c1=0.5, L1=2.0, eta=0.25)
    0.25
    """
    c1 = _unit("c1", c1)
    L1 = _nonneg("L1", L1)
    eta = _finite_eta(eta)
    return _safe_div(c1, 4.0 * eta * L1)


def sgd_step_condition(*, alpha: float, c1: float, L1: float, eta: float) -> StepCondition:
    """Check (37) ``α ≤ c1 / (4 η L1)`` for the step ``alpha``."""
    alpha = _positive("alpha", alpha)
    limit = sgd_step_limit(c1=c1, L1=L1, eta=eta)
    return StepCondition("sgd", "(37)", alpha, limit, (("c1/(4 eta L1)", limit),))


def igc_G(*, L0i: float | Sequence[float], L1i: float | Sequence[float], eta: float) -> float:
    """Return the constant of Lemma 3.1, (43): ``G = 5 max_i L0i + 16 η max_i L1i``.

    >>> igc_G(L0i=[1.0, 2.0], L1i=0.5, eta=1.0)
    18.0
    """
    eta = _finite_eta(eta)
    return 5.0 * _component_max("L0i", L0i, None) + 16.0 * eta * _component_max("L1i", L1i, None)


def _igc_terms(
    c1: float, L1: float, L0i: Any, L1i: Any, eta: float, m: int
) -> tuple[tuple[str, float], ...]:
    c1 = _unit("c1", c1)
    L1 = _nonneg("L1", L1)
    eta = _finite_eta(eta)
    m = _count("m", m, 1)
    L0_max = _component_max("L0i", L0i, m)
    L1_max = _component_max("L1i", L1i, m)
    G = 5.0 * L0_max + 16.0 * eta * L1_max
    return (
        ("c1/(2m(2 eta L1 + G))", _safe_div(c1, 2.0 * m * (2.0 * eta * L1 + G))),
        ("1/(5m L0i)", _safe_div(1.0, 5.0 * m * L0_max)),
        ("1/(8m eta L1i)", _safe_div(1.0, 8.0 * m * eta * L1_max)),
    )


def igc_step_limit(
    *,
    c1: float,
    L1: float,
    L0i: float | Sequence[float],
    L1i: float | Sequence[float],
    eta: float,
    m: int,
) -> float:
    """Largest step of Theorem 3.2 (IGC-clip), (44).

    ``min{c1 / (2m(2ηL1 + G)), 1/(5m max_i L0i), 1/(8mη max_i L1i)}`` with G
    from (43); a zero constant drops its term (``math.inf`` if all drop).

    >>> igc_step_limit(c1=1.0, L1=0.0, L0i=1.0, L1i=0.0, eta=1.0, m=2)
    0.05
    """
    return min(value for _, value in _igc_terms(c1, L1, L0i, L1i, eta, m))


def igc_step_condition(
    *,
    alpha: float,
    c1: float,
    L1: float,
    L0i: float | Sequence[float],
    L1i: float | Sequence[float],
    eta: float,
    m: int,
) -> StepCondition:
    """Check (44) for the step ``alpha``; ``terms`` lists the three terms of the minimum."""
    alpha = _positive("alpha", alpha)
    terms = _igc_terms(c1, L1, L0i, L1i, eta, m)
    return StepCondition("igc", "(44)", alpha, min(v for _, v in terms), terms)


# ---------------------------------------------------------------------------
# bounds


@dataclass(frozen=True)
class ConvergenceBound:
    """Both sides of (38) or (45), evaluated on a given sequence of ‖∇f(x_k)‖.

    ``rhs = gap_term + l0_term + l1_term``. ``holds`` compares the two sides
    numerically; the theorem promises it only when ``condition.holds``.

    Attributes
    ----------
    method : str
        ``"sgd"`` or ``"igc"``.
    equation : str
        ``"(38)"`` or ``"(45)"``.
    T : int
        Last index k; the sums run over ``T + 1`` points.
    lhs : float
        ``(1/(T+1)) Σ_k min{η c1, c2 ‖∇f(x_k)‖}·‖∇f(x_k)‖``.
    gap_term, l0_term, l1_term : float
        The three terms of the right side (see :func:`sgd_bound`, :func:`igc_bound`).
    condition : StepCondition
        The step-size condition of the theorem.
    """

    method: str
    equation: str
    T: int
    lhs: float
    gap_term: float
    l0_term: float
    l1_term: float
    condition: StepCondition

    @property
    def rhs(self) -> float:
        """The right side: the sum of the three terms."""
        return self.gap_term + self.l0_term + self.l1_term

    @property
    def holds(self) -> bool:
        """Whether ``lhs <= rhs`` for these numbers."""
        return self.lhs <= self.rhs

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (``None`` stands for ∞)."""
        return {
            "method": self.method,
            "equation": self.equation,
            "T": self.T,
            "lhs": self.lhs,
            "rhs": _json_float(self.rhs),
            "holds": self.holds,
            "terms": {
                "gap_term": self.gap_term,
                "l0_term": self.l0_term,
                "l1_term": self.l1_term,
            },
            "condition": self.condition.to_dict(),
        }


def bound_lhs(grad_norms: Sequence[float], *, c1: float, c2: float, eta: float) -> float:
    """Left side of (38) and (45): ``mean_k min{η c1, c2 ‖∇f(x_k)‖} · ‖∇f(x_k)‖``.

    >>> bound_lhs([0.0, 1.0, 4.0], c1=0.5, c2=0.5, eta=2.0)
    1.5
    """
    c1 = _unit("c1", c1)
    c2 = _unit("c2", c2)
    eta = _finite_eta(eta)
    norms = _grad_norms(grad_norms, None)
    return float(np.mean(np.minimum(eta * c1, c2 * norms) * norms))


def sgd_bound(
    grad_norms: Sequence[float],
    *,
    L0: float,
    L1: float,
    c1: float,
    c2: float,
    eta: float,
    alpha: float,
    gap: float,
    T: int | None = None,
) -> ConvergenceBound:
    """Theorem 3.1 (SGD-clip): both sides of (38) and the condition (37).

    (38), implemented as printed in the paper::

        (1/(T+1)) Σ_{k=0..T} min{η c1, c2 ‖∇f(x_k)‖}·‖∇f(x_k)‖
            ≤ 2 gap/((T+1)α) + 5αη²L0 + αη³L1 c1/c2

    The sentence after (38) in the paper restates the last term without the
    ``/c2`` (as ``αη³L1c1``); since ``c2 ≤ 1`` the printed form is the larger,
    weaker one, and it is the one used here.

    Parameters
    ----------
    grad_norms : sequence of float
        ``‖∇f(x_k)‖`` for ``k = 0..T`` (``T + 1`` values).
    L0, L1 : float
        Relaxed-smoothness constants of ``f`` (A2).
    c1, c2 : float
        Constants of (A3) and (A4), in ``(0, 1]``.
    eta : float
        Finite clipping threshold.
    alpha : float
        Step size (> 0).
    gap : float
        ``f(x_0) − f*`` (≥ 0).
    T : int, optional
        If given, must equal ``len(grad_norms) − 1``.

    Returns
    -------
    ConvergenceBound
        ``gap_term = 2 gap/((T+1)α)``, ``l0_term = 5αη²L0``,
        ``l1_term = αη³L1 c1/c2``.

    Examples
    --------
    >>> b = sgd_bound([1.0, 1.0], L0=1.0, L1=1.0, c1=1.0, c2=0.5, eta=1.0, alpha=0.25, gap=1.0)
    >>> (b.lhs, b.gap_term, b.l0_term, b.l1_term, b.holds, b.condition.holds)
    (0.5, 4.0, 1.25, 0.5, True, True)
    """
    norms = _grad_norms(grad_norms, T)
    L0 = _nonneg("L0", L0)
    gap = _nonneg("gap", gap)
    condition = sgd_step_condition(alpha=alpha, c1=c1, L1=L1, eta=eta)
    lhs = bound_lhs(norms, c1=c1, c2=c2, eta=eta)
    alpha, eta, c1, c2, L1 = condition.alpha, float(eta), float(c1), float(c2), float(L1)
    T = norms.size - 1
    return ConvergenceBound(
        method="sgd",
        equation="(38)",
        T=T,
        lhs=lhs,
        gap_term=2.0 * gap / ((T + 1) * alpha),
        l0_term=5.0 * alpha * eta**2 * L0,
        l1_term=alpha * eta**3 * L1 * c1 / c2,
        condition=condition,
    )


def igc_bound(
    grad_norms: Sequence[float],
    *,
    L0: float,
    L1: float,
    L0i: float | Sequence[float],
    L1i: float | Sequence[float],
    c1: float,
    c2: float,
    eta: float,
    alpha: float,
    m: int,
    gap: float,
    T: int | None = None,
) -> ConvergenceBound:
    """Theorem 3.2 (IGC-clip): both sides of (45) and the condition (44).

    (45), with ``x_k`` the point at the start of epoch k::

        (1/(T+1)) Σ_{k=0..T} min{η c1, c2 ‖∇f(x_k)‖}·‖∇f(x_k)‖
            ≤ 2 gap/((T+1)αm) + 5αmη²L0 + αmη²c1(2ηL1 + G)/(2c2)

    with ``G = 5 max_i L0i + 16 η max_i L1i`` (43). Parameters are those of
    :func:`sgd_bound` plus ``L0i, L1i`` (scalar = ``max_i``, or one value per
    component) and the number of components ``m`` (≥ 1).

    Returns
    -------
    ConvergenceBound
        ``gap_term = 2 gap/((T+1)αm)``, ``l0_term = 5αmη²L0``,
        ``l1_term = αmη²c1(2ηL1 + G)/(2c2)``.

    Examples
    --------
    >>> b = igc_bound([2.0], L0=1.0, L1=0.0, L0i=1.0, L1i=0.0, c1=1.0, c2=1.0,
    ...               eta=1.0, alpha=0.05, m=2, gap=1.0)
    >>> (b.lhs, b.gap_term, b.l0_term, round(b.l1_term, 12), b.condition.holds)
    (2.0, 20.0, 0.5, 0.25, True)
    """
    norms = _grad_norms(grad_norms, T)
    L0 = _nonneg("L0", L0)
    gap = _nonneg("gap", gap)
    condition = igc_step_condition(alpha=alpha, c1=c1, L1=L1, L0i=L0i, L1i=L1i, eta=eta, m=m)
    lhs = bound_lhs(norms, c1=c1, c2=c2, eta=eta)
    alpha, eta, c1, c2, L1 = condition.alpha, float(eta), float(c1), float(c2), float(L1)
    G = igc_G(L0i=L0i, L1i=L1i, eta=eta)
    T = norms.size - 1
    return ConvergenceBound(
        method="igc",
        equation="(45)",
        T=T,
        lhs=lhs,
        gap_term=2.0 * gap / ((T + 1) * alpha * m),
        l0_term=5.0 * alpha * m * eta**2 * L0,
        l1_term=alpha * m * eta**2 * c1 * (2.0 * eta * L1 + G) / (2.0 * c2),
        condition=condition,
    )


def drift_bound(
    grad_norm: float | Sequence[float],
    *,
    alpha: float,
    eta: float,
    m: int,
    L0i: float | Sequence[float],
    L1i: float | Sequence[float],
) -> float | np.ndarray:
    """Bound (42) on the drift (39) of one IGC-clip epoch: ``αηm²G‖∇f_k‖``.

    The drift is ``|Σ_i ⟨C(∇f_i(x_{k,i−1}); η) − C(∇f_i(x_k); η), ∇f_k⟩|``;
    Lemma 3.1 bounds it under the last two terms of (44). ``grad_norm`` may be
    one ``‖∇f_k‖`` (returns a float) or a sequence (returns an array).

    >>> drift_bound(2.0, alpha=0.1, eta=1.0, m=2, L0i=1.0, L1i=0.0)
    4.0
    """
    alpha = _positive("alpha", alpha)
    eta = _finite_eta(eta)
    m = _count("m", m, 1)
    G = 5.0 * _component_max("L0i", L0i, m) + 16.0 * eta * _component_max("L1i", L1i, m)
    factor = alpha * eta * m**2 * G
    if np.ndim(grad_norm) == 0:
        return factor * _nonneg("grad_norm", grad_norm)
    return factor * _grad_norms(grad_norm, None)


# ---------------------------------------------------------------------------
# Example 1

#: ∇f_i(x) = a_i x for Example 1's components f_1 = f_2 = −x², f_3 = 5x².
EXAMPLE1_COEFFICIENTS = (-2.0, -2.0, 10.0)


def expected_clipped_step(x: float | np.ndarray, eta: float) -> float | np.ndarray:
    r"""``E_i[C(∇f_i(x); η)]`` for Example 1, i uniform over the 3 components.

    In one dimension ``C(g; η) = sign(g)·min{|g|, η}``, so with gradients
    ``−2x, −2x, 10x``::

        E[C](x) = sign(x)·(min{10|x|, η} − 2 min{2|x|, η}) / 3

                = 2x                        for |x| ≤ η/10  (no clipping: ∇f = 2x)
                = sign(x)(η − 4|x|)/3       for η/10 ≤ |x| ≤ η/2  (only f_3 clipped)
                = −sign(x)·η/3              for |x| ≥ η/2  (all clipped)

    The step ``−α E[C]`` moves toward the optimum 0 for ``|x| < η/4``, stays
    put in expectation at ``|x| = η/4`` and moves away for ``|x| > η/4``
    (:func:`example1_watershed`). With ``η = ∞`` this is ``∇f(x) = 2x``.

    Parameters
    ----------
    x : float or ndarray
        Point(s); arrays are evaluated elementwise.
    eta : float
        Clipping threshold (> 0 or ``math.inf``).

    Examples
    --------
    >>> expected_clipped_step(1.0, 2.0)  # the paper's x_0 = 1, η = 2
    -0.6666666666666666
    >>> expected_clipped_step(0.125, 2.0)  # |x| ≤ η/10: unclipped, 2x
    0.25
    """
    eta = check_eta(eta)
    xs = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(xs)):
        raise ValueError("x must be finite")
    a = np.abs(xs)
    out = np.sign(xs) * (np.minimum(10.0 * a, eta) - 2.0 * np.minimum(2.0 * a, eta)) / 3.0
    return float(out) if out.ndim == 0 else out


def expected_x1(x0: float | np.ndarray, alpha: float, eta: float) -> float | np.ndarray:
    """Return the expected first SGD-clip iterate on Example 1: ``x0 − α E[C](x0)``.

    For ``x0 = 1, η = 2`` this is ``1 + 2α/3`` (the paper): the expected step
    moves away from the optimum 0.

    >>> expected_x1(1.0, 0.3, 2.0)
    1.2
    """
    alpha = _positive("alpha", alpha)
    return x0 - alpha * expected_clipped_step(x0, eta)


def example1_watershed(eta: float) -> float:
    """``|x|`` beyond which Example 1's expected clipped step points away from 0: ``η/4``.

    From :func:`expected_clipped_step`: for ``η/10 ≤ |x| ≤ η/2`` the sign of
    ``E[C]·x`` is that of ``η − 4|x|``; below ``η/10`` it is positive, above
    ``η/2`` negative. Returns ``math.inf`` for ``η = ∞`` (no clipping: every
    expected step points toward 0).

    >>> example1_watershed(2.0)
    0.5
    """
    return check_eta(eta) / 4.0
