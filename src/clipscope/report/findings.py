r"""The answers of a study, per task, from its stored records only: ``findings.json``.

:func:`task_findings` turns one task's records (:class:`~clipscope.run.study.TaskRecord`)
into the answers to the paper's questions; :func:`study_findings` does it for
every task and :func:`write_findings` stores them. Nothing here touches a model
or differentiates anything: every number is re-derived from the stored
``(n_i, d_i, ‖∇f_k‖)`` of the component files, the rows of ``epochs.csv`` and
the study's cross-sections. The keys (``docs/reproduce.md`` documents them):

``fig1_trend``
    Figure 1's claim that the mean cos θ (c1, A3) and m_g/M_g (c2, A4) grow with
    the batch size: per method, the run-averaged value of each at every batch
    size, the Spearman rank correlation over batch sizes
    (:func:`scipy.stats.spearmanr`) with its exact two-sided permutation p-value
    (:func:`scipy.stats.permutation_test`, all ``n!`` orderings), and the
    per-epoch table (epochs × batch sizes) with the per-epoch Spearman
    correlations, and the ``label`` of :func:`clipscope.report.labels.trend_label`
    ("grows" only when strictly increasing). ``mean_cos_vs_batch_size`` /
    ``c2_vs_batch_size`` at the top are those of the task's first method
    (IGC-clip where the task has it). A study key, like the next.
``positive_cos_share_b1``
    From the batch-size-1 cross-section at the final point of the smallest-batch
    IGC run: the share of defined per-sample cosines that are > 0 (the paper
    reports about 90 % on CIFAR-10 / ResNet18).
``min_rho``
    The smallest ``ρ_k(η) = D_k(η)/(m‖∇f_k‖²)`` at the run's own η over every
    probe of every run: did clipping ever reverse descent (``ρ < 0``)? With the
    ``label`` of :func:`clipscope.report.labels.descent_label` (a share below
    :data:`~clipscope.report.labels.KEPT_WARN` is a warning).
``eta_advice``
    :func:`clipscope.math.advice.advise` over every probe of every run of the
    task: ``target``, ``eta_max`` (every ``η ≥ eta_max`` keeps ``ρ ≥ target`` at
    every probe), ``eta_reversal`` (every ``η > eta_reversal`` keeps ``D ≥ 0``
    at every probe), and the same per run.
``preconditioned``
    Only when a run recorded the preconditioned dots (Adam / AdamW: the
    component files' ``dots_p``, ``u_norm``, ``grad_u_inner``):
    :func:`preconditioned` -- per such run the same answers for
    ``ρ_P(η) = Σ_i γ_i(η)⟨g_i, u⟩ / (m⟨∇f, u⟩)``, ``u = P⁻¹∇f``: the smallest
    ρ_P at the run's η, the η advice on ρ_P (exact, from the stored dots), whether
    any η reverses the preconditioned descent, the probes where P was unset,
    and ρ beside ρ_P at every probe.
``theorems``
    One entry per run: :func:`clipscope.report.theorem.check_theorem` on the
    records, reduced to ``verdict`` (``satisfied`` / ``violated`` / ``not
    checked`` / ``not applicable`` with its ``reason``: outside the theorem's
    scope), the ``failing`` condition, the ``deciding`` quantity, and how
    the constants were obtained (Lanczos tolerance and iterations).
``steps``
    A Monitor's run only: :func:`monitor_steps`.
``threads``, ``notes``, ``kind``
    The torch thread counts (``study.json``'s, or each run's ``env.json``); what
    the reader left out (a half-written last row); ``"study"`` or ``"run"``.

Every label follows the rules written in ``docs/reproduce.md`` ("Labels").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from clipscope import __version__
from clipscope.atomic import atomic_write_text
from clipscope.math.advice import DEFAULT_TARGET, EtaAdvice, advise, check_target
from clipscope.math.stats import ComponentStats, DirectionStats
from clipscope.math.theory import ADAPTIVE_OPTIMIZERS, THEOREMS
from clipscope.report.labels import (
    descent_label,
    preconditioned_label,
    reversal_label,
    trend_label,
    unset_label,
)
from clipscope.report.theorem import check_theorem, run_scope
from clipscope.run.directory import RunRecord
from clipscope.run.study import TaskRecord, load_study

__all__ = [
    "FINDINGS_FILE",
    "PAPER",
    "VERDICTS",
    "eta_advice",
    "fig1_trend",
    "min_rho",
    "positive_cos_share_b1",
    "preconditioned",
    "rank_trend",
    "run_label",
    "run_optimizer",
    "run_points",
    "run_points_p",
    "study_findings",
    "task_findings",
    "theorem_verdicts",
    "write_findings",
]

FINDINGS_FILE = "findings.json"
VERDICTS = ("satisfied", "violated", "not checked", "not applicable")
#: What Qian et al. (AISTATS 2021) report, for the comparisons.
PAPER = {
    "fig1_trend": (
        "Figure 1: for ResNet18/CIFAR-10 and AWD-LSTM/PTB the mean cos θ (1(a), 1(b)) and "
        "m_g/M_g (1(c), 1(d)) at every epoch are larger for larger batch sizes"
    ),
    "positive_cos_share_b1": "about 90% of the cos θ are positive at batch size 1 on CIFAR-10",
}


def run_optimizer(entry: dict, run: RunRecord) -> str:
    """Return the run's optimizer: the study entry's, else its config's (absent: ``sgd``)."""
    return str(entry.get("optimizer") or run.setting("optimizer", default="sgd")).lower()


