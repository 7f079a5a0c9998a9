r"""Linear layers: ``y = a Wᵀ + bias`` on inputs ``(B, *, F_in)``.

Sample j's tokens are the rows of ``a_j`` (all leading dims after the first
flattened into ``T``); its gradients are

.. math:: g_j(W) = \sum_t b_{jt} a_{jt}^\top, \qquad g_j(\text{bias}) = \sum_t b_{jt},

so ``‖g_j(W)‖² = ‖a_j‖²‖b_j‖²`` for ``T = 1`` (Goodfellow 2015, "Efficient
per-example gradient computations") and ``Σ_{t,s}(a_t·a_s)(b_t·b_s)`` for
sequences (Li et al. 2021, ghost clipping), or the per-sample matrices when
they are smaller (:func:`~clipscope.engine.per_sample._common.gram_sq_norm`).
The dot with ``v = (V, v_b)`` is ``Σ_t b_t·(V a_t) + b_t·v_b``.

A module called several times (a shared layer) adds the tokens of all its
calls into one sum. Preconditions: ``nn.Linear`` or a subclass that keeps
``nn.Linear.forward`` (``NonDynamicallyQuantizableLinear``); the samples on
dim 0 of input and output. A weight also used outside the module
(``F.linear(h, emb.weight)``) is caught by the structural check, not here.
``nn.MultiheadAttention``'s ``out_proj`` (a Linear it reads but never calls)
is served by :mod:`~clipscope.engine.per_sample.attention`, which keeps every
rule, this one included, off the attention's children.
"""

from __future__ import annotations

import torch
from torch import nn

from clipscope.engine.per_sample._common import cat_tokens, per_sample_matrices, up
from clipscope.engine.per_sample.factors import Joined, Rows, Tokens, Zero
from clipscope.engine.per_sample.family import Call, LayerFamily, grads_of
from clipscope.engine.per_sample.registry import register_module_rule

__all__ = ["LinearFamily"]


def tokens(calls: list[Call], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All calls' ``(a (B, T, F_in), b (B, T, F_out))``, or None when no call reached the loss."""
    used = grads_of(calls)
    if not used:
        return None
    a = cat_tokens([c.inputs[0].reshape(batch, -1, c.inputs[0].shape[-1]) for c, _ in used])
    b = cat_tokens([g.reshape(batch, -1, g.shape[-1]) for _, g in used])
    return a, b


@register_module_rule(nn.Linear)
class LinearFamily(LayerFamily):
    """``nn.Linear`` (and subclasses with its forward)."""

    name = "linear"

    def factors(self, mod, calls, names, batch):
        """Keep the tokens ``(a, b)``, or the per-sample weight matrices where those are smaller.

        ``T(P + Q) > PQ`` (long sequences through a narrow layer): the per-sample
        matrices ``Σ_t b_t a_tᵀ`` are formed once (``bmm``) and kept instead.
        """
        shapes = {n: tuple(getattr(mod, n).shape) for n in names}
        tk = tokens(calls, batch)
        if tk is None:
            return Zero(shapes, batch, mod.weight.device)
        a, b = up(tk[0]), up(tk[1])
        T, P, Q = a.shape[1], a.shape[2], b.shape[2]
        weight = "weight" if "weight" in names else None
        bias = "bias" if "bias" in names else None
        if weight is None or T == 1 or T * (P + Q) <= P * Q:
            return Tokens(a, b, weight=weight, bias=bias, shape=shapes.get("weight"))
        parts = [Rows({"weight": per_sample_matrices(a, b)})]
        if bias is not None:  # (keeps Σ_t b_t only)
            parts.append(Tokens(None, b, bias="bias"))
        return Joined(parts)

    def batch_grad(self, mod, calls, names, batch):
        """``Σ_{j,t} b_t a_tᵀ`` and ``Σ_{j,t} b_t``."""
        tk = tokens(calls, batch)
        if tk is None:
            return {n: torch.zeros_like(getattr(mod, n)) for n in names}
        a, b = up(tk[0]), up(tk[1])
        b2 = b.reshape(-1, b.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = b2.t() @ a.reshape(-1, a.shape[-1])
        if "bias" in names:
            out["bias"] = b2.sum(0)
        return out

    def dots(self, mod, calls, names, vectors, batch):
        """``Σ_t b_t·(V a_t) + b_t·v_bias`` per sample."""
        tk = tokens(calls, batch)
        if tk is None:
            return torch.zeros(batch, dtype=torch.float64, device=mod.weight.device)
        weight = "weight" if "weight" in names else None
        bias = "bias" if "bias" in names else None
        kept = Tokens(tk[0], tk[1], weight=weight, bias=bias, shape=tuple(mod.weight.shape))
        return kept.dots({n: vectors[n] for n in names})
