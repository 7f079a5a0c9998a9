"""The nn.LSTM rule's gate gradients (hand-written BPTT) against autograd through the cell.

``LSTMFamily._tokens`` forms ``δ_t = ∂(Σ_k ⟨o^k, b^k⟩)/∂(gate pre-activations)``
without an autograd graph, with the last layer's states taken from the call's
own output. The reference here unrolls the cell equations with autograd and
differentiates w.r.t. each step's pre-activations, in float64, over random
shapes, layer counts, layouts, initial states and which outputs reach the loss.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clipscope.engine.per_sample.family import Call, Unsupported
from clipscope.engine.per_sample.rnn import LSTMFamily


def _reference(mod: nn.LSTM, x, hx, grads):
    """Per layer ``(input, h_{t-1}, δ)`` by autograd through an unrolled cell (batch-first)."""
    x = x if mod.batch_first else x.transpose(0, 1)
    B, T = x.shape[:2]
    L, H = mod.num_layers, mod.hidden_size
    h0 = c0 = x.new_zeros(L, B, H)
    if hx is not None:
        h0, c0 = hx
    layers, gates, hn, cn = [], [], [], []
    inp = x
    for layer in range(L):
        w_ih, w_hh = getattr(mod, f"weight_ih_l{layer}"), getattr(mod, f"weight_hh_l{layer}")
        bias = 0
        if mod.bias:
            bias = getattr(mod, f"bias_ih_l{layer}") + getattr(mod, f"bias_hh_l{layer}")
        h, c, hs, prev, pre = h0[layer], c0[layer], [], [], []
        for t in range(T):
            prev.append(h)
            g = inp[:, t] @ w_ih.t() + h @ w_hh.t() + bias  # in the graph (weights need grad)
            pre.append(g)
            i, f, gg, o = g.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
        layers.append((inp.detach(), torch.stack(prev, 1).detach()))
        gates.append(pre)
        hn.append(h)
        cn.append(c)
        inp = torch.stack(hs, 1)
    out = inp if mod.batch_first else inp.transpose(0, 1)
    total = sum(
        (o * g).sum()
        for o, g in zip((out, torch.stack(hn), torch.stack(cn)), grads, strict=True)
        if g is not None
    )
    flat = [g for gl in gates for g in gl]
    deltas = torch.autograd.grad(total, flat, allow_unused=True)
    deltas = [torch.zeros_like(g) if d is None else d for g, d in zip(flat, deltas, strict=True)]
    return [
        (a, hp, torch.stack(deltas[layer * T : (layer + 1) * T], 1))
        for layer, (a, hp) in enumerate(layers)
    ]


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 6),
    F=st.integers(1, 4),
    H=st.integers(1, 4),
    L=st.integers(1, 3),
    batch_first=st.booleans(),
    bias=st.booleans(),
    with_hx=st.booleans(),
    which=st.sampled_from(["out", "hn", "cn", "out+hn", "all"]),
    seed=st.integers(0, 2**16),
)
def test_hand_written_bptt_equals_autograd(B, T, F, H, L, batch_first, bias, with_hx, which, seed):
    torch.manual_seed(seed)
    mod = nn.LSTM(F, H, num_layers=L, batch_first=batch_first, bias=bias).double()
    x = torch.randn(B, T, F, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    hx = None
    if with_hx:
        hx = (torch.randn(L, B, H, dtype=torch.float64), torch.randn(L, B, H, dtype=torch.float64))
    with torch.no_grad():
        out, (hn, cn) = mod(x, hx)
    wanted = {"out": (1, 0, 0), "hn": (0, 1, 0), "cn": (0, 0, 1), "out+hn": (1, 1, 0)}
    mask = wanted.get(which, (1, 1, 1))
    grads = [torch.randn_like(t) if m else None for t, m in zip((out, hn, cn), mask, strict=True)]
    call = Call(inputs=(x,), grads=grads, extra={"hx": hx, "out": out})
    got = LSTMFamily()._tokens(mod, call)
    ref = _reference(mod, x, hx, grads)
    for (a, hp, d), (ra, rhp, rd) in zip(got, ref, strict=True):
        torch.testing.assert_close(a, ra, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hp, rhp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d, rd, rtol=1e-10, atol=1e-12)


def test_an_output_the_cell_equations_do_not_reproduce_is_refused():
    torch.manual_seed(0)
    mod = nn.LSTM(3, 2, batch_first=True).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        out, _ = mod(x)
    changed = out + 0.1  # e.g. an output modified after the call
    call = Call(
        inputs=(x,), grads=[torch.ones_like(out), None, None], extra={"hx": None, "out": changed}
    )
    with pytest.raises(Unsupported, match="do not reproduce the batch call's output"):
        LSTMFamily()._tokens(mod, call)
