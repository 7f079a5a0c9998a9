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
from matplotlib.ticker import MaxNLocator

from clipscope.math.advice import EtaAdvice, advice_grid
from clipscope.math.smoothness import fit_components, fit_l0_l1
from clipscope.math.stats import ComponentStats
from clipscope.report.findings import run_label, run_optimizer, run_points
from clipscope.run.directory import RunRecord
from clipscope.run.study import TaskRecord

_STYLES = {"igc": "-", "rr": "-.", "sgd": "--", "shuffle_once": ":"}
_OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW"}


def finite(values) -> np.ndarray:
    """Return the finite entries of ``values`` as a float64 array."""
    array = np.asarray(list(values), dtype=np.float64)
    return array[np.isfinite(array)]


def _run_style(task: TaskRecord, entry: dict, run: RunRecord) -> dict:
    """Colour by batch size, line style by method, so IGC B=8 and SGD B=8 share a colour.

    The runs of an arms study (``entry["arm"]``, ``clipscope reproduce --task
    ptb-thresholds``) share method and batch size: colour by arm, style by seed.
    """
    if entry.get("arm"):
        arms = list(dict.fromkeys(str(e.get("arm")).rsplit("-seed", 1)[0] for e, _ in task.runs))
        arm = str(entry["arm"]).rsplit("-seed", 1)[0]
        styles = ("-", "--", ":", "-.")
        return {"color": f"C{arms.index(arm) % 10}",
                "linestyle": styles[int(entry.get("seed") or 0) % len(styles)]}  # fmt: skip
    sizes = sorted({int(e.get("batch_size") or r.batch_size or 0) for e, r in task.runs})
    batch = int(entry.get("batch_size") or run.batch_size or 0)
    method = (entry.get("method") or run.method).lower()
    if run_optimizer(entry, run) != "sgd":  # an AdamW run beside the SGD grid: black, dash-dot
        return {"color": "k", "linestyle": (0, (5, 1, 1, 1))}
    return {"color": f"C{sizes.index(batch) % 10}", "linestyle": _STYLES.get(method, "-")}


def run_title(entry: dict, run: RunRecord) -> str:
    """``IGC B=16`` for a run of ``clipscope train`` (``IGC-AdamW B=16`` with AdamW).

    ``Monitor B=32`` for a Monitor's run; ``Monitor per-sample`` for one with
    per-sample components (``per_sample = true``: every sample a component, while
    the loop's own steps use its mini-batches), ``IGC B=16 per-sample`` for a
    ``fit`` run with per-sample probes (its steps use B = 16); the arm for a run
    of an arms study.
    """
    if entry.get("arm"):  # an arms study: the arm and seed name the run
        return str(entry["arm"])
    method = "Monitor" if run.kind == "monitor" else (entry.get("method") or run.method).upper()
    batch = entry.get("batch_size") or run.batch_size
    optimizer = run_optimizer(entry, run)  # "IGC-AdamW B=16" beside the SGD runs
    optimizer = "" if optimizer == "sgd" else "-" + _OPTIMIZER_NAMES.get(optimizer, optimizer)
    if run.setting("per_sample", default=False):
        return f"{method}{optimizer}{'' if run.kind == 'monitor' else f' B={batch}'} per-sample"
    return f"{method}{optimizer} B={batch}"


def eta_axes(ax, drawn: bool) -> None:
    """Dress a ρ(η) axis: the line ρ = 0, the reversal zone below it shaded, η on a log scale."""
    ax.axhline(0, color="k", lw=0.8)
    ax.axhspan(ax.get_ylim()[0] if drawn else -1, 0, color="red", alpha=0.06)
    ax.set_xscale("log")
    ax.set_xlabel("clipping threshold η (dotted: the run's η)")


