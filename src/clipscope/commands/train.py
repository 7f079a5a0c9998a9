"""``clipscope train CONFIG.toml [--out DIR] [--resume] [--force] [--dist-timeout S]``: one run.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m clipscope train ...``) the
ranks split every step and probe; rank 0 writes (``docs/distributed.md``).
"""

from __future__ import annotations

import argparse
import math

from clipscope.commands._out import check_creatable
from clipscope.train import train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    parser = subparsers.add_parser(
        "train",
        help="train with a clipped incremental method, probing every epoch, into a run directory",
        description=(
            "Train with SGD-/IGC-/RR-clip (or shuffle-once, Zhang et al.) as the TOML config says "
            "(each component gradient clipped exactly at eta, a number or set while training "
            "by eta = descent-safe | autoclip, then an SGD, Adam or AdamW step: "
            "optimizer = sgd | adam | adamw), probing the clipping statistics at the start of "
            "every epoch. Exit codes: 0 done, "
            "2 bad config or refused directory, 3 non-finite loss, gradient or step (last good "
            "checkpoint kept), 4 I/O error (e.g. disk full), 5 another torchrun process died or "
            "timed out, 130/143 interrupted by SIGINT/SIGTERM (checkpointed; continue with "
            "--resume). Under torchrun every process trains its share of each step and rank 0 "
            "writes (docs/distributed.md)."
        ),
    )
    parser.add_argument("config", help="TOML config file (see clipscope.config.TrainConfig)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept a config that differs from the stored one (logged)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others at a collective before "
        "it stops with exit 5, a positive number (default: $CLIPSCOPE_DIST_TIMEOUT or 600)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the config; the exit code says how it ended."""
    if args.force and not args.resume:
        raise ValueError("--force only applies together with --resume")
    timeout = args.dist_timeout  # checked in every process, not only under torchrun
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout!r}")
    if args.out is not None:  # bad input, exit 2 before anything is written (not an I/O error)
        check_creatable(args.out)
    return train(
        args.config, args.out, resume=args.resume, force=args.force, dist_timeout=args.dist_timeout
    )
