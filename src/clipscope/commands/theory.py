"""``clipscope theory RUN_DIR [--json]``: check a run against Theorem 3.1 / 3.2.

The core is :func:`clipscope.theory_check.theory_check` (the quantities are
listed in :mod:`clipscope.report.theorem`). In short, from a run directory
written by ``clipscope train``:
c1, c2 (minimum over the probe rows); L0, L1 (A2) fitted to the run's recorded
``hess_norm`` column when present (``smoothness_every > 0``), else to its
recorded ``traj_smoothness`` secants, else to Lanczos Hessian norms measured now
at ``x_0`` and the stored checkpoints (not with ``--recorded-only``); L0i, L1i
(A5) likewise from the recorded ``hess_norms`` component arrays or measured;
``f(x_0) − f*`` with the lower bound ``f* ≥ 0`` (nonnegative losses); the
step-size condition (37)/(44), both sides of (38)/(45), the IGC drift |(39)|
against (42), and a verdict in plain words. The output names the estimate used.
The command reads the run and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from clipscope.math.smoothness import FIT_METHODS
from clipscope.math.theory import THEOREMS

__all__ = ["THEOREMS", "add_parser", "check_run", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``theory``."""
    parser = subparsers.add_parser(
        "theory",
        help="check a run's step size and bound against the paper's theorems",
        description=(
            "Take c1, c2 from the run's rows and L0, L1, L0i, L1i from its recorded Hessian "
            "norms (or trajectory secants; or, if none, Hessian norms measured now at x_0 and "
            "the stored checkpoints), fitted as an envelope; then check the step-size "
            "condition (37)/(44), both sides of (38)/(45) and the IGC drift bound (42)."
        ),
    )
    parser.add_argument("run_dir", help="a run directory (clipscope train, or a Monitor's)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument(
        "--fit",
        choices=FIT_METHODS,
        default="hull",
        help="the (L0, L1) fit of the (‖∇f‖, ‖∇²f‖) pairs (default: %(default)s: upper envelope)",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="relative tolerance of the Lanczos solves run now (default: %(default)s)",
    )
    parser.add_argument(
        "--components",
        action="store_true",
        help="also measure the per-component constants for SGD-clip (always done for IGC)",
    )
    parser.add_argument(
        "--recorded-only",
        action="store_true",
        help="never compute Hessian norms now; use only the values the run recorded",
    )
    parser.set_defaults(func=run)


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def check_run(
    run_dir: str | Path,
    *,
    fit: str = "hull",
    tol: float = 1e-6,
    components: bool = False,
    measure: bool = True,
) -> dict[str, Any]:
    """Everything ``clipscope theory`` prints (:func:`clipscope.theory_check.theory_check`)."""
    from clipscope.theory_check import theory_check

    return theory_check(run_dir, fit=fit, tol=tol, components=components, measure=measure)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def run(args: argparse.Namespace) -> int:
    """Print the theorem check of one run."""
    if not (isinstance(args.tol, float) and 0 < args.tol < 1):
        raise ValueError(f"--tol must be in (0, 1), got {args.tol!r}")
    out = check_run(
        args.run_dir,
        fit=args.fit,
        tol=args.tol,
        components=args.components,
        measure=not args.recorded_only,
    )
    if args.json:
        print(json.dumps(_json(out), indent=2, allow_nan=False))
        return 0
    lines = [f"note: {note}" for note in out.get("notes", [])]
    lines += [
        f"run: {out['run_dir']}  method={out['method']}  α={out['alpha']:.4g}  η={out['eta']:.4g}"
        f"  m={out['m']}  rows={out['rows']}",
        f"c1 = {out['c1']:.4g}, c2 = {out['c2']:.4g} (minimum over the probe rows)",
        f"estimate used: {out['estimate'] or 'none'} ({out['estimate_note']})",
    ]
    if out["fit"] is not None:
        lines.append(
            f"L0 = {out['L0']:.4g}, L1 = {out['L1']:.4g} ({out['fit']['method']} fit over "
            f"{out['fit']['n_points']} points, {out['fit']['n_above']} above the line; flags: "
            f"{', '.join(out['fit']['flags']) or 'none'})"
        )
    if out.get("trajectory_fit"):
        tf = out["trajectory_fit"]
        lines.append(
            f"trajectory estimate (Zhang et al.), for comparison: L0 = {_fmt(tf['L0'])}, "
            f"L1 = {_fmt(tf['L1'])} over {tf['n_points']} secants"
        )
    if "L0i" in out:
        lines.append(
            f"max_i L0i = {out['L0i']:.4g}, max_i L1i = {out['L1i']:.4g} "
            f"(per-component estimate: {out.get('component_estimate') or 'none'})"
        )
    bound = out.get("bound")
    if bound is not None:
        cond = bound["condition"]
        lines.append(
            f"condition {cond['equation']}: α = {out['alpha']:.4g} vs α_max = "
            f"{_fmt(cond['alpha_max'])}: {'holds' if cond['holds'] else 'fails'}"
        )
        lines.append(
            f"bound {bound['equation']}: left {bound['lhs']:.4g}, right {_fmt(bound['rhs'])}"
        )
    if out.get("drift"):
        d = out["drift"]
        lines.append(
            f"drift (39): max |igc_drift| = {_fmt(d['max_drift'])} over {d['epochs']} epochs, "
            f"{d['violations']} above (42); max ratio {_fmt(d['max_ratio'])} ({d['note']})"
        )
    lines.append(f"f(x0) − f* ≤ {out['gap']:.4g} ({out['gap_note']})")
    if out["skipped_checkpoints"]:
        lines.append("skipped checkpoints: " + "; ".join(out["skipped_checkpoints"]))
    if not out["all_converged"]:
        lines.append("warning: a Lanczos solve did not reach its tolerance")
    lines.append(f"verdict ({out['theorem'] or 'no theorem'}): {out['verdict']}")
    print("\n".join(lines))
    return 0
