"""The self-contained HTML report: figures embedded as base64 PNG, one table per task.

Built only from stored records (:mod:`clipscope.run.directory`); the per-epoch
checks (A3, A4, bound (33), ρ at the run's η) are re-derived from the stored
per-component ``(n_i, d_i, ‖∇f‖)`` with :class:`clipscope.math.stats.ComponentStats`,
which is pure arithmetic on those numbers.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from clipscope import __version__
from clipscope.atomic import atomic_write_bytes
from clipscope.math.advice import DEFAULT_TARGET, check_target
from clipscope.math.stats import ComponentStats
from clipscope.report import plots
from clipscope.report import preconditioned as plots_p
from clipscope.report.findings import FINDINGS_FILE, eta_advice, study_findings, write_findings
from clipscope.report.labels import BAD, NA, OK, WARN, descent_label, verdict_class
from clipscope.report.theorem import ESTIMATES, check_theorem, eta_phrase, measured_text
from clipscope.run.directory import RunRecord
from clipscope.run.study import TaskRecord, load_study

#: How every report begins: ``clipscope report --out`` rebuilds a file that starts so.
REPORT_HEAD = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>clipscope report</title>'
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.ok { color: #176317; } .bad { color: #a01010; } .warn { color: #8a5200; } .na { color: #888; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
.figs img { width: 520px; border: 1px solid #eee; }
.note { color: #555; font-size: .9em; }
"""


@dataclass
class RunSummary:
    """Checks of one run, derived from its stored records."""

    label: str
    epochs: int
    eta: float
    a3_share: float
    c1_min: float
    c2_min: float
    bound33_checked: int
    bound33_held: int
    rho_last: float
    clipped_last: float
    b_noise_last: float
    loss_last: float

    def cells(self) -> list[str]:
        """Table cells, formatted (colours by the rules of ``docs/reproduce.md``, "Labels")."""
        bound = (
            _span(NA, "no probe with every cos θ ≥ 0")
            if self.bound33_checked == 0
            else _verdict(
                self.bound33_held == self.bound33_checked,
                f"{self.bound33_held}/{self.bound33_checked}",
            )
        )
        c1 = (
            _na()
            if not math.isfinite(self.c1_min)
            else _verdict(self.c1_min > 0, _num(self.c1_min))
        )
        c2 = (
            _na()
            if not math.isfinite(self.c2_min)
            else _verdict(0 < self.c2_min <= 1, _num(self.c2_min))
        )
        rho = descent_label(self.rho_last)
        return [
            html.escape(self.label),
            str(self.epochs),
            _num(self.eta),
            c1,
            c2,
            _span(NA, _pct(self.a3_share)) if math.isfinite(self.a3_share) else _na(),
            bound,
            _span(rho["class"], _num(self.rho_last)) if math.isfinite(self.rho_last) else _na(),
            _pct(self.clipped_last),
            _num(self.b_noise_last),
            _num(self.loss_last),
        ]


_HEADERS = [
    "run",
    "probes",
    "η",
    "min c1 (A3: &gt; 0)",
    "min c2 (A4: &gt; 0)",
    "probes with every cos θ ≥ 0",
    "bound (33) held there",
    "ρ(η) last",
    "clipped fraction last",
    "B_noise last",
    "f(x_k) last",
]


def _na() -> str:
    return '<span class="na">–</span>'


