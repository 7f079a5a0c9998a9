"""Compare two studies of ``clipscope reproduce``: which numbers differ, and by how much.

Reads both studies' ``findings.json`` (written by ``clipscope report``) and every
run's ``epochs.csv``, and prints, side by side, Figure 1's run averages, their
Spearman ρ_s and label, the batch-size-1 share, the smallest ρ(η), the η advice
and the theorem verdicts, then per run the largest relative difference over
``loss, grad_norm, c1, c2, rho`` at each epoch. Relative differences are
``|a − b| / max(|a|, |b|)``. Used for ``docs/results.md`` ("Numbers that change
with the torch thread count")::

    python bench/compare_studies.py STUDY_A STUDY_B

Never a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

COLUMNS = ("loss", "grad_norm", "c1", "c2", "rho")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def show(name: str, a, b) -> None:
    """Print one number (or value) of both studies and their relative difference."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        print(f"{name:64s} {a!r:>22} {b!r:>22}  rel {_rel(a, b):.1e}")
    else:
        print(f"{name:64s} {a!r} | {b!r}")


def findings(a: dict, b: dict) -> None:
    """Print the findings of every task of both studies side by side."""
    for task, fa in a["tasks"].items():
        fb = b["tasks"][task]
        for method, ta in fa["fig1_trend"]["by_method"].items():
            tb = fb["fig1_trend"]["by_method"][method]
            for key in ("mean_cos_vs_batch_size", "c2_vs_batch_size"):
                for i, size in enumerate(ta[key]["batch_sizes"]):
                    show(
                        f"{task} {method} {key} B={size}",
                        ta[key]["values"][i],
                        tb[key]["values"][i],
                    )
                show(f"{task} {method} {key} spearman", ta[key]["spearman"], tb[key]["spearman"])
                label_a, label_b = ta[key].get("label") or {}, tb[key].get("label") or {}
                show(f"{task} {method} {key} label", label_a.get("label"), label_b.get("label"))
        share_a, share_b = fa["positive_cos_share_b1"], fb["positive_cos_share_b1"]
        for key in ("share", "n", "mean_cos"):
            show(f"{task} cos > 0 at B = 1: {key}", share_a.get(key), share_b.get(key))
        show(f"{task} smallest rho", fa["min_rho"]["value"], fb["min_rho"]["value"])
        show(f"{task} eta_max", fa["eta_advice"]["eta_max"], fb["eta_advice"]["eta_max"])
        show(
            f"{task} eta_max set by", fa["eta_advice"]["decided_by"], fb["eta_advice"]["decided_by"]
        )
        for ta, tb in zip(fa["theorems"], fb["theorems"], strict=True):
            if ta["verdict"] == tb["verdict"] == "not checked":
                continue
            show(f"{task} theorem {ta['run']}", ta["verdict"], tb["verdict"])
            value_a, value_b = (
                (ta.get("deciding") or {}).get("value"),
                (tb.get("deciding") or {}).get("value"),
            )
            if isinstance(value_a, float) and isinstance(value_b, float):
                show(f"{task} theorem {ta['run']} deciding value", value_a, value_b)


def rows(a: Path, b: Path) -> None:
    """Print, per run, the largest relative difference of the standard columns at each epoch."""
    for run in sorted(a.glob("runs/*/*")):
        rel = run.relative_to(a)
        with open(run / "epochs.csv", newline="") as handle:
            rows_a = list(csv.DictReader(handle))
        with open(b / rel / "epochs.csv", newline="") as handle:
            rows_b = list(csv.DictReader(handle))
        worst = []
        for row_a, row_b in zip(rows_a, rows_b, strict=False):
            pairs = [(float(row_a[c]), float(row_b[c])) for c in COLUMNS]
            finite = [_rel(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
            worst.append(f"{max(finite, default=0.0):.0e}")
        print(f"{rel.as_posix():30s} largest rel. difference per epoch: {' '.join(worst)}")


def main() -> None:
    """Compare the two studies named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_a", type=Path)
    parser.add_argument("study_b", type=Path)
    args = parser.parse_args()
    load = lambda p: json.loads((p / "findings.json").read_text())  # noqa: E731
    findings(load(args.study_a), load(args.study_b))
    print()
    rows(args.study_a, args.study_b)


if __name__ == "__main__":
    main()
