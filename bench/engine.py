"""Gradient-engine benchmark: time and peak memory as ratios to one plain epoch.

Every method runs over the same components as the baseline "one plain
forward+backward epoch" (``torch.autograd.grad`` of each batch's mean loss);
the methods are interleaved within each repeat (the baseline first, the
methods' order rotated from one repeat to the next) and the printed ratio is
the median over repeats of ``method / baseline`` in that repeat. Never a test.

Peak memory: the resident set size (``/proc/self/statm``) sampled every
0.5 ms by a thread while the method runs, minus the RSS just before it, after
``gc.collect()`` and glibc ``malloc_trim(0)``; glibc's mmap threshold is pinned
at 128 KiB so that freed tensors go back to the OS between methods. It counts
everything the process touches (autograd graph, activations, kept gradients).
**Times measured with memory are not for comparison**: with the threshold
pinned every allocation above 128 KiB is a fresh ``mmap`` whose pages fault
and are zeroed on first touch (and the sampling thread's CPU time counts under
``--clock cpu``), a cost a normal process does not pay and that differs from
method to method (2026-12-06, HF GPT-2: the plain epoch 6.5 s with memory, 2.8 s
without). Take the time ratios from a ``--no-memory`` run, the memory ratios
from a run with memory.

Usage::

    python bench/engine.py            # full run (several minutes on 2 cores)
    python bench/engine.py --quick    # smaller epochs, 3 repeats
    python bench/engine.py --many     # 50,000 per-sample components, streaming
    python bench/engine.py --only checks   # what the per-sample checks cost (issue 9)
    python bench/engine.py --only kept     # both per-sample routes end to end (issue 13)
    python bench/engine.py --only fixed    # the probe's fixed costs per probe, per component
    python bench/engine.py --only preconditioned  # the dots with u = P⁻¹∇f (issue 22)
    python bench/engine.py --clock cpu     # process CPU time instead of wall time
    python bench/engine.py --threads 1     # torch.set_num_threads(1)
    python bench/engine.py --no-memory     # time only (no RSS sampling thread)

Targets (issue 3): keep ≤ 1.1×, two-pass ≤ 2.05×, dyadic with 6 sizes ≤ 2.2×
(naive 12×), per-sample norms + cosines ≤ 2.5× (torch.func vmap ≈ 4.3×).
Issue 9: the per-sample route's structural and spot checks add ≤ 10 % to the
per-sample probe (``--only checks``: the probe without checks, with the
structural check only, and with both, interleaved in one run).
Issue 13: per-sample-kept ≤ 1.8× end to end on the CNN, the LSTM LM and a
batch-first LSTM LM (``--only kept``, peak memory beside it); two-pass
per-sample ≤ 2.3× (CNN), ≤ 2.5× (LSTM LM); keep ≤ 1.1× and dyadic (6 sizes)
≤ 2.2× at m ≥ 64 (``--only routes --batches 64``); fixed costs (``--only fixed``).
Issue 22: the preconditioned statistics (``probe(..., preconditioner=AdamW)``) add
≤ 5 % to a probe's time on every route (``--only preconditioned``: each route with
and without the preconditioner, interleaved in one run; the ratio of the two per
repeat).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from clipscope.components import Components, SequentialComponents
from clipscope.engine.per_sample import ghost_pass, per_sample_dots
from clipscope.engine.per_sample.plan import unchecked_for_benchmarks

try:
    from clipscope.engine import probe
except ImportError:  # the routes are written in parallel
    probe = None

_PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRSS:
    """Sample RSS in a thread while the block runs; ``.delta`` = peak − start (bytes)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.0005)

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, rss())
        self._stop.set()
        self._thread.join()
        self.delta = self.peak - self.start


# ----------------------------------------------------------------------------- models


