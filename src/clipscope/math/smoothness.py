r"""Relaxed smoothness, the pure part: the (L0, L1) fit and Zhang et al.'s secant.

The paper's (A2) asks ``‖∇²f(x)‖ ≤ L0 + L1 ‖∇f(x)‖`` and (A5) the same for
every component ``f_i`` with ``L0i, L1i`` (DESIGN §3). Given observed pairs
``(‖∇f(x_k)‖, ‖∇²f(x_k)‖)`` -- measured by :func:`clipscope.smoothness.hessian_norm`
or recorded in a run's ``epochs.csv`` -- :func:`fit_l0_l1` fits the constants as
an upper envelope (or a high quantile), :func:`fit_components` does it per
component. :func:`trajectory_smoothness` is Zhang et al.'s secant
``‖∇f(x_1) − ∇f(x_0)‖ / ‖x_1 − x_0‖`` on flat vectors.

No model, no autograd: the report and the theorem check use this module on
stored records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from clipscope.errors import NonFiniteError

__all__ = [
    "ABOVE_RTOL",
    "EXHAUSTIVE_WORK",
    "FIT_FLAGS",
    "FIT_METHODS",
    "SmoothnessFit",
    "fit_components",
    "fit_l0_l1",
    "trajectory_pairs",
    "trajectory_smoothness",
]

FIT_METHODS = ("hull", "quantile")

#: What each flag of :class:`SmoothnessFit` means.
FIT_FLAGS = {
    "nonfinite_dropped": "pairs with a NaN or infinite value were dropped",
    "too_few_points": "fewer than two usable pairs: L0, L1 are NaN",
    "equal_grad_norms": "every gradient norm is the same: the slope is not identified, NaN",
    "negative_slope_clamped": "the best unconstrained line falls; L1 was clamped to 0",
    "negative_intercept_clamped": "the best unconstrained line has L0 < 0; L0 was clamped to 0",
}

# A point counts as above a fitted line when y > line · (1 + ABOVE_RTOL).
ABOVE_RTOL = 1e-9
# The fits evaluate every candidate slope while (candidates × points) stays below this.
EXHAUSTIVE_WORK = 50_000_000


def _json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -- the trajectory estimate of Zhang et al. -----------------------------------
def _flat64(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} has NaN or infinite entries")
    return t


def trajectory_smoothness(x0: Any, g0: Any, x1: Any, g1: Any) -> float:
    r"""Zhang et al.'s local smoothness estimate ``‖∇f(x_1) − ∇f(x_0)‖ / ‖x_1 − x_0‖``.

    Flat vectors (tensors or arrays) of parameters ``x`` and full gradients
    ``g = ∇f(x)``, computed in float64. ``NaN`` when ``x_1 = x_0`` (no step).
    For an ``(L0, L1)``-smooth ``f`` and a short step it is at most about
    ``L0 + L1 ‖∇f(x_0)‖``, so it pairs with ``‖∇f(x_0)‖`` (J. Zhang, T. He,
    S. Sra, A. Jadbabaie, "Why gradient clipping accelerates training", ICLR
    2020, Fig. 1). It never exceeds the largest ``‖∇²f‖`` on the segment.

    >>> trajectory_smoothness([0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 4.0])
    5.0
    """
    x0, g0, x1, g1 = (_flat64(v, n) for v, n in ((x0, "x0"), (g0, "g0"), (x1, "x1"), (g1, "g1")))
    if not x0.shape == g0.shape == x1.shape == g1.shape:
        raise ValueError(
            f"x0, g0, x1, g1 must have the same length, got "
            f"{x0.numel()}, {g0.numel()}, {x1.numel()}, {g1.numel()}"
        )
    step = float(torch.linalg.vector_norm(x1 - x0))
    if step == 0.0:
        return math.nan
    return float(torch.linalg.vector_norm(g1 - g0)) / step


def trajectory_pairs(xs: Sequence[Any], gs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(‖∇f(x_k)‖, L̂_k)`` for ``k = 0 … K−1`` along ``x_0 … x_K``: inputs of :func:`fit_l0_l1`.

    ``L̂_k = ‖g_{k+1} − g_k‖ / ‖x_{k+1} − x_k‖`` (:func:`trajectory_smoothness`).

    >>> gn, L = trajectory_pairs([[0.0], [1.0], [3.0]], [[0.0], [2.0], [6.0]])
    >>> gn.tolist(), L.tolist()
    ([0.0, 2.0], [2.0, 2.0])
    """
    if len(xs) != len(gs):
        raise ValueError(f"xs and gs must have the same length, got {len(xs)} and {len(gs)}")
    grad_norms = np.array([float(torch.linalg.vector_norm(_flat64(g, "g"))) for g in gs[:-1]])
    est = np.array(
        [trajectory_smoothness(xs[k], gs[k], xs[k + 1], gs[k + 1]) for k in range(len(xs) - 1)]
    )
    return grad_norms, est


