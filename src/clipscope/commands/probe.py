"""``clipscope probe``: measure per-component norms and angles to ∇f on a built-in task.

Writes the per-component table as CSV (columns ``batch_size, component, size,
loss, norm, dot, cos, beta``) and prints a summary (``--json`` for the full
JSON summary). The built-in tasks are tiny and synthetic so the command runs in
seconds anywhere:

* ``mlp``: Gaussian-blob classification, a 2-layer tanh MLP, cross-entropy;
* ``lstm``: random tokens, an embedding/LSTM language model with a tied decoder,
  sequential components with the state carried between windows.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clipscope.atomic import atomic_write_text
from clipscope.components import Components, SequentialComponents
from clipscope.engine import ROUTES, MultiProbeResult, probe

TASKS = ("mlp", "lstm")
COLUMNS = ("batch_size", "component", "size", "loss", "norm", "dot", "cos", "beta")


class _TiedLM(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, inp: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out, state = self.rnn(self.encoder(inp), state)
        return self.decoder(out), state


def _lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def synthetic_task(
    name: str, n_samples: int, batch_size: int, seed: int, bptt: int = 8
) -> tuple[nn.Module, Any, Any]:
    """Return ``(model, loss_fn, components)`` of a tiny built-in task (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        classes, dim = 4, 8
        centers = 2.0 * torch.randn(classes, dim, generator=gen)
        Y = torch.randint(0, classes, (n_samples,), generator=gen)
        X = centers[Y] + torch.randn(n_samples, dim, generator=gen)
        model = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, classes))
        comps = Components.from_tensors(X, Y, batch_size=batch_size, seed=seed)
        return model, F.cross_entropy, comps
    if name == "lstm":
        vocab = 20
        tokens = torch.randint(0, vocab, (n_samples,), generator=gen)
        model = _TiedLM(vocab, 16)
        comps = SequentialComponents.from_tokens(tokens, batch_size=batch_size, bptt=bptt)
        return model, _lm_loss, comps
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``probe``."""
    parser = subparsers.add_parser(
        "probe",
        help="per-component gradient norms and angles to the full gradient (built-in task)",
        description=(
            "Run the gradient engine once on a tiny built-in task and write the "
            "per-component table (norm, dot with the full gradient, cosine, beta) as CSV."
        ),
    )
    parser.add_argument("--task", choices=TASKS, default="mlp", help="built-in task")
    parser.add_argument("--samples", type=int, default=512, help="samples (tokens for lstm)")
    parser.add_argument("--batch-size", type=int, default=16, help="component batch size B")
    parser.add_argument("--bptt", type=int, default=8, help="window length (lstm)")
    parser.add_argument("--seed", type=int, default=0, help="data, model and partition seed")
    parser.add_argument("--route", choices=ROUTES, default="auto", help="engine route")
    parser.add_argument(
        "--levels", type=int, default=None, help="dyadic: batch sizes B, 2B, ..., 2^(L-1)B"
    )
    parser.add_argument(
        "--per-sample", action="store_true", help="components of batch size 1 (per-sample route)"
    )
    parser.add_argument(
        "--eta", type=float, action="append", default=None, help="clipping threshold (repeat)"
    )
    parser.add_argument("--dropout", choices=("off", "fixed"), default="off")
    parser.add_argument("--out", default="probe.csv", help="CSV path for the per-component table")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Probe the task, write the CSV, print the summary."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    model, loss_fn, comps = synthetic_task(
        args.task, args.samples, args.batch_size, args.seed, args.bptt
    )
    result = probe(
        model,
        loss_fn,
        comps,
        etas=args.eta or (),
        route=args.route,
        dropout=args.dropout,
        seed=args.seed,
        levels=args.levels,
        batch_sizes=[1] if args.per_sample else None,
    )
    results = dict(result) if isinstance(result, MultiProbeResult) else {result.batch_size: result}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for b, res in results.items():
        for row in res.table():
            writer.writerow({"batch_size": b, **row})
    atomic_write_text(out, buffer.getvalue())
    summary = {
        "task": args.task,
        "components": comps.describe(),
        "csv": str(out),
        "results": {str(b): r.summary() for b, r in results.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for b, res in results.items():
        s = res.summary()
        print(
            f"B={b} m={s['m']} route={s['route']} f={s['loss']:.6g} ‖∇f‖={s['grad_norm']:.6g} "
            f"cos min/mean={s['cos_min']:.4g}/{s['cos_mean']:.4g} c1={_fmt(s.get('c1'))} "
            f"c2={_fmt(s.get('c2'))} Σβ={s['sum_beta']:.6g}"
        )
        for eta, clip in s["clipped"].items():
            print(f"  η={eta}: ‖Σ C(g_i; η)‖={_fmt(clip['norm'])} cos to ∇f={_fmt(clip['cos'])}")
        noise = s["noise"]
        predicted, measured = noise.get("predicted_cos_fpc"), noise.get("measured_mean_cos")
        print(
            f"  noise scale (heuristic): B_noise={_fmt(noise.get('B_noise'))} "
            f"predicted mean cos={_fmt(predicted)} measured={_fmt(measured)}"
        )
    print(f"table: {out}")
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
