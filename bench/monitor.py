"""Monitor benchmark: a monitored training loop between probes, as a ratio to the same loop bare.

Every variant runs the same training step (forward, backward, ``clip_grad_norm_``,
``AdamW.step``); the variants take turns step by step (the order rotated each
time), ``--repeats × --steps`` steps each, and the printed ratio is the median
step time of the variant over the median plain step time (medians resist the
bursts of a shared machine). "(its calls)" is the median time spent inside the
Monitor's calls of a step, over the median plain step: the added work measured
directly. The variants:

* ``plain``: the loop alone;
* ``monitor``: plus ``monitor.step(s)`` at the top and ``monitor.gradient(norm)``
  after clipping (the norm ``clip_grad_norm_`` returned): one pass over the
  gradient (‖g‖² and ⟨g, ∇f_k⟩ per tensor);
* ``monitor, norm read``: ``monitor.gradient()`` before clipping, so the Monitor
  reads the norm itself (the same single pass: ‖g‖² and ⟨g, ∇f_k⟩ together);
* ``monitor + P`` (issue 22): the Monitor given the loop's AdamW
  (``optimizer=opt``), so every step also takes ⟨g, u_k⟩ with ``u_k = P⁻¹∇f_k``
  (``step_cos_p``) in the same pass, ``gradient(norm)`` after clipping;
* ``monitor + P, norm read``: the same, ``gradient()`` before clipping.

No probe runs inside the timed steps (the Monitor probed x_0 before them, with
``every`` larger than the run). A probe's own cost is printed separately, in plain
steps and in epochs E over the probe's components (m forward+backward passes).

The last two columns are the floor: the time to read the step gradient g and
∇f_k once each (with P also u_k), a streaming ``sum`` over each tensor, as a share
of the plain step -- what any exact implementation of the per-step numbers must
spend at least (:func:`read_floor`).

The default clock is the process CPU time (``time.process_time``), which a shared
machine disturbs less than the wall clock; ``--clock wall`` uses
``time.perf_counter``. Never a test.

Usage::

    python bench/monitor.py                       # three models, 5 repeats of 20 steps
    python bench/monitor.py --quick               # 3 repeats of 10 steps
    python bench/monitor.py --models mlp --clock wall --threads 2

Target (issue 11): ``monitor`` ≤ 1.05 × ``plain``. Issue 22: ``monitor + P`` ≤ 1.05 ×
``plain`` (the Monitor of an AdamW loop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clipscope import Components, Monitor

ETA = 1.0


@dataclass
class Task:
    """A model, its data (8 batches) and its loss."""

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    describe: str


def cnn_task(batch: int, gen: torch.Generator) -> Task:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    X = torch.randn(8 * batch, 3, 32, 32, generator=gen)
    Y = torch.randint(0, 10, (8 * batch,), generator=gen)
    return Task("cnn", model, X, Y, F.cross_entropy, f"small CNN, 32x32x3, batch {batch}")


class TinyGPT(nn.Module):
    """A causal transformer LM: embedding, 2 pre-norm layers (d=128, 4 heads), untied head."""

    def __init__(self, vocab: int = 2000, d: int = 128, layers: int = 2, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(length, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, length, vocab)``."""
        n = ids.shape[1]
        h = self.embed(ids) + self.pos[:n]
        return self.head(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))


def gpt_task(batch: int, gen: torch.Generator) -> Task:
    ids = torch.randint(0, 2000, (8 * batch, 65), generator=gen)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    return Task("gpt", TinyGPT(), ids[:, :-1], ids[:, 1:], loss,
                f"causal transformer LM, 2 layers d=128, 64 tokens, batch {batch}")  # fmt: skip


def mlp_task(batch: int, gen: torch.Generator) -> Task:
    width = 1024
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, width))
    X = torch.randn(8 * batch, width, generator=gen)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    return Task("mlp", model, X, torch.randn(8 * batch, width, generator=gen), loss,
                f"MLP 4 x 1024x1024 (least compute per parameter), batch {batch}")  # fmt: skip


TASKS = {"cnn": cnn_task, "gpt": gpt_task, "mlp": mlp_task}


def one_step(task: Task, opt, s: int, clock, monitor=None, read_norm=False) -> tuple[float, float]:
    """One training step; return (its time, the time spent inside the Monitor's calls)."""
    params = list(task.model.parameters())
    batch = len(task.inputs) // 8
    j = (s % 8) * batch
    inside = 0.0
    t0 = clock()
    if monitor is not None:
        monitor.step(s)
        inside += clock() - t0
    opt.zero_grad(set_to_none=True)
    task.loss(task.model(task.inputs[j : j + batch]), task.targets[j : j + batch]).backward()
    if monitor is not None and read_norm:
        t = clock()
        monitor.gradient()
        inside += clock() - t
    norm = torch.nn.utils.clip_grad_norm_(params, ETA)
    if monitor is not None and not read_norm:
        t = clock()
        monitor.gradient(norm)
        inside += clock() - t
    opt.step()
    return clock() - t0, inside


