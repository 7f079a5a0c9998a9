"""``clipscope theory RUN_DIR [--json]``: check a run against Theorem 3.1 / 3.2.

From a run directory written by ``clipscope train`` (:mod:`clipscope.runner`):

* ``c1``, ``c2``: the minimum over the probe rows of ``epochs.csv`` (A3, A4);
* ``L0, L1`` (A2) and ``L0i, L1i`` (A5): ``(‖∇f‖, ‖∇²f‖)`` pairs measured now
  at the initial point ``x_0`` (rebuilt from the config: the task is seeded)
  and at every stored checkpoint (:mod:`clipscope.smoothness`, Lanczos),
  then fitted (:func:`clipscope.smoothness.fit_l0_l1`); per-component pairs
  for IGC-clip (or with ``--components``);
* ``f(x_0) − f*`` bounded by ``f(x_0)``, using ``f* ≥ 0`` (the built-in losses,
  squared error and cross-entropy, are nonnegative);
* the step-size condition (37) (SGD-clip) or (44) (IGC-clip), both sides of
  (38) or (45) over the probe rows, and for IGC the measured drift (39)
  against its bound (42), with a verdict in plain words.

Only the newest ``keep_checkpoints`` checkpoints exist, so the fit uses few
points; the L0/L1 it reports are an envelope of what was measured, not a
global constant. The command reads the run and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

THEOREMS = {"sgd": "Theorem 3.1 (SGD-clip)", "igc": "Theorem 3.2 (IGC-clip)"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``theory``."""
    parser = subparsers.add_parser(
        "theory",
        help="check a run's step size and bound against the paper's theorems",
        description=(
            "Measure c1, c2 (from the run's rows), L0, L1 and L0i, L1i (Hessian norms at x_0 and "
            "at the stored checkpoints, fitted as an envelope), then check the step-size "
            "condition (37)/(44), both sides of (38)/(45) and the IGC drift bound (42)."
        ),
    )
    parser.add_argument("run_dir", help="a run directory written by 'clipscope train'")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument(
        "--fit", choices=("hull", "quantile"), default="hull", help="the (L0, L1) fit"
    )
    parser.add_argument(
        "--tol", type=float, default=1e-6, help="relative tolerance of the Lanczos solves"
    )
    parser.add_argument(
        "--components",
        action="store_true",
        help="also measure the per-component constants for SGD-clip (always done for IGC)",
    )
    parser.set_defaults(func=run)


def _min(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.min()) if values.size else math.nan


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def measure_points(run_dir: Path, cfg: Any, components: bool, tol: float) -> dict[str, Any]:
    """``(‖∇f‖, ‖∇²f‖)`` (and per component) at x_0 and at every valid stored checkpoint."""
    from clipscope.atomic import CorruptCheckpointError, list_checkpoints, load_checkpoint
    from clipscope.runner import build_task
    from clipscope.smoothness import component_hessian_norms, hessian_norm

    model, loss_fn, comps, _ = build_task(cfg)
    states: list[tuple[str, Any]] = [("x0", None)]
    skipped = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        try:
            states.append((path.name, load_checkpoint(path)))
        except (CorruptCheckpointError, OSError) as exc:
            skipped.append(f"{path.name}: {exc}")
    points = []
    kw = {"tol": tol, "dropout": cfg.dropout, "seed": cfg.seed}
    for name, state in states:
        if state is not None:
            model.load_state_dict(state["model"])
        full = hessian_norm(model, loss_fn, comps, max_iter=100, **kw)
        loop = state.get("loop", {}) if state else {"epoch": 0, "step": 0}
        point = {"point": name, "epoch": loop.get("epoch"), "step": loop.get("step")}
        point |= full.to_dict()
        if components:
            per = component_hessian_norms(model, loss_fn, comps, max_iter=100, **kw)
            point["component_grad_norms"] = [r.grad_norm for r in per]
            point["component_hess_norms"] = [r.hess_norm for r in per]
            point["component_converged"] = all(r.converged for r in per)
        points.append(point)
    return {"points": points, "skipped_checkpoints": skipped, "m": len(comps)}


def check_run(
    run_dir: str | Path, *, fit: str = "hull", tol: float = 1e-6, components: bool = False
) -> dict[str, Any]:
    """Everything ``clipscope theory`` prints, as a dict (see the module docstring)."""
    from clipscope import theory
    from clipscope.config import load_config
    from clipscope.report.records import read_rows
    from clipscope.smoothness import fit_components, fit_l0_l1

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "epochs.csv").is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a clipscope run directory (needs config.toml and epochs.csv)"
        )
    cfg = load_config(run_dir / "config.toml")
    rows = read_rows(run_dir / "epochs.csv")
    if not rows:
        raise ValueError(f"{run_dir / 'epochs.csv'} has no probe rows")
    method, eta, alpha = cfg.method, float(cfg.eta), float(cfg.lr)
    want_components = components or method == "igc"
    measured = measure_points(run_dir, cfg, want_components, tol)
    pts = measured["points"]
    m = measured["m"]
    smooth = fit_l0_l1([p["grad_norm"] for p in pts], [p["hess_norm"] for p in pts], fit)
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "method": method,
        "theorem": THEOREMS.get(method),
        "alpha": alpha,
        "eta": eta,
        "m": m,
        "rows": len(rows["grad_norm"]),
        "c1": _min(rows.get("c1", np.array([math.nan]))),
        "c2": _min(rows.get("c2", np.array([math.nan]))),
        "f_x0": float(rows["loss"][0]),
        "f_star_lower_bound": 0.0,
        "gap": float(rows["loss"][0]),
        "gap_note": "f(x0) − f* ≤ f(x0) − 0: the losses are nonnegative, so f* ≥ 0 is used",
        "L0": smooth.L0,
        "L1": smooth.L1,
        "fit": smooth.to_dict(),
        "points": pts,
        "skipped_checkpoints": measured["skipped_checkpoints"],
        "all_converged": all(p["converged"] for p in pts),
    }
    if want_components:
        G = np.array([p["component_grad_norms"] for p in pts])
        H = np.array([p["component_hess_norms"] for p in pts])
        fits = fit_components(G, H, fit)
        out["L0i"] = max((f.L0 for f in fits), default=math.nan)
        out["L1i"] = max((f.L1 for f in fits), default=math.nan)
        out["component_fit_flags"] = sorted({flag for f in fits for flag in f.flags})
    out["verdict"], out["bound"], out["drift"] = _verdict(out, rows, theory)
    return out