def _num(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "∞" if value == math.inf else _na()
    return f"{value:.4g}"


def _eta_text(eta: float | None, rule: str | None) -> str:
    """``η = 0.5`` (``η = ∞`` unclipped), or a rule's ``the η in force (descent-safe: …)``."""
    if rule:
        return html.escape(eta_phrase(_opt(eta), rule))
    return f"η = {_num(_opt(eta))}"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%" if math.isfinite(value) else _na()


def _verdict(good: bool, text: str) -> str:
    return _span(OK if good else BAD, text)


def _span(css: str, text: str) -> str:
    """``text`` (already HTML) in a span of class ``css`` (ok, warn, bad, na)."""
    assert css in (OK, WARN, BAD, NA)
    return f'<span class="{css}">{text}</span>'


def _last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else math.nan


def _nanmin(values: list[float] | np.ndarray) -> float:
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    return float(array.min()) if array.size else math.nan


def summarize_run(entry: dict, run: RunRecord) -> RunSummary:
    """Derive the report's checks for one run from its stored records."""
    eta = run.eta
    a3, c1, c2, rho, clipped = [], [], [], [], []
    checked = held = 0
    # a rule's run (descent-safe, AutoClip): the η in force at each probe (its column)
    at_point = dict(zip(run.column("epoch"), run.column("eta"), strict=True))
    for epoch in sorted(run.component_files):
        eta = at_point.get(epoch, math.nan) if run.eta_rule else run.eta
        arrays = run.components(epoch)
        grad_norm = float(np.asarray(arrays.get("grad_norm", math.nan)).reshape(-1)[0])
        if not math.isfinite(grad_norm):
            continue
        stats = ComponentStats(arrays["norms"], arrays["dots"], grad_norm)
        a3.append(bool(stats.a3_holds))
        c1.append(stats.c1)
        c2.append(stats.c2)
        if not eta > 0:  # AutoClip at x_0: no η yet
            rho.append(math.nan)
            clipped.append(math.nan)
            continue
        rho.append(float(stats.ratio(eta)))
        clipped.append(float(stats.clipped_fraction(eta)))
        if stats.a3_holds:
            checked += 1
            bound = float(stats.bound33(eta))
            held += float(stats.descent(eta)) >= bound - 1e-9 * abs(bound)
    if not a3:  # no component arrays: fall back on the stored rows
        c1 = list(run.column("c1"))
        c2 = list(run.column("c2"))
    return RunSummary(
        label=plots.run_title(entry, run),
        epochs=run.n_rows,
        eta=run.eta,
        a3_share=float(np.mean(a3)) if a3 else math.nan,
        c1_min=_nanmin(c1),
        c2_min=_nanmin(c2),
        bound33_checked=checked,
        bound33_held=int(held),
        rho_last=rho[-1] if rho else math.nan,
        clipped_last=clipped[-1] if clipped else math.nan,
        b_noise_last=_last_finite(run.column("b_noise")),
        loss_last=_last_finite(run.column("loss")),
    )


def _opt(value: float | None) -> float:
    return math.nan if value is None else value


def _theory_rows(res: dict) -> list[tuple[str, str]]:
    """(quantity, value) rows of one run's theory check."""
    fit = res.get("fit") or {}
    rows = [
        ("theorem", html.escape(res.get("theorem") or "none for this method")),
        ("its scope", html.escape(res.get("scope") or "–")),
        ("estimate used", html.escape(ESTIMATES.get(res["estimate"], "none"))),
        (
            "L0, L1 (A2)",
            f"{_num(res['L0'])}, {_num(res['L1'])} ({html.escape(str(fit.get('method')))} fit, "
            f"{fit.get('n_points', 0)} points, {fit.get('n_above', 0)} above; flags: "
            f"{html.escape(', '.join(fit.get('flags', [])) or 'none')})",
        ),
    ]
    if res["estimate"] != "recorded_trajectory":
        done = res["all_converged"]
        rows.append(("Lanczos solves converged", _verdict(done, "all" if done else "not all")))
    traj = res.get("trajectory_fit")
    if traj:
        rows.append(
            (
                "L0, L1 from the secants",
                f"{_num(_opt(traj['L0']))}, {_num(_opt(traj['L1']))}",
            )
        )
    if "L0i" in res:
        rows.append(
            (
                "max_i L0i, max_i L1i (A5)",
                f"{_num(res['L0i'])}, {_num(res['L1i'])} "
                f"({html.escape(str(res.get('component_estimate') or 'not recorded'))})",
            )
        )
    rows += [
        ("min c1, min c2", f"{_num(res['c1'])}, {_num(res['c2'])}"),
        (
            "f(x0) − f*",
            f"≤ {_num(res['gap'])} (lower bound used: f* ≥ {_num(res['f_star_lower_bound'])})",
        ),
    ]
    bound = res.get("bound")
    if bound:
        cond = bound["condition"]
        rhs = math.inf if bound["rhs"] is None else bound["rhs"]
        alpha_max = math.inf if cond["alpha_max"] is None else cond["alpha_max"]
        rows += [
            (
                f"condition {cond['equation']}",
                _verdict(cond["holds"], f"α = {_num(res['alpha'])} vs α_max = {_num(alpha_max)}"),
            ),
            (
                f"bound {bound['equation']}",
                _verdict(bound["holds"], f"{_num(bound['lhs'])} ≤ {_num(rhs)}"),
            ),
        ]
    drift = res.get("drift")
    if drift and drift["epochs"]:
        rows.append(
            (
                "IGC drift |(39)| vs (42)",
                _verdict(
                    drift["violations"] == 0,
                    f"{drift['epochs'] - drift['violations']}/{drift['epochs']} epochs within; "
                    f"max ratio {_num(drift['max_ratio'])}",
                ),
            )
        )
    rows.append(("verdict", html.escape(res["verdict"])))
    return rows


def theory_section(task: TaskRecord) -> str:
    """Render the theory checks of a task's runs; one sentence names runs without values."""
    parts, missing = [], []
    for entry, run in task.runs:
        part = render_theory(entry, run)
        if part:
            parts.append(part)
        else:
            missing.append(plots.run_title(entry, run))
    if missing:
        parts.append(
            f'<p class="note">Theory check of {html.escape(", ".join(missing))}: no smoothness '
            "values recorded in these runs (train with <code>smoothness_every</code> &gt; 0); "
            "nothing is computed here.</p>"
        )
    return "".join(parts)


def render_theory(entry: dict, run: RunRecord) -> str:
    """HTML theory check of one run from its recorded values only (never computes gradients).

    :func:`clipscope.report.theorem.check_theorem` without a ``measure``; an empty
    string for a run without recorded smoothness values (see :func:`theory_section`).
    """
    label = html.escape(plots.run_title(entry, run))
    try:
        res = check_theorem(run)
    except (FileNotFoundError, ValueError) as exc:
        return (
            f'<p class="note">Theory check of {label}: not possible ({html.escape(str(exc))}).</p>'
        )
    if res.get("not_applicable"):
        measured = res.get("measured") or {}
        return (
            f'<p class="note">Theory check of {label}: '
            + _span(NA, "not applicable: " + html.escape(res["not_applicable"]))
            + ("" if measured.get("value") is None else "; " + html.escape(measured_text(measured)))
            + "</p>"
        )
    if res["estimate"] is None:
        return ""  # listed by theory_section in one sentence
    body = "".join(
        f'<tr><td class="l">{html.escape(name)}</td><td class="l">{value}</td></tr>'
        for name, value in _theory_rows(res)
    )
    return (
        f'<h3>Theory check: {label}</h3><table class="theory"><thead><tr>'
        f'<th class="l">quantity</th><th class="l">value</th></tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_task(
    task: TaskRecord, figure_dir: Path | None = None, target: float = DEFAULT_TARGET
) -> str:
    """HTML section of one task: its table and its figures (also saved as PNG files)."""
    rows = [summarize_run(entry, run) for entry, run in task.runs]
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{h}</th>' for i, h in enumerate(_HEADERS))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i == 0 else ""}">{c}</td>' for i, c in enumerate(r.cells()))
        + "</tr>"
        for r in rows
    )
    images = []
    figures = plots.task_figures(task)
    _, advice, per_run = eta_advice(task, target)
    if advice is not None:
        figures["eta_advice"] = plots.eta_advice_task(task, advice, per_run)
    if plots_p.has_preconditioned(task):  # an Adam/AdamW run: ρ and ρ_P side by side
        figures["rho_p_profile"] = plots_p.rho_p_profile(task)
        figures["rho_p_per_epoch"] = plots_p.rho_p_per_epoch(task)
    for stem, fig in figures.items():
        png = plots.figure_png(fig)
        if figure_dir is not None:
            figure_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(figure_dir / f"{task.name}-{stem}.png", png)
        images.append(_img(png, f"{task.name} {stem}"))
    notes = "".join(
        f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in task.notes.items()
    )
    theory = theory_section(task)
    return (
        f'<section class="task"><h2>{html.escape(task.name)}</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + (f'<ul class="note">{notes}</ul>' if notes else "")
        + f'<div class="figs">{"".join(images)}</div>{theory}</section>'
    )


