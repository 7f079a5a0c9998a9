r"""The theorem check of one run: Theorem 3.1 (SGD-clip) or 3.2 (IGC-clip) against its records.

:func:`check_theorem` reads a run's stored records (:class:`~clipscope.run.directory.RunRecord`)
and returns a plain dict (what ``clipscope theory`` prints and the HTML report
tabulates). It never touches a model: where the records hold no smoothness
values, the caller may hand it a ``measure`` function
(:func:`clipscope.theory_check.theory_check` does: Lanczos at the checkpoints);
the report hands it none. The dict holds:

* ``c1``, ``c2``: the minimum over the probe rows of ``epochs.csv`` (A3, A4);
* ``L0, L1`` (A2), fitted (:func:`clipscope.math.smoothness.fit_l0_l1`) to
  ``(‖∇f(x_k)‖, ‖∇²f(x_k)‖)`` pairs from, in this order of preference
  (``estimate`` names the one used):

  1. ``"recorded_hessian"``: the ``hess_norm`` column (Lanczos during the
     run, ``smoothness_every > 0``);
  2. ``"recorded_trajectory"``: the ``traj_smoothness`` column (Zhang et
     al.'s secant between probe points; a *lower* estimate of the largest
     ``‖∇²f‖`` on each segment, so the fitted constants may be too small);
  3. ``"measured_checkpoints"``: Lanczos now, at ``x_0`` (rebuilt from the
     seeded config) and at every stored checkpoint (only the newest
     ``keep_checkpoints`` exist: few points) — only with a ``measure`` function.

  When both recorded columns exist, the trajectory fit is reported too
  (``trajectory_fit``) for comparison;
* ``L0i, L1i`` (A5, ``max_i`` of the per-component fits): from the
  ``hess_norms`` arrays of ``components/epoch_XXXX.npz`` paired with their
  ``norms`` (``‖∇f_i(x_k)‖``) when recorded, else measured at the checkpoints
  (with ``measure``), else NaN; needed for IGC-clip (or asked with
  ``components=True``);
* ``f(x_0) − f*`` bounded by ``f(x_0) − 0``: the built-in losses (squared
  error, cross-entropy) are nonnegative, so ``f* ≥ 0`` is the lower bound used;
* the step-size condition (37) or (44), both sides of (38) or (45) over the
  probe rows (:mod:`clipscope.math.theory`), and for IGC the drift (39) against
  its bound (42). The run records ``igc_drift = S_k − D_k(η)``
  (:class:`clipscope.loop.IGCDrift`), a **signed** number; (39) and (42) are
  about its absolute value, so ``|igc_drift|`` is compared;
* ``scope`` (what the run's theorem covers, :data:`clipscope.math.theory.THEOREM_SCOPE`)
  and ``not_applicable`` (why the run lies outside it, :func:`run_scope`; None
  inside): a run outside gets the verdict ``"not applicable: <reason>"`` and no
  bound (a momentum, weight-decay or scheduled run, an adaptive optimizer, a
  method without a theorem, η = ∞);
* ``measured`` (Adam / AdamW runs only, :func:`measured_rho_p`): what the
  run measured instead of a bound, the smallest recorded ρ_P(η) at its η
  (``epochs.csv`` column ``rho_p``) with the probe where it occurred; the
  verdict sentence ends with it when one was recorded;
* ``verdict``: the outcome in plain words.

Without ``measure`` nothing is computed from a model: a run without
recorded smoothness values gets ``estimate = None`` and a verdict that says
so (this is what the report uses; STYLE §11).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from clipscope.math import theory
from clipscope.math.smoothness import FIT_METHODS, fit_components, fit_l0_l1
from clipscope.math.theory import ADAPTIVE_OPTIMIZERS, THEOREM_SCOPE, THEOREMS
from clipscope.run.directory import RunRecord

__all__ = ["ESTIMATES", "Measure", "check_theorem", "measured_rho_p", "measured_text", "run_scope"]

#: ``measure(components) -> {"points": [...], "skipped_checkpoints": [...], "m": m}``:
#: Lanczos pairs at the run's points (see :func:`clipscope.theory_check.measure_points`).
Measure = Callable[[bool], dict[str, Any]]

#: What each value of ``estimate`` means.
ESTIMATES = {
    "recorded_hessian": "Lanczos ‖∇²f(x_k)‖ recorded at the probe points during the run",
    "recorded_trajectory": (
        "Zhang et al.'s secant ‖∇f(x_k') − ∇f(x_k)‖/‖x_k' − x_k‖ recorded between probe "
        "points (a lower estimate of the largest ‖∇²f‖ on each segment)"
    ),
    "measured_checkpoints": "Lanczos ‖∇²f‖ measured now at x_0 and at the stored checkpoints",
}
GAP_NOTE = "f(x0) − f* ≤ f(x0) − 0: the losses are nonnegative, so f* ≥ 0 is used"
DRIFT_NOTE = (
    "igc_drift is recorded signed (S_k − D_k(η)); (39) and its bound (42) concern |igc_drift|"
)


def _min(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.min()) if values.size else math.nan


def _recorded_components(run: Any) -> tuple[np.ndarray, np.ndarray, bool, int | None]:
    """``(‖∇f_i‖, ‖∇²f_i‖)`` as (K, m) arrays from the component files that hold ``hess_norms``."""
    grads, hess, converged, m = [], [], True, None
    for epoch in sorted(run.component_files):
        arrays = run.components(epoch)
        if arrays is None or "norms" not in arrays:
            continue
        m = int(np.asarray(arrays["norms"]).size) if m is None else m
        if "hess_norms" not in arrays:
            continue
        grads.append(np.asarray(arrays["norms"], dtype=np.float64))
        hess.append(np.asarray(arrays["hess_norms"], dtype=np.float64))
        converged &= bool(np.all(arrays.get("hess_converged", True)))
    if not hess or len({h.size for h in hess}) != 1:
        return np.empty((0, 0)), np.empty((0, 0)), converged, m
    return np.array(grads), np.array(hess), converged, m


def run_scope(record: RunRecord) -> str | None:
    """Why the run lies outside its theorem's scope (:func:`clipscope.math.theory.theorem_scope`).

    Read from its ``config.toml``: ``method``, ``eta``, ``optimizer`` (absent in
    older runs: ``"sgd"``), ``momentum``, ``weight_decay``, ``schedule``,
    ``milestones``, ``schedule_gamma``. None when the run is inside it. A run
    whose η a rule set (``eta = "descent-safe"`` or ``"autoclip"``) is outside:
    the theorems are statements about one fixed η. So is a run whose probes
    measured per-sample components (``per_sample = true``): its c1, c2 and ρ are
    of another partition than the components the method stepped on.
    """
    if record.kind != "monitor" and record.setting("per_sample", default=False):
        return (
            "the probes measured per-sample components (per_sample = true), not the "
            "components the method stepped on; the theorems' c1, c2 and m are the latter's"
        )
    if record.eta_rule is not None:
        return (
            f"η was set while training (eta = {record.eta_rule!r}); Theorems 3.1 and 3.2 "
            "are about one fixed threshold η"
        )
    return theory.theorem_scope(
        record.method,
        record.eta,
        optimizer=str(record.setting("optimizer", default="sgd")),
        momentum=float(record.setting("momentum", default=0.0)),
        weight_decay=float(record.setting("weight_decay", default=0.0)),
        schedule=str(record.setting("schedule", default="constant")),
        milestones=tuple(record.setting("milestones", default=())),
        schedule_gamma=float(record.setting("schedule_gamma", default=0.1)),
    )


def measured_rho_p(record: RunRecord) -> dict[str, Any] | None:
    """Return the smallest recorded ρ_P(η) at the run's η for an Adam / AdamW run, else None.

    Read from the ``rho_p`` column of ``epochs.csv`` (ρ_P at the run's η at each
    probe, ``docs/training.md``): ``{"value", "epoch", "at", "probes", "eta"}``,
    ``value`` None when no probe recorded a finite one (a run written before the
    column existed). No theorem of the paper covers these runs; this is what
    was measured instead of a bound.
    """
    if str(record.setting("optimizer", default="sgd")).lower() not in ADAPTIVE_OPTIMIZERS:
        return None
    rho_p, epochs = record.column("rho_p"), record.column("epoch")
    keep = np.isfinite(rho_p)
    out: dict[str, Any] = {"value": None, "probes": int(keep.sum()), "eta": record.eta}
    out["eta_rule"] = record.eta_rule  # a rule's run: ρ_P at the η in force at each probe
    if keep.any():
        k = int(np.flatnonzero(keep)[np.argmin(rho_p[keep])])
        epoch = int(epochs[k]) if np.isfinite(epochs[k]) else k
        out |= {"value": float(rho_p[k]), "epoch": epoch, "at": record.point_name(epoch)}
        if record.eta_rule:
            out["eta"] = record.eta_at(epoch)
    return out


def eta_phrase(eta: float, rule: str | None = None) -> str:
    """``η = 0.5``, or for a rule's run ``the η in force (descent-safe)`` (and its value there).

    >>> eta_phrase(0.5), eta_phrase(float("nan"), "autoclip"), eta_phrase(1.25, "descent-safe")
    ('η = 0.5', 'the η in force (autoclip)', 'the η in force (descent-safe: 1.25 there)')
    """
    if rule:
        known = eta is not None and math.isfinite(eta)  # NaN: none yet (AutoClip at x_0)
        return f"the η in force ({rule}{f': {eta:.4g} there' if known else ''})"
    return f"η = {eta:g}"


def measured_text(measured: dict[str, Any]) -> str:
    """``measured instead: min ρ_P(η = 0.5) over 7 probes = 0.93 (epoch 3)``."""
    rule = measured.get("eta_rule")
    eta = measured["eta"]
    rho_p = f"ρ_P at {eta_phrase(eta, rule)}" if rule else f"ρ_P(η = {eta:g})"
    if measured["value"] is None:
        return f"measured instead: no {rho_p} recorded"
    return (
        f"measured instead: min {rho_p} over {measured['probes']} probes = "
        f"{measured['value']:.4g} ({measured['at']})"
    )


def check_theorem(
    record: RunRecord,
    *,
    fit: str = "hull",
    components: bool = False,
    measure: Measure | None = None,
) -> dict[str, Any]:
    """Check one run against the paper's theorem for its method (see the module docstring).

    Parameters
    ----------
    record : RunRecord
        The run (:func:`clipscope.run.directory.load_run`); its ``config.toml``
        gives the method, η and α.
    fit : {"hull", "quantile"}
        The (L0, L1) fit of :func:`clipscope.math.smoothness.fit_l0_l1`.
    components : bool
        Also the per-component constants for a method other than IGC-clip.
    measure : callable, optional
        ``measure(components: bool) -> dict`` computing missing smoothness pairs
        now (Hessian-vector products); None never touches a model.

    Returns
    -------
    dict
        Keys include ``estimate``, ``estimate_note``, ``L0``, ``L1``, ``fit``,
        ``L0i``, ``L1i``, ``component_estimate``, ``c1``, ``c2``,
        ``f_star_lower_bound``, ``gap``, ``bound`` (both sides of (38)/(45)
        and the condition (37)/(44)), ``drift``, ``scope``, ``not_applicable``,
        ``notes`` (what the reader left out) and ``verdict``.

    Raises
    ------
    ValueError
        When the run has no rows with loss and grad_norm, or ``fit`` is unknown.
    """
    if fit not in FIT_METHODS:
        raise ValueError(f"fit must be one of {FIT_METHODS}, got {fit!r}")
    run_dir = record.path
    rows = record.rows
    if not rows or "grad_norm" not in rows or "loss" not in rows:
        raise ValueError(f"{run_dir / 'epochs.csv'} has no probe rows with loss and grad_norm")
    method, eta, alpha = record.method, record.eta, record.lr
    reason = run_scope(record)
    want_components = components or (method == "igc" and reason is None)
    grad = record.column("grad_norm")
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "method": method,
        "theorem": THEOREMS.get(method),
        "scope": THEOREM_SCOPE.get(method),
        "not_applicable": reason,
        "alpha": alpha,
        "eta": eta,
        "m": None,
        "rows": record.n_rows,
        "c1": _min(record.column("c1")),
        "c2": _min(record.column("c2")),
        "f_x0": float(rows["loss"][0]),
        "f_star_lower_bound": 0.0,
        "gap": float(rows["loss"][0]),
        "gap_note": GAP_NOTE,
        "estimate": None,
        "estimate_note": "no smoothness values recorded (train with smoothness_every > 0)",
        "L0": math.nan,
        "L1": math.nan,
        "fit": None,
        "trajectory_fit": None,
        "points": [],
        "skipped_checkpoints": [],
        "all_converged": True,
        "notes": list(record.notes),  # e.g. a half-written last row of epochs.csv left out
        "measured": measured_rho_p(record),
    }
    hess = record.column("hess_norm")
    traj = record.column("traj_smoothness")
    measured: dict[str, Any] | None = None
    if np.isfinite(hess).any():
        out["estimate"] = "recorded_hessian"
        keep = np.isfinite(hess)
        pairs = (grad[keep], hess[keep])
        conv = record.column("hess_converged")[keep]
        out["all_converged"] = bool(np.all(conv[np.isfinite(conv)] == 1))
        out["points"] = [
            {"epoch": e, "grad_norm": g, "hess_norm": h}
            for e, g, h in zip(
                record.column("epoch")[keep].tolist(), *map(list, pairs), strict=True
            )
        ]
    elif np.isfinite(traj).any():
        out["estimate"] = "recorded_trajectory"
        keep = np.isfinite(traj)
        pairs = (grad[keep], traj[keep])
    elif measure is not None:
        out["estimate"] = "measured_checkpoints"
        measured = measure(want_components)
        pts = measured["points"]
        pairs = ([p["grad_norm"] for p in pts], [p["hess_norm"] for p in pts])
        out["points"] = pts
        out["skipped_checkpoints"] = measured["skipped_checkpoints"]
        out["all_converged"] = all(p["converged"] for p in pts)
        out["m"] = measured["m"]
    if out["estimate"] is not None:
        smooth = fit_l0_l1(*pairs, fit)
        out |= {"L0": smooth.L0, "L1": smooth.L1, "fit": smooth.to_dict()}
        out["estimate_note"] = ESTIMATES[out["estimate"]]
    if out["estimate"] == "recorded_hessian" and np.isfinite(traj).any():
        keep = np.isfinite(traj)
        out["trajectory_fit"] = fit_l0_l1(grad[keep], traj[keep], fit).to_dict()
    if want_components:
        G, H, conv_i, m = _recorded_components(record)
        out["m"] = out["m"] or m
        out["component_estimate"] = None
        if H.size:
            out["component_estimate"] = "recorded_hessian"
            out["all_converged"] = out["all_converged"] and conv_i
        elif measure is not None:
            if measured is None or "component_hess_norms" not in measured["points"][0]:
                measured = measure(True)
            pts = measured["points"]
            G = np.array([p["component_grad_norms"] for p in pts])
            H = np.array([p["component_hess_norms"] for p in pts])
            out["component_estimate"] = "measured_checkpoints"
            out["m"] = measured["m"]
            out["all_converged"] = out["all_converged"] and all(
                p["component_converged"] for p in pts
            )
        out["L0i"] = out["L1i"] = math.nan
        if H.size:
            fits = fit_components(G, H, fit)
            if fits and all(f.ok for f in fits):  # max_i needs every component's constants
                out["L0i"] = max(f.L0 for f in fits)
                out["L1i"] = max(f.L1 for f in fits)
            out["component_fit_flags"] = sorted({flag for f in fits for flag in f.flags})
    if out["m"] is None:
        out["m"] = _recorded_components(record)[3]
    out["verdict"], out["bound"], out["drift"] = _verdict(out, record)
    return out


def _verdict(out: dict, record: RunRecord) -> tuple[str, dict | None, dict | None]:
    """Return the plain-words verdict, both sides of (38)/(45) with the condition, and the drift."""
    method, eta, c1, c2 = out["method"], out["eta"], out["c1"], out["c2"]
    if out["not_applicable"]:
        measured = out.get("measured")
        recorded = measured is not None and measured["value"] is not None
        tail = "; " + measured_text(measured) if recorded else ""
        return f"not applicable: {out['not_applicable']}{tail}", None, None
    if not (c1 > 0):
        return (
            f"(A3) fails: min over the run of c1 = {c1:.4g} ≤ 0, the theorem does not apply",
            (None),
            None,
        )
    if not (0 < c2 <= 1):
        return f"(A4) fails: c2 = {c2:.4g} (a zero component gradient)", None, None
    if out["estimate"] is None:
        how = (  # clipscope.fit(): the model is the caller's, the theory command cannot rebuild it
            "call fit with smoothness_every > 0"
            if record.setting("kind") == "fit"
            else "train with smoothness_every > 0, or run 'clipscope theory' to measure at the "
            "checkpoints"
        )
        return f"not checked: no smoothness values recorded in this run ({how})", None, None
    if method == "igc" and out.get("component_estimate") is None:
        return (
            "not checked: per-component constants L0i, L1i are missing (train with "
            "smoothness_components = true, or let 'clipscope theory' measure them)",
            None,
            None,
        )
    consts = [out["L0"], out["L1"]] + ([out["L0i"], out["L1i"]] if method == "igc" else [])
    if not all(math.isfinite(v) for v in consts):
        flags = (out["fit"] or {}).get("flags", []) + out.get("component_fit_flags", [])
        flags = ", ".join(sorted(set(flags))) or "no points"
        return f"L0/L1 could not be fitted ({flags}): more measured points are needed", None, None
    grad_all = record.column("grad_norm")
    grad_norms = grad_all[np.isfinite(grad_all)]
    if grad_norms.size == 0:
        return "not checked: no finite ‖∇f‖ in the rows", None, None
    common = {"L0": out["L0"], "L1": out["L1"], "c1": c1, "c2": c2, "eta": eta}
    common |= {"alpha": out["alpha"], "gap": max(out["gap"], 0.0)}
    drift = None
    try:
        if method == "sgd":
            bound = theory.sgd_bound(grad_norms, **common)
        else:
            L0i, L1i, m = out["L0i"], out["L1i"], out["m"]
            bound = theory.igc_bound(grad_norms, L0i=L0i, L1i=L1i, m=m, **common)
            signed = record.column("igc_drift")
            ok = np.isfinite(signed) & np.isfinite(grad_all)
            measured = np.abs(signed[ok])  # (39) is an absolute value
            limit = np.full(0, math.nan)
            if ok.any():
                limit = theory.drift_bound(
                    grad_all[ok], alpha=out["alpha"], eta=eta, m=m, L0i=L0i, L1i=L1i
                )
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = measured / limit
            drift = {
                "epochs": int(ok.sum()),
                "max_drift": float(measured.max()) if ok.any() else math.nan,
                "min_signed": float(signed[ok].min()) if ok.any() else math.nan,
                "max_signed": float(signed[ok].max()) if ok.any() else math.nan,
                "max_ratio": float(np.max(ratio)) if ok.any() else math.nan,
                "violations": int(np.sum(measured > limit)),
                "note": DRIFT_NOTE,
            }
    except ValueError as exc:  # a recorded value outside what the theorem accepts
        return f"not checked: {exc}", None, None
    cond = bound.condition
    words = [
        f"α = {cond.alpha:.4g} {'satisfies' if cond.holds else 'violates'} {cond.equation} "
        f"(α_max = {cond.alpha_max:.4g})",
        f"{bound.equation}: {bound.lhs:.4g} ≤ {bound.rhs:.4g} "
        + ("holds" if bound.holds else "does NOT hold"),
    ]
    if not cond.holds:
        words.append("the theorem's hypothesis on α fails, so its bound is not promised")
    if drift is not None and drift["epochs"]:
        words.append(
            f"drift |(39)| within (42) in {drift['epochs'] - drift['violations']}/"
            f"{drift['epochs']} epochs (max |drift|/bound = {drift['max_ratio']:.3g})"
        )
    if out["estimate"] == "recorded_trajectory":
        words.append("L0/L1 come from the trajectory secants, which can underestimate ‖∇²f‖")
    return "; ".join(words), bound.to_dict(), drift