def run_label(entry: dict, run: RunRecord) -> str:
    """``METHOD-BB`` of a run, as in the study's folder names (``igc-B16``).

    A run with another optimizer than SGD names it: ``igc-adamw-B16``.
    """
    method = "monitor" if run.kind == "monitor" else entry.get("method") or run.method
    batch = entry.get("batch_size") or run.batch_size
    optimizer = run_optimizer(entry, run)
    return f"{method}-B{batch}" if optimizer == "sgd" else f"{method}-{optimizer}-B{batch}"


def _json(value: Any) -> Any:
    """Plain JSON values: NaN/inf floats become ``None``; numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def run_points(run: RunRecord) -> list[tuple[int, ComponentStats]]:
    """``(epoch, ComponentStats)`` of every stored probe of a run, in epoch order.

    Probes whose ``‖∇f‖`` is missing or non-finite are left out.
    """
    out = []
    for epoch in sorted(run.component_files):
        arrays = run.components(epoch) or {}
        if "norms" not in arrays or "dots" not in arrays:
            continue
        grad_norm = float(np.asarray(arrays.get("grad_norm", math.nan)).reshape(-1)[0])
        if not math.isfinite(grad_norm):
            continue
        out.append((epoch, ComponentStats(arrays["norms"], arrays["dots"], grad_norm)))
    return out


def run_points_p(run: RunRecord) -> list[tuple[int, DirectionStats]]:
    """``(epoch, DirectionStats)`` of every probe that stored the preconditioned dots.

    From ``components/epoch_XXXX.npz``: ``norms``, ``dots_p`` (``⟨g_i, u⟩``),
    ``u_norm`` (``‖u‖``) and ``grad_u_inner`` (``⟨∇f, u⟩``), ``u = P⁻¹∇f``
    (written by runs with an Adam or AdamW optimizer). Probes without them, or
    with a non-finite ``‖u‖`` or ``⟨∇f, u⟩``, are left out; empty for an SGD run.
    """
    out = []
    for epoch in sorted(run.component_files):
        arrays = run.components(epoch) or {}
        if not {"norms", "dots_p", "u_norm", "grad_u_inner"} <= set(arrays):
            continue
        u_norm = float(np.asarray(arrays["u_norm"]).reshape(-1)[0])
        inner = float(np.asarray(arrays["grad_u_inner"]).reshape(-1)[0])
        if not (math.isfinite(u_norm) and math.isfinite(inner)):
            continue
        out.append((epoch, DirectionStats(arrays["norms"], arrays["dots_p"], u_norm, inner)))
    return out


# -- Figure 1's trend ------------------------------------------------------------------


def _spearman_pvalue(x: np.ndarray, y: np.ndarray) -> float:
    """Exact two-sided permutation p-value of Spearman's ρ (every ordering of ``y``)."""

    def statistic(values):
        return scipy_stats.spearmanr(x, values).statistic

    n_orderings = math.factorial(len(x))
    result = scipy_stats.permutation_test(
        (y,),
        statistic,
        permutation_type="pairings",
        alternative="two-sided",
        n_resamples=max(n_orderings, 1),
    )
    return float(result.pvalue)


