r"""Recurrent layers: a ghost rule for ``nn.LSTM``, a module-local loop for the rest.

**nn.LSTM** (unidirectional, no projection, any number of layers): the gate
gradients ``δ_t``, the derivatives of ``Σ_k ⟨o^k, b^k⟩`` over the call's
outputs (sequence, ``h_n``, ``c_n``) w.r.t. the gate pre-activations (gate
order i, f, g, o as in ``nn.LSTM``), come from the cell equations at the
recorded input and initial state and a backpropagation through time written
out (no autograd graph). The last layer's states ``h_t`` are the call's own
output, so its pre-activations are one batched product; the lower layers run
step by step. Then, per layer,

.. math:: g_j(W_{ih}) = \sum_t δ_{jt} x_{jt}^\top,\quad
          g_j(W_{hh}) = \sum_t δ_{jt} h_{j,t-1}^\top,\quad
          g_j(b_{ih}) = g_j(b_{hh}) = \sum_t δ_{jt},

and the sequence-Linear formulas apply. Precondition: no active inter-layer
dropout (train mode with ``dropout > 0``), which the unroll does not apply.

**Module-local loop** (GRU, RNN, bidirectional LSTM, ``proj_size``, LSTM
subclasses with their own forward such as clipscope's ``WeightDropLSTM``, and
an LSTM with active dropout): the recurrent module alone runs again on each
sample j with its recorded input and initial state, and
``g_j = ∂/∂θ Σ_k ⟨o^k_j(θ), b^k_j⟩`` (a loop: the fused kernels have no
``vmap`` rule), so the rest of the model is not re-run per sample. A module
that draws random numbers in training mode (DropConnect) is re-run from the
RNG state recorded just before its batch call, so a mask drawn on the weights
is the batch's mask. Every re-run must reproduce the batch call's outputs for
that sample (to the dtype's tolerance); if it does not (masks drawn per
sample, a packed sequence, a module that mixes samples), the rule refuses
and the module's parameters fall back, visibly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipscope.engine.guard import dropout_modules
from clipscope.engine.per_sample._common import (
    Directions,
    cat_tokens,
    rng_replay,
    rng_snapshot,
    sq_sum,
    up,
)
from clipscope.engine.per_sample.factors import Joined, Rows, Tokens, Zero
from clipscope.engine.per_sample.family import Call, LayerFamily, ParamGhost, Unsupported, zeros
from clipscope.engine.per_sample.registry import register_module_rule
from clipscope.engine.verify import tolerance

__all__ = ["LSTMFamily", "RNNLoopFamily"]


def _record_rnn(mod: nn.RNNBase, args: tuple, output: Any, batch: int) -> tuple[Call, list]:
    inp = args[0] if args else None
    bd = 0 if mod.batch_first else 1
    if not isinstance(inp, torch.Tensor) or inp.dim() != 3 or inp.shape[bd] != batch:
        shape = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
        return Call(
            problem=f"{type(mod).__name__} got input {shape}: per-sample rules need a batched "
            f"(not packed) input with the samples along dim {bd}"
        ), []
    hx = args[1] if len(args) > 1 else None
    hx = (hx,) if isinstance(hx, torch.Tensor) else hx
    out, state = output
    state = (state,) if isinstance(state, torch.Tensor) else tuple(state)
    tensors = (out, *state)
    call = Call(
        inputs=(inp.detach(),),
        grads=[None] * len(tensors),
        extra={"hx": None if hx is None else tuple(h.detach() for h in hx)},
    )
    return call, list(tensors)


def _activate(pre: torch.Tensor) -> torch.Tensor:
    """Gate activations in place of the pre-activations ``i|f|g|o`` (last dim ``4H``)."""
    H = pre.shape[-1] // 4
    pre[..., : 2 * H].sigmoid_()
    pre[..., 2 * H : 3 * H].tanh_()
    pre[..., 3 * H :].sigmoid_()
    return pre


def _cell_scan(act: torch.Tensor, c0: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t`` over t: ``(c_{t-1}, c_t)``, each ``(B, T, H)``."""
    B, T = act.shape[0], act.shape[1]
    ig = act[..., :H] * act[..., 2 * H : 3 * H]
    f = act[..., H : 2 * H]
    cs = torch.empty(B, T, H, dtype=act.dtype, device=act.device)
    c = c0
    for t in range(T):
        c = torch.addcmul(ig[:, t], f[:, t], c, out=cs[:, t])
    c_prev = torch.cat([c0.unsqueeze(1), cs[:, :-1]], 1)
    return c_prev, cs


def _used(calls: list[Call]) -> list[Call]:
    return [c for c in calls if any(g is not None for g in c.grads)]


