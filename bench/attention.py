"""Per-sample probe on Transformers, before and after the attention rules (issue 21, item 2).

Two models, per-sample components (``probe(..., batch_sizes=[1])``), as ratios to
one plain forward+backward epoch over the same components, interleaved in one
run (``bench/engine.py``'s ``run_table``: the baseline first in every repeat, the
methods' order rotated, the median of the per-repeat ratios):

* a ``nn.TransformerEncoder`` LM: embedding, 2 causal ``TransformerEncoderLayer``
  (``batch_first``, ``norm_first``), a fixed sinusoidal position buffer, an untied
  head; every parameter has a rule now;
* a tiny Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (eval mode), its
  projections ``Conv1D``; the tied ``wte``/``lm_head`` and the position table
  ``wpe`` (output without a sample axis) stay on the fallback (other rules of
  issue 21).

"before" is the engine without this item's rules: ``nn.MultiheadAttention`` and
``Conv1D`` unregistered (the attention's children still excluded, as before), so
their parameters take the exact fallback; "after" is the registry as shipped.
Both per-sample routes: ``"auto"`` (``per-sample-kept``) and the two-pass
``"per-sample"``. Never a test.

Usage::

    python bench/attention.py                  # N = 256 samples, 3 repeats
    python bench/attention.py --samples 128 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

import engine as bench  # bench/engine.py (the script's folder is on sys.path): run_table, ...
from clipscope.components import Components
from clipscope.engine import probe
from clipscope.engine.per_sample import registry
from clipscope.engine.per_sample.attention import MultiheadAttentionFamily
from clipscope.engine.verify import PerSampleFallbackWarning


class EncoderLM(nn.Module):
    """Token ids ``(B, T)`` -> embedding + sinusoidal positions -> causal encoder -> logits."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        pos = torch.arange(context).unsqueeze(1)
        freq = torch.exp(torch.arange(0, d, 2) * (-math.log(10_000.0) / d))
        table = torch.zeros(context, d)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("positions", table)

    def forward(self, ids):  # noqa: D102
        T = ids.shape[1]
        h = self.emb(ids) + self.positions[:T]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)
        return self.head(self.norm(self.encoder(h, mask=causal, is_causal=True)))


class Logits(nn.Module):
    """A Hugging Face causal LM as ``model(ids) -> logits (B, T, V)``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):  # noqa: D102
        return self.lm(ids).logits


def gpt2(vocab: int, d: int, heads: int, layers: int, context: int) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=context, n_embd=d, n_layer=layers, n_head=heads
    )
    return Logits(transformers.GPT2LMHeadModel(config)).eval()


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class _ExclusionOnly(MultiheadAttentionFamily):
    """The engine before this item: no attention rule, its children still excluded."""

    name = "attention-exclusion-only"

    def claims(self, mod):
        return False


def _quiet(fn):
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerSampleFallbackWarning)
            return fn()

    return run


def _before(fn):
    def run():
        with registry.scoped():
            registry.unregister("multihead-attention")
            registry.unregister("hf-conv1d")
            registry.register(_ExclusionOnly())
            return fn()

    return run


def table_for(title, model, X, Y, chunk, repeats):
    comps = Components.from_tensors(X, Y, batch_size=chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = list(comps)
    methods = {}
    for when, wrap in (("after", lambda f: f), ("before", _before)):
        for route in ("auto", "per-sample"):
            call = partial(probe, model, lm_loss, comps, route=route, batch_sizes=[1])
            methods[f"{when}: probe(batch_sizes=[1], route={route!r})"] = _quiet(wrap(call))
    t = bench.run_table(
        title, methods, lambda: bench.plain_epoch(model, lm_loss, batches, params), repeats
    )
    for when, wrap in (("after", lambda f: f), ("before", _before)):
        res = _quiet(wrap(partial(probe, model, lm_loss, comps, batch_sizes=[1])))()
        fb = res.verification["fallback"]
        t.notes.append(
            f"{when}: route {res.route!r}, {len(fb)} parameter(s) on the fallback"
            + (f" ({', '.join(fb)})" if fb and len(fb) <= 6 else "")
        )
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64, help="samples per chunk (components)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-gpt2", action="store_true")
    ap.add_argument("--no-encoder", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench.MEMORY = True
    if bench._LIBC is not None:
        bench._LIBC.mallopt(-3, 128 * 1024)
    bench.CLOCK = time.perf_counter
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"command: {' '.join(sys.argv)}"
    )
    gen = torch.Generator().manual_seed(0)
    vocab, T, N = 1000, args.tokens, args.samples
    X = torch.randint(0, vocab, (N, T), generator=gen)
    Y = torch.randint(0, vocab, (N, T), generator=gen)
    tables = []
    if not args.no_encoder:
        torch.manual_seed(0)
        model = EncoderLM(vocab, 128, 4, 2, T)
        n = sum(p.numel() for p in model.parameters())
        title = (
            f"nn.TransformerEncoder LM (2 layers, d 128, 4 heads, {n / 1e6:.2f}M params), "
            f"{N} samples × {T} tokens, chunks of {args.chunk}"
        )
        tables.append(table_for(title, model, X, Y, args.chunk, args.repeats))
    if not args.no_gpt2:
        torch.manual_seed(0)
        model = gpt2(vocab, 128, 4, 2, T)
        n = sum(p.numel() for p in model.parameters())
        title = (
            f"Hugging Face GPT2LMHeadModel (2 layers, d 128, 4 heads, {n / 1e6:.2f}M params), "
            f"{N} samples × {T} tokens, chunks of {args.chunk}"
        )
        tables.append(table_for(title, model, X, Y, args.chunk, args.repeats))
    for t in tables:
        print(t.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