def rank_trend(batch_sizes: Sequence[float], values: Sequence[float]) -> dict[str, Any]:
    """Spearman rank correlation of ``values`` over ``batch_sizes`` (NaN pairs dropped).

    Returns ``{"batch_sizes", "values", "n", "spearman", "p_value", "direction",
    "monotone"}``: ``direction`` is ``"increasing"`` / ``"decreasing"`` /
    ``"none"`` by the sign of ρ_s (``None`` with fewer than 2 finite values or
    constant values), ``monotone`` whether ``|ρ_s| = 1``. The p-value is
    exact (all ``n!`` orderings) for ``n ≤ 8``.

    >>> t = rank_trend([8, 16, 32, 64], [0.1, 0.2, 0.3, 0.4])
    >>> t["spearman"], round(t["p_value"], 4), t["direction"]
    (1.0, 0.0833, 'increasing')
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    out: dict[str, Any] = {
        "batch_sizes": [int(x) for x in b],
        "values": v.tolist(),
        "n": int(keep.sum()),
        "spearman": math.nan,
        "p_value": math.nan,
        "p_value_method": "exact permutation test over every ordering (two-sided)",
        "direction": None,
        "monotone": None,
    }
    if keep.sum() < 2 or np.ptp(v[keep]) == 0:
        return out
    x, y = b[keep], v[keep]
    rho = float(scipy_stats.spearmanr(x, y).statistic)
    rho = float(np.clip(round(rho, 12), -1.0, 1.0))  # ±0.9999999999999999 is ±1
    out["spearman"] = rho
    if keep.sum() <= 8:
        out["p_value"] = _spearman_pvalue(x, y)
    else:  # pragma: no cover - studies have at most a handful of batch sizes
        out["p_value"] = float(scipy_stats.spearmanr(x, y).pvalue)
        out["p_value_method"] = "scipy.stats.spearmanr (t approximation)"
    out["direction"] = "increasing" if rho > 0 else "decreasing" if rho < 0 else "none"
    out["monotone"] = bool(abs(rho) == 1.0)
    return out


def _trend(runs: list[tuple[dict, RunRecord]], field: str) -> dict[str, Any]:
    by_size: dict[int, RunRecord] = {}
    for entry, run in runs:
        by_size[int(entry.get("batch_size") or run.batch_size or 0)] = run
    sizes = sorted(by_size)
    averaged = []
    epochs: list[int] = sorted(
        {int(e) for run in by_size.values() for e in run.column("epoch") if np.isfinite(e)}
    )
    table = {k: [math.nan] * len(sizes) for k in epochs}
    for j, b in enumerate(sizes):
        run = by_size[b]
        column = run.column(field)
        finite = column[np.isfinite(column)]
        averaged.append(float(finite.mean()) if finite.size else math.nan)
        for e, value in zip(run.column("epoch"), column, strict=True):
            if np.isfinite(e):
                table[int(e)][j] = float(value)
    out = rank_trend(sizes, averaged)
    out["averaged_over"] = f"the probe rows of each run (epochs.csv column {field!r})"
    out["label"] = trend_label(out)
    per_epoch = [rank_trend(sizes, table[k]) for k in epochs]
    out["per_epoch"] = {
        "epochs": epochs,
        "batch_sizes": sizes,
        "table": [table[k] for k in epochs],
        "spearman": [t["spearman"] for t in per_epoch],
        "increasing_epochs": sum(1 for t in per_epoch if t["direction"] == "increasing"),
        "monotone_increasing_epochs": sum(1 for t in per_epoch if t["spearman"] == 1.0),
    }
    return out


def fig1_trend(task: TaskRecord) -> dict[str, Any]:
    """Figure 1's trend per method: Spearman over batch sizes of the run-averaged c1 and c2."""
    methods: dict[str, list] = {}
    adaptive = []
    for entry, run in task.runs:
        if "exit_code" in entry:
            continue
        if run_optimizer(entry, run) in ADAPTIVE_OPTIMIZERS:
            adaptive.append(run_label(entry, run))  # Figure 1 compares plain (SGD) steps
            continue
        methods.setdefault(str(entry.get("method") or run.method), []).append((entry, run))
    by_method = {
        m: {"mean_cos_vs_batch_size": _trend(r, "c1"), "c2_vs_batch_size": _trend(r, "c2")}
        for m, r in methods.items()
    }
    left_out = (
        {"left_out": adaptive, "left_out_why": "adaptive optimizer: Figure 1 compares plain steps"}
        if adaptive
        else {}
    )
    if not by_method:
        return {"method": None, "reason": "no completed runs", "by_method": {}} | left_out
    first = "igc" if "igc" in by_method else next(iter(by_method))
    paper = {
        name: by_method[first][name]["label"]["label"] == "grows"
        for name in ("mean_cos_vs_batch_size", "c2_vs_batch_size")
    }
    return {
        "method": first,
        **by_method[first],
        "agrees_with_paper": paper,
        "paper": PAPER["fig1_trend"],
        "by_method": by_method,
    } | left_out


