"""``clipscope report DIR``: rebuild figures and the HTML report from stored records."""

from __future__ import annotations

import argparse

from clipscope.math.advice import DEFAULT_TARGET


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    parser = subparsers.add_parser(
        "report",
        help="rebuild figures and report.html from a run or study directory (no gradients)",
        description=(
            "Rebuild the figures, findings.json and the self-contained HTML report of a run "
            "directory (from `clipscope train` or a Monitor's run_dir) or a study directory "
            "(from `clipscope reproduce`) from its stored records only; never recomputes "
            "gradients."
        ),
    )
    parser.add_argument("directory", help="run or study directory")
    parser.add_argument(
        "--out",
        default=None,
        help="report path (default: DIRECTORY/report.html); findings.json and figures/ are "
        "written beside it",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing --out that is not a clipscope report",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=DEFAULT_TARGET,
        help="the η advice's share of the unclipped descent to keep, in (0, 1] (default "
        f"{DEFAULT_TARGET})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the report and say where it is."""
    from clipscope.commands._out import check_creatable, check_output_file
    from clipscope.report import build_report  # matplotlib and scipy: only when it runs
    from clipscope.report.findings import FINDINGS_FILE

    if args.out is not None:  # its folder is made by build_report; one that cannot be: exit 2
        out = check_output_file(args.out, "--out")
        if out.is_file() and not args.force and not _is_report(out):
            raise ValueError(
                f"--out {out} exists and is not a clipscope report: not overwritten (--force "
                "overwrites it; findings.json and figures/ go beside it)"
            )
        check_creatable(out.parent, "--out")
    path = build_report(args.directory, args.out, target=args.target)
    print(f"report: {path}")
    print(f"findings: {path.parent / FINDINGS_FILE}")
    print(f"figures: {path.parent / 'figures'}")
    return 0


def _is_report(path) -> bool:
    """Whether ``path`` holds a report this command wrote (rebuilt in place without --force)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    from clipscope.report.html import REPORT_HEAD

    return head.startswith(REPORT_HEAD.encode())