def eta_grid(norms: np.ndarray, points: int = 400) -> np.ndarray:
    """Return the η axis of a ρ(η) figure: log-spaced, from below the typical norm past the largest.

    Starts at a tenth of the 5 % quantile of the positive norms (not the smallest,
    which may be about 0) and ends at 3× the largest; ``norms`` must hold a positive one.
    """
    positive = norms[norms > 0]
    return np.geomspace(np.quantile(positive, 0.05) / 10, positive.max() * 3, points)


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _finish(fig, ax, drawn: bool, empty: str, *, fontsize: int = 7, ncol: int = 2) -> plt.Figure:
    """Legend when something was drawn, else a note saying what is missing; tight layout."""
    if drawn:
        ax.legend(fontsize=fontsize, ncol=ncol)
    else:
        _empty_note(ax, empty)
    fig.tight_layout()
    return fig


def task_clock(task: TaskRecord) -> str:
    """``"step"`` when every run of the task is a Monitor's (probes at steps), else ``"epoch"``."""
    return "step" if task.runs and all(run.clock == "step" for _, run in task.runs) else "epoch"


def _integer_ticks(axis) -> None:
    """Epochs and steps are counts: ticks at integers only."""
    axis.set_major_locator(MaxNLocator(integer=True))


def per_epoch(task: TaskRecord, field: str, ylabel: str, title: str) -> plt.Figure:
    """Plot ``field`` of ``epochs.csv`` against ``epoch`` (a Monitor's runs: ``step``), per run.

    Reads: ``epoch`` or ``step``, ``field``. This draws the paper's Figure 1
    analogs with ``field="c1"`` (mean cos θ_ki, A3) and ``field="c2"``
    (m_g/M_g, A4). The x ticks are integers.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    clock = task_clock(task)
    for entry, run in task.runs:
        y = run.column(field)
        if not np.isfinite(y).any():
            continue
        x = run.column(clock)
        if not np.isfinite(x).all():
            x = np.arange(len(y), dtype=float)
        style = _run_style(task, entry, run)
        ax.plot(x, y, marker="o", markersize=3, label=run_title(entry, run), **style)
        drawn = True
    ax.set_xlabel("step (a probe at each marker)" if clock == "step" else "epoch k")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _finish(fig, ax, drawn, f"no finite '{field}' values recorded", fontsize=7, ncol=2)


def monitor_steps(task: TaskRecord) -> plt.Figure:
    """Plot a Monitor run's steps: ‖g‖ of every step, the share clipped at η, the cosines.

    Reads: the per-step arrays (``components/epoch_XXXX_steps.npz``: ``step``,
    ``step_grad_norm``, ``step_clipped``, ``step_cos``), the run's η, and the
    probe rows' ``step``, ``c1`` (mean cos θ_ki at each probe) and
    ``train_clipped_share`` (the share of the steps after that probe clipped at
    η). Top: the step norms, η dashed, clipped steps marked. Bottom: each
    step's cos∠(g, ∇f_k) with the last probe's ∇f_k, the mean cos θ_ki at each
    probe, and the clipped share per interval (a step line from its probe on).
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    drawn = False
    for entry, run in task.runs:
        if run.kind != "monitor":
            continue
        title = run_title(entry, run)
        arrays = run.step_arrays()
        steps = arrays.get("step", np.empty(0))
        if steps.size:
            norms, clipped = arrays["step_grad_norm"], arrays["step_clipped"] > 0
            (line,) = top.plot(steps, norms, lw=0.8, label=f"{title}: ‖g‖ of each loop step")
            if clipped.any():
                top.plot(steps[clipped], norms[clipped], "x", ms=4, color="C3",
                         label="clipped at η")  # fmt: skip
            bottom.plot(steps, arrays["step_cos"], ".", ms=3, alpha=0.6, color=line.get_color(),
                        label="cos∠(g, ∇f_k) per step")  # fmt: skip
            drawn = True
        if math.isfinite(run.eta):
            top.axhline(run.eta, color="k", ls="--", lw=1, label=f"η = {run.eta:g}")
        elif run.eta_rule == "descent-safe":  # η set at each probe, fixed until the next
            at, etas = run.column("step"), run.column("eta")
            ok = np.isfinite(at) & np.isfinite(etas)
            if ok.any():
                end = max(float(at[ok][-1]), float(steps.max()) if steps.size else 0.0)
                top.step(np.append(at[ok], end), np.append(etas[ok], etas[ok][-1]), where="post",
                         color="k", ls="--", lw=1, label="η in force (descent-safe)")  # fmt: skip
        at, c1 = run.column("step"), run.column("c1")
        ok = np.isfinite(at) & np.isfinite(c1)
        if ok.any():
            bottom.plot(at[ok], c1[ok], "o", color="k", ms=5, label="mean cos θ_ki at each probe")
            drawn = True
        share = run.column("train_clipped_share")
        ok = np.isfinite(at) & np.isfinite(share)
        if ok.any():  # each value holds from its probe to the next (the last: to the last step)
            end = max(float(at[ok][-1]), float(steps.max()) if steps.size else 0.0)
            x, y = np.append(at[ok], end), np.append(share[ok], share[ok][-1])
            bottom.step(x, y, where="post", color="C3", lw=1.2,
                        label="share of the interval's steps clipped")  # fmt: skip
    top.set_ylabel("‖g‖ before clipping")
    top.set_title(f"{task.name}: the steps of your loop", fontsize=9)
    top.grid(alpha=0.3)
    bottom.set_ylabel("cosine; clipped share")
    bottom.set_xlabel("step (optimizer updates)")
    bottom.axhline(0, color="k", lw=0.6)
    bottom.grid(alpha=0.3)
    _integer_ticks(bottom.xaxis)
    if drawn:
        top.legend(fontsize=6)
        bottom.legend(fontsize=6)
    else:
        _empty_note(top, "no per-step records (call Monitor.gradient() in the loop)")
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
            ax.hist(
                cos,
                bins=bins,
                histtype="step",
                density=True,
                label=run_title(entry, run),
                **_run_style(task, entry, run),
            )
            drawn = True
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("cos θ_ki (last probe)")
    ax.set_ylabel("density")
    ax.set_title("Angles of component gradients to the full gradient")
    return _finish(fig, ax, drawn, "no per-component arrays recorded", fontsize=7, ncol=2)


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
        etas = eta_grid(stats.norms)
        (line,) = ax.plot(
            etas, stats.ratio(etas), label=run_title(entry, run), **_run_style(task, entry, run)
        )
        if math.isfinite(run.eta):
            ax.axvline(run.eta, color=line.get_color(), ls=":", lw=1)
        drawn = True
    eta_axes(ax, drawn)
    ax.set_ylabel("ρ(η) = D(η) / (m‖∇f‖²)")
    ax.set_title("Descent ratio of the clipped sum (1 = unclipped)")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, drawn, "no per-component arrays recorded", fontsize=7, ncol=2)


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