# -- the per-sample claim --------------------------------------------------------------


def positive_cos_share_b1(task: TaskRecord) -> dict[str, Any]:
    """Share of positive per-sample cosines at the final point of one run (batch size 1)."""
    section = task.per_sample
    if not section:
        return {
            "share": None,
            "reason": "no batch-size-1 cross-section in this study (per_sample = false)",
            "paper": PAPER["positive_cos_share_b1"],
        }
    if "norms" not in section:
        return {
            "share": None,
            "reason": f"the batch-size-1 probe failed: {section.get('reason', 'no arrays')}",
            "paper": PAPER["positive_cos_share_b1"],
        }
    stats = ComponentStats(section["norms"], section["dots"], section["grad_norm"])
    cos = stats.cos[stats.cos_defined]
    return {
        "share": float(np.mean(cos > 0)) if cos.size else math.nan,
        "n": int(cos.size),
        "n_undefined": int(stats.m - cos.size),
        "mean_cos": float(cos.mean()) if cos.size else math.nan,
        "median_cos": float(np.median(cos)) if cos.size else math.nan,
        "run": section.get("point"),
        "epoch": section.get("epoch"),
        "sample": section.get("sample"),
        "route": section.get("route"),
        "paper": PAPER["positive_cos_share_b1"],
    }


# -- ρ at the run's η, and the advice ----------------------------------------------------


def min_rho(task: TaskRecord) -> dict[str, Any]:
    """Return the smallest ρ_k(η) at each run's own η over all probes; ``reversed`` if < 0."""
    per_run = {}
    best: tuple[float, str, int, float, str, str | None] | None = None
    for entry, run in task.runs:
        label, eta = run_label(entry, run), run.eta
        # a rule's run (descent-safe, AutoClip): the η in force at each probe (its column)
        at_point = dict(zip(run.column("epoch"), run.column("eta"), strict=True))
        values = [
            (float(s.ratio(e)), epoch)
            for epoch, s in run_points(run)
            if (e := at_point.get(epoch, math.nan) if run.eta_rule else eta) > 0
        ]
        values = [(v, e) for v, e in values if math.isfinite(v)]
        if not values:
            continue
        value, epoch = min(values)
        at = run.point_name(epoch)
        there = run.eta_at(epoch)  # a rule's run: the η in force at that probe
        per_run[label] = {"value": value, "epoch": epoch, "at": at, "eta": there}
        per_run[label] |= {"eta_rule": run.eta_rule, "label": descent_label(value)}
        if best is None or value < best[0]:
            best = (value, label, epoch, there, at, run.eta_rule)
    if best is None:
        return {
            "value": None,
            "reason": "no per-component records",
            "per_run": {},
            "label": descent_label(None),
        }
    return {
        "value": best[0],
        "run": best[1],
        "epoch": best[2],
        "at": best[4],
        "eta": best[3],
        "eta_rule": best[5],
        "reversed": bool(best[0] < 0),
        "label": descent_label(best[0]),
        "per_run": per_run,
    }


def eta_advice(
    task: TaskRecord, target: float = DEFAULT_TARGET
) -> tuple[dict[str, Any], EtaAdvice | None, dict[str, EtaAdvice]]:
    """Return the η advice over every probe of the task: as JSON, as EtaAdvice, and per run."""
    target = check_target(target)
    labels, points, per_run = [], [], {}
    for entry, run in task.runs:
        label = run_label(entry, run)
        pts = run_points(run)
        if not pts:
            continue
        names = [f"{label} {run.point_name(epoch)}" for epoch, _ in pts]
        per_run[label] = advise([s for _, s in pts], target, names)
        labels += names
        points += [s for _, s in pts]
    if not points:
        none = {"target": target, "eta_max": None, "eta_reversal": None}
        return none | {"reason": "no per-component records"}, None, {}
    result = advise(points, target, labels)
    overall = result.to_dict()
    overall["per_run"] = {
        label: {"eta_max": a.eta_max, "eta_reversal": a.eta_reversal, "decided_by": a.decided_by}
        for label, a in per_run.items()
    }
    overall["rho"] = "D_k(η)/D_k(∞) with D_k(∞) = Σ_i d_i (= m‖∇f_k‖², eq. (20))"
    return overall, result, per_run


