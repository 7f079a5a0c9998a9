"""Figures of ρ and ρ_P side by side for runs with an Adam or AdamW optimizer (stored records only).

``ρ(η) = D(η)/(m‖∇f‖²)`` is the share of the plain descent the clipped sum
keeps, ``ρ_P(η) = D_P(η)/(m⟨∇f, u⟩)`` with ``u = P⁻¹∇f`` the share of the
preconditioned descent (the direction an Adam/AdamW step moves along, P frozen
at the probe; ``docs/engine.md``, "Preconditioned steps"). Both come from the
component files (``norms``, ``dots``, ``grad_norm``; ``dots_p``, ``u_norm``,
``grad_u_inner``) through :func:`clipscope.report.findings.run_points` and
:func:`~clipscope.report.findings.run_points_p`; nothing is recomputed.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from clipscope.report.findings import run_points, run_points_p
from clipscope.report.plots import eta_axes, eta_grid, run_title
from clipscope.run.study import TaskRecord

__all__ = ["has_preconditioned", "rho_p_per_epoch", "rho_p_profile"]


def _runs(task: TaskRecord) -> list[tuple[dict, object, list, list]]:
    out = []
    for entry, run in task.runs:
        points_p = run_points_p(run)
        if points_p:
            out.append((entry, run, run_points(run), points_p))
    return out


def has_preconditioned(task: TaskRecord) -> bool:
    """Whether a run of the task stored the preconditioned dots (``dots_p``)."""
    return any(run_points_p(run) for _, run in task.runs)


def _finish(fig, ax, drawn: bool, empty: str) -> plt.Figure:
    if drawn:
        ax.legend(fontsize=6, ncol=1)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def rho_p_profile(task: TaskRecord) -> plt.Figure:
    """Plot ρ(η) and ρ_P(η) at each such run's last probe, the run's η dotted.

    Reads the last probe's ``norms``, ``dots``, ``grad_norm`` (ρ, solid) and
    ``dots_p``, ``u_norm``, ``grad_u_inner`` (ρ_P, dashed); shaded where < 0
    (clipping reverses that descent).
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for k, (entry, run, plain, points_p) in enumerate(_runs(task)):
        epoch, stats_p = points_p[-1]
        stats = dict(plain).get(epoch)
        if not np.any(stats_p.norms > 0):
            continue
        etas = eta_grid(stats_p.norms)
        color, name = f"C{k % 10}", f"{run_title(entry, run)}, {run.point_name(epoch)}"
        if stats is not None:
            ax.plot(etas, stats.ratio(etas), color=color, label=f"ρ(η)  {name}")
        ax.plot(etas, stats_p.ratio(etas), color=color, ls="--", label=f"ρ_P(η)  {name}")
        if math.isfinite(run.eta):
            ax.axvline(run.eta, color=color, ls=":", lw=1)
        drawn = True
    eta_axes(ax, drawn)
    ax.set_ylabel("share of the unclipped descent")
    ax.set_title(f"{task.name}: ρ(η) (solid) and ρ_P(η) (dashed) at the last probe", fontsize=9)
    return _finish(fig, ax, drawn, "no preconditioned dots recorded")


def _clock(run, epoch: int) -> float:
    """Return the probe's epoch, or its step in a Monitor's run."""
    if run.clock == "step":
        hit = np.flatnonzero(run.column("epoch") == epoch)
        if hit.size:
            return float(run.column("step")[hit[0]])
    return float(epoch)


def rho_p_per_epoch(task: TaskRecord) -> plt.Figure:
    """Plot ρ and ρ_P at each such run's own η at every probe (per epoch, or per step).

    Reads every probe's component file, as :func:`rho_p_profile`.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = steps = False
    for k, (entry, run, plain, points_p) in enumerate(_runs(task)):
        if not math.isfinite(run.eta):
            continue
        color, name = f"C{k % 10}", run_title(entry, run)
        by_epoch = dict(plain)
        epochs = [e for e, _ in points_p]
        y_p = [float(s.ratio(run.eta)) for _, s in points_p]
        y = [float(by_epoch[e].ratio(run.eta)) if e in by_epoch else math.nan for e in epochs]
        x = [_clock(run, e) for e in epochs]
        steps = steps or run.clock == "step"
        ax.plot(x, y, color=color, marker="o", markersize=3, label=f"ρ(η = {run.eta:g})  {name}")
        ax.plot(x, y_p, color=color, ls="--", marker="s", markersize=3,
                label=f"ρ_P(η = {run.eta:g})  {name}")  # fmt: skip
        drawn = True
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("step (a Monitor's run) or epoch k; a probe at each marker" if steps else
                  "epoch k (a probe at each marker)")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of the unclipped descent kept")
    ax.set_title(f"{task.name}: ρ and ρ_P at the run's η per epoch", fontsize=9)
    return _finish(fig, ax, drawn, "no preconditioned dots recorded at a finite η")
