"""Thread benchmark: the README's main job with one torch thread vs every core, quiet and busy.

Runs ``clipscope reproduce`` (the job ``make demo`` runs, on the embedded data)
as a fresh subprocess per variant, into a new temporary study directory, with
``--threads 1`` and ``--threads 0`` (torch's default: every core; with
``--passive`` also with ``OMP_WAIT_POLICY=PASSIVE``, idle OpenMP threads
sleeping instead of spinning), each on a quiet machine and with ``--busy``
other processes keeping the cores busy
(``python -c 'while True: pass'``, started before and killed after the
variant, by their process ids). The variants take turns (``--repeats`` rounds,
the order rotated each round). For each it prints the wall time, the CPU time
of the subprocess (user + system), the 1-minute load average before and after,
and the ratio of its median wall time to the median of the baseline
(one thread, quiet) measured in the same run.

The machine may be shared: the load average before a variant shows what else
was running; repeat when in doubt. Never a test.

Usage::

    python bench/threads.py                              # the full main job, 1 round
    python bench/threads.py --epochs 1 --repeats 2       # a shorter job (1 epoch per run)
    python bench/threads.py --threads 1 --busy 0,2       # only the one-thread variants
    python bench/threads.py --timeout 900                # give up on a variant after 15 min
    python bench/threads.py --passive                    # also every core, OMP_WAIT_POLICY=PASSIVE
    python bench/threads.py --keep /tmp/studies          # keep the studies (compare findings)

``--timeout`` stops a variant that runs too long (its time is printed as
``> timeout``) so that a slow setting does not hold the machine for an hour.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BUSY = "while True: pass"


@dataclass
class Variant:
    """One setting: torch threads (0 = every core) and the number of busy processes."""

    threads: int
    busy: int
    passive: bool = False
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    load: list[tuple[float, float]] = field(default_factory=list)
    timed_out: int = 0

    @property
    def name(self) -> str:
        """``1 thread, quiet``, ``every core, 2 busy``."""
        threads = "every core" if self.threads == 0 else f"{self.threads} thread"
        threads += " (passive)" if self.passive else ""
        return f"{threads}, {'quiet' if self.busy == 0 else f'{self.busy} busy'}"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_variant(variant: Variant, args: argparse.Namespace) -> None:
    """Start the busy processes, run the job once, stop them; record time, CPU and load."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(variant.busy)]
    out = Path(tempfile.mkdtemp(prefix="clipscope-threads-"))
    keep = None
    if args.keep is not None:
        name = f"threads{variant.threads}{'p' if variant.passive else ''}-busy{variant.busy}"
        keep = Path(args.keep) / f"{name}-{len(variant.wall)}"
    try:
        if hogs:
            time.sleep(args.settle)  # let the busy processes reach the CPUs
        before = os.getloadavg()[0]
        command = [
            sys.executable, "-m", "clipscope", "reproduce", "--out", str(out / "study"),
            "--threads", str(variant.threads), "--no-progress",
        ]  # fmt: skip
        if args.epochs is not None:
            command += ["--epochs", str(args.epochs)]
        for task in args.task or []:
            command += ["--task", task]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
        if variant.passive:  # idle OpenMP threads sleep instead of spinning
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        cpu0, t0 = _children_cpu(), time.perf_counter()
        try:
            subprocess.run(
                command, check=True, timeout=args.timeout, stdout=subprocess.DEVNULL, env=env
            )
            wall = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            wall = float("inf")
            variant.timed_out += 1
        variant.wall.append(wall)
        variant.cpu.append(_children_cpu() - cpu0)  # only a finished child is counted
        variant.load.append((before, os.getloadavg()[0]))
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
        if keep is not None and (out / "study").is_dir():
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(out / "study"), keep)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    """Run every variant ``--repeats`` times and print the table of times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=_ints, default=[1, 0], help="thread counts (0 = all)")
    parser.add_argument("--busy", type=_ints, default=[0, 2], help="busy processes per variant")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (order rotated)")
    parser.add_argument("--epochs", type=int, default=None, help="override the runs' epochs")
    parser.add_argument("--task", action="append", help="study task (repeatable; default both)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per variant")
    parser.add_argument("--keep", default=None, help="keep each study under this folder")
    parser.add_argument(
        "--passive",
        action="store_true",
        help="also each thread count but 1 with OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before timing, busy")
    args = parser.parse_args()

    import torch

    print(
        f"cpus {os.cpu_count()}, torch {torch.__version__}, torch's default threads "
        f"{torch.get_num_threads()}, interop {torch.get_num_interop_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')!r} (OMP_* unset for the job)"
    )
    print(f"job: clipscope reproduce{'' if args.epochs is None else f' --epochs {args.epochs}'}")
    variants = [
        Variant(t, b, passive)
        for b in args.busy
        for t in args.threads
        for passive in ((False, True) if args.passive and t != 1 else (False,))
    ]
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for variant in order:
            run_variant(variant, args)
            load = variant.load[-1]
            print(
                f"  round {r + 1}: {variant.name:24s} wall {variant.wall[-1]:7.1f} s  "
                f"cpu {variant.cpu[-1]:7.1f} s  load {load[0]:.2f} -> {load[1]:.2f}",
                flush=True,
            )
    base = next((v for v in variants if v.threads == 1 and v.busy == 0), variants[0])
    base_wall = statistics.median(base.wall)
    print(f"\nmedian over {args.repeats} round(s); ratio = wall / wall of '{base.name}'")
    print(f"{'variant':26s} {'wall s':>9s} {'cpu s':>8s} {'ratio':>7s}  load before -> after")
    for v in variants:
        wall = statistics.median(v.wall)
        shown = f"> {args.timeout:.0f}" if v.timed_out and wall == float("inf") else f"{wall:.1f}"
        loads = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in v.load)
        print(
            f"{v.name:26s} {shown:>9s} {statistics.median(v.cpu):8.1f} "
            f"{wall / base_wall:7.2f}  {loads}"
        )


if __name__ == "__main__":
    main()