def _fmt_trend(trend: dict, what: str) -> str:
    """One Figure 1 row: the label of :func:`clipscope.report.labels.trend_label` and the counts."""
    label = trend.get("label") or {}
    if not label:
        return _na() + f" (no {html.escape(what)} trend recorded)"
    per = trend.get("per_epoch", {})
    epochs = len(per.get("epochs", []))
    values = ", ".join(_num(_opt(v)) for v in trend.get("values", []))
    sizes = ", ".join(str(b) for b in trend.get("batch_sizes", []))
    detail = f" — run averages {values} for B = {sizes}" if sizes else ""
    if epochs:
        detail += (
            f"; per epoch ρ_s &gt; 0 at {per.get('increasing_epochs', 0)}/{epochs}, strictly "
            f"increasing at {per.get('monotone_increasing_epochs', 0)}/{epochs}"
        )
    return _span(label["class"], html.escape(label["text"])) + detail


def _fmt_advice(advice: dict) -> str:
    if advice.get("eta_max") is None:
        return _na()
    target = advice["target"]
    text = (
        f"every η ≥ {advice['eta_max']:.4g} keeps ≥ {100 * target:g}% of the unclipped descent "
        f"at every probe (set by {html.escape(str(advice['decided_by']))})"
    )
    rev = advice.get("eta_reversal")
    if rev:
        text += (
            f"; clipping reverses descent at some probe for η just below {rev:.4g} "
            f"(set by {html.escape(str(advice['reversal_at']))})"
        )
    else:
        text += "; no η > 0 reverses descent at any probe"
    return text + f" — {advice['n_points']} probes"