#: What ρ_P is, in findings.json.
RHO_P = (
    "ρ_P(η) = Σ_i min(1, η/n_i)⟨g_i, u⟩ / Σ_i ⟨g_i, u⟩ with u = P⁻¹∇f, P the optimizer's "
    "preconditioner (Adam: diag(√v̂) + ε, bias-corrected) read at the probe and frozen; "
    "Σ_i ⟨g_i, u⟩ = m⟨∇f, u⟩"
)


def unset_shares(run: RunRecord, epochs: Sequence[int]) -> list[tuple[str, float]]:
    """``(probe, p_unset_share)`` of each probe epoch, from the rows (NaN when not recorded)."""
    column, share = run.column("epoch"), run.column("p_unset_share")
    out = []
    for epoch in epochs:
        hit = np.flatnonzero(column == epoch)
        out.append((run.point_name(epoch), float(share[hit[0]]) if hit.size else math.nan))
    return out


def _run_preconditioned(
    entry: dict, run: RunRecord, target: float
) -> tuple[dict[str, Any], EtaAdvice | None, list]:
    label, eta = run_label(entry, run), run.eta
    pts = run_points_p(run)
    out: dict[str, Any] = {"optimizer": run_optimizer(entry, run), "eta": eta}
    if not pts:
        return out | {"reason": "no preconditioned dots recorded (dots_p)"}, None, []
    names = [f"{label} {run.point_name(epoch)}" for epoch, _ in pts]
    advice = advise([s for _, s in pts], target, names)
    plain = dict(run_points(run))
    at = [run.point_name(epoch) for epoch, _ in pts]
    rho_p = [run.ratio_at(e, s) for e, s in pts]  # at the η in force (a rule's per probe)
    rho = [run.ratio_at(e, plain[e]) if e in plain else math.nan for e, _ in pts]
    finite = [(v, k) for k, v in enumerate(rho_p) if math.isfinite(v)]
    low: dict[str, Any] = {"value": None, "label": preconditioned_label(None)}
    if finite:
        value, k = min(finite)
        low = {"value": value, "epoch": pts[k][0], "at": at[k], "eta": run.eta_at(pts[k][0])}
        low |= {"eta_rule": run.eta_rule, "label": preconditioned_label(value)}
        low["rho_there"] = rho[k]
    plain_advice = advise(list(plain.values()), target) if plain else None
    shares = unset_shares(run, [e for e, _ in pts])
    out |= {
        "min_rho_p": low,
        "eta_advice": advice.to_dict(),
        "reversed": None if math.isnan(advice.eta_reversal) else bool(advice.eta_reversal > 0),
        "reversal": reversal_label(_finite(advice.eta_reversal), advice.reversal_at),
        "sgd_eta_advice": None
        if plain_advice is None
        else {"eta_max": plain_advice.eta_max, "eta_reversal": plain_advice.eta_reversal},
        "p_unset": {
            "shares": [s for _, s in shares],
            "max_share": max((s for _, s in shares if math.isfinite(s)), default=None),
            "label": unset_label(shares),
        },
        "probes": {"at": at, "rho": rho, "rho_p": rho_p},
    }
    return out, advice, list(zip(names, (s for _, s in pts), strict=True))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def preconditioned(task: TaskRecord, target: float = DEFAULT_TARGET) -> dict[str, Any] | None:
    """Return the answers under the optimizer's preconditioner per run that recorded it, or None.

    For every run whose component files hold ``dots_p`` (:func:`run_points_p`),
    from those stored dots only: ``min_rho_p`` (the smallest ρ_P at the run's η
    over its probes, with :func:`~clipscope.report.labels.preconditioned_label`
    and ρ at the same probe), ``eta_advice``
    (:func:`clipscope.math.advice.advise` on the ρ_P profiles: ``eta_max`` keeps
    ``ρ_P ≥ target`` at every probe, ``eta_reversal`` below which some probe's
    preconditioned descent is reversed), ``reversed`` (``eta_reversal > 0``)
    with its :func:`~clipscope.report.labels.reversal_label`, ``sgd_eta_advice``
    (the ρ answers of the same probes, side by side), ``p_unset`` (the
    ``p_unset_share`` of each probe, :func:`~clipscope.report.labels.unset_label`)
    and ``probes`` (ρ and ρ_P at the run's η at every probe). Over every such
    run of the task: ``eta_advice``. Runs without P (SGD: ρ_P = ρ) are named
    in ``without_p``; an adaptive run without recorded dots gets a ``reason``.
    """
    target = check_target(target)
    runs, names, points, without = {}, [], [], []
    for entry, run in task.runs:
        label = run_label(entry, run)
        adaptive = run_optimizer(entry, run) in ADAPTIVE_OPTIMIZERS
        if not adaptive and not run_points_p(run):
            without.append(label)
            continue
        item, _, named = _run_preconditioned(entry, run, target)
        runs[label] = item
        names += [n for n, _ in named]
        points += [s for _, s in named]
    if not runs:
        return None
    overall: dict[str, Any] = {"target": target, "eta_max": None, "eta_reversal": None}
    if points:
        overall = advise(points, target, names).to_dict()
    return {"rho_p": RHO_P, "eta_advice": overall, "runs": runs, "without_p": without}


