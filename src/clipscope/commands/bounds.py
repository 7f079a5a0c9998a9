"""``clipscope bounds``: the step-size conditions and bounds of Theorems 3.1 and 3.2."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from clipscope.math import theory

_TERM_LABELS = {
    "sgd": {
        "gap_term": "2(f(x0)-f*)/((T+1)α)",
        "l0_term": "5αη²L0",
        "l1_term": "αη³L1·c1/c2   (as printed in (38); the sentence after it drops /c2)",
    },
    "igc": {
        "gap_term": "2(f(x0)-f*)/((T+1)αm)",
        "l0_term": "5αmη²L0",
        "l1_term": "αmη²c1(2ηL1+G)/(2c2)",
    },
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bounds``."""
    parser = subparsers.add_parser(
        "bounds",
        help="evaluate the step-size conditions and convergence bounds (38)/(45)",
        description=(
            "Evaluate Theorem 3.1 (SGD-clip: condition (37), bound (38)) or Theorem 3.2 "
            "(IGC-clip: G (43), condition (44), bound (45), drift bound (42)) from numbers "
            "given on the command line. Both sides of the bound are printed; the theorem "
            "promises the inequality only when the step-size condition holds."
        ),
    )
    parser.add_argument(
        "--method",
        choices=tuple(theory.THEOREMS),
        required=True,
        help="sgd: Theorem 3.1 (SGD-clip, (37)/(38)); igc: Theorem 3.2 (IGC-clip, (43)-(45), "
        "needs --L0i, --L1i, --m)",
    )
    parser.add_argument("--L0", type=float, required=True, help="L0 of f (A2)")
    parser.add_argument("--L1", type=float, required=True, help="L1 of f (A2)")
    parser.add_argument(
        "--L0i", default=None, help="igc: max_i L0i, or one value per component (comma-separated)"
    )
    parser.add_argument(
        "--L1i", default=None, help="igc: max_i L1i, or one value per component (comma-separated)"
    )
    parser.add_argument("--c1", type=float, required=True, help="c1 in (0, 1] (A3)")
    parser.add_argument("--c2", type=float, required=True, help="c2 in (0, 1] (A4)")
    parser.add_argument("--eta", type=float, required=True, help="finite clipping threshold η")
    parser.add_argument("--alpha", type=float, required=True, help="step size α")
    parser.add_argument("--m", type=int, default=None, help="igc: number of components")
    parser.add_argument("--T", type=int, default=None, help="last index (default: from the norms)")
    parser.add_argument(
        "--gap",
        type=float,
        required=True,
        metavar="F0_MINUS_FSTAR",
        help="f(x_0) − f* >= 0 (an upper bound will do: with a nonnegative loss, f(x_0))",
    )
    norms = parser.add_mutually_exclusive_group(required=True)
    norms.add_argument("--grad-norms", default=None, help="‖∇f(x_k)‖ for k = 0..T: v0,v1,...")
    norms.add_argument(
        "--grad-norms-file",
        default=None,
        help="UTF-8 text file of ‖∇f(x_k)‖ for k = 0..T, in order: plain decimal numbers "
        "separated by commas, spaces or newlines (no header, no comments)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _floats(text: str, name: str) -> list[float]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise ValueError(f"{name} is empty")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas or spaces") from None


def _per_component(text: str | None, name: str) -> float | list[float]:
    if text is None:
        raise ValueError(f"--method igc needs {name}")
    values = _floats(text, name)
    return values[0] if len(values) == 1 else values


def run(args: argparse.Namespace) -> int:
    """Evaluate the chosen theorem and print it."""
    if args.grad_norms_file is not None:
        path = Path(args.grad_norms_file)
        if not path.is_file():
            raise FileNotFoundError(f"--grad-norms-file {path} does not exist")
        grad_norms = _floats(path.read_text(), f"--grad-norms-file {path}")
    else:
        grad_norms = _floats(args.grad_norms, "--grad-norms")
    common = {
        "L0": args.L0,
        "L1": args.L1,
        "c1": args.c1,
        "c2": args.c2,
        "eta": args.eta,
        "alpha": args.alpha,
        "gap": args.gap,
        "T": args.T,
    }
    extra: dict = {}
    if args.method == "sgd":
        for flag, value in (("--L0i", args.L0i), ("--L1i", args.L1i), ("--m", args.m)):
            if value is not None:
                raise ValueError(f"{flag} belongs to --method igc (Theorem 3.1 does not use it)")
        bound = theory.sgd_bound(grad_norms, **common)
    else:
        if args.m is None:
            raise ValueError("--method igc needs --m (the number of components)")
        L0i, L1i = _per_component(args.L0i, "--L0i"), _per_component(args.L1i, "--L1i")
        bound = theory.igc_bound(grad_norms, L0i=L0i, L1i=L1i, m=args.m, **common)
        drift = theory.drift_bound(
            grad_norms, alpha=args.alpha, eta=args.eta, m=args.m, L0i=L0i, L1i=L1i
        )
        extra = {
            "G": theory.igc_G(L0i=L0i, L1i=L1i, eta=args.eta),
            "drift_bound": [float(v) for v in drift],
        }

    if args.json:
        print(json.dumps({**bound.to_dict(), **extra}, allow_nan=False))
        return 0

    cond = bound.condition
    name = theory.THEOREMS[args.method]
    print(f"{name}: T = {bound.T} ({bound.T + 1} points)")
    if "G" in extra:
        print(f"  G (43) = 5 max L0i + 16 η max L1i = {extra['G']:.6g}")
    verdict = "holds" if cond.holds else "VIOLATED: the bound is not guaranteed"
    print(f"  step-size condition {cond.equation}: α = {cond.alpha:.6g} ≤ {cond.alpha_max:.6g}?")
    print(f"    {verdict}")
    for label, value in cond.terms:
        print(f"    {label:<24} = {value:.6g}")
    verdict = "holds" if bound.holds else "does not hold"
    print(f"  bound {bound.equation}: lhs = {bound.lhs:.6g} ≤ rhs = {bound.rhs:.6g}?  {verdict}")
    for field, label in _TERM_LABELS[args.method].items():
        print(f"    {getattr(bound, field):12.6g}  {label}")
    if "drift_bound" in extra:
        print(f"  drift bound (42) αηm²G‖∇f_k‖: max over k = {max(extra['drift_bound']):.6g}")
    return 0