def _lanczos_text(lanczos: dict) -> str:
    """How the constants were solved for: tolerance, products for f (and f_i when recorded)."""
    if not lanczos:
        return ""
    parts = [f"Lanczos tol {lanczos.get('tol')}, ≤ {lanczos.get('iterations_max')} products (f)"]
    if lanczos.get("component_iterations_max") is not None:
        parts.append(f"≤ {lanczos['component_iterations_max']} (f_i)")
    done = "all converged" if lanczos.get("all_converged") else "NOT all converged"
    return ", ".join(parts) + f"; {done}"


def _fmt_theorems(items: list[dict]) -> str:
    checked = [t for t in items if t["verdict"] in ("satisfied", "violated")]
    rows = []
    for t in checked:
        deciding = t.get("deciding") or {}
        value = deciding.get("value")
        shown = _num(value) if isinstance(value, (int, float)) else html.escape(str(value))
        rows.append(
            f'<tr><td class="l">{html.escape(t["run"])}</td>'
            f'<td class="l">{html.escape(str(t["theorem"]))}</td>'
            f"<td>{_span(verdict_class(t['verdict']), t['verdict'])}</td>"
            f'<td class="l">{html.escape(str(t.get("failing") or "–"))}</td>'
            f'<td class="l">{html.escape(str(deciding.get("quantity", "")))} = {shown}</td>'
            f'<td class="l">{html.escape(_lanczos_text(t.get("lanczos") or {}))}</td></tr>'
        )
    table = (
        '<table class="theorems"><thead><tr><th class="l">run</th><th class="l">theorem</th>'
        '<th>verdict</th><th class="l">failing</th><th class="l">deciding quantity</th>'
        f'<th class="l">how</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
        if rows
        else ""
    )
    notes = []
    outside = [t for t in items if t["verdict"] == "not applicable"]
    for t in outside:
        notes.append(
            f'<p class="note">{html.escape(t["run"])}: '
            + _span(NA, "not applicable: " + html.escape(str(t.get("reason"))))
            + _fmt_measured(t.get("measured"))
            + "</p>"
        )
    others = [t["run"] for t in items if t["verdict"] == "not checked"]
    if others:
        notes.append(
            '<p class="note">Not checked (no recorded smoothness values, or constants that '
            f"could not be fitted): {html.escape(', '.join(others))}.</p>"
        )
    return table + "".join(notes)