def bench(task: Task, steps: int, repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Interleave the variants step by step; ratios of median step times (and of the calls)."""
    model, n = task.model, sum(p.numel() for p in task.model.parameters())
    comps = Components.from_tensors(task.inputs, task.targets, batch_size=len(task.inputs) // 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for s in range(1, 3):  # warm-up, and an optimizer state for P
        one_step(task, opt, s, clock)
    monitors = {
        name: Monitor(
            model,
            task.loss,
            comps,
            eta=ETA,
            every=10**9,
            smoothness_every=None,
            optimizer=opt if "+ P" in name else None,
        )
        for name in VARIANTS[1:]
    }
    t = clock()
    monitors["monitor"].step(0)  # the probe at x_0 (∇f_0 for the cosines)
    probe_time = clock() - t
    t = clock()
    monitors["monitor + P"].step(0)  # the probe with P (u_0 for the step cosines with u)
    probe_p_time = clock() - t
    for name in VARIANTS[1:]:
        monitors[name].step(0)  # none inside the timed steps: every > the run
    variants = {"plain": {}}
    for name in VARIANTS[1:]:
        variants[name] = {"monitor": monitors[name], "read_norm": "norm read" in name}
    times: dict[str, list[float]] = {k: [] for k in variants}
    inside: dict[str, list[float]] = {k: [] for k in variants}
    s = 3
    for r in range(repeats * steps):
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in names:
            total, calls = one_step(task, opt, s, clock, **variants[name])
            times[name].append(total)
            inside[name].append(calls)
            s += 1
    for monitor in monitors.values():
        monitor.close()
    plain = statistics.median(times["plain"])
    floors = read_floor(task.model, clock)
    out: dict[str, float] = {"params": n, "plain step (ms)": 1e3 * plain}
    for name in variants:
        out[name] = statistics.median(times[name]) / plain
        out[name + " calls"] = statistics.median(inside[name]) / plain
    out["probe / plain step"] = probe_time / plain
    out["probe / E"] = probe_time / (8 * plain)
    out["probe + P / probe"] = probe_p_time / probe_time
    out["floor"] = floors[0] / plain
    out["floor + P"] = floors[1] / plain
    return out


def read_floor(model: nn.Module, clock: Callable[[], float], repeats: int = 21):
    """Time the memory-read floor of the Monitor's per-step numbers, in seconds (medians).

    ``‖g‖²`` and ``⟨g, ∇f_k⟩`` need the gradient g and ∇f_k read at least once each;
    with P also ``u_k``. Timed here as one ``sum`` over each tensor (a pure streaming
    read, no product): ``(g and ∇f_k once, g, ∇f_k and u_k once)``. An exact
    implementation that reads them after the backward (as ``Monitor.gradient``
    does) cannot take less; one inside the backward, while g is still in cache,
    would still read ∇f_k and u_k (two thirds of the second number).
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    full = [torch.randn_like(g) for g in grads]
    u = [torch.randn_like(g) for g in grads]
    out = []
    for vectors in ((grads, full), (grads, full, u)):
        times = []
        for _ in range(repeats):
            t = clock()
            for group in zip(*vectors, strict=True):
                for tensor in group:
                    tensor.sum()
            times.append(clock() - t)
        out.append(statistics.median(times))
    return out


VARIANTS = ("plain", "monitor", "monitor, norm read", "monitor + P", "monitor + P, norm read")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,gpt,mlp", help="comma list of cnn, gpt, mlp")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: per model)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 10 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 10, 3
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}; torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.repeats} repeats x {args.steps} steps per variant; eta = {ETA}")  # fmt: skip
    default_batch = {"cnn": 64, "gpt": 16, "mlp": 64}
    header = ("model", "params", "plain step", *(f"{v} | (its calls)" for v in VARIANTS[1:]),
              "probe / step", "probe / E", "probe + P / probe",
              "read floor / step (g, ∇f_k)", "read floor + P / step (g, ∇f_k, u_k)")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * (len(header) + len(VARIANTS) - 1))
    for name in args.models.split(","):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        task = TASKS[name](args.batch or default_batch[name], gen)
        r = bench(task, args.steps, args.repeats, clock)
        cells = " | ".join(f"{r[v]:.3f} | {r[v + ' calls']:.3f}" for v in VARIANTS[1:])
        print(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['plain step (ms)']:.1f} ms | {cells} | "
            f"{r['probe / plain step']:.1f} | {r['probe / E']:.2f} | "
            f"{r['probe + P / probe']:.2f} | {r['floor']:.3f} | {r['floor + P']:.3f} |"
        )
        print(f"|   ({task.describe}) |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