SMOOTHNESS_FIELDS = ("hess_norm", "traj_smoothness")


def has_smoothness(task: TaskRecord) -> bool:
    """Return whether a run of the task recorded ``hess_norm`` or ``traj_smoothness``."""
    return any(name in run.rows for _, run in task.runs for name in SMOOTHNESS_FIELDS)


def _fit_line(ax, x: np.ndarray, y: np.ndarray, color, style: str, label: str) -> bool:

    fit = fit_l0_l1(np.abs(x), np.abs(y))
    if not fit.ok:
        return False
    lo, hi = fit.x_range
    xs = np.linspace(lo, hi, 50)
    ax.plot(xs, fit.bound(xs), style, color=color, lw=1.2,
            label=f"{label}: L0={fit.L0:.3g}, L1={fit.L1:.3g}")  # fmt: skip
    return True


def _component_pairs(run: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for epoch in sorted(run.component_files):
        arrays = run.components(epoch) or {}
        if "hess_norms" in arrays and "norms" in arrays:
            n = np.asarray(arrays["norms"], float).reshape(-1)
            h = np.asarray(arrays["hess_norms"], float).reshape(-1)
            if n.shape == h.shape:
                xs.append(n)
                ys.append(h)
    if not xs:
        return np.empty(0), np.empty(0)
    return np.concatenate(xs), np.concatenate(ys)


def smoothness(task: TaskRecord) -> plt.Figure:
    """‖∇²f(x_k)‖ against ‖∇f(x_k)‖ along each run, with the fitted (A2) line L0 + L1‖∇f‖.

    Reads: ``grad_norm``, ``hess_norm`` (Lanczos, dots) and ``traj_smoothness``
    (Zhang et al.'s secant, crosses) of ``epochs.csv``; ``norms`` and
    ``hess_norms`` of the component files (the (A5) pairs ‖∇f_i‖, ‖∇²f_i‖:
    small faint dots, and the line through ``max_i L0i``, ``max_i L1i``).
    The lines are :func:`clipscope.smoothness.fit_l0_l1` hull fits of the
    stored pairs (arithmetic only; nothing is differentiated). NaN pairs are
    skipped.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for entry, run in task.runs:
        label = run_title(entry, run)
        g = run.column("grad_norm")
        h, t = run.column("hess_norm"), run.column("traj_smoothness")
        color = None
        ok = np.isfinite(g) & np.isfinite(h)
        if ok.any():
            (pts,) = ax.plot(g[ok], h[ok], "o", ms=4, label=f"{label} ‖∇²f‖ (Lanczos)")
            color = pts.get_color()
            _fit_line(ax, g[ok], h[ok], color, "-", f"{label} fit")
            drawn = True
        ok_t = np.isfinite(g) & np.isfinite(t)
        if ok_t.any():
            (pts,) = ax.plot(g[ok_t], t[ok_t], "x", ms=5, color=color,
                             label=f"{label} secant (Zhang et al.)")  # fmt: skip
            color = pts.get_color()
            if not ok.any():
                _fit_line(ax, g[ok_t], t[ok_t], color, "-", f"{label} secant fit")
            drawn = True
        cx, cy = _component_pairs(run)
        keep = np.isfinite(cx) & np.isfinite(cy)
        if keep.any():
            (pts,) = ax.plot(cx[keep], cy[keep], ".", ms=3, alpha=0.35, color=color,
                             label=f"{label} components ‖∇²f_i‖")  # fmt: skip
            arrays = [run.components(e) or {} for e in sorted(run.component_files)]
            arrays = [a for a in arrays if "hess_norms" in a and "norms" in a]
            if len({np.size(a["norms"]) for a in arrays}) == 1:
                fits = fit_components(
                    np.abs([a["norms"] for a in arrays]), np.abs([a["hess_norms"] for a in arrays])
                )
                if fits and all(f.ok for f in fits):  # max_i needs every component
                    L0i, L1i = max(f.L0 for f in fits), max(f.L1 for f in fits)
                    xs = np.linspace(cx[keep].min(), cx[keep].max(), 50)
                    ax.plot(xs, L0i + L1i * xs, "--", color=pts.get_color(), lw=1,
                            label=f"{label} max_i L0i={L0i:.3g}, L1i={L1i:.3g}")  # fmt: skip
            drawn = True
    ax.set_xlabel("‖∇f(x_k)‖  (components: ‖∇f_i(x_k)‖)")
    ax.set_ylabel("‖∇²f(x_k)‖")
    ax.set_title(f"{task.name}: relaxed smoothness (A2) along the run")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, drawn, "no finite smoothness values recorded", fontsize=6, ncol=1)


def _share_curve(stats: ComponentStats, etas: np.ndarray) -> np.ndarray:
    """``ρ(η) = D(η)/D(∞)`` on ``etas`` (the advice's ρ; NaN when ``D(∞) ≤ 0``)."""
    profile = stats.profile()
    total = float(profile(math.inf))
    if not total > 0:
        return np.full(etas.shape, np.nan)
    return np.asarray(profile(etas)) / total


def _mark_advice(ax, advice: EtaAdvice, eta_run: float | None = None) -> None:
    ax.axhline(advice.target, color="green", ls="--", lw=1, label=f"target ρ = {advice.target:g}")
    if math.isfinite(advice.eta_max):
        ax.axvline(advice.eta_max, color="green", lw=1.5,
                   label=f"eta_max = {advice.eta_max:.3g} (η ≥ it keeps the target)")  # fmt: skip
    if math.isfinite(advice.eta_reversal) and advice.eta_reversal > 0:
        text = f"eta_reversal = {advice.eta_reversal:.3g} (below: D < 0 somewhere)"
        ax.axvline(advice.eta_reversal, color="red", lw=1.5, label=text)
    if eta_run is not None and math.isfinite(eta_run):
        ax.axvline(eta_run, color="k", ls=":", lw=1, label=f"the run's η = {eta_run:g}")
    ax.axhline(0, color="k", lw=0.6)


def _advice_axes(ax, lo: float) -> None:
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, -1.05), max(high, 1.05))
    ax.axhspan(min(lo, -1.05), 0, color="red", alpha=0.06)
    ax.set_xscale("log")
    ax.set_xlabel("clipping threshold η")
    ax.set_ylabel("ρ(η) = D(η) / D(∞)")
    ax.grid(alpha=0.3)