# -- the theorems -------------------------------------------------------------------------


def _iterations(run: RunRecord) -> dict[str, Any]:
    full = run.column("hess_iterations")
    full = full[np.isfinite(full)]
    comp = []
    for epoch in sorted(run.component_files):
        arrays = run.components(epoch) or {}
        if "hess_iterations" in arrays:
            comp.append(int(np.max(arrays["hess_iterations"])))
    return {
        "tol": run.setting("smoothness_tol"),
        "max_iter": run.setting("smoothness_max_iter"),
        "iterations_max": int(full.max()) if full.size else None,
        "iterations_min": int(full.min()) if full.size else None,
        "component_iterations_max": max(comp) if comp else None,
        "solves": int(full.size),
    }


def _ratio(a: float, b: float | None) -> float:
    if b is None:
        return 0.0  # α_max = ∞
    return a / b if b > 0 else math.inf


def _verdict_of(res: dict[str, Any], run: RunRecord) -> dict[str, Any]:
    c1, c2 = res["c1"], res["c2"]
    out: dict[str, Any] = {"verdict": "not checked", "failing": None, "deciding": None}
    if res.get("not_applicable"):
        return out | {
            "verdict": "not applicable",
            "reason": res["not_applicable"],
            "deciding": {"quantity": "the theorem's scope", "value": res["not_applicable"]},
        }
    if not c1 > 0:
        return {
            "verdict": "violated",
            "failing": "(A3)",
            "deciding": {"quantity": "min over the probes of c1 (mean cos θ)", "value": c1},
        }
    if not 0 < c2 <= 1:
        return {
            "verdict": "violated",
            "failing": "(A4)",
            "deciding": {"quantity": "min over the probes of c2 (m_g/M_g)", "value": c2},
        }
    bound = res.get("bound")
    if bound is None:
        out["deciding"] = {"quantity": "smoothness constants", "value": res["estimate_note"]}
        return out
    cond = bound["condition"]
    alpha, alpha_max = res["alpha"], cond["alpha_max"]
    step = {
        "quantity": f"α / α_max {cond['equation']}",
        "value": _ratio(alpha, alpha_max),
        "alpha": alpha,
        "alpha_max": alpha_max,
        "terms": cond.get("terms"),
    }
    rhs = bound["rhs"]
    sides = {
        "quantity": f"left / right side of {bound['equation']}",
        "value": _ratio(bound["lhs"], rhs),
        "lhs": bound["lhs"],
        "rhs": rhs,
    }
    drift = res.get("drift") or {}
    if not cond["holds"]:
        out |= {"verdict": "violated", "failing": cond["equation"], "deciding": step}
    elif not bound["holds"]:
        out |= {"verdict": "violated", "failing": bound["equation"], "deciding": sides}
    elif drift.get("violations"):
        out |= {
            "verdict": "violated",
            "failing": "(42)",
            "deciding": {"quantity": "max |drift (39)| / bound (42)", "value": drift["max_ratio"]},
        }
    else:
        out |= {"verdict": "satisfied", "deciding": step, "bound": sides}
    if not res["all_converged"]:
        note = (
            "a Lanczos solve stopped before its tolerance; its Ritz value is a lower bound "
            "on ‖∇²f‖, so the constants may be too small"
        )
        out["note"] = note
        if out["verdict"] == "satisfied":  # too-small constants favour 'satisfied'
            out["verdict"] = "not checked"
    return out