@register_module_rule(nn.LSTM)
class LSTMFamily(LayerFamily):
    """``nn.LSTM``: unidirectional, no projection; gate-gradient ghost norms."""

    name = "lstm"

    def claims(self, mod):
        """``nn.LSTM``'s own forward, unidirectional, ``proj_size == 0``."""
        return super().claims(mod) and not mod.bidirectional and mod.proj_size == 0

    def param_names(self, mod):
        """Every ``weight_*`` and ``bias_*`` of every layer."""
        return tuple(mod._flat_weights_names)

    def precondition(self, mod):
        """No inter-layer dropout in train mode (the unroll would not apply it)."""
        if mod.training and mod.dropout > 0 and mod.num_layers > 1:
            return "inter-layer dropout is active (train mode)"
        return None

    def record(self, mod, args, output, batch, before=None):
        """Input, initial state, output sequence, and the gradients of ``(output, h_n, c_n)``."""
        call, outs = _record_rnn(mod, args, output, batch)
        if call.problem is None:
            call.extra["out"] = outs[0].detach()
        return call, outs

    def _tokens(self, mod: nn.LSTM, call: Call) -> list[tuple]:
        """Per layer: inputs ``x_t``, previous states ``h_{t-1}`` and gate gradients ``δ_t``.

        A forward through the cell equations records each step's gate
        activations, then backpropagation through time by hand (no autograd
        graph) gives ``δ_t``. The last layer's states are the batch call's own
        output, so its gate pre-activations are one batched product and only the
        cell state runs step by step; the recomputed ``h_t = o_t ⊙ tanh(c_t)``
        must reproduce that output (to the dtype's tolerance), else the rule
        refuses (:class:`Unsupported`) and the parameters fall back, visibly.
        """
        x = up(call.inputs[0])
        x = x if mod.batch_first else x.transpose(0, 1)
        B, T = x.shape[0], x.shape[1]
        L, H = mod.num_layers, mod.hidden_size
        hx = call.extra["hx"]
        h0 = c0 = x.new_zeros(L, B, H)
        if hx is not None:
            h0, c0 = up(hx[0]), up(hx[1])
        recorded = call.extra.get("out")
        forward = []  # per layer: (input, h_{t-1}, activations i|f|g|o, c_{t-1}, tanh c_t)
        layer_in = x
        for layer in range(L):
            w_ih, w_hh = self._weight(mod, "ih", layer), self._weight(mod, "hh", layer)
            pre = layer_in @ w_ih.t()  # (B, T, 4H)
            if mod.bias:
                pre += self._weight(mod, "bias_ih", layer) + self._weight(mod, "bias_hh", layer)
            if layer == L - 1 and recorded is not None:
                hs = up(recorded)
                hs = hs if mod.batch_first else hs.transpose(0, 1)
                h_prev = torch.cat([h0[layer].unsqueeze(1), hs[:, :-1]], 1)
                pre += h_prev @ w_hh.t()
                act = _activate(pre)
                c_prev, cs = _cell_scan(act, c0[layer], H)
                tanh_c = torch.tanh(cs)
                err = float((act[..., 3 * H :] * tanh_c - hs).abs().max()) if hs.numel() else 0.0
                scale = float(hs.abs().max()) if hs.numel() else 0.0
                if not err <= tolerance(mod.weight_ih_l0.dtype) * max(scale, 1.0):
                    raise Unsupported(
                        f"the LSTM cell equations do not reproduce the batch call's output (max "
                        f"difference {err:.3g}): a modified output or another cell"
                    )
            else:  # a lower layer: its states step by step
                act, hs, cs = torch.empty_like(pre), pre.new_empty(B, T, H), pre.new_empty(B, T, H)
                h, c = h0[layer], c0[layer]
                for t in range(T):
                    a_t = act[:, t]
                    a_t.copy_(_activate(torch.addmm(pre[:, t], h, w_hh.t())))
                    i_g = a_t[:, :H] * a_t[:, 2 * H : 3 * H]
                    c = torch.addcmul(i_g, a_t[:, H : 2 * H], c, out=cs[:, t])
                    h = torch.mul(a_t[:, 3 * H :], torch.tanh(c), out=hs[:, t])
                h_prev = torch.cat([h0[layer].unsqueeze(1), hs[:, :-1]], 1)
                c_prev = torch.cat([c0[layer].unsqueeze(1), cs[:, :-1]], 1)
                tanh_c = torch.tanh(cs)
            forward.append((layer_in, h_prev, act, c_prev, tanh_c))
            layer_in = hs
        # backward through time: δ_t = ∂(Σ_k ⟨o^k, b^k⟩)/∂(gate pre-activations at t)
        g_out, g_h, g_c = (None if g is None else up(g) for g in call.grads)
        if g_out is not None and not mod.batch_first:
            g_out = g_out.transpose(0, 1)
        above = g_out  # the gradient w.r.t. the current layer's output sequence
        deltas: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        for layer in reversed(range(L)):
            _, _, act, c_prev, tanh_c = forward[layer]
            i, f, g, o = act.split(H, -1)
            # δ_t = [dc_t ⊙ K_i, dc_t ⊙ K_f, dc_t ⊙ K_g, dh_t ⊙ K_o]: the factors not on the chain
            k_i, k_f = g * i * (1 - i), c_prev * f * (1 - f)
            k_g, k_o = i * (1 - g * g), tanh_c * o * (1 - o)
            to_c = o * (1 - tanh_c * tanh_c)  # ∂c_t/∂h_t's share: dc_t += dh_t ⊙ to_c
            w_hh = self._weight(mod, "hh", layer)
            dh = x.new_zeros(B, H) if g_h is None else g_h[layer].clone()
            dc = x.new_zeros(B, H) if g_c is None else g_c[layer].clone()
            delta = torch.empty_like(act)
            for t in reversed(range(T)):
                if above is not None:
                    dh += above[:, t]
                dc += dh * to_c[:, t]
                d_t = delta[:, t]
                torch.mul(k_i[:, t], dc, out=d_t[:, :H])
                torch.mul(k_f[:, t], dc, out=d_t[:, H : 2 * H])
                torch.mul(k_g[:, t], dc, out=d_t[:, 2 * H : 3 * H])
                torch.mul(k_o[:, t], dh, out=d_t[:, 3 * H :])
                dc = dc * f[:, t]
                dh = d_t @ w_hh
            deltas[layer] = delta
            if layer > 0:
                above = delta @ self._weight(mod, "ih", layer)
        return [
            (inp, h_prev, deltas[layer]) for layer, (inp, h_prev, _, _, _) in enumerate(forward)
        ]

    @staticmethod
    def _weight(mod: nn.LSTM, kind: str, layer: int) -> torch.Tensor:
        name = f"weight_{kind}_l{layer}" if kind in ("ih", "hh") else f"{kind}_l{layer}"
        return up(getattr(mod, name).detach())

    def _layers(self, mod, calls):
        tokens = [self._tokens(mod, c) for c in _used(calls)]
        if not tokens:
            return None
        return [
            tuple(cat_tokens([tk[layer][k] for tk in tokens]) for k in range(3))
            for layer in range(mod.num_layers)
        ]

    def factors(self, mod, calls, names, batch):
        """Keep per layer ``(x_t, δ_t)`` (W_ih), ``(h_{t-1}, δ_t)`` (W_hh), ``Σ_t δ_t`` (biases)."""
        layers = self._layers(mod, calls)
        if layers is None:
            shapes = {n: tuple(getattr(mod, n).shape) for n in names}
            return Zero(shapes, batch, mod.weight_ih_l0.device)
        parts = []
        for layer, (a_in, h_prev, delta) in enumerate(layers):
            per_bias = delta.sum(1)  # shared by bias_ih and bias_hh: the same gradient
            shared: dict = {}  # δ's Gram matrices, shared by weight_ih and weight_hh
            for kind, a in (("ih", a_in), ("hh", h_prev)):
                w, b = f"weight_{kind}_l{layer}", f"bias_{kind}_l{layer}"
                parts.append(
                    Tokens(
                        a,
                        delta,
                        weight=w if w in names else None,
                        bias=b if b in names else None,
                        shape=tuple(getattr(mod, w).shape),
                        per_bias=per_bias,
                        shared=shared,
                    )
                )
        return Joined(parts)

    def batch_grad(self, mod, calls, names, batch):
        """``Σ_{j,t} δ_t x_tᵀ`` etc. from the gate gradients."""
        layers = self._layers(mod, calls)
        out = {}
        for name in names:
            if layers is None:
                out[name] = torch.zeros_like(getattr(mod, name))
                continue
            kind, layer = name.rsplit("_l", 1)
            a_in, h_prev, delta = layers[int(layer)]
            d2 = delta.reshape(-1, delta.shape[-1])
            if kind.startswith("weight"):
                a = a_in if kind == "weight_ih" else h_prev
                out[name] = d2.t() @ a.reshape(-1, a.shape[-1])
            else:
                out[name] = d2.sum(0)
        return out