def eta_advice_run(
    title: str,
    points: list[tuple[int | str, ComponentStats]],
    advice: EtaAdvice,
    eta_run: float | None = None,
) -> plt.Figure:
    """ρ_k(η) at every probe of one run (colour: epoch), their minimum, and the advice marked.

    Reads the stored ``(n_i, d_i, ‖∇f_k‖)`` of each probe (``points``, from
    :func:`clipscope.report.findings.run_points`: ``(epoch, stats)``, or
    ``(name, stats)`` with a name such as ``"step 24"``); ``advice`` is
    :func:`clipscope.math.advice.advise` of the same points. Nothing is recomputed.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4))
    drawn = bool(points)
    if drawn:
        etas = advice_grid((s.norms for _, s in points), per_decade=150)
        curves = np.array([_share_curve(s, etas) for _, s in points])
        colors = plt.cm.viridis(np.linspace(0, 1, len(points)))
        for curve, color in zip(curves, colors, strict=True):
            ax.plot(etas, curve, color=color, lw=0.8, alpha=0.8)
        with np.errstate(invalid="ignore"):
            envelope = np.nanmin(curves, axis=0) if np.isfinite(curves).any() else curves[0]
        ax.plot(etas, envelope, color="k", lw=2, label="min over the probes")
        first, last = points[0][0], points[-1][0]
        if not isinstance(first, str):
            first, last = f"epoch {first}", f"epoch {last}"
        ax.plot([], [], color=colors[0], label=f"one probe each ({first} … {last})")
        _mark_advice(ax, advice, eta_run)
        _advice_axes(ax, float(np.nanmin(envelope)) if np.isfinite(envelope).any() else -1)
    ax.set_title(title, fontsize=9)
    return _finish(fig, ax, drawn, "no per-component arrays recorded", fontsize=6, ncol=1)


def eta_advice_task(task: TaskRecord, advice: EtaAdvice, per_run: dict) -> plt.Figure:
    """Plot the minimum over each run's probes of ρ(η), one line per run; mark the advice.

    Reads the component files of every run (``norms``, ``dots``, ``grad_norm``);
    ``advice`` and ``per_run`` (``{label: EtaAdvice}``) come from
    :func:`clipscope.report.findings.eta_advice`.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series = []
    for entry, run in task.runs:
        pts = run_points(run)
        if pts:
            series.append((entry, run, pts))
    drawn = bool(series)
    if drawn:
        etas = advice_grid((s.norms for *_, pts in series for _, s in pts), per_decade=150)
        lowest = 0.0
        for entry, run, pts in series:
            curves = np.array([_share_curve(s, etas) for _, s in pts])
            with np.errstate(invalid="ignore"):
                envelope = np.nanmin(curves, axis=0)
            lowest = min(lowest, float(np.nanmin(envelope)))
            label = run_label(entry, run)
            ax.plot(etas, envelope, label=f"{run_title(entry, run)} (eta_max "
                    f"{per_run[label].eta_max:.3g})", **_run_style(task, entry, run))  # fmt: skip
        _mark_advice(ax, advice)
        _advice_axes(ax, lowest)
    ax.set_title(f"{task.name}: ρ(η), the minimum over each run's probes", fontsize=9)
    return _finish(fig, ax, drawn, "no per-component arrays recorded", fontsize=6, ncol=1)


