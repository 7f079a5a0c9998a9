"""Figures from stored records (STYLE §11: a plot never recomputes gradients).

Each figure function takes loaded records, names the fields it reads in its
docstring, draws NaN as gaps, and still renders (with a note) when a field is
missing entirely. All figures use matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from clipscope.report.records import RunRecord, TaskRecord, finite
from clipscope.stats import ComponentStats

_STYLES = {"igc": "-", "rr": "-.", "sgd": "--", "shuffle_once": ":"}


def _label(entry: dict, run: RunRecord) -> str:
    method = entry.get("method") or run.method
    batch = entry.get("batch_size") or run.batch_size
    return f"{method.upper()} B={batch}"


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def per_epoch(task: TaskRecord, field: str, ylabel: str, title: str) -> plt.Figure:
    """Plot ``field`` of ``epochs.csv`` against ``epoch``, one line per run.

    Reads: ``epoch``, ``field``. This draws the paper's Figure 1 analogs with
    ``field="c1"`` (mean cos θ_ki, A3) and ``field="c2"`` (m_g/M_g, A4).
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for entry, run in task.runs:
        y = run.column(field)
        if not np.isfinite(y).any():
            continue
        x = run.column("epoch")
        if not np.isfinite(x).all():
            x = np.arange(len(y), dtype=float)
        style = _STYLES.get((entry.get("method") or run.method).lower(), "-")
        ax.plot(x, y, style, marker="o", markersize=3, label=_label(entry, run))
        drawn = True
    ax.set_xlabel("epoch k")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty_note(ax, f"no finite '{field}' values recorded")
    fig.tight_layout()
    return fig


def _last_stats(run: RunRecord) -> ComponentStats | None:
    arrays = run.components()
    if arrays is None or "norms" not in arrays or "dots" not in arrays:
        return None
    grad_norm = float(np.asarray(arrays.get("grad_norm", math.nan)).reshape(-1)[0])
    if not math.isfinite(grad_norm):
        return None
    return ComponentStats(arrays["norms"], arrays["dots"], grad_norm)


def cos_histogram(task: TaskRecord) -> plt.Figure:
    """Histogram of cos θ_ki at each run's last stored epoch.

    Reads: ``components/epoch_XXXX.npz`` fields ``norms``, ``dots``, ``grad_norm``.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    bins = np.linspace(-1, 1, 41)
    for entry, run in task.runs:
        stats = _last_stats(run)
        if stats is None:
            continue
        cos = finite(stats.cos)
        if cos.size:
            ax.hist(cos, bins=bins, histtype="step", density=True, label=_label(entry, run))
            drawn = True
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("cos θ_ki (last probe)")
    ax.set_ylabel("density")
    ax.set_title("Angles of component gradients to the full gradient")
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty_note(ax, "no per-component arrays recorded")
    fig.tight_layout()
    return fig


def eta_profile(task: TaskRecord) -> plt.Figure:
    """Plot the exact descent ratio ρ(η) = D(η)/(m‖∇f‖²) at each run's last probe, η marked.

    Reads: ``components/epoch_XXXX.npz`` (``norms``, ``dots``, ``grad_norm``) and the
    run's η from ``config.toml``. Shaded where ρ ≤ 0 (clipping reverses descent).
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for entry, run in task.runs:
        stats = _last_stats(run)
        if stats is None or not np.any(stats.norms > 0):
            continue
        positive = stats.norms[stats.norms > 0]
        etas = np.geomspace(positive.min() / 20, positive.max() * 5, 400)
        (line,) = ax.plot(etas, stats.ratio(etas), label=_label(entry, run))
        if math.isfinite(run.eta):
            ax.axvline(run.eta, color=line.get_color(), ls=":", lw=1)
        drawn = True
    ax.axhline(0, color="k", lw=0.8)
    ax.axhspan(ax.get_ylim()[0] if drawn else -1, 0, color="red", alpha=0.06)
    ax.set_xscale("log")
    ax.set_xlabel("clipping threshold η (dotted: the run's η)")
    ax.set_ylabel("ρ(η) = D(η) / (m‖∇f‖²)")
    ax.set_title("Descent ratio of the clipped sum (1 = unclipped)")
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        _empty_note(ax, "no per-component arrays recorded")
    fig.tight_layout()
    return fig


def noise_prediction(task: TaskRecord) -> plt.Figure:
    """Measured mean cos over batch sizes at one point vs the noise-scale heuristic.

    Reads the task's cross-section: ``batch_sizes``, ``c1`` and ``predicted_cos``
    ((1 + B_noise/B)^(-1/2), a heuristic that assumes isotropic, independent noise).
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    cross = task.cross_section or {}
    sizes = np.asarray(cross.get("batch_sizes", []), dtype=float)
    if sizes.size:
        ax.plot(
            sizes,
            np.asarray(cross.get("c1", [math.nan] * sizes.size), float),
            "o-",
            label="measured mean cos (c1)",
        )
        if "predicted_cos" in cross:
            ax.plot(
                sizes,
                np.asarray(cross["predicted_cos"], float),
                "s--",
                label="(1 + B_noise/B)^(-1/2)",
            )
        if "c2" in cross:
            ax.plot(sizes, np.asarray(cross["c2"], float), "^:", label="m_g/M_g (c2)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    else:
        _empty_note(ax, "no cross-section recorded")
    ax.set_xlabel("component batch size B")
    ax.set_ylabel("value at one fixed point")
    ax.set_title("Batch-size cross-section (dyadic probe)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def figure_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def task_figures(task: TaskRecord) -> dict[str, plt.Figure]:
    """Every figure of one task, keyed by a file-name stem."""
    return {
        "mean_cos": per_epoch(
            task, "c1", "mean cos θ_ki  (c1, A3)", f"{task.name}: mean cos θ per epoch"
        ),
        "c2": per_epoch(task, "c2", "m_g / M_g  (c2, A4)", f"{task.name}: m_g/M_g per epoch"),
        "cos_hist": cos_histogram(task),
        "eta_profile": eta_profile(task),
        "noise": noise_prediction(task),
    }
