"""Per-sample probes of Transformers: time and peak memory as ratios to one plain epoch (issue 21).

Three models a user clips today, random-initialised from configs, N samples of
per-sample components (``batch_sizes=[1]``), the given components of 64
samples used as chunks:

* ``gpt2``: Hugging Face ``GPT2LMHeadModel`` from a small ``GPT2Config``
  (4 layers, width 128, 4 heads, vocabulary 5,000, tied head; 1.5M parameters),
  64 tokens per sample, token-mean cross-entropy;
* ``encoder``: an ``nn.TransformerEncoder`` language model (token embedding,
  a learned position table as an ``nn.Parameter``, 2 causal layers of width
  128, ``nn.MultiheadAttention``, an untied head), 64 tokens per sample;
* ``vit``: Hugging Face ``ViTForImageClassification`` (32×32 images, patches
  of 4, 4 layers, width 128: class token and position table as parameters).

Methods, interleaved in every repeat with the baseline (one plain
forward+backward epoch over the same chunks, ``torch.autograd.grad`` of each
chunk's mean loss), each ratio the median over repeats of method / baseline:

* ``probe(route="per-sample-kept")`` and ``probe(route="per-sample")``, end to
  end (norms, dots with ∇f, ‖∇f‖, clipped sums for η = 1, the checks);
* Opacus ghost clipping (``GradSampleModuleFastGradientClipping``, per-sample
  norms only, one backward per chunk) where Opacus runs on the model (its
  ``ModuleValidator`` first; ``nn.MultiheadAttention`` replaced by its
  ``DPMultiheadAttention``, the same weights);
* ``torch.func`` ``vmap(grad)`` per-sample gradients, then norms and dots with
  a given ∇f (a lower bound of its end-to-end cost).

Then the exactness of the probe on the first 32 samples: norms, dots, ‖∇f‖,
clipped sums and losses of the float32 model against the float64 brute force
(``reference_probe`` of a float64 copy, each sample by its own autograd call),
as the largest relative error, and the parameters on the exact fallback.

Usage::

    python bench/transformer_probe.py                   # N = 256, 3 repeats
    python bench/transformer_probe.py --quick           # N = 128, 2 repeats
    python bench/transformer_probe.py --models gpt2 --clock cpu --threads 1
    python bench/transformer_probe.py --device cuda     # on a GPU (names it)

Time and memory come from separate runs: with memory measured (the default)
the times include the page faults of the pinned mmap threshold and the
sampling thread (``bench/engine.py``'s module docstring), so the time ratios are
taken from a ``--no-memory`` run and the memory ratios from a default one.

``--phases`` prints, instead of the tables, where the per-sample route's time
goes on each model: the steps of :mod:`clipscope.engine.per_sample_route`
(pass 1, the dot step, the spot step, the clipped-sum step) and, inside the
ghost pass (pass 1 of the kept route, pass 2 of the two-pass route), the hooked
forward and backward, the layer rules' norms (the per-sample matrices, the
ghost Gram products) and the structural check's projections,
each as a share of the plain epoch timed in the same repeat (medians). It
wraps private functions of the engine for the timing; a profiling aid only.

Opacus is optional (``pip install -c constraints.txt opacus``); without it its
rows say so. Never a test.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import warnings
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine as harness  # the Table / run_table / measure of bench/engine.py
from clipscope.components import Components
from clipscope.engine import probe, reference_probe

ETAS = [1.0]


# ----------------------------------------------------------------------------- models


def token_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the batch's token-mean cross-entropy (logits ``(B, T, V)``, targets ``(B, T)``)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class Logits(nn.Module):
    """A Hugging Face model whose call returns its ``.logits`` (the samples on dim 0)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):  # noqa: D102
        return self.model(x).logits


class EncoderLM(nn.Module):
    """Token embedding + learned positions + causal ``nn.TransformerEncoder`` + head."""

    def __init__(self, vocab=5000, d=128, heads=4, layers=2, context=64, positions=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        if positions:
            self.pos = nn.Parameter(0.02 * torch.randn(1, context, d))
        else:  # fixed sinusoids (a buffer): what Opacus can run
            t = torch.arange(context).unsqueeze(1)
            freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2) / d)
            table = torch.zeros(1, context, d)
            table[0, :, 0::2], table[0, :, 1::2] = torch.sin(t * freq), torch.cos(t * freq)
            self.register_buffer("pos", table)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, ids):  # noqa: D102
        T = ids.shape[1]
        h = self.emb(ids) + self.pos[:, :T]
        return self.head(self.encoder(h, mask=self.mask[:T, :T], is_causal=True))


