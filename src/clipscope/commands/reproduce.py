"""``clipscope reproduce``: the paper's Figure 1 (extended) with plots and an HTML report."""

from __future__ import annotations

import argparse


def _sizes(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``reproduce``."""
    from clipscope.reproduce import EMBEDDED, TASKS

    width = max(len(name) for name in TASKS) + 1
    tasks = "\n".join(f"  {name:{width}s} {spec.description}" for name, spec in TASKS.items())
    parser = subparsers.add_parser(
        "reproduce",
        help="reproduce and extend the paper's Figure 1 (default: embedded data, a few minutes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train with IGC-clip (and SGD-clip for vision) at several batch sizes, probe every "
            "epoch, take a batch-size cross-section at the final point, and write figures and a "
            "self-contained HTML report.\n\ntasks:\n" + tasks
        ),
    )
    parser.add_argument(
        "--task",
        action="append",
        choices=sorted(TASKS),
        help=f"task to run (repeatable; default: {', '.join(EMBEDDED)})",
    )
    parser.add_argument("--data-dir", help="dataset folder for the paper-scale tasks")
    parser.add_argument("--out", default="clipscope-out/reproduce", help="study directory")
    parser.add_argument("--epochs", type=int, help="override every run's number of epochs")
    parser.add_argument("--batch-sizes", type=_sizes, help="override the batch sizes, e.g. 8,16,32")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads of every run and cross-section (default: the configs' threads = 1; "
        "0 = every core; docs/benchmarks.md)",
    )
    parser.add_argument("--resume", action="store_true", help="keep finished runs, resume the rest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the study and print where the report is."""
    from clipscope.commands._out import check_creatable
    from clipscope.reproduce import EMBEDDED, reproduce

    # a file in its path, a read-only place: exit 2 before the work (reproduce() itself
    # refuses a file at --out)
    check_creatable(args.out, "--out")
    report = reproduce(
        args.task or EMBEDDED,
        args.out,
        epochs=args.epochs,
        batch_sizes=args.batch_sizes,
        data_dir=args.data_dir,
        device=args.device,
        resume=args.resume,
        progress=not args.no_progress,
        threads=args.threads,
    )
    from clipscope.engine.distributed import is_writer

    if is_writer():  # under torchrun: rank 0 says it once
        print(f"report: {report}")
    return 0
