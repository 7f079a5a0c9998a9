"""Simulations of SGD-clip, IGC-clip and RR-clip on the paper's Example 1.

Example 1: ``f_1 = f_2 = −x²``, ``f_3 = 5x²``, ``f = (1/3) Σ f_i = x²``, so
``∇f_i(x) = a_i x`` with ``a = (−2, −2, 10)``. In one dimension the clipping
operator (4) is ``C(g; η) = sign(g)·min{|g|, η} = clip(g, −η, η)``; one step is::

    x ← x − α C(a_i x; η)

An *epoch* is m = 3 steps. The three methods differ only in the order of the
component indices i (:func:`component_orders`):

* ``"sgd"``: each index uniform over {1, 2, 3}, with replacement (9);
* ``"igc"``: 1, 2, 3 every epoch (10)/(11) — deterministic, so one run;
* ``"rr"``: a new uniformly random permutation of (1, 2, 3) every epoch.

Many independent runs are advanced together as one numpy vector, each run a
column, all drawn from one seeded :class:`numpy.random.Generator`. Since every
clipped step moves x by at most αη, ``|x_T| ≤ |x_0| + 3Tαη``: a clipped run
cannot overflow. With η = ∞ it can; overflowed runs read ``inf``/``nan``.

The closed forms (:func:`clipscope.math.theory.expected_clipped_step`) say the
expected step points away from 0 for ``|x| > η/4``; the simulations show the
consequence: from ``x_0 = 1`` (η = 2) all three methods drift away, from
``|x_0| < 1/2`` with a small α they converge to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipscope.math import theory
from clipscope.math.stats import check_eta

__all__ = ["METHODS", "Example1Run", "component_orders", "plot", "run_orders", "simulate"]

METHODS = ("sgd", "igc", "rr")
_PLOT_MIN, _PLOT_MAX = 1e-300, 1e100  # |x| drawn on a log axis; outside: a gap
_A = np.asarray(theory.EXAMPLE1_COEFFICIENTS, dtype=np.float64)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


_count = theory._count  # one validator for counts across the pure modules


def _finite(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "finite and > 0" if positive else "finite"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def component_orders(method: str, epochs: int, runs: int, rng: np.random.Generator) -> np.ndarray:
    """Return the component indices (0-based) of every step: shape ``(epochs, 3, runs)``.

    ``"igc"`` ignores ``runs`` and ``rng`` and returns one column (it is deterministic).

    >>> component_orders("igc", 2, 5, np.random.default_rng(0))[:, :, 0].tolist()
    [[0, 1, 2], [0, 1, 2]]
    """
    _check_method(method)
    epochs, runs = _count("epochs", epochs, 0), _count("runs", runs, 1)
    m = _A.size
    if method == "igc":
        return np.broadcast_to(np.arange(m)[None, :, None], (epochs, m, 1)).copy()
    if method == "sgd":
        return rng.integers(0, m, size=(epochs, m, runs))
    base = np.broadcast_to(np.arange(m)[None, :, None], (epochs, m, runs))
    return rng.permuted(base, axis=1)


def run_orders(x0: float, alpha: float, eta: float, orders: np.ndarray) -> np.ndarray:
    """Run ``x ← x − α C(a_i x; η)`` along ``orders`` (``(epochs, 3, runs)``).

    Returns the iterates at the epoch starts, shape ``(epochs + 1, runs)``.
    """
    x0, alpha, eta = _finite("x0", x0), _finite("alpha", alpha, positive=True), check_eta(eta)
    epochs, m, runs = orders.shape
    out = np.empty((epochs + 1, runs), dtype=np.float64)
    x = np.full(runs, x0)
    out[0] = x
    with np.errstate(over="ignore", invalid="ignore"):  # only reachable with eta = inf
        for k in range(epochs):
            for j in range(m):
                x = x - alpha * np.clip(_A[orders[k, j]] * x, -eta, eta)
            out[k + 1] = x
    return out


@dataclass(frozen=True, eq=False)
class Example1Run:
    """Trajectories of one method on Example 1.

    Attributes
    ----------
    method : str
        ``"sgd"``, ``"igc"`` or ``"rr"``.
    x0, alpha, eta : float
        Start, step size and clipping threshold.
    epochs : int
        Epochs of m = 3 steps.
    seed : int
        Seed of the generator the orders were drawn from.
    trajectory : ndarray
        ``x`` at every epoch start, shape ``(epochs + 1, runs)``; one column
        for the deterministic ``"igc"``.
    """

    method: str
    x0: float
    alpha: float
    eta: float
    epochs: int
    seed: int
    trajectory: np.ndarray

    @property
    def runs(self) -> int:
        """Number of independent runs (columns)."""
        return self.trajectory.shape[1]

    @property
    def deterministic(self) -> bool:
        """True for IGC-clip, whose cyclic order leaves nothing to chance."""
        return self.method == "igc"

    def summary(self) -> dict[str, Any]:
        """Return final-iterate statistics as a JSON-safe dict.

        ``fraction_away``: share of runs with ``|x_T| > |x_0|``;
        ``fraction_toward``: share with ``|x_T| < |x_0|``; ``fraction_overflow``:
        share whose ``x_T`` is not finite (possible only with η = ∞);
        ``median_abs_final``, ``min_abs_final``, ``max_abs_final`` of ``|x_T|``
        (``None`` if not finite).
        """
        final = np.abs(self.trajectory[-1])
        start = abs(self.x0)

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        with np.errstate(invalid="ignore"):
            return {
                "method": self.method,
                "x0": self.x0,
                "runs": self.runs,
                "deterministic": self.deterministic,
                "fraction_away": float(np.mean(final > start)),
                "fraction_toward": float(np.mean(final < start)),
                "fraction_overflow": float(np.mean(~np.isfinite(final))),
                "median_abs_final": num(float(np.median(final))),
                "min_abs_final": num(float(np.min(final))),
                "max_abs_final": num(float(np.max(final))),
            }


def simulate(
    method: str,
    *,
    x0: float,
    alpha: float,
    eta: float,
    epochs: int,
    runs: int = 1000,
    seed: int = 0,
) -> Example1Run:
    """Simulate ``method`` on Example 1 for ``runs`` independent runs.

    Parameters
    ----------
    method : {"sgd", "igc", "rr"}
        Order of the components (see the module docstring).
    x0 : float
        Start (finite).
    alpha : float
        Step size (> 0).
    eta : float
        Clipping threshold (> 0; ``math.inf`` for no clipping).
    epochs : int
        Number of epochs of m = 3 steps (≥ 0).
    runs : int
        Independent runs (ignored by the deterministic ``"igc"``).
    seed : int
        Seed of the :class:`numpy.random.Generator`.

    Examples
    --------
    >>> r = simulate("igc", x0=1.0, alpha=0.01, eta=2.0, epochs=10)
    >>> round(float(r.trajectory[-1, 0]), 10)  # all clipped: +αη, +αη, −αη per epoch
    1.2
    """
    _check_method(method)
    x0, alpha, eta = _finite("x0", x0), _finite("alpha", alpha, positive=True), check_eta(eta)
    seed = _count("seed", seed, 0)
    orders = component_orders(method, epochs, runs, np.random.default_rng(seed))
    trajectory = run_orders(x0, alpha, eta, orders)
    return Example1Run(method, x0, alpha, eta, int(epochs), seed, trajectory)


def plot(results: list[Example1Run], eta: float, path: str | Path, *, max_lines: int = 20) -> Path:
    """Draw trajectories and the expected clipped step; write a PNG to ``path``.

    One panel per starting point in ``results`` (``|x_k|`` against the epoch,
    up to ``max_lines`` runs per method drawn thin, the median thick), and a
    last panel with ``E[C](x)`` (:func:`clipscope.math.theory.expected_clipped_step`)
    against x, the unclipped ``∇f(x) = 2x`` and the watershed ``|x| = η/4``.
    Values of ``|x_k|`` that are 0, above 1e100 or not finite are drawn as gaps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eta = check_eta(eta)
    starts = sorted({r.x0 for r in results}, key=lambda v: -abs(v))
    colors = {"sgd": "tab:blue", "igc": "tab:red", "rr": "tab:green"}
    styles = {"sgd": "-", "igc": "-", "rr": "--"}  # IGC and RR often coincide
    fig, axes = plt.subplots(1, len(starts) + 1, figsize=(5 * (len(starts) + 1), 4))
    for ax, start in zip(axes, starts, strict=False):
        for r in (r for r in results if r.x0 == start):
            k = np.arange(r.epochs + 1)
            # overflowed (only possible with η = ∞) or zero values leave gaps on the log axis
            traj = np.ma.masked_outside(np.abs(r.trajectory), _PLOT_MIN, _PLOT_MAX)
            ax.plot(
                k, traj[:, :max_lines].filled(np.nan), color=colors[r.method], lw=0.4, alpha=0.3
            )
            median = np.ma.median(traj, axis=1).filled(np.nan)
            ax.plot(k, median, styles[r.method], color=colors[r.method], lw=2, label=r.method)
        ax.axhline(theory.example1_watershed(eta), color="k", ls=":", lw=1, label="|x| = η/4")
        ax.set_yscale("log")
        ax.set_xlabel("epoch k")
        ax.set_ylabel("|x_k|")
        ax.set_title(f"x0 = {start:g}, α = {results[0].alpha:g}, η = {eta:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    watershed = theory.example1_watershed(eta)
    span = 1.5 * max(max(abs(s) for s in starts), watershed if eta < math.inf else 0.0)
    x = np.linspace(-span, span, 801)
    ax.plot(x, theory.expected_clipped_step(x, eta), label="E[C(∇f_i(x); η)]")
    ax.plot(x, 2 * x, ls="--", color="gray", label="∇f(x) = 2x")
    if eta < math.inf:
        w = watershed
        for s in (-w, w):
            ax.axvline(s, color="k", ls=":", lw=1)
        ax.axvspan(-span, -w, color="tab:red", alpha=0.08, label="step points away from 0")
        ax.axvspan(w, span, color="tab:red", alpha=0.08)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("x")
    ax.set_title("expected clipped step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