def _fmt_measured(measured: dict | None) -> str:
    """``; measured instead: smallest ρ_P(η = 0.5) = 0.93 (epoch 3 of 7 probes): <label>``."""
    if not measured:
        return ""
    label = measured["label"]
    if measured.get("value") is None:
        return "; measured instead: " + _span(label["class"], html.escape(label["text"]))
    rule = measured.get("eta_rule")
    rho_p = (
        f"ρ_P at {_eta_text(measured['eta'], rule)}"
        if rule
        else f"ρ_P(η = {_num(_opt(measured['eta']))})"
    )
    return (
        f"; measured instead: smallest {rho_p} = "
        f"{measured['value']:.4g} ({html.escape(measured['at'])}, {measured['probes']} probes): "
        + _span(label["class"], html.escape(label["text"]))
    )


def _fmt_rho_p(item: dict) -> str:
    """Render the smallest ρ_P at the run's η, its label, and ρ at the same probe."""
    if "reason" in item:
        return _na() + " " + html.escape(item["reason"])
    low = item["min_rho_p"]
    label = low["label"]
    if low.get("value") is None:
        return _span(label["class"], html.escape(label["text"]))
    return _span(label["class"], html.escape(label["text"])) + (
        f": ρ_P = {low['value']:.4g} at {html.escape(low['at'])} "
        f"({_eta_text(low.get('eta', item['eta']), low.get('eta_rule'))}); "
        f"ρ = {_num(_opt(low.get('rho_there')))} there"
    )


def _fmt_advice_p(item: dict) -> str:
    """Render the advice on ρ_P with the reversal label, and the ρ answers of the same probes."""
    if "reason" in item:
        return _na()
    advice = item["eta_advice"]
    if advice.get("eta_max") is None:
        text = _na() + " ρ_P is undefined at every probe"
    else:
        text = (
            f"every η ≥ {advice['eta_max']:.4g} keeps ≥ {100 * advice['target']:g}% of the "
            "preconditioned descent at every probe (set by "
            f"{html.escape(str(advice['decided_by']))})"
        )
    rev = item["reversal"]
    text += "; " + _span(rev["class"], html.escape(rev["text"]))
    plain = item.get("sgd_eta_advice")
    if plain and plain.get("eta_max") is not None:
        text += f" — ρ at the same probes: η ≥ {plain['eta_max']:.4g} keeps the target, " + (
            f"reversal below {plain['eta_reversal']:.4g}"
            if plain.get("eta_reversal")
            else "no η reverses descent"
        )
    return text + f" — {advice['n_points']} probes"


def _preconditioned_rows(under_p: dict | None, target: float) -> list[tuple[str, str]]:
    """Return the findings rows of the runs with an Adam/AdamW P (``findings.preconditioned``)."""
    rows: list[tuple[str, str]] = []
    for label, item in ((under_p or {}).get("runs") or {}).items():
        rows += [
            (f"{label}: smallest ρ_P(η) at the run's η", _fmt_rho_p(item)),
            (f"{label}: η advice under P (target {target:g})", _fmt_advice_p(item)),
        ]
        unset = (item.get("p_unset") or {}).get("label")
        if unset:
            rows.append((f"{label}: P at the probes", _span(NA, html.escape(unset["text"]))))
    return rows


def _fmt_rho(low: dict) -> str:
    """Render the smallest ρ(η) row with its :func:`~clipscope.report.labels.descent_label`."""
    if low.get("value") is None:
        return _na() + " " + html.escape(low.get("reason", ""))
    label = low.get("label") or descent_label(low["value"])
    where = low.get("at") or f"epoch {low['epoch']}"
    return _span(label["class"], html.escape(label["text"])) + (
        f": ρ = {low['value']:.4g} ({html.escape(str(low['run']))}, {html.escape(where)}, "
        f"{_eta_text(low['eta'], low.get('eta_rule'))})"
    )


