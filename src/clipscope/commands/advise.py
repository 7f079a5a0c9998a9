"""``clipscope advise DIR``: which clipping thresholds keep descent, from a run's stored η-profiles.

For every probe of a run (or of every run of a study) the stored ``n_i``,
``d_i`` and ``‖∇f_k‖`` give the exact η-profile ``D_k(η)``; from them
(:mod:`clipscope.math.advice`, no gradient is recomputed):

* ``eta_max``: every ``η ≥ eta_max`` keeps ``ρ_k(η) = D_k(η)/D_k(∞) ≥ target``
  at every probe;
* ``eta_reversal``: every ``η > eta_reversal`` keeps ``D_k(η) ≥ 0`` at every
  probe (0: clipping reverses descent at no η).

For a run with an Adam or AdamW optimizer (its component files hold the
preconditioned dots ``dots_p = ⟨g_i, u⟩``, ``u = P⁻¹∇f``) the same two
thresholds for the preconditioned descent ratio ρ_P (``preconditioned``),
beside the ρ ones (the descent of plain SGD steps at the same points).

Writes one figure per run (``ρ_k(η)`` of every probe, their minimum, the
advice marked; and one of ρ_P per such run) into ``--out`` (default
``DIR/advice``) and prints the advice.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from clipscope.math.advice import DEFAULT_TARGET, advise, check_target

__all__ = ["add_parser", "advice_of", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``advise``."""
    parser = subparsers.add_parser(
        "advise",
        help="the clipping thresholds that keep a target share of descent at every probe",
        description=(
            "From the stored per-component norms and dots of a run (or of every run of a "
            "study), the exact η-profile at every probe gives: eta_max, the threshold from "
            "which on every larger η keeps rho(η) = D(η)/D(∞) >= target at every probe, and "
            "eta_reversal, below which clipping reverses descent (D < 0) at some probe. "
            "For a run with an Adam or AdamW optimizer (component files with dots_p) the "
            "same two thresholds for the preconditioned descent ratio rho_P(η) = "
            "Σ_i min(1, η/n_i)<g_i, u> / Σ_i <g_i, u>, u = P^-1 ∇f with the optimizer's "
            "preconditioner P frozen at the probe: 'preconditioned' in --json (eta_max, "
            "eta_reversal, reversed: whether some η > 0 reverses the preconditioned descent at "
            "some probe, min_rho_p: the smallest rho_P at the run's η, p_unset_max: the largest "
            "share of coordinates without optimizer state (P = 1 there), p_unset: the probes "
            "where some coordinates had none, in words (all of them: rho_P = rho there; also "
            "printed under the rho_P line)), beside the rho "
            "answers. Nothing is recomputed. Writes a figure of rho(η) per run, and of "
            "rho_P(η) per such run (NAME-rho_p.png)."
        ),
    )
    parser.add_argument("directory", help="a run directory (clipscope train) or a study directory")
    parser.add_argument(
        "--target",
        type=float,
        default=DEFAULT_TARGET,
        help=f"share of the unclipped descent to keep, in (0, 1] (default {DEFAULT_TARGET})",
    )
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")
    parser.add_argument("--out", default=None, help="figure folder (default: DIRECTORY/advice)")
    parser.set_defaults(func=run)


def advice_of(directory: str | Path, target: float = DEFAULT_TARGET) -> dict[str, Any]:
    """Return the advice of every run and task of ``directory`` and the records for the figures.

    Returns ``{"target", "tasks": {task: {"eta_advice": {...}, "runs": {label: {...}}}},
    "_figures": [(name, title, points, EtaAdvice, η)]}``. A task with a run that
    recorded the preconditioned dots adds ``"preconditioned_advice"`` (over those
    runs) and each such run ``"preconditioned"`` (:func:`_preconditioned`).

    Raises
    ------
    ValueError
        A target outside (0, 1]; a study without runs; a run without η-profiles
        (no component files with ``norms`` and ``dots``).
    FileNotFoundError
        ``directory`` is neither a run nor a study directory.
    """
    from clipscope.report.findings import (
        PER_SAMPLE_NOTE,
        eta_advice,
        is_per_sample_run,
        preconditioned,
        run_label,
        run_points,
        run_points_p,
    )
    from clipscope.run.study import load_study

    target = check_target(target)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is a file, not a run directory (epochs.csv, from 'clipscope train') "
            "or a study directory (study.json, from 'clipscope reproduce'): give the directory "
            "that holds it"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    if not (directory / "study.json").is_file() and not (directory / "epochs.csv").is_file():
        raise FileNotFoundError(
            f"{directory} holds no runs: neither a run directory (epochs.csv, from "
            "'clipscope train') nor a study directory (study.json, from 'clipscope reproduce')"
        )
    tasks = load_study(directory)
    if not any(task.runs for task in tasks):
        raise ValueError(f"{directory}: the study names no runs")
    out: dict[str, Any] = {"target": target, "tasks": {}, "_figures": []}
    missing = [str(run.path) for task in tasks for _, run in task.runs if not run_points(run)]
    if missing:
        raise ValueError(
            "no η-profiles (components/epoch_XXXX.npz with norms and dots, at a probe with "
            f"finite ‖∇f‖) in: {', '.join(missing)}; train with probe_every > 0"
        )
    single = not (directory / "study.json").is_file()
    for task in tasks:
        overall, _, _ = eta_advice(task, target)
        runs = {}
        for entry, run in task.runs:
            label = run_label(entry, run)
            points = run_points(run)
            names = [f"{label} {run.point_name(epoch)}" for epoch, _ in points]
            result = advise([s for _, s in points], target, names)
            runs[label] = result.to_dict(points=True) | {"eta": _finite(run.eta)}
            if is_per_sample_run(run):  # per-sample clipping: not the loop's threshold
                runs[label]["per_sample_components"] = PER_SAMPLE_NOTE
            name = label if single else f"{task.name}-{label}"
            title = f"{name}: ρ(η) at {len(points)} probes, target {target:g}"
            named = [(run.point_name(epoch), stats) for epoch, stats in points]
            out["_figures"].append((name, title, named, result, run.eta))
            points_p = run_points_p(run)
            if points_p:
                names = [f"{label} {run.point_name(epoch)}" for epoch, _ in points_p]
                result_p = advise([s for _, s in points_p], target, names)
                named_p = [(run.point_name(epoch), stats) for epoch, stats in points_p]
                runs[label]["preconditioned"] = _preconditioned(result_p, points_p, run)
                title = f"{name}: ρ_P(η) (u = P⁻¹∇f) at {len(points_p)} probes, target {target:g}"
                out["_figures"].append((f"{name}-rho_p", title, named_p, result_p, run.eta))
        overall.pop("per_run", None)
        out["tasks"][task.name] = {"eta_advice": overall, "runs": runs}
        under_p = preconditioned(task, target)
        if under_p is not None:
            out["tasks"][task.name]["preconditioned_advice"] = under_p["eta_advice"]
    return out