def _random(mod: nn.Module) -> bool:
    return any(m.training for m in dropout_modules(mod))


# the generic loop claims every recurrent module: asked after the rules for specific ones
@register_module_rule(nn.RNNBase, order=100)
class RNNLoopFamily(LayerFamily):
    """Any ``nn.RNNBase`` (GRU, RNN, LSTM variants, subclasses): a per-sample loop of the module."""

    name = "rnn-loop"
    plain_forward = False

    def param_names(self, mod):
        """Every parameter the module registers itself."""
        return tuple(n for n, _ in mod.named_parameters(recurse=False))

    def before(self, mod):
        """Return the RNG state before a random module's call (replayed per sample)."""
        if not _random(mod):
            return None
        p = next(mod.parameters(), None)
        return rng_snapshot(None if p is None else p.device)

    def record(self, mod, args, output, batch, before=None):
        """Input, initial state, the RNG state, the batch outputs and their gradients."""
        call, outs = _record_rnn(mod, args, output, batch)
        if call.problem is None:
            call.extra["rng"] = before
            call.extra["outputs"] = tuple(t.detach() for t in outs)
        return call, outs

    def _per_sample_grads(self, mod, calls, names, batch):
        """Yield ``(j, [g_j(p) for p in names])`` by re-running the module on sample j."""
        params = [getattr(mod, n) for n in names]
        bd = 0 if mod.batch_first else 1
        tol = tolerance(params[0].dtype)
        used = _used(calls)
        with torch.enable_grad():
            for j in range(batch):
                acc: list[torch.Tensor | None] = [None] * len(params)
                for call in used:
                    a = call.inputs[0].narrow(bd, j, 1)
                    hx = call.extra["hx"]
                    if hx is not None:
                        hx = tuple(h.narrow(1, j, 1) for h in hx)
                        hx = hx[0] if len(hx) == 1 else hx
                    if call.extra["rng"] is not None:
                        with rng_replay(call.extra["rng"]):
                            o, st = mod(a, hx)
                    else:
                        o, st = mod(a, hx)
                    st = (st,) if isinstance(st, torch.Tensor) else tuple(st)
                    mine = (o, *st)
                    for k, (t, ref) in enumerate(zip(mine, call.extra["outputs"], strict=True)):
                        row = ref.narrow(bd if k == 0 else 1, j, 1)
                        err = float((t.detach() - row).abs().max()) if t.numel() else 0.0
                        scale = float(row.abs().max()) if row.numel() else 0.0
                        if not err <= tol * scale + 1e-30:
                            raise Unsupported(
                                f"re-running {type(mod).__name__} on sample {j} alone does not "
                                f"reproduce its batch output (max difference {err:.3g}): masks "
                                "drawn per sample, or a module that mixes samples"
                            )
                    total = sum(
                        (t * g.narrow(bd if k == 0 else 1, j, 1)).sum()
                        for k, (t, g) in enumerate(zip(mine, call.grads, strict=True))
                        if g is not None
                    )
                    gs = torch.autograd.grad(total, params, allow_unused=True)
                    acc = [
                        g if a_ is None else (a_ if g is None else a_ + g)
                        for a_, g in zip(acc, gs, strict=True)
                    ]
                yield (
                    j,
                    [
                        torch.zeros_like(p) if g is None else g
                        for p, g in zip(params, acc, strict=True)
                    ],
                )

    def per_sample(self, mod, calls, names, batch, dirs: dict[str, Directions]):
        """Per-sample gradients of the module's own parameters, one sample at a time."""
        device = next(mod.parameters()).device
        sq = {n: zeros(batch, device) for n in names}
        sums = {n: None for n in names}
        for j, gs in self._per_sample_grads(mod, calls, names, batch):
            for n, g in zip(names, gs, strict=True):
                sq[n][j] = sq_sum(g.reshape(1, -1), (1,))[0]
                g64 = g.double()
                sums[n] = g64 if sums[n] is None else sums[n] + g64
        out = {}
        for n in names:
            d = dirs[n]
            proj = zeros(d.u.shape[1], device) if sums[n] is None else d.of_tensor(sums[n])
            out[n] = ParamGhost(sq[n], proj)
        return out

    def factors(self, mod, calls, names, batch):
        """Keep the per-sample gradients of the module's own parameters, from the loop."""
        rows = {n: [] for n in names}
        for _, gs in self._per_sample_grads(mod, calls, names, batch):
            for n, g in zip(names, gs, strict=True):
                rows[n].append(g.detach())
        return Rows({n: torch.stack(r) for n, r in rows.items()})

    def batch_grad(self, mod, calls, names, batch):
        """Sum the per-sample gradients of the loop."""
        out = {n: torch.zeros_like(getattr(mod, n), dtype=torch.float64) for n in names}
        for _, gs in self._per_sample_grads(mod, calls, names, batch):
            for n, g in zip(names, gs, strict=True):
                out[n] += g.double()
        return out

    def dots(self, mod, calls, names, vectors, batch):
        """``⟨g_j, v⟩`` from the same per-sample loop."""
        out = zeros(batch, next(mod.parameters()).device)
        for j, gs in self._per_sample_grads(mod, calls, names, batch):
            out[j] = sum(
                (g.double() * vectors[n].double()).sum() for n, g in zip(names, gs, strict=True)
            )
        return out