# -- the (L0, L1) fit ----------------------------------------------------------
@dataclass(frozen=True)
class SmoothnessFit:
    r"""``(L0, L1)`` with ``‖∇²f‖ ≤ L0 + L1 ‖∇f‖`` fitted to observed pairs (:func:`fit_l0_l1`).

    Attributes
    ----------
    L0, L1 : float
        The line's intercept and slope (≥ 0), NaN when the data are degenerate.
    method : str
        ``"hull"`` or ``"quantile"``.
    n_points : int
        Pairs used (after dropping non-finite ones).
    n_above : int
        Used pairs strictly above the line (``y > line·(1 + 1e-9)``); 0 for
        the hull and when nothing was fitted.
    flags : tuple of str
        Keys of :data:`FIT_FLAGS`; empty for a clean fit.
    x_range : tuple of float
        ``(min, max)`` of the used gradient norms (NaN when none).
    quantile : float or None
        The quantile level of the ``"quantile"`` method.
    n_dropped : int
        Non-finite pairs dropped.
    """

    L0: float
    L1: float
    method: str
    n_points: int
    n_above: int
    flags: tuple[str, ...] = ()
    x_range: tuple[float, float] = (math.nan, math.nan)
    quantile: float | None = None
    n_dropped: int = 0
    messages: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        """Whether a line was fitted (L0 and L1 finite)."""
        return math.isfinite(self.L0) and math.isfinite(self.L1)

    def bound(self, grad_norm: Any) -> Any:
        """``L0 + L1 · ‖∇f‖``: the fitted bound on ``‖∇²f‖``."""
        return self.L0 + self.L1 * np.asarray(grad_norm, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (non-finite floats become ``None``)."""
        d = asdict(self)
        d["flags"] = list(self.flags)
        d["messages"] = list(self.messages)
        d["x_range"] = [_json(float(v)) for v in self.x_range]
        return {k: _json(v) for k, v in d.items()}


def _as_pairs(grad_norms: Any, hess_norms: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(grad_norms, dtype=np.float64)
    y = np.asarray(hess_norms, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"grad_norms and hess_norms must be 1-D of the same length, got shapes "
            f"{x.shape} and {y.shape}"
        )
    for name, a in (("grad_norms", x), ("hess_norms", y)):
        bad = np.flatnonzero(a < 0)
        if bad.size:
            raise ValueError(f"{name} must be >= 0 (norms), got {a[bad[0]]} at index {bad[0]}")
    return x, y


def _upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper convex hull, left to right (Andrew's monotone chain)."""
    order = np.lexsort((y, x))
    hx: list[float] = []
    hy: list[float] = []
    for px, py in zip(x[order], y[order], strict=True):
        if hx and hx[-1] == px:  # same x: the larger y (sorted last) wins
            hx.pop()
            hy.pop()
        while (
            len(hx) >= 2
            and (hx[-1] - hx[-2]) * (py - hy[-2]) - (hy[-1] - hy[-2]) * (px - hx[-2]) >= 0
        ):  # the middle point is on or below the chord
            hx.pop()
            hy.pop()
        hx.append(float(px))
        hy.append(float(py))
    return np.array(hx), np.array(hy)


def _profile_argmin(
    phi: Callable[[np.ndarray], np.ndarray], cands: np.ndarray, n: int
) -> tuple[float, float]:
    """Minimize a convex profile ``φ(L1)`` over its sorted candidate breakpoints.

    Every candidate is evaluated (chunked, vectorized) while
    ``len(cands) · n ≤ EXHAUSTIVE_WORK``; ties go to the smallest L1. Beyond
    that, a binary search on the sign of ``φ(c_{k+1}) − φ(c_k)``: exact in
    exact arithmetic; in floating point a near-tie may stop it slightly
    (relative ~1e-7) above the optimum.
    """
    if len(cands) == 0:
        return math.nan, math.nan
    if len(cands) * n <= EXHAUSTIVE_WORK:
        step = max(1, (1 << 20) // max(n, 1))
        vals = np.concatenate([phi(cands[s : s + step]) for s in range(0, len(cands), step)])
        j = int(np.argmin(vals))
        return float(cands[j]), float(vals[j])

    def at(k: int) -> float:
        return float(phi(cands[k : k + 1])[0])

    lo, hi = 0, len(cands) - 1
    while hi - lo > 2:
        mid = (lo + hi) // 2
        if at(mid) <= at(mid + 1):
            hi = mid + 1
        else:
            lo = mid + 1
    best = min(range(max(lo - 1, 0), min(hi + 2, len(cands))), key=at)
    return float(cands[best]), at(best)


def _finite_or_inf(v: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(v), v, np.inf)


def _fit_hull(x: np.ndarray, y: np.ndarray) -> tuple[float, float, list[str]]:
    """Find the line above all points with L0, L1 ≥ 0 of least value at the midpoint x̄.

    For fixed L1 the least feasible intercept is ``max(0, max_j(y_j − L1 x_j))``
    (attained on an upper-hull vertex), so the objective
    ``φ(L1) = max(0, max_v(y_v − L1 x_v)) + L1 x̄`` is convex and piecewise
    linear with breakpoints among 0, the hull's edge slopes and ``y_v / x_v``.
    """
    hx, hy = _upper_hull(x, y)
    xbar = 0.5 * (x.min() + x.max())
    with np.errstate(over="ignore"):  # near-vertical edges: an infinite slope is no candidate
        slopes = np.diff(hy) / np.diff(hx)
        cands = np.concatenate([[0.0], slopes, hy[hx > 0] / hx[hx > 0]])
    cands = np.unique(cands[np.isfinite(cands) & (cands >= 0)])

    def phi(L1: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            top = np.max(hy[None, :] - L1[:, None] * hx[None, :], axis=1)
            return _finite_or_inf(np.maximum(top, 0.0) + L1 * xbar)

    L1, value = _profile_argmin(phi, cands, len(hx))  # L1 = 0 is a candidate: value finite
    L0 = max(0.0, float(np.max(hy - L1 * hx)))
    # Unconstrained optimum: the upper concave envelope at x̄ (interpolated on the hull).
    free = float(np.interp(xbar, hx, hy))
    flags = []
    if value > free * (1 + 1e-12) + 1e-300:
        if L1 == 0.0:
            flags.append("negative_slope_clamped")
        if L0 == 0.0:
            flags.append("negative_intercept_clamped")
    return L0, L1, flags


def _fit_quantile(x: np.ndarray, y: np.ndarray, q: float) -> tuple[float, float, list[str]]:
    """Linear quantile regression at level q with L0, L1 ≥ 0, solved exactly.

    Minimizes ``Σ_j ρ_q(y_j − L0 − L1 x_j)`` (``ρ_q(u) = u(q − 1{u<0})``). For
    fixed L1 the best intercept is a q-quantile of ``y − L1 x`` (the
    ``⌈nq⌉``-th smallest, clamped at 0); the profile in L1 is convex with
    breakpoints at pair slopes, ``y_j/x_j`` and 0 (vertices of the LP), so
    minimizing over those candidates is exact. O(n²) candidates.
    """
    n = len(x)
    k = max(math.ceil(n * q) - 1, 0)

    def intercepts(L1: np.ndarray, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            r = y[None, :] - L1[:, None] * x[None, :]
        b = np.partition(r, k, axis=1)[:, k]
        return r, (np.maximum(b, 0.0) if clamp else b)

    def profile(clamp: bool) -> Callable[[np.ndarray], np.ndarray]:
        def phi(L1: np.ndarray) -> np.ndarray:
            r, b = intercepts(L1, clamp)
            with np.errstate(over="ignore", invalid="ignore"):
                u = r - b[:, None]
                return _finite_or_inf(np.sum(np.where(u >= 0, q * u, (q - 1) * u), axis=1))

        return phi

    iu, ju = np.triu_indices(n, 1)
    dx = x[ju] - x[iu]
    keep = dx != 0
    with np.errstate(over="ignore"):  # near-vertical pairs: an infinite slope is no candidate
        pair = (y[ju] - y[iu])[keep] / dx[keep]
        cons = np.concatenate([[0.0], pair, y[x > 0] / x[x > 0]])
    free_c = np.unique(pair[np.isfinite(pair)])
    cons = np.unique(cons[np.isfinite(cons) & (cons >= 0)])
    L1, value = _profile_argmin(profile(True), cons, n)
    L0 = float(intercepts(np.array([L1]), True)[1][0])
    _, free = _profile_argmin(profile(False), free_c, n)
    flags = []
    if value > free * (1 + 1e-12) + 1e-300:  # False when free is NaN (no finite pair slope)
        if L1 == 0.0:
            flags.append("negative_slope_clamped")
        if L0 == 0.0:
            flags.append("negative_intercept_clamped")
    return L0, L1, flags


def fit_l0_l1(
    grad_norms: Any,
    hess_norms: Any,
    method: str = "hull",
    *,
    quantile: float = 0.95,
) -> SmoothnessFit:
    r"""Fit ``(L0, L1)`` of (A2)/(A5), ``‖∇²f‖ ≤ L0 + L1‖∇f‖``, to observed pairs.

    Points ``(x_j, y_j) = (‖∇f(x_j)‖, ‖∇²f(x_j)‖)``; lines ``y = L0 + L1 x``
    with ``L0 ≥ 0``, ``L1 ≥ 0``.

    * ``"hull"`` (the upper envelope): among lines above **every** point,
      the one of least area over the observed range ``[x_min, x_max]``.
      That area is ``(x_max − x_min)(L0 + L1 x̄)`` with ``x̄`` the midpoint, so
      this minimizes the line's value at ``x̄``: a two-variable LP whose
      solution, without the sign constraints, is the supporting line of the
      upper convex hull at ``x̄``. Solved exactly on the hull's vertices
      (ties: the smallest L1). ``n_above`` is 0.
    * ``"quantile"``: linear quantile regression at level ``quantile`` (in
      (0, 1); Koenker–Bassett pinball loss) with the same sign constraints,
      solved exactly; at most ``n(1 − quantile)`` points lie strictly above,
      and ``n_above`` counts them. Less sensitive than the hull to a few
      outlying estimates (an unconverged eigenvalue solve, say).

    Degenerate data give a result with ``flags`` (:data:`FIT_FLAGS`) instead
    of an error (edge case 27): non-finite pairs are dropped
    (``"nonfinite_dropped"``); fewer than two pairs or all gradient norms
    equal give ``L0 = L1 = NaN``; when the best unconstrained line has a
    negative slope (or intercept) it is clamped to 0 and flagged.

    Parameters
    ----------
    grad_norms, hess_norms : array_like
        1-D, same length, entries ≥ 0 (NaN/inf allowed and dropped).
    method : {"hull", "quantile"}
        See above.
    quantile : float
        Level of the ``"quantile"`` method.

    Returns
    -------
    SmoothnessFit

    Raises
    ------
    ValueError
        For a negative norm, mismatched shapes, an unknown method or a
        quantile outside (0, 1).

    Examples
    --------
    >>> fit = fit_l0_l1([1.0, 2.0, 3.0, 2.0], [2.0, 3.0, 4.0, 2.5])
    >>> fit.L0, fit.L1, fit.n_above, fit.flags
    (1.0, 1.0, 0, ())
    >>> fit_l0_l1([1.0], [2.0]).flags
    ('too_few_points',)
    """
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
        raise ValueError(f"quantile must be a number in (0, 1), got {quantile!r}")
    x, y = _as_pairs(grad_norms, hess_norms)
    finite = np.isfinite(x) & np.isfinite(y)
    n_dropped = int((~finite).sum())
    x, y = x[finite], y[finite]
    flags = ["nonfinite_dropped"] if n_dropped else []
    q = float(quantile) if method == "quantile" else None
    x_range = (float(x.min()), float(x.max())) if x.size else (math.nan, math.nan)

    def result(L0: float, L1: float, n_above: int) -> SmoothnessFit:
        return SmoothnessFit(
            L0=L0,
            L1=L1,
            method=method,
            n_points=int(x.size),
            n_above=n_above,
            flags=tuple(flags),
            x_range=x_range,
            quantile=q,
            n_dropped=n_dropped,
            messages=tuple(FIT_FLAGS[f] for f in flags),
        )

    if x.size < 2:
        flags.append("too_few_points")
        return result(math.nan, math.nan, 0)
    if x.min() == x.max():
        flags.append("equal_grad_norms")
        return result(math.nan, math.nan, 0)
    if method == "hull":
        L0, L1, more = _fit_hull(x, y)
    else:
        L0, L1, more = _fit_quantile(x, y, float(quantile))
    flags += more
    with np.errstate(over="ignore"):
        line = L0 + L1 * x
    n_above = int(np.sum(y > line * (1 + ABOVE_RTOL)))
    return result(L0, L1, n_above)


def fit_components(
    grad_norms: Any,
    hess_norms: Any,
    method: str = "hull",
    *,
    quantile: float = 0.95,
) -> list[SmoothnessFit]:
    r"""One (A5) fit per component: ``(L0i, L1i)`` from ``(‖∇f_i(x_k)‖, ‖∇²f_i(x_k)‖)``.

    ``grad_norms[k, i]`` and ``hess_norms[k, i]`` hold component ``i`` at the
    ``k``-th probe point (shape ``(K, m)``); column ``i`` goes to
    :func:`fit_l0_l1`. The theorems use ``max_i L0i`` and ``max_i L1i``
    (:func:`clipscope.math.theory.igc_G`).

    >>> fits = fit_components([[1.0, 2.0], [2.0, 4.0]], [[1.0, 1.0], [2.0, 1.0]])
    >>> [(f.L0, f.L1) for f in fits]
    [(0.0, 1.0), (1.0, 0.0)]
    """
    x = np.asarray(grad_norms, dtype=np.float64)
    y = np.asarray(hess_norms, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"grad_norms and hess_norms must be 2-D (points × components) of the same shape, "
            f"got {x.shape} and {y.shape}"
        )
    return [fit_l0_l1(x[:, i], y[:, i], method, quantile=quantile) for i in range(x.shape[1])]