def build(name: str, n: int, gen: torch.Generator):
    """``(model, loss_fn, X, Y, what)`` for one of the three models."""
    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=5000, n_positions=128, n_embd=128, n_layer=4, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model = Logits(GPT2LMHeadModel(cfg)).eval()
        X = torch.randint(0, 5000, (n, 64), generator=gen)
        Y = torch.randint(0, 5000, (n, 64), generator=gen)
        return model, token_loss, X, Y, "HF GPT2LMHeadModel, 64 tokens per sample"
    if name == "encoder":
        model = EncoderLM().eval()
        X = torch.randint(0, 5000, (n, 64), generator=gen)
        Y = torch.randint(0, 5000, (n, 64), generator=gen)
        return model, token_loss, X, Y, "nn.TransformerEncoder LM, 64 tokens per sample"
    if name == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            image_size=32, patch_size=4, num_channels=3, hidden_size=128, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=512, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        model = Logits(ViTForImageClassification(cfg)).eval()
        X = torch.randn(n, 3, 32, 32, generator=gen)
        Y = torch.randint(0, 10, (n,), generator=gen)
        return model, F.cross_entropy, X, Y, "HF ViTForImageClassification, 32×32, patches of 4"
    raise ValueError(name)


# ----------------------------------------------------------------------------- peers


def opacus_norms(model: nn.Module, loss_fn, batches) -> None:
    """Opacus ghost clipping: per-sample norms of each chunk (one backward each)."""
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        model.get_norm_sample()


def opacus_model(name: str, model: nn.Module, loss_fn, batch, device):
    """Opacus' ghost-clipping module for ``model``, or ``(None, why not)``.

    Tried on ``batch`` first: Opacus raises only in the backward for some models
    (GPT-2's tied head: "Parameter tying is not supported with Ghost Clipping").
    """
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.validators import ModuleValidator
    except ImportError:
        return None, "Opacus is not installed (pip install -c constraints.txt opacus)"
    twin = EncoderLM(positions=False).eval() if name == "encoder" else copy.deepcopy(model)
    if name == "encoder":  # Opacus has no rule for a bare position table: sinusoids instead
        twin.load_state_dict(model.state_dict(), strict=False)
    try:
        twin = ModuleValidator.fix(twin.train())
        errors = ModuleValidator.validate(twin, strict=False)
        if errors:
            return None, f"Opacus refuses the model: {errors[0]}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModuleFastGradientClipping(
                twin, batch_first=True, loss_reduction="mean", use_ghost_clipping=True
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opacus_norms(gsm.to(device), loss_fn, [batch])
    except Exception as exc:
        return None, f"Opacus does not run on it: {type(exc).__name__}: {str(exc)[:120]}"
    note = "Opacus on the same model" + (
        " with fixed sinusoidal positions (no rule for a bare position table) and "
        "DPMultiheadAttention"
        if name == "encoder"
        else ""
    )
    return gsm, note


# ----------------------------------------------------------------------------- exactness