def small_cnn() -> nn.Module:
    """Conv 3→32, pool, conv 32→64, pool, fc 4096→128, fc 10 (545k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class LSTMLM(nn.Module):
    """Embedding 10k×200, 1-layer LSTM 200, untied decoder (4.33M parameters).

    ``model(x)`` on ``(B, T)`` token rows (samples along dim 0) for per-sample
    components; ``model(inp, state)`` on ``(T, B)`` windows for sequential ones.
    """

    def __init__(self, vocab: int = 10_000, dim: int = 200, batch_first: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, batch_first=batch_first)
        self.decoder = nn.Linear(dim, vocab)
        self.stateful = not batch_first

    def forward(self, inp, state=None):  # noqa: D102
        out, state = self.rnn(self.encoder(inp), state)
        out = self.decoder(out)
        return (out, state) if self.stateful else out


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


# ----------------------------------------------------------------------------- methods


def plain_epoch(model, loss_fn, batches, params) -> None:
    for x, y in batches:
        torch.autograd.grad(loss_fn(model(x), y), params)


def full_grad(model, loss_fn, batches, params) -> list[torch.Tensor]:
    acc = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for a, g in zip(acc, torch.autograd.grad(loss_fn(model(x), y), params), strict=True):
            a += g / len(batches)
    return acc


def ghost_norms(model, loss_fn, batches, params) -> list[torch.Tensor]:
    """Pass 1: per-sample norms by ghost norms; returns ∇f (from the same backward)."""
    acc = [torch.zeros_like(p) for p in params]
    n = sum(x.shape[0] for x, _ in batches)
    for x, y in batches:
        out = ghost_pass(model, loss_fn, x, y, params)
        for a, g in zip(acc, out.grad_sum, strict=True):
            a += g / n
    return acc


def jvp_dots(model, loss_fn, batches, params, v) -> None:
    for x, y in batches:
        per_sample_dots(model, loss_fn, x, y, v, params)


def ghost_then_jvp(model, loss_fn, batches, params) -> None:
    v = ghost_norms(model, loss_fn, batches, params)
    jvp_dots(model, loss_fn, batches, params, v)


def vmap_norms_dots(model, loss_fn, batches, params, v) -> None:
    """torch.func vmap(grad) per-sample gradients, then norms and dots with a given v."""
    names = {id(p): n for n, p in model.named_parameters()}
    primals = {names[id(p)]: p.detach() for p in params}

    def one(ps, xj, yj):
        return loss_fn(functional_call(model, ps, (xj.unsqueeze(0),)), yj.unsqueeze(0))

    per = vmap(grad(one), in_dims=(None, 0, 0))
    for x, y in batches:
        g = per(primals, x, y)
        sq = sum(t.reshape(t.shape[0], -1).double().square().sum(1) for t in g.values())
        dots = sum(
            t.reshape(t.shape[0], -1).double() @ w.reshape(-1).double()
            for t, w in zip(g.values(), v, strict=True)
        )
        del sq, dots


def loop_norms_dots(model, loss_fn, batches, params, v) -> None:
    """Run a loop of batch-1 backward passes, then norms and dots with a given v."""
    for x, y in batches:
        for j in range(x.shape[0]):
            gs = torch.autograd.grad(loss_fn(model(x[j : j + 1]), y[j : j + 1]), params)
            sum(float(g.double().square().sum()) for g in gs)
            sum(float((g.double() * w.double()).sum()) for g, w in zip(gs, v, strict=True))


# ----------------------------------------------------------------------------- harness


@dataclass
class Table:
    """Ratios of one benchmark table, one entry per repeat."""

    title: str
    rows: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    base_time: list[float] = field(default_factory=list)
    base_mem: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, t: float, mem: float, tb: float, mb: float) -> None:  # noqa: D102
        rt, rm = self.rows.setdefault(name, ([], []))
        rt.append(t / tb)
        rm.append(mem / mb if mb > 0 else float("nan"))

    def render(self) -> str:  # noqa: D102
        tb = statistics.median(self.base_time)
        mb = statistics.median(self.base_mem) / 2**20
        lines = [
            f"\n### {self.title}",
            f"baseline: one plain forward+backward epoch = {tb:.3f} s, "
            f"peak RSS increment {mb:.1f} MiB (medians)",
            "",
            "| method | time / E | peak memory / E | repeats |",
            "|---|---|---|---|",
        ]
        for name, (rt, rm) in self.rows.items():
            lines.append(
                f"| {name} | {statistics.median(rt):.2f} | {statistics.median(rm):.2f} "
                f"| {len(rt)} |"
            )
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


# wall-clock time by default; ``--clock cpu`` uses this process's CPU time (all its
# threads), which a neighbour's load on a shared machine disturbs far less
CLOCK = time.perf_counter


MEMORY = True  # --no-memory: time only (no sampling thread, glibc's own mmap threshold)


def measure(fn: Callable[[], Any]) -> tuple[float, float]:
    if not MEMORY:
        t0 = CLOCK()
        fn()
        return CLOCK() - t0, math.nan
    with PeakRSS() as m:
        t0 = CLOCK()
        fn()
        t = CLOCK() - t0
    return t, float(m.delta)


def run_table(title: str, methods: dict[str, Callable[[], Any]], base, repeats: int) -> Table:
    table = Table(title)
    for fn in [base, *methods.values()]:  # warm-up (allocator, oneDNN kernels)
        fn()
    names = list(methods)
    for r in range(repeats):
        tb, mb = measure(base)
        table.base_time.append(tb)
        table.base_mem.append(mb)
        # the methods' order rotates from repeat to repeat: no method always runs right
        # after the same other one (allocator state, caches, a neighbour's load pattern)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t, mem = measure(methods[name])
            table.add(name, t, mem, tb, mb)
        print(f"  {title}: repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return table


def per_sample_tables(args) -> list[Table]:
    tables = []
    gen = torch.Generator().manual_seed(0)
    nb = args.batches
    # --- CNN
    if args.no_cnn:
        return per_sample_lstm(args, gen, nb)
    torch.manual_seed(0)
    cnn = small_cnn()
    params = list(cnn.parameters())
    batches = [
        (torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen))
        for _ in range(nb)
    ]
    v = full_grad(cnn, F.cross_entropy, batches, params)
    methods = {
        "per-sample norms, ghost (pass 1, also gives ∇f)": lambda: ghost_norms(
            cnn, F.cross_entropy, batches, params
        ),
        "per-sample dots, one JVP per batch (pass 2)": lambda: jvp_dots(
            cnn, F.cross_entropy, batches, params, v
        ),
        "**per-sample norms + dots: ghost + JVP, end to end**": lambda: ghost_then_jvp(
            cnn, F.cross_entropy, batches, params
        ),
        "per-sample grads by torch.func vmap(grad) + norms + dots (∇f given)": lambda: (
            vmap_norms_dots(cnn, F.cross_entropy, batches, params, v)
        ),
        "per-sample grads by a loop of batch-1 backward + norms + dots (∇f given)": lambda: (
            loop_norms_dots(cnn, F.cross_entropy, batches, params, v)
        ),
    }
    if probe is not None:
        X = torch.cat([x for x, _ in batches])
        Y = torch.cat([y for _, y in batches])
        comps = Components.from_tensors(X, Y, batch_size=64)
        methods["clipscope.probe(route='per-sample'), end to end"] = lambda: probe(
            cnn, F.cross_entropy, comps, route="per-sample"
        )
    t = run_table(
        f"per-sample components, small CNN (545k params), {nb} batches of 64, 32×32×3",
        methods,
        lambda: plain_epoch(cnn, F.cross_entropy, batches, params),
        args.repeats,
    )
    t.notes.append(
        "vmap and loop rows get ∇f for free; end to end they need one more pass (+1 E) "
        "or O(N·n) memory"
    )
    tables.append(t)
    return tables + per_sample_lstm(args, gen, nb)


def per_sample_lstm(args, gen, nb) -> list[Table]:
    tables = []
    # --- LSTM LM, samples = token rows
    if not args.no_lstm:
        torch.manual_seed(0)
        lm = LSTMLM()
        params = list(lm.parameters())
        lb = max(1, nb // 2)
        batches = [
            (
                torch.randint(0, 10_000, (64, 35), generator=gen),
                torch.randint(0, 10_000, (64, 35), generator=gen),
            )
            for _ in range(lb)
        ]
        v = full_grad(lm, lm_loss, batches, params)
        with torch.backends.mkldnn.flags(enabled=False):
            t = run_table(
                f"per-sample components, LSTM LM (4.33M params), {lb} batches of 64 rows × 35 "
                "tokens",
                {
                    "per-sample norms, ghost (nn.LSTM by its gate gradients) (pass 1)": lambda: (
                        ghost_norms(lm, lm_loss, batches, params)
                    ),
                    "per-sample dots, one JVP per batch (pass 2)": lambda: jvp_dots(
                        lm, lm_loss, batches, params, v
                    ),
                    "**per-sample norms + dots, end to end**": lambda: ghost_then_jvp(
                        lm, lm_loss, batches, params
                    ),
                    "per-sample grads by a loop of batch-1 backward + norms + dots (∇f given)": (
                        lambda: loop_norms_dots(lm, lm_loss, batches, params, v)
                    ),
                },
                lambda: plain_epoch(lm, lm_loss, batches, params),
                max(1, args.repeats - 1),
            )
        t.notes.append(
            "the whole LSTM table runs with oneDNN off (forward-mode AD needs it), baseline too"
        )
        t.notes.append(
            "torch.func vmap(grad) fails on nn.LSTM here (no batching rule for the fused "
            "kernel), so there is no vmap row"
        )
        tables.append(t)
    return tables


def route_tables(args) -> list[Table]:
    if probe is None:
        return []
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    cnn = small_cnn()
    params = list(cnn.parameters())
    n = 64 * args.batches
    X = torch.randn(n, 3, 32, 32, generator=gen)
    Y = torch.randint(0, 10, (n,), generator=gen)
    comps = Components.from_tensors(X, Y, batch_size=64)
    batches = list(comps)
    sizes = [64 * 2**k for k in range(6)]

    def naive():
        for s in sizes:
            probe(
                cnn, F.cross_entropy, Components.from_tensors(X, Y, batch_size=s), route="two-pass"
            )

    methods = {
        "route='keep'": lambda: probe(cnn, F.cross_entropy, comps, route="keep"),
        "route='two-pass'": lambda: probe(cnn, F.cross_entropy, comps, route="two-pass"),
        "route='dyadic', 6 sizes 64…2048": lambda: probe(
            cnn, F.cross_entropy, comps, route="dyadic", batch_sizes=sizes
        ),
        "naive: route='two-pass' at each of the 6 sizes": naive,
    }
    if args.no_naive:
        del methods["naive: route='two-pass' at each of the 6 sizes"]
    t = run_table(
        f"mini-batch components, small CNN, m = {len(comps)} components of 64",
        methods,
        lambda: plain_epoch(cnn, F.cross_entropy, batches, params),
        args.repeats,
    )
    t.notes.append(
        f"N = {n} samples: sizes above {n} give one component (the whole set); "
        "the baseline is one epoch at batch 64"
    )
    tables = [t]
    if not args.no_lstm:
        torch.manual_seed(0)
        lm = LSTMLM(batch_first=False)
        params = list(lm.parameters())
        bptt, b = 35, 64
        windows = max(2, args.batches // 2)
        tokens = torch.randint(0, 10_000, (b * bptt * windows + 1,), generator=gen)
        seq = SequentialComponents.from_tokens(tokens, batch_size=b, bptt=bptt)

        def plain_seq():
            state = None
            for inp, tgt in seq:
                out, state = lm(inp, state)
                state = tuple(s.detach() for s in state)
                torch.autograd.grad(lm_loss(out, tgt), params)

        with torch.backends.mkldnn.flags(enabled=False):
            t = run_table(
                f"mini-batch components, LSTM LM, m = {len(seq)} BPTT windows (35 × 64)",
                {
                    "route='keep'": lambda: probe(lm, lm_loss, seq, route="keep"),
                    "route='two-pass'": lambda: probe(lm, lm_loss, seq, route="two-pass"),
                },
                plain_seq,
                max(1, args.repeats - 1),
            )
        t.notes.append("dyadic and per-sample routes refuse sequential components (state chain)")
        tables.append(t)
    return tables


def check_tables(args) -> list[Table]:
    """Time the per-sample probe without checks, with the structural check, with both."""
    if probe is None:
        return []
    gen = torch.Generator().manual_seed(2)
    nb = args.batches
    tables = []
    setups = []
    if not args.no_cnn:
        torch.manual_seed(0)
        cnn = small_cnn()
        X = torch.randn(64 * nb, 3, 32, 32, generator=gen)
        Y = torch.randint(0, 10, (64 * nb,), generator=gen)
        setups.append(
            (f"small CNN (545k params), {nb} batches of 64", cnn, F.cross_entropy, X, Y, False)
        )
    if not args.no_lstm:
        torch.manual_seed(0)
        lm = LSTMLM()
        lb = max(1, nb // 2)
        X = torch.randint(0, 10_000, (64 * lb, 35), generator=gen)
        Y = torch.randint(0, 10_000, (64 * lb, 35), generator=gen)
        setups.append(
            (
                f"LSTM LM (4.33M params), {lb} batches of 64 rows × 35 tokens",
                lm,
                lm_loss,
                X,
                Y,
                True,
            )
        )
    for title, model, loss_fn, X, Y, lstm in setups:
        comps = Components.from_tensors(X, Y, batch_size=64)
        params = list(model.parameters())

        def unchecked(model=model, loss_fn=loss_fn, comps=comps):
            with unchecked_for_benchmarks():
                probe(model, loss_fn, comps, route="per-sample", spot_checks=0)

        def structural(model=model, loss_fn=loss_fn, comps=comps):
            probe(model, loss_fn, comps, route="per-sample", spot_checks=0)

        def both(model=model, loss_fn=loss_fn, comps=comps):
            probe(model, loss_fn, comps, route="per-sample")

        methods = {
            "probe per-sample, no checks": unchecked,
            "probe per-sample, structural check only (spot_checks=0)": structural,
            "**probe per-sample, structural + spot checks (default, r = 4)**": both,
        }
        ctx = torch.backends.mkldnn.flags(enabled=False) if lstm else contextlib.nullcontext()
        with ctx:
            t = run_table(
                f"cost of the per-sample checks: {title}",
                methods,
                lambda m=model, f=loss_fn, c=comps, p=params: plain_epoch(m, f, list(c), p),
                args.repeats,
            )
        names = list(methods)
        base = t.rows[names[0]][0]  # per repeat, in repeat order (add() appends per repeat)
        for name in names[1:]:
            ratios = [a / b for a, b in zip(t.rows[name][0], base, strict=True)]
            t.notes.append(
                f"{name.strip('*')}: +{100 * (statistics.median(ratios) - 1):.1f} % over no "
                f"checks (median of per-repeat ratios {', '.join(f'{r:.3f}' for r in ratios)})"
            )
        if lstm:
            t.notes.append("oneDNN off for the whole table (the probe turns it off itself)")
        tables.append(t)
    return tables


def kept_tables(args) -> list[Table]:
    """Issue 13: both per-sample routes end to end, against one plain epoch.

    Three models: the small CNN, the LSTM LM (10k vocabulary) and a batch-first LSTM LM with
    a 3,000-word vocabulary, the one a new user would write. ``route="per-sample-kept"``
    keeps pass 1's factors and runs no second model pass; ``route="per-sample"`` runs
    pass 2 (a JVP for the CNN, the reverse-mode ghost product for the LSTMs). Neither
    route runs forward-mode AD on a recurrent model, so both keep torch's default kernels
    (oneDNN on), as the baseline does: the plain epoch as a user runs it.
    """
    if probe is None:
        return []
    gen = torch.Generator().manual_seed(3)
    nb = args.batches
    lb = max(1, nb // 2)
    setups = []
    if not args.no_cnn:
        torch.manual_seed(0)
        X = torch.randn(64 * nb, 3, 32, 32, generator=gen)
        Y = torch.randint(0, 10, (64 * nb,), generator=gen)
        setups.append(
            (f"small CNN (545k params), {nb} batches of 64", small_cnn(), F.cross_entropy, X, Y)
        )
    if not args.no_lstm:
        for vocab, what in ((10_000, "LSTM LM (4.33M params)"), (3_000, "LSTM LM, vocab 3k")):
            torch.manual_seed(0)
            lm = LSTMLM(vocab=vocab)
            n = sum(p.numel() for p in lm.parameters())
            X = torch.randint(0, vocab, (64 * lb, 35), generator=gen)
            Y = torch.randint(0, vocab, (64 * lb, 35), generator=gen)
            title = f"{what}, batch-first, {n / 1e6:.2f}M params, {lb} batches of 64 rows × 35"
            setups.append((title, lm, lm_loss, X, Y))
    tables = []
    for title, model, loss_fn, X, Y in setups:
        comps = Components.from_tensors(X, Y, batch_size=64)
        params = list(model.parameters())
        batches = list(comps)
        kept = probe(model, loss_fn, comps, batch_sizes=[1])  # auto: what it picks, and why
        factors = kept.info["factors"]
        methods = {
            "**probe(batch_sizes=[1]) → route='per-sample-kept', end to end**": partial(
                probe, model, loss_fn, comps, args.etas, route="per-sample-kept"
            ),
            "probe(route='per-sample'), two passes, end to end": partial(
                probe, model, loss_fn, comps, args.etas, route="per-sample"
            ),
        }
        t = run_table(
            f"issue 13, per-sample routes: {title}",
            methods,
            lambda m=model, f=loss_fn, b=batches, p=params: plain_epoch(m, f, b, p),
            args.repeats,
        )
        t.notes.append(
            f"route='auto' ran {kept.route!r}; kept factors {factors['bytes'] / 2**20:.1f} MiB "
            f"for {len(X)} samples (budget {factors['budget'] / 2**30:.0f} GiB)"
            + (f"; {factors['reason']}" if factors["reason"] else "")
        )
        if args.etas:
            t.notes.append(f"both routes with η = {args.etas} (clipped sums for each)")
        tables.append(t)
    return tables


def preconditioned_tables(args) -> list[Table]:
    """Issue 22: every route with and without ``preconditioner=`` (an AdamW with state).

    Per model, one table: each route's probe without and with the preconditioner,
    interleaved in every repeat (run_table's rotation), against one plain epoch.
    The note under the table is the median over repeats of (with / without) in the
    same repeat: what the dots with ``u = P⁻¹∇f`` add to that route's probe.
    """
    if probe is None:
        return []
    gen = torch.Generator().manual_seed(5)
    nb = args.batches
    lb = max(2, nb // 2)
    setups = []
    if not args.no_cnn:
        torch.manual_seed(0)
        X = torch.randn(64 * nb, 3, 32, 32, generator=gen)
        Y = torch.randint(0, 10, (64 * nb,), generator=gen)
        setups.append((f"small CNN (545k params), {nb} batches of 64", small_cnn(),
                       F.cross_entropy, X, Y))  # fmt: skip
    if not args.no_lstm:
        torch.manual_seed(0)
        lm = LSTMLM(vocab=3_000)
        X = torch.randint(0, 3_000, (64 * lb, 35), generator=gen)
        Y = torch.randint(0, 3_000, (64 * lb, 35), generator=gen)
        n = sum(p.numel() for p in lm.parameters())
        setups.append((f"LSTM LM, batch-first, vocab 3k, {n / 1e6:.2f}M params, {lb} batches "
                       "of 64 rows × 35", lm, lm_loss, X, Y))  # fmt: skip
    tables = []
    for title, model, loss_fn, X, Y in setups:
        comps = Components.from_tensors(X, Y, batch_size=64)
        params = list(model.parameters())
        batches = list(comps)
        opt = torch.optim.AdamW(params, lr=1e-4)
        snapshot = [p.detach().clone() for p in params]
        for x, y in batches[:2]:  # an optimizer state for every parameter
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the probes see the same point as before the steps
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
        levels = max(1, min(4, len(comps).bit_length()))
        routes = {
            "keep": {"route": "keep"},
            "two-pass": {"route": "two-pass"},
            f"dyadic, {levels} sizes": {"route": "dyadic", "levels": levels},
            "per-sample-kept": {"route": "per-sample-kept", "batch_sizes": [1]},
            "per-sample (two passes)": {"route": "per-sample", "batch_sizes": [1]},
        }
        if args.routes:
            routes = {k: v for k, v in routes.items() if v["route"] in args.routes}
        methods = {}
        for name, kw in routes.items():
            for label, extra in (("", {}), (" + P", {"preconditioner": opt})):
                methods[f"{name}{label}"] = partial(
                    probe, model, loss_fn, comps, args.etas, **kw, **extra
                )
        t = run_table(
            f"issue 22, the preconditioned statistics: {title}",
            methods,
            lambda m=model, f=loss_fn, b=batches, p=params: plain_epoch(m, f, b, p),
            args.repeats,
        )
        for name in routes:
            plain, with_p = t.rows[name][0], t.rows[f"{name} + P"][0]
            ratios = [b / a for a, b in zip(plain, with_p, strict=True)]
            t.notes.append(
                f"{name}: with P / without = {statistics.median(ratios):.3f} (median of "
                f"per-repeat ratios {', '.join(f'{r:.3f}' for r in ratios)})"
            )
        t.notes.append(_reading_p_cost(model, params, opt, t))
        if args.etas:
            t.notes.append(f"every probe with η = {args.etas} (clipped sums and their cosines)")
        tables.append(t)
    return tables


def _reading_p_cost(model, params, opt, table) -> str:
    """Time the per-probe fixed cost alone: P from the state, u, the weight decay's record."""
    from clipscope.engine.preconditioner import Preconditioner

    names = [n for n, _ in model.named_parameters()]
    full = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    times = []
    for _ in range(7):
        t0 = CLOCK()
        pre = Preconditioner.from_optimizer(opt, params, names)
        u = pre.direction(full)
        pre.decay(params, full, u)
        times.append(CLOCK() - t0)
    ms = 1e3 * statistics.median(times)
    share = ms / 1e3 / statistics.median(table.base_time)
    return (
        f"reading P from the AdamW state, u = P⁻¹∇f and the decay record, alone: {ms:.1f} ms "
        f"= {share:.3f} E per probe (per level on the dyadic route)"
    )


def fixed_costs(args) -> None:
    """Print the probe's fixed costs beside one component's forward+backward (issue 13).

    Per probe: the model guard's snapshot and restore (one copy of parameters,
    gradients and buffers). Per component: one float64 accumulation of a length-n
    gradient (``Σ g_i`` in pass 1; each η's clipped sum and the dyadic parents add one
    more each). Medians of ``--repeats`` timings, milliseconds.
    """
    from clipscope.engine.guard import model_guard

    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    rows = [
        (
            "small CNN",
            small_cnn(),
            F.cross_entropy,
            torch.randn(64, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (64,), generator=gen),
        ),
        (
            "LSTM LM",
            LSTMLM(),
            lm_loss,
            torch.randint(0, 10_000, (64, 35), generator=gen),
            torch.randint(0, 10_000, (64, 35), generator=gen),
        ),
    ]
    print("\n### the probe's fixed costs (median ms; one component = one batch of 64)")
    print("| model | n | component fwd+bwd | guard snapshot+restore | float64 Σ += g (one) |")
    print("|---|---|---|---|---|")
    reps = max(3, args.repeats)
    for name, model, loss_fn, x, y in rows:
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        acc = torch.zeros(n, dtype=torch.float64)

        def step(model=model, loss_fn=loss_fn, x=x, y=y, params=params):
            return torch.autograd.grad(loss_fn(model(x), y), params)

        def guard(model=model):
            with model_guard(model):
                pass

        grads = step()

        def axpy(acc=acc, grads=grads):
            acc += torch.cat([g.reshape(-1) for g in grads]).double()

        times = {}
        for label, fn in (("step", step), ("guard", guard), ("axpy", axpy)):
            fn()
            ts = []
            for _ in range(reps):
                t0 = CLOCK()
                fn()
                ts.append(CLOCK() - t0)
            times[label] = 1e3 * statistics.median(ts)
        print(
            f"| {name} | {n / 1e6:.2f}M | {times['step']:.1f} | {times['guard']:.1f} "
            f"({times['guard'] / times['step']:.3f} of a component) | {times['axpy']:.2f} "
            f"({times['axpy'] / times['step']:.3f}) |"
        )
    print(
        "- per probe: guard once, so its share of E is (guard / component) / m; per component:"
        " keep and two-pass add 1 + |η| axpys, dyadic about 2 per level"
    )


def many(args) -> None:
    """Per-sample norms and dots for 50,000 components, streaming over batches."""
    n, b, feats = args.many_n, 500, 784
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(feats, 256), nn.ReLU(), nn.Linear(256, 10))
    params = list(model.parameters())
    n_par = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)

    def batches():  # generated on the fly: the data set itself is never held
        g = torch.Generator().manual_seed(0)
        for s in range(0, n, b):
            k = min(b, n - s)
            yield torch.randn(k, feats, generator=g), torch.randint(0, 10, (k,), generator=g)

    del gen
    rss0 = rss()
    t0 = time.perf_counter()
    sq = torch.empty(n, dtype=torch.float64)
    dots = torch.empty(n, dtype=torch.float64)
    full = [torch.zeros_like(p) for p in params]
    s = 0
    for x, y in batches():
        out = ghost_pass(model, F.cross_entropy, x, y, params)
        sq[s : s + len(x)] = out.sq_norms
        for a, g in zip(full, out.grad_sum, strict=True):
            a += g / n
        s += len(x)
    s = 0
    for x, y in batches():
        dots[s : s + len(x)] = per_sample_dots(model, F.cross_entropy, x, y, full, params)
        s += len(x)
    wall = time.perf_counter() - t0
    gnorm = float(torch.sqrt(sum(f.double().square().sum() for f in full)))
    cos = dots / (sq.sqrt() * gnorm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\n### --many: {n:,} per-sample components (MLP 784-256-10, {n_par:,} params)")
    print(f"- wall time {wall:.1f} s for both passes (batches of {b}, data generated on the fly)")
    print(f"- RSS before {rss0 / 2**20:.0f} MiB, peak RSS (ru_maxrss) {peak / 2**20:.0f} MiB")
    print(
        f"- stored per-sample gradients would need {n * n_par * 4 / 2**30:.1f} GiB (float32); "
        f"the results are 2 × {n:,} float64 = {2 * n * 8 / 2**20:.1f} MiB"
    )
    print(
        f"- mean cosine to ∇f {float(cos.mean()):.4f}, share of negative cosines "
        f"{float((cos < 0).double().mean()):.3f}, ‖∇f‖ = {gnorm:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small epochs, 3 repeats")
    ap.add_argument("--many", action="store_true", help="only the 50,000-component run")
    ap.add_argument("--many-n", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None, help="batches of 64 per epoch")
    ap.add_argument("--no-lstm", action="store_true", help="skip the LSTM LM tables")
    ap.add_argument("--no-cnn", action="store_true", help="skip the per-sample CNN table")
    ap.add_argument(
        "--only",
        choices=("per-sample", "routes", "checks", "kept", "fixed", "preconditioned"),
        default=None,
        help="one group of tables: kept and fixed are issue 13's, preconditioned issue 22's",
    )
    ap.add_argument(
        "--no-naive", action="store_true", help="routes: skip the naive two-pass per size"
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time by the wall clock (default) or by this process's CPU time",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    ap.add_argument(
        "--routes",
        type=lambda s: s.split(","),
        default=None,
        help="--only preconditioned: these routes only (comma list, e.g. dyadic,keep)",
    )
    ap.add_argument(
        "--etas",
        type=lambda text: [float(v) for v in text.split(",") if v],
        default=[],
        help="clipping thresholds η for --only kept / preconditioned, comma-separated",
    )
    ap.add_argument(
        "--no-memory",
        action="store_true",
        help="time only: no RSS sampling thread, glibc's default mmap threshold",
    )
    args = ap.parse_args(argv)
    if args.many:
        many(args)
        return 0
    global CLOCK, MEMORY
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    MEMORY = not args.no_memory
    if MEMORY and _LIBC is not None:
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big frees return to the OS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.batches = args.batches or (4 if args.quick else 16)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"command: {' '.join(sys.argv)}"
    )
    print("ratios: median over interleaved repeats of (method / plain epoch in that repeat)")
    print(f"clock: {'process CPU time' if args.clock == 'cpu' else 'wall clock'}")
    print(
        "memory: sampled peak RSS increment (see the module docstring); the times of this "
        "run include the pinned mmap threshold's page faults: time ratios from --no-memory"
        if MEMORY
        else "memory: not measured (--no-memory)"
    )
    tables: list[Table] = []
    if args.only in (None, "per-sample"):
        tables += per_sample_tables(args)
    if args.only in (None, "routes"):
        if probe is None:
            print("clipscope.probe is not importable yet: route tables skipped")
        tables += route_tables(args)
    if args.only in (None, "checks"):
        tables += check_tables(args)
    if args.only in (None, "kept"):
        tables += kept_tables(args)
    if args.only in (None, "fixed"):
        fixed_costs(args)
    if args.only in (None, "preconditioned"):
        tables += preconditioned_tables(args)
    for t in tables:
        print(t.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
