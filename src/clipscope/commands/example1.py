"""``clipscope example1``: the paper's Example 1 in closed form and in simulation."""

from __future__ import annotations

import argparse
import json
import math

from clipscope.commands._out import check_output_dir
from clipscope.example1 import METHODS, plot, simulate
from clipscope.math import theory
from clipscope.math.stats import check_eta

PAPER = "1 + 2α/3"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``example1``."""
    parser = subparsers.add_parser(
        "example1",
        help="Example 1 of the paper: clipped SGD moving away from the optimum",
        description=(
            "Example 1 of Qian et al. (2021): f1 = f2 = -x^2, f3 = 5x^2, f = x^2. Prints the "
            "expected first clipped-SGD iterate E[x1] in closed form (1 + 2α/3 for x0 = 1, "
            "η = 2), the watershed |x| = η/4 beyond which the expected clipped step points away "
            "from 0, and simulations of SGD-clip, IGC-clip and RR-clip from x0 and from a start "
            "inside the watershed; writes a plot."
        ),
    )
    parser.add_argument("--alpha", type=float, default=0.01, help="step size α (default 0.01)")
    parser.add_argument("--eta", type=float, default=2.0, help="clipping threshold η (default 2)")
    parser.add_argument("--x0", type=float, default=1.0, help="starting point (default 1)")
    parser.add_argument(
        "--x0-inside",
        type=float,
        default=None,
        help="second start, inside the watershed (default η/8, i.e. 0.25 for η = 2)",
    )
    parser.add_argument("--epochs", type=int, default=200, help="epochs of 3 steps (default 200)")
    parser.add_argument(
        "--seeds", type=int, default=1000, help="independent runs per random method (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument(
        "--out",
        default="clipscope-out/example1",
        help="directory for example1.png (default ./clipscope-out/example1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run(args: argparse.Namespace) -> int:
    """Compute, simulate, plot, and print a table or JSON."""
    eta = check_eta(args.eta)
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got {args.alpha!r}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}")
    out = check_output_dir(args.out, "a folder for example1.png")  # exit 2, before the work
    watershed = theory.example1_watershed(eta)
    inside = args.x0_inside
    if inside is None:
        inside = watershed / 2 if math.isfinite(watershed) else 0.25
    starts = [args.x0, inside]
    x1 = theory.expected_x1(args.x0, args.alpha, eta)
    paper_applies = args.x0 == 1.0 and eta == 2.0
    paper_x1 = 1.0 + 2.0 * args.alpha / 3.0

    results = [
        simulate(
            method,
            x0=start,
            alpha=args.alpha,
            eta=eta,
            epochs=args.epochs,
            runs=args.seeds,
            seed=args.seed,
        )
        for start in starts
        for method in METHODS
    ]
    path = plot(results, eta, out / "example1.png")

    summaries = [r.summary() for r in results]
    if args.json:
        print(
            json.dumps(
                {
                    "alpha": args.alpha,
                    "eta": _num(eta),
                    "x0": args.x0,
                    "expected_step_x0": theory.expected_clipped_step(args.x0, eta),
                    "expected_x1": x1,
                    "paper_expected_x1": {
                        "formula": PAPER,
                        "value": paper_x1,
                        "applies": paper_applies,
                        "matches": paper_applies and math.isclose(x1, paper_x1, rel_tol=1e-12),
                    },
                    "watershed": _num(watershed),
                    "epochs": args.epochs,
                    "seeds": args.seeds,
                    "seed": args.seed,
                    "simulations": summaries,
                    "plot": str(path),
                },
                allow_nan=False,
            )
        )
        return 0

    print("Example 1: f1 = f2 = -x^2, f3 = 5x^2, f = x^2 (gradients -2x, -2x, 10x)")
    print(f"  alpha = {args.alpha:g}, eta = {eta:g}, x0 = {args.x0:g}")
    print(f"  E[C(grad f_i(x0); eta)]   = {theory.expected_clipped_step(args.x0, eta):+.6g}")
    print(f"  E[x1] = x0 - alpha E[C]   = {x1:.10g}")
    if paper_applies:
        print(f"  paper: {PAPER}            = {paper_x1:.10g}")
    print(f"  watershed |x| = eta/4     = {watershed:g}  (expected step points away from 0 beyond)")
    print()
    print(
        f"Simulations: {args.epochs} epochs of 3 steps, {args.seeds} runs (IGC: 1, deterministic)"
    )
    header = f"  {'x0':>8} {'method':>6} {'|x_T|>|x0|':>11} {'|x_T|<|x0|':>11} {'median |x_T|':>13}"
    print(header)
    for s in summaries:
        median = s["median_abs_final"]
        median_text = f"{median:13.4g}" if median is not None else f"{'overflow':>13}"
        print(
            f"  {s['x0']:8g} {s['method']:>6} {s['fraction_away']:11.3f} "
            f"{s['fraction_toward']:11.3f} {median_text}"
        )
    if any(s["fraction_overflow"] > 0 for s in summaries):
        print("  (some runs overflowed: only possible without clipping, eta = inf)")
    print()
    print(f"plot: {path}")
    return 0