def _fmt_steps(label: str, steps: dict) -> str:
    """Render a Monitor run's steps in one line (``findings.monitor_steps``)."""
    if not steps.get("steps"):
        return _na() + " no per-step records (Monitor.gradient() was not called)"
    return (
        f"{steps['steps']:,} steps ({steps['first_step']} … {steps['last_step']}): "
        f"{_pct(_opt(steps['clipped_share']))} clipped at "
        + (
            f"the η in force ({html.escape(steps['eta_rule'])}); "
            if steps.get("eta_rule")
            else f"η = {_num(_opt(steps['eta']))}; "
        )
        + f"‖g‖ median {_num(_opt(steps['grad_norm_median']))}, max "
        f"{_num(_opt(steps['grad_norm_max']))}{_unknown_norms(steps)}; cos∠(g, ∇f_k) mean "
        f"{_num(_opt(steps['cos_mean']))}, min {_num(_opt(steps['cos_min']))}"
    )


def _unknown_norms(steps: dict) -> str:
    """`` over the N steps with a recorded ‖g‖ (k unknown; …)`` when some are unknown, else ''."""
    unknown = int(steps.get("grad_norm_unknown") or 0)
    if not unknown:
        return ""
    clipped = int(steps.get("grad_norm_unknown_clipped") or 0)
    text = f" over the {steps['steps'] - unknown:,} steps with a recorded ‖g‖ ({unknown:,} unknown"
    if clipped:
        above = "the η in force" if steps.get("eta_rule") else f"η = {_num(_opt(steps['eta']))}"
        text += f"; {clipped:,} of them clipped, so their ‖g‖ was above {above}"
    return text + ")"


def findings_section(findings: dict) -> str:
    """Render the headline: per task, the answers of ``findings.json`` in one table each.

    A study's task shows every row; a single run directory only the rows about
    one run (smallest ρ(η), η advice, the theorem, and a Monitor's steps).
    """
    parts = ['<section class="findings"><h2>Findings</h2>']
    for name, task in findings["tasks"].items():
        rows = []
        if task.get("kind", "study") == "study":
            trend = task["fig1_trend"]
            share = task["positive_cos_share_b1"]
            method = str(trend.get("method") or "–").upper()
            rows += [
                (
                    f"Figure 1: mean cos θ vs batch size ({method})",
                    _fmt_trend(trend.get("mean_cos_vs_batch_size", {}), "c1"),
                ),
                (
                    f"Figure 1: m_g/M_g vs batch size ({method})",
                    _fmt_trend(trend.get("c2_vs_batch_size", {}), "c2"),
                ),
                (
                    "cos θ > 0 at batch size 1",
                    _na() + " " + html.escape(share.get("reason", ""))
                    if share.get("share") is None
                    else f"{_pct(share['share'])} of {share['n']:,} "
                    f"({html.escape(str(share['sample']))}; final point of {share['run']}, "
                    f"epoch {share['epoch']}) — the paper: {html.escape(share['paper'])}",
                ),
            ]
        for label, steps in (task.get("steps") or {}).items():
            rows.append((f"steps of {label}", _fmt_steps(label, steps)))
        rows += [
            ("smallest ρ(η) at the run's η", _fmt_rho(task["min_rho"])),
            (
                f"η advice (target {task['eta_advice']['target']:g})",
                _fmt_advice(task["eta_advice"]),
            ),
        ]
        rows += _preconditioned_rows(task.get("preconditioned"), task["eta_advice"]["target"])
        body = "".join(
            f'<tr><td class="l">{html.escape(k)}</td><td class="l">{v}</td></tr>' for k, v in rows
        )
        notes = "".join(
            f'<p class="note">{_span(WARN, html.escape(n))}</p>' for n in task.get("notes", [])
        )
        per_sample = task.get("per_sample_components")
        if per_sample:  # the answers are about per-sample clipping, not the loop's clip
            runs = ", ".join(per_sample["runs"])
            notes = (
                f'<p class="note">{_span(WARN, html.escape(f"{runs}: " + per_sample["note"]))}</p>'
                + notes
            )
        for label, used in (task.get("probe_fallbacks") or {}).items():
            names = ", ".join(used["params"][:6]) + (" …" if len(used["params"]) > 6 else "")
            text = (
                f"{label}: the per-sample route took {len(used['params'])} parameter(s) from its "
                f"exact per-sample fallback (exact, slower) at {len(used['probes'])} of "
                f"{used['of']} probes: {names}"
            )
            notes += f'<p class="note">{html.escape(text)}</p>'
        threads = html.escape(_threads_text(task.get("threads")))
        parts.append(
            f"<h3>{html.escape(name)}</h3><table><tbody>{body}</tbody></table>"
            + notes
            + _fmt_theorems(task["theorems"])
            + f'<p class="note">torch threads: {threads}</p>'
        )
    parts.append(
        f'<p class="note">All of it is in <code>{FINDINGS_FILE}</code> '
        "(keys and the rules behind every label: docs/reproduce.md).</p></section>"
    )
    return "".join(parts)