def _verdict(out: dict, rows: dict, theory: Any) -> tuple[str, dict | None, dict | None]:
    method, eta, c1, c2 = out["method"], out["eta"], out["c1"], out["c2"]
    if method not in THEOREMS:
        return f"no theorem of the paper covers method {method!r}", None, None
    if not math.isfinite(eta):
        return "no clipping (η = ∞): the theorems are stated for a finite η", None, None
    if not (c1 > 0):
        return (
            f"(A3) fails: min over the run of c1 = {c1:.4g} ≤ 0, the theorem does not apply",
            (None),
            None,
        )
    if not (0 < c2 <= 1):
        return f"(A4) fails: c2 = {c2:.4g} (a zero component gradient)", None, None
    consts = [out["L0"], out["L1"]] + ([out["L0i"], out["L1i"]] if method == "igc" else [])
    if not all(math.isfinite(v) for v in consts):
        return (
            f"L0/L1 could not be fitted ({', '.join(out['fit']['flags'])}): more checkpoints "
            "(keep_checkpoints) are needed",
            None,
            None,
        )
    grad_norms = rows["grad_norm"][np.isfinite(rows["grad_norm"])]
    common = {"L0": out["L0"], "L1": out["L1"], "c1": c1, "c2": c2, "eta": eta}
    common |= {"alpha": out["alpha"], "gap": out["gap"]}
    drift = None
    if method == "sgd":
        bound = theory.sgd_bound(grad_norms, **common)
    else:
        L0i, L1i, m = out["L0i"], out["L1i"], out["m"]
        bound = theory.igc_bound(grad_norms, L0i=L0i, L1i=L1i, m=m, **common)
        measured = np.abs(rows.get("igc_drift", np.array([])))  # (39) is an absolute value
        ok = np.isfinite(measured) & np.isfinite(rows["grad_norm"])
        limit = theory.drift_bound(
            rows["grad_norm"][ok], alpha=out["alpha"], eta=eta, m=m, L0i=L0i, L1i=L1i
        )
        drift = {
            "epochs": int(ok.sum()),
            "max_drift": float(measured[ok].max()) if ok.any() else math.nan,
            "max_ratio": float(np.max(measured[ok] / limit)) if ok.any() else math.nan,
            "violations": int(np.sum(measured[ok] > limit)),
        }
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
            f"drift (39) within (42) in {drift['epochs'] - drift['violations']}/{drift['epochs']}"
            f" epochs (max drift/bound = {drift['max_ratio']:.3g})"
        )
    return "; ".join(words), bound.to_dict(), drift


def run(args: argparse.Namespace) -> int:
    """Print the theorem check of one run."""
    if not (isinstance(args.tol, float) and 0 < args.tol < 1):
        raise ValueError(f"--tol must be in (0, 1), got {args.tol!r}")
    out = check_run(args.run_dir, fit=args.fit, tol=args.tol, components=args.components)
    if args.json:
        print(json.dumps(_json(out), indent=2, allow_nan=False))
        return 0
    lines = [
        f"run: {out['run_dir']}  method={out['method']}  α={out['alpha']:.4g}  η={out['eta']:.4g}"
        f"  m={out['m']}  rows={out['rows']}",
        f"c1 = {out['c1']:.4g}, c2 = {out['c2']:.4g} (minimum over the probe rows)",
        f"L0 = {out['L0']:.4g}, L1 = {out['L1']:.4g} ({out['fit']['method']} fit over "
        f"{out['fit']['n_points']} points: x0 and the stored checkpoints; flags: "
        f"{', '.join(out['fit']['flags']) or 'none'})",
    ]
    if "L0i" in out:
        lines.append(f"max_i L0i = {out['L0i']:.4g}, max_i L1i = {out['L1i']:.4g}")
    lines.append(f"f(x0) − f* ≤ {out['gap']:.4g} ({out['gap_note']})")
    if not out["all_converged"]:
        lines.append("warning: a Lanczos solve did not reach its tolerance")
    lines.append(f"verdict ({out['theorem'] or 'no theorem'}): {out['verdict']}")
    print("\n".join(lines))
    return 0
