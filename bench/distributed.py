"""Probe time with 1 process vs 2 processes on one machine (torch.distributed, gloo), as ratios.

For each problem and each repeat the script launches, in a rotated order,
``python -m torch.distributed.run`` with this file as the worker in three
settings on the same machine:

* ``1p×1t`` -- one process, one torch thread (the baseline of the repeat);
* ``1p×2t`` -- one process, two torch threads (intra-op parallelism: the
  other way to use two cores);
* ``2p×1t`` -- two processes of one thread each, the components split over
  them (``clipscope.probe`` under a gloo process group).

Each worker builds the same seeded model and data, runs one probe to warm up,
then times ``--probes`` probes (wall clock, the slowest rank's, between
barriers) and, in ``2p×1t``, one float64 all-reduce of the probe's
communication volume ``(1 + E)·n`` numbers on its own. The ratio of a repeat is
``median setting time / median 1p×1t time`` of that repeat; the script prints
the median over repeats. Start-up of the processes is not timed. Never a test.

Problems (batch size 64, 8 components; ``E = 3`` thresholds incl. ∞):

* ``cnn``: conv 3→32, pool, conv 32→64, pool, fc 4096→128, fc 10 (545k
  parameters), routes two-pass and keep;
* ``lstm``: embedding 10k×200, 1-layer LSTM 200, untied decoder (4.33M
  parameters), 35-token windows in corpus order, route two-pass; rank 1 first
  runs windows 0…3 forward only to get the carried state (the price of
  sequential components).

Usage::

    python bench/distributed.py              # 3 repeats, 3 probes per launch
    python bench/distributed.py --quick      # 2 repeats, 2 probes, cnn two-pass only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
ETAS = (0.1, 1.0, math.inf)
SETTINGS = {"1p×1t": (1, 1), "1p×2t": (1, 2), "2p×1t": (2, 1)}  # (processes, threads)
PROBLEMS = {"cnn-two-pass": ("cnn", "two-pass"), "cnn-keep": ("cnn", "keep")}
PROBLEMS["lstm-two-pass"] = ("lstm", "two-pass")


# -- the worker (one process of a launch) ---------------------------------------------------
class CNN(nn.Module):
    """The engine benchmark's small CNN (545k parameters, no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.f1, self.f2 = nn.Linear(4096, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of ``x`` (B, 3, 32, 32)."""
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


class LM(nn.Module):
    """The engine benchmark's LSTM LM (4.33M parameters, untied decoder)."""

    def __init__(self, vocab: int = 10_000, hidden: int = 200) -> None:
        super().__init__()
        self.emb, self.rnn = nn.Embedding(vocab, hidden), nn.LSTM(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, state=None):
        """Return ``(logits, state)`` for tokens ``x`` (T, B)."""
        h, state = self.rnn(self.emb(x), state)
        return self.out(h), state


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build(kind: str, m: int, batch: int):
    from clipscope.components import Components, SequentialComponents

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "cnn":
        X = torch.randn(m * batch, 3, 32, 32, generator=gen)
        Y = torch.randint(0, 10, (m * batch,), generator=gen)
        return CNN(), F.cross_entropy, Components.from_tensors(X, Y, batch_size=batch, seed=0)
    tokens = torch.randint(0, 10_000, (batch * (35 * m + 1),), generator=gen)
    return LM(), lm_loss, SequentialComponents.from_tokens(tokens, batch_size=batch, bptt=35)


def worker(out: str, kind: str, route: str, probes: int, threads: int, m: int, batch: int) -> None:
    import torch.distributed as dist

    from clipscope import probe

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))

    def sync() -> None:
        if world > 1:
            dist.barrier()

    def slowest(seconds: float) -> float:
        if world == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    model, loss_fn, comps = build(kind, m, batch)
    n = sum(p.numel() for p in model.parameters())
    times = []
    for k in range(probes + 1):  # the first is the warm-up
        sync()
        t0 = time.perf_counter()
        result = probe(model, loss_fn, comps, ETAS, route=route)
        elapsed = slowest(time.perf_counter() - t0)
        if k:
            times.append(elapsed)
    comm = math.nan
    if world > 1:  # the probe's all-reduced volume on its own: (1 + E) n float64
        vec = torch.zeros((1 + len(ETAS)) * n, dtype=torch.float64)
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(vec)
        comm = slowest(time.perf_counter() - t0)
    if world == 1 or dist.get_rank() == 0:
        record = {"times": times, "comm": comm, "n": n, "m": result.m, "route": result.route}
        Path(out).write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


# -- the launcher ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setting: str, kind: str, route: str, probes: int, m: int, batch: int) -> dict:
    nproc, threads = SETTINGS[setting]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [kind, route, str(probes), str(threads), str(m), str(batch)]
        for _ in range(3):  # a port taken between choosing and binding: try another
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                str(HERE), "--worker", str(out), *args,
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
                break
        if proc.returncode != 0:
            raise RuntimeError(f"{setting} {kind} {route} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 2 probes, cnn-two-pass")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--probes", type=int, default=None, help="timed probes per launch")
    parser.add_argument("--only", choices=sorted(PROBLEMS), action="append", default=None)
    parser.add_argument("--components", type=int, default=8, help="m")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    probes = args.probes or (2 if args.quick else 3)
    problems = args.only or (["cnn-two-pass"] if args.quick else list(PROBLEMS))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load()}")
    print(f"m = {args.components} components of {args.batch}; {repeats} repeats x {probes} probes")
    for name in problems:
        kind, route = PROBLEMS[name]
        ratios: dict[str, list[float]] = {s: [] for s in SETTINGS}
        base_times, comm, info = [], [], {}
        for r in range(repeats):
            order = list(SETTINGS)
            order = order[r % len(order) :] + order[: r % len(order)]
            medians = {}
            for setting in order:
                rec = launch(setting, kind, route, probes, args.components, args.batch)
                medians[setting] = statistics.median(rec["times"])
                info = {"n": rec["n"], "m": rec["m"], "route": rec["route"]}
                if setting == "2p×1t":
                    comm.append(rec["comm"])
            base_times.append(medians["1p×1t"])
            for setting, t in medians.items():
                ratios[setting].append(t / medians["1p×1t"])
        base = statistics.median(base_times)
        print(
            f"\n{name}: n = {info['n']:,} parameters, m = {info['m']}, route {info['route']}; "
            f"1p×1t probe {base:.3f} s (median)"
        )
        for setting, values in ratios.items():
            spread = ", ".join(f"{v:.2f}" for v in values)
            print(f"  {setting}: {statistics.median(values):.2f} x 1p×1t   (repeats: {spread})")
        share = statistics.median(comm) / base
        print(
            f"  all-reduce of (1 + E)·n = {(1 + len(ETAS)) * info['n']:,} float64 alone (gloo, "
            f"loopback): {statistics.median(comm) * 1e3:.0f} ms = {share:.2f} x 1p×1t"
        )
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        out, kind, route, probes, threads, m, batch = sys.argv[2:9]
        worker(out, kind, route, int(probes), int(threads), int(m), int(batch))
    else:
        main()