def _measured_rho_p(entry: dict, run: RunRecord) -> dict[str, Any] | None:
    """For an adaptive run (no theorem covers it): the smallest ρ_P at its η, measured."""
    if run_optimizer(entry, run) not in ADAPTIVE_OPTIMIZERS:
        return None
    values = [(run.ratio_at(e, s), e) for e, s in run_points_p(run)]
    values = [(v, e) for v, e in values if math.isfinite(v)]
    if not values:
        return {
            "quantity": "min over the probes of ρ_P(η) at the run's η",
            "value": None,
            "label": preconditioned_label(None),
        }
    value, epoch = min(values)
    return {
        "quantity": "min over the probes of ρ_P(η) at the run's η",
        "value": value,
        "eta": run.eta_at(epoch),
        "eta_rule": run.eta_rule,
        "at": run.point_name(epoch),
        "probes": len(values),
        "label": preconditioned_label(value),
    }


def theorem_verdicts(task: TaskRecord) -> list[dict[str, Any]]:
    """One entry per run: Theorem 3.1 (SGD-clip) or 3.2 (IGC-clip) checked on the records."""
    out = []
    for entry, run in task.runs:
        label = run_label(entry, run)
        try:
            res = check_theorem(run)
        except (FileNotFoundError, ValueError) as exc:
            reason = run_scope(run)
            out.append(
                {
                    "run": label,
                    "theorem": THEOREMS.get(run.method),
                    "verdict": "not checked" if reason is None else "not applicable",
                    "failing": None,
                    "deciding": {"quantity": "records", "value": str(exc)}
                    if reason is None
                    else {"quantity": "the theorem's scope", "value": reason},
                }
                | ({} if reason is None else {"reason": reason})
                | ({} if (m := _measured_rho_p(entry, run)) is None else {"measured": m})
            )
            continue
        item = {"run": label, "theorem": res["theorem"], **_verdict_of(res, run)}
        measured = _measured_rho_p(entry, run)
        if measured is not None:
            item["measured"] = measured
        item["constants"] = {
            "estimate": res["estimate"],
            "L0": res["L0"],
            "L1": res["L1"],
            "fit_points": (res.get("fit") or {}).get("n_points"),
            "L0i": res.get("L0i"),
            "L1i": res.get("L1i"),
            "component_estimate": res.get("component_estimate"),
            "c1": res["c1"],
            "c2": res["c2"],
            "m": res["m"],
        }
        if res["estimate"] is not None:
            item["lanczos"] = _iterations(run) | {"all_converged": res["all_converged"]}
        item["detail"] = res["verdict"]
        out.append(item)
    return out


# -- all of it ------------------------------------------------------------------------------


def monitor_steps(run: RunRecord) -> dict[str, Any]:
    """Summarise a Monitor run's per-step records: steps, share clipped at η, cosines.

    From :meth:`~clipscope.run.directory.RunRecord.step_arrays` (the steps between
    probes) and the probe rows (``step``, ``c1``: the mean cos θ_ki at each probe).
    """
    arrays = run.step_arrays()
    steps = arrays.get("step", np.empty(0))
    norms = arrays.get("step_grad_norm", np.empty(0))
    clipped = arrays.get("step_clipped", np.empty(0))
    cos = arrays.get("step_cos", np.empty(0))

    def stat(values: np.ndarray, how) -> float:
        values = values[np.isfinite(values)]
        return float(how(values)) if values.size else math.nan

    # a step whose norm was not recorded (NaN) is left out of the median and the max, and
    # counted: a clipped one had ‖g‖ above the η then in force, whatever the known max is
    unknown = ~np.isfinite(norms)
    clipped_unknown = int(np.sum(unknown & (clipped == 1))) if clipped.shape == norms.shape else 0
    return {
        "steps": int(steps.size),
        "first_step": int(steps.min()) if steps.size else None,
        "last_step": int(steps.max()) if steps.size else None,
        "eta": run.eta,
        "eta_rule": run.eta_rule,  # a rule's run: each step clipped at the η then in force
        "clipped_share": stat(clipped, np.mean),
        "grad_norm_median": stat(norms, np.median),
        "grad_norm_max": stat(norms, np.max),
        "grad_norm_unknown": int(unknown.sum()),  # steps without a recorded ‖g‖
        "grad_norm_unknown_clipped": clipped_unknown,  # of them clipped: ‖g‖ > η there
        "cos_mean": stat(cos, np.mean),
        "cos_min": stat(cos, np.min),
        "probes": {
            "step": [int(v) if np.isfinite(v) else None for v in run.column("step")],
            "mean_cos": run.column("c1").tolist(),
            "rho": run.column("rho").tolist(),
        },
    }