def has_eta_rule(task: TaskRecord) -> bool:
    """Whether a run of the task set η by a rule (``eta = "descent-safe"`` or ``"autoclip"``)."""
    return any(run.eta_rule is not None for _, run in task.runs)


def eta_trajectory(task: TaskRecord) -> plt.Figure:
    """Plot the η in force over training beside ρ, for the runs whose η a rule set.

    Reads: ``epoch``, ``eta`` (the η in force from each probe on), ``rho`` (or
    ``rho_p`` with Adam/AdamW: the share the rule keeps) and, for descent-safe
    runs, the component files, from which every η is recomputed
    (:meth:`~clipscope.run.directory.RunRecord.replay_etas`) and drawn as a line
    under the recorded markers; a recomputed η that differs from the recorded one
    is named in the title. Runs with a fixed η are drawn as a dotted level.
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.2), sharex=True)
    drawn, mismatched = False, []
    for entry, run in task.runs:
        x = run.column("epoch")
        style = _run_style(task, entry, run)
        label = f"{run_title(entry, run)} {run.eta_rule or f'η = {run.eta:g}'}"
        if run.eta_rule is None:
            if math.isfinite(run.eta):
                top.axhline(run.eta, color=style["color"], ls=":", lw=1, label=label)
            continue
        eta = run.column("eta")
        top.plot(x, eta, marker="o", markersize=4, ls="none", color=style["color"], label=label)
        replayed = run.replay_etas()
        if replayed is not None:
            again = np.array([d.eta for d in replayed])
            top.plot(x, again, color=style["color"], lw=1, alpha=0.6)
            if not np.array_equal(again, eta, equal_nan=True):
                mismatched.append(run_title(entry, run))
        share = run.column("rho_p") if np.isfinite(run.column("rho_p")).any() else run.column("rho")
        bottom.plot(x, share, marker="o", markersize=3, label=label, **style)
        drawn = True
    top.set_yscale("log")
    top.set_ylabel("η in force (markers: recorded,\nline: recomputed from the profiles)")
    title = f"{task.name}: η over training"
    top.set_title(title + (f" -- RECOMPUTED η DIFFERS: {', '.join(mismatched)}" if mismatched
                           else ""), fontsize=9)  # fmt: skip
    bottom.set_ylabel("ρ(η) kept (ρ_P with Adam/AdamW)")
    shares = finite(
        v
        for _, run in task.runs
        if run.eta_rule
        for v in [*run.column("rho"), *run.column("rho_p")]
    )
    low = min(0.0, float(shares.min()) - 0.05) if shares.size else 0.0
    bottom.set_ylim(low, max(1.05, float(shares.max()) + 0.05) if shares.size else 1.05)
    bottom.set_xlabel("epoch k")
    _integer_ticks(bottom.xaxis)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    if drawn:
        top.legend(fontsize=7)
    return _finish(fig, bottom, drawn, "no run set η by a rule", fontsize=7, ncol=1)


def figure_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def task_figures(task: TaskRecord) -> dict[str, plt.Figure]:
    """Every figure of one task, keyed by a file-name stem.

    ``steps`` (first) only for a Monitor's run, ``noise`` only when the task has a
    cross-section, ``smoothness`` only when a run of the task recorded smoothness
    columns, ``eta_rule`` only when a run's η was set by a rule (:func:`eta_trajectory`).
    """
    per = "per probe" if task_clock(task) == "step" else "per epoch"
    monitor = any(run.kind == "monitor" for _, run in task.runs)
    return (
        ({"steps": monitor_steps(task)} if monitor else {})
        | {
            "mean_cos": per_epoch(
                task, "c1", "mean cos θ_ki  (c1, A3)", f"{task.name}: mean cos θ {per}"
            ),
            "c2": per_epoch(task, "c2", "m_g / M_g  (c2, A4)", f"{task.name}: m_g/M_g {per}"),
            "cos_hist": cos_histogram(task),
            "eta_profile": eta_profile(task),
        }
        | ({"noise": noise_prediction(task)} if task.cross_section else {})
        | ({"smoothness": smoothness(task)} if has_smoothness(task) else {})
        | ({"eta_rule": eta_trajectory(task)} if has_eta_rule(task) else {})
    )