def _preconditioned(advice, points: list, run) -> dict[str, Any]:
    """Return the ρ_P advice of one run with ``reversed``, ``min_rho_p``, ``p_unset_max``.

    ``points``: ``(epoch, DirectionStats)`` of its probes (:func:`run_points_p`).
    ``p_unset``: the report's words for the probes where some coordinates had no
    optimizer state (:func:`~clipscope.report.labels.unset_label`), else None.
    """
    import numpy as np

    from clipscope.report.findings import unset_shares
    from clipscope.report.labels import unset_label

    out = advice.to_dict(points=True)
    rev = advice.eta_reversal
    out["reversed"] = None if math.isnan(rev) else bool(rev > 0)
    values = [run.ratio_at(e, s) for e, s in points]  # at the η in force at each probe
    values = [v for v in values if math.isfinite(v)]
    out["min_rho_p"] = min(values) if values else None
    shares = run.column("p_unset_share")
    shares = shares[np.isfinite(shares)]
    out["p_unset_max"] = float(shares.max()) if shares.size else None
    # the probes where some coordinates had no optimizer state (P = 1 there; all of them:
    # ρ_P = ρ), said in the text as the report says it
    label = unset_label(unset_shares(run, [e for e, _ in points]))
    out["p_unset"] = label["text"] if label["label"] == "unset" else None
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _line(label: str, advice: dict, p: bool = False) -> str:
    rev = advice["eta_reversal"]
    descent = "the preconditioned descent" if p else "descent"
    eta_max = "–" if advice["eta_max"] is None else f"{advice['eta_max']:.4g}"
    if rev is None:
        reversal = "ρ undefined (‖∇f‖ = 0 at every probe)"
    elif rev == 0:
        reversal = f"no η reverses {descent}"
    else:
        reversal = f"reverses {descent} below {rev:.4g} ({advice['reversal_at']})"
    return (
        f"  {label:24s} eta_max = {eta_max:>10s} (set by {advice['decided_by']}); {reversal}; "
        f"{advice['n_points']} probes"
    )


def run(args: argparse.Namespace) -> int:
    """Compute the advice, write the figures, print the advice."""
    from clipscope.atomic import atomic_write_bytes
    from clipscope.commands._out import check_output_dir
    from clipscope.report import plots

    result = advice_of(args.directory, args.target)
    folder = Path(args.out) if args.out else Path(args.directory) / "advice"
    check_output_dir(folder, "a folder for the figures")  # exit 2, nothing written
    written = []
    for name, title, points, advice, eta in result.pop("_figures"):
        path = folder / f"{name}.png"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, plots.figure_png(plots.eta_advice_run(title, points, advice, eta)))
        written.append(str(path))
    result["figures"] = written
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
        return 0
    target = result["target"]
    print(
        f"η advice: eta_max keeps ρ(η) = D(η)/D(∞) ≥ {target:g} for every η ≥ it at every "
        "probe; below eta_reversal clipping reverses descent (D < 0) at some probe"
        + (
            "; 'ρ_P' lines: the same for the preconditioned descent ratio of an Adam/AdamW run"
            if any("preconditioned_advice" in t for t in result["tasks"].values())
            else ""
        )
    )
    for name, task in result["tasks"].items():
        print(_line(f"{name} (all runs)", task["eta_advice"]))
        for label, advice in task["runs"].items():
            print(_line(label, advice))
            if "preconditioned" in advice:
                print(_line(f"{label} ρ_P", advice["preconditioned"], p=True))
                if advice["preconditioned"].get("p_unset"):
                    print(f"    ({label} ρ_P: {advice['preconditioned']['p_unset']})")
            if "per_sample_components" in advice:
                print(f"    ({label}: {advice['per_sample_components']})")
    print(f"figures: {folder}")
    return 0