def exactness(model, loss_fn, X, Y, n_check: int = 32) -> dict:
    """Largest relative errors of the float32 probe against the float64 brute force."""
    X, Y = X[:n_check], Y[:n_check]
    comps = Components.from_tensors(X, Y, batch_size=16)
    out = {}
    twin = copy.deepcopy(model).double()
    Xd = X.double() if X.is_floating_point() else X
    ref = reference_probe(twin, loss_fn, Components.from_tensors(Xd, Y, batch_size=1), ETAS)
    for route in ("per-sample-kept", "per-sample"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = probe(model, loss_fn, comps, ETAS, route=route)
        scale = ref.norms.max() * ref.grad_norm
        clip = max(abs(res.clipped[e][0] - ref.clipped[e][0]) / ref.clipped[e][0] for e in ETAS)
        out[route] = {
            "norms": float(np.max(np.abs(res.norms - ref.norms) / ref.norms)),
            "dots": float(np.max(np.abs(res.dots - ref.dots)) / scale),
            "grad_norm": abs(res.grad_norm - ref.grad_norm) / ref.grad_norm,
            "clipped": float(clip),
            "losses": float(np.max(np.abs(res.losses - ref.losses) / np.abs(ref.losses))),
            "fallback": sorted(res.verification["fallback"]),
            "route": res.route,
        }
    return out


# ----------------------------------------------------------------------------- phases


def _timed(owner, attr: str, label: str, acc: dict, undo: list) -> None:
    """Wrap ``owner.attr`` so that its process time adds to ``acc[label]``."""
    f = getattr(owner, attr)

    def timed(*a, **k):
        t = harness.CLOCK()
        try:
            return f(*a, **k)
        finally:
            acc[label] = acc.get(label, 0.0) + harness.CLOCK() - t

    setattr(owner, attr, timed)
    undo.append((owner, attr, f))


def phases(args) -> None:
    """Print each route step's time / E per model (``--phases``: the module docstring)."""
    from clipscope.engine import per_sample_route as route_mod
    from clipscope.engine.per_sample import _common, factors, ghost, linear

    steps = [
        (route_mod._Attempt, "pass1_chunk", "pass 1"),
        (route_mod._Attempt, "light_factors", "pass 2: factors formed again (two passes)"),
        (ghost, "_forward_backward", "ghost pass: hooked forward and backward"),
        (linear, "per_sample_matrices", "ghost pass: per-sample matrices (T(P+Q) > PQ)"),
        (factors, "gram_sq_norm", "ghost pass: ghost Gram norms"),
        (_common.Directions, "of_factors", "ghost pass: structural check (factors)"),
        (_common.Directions, "of_rows", "ghost pass: structural check (rows)"),
        (route_mod._Attempt, "dots_step", "pass 2: dot step"),
        (route_mod._Attempt, "spot_step", "pass 2: spot step"),
        (route_mod._Attempt, "clipped_step", "pass 2: clipped-sum step"),
    ]
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        model, loss_fn, X, Y, what = build(name, args.n, gen)
        model, X, Y = model.to(args.device), X.to(args.device), Y.to(args.device)
        comps = Components.from_tensors(X, Y, batch_size=64)
        batches = list(comps)
        params = [p for p in model.parameters() if p.requires_grad]
        for route in ("per-sample-kept", "per-sample"):
            ratios: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                t = harness.CLOCK()
                harness.plain_epoch(model, loss_fn, batches, params)
                e = harness.CLOCK() - t
                acc: dict[str, float] = {}
                undo: list = []
                for owner, attr, label in steps:
                    _timed(owner, attr, label, acc, undo)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t = harness.CLOCK()
                        probe(model, loss_fn, comps, ETAS, route=route)
                        acc["the whole probe"] = harness.CLOCK() - t
                finally:
                    for owner, attr, f in reversed(undo):
                        setattr(owner, attr, f)
                for label, v in acc.items():
                    ratios.setdefault(label, []).append(v / e)
            print(f"\n{what}, route={route!r}, N = {args.n}, chunks of 64 (time / E, medians):")
            for label in ["the whole probe"] + [s[2] for s in steps]:
                if label in ratios:
                    print(f"  {label:48s} {float(np.median(ratios[label])):.3f}")


# ----------------------------------------------------------------------------- main


def tables(args) -> list:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in args.models:
        model, loss_fn, X, Y, what = build(name, args.n, gen)
        model = model.to(args.device)
        X, Y = X.to(args.device), Y.to(args.device)
        comps = Components.from_tensors(X, Y, batch_size=64)
        batches = list(comps)
        params = [p for p in model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        v = [torch.randn_like(p) for p in params]
        methods = {
            "**probe(batch_sizes=[1]) → per-sample-kept**": partial(
                probe, model, loss_fn, comps, ETAS, route="per-sample-kept"
            ),
            "probe(route='per-sample'), two passes": partial(
                probe, model, loss_fn, comps, ETAS, route="per-sample"
            ),
            "torch.func vmap(grad) + norms + dots (given ∇f)": partial(
                harness.vmap_norms_dots, model, loss_fn, batches, params, v
            ),
        }
        gsm, note = opacus_model(name, model, loss_fn, batches[0], args.device)
        if gsm is not None:
            methods["Opacus ghost clipping, norms only"] = partial(
                opacus_norms, gsm.to(args.device), loss_fn, batches
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = harness.run_table(
                f"per-sample probe, {what}: {n_params / 1e6:.2f}M params, N = {args.n}, "
                f"chunks of 64, on {args.device_name}",
                methods,
                partial(harness.plain_epoch, model, loss_fn, batches, params),
                args.repeats,
            )
        t.notes.append(note)
        if args.check:
            for route, e in exactness(model, loss_fn, X, Y).items():
                t.notes.append(
                    f"exactness ({route} ran {e['route']!r}, 32 samples, float32 vs the float64 "
                    f"brute force): norms {e['norms']:.1e}, dots {e['dots']:.1e}, ‖∇f‖ "
                    f"{e['grad_norm']:.1e}, clipped sum {e['clipped']:.1e}, losses "
                    f"{e['losses']:.1e}; fallback {e['fallback'] or 'none'}"
                )
        out.append(t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=lambda s: s.split(","), default=["gpt2", "encoder", "vit"])
    ap.add_argument("--n", type=int, default=None, help="samples (default 256, --quick 128)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip exactness")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--phases", action="store_true", help="time each step of the route")
    args = ap.parse_args(argv)
    args.n = args.n or (128 if args.quick else 256)
    args.repeats = args.repeats or (2 if args.quick else 3)
    harness.CLOCK = harness.time.process_time if args.clock == "cpu" else harness.time.perf_counter
    harness.MEMORY = not (args.no_memory or args.phases) and args.device == "cpu"
    if harness.MEMORY and harness._LIBC is not None:
        harness._LIBC.mallopt(-3, 128 * 1024)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device_name}, "
        f"clock {args.clock}, command: {' '.join(sys.argv)}"
    )
    if harness.MEMORY:
        print(
            "memory measured: the times below include the pinned mmap threshold's page faults "
            "and the sampling thread; take time ratios from a --no-memory run"
        )
    if args.phases:
        phases(args)
        return 0
    for t in tables(args):
        print(t.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