def _threads_text(threads: dict | None) -> str:
    """``1 intra-op (setting 1), 2 interop, 2 CPUs``, or per run from its ``env.json``."""
    known = threads and any(
        isinstance(v, dict) and v.get("threads") is not None for v in threads.values()
    )
    if not threads or ("intra_op" not in threads and not known):
        return "not recorded"
    if "intra_op" in threads:  # study.json's record of the task
        return (
            f"{threads['intra_op']} intra-op (setting {threads['setting']}; 0 = every core), "
            f"{threads['interop']} interop, {threads['cpus']} CPUs"
        )
    seen = sorted({str(v.get("threads")) for v in threads.values() if isinstance(v, dict)})
    return "intra-op " + ", ".join(seen) + " (env.json of each run)"


def build_report(
    path: str | Path, out: str | Path | None = None, *, target: float = DEFAULT_TARGET
) -> Path:
    """Rebuild figures, ``findings.json`` and ``report.html`` of a study or run directory.

    ``findings.json`` (:mod:`clipscope.report.findings`) is written beside the
    report (its folder is created when missing); ``target`` is the η advice's
    share of the unclipped descent. Returns the path of the written report.
    Never recomputes gradients.

    Raises
    ------
    FileNotFoundError
        ``path`` is neither a study nor a run directory.
    ValueError
        A run without ``config.toml`` or rows, a malformed ``epochs.csv`` row or
        component file (each naming the file), a target outside (0, 1].
    OSError
        The report cannot be written (a full disk, a read-only folder).
    """
    target = check_target(target)
    path = Path(path)
    tasks = load_study(path)
    out = Path(out) if out is not None else path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    findings = study_findings(tasks, target)
    write_findings(out.parent / FINDINGS_FILE, findings)
    sections = findings_section(findings) + "".join(
        render_task(task, out.parent / "figures", target) for task in tasks
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""{REPORT_HEAD}
<style>{_CSS}</style></head>
<body><h1>clipscope report</h1>
<p class="note">Built {stamp} by clipscope {__version__} from the records in
<code>{html.escape(str(path))}</code>.
Mean cos θ_ki is c1: assumption (A3) of the theorems is c1 &gt; 0 at every probe (min c1);
m_g/M_g is c2 (A4). Bound (33): D(η) ≥ m·min(η c1, c2‖∇f‖)·‖∇f‖, checked at every probe
where every cos θ_ki ≥ 0 (the stricter form (33) needs).
ρ(η) = D(η)/(m‖∇f‖²): 1 without clipping, negative when clipping reverses descent.
For a run with Adam or AdamW, ρ_P(η) = D_P(η)/(m⟨∇f, u⟩) with u = P⁻¹∇f (the optimizer's
preconditioner P read at the probe) is the same share of the preconditioned descent.
B_noise = tr(Σ)/‖∇f‖² is the gradient-noise-scale heuristic.
The theory checks (Theorem 3.1/3.2) use only smoothness values the runs recorded, and only
for runs inside a theorem's scope. Every label follows a rule of docs/reproduce.md ("Labels").</p>
{sections}
</body></html>
"""
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