#: What the answers of a run with per-sample components (a Monitor's, a fit's) are about.
PER_SAMPLE_NOTE = (
    "per-sample components (per_sample = true): every sample is a component, so ρ(η), ρ_P(η) "
    "and the η advice describe clipping each sample's gradient at η (per-sample clipping, as "
    "in DP-SGD), not the loop's clip of its mini-batch gradient; an η from them is no threshold "
    "for the loop's clip (clip_grad_norm_, max_grad_norm, fit's eta). The steps' norms, "
    "cosines and clipped share are the loop's own mini-batch steps."
)


def probe_fallbacks(run: RunRecord) -> dict[str, Any] | None:
    """Return the probes of ``run`` whose per-sample route used its exact fallback.

    From each component file's ``route`` and ``fallback`` (the names; written
    since the columns exist): ``{"probes": [probe names], "of": probes with a
    record, "params": [the names, sorted]}``, or None when no probe used the
    fallback (or none recorded it). The fallback is exact; it is slower.
    """
    probes, names, recorded = [], set(), 0
    for epoch in sorted(run.component_files):
        arrays = run.components(epoch) or {}
        if "route" not in arrays:
            continue
        recorded += 1
        used = [str(n) for n in np.asarray(arrays.get("fallback", [])).reshape(-1)]
        if used:
            probes.append(run.point_name(epoch))
            names.update(used)
    if not probes:
        return None
    return {"probes": probes, "of": recorded, "params": sorted(names)}


def is_per_sample_run(run: RunRecord) -> bool:
    """Whether ``run`` probed per-sample components (``per_sample = true``: Monitor or fit)."""
    return bool(run.setting("per_sample", default=False))


def task_findings(task: TaskRecord, target: float = DEFAULT_TARGET) -> dict[str, Any]:
    """Every finding of one task (see the module docstring), JSON-ready.

    A study's task has every key; a single run directory (``kind = "run"``) has
    no study-only keys (``fig1_trend``, ``positive_cos_share_b1``: they compare
    runs over batch sizes, or need the study's batch-size-1 section) and, for a
    Monitor's run, ``steps`` (:func:`monitor_steps`).
    """
    advice, _, _ = eta_advice(task, target)
    out: dict[str, Any] = {"kind": task.kind, "runs": [run_label(e, r) for e, r in task.runs]}
    per_sample = [run_label(e, r) for e, r in task.runs if is_per_sample_run(r)]
    if per_sample:
        out["per_sample_components"] = {"runs": per_sample, "note": PER_SAMPLE_NOTE}
    if task.kind == "study":
        out["fig1_trend"] = fig1_trend(task)
        out["positive_cos_share_b1"] = positive_cos_share_b1(task)
    out |= {"min_rho": min_rho(task), "eta_advice": advice}
    under_p = preconditioned(task, target)
    if under_p is not None:
        out["preconditioned"] = under_p
    out["theorems"] = theorem_verdicts(task)
    fallbacks = {run_label(e, r): f for e, r in task.runs if (f := probe_fallbacks(r))}
    if fallbacks:
        out["probe_fallbacks"] = fallbacks
    steps = {run_label(e, r): monitor_steps(r) for e, r in task.runs if r.kind == "monitor"}
    if steps:
        out["steps"] = steps
    out["threads"] = task.threads or {
        run_label(e, r): {k: r.env.get(k) for k in ("threads", "interop_threads", "cpus")}
        for e, r in task.runs
    }
    notes = [note for _, r in task.runs for note in r.notes]
    if notes:
        out["notes"] = notes
    return _json(out)


def study_findings(
    tasks: Sequence[TaskRecord] | str | Path, target: float = DEFAULT_TARGET
) -> dict[str, Any]:
    """``{"format", "clipscope", "target", "tasks": {name: task_findings}}`` of a study."""
    if isinstance(tasks, (str, Path)):
        tasks = load_study(tasks)
    return {
        "format": 1,
        "clipscope": __version__,
        "target": check_target(target),
        "tasks": {task.name: task_findings(task, target) for task in tasks},
    }


def write_findings(path: str | Path, findings: dict[str, Any]) -> Path:
    """Write ``findings`` as strict JSON (no NaN) to ``path`` atomically; return the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(_json(findings), indent=2, allow_nan=False) + "\n")
    return path
