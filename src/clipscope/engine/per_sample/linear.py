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
"""

from __future__ import annotations

import torch
from torch import nn

from clipscope.engine.per_sample._common import (
    Directions,
    bias_sq_norm,
    cat_tokens,
    gram_sq_norm,
    up,
)
from clipscope.engine.per_sample.family import (
    Call,
    LayerFamily,
    ParamGhost,
    grads_of,
    zeros,
)

__all__ = ["LinearFamily"]


def tokens(calls: list[Call], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All calls' ``(a (B, T, F_in), b (B, T, F_out))``, or None when no call reached the loss."""
    used = grads_of(calls)
    if not used:
        return None
    a = cat_tokens([c.inputs[0].reshape(batch, -1, c.inputs[0].shape[-1]) for c, _ in used])
    b = cat_tokens([g.reshape(batch, -1, g.shape[-1]) for _, g in used])
    return a, b


class LinearFamily(LayerFamily):
    """``nn.Linear`` (and subclasses with its forward)."""

    name = "linear"
    module_types = (nn.Linear,)

    def per_sample(self, mod, calls, names, batch, dirs: dict[str, Directions]):
        """Ghost norms of ``weight`` and ``bias`` from the recorded ``(a, b)``."""
        device = mod.weight.device
        tk = tokens(calls, batch)
        out = {}
        for name in names:
            k = dirs[name].u.shape[1]
            if tk is None:
                out[name] = ParamGhost(zeros(batch, device), zeros(k, device))
            elif name == "weight":
                a, b = tk
                out[name] = ParamGhost(gram_sq_norm(a, b), dirs[name].of_factors(a, b))
            else:
                b = tk[1]
                out[name] = ParamGhost(bias_sq_norm(b), dirs[name].of_vector(b))
        return out

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
        out = zeros(batch, mod.weight.device)
        if tk is None:
            return out
        a, b = up(tk[0]), up(tk[1])
        if "weight" in names:
            out += ((a @ vectors["weight"].to(a.dtype).t()) * b).sum((1, 2), dtype=torch.float64)
        if "bias" in names:
            out += (b @ vectors["bias"].to(b.dtype)).sum(1, dtype=torch.float64)
        return out
