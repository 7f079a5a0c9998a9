r"""Embeddings: ``y_t = E[i_t]`` for token ids ``(B, *)``.

Sample j's gradient adds ``b_t`` to row ``i_t`` for each of its tokens,
``g_j(E) = Σ_t e_{i_t} b_tᵀ``, so

.. math:: ‖g_j(E)‖^2 = \sum_{t,s:\ i_{jt} = i_{js}} b_{jt}·b_{js},
          \qquad ⟨g_j(E), V⟩ = \sum_t b_{jt}·V[i_{jt}],

with the tokens equal to ``padding_idx`` left out (their gradient is 0 by
torch's convention).

Options:

* ``padding_idx``: as above.
* ``max_norm``: torch renormalizes the looked-up rows **in place** before the
  lookup, under ``no_grad``; the gradient is still the scatter of ``b``, and a
  row's renormalized value does not depend on which sample looked it up
  first, so the rule holds (the probe restores the weights afterwards).
* ``sparse=True``: the batch gradient is a sparse tensor; the rule is the same.
* ``scale_grad_by_freq``: torch divides each row's gradient by the token's
  count **in the batch**, so a batch backward is not the sum of per-sample
  gradients, and the per-sample gradient is not the derivative (forward-mode
  dots would miss the scaling). Not claimed here: such a weight's per-sample
  norms, sums, dots and clipped sums all come from batch-1 backward passes
  (:meth:`EmbeddingFamily.batch1`, for ``nn.EmbeddingBag`` too).
"""

from __future__ import annotations

import torch
from torch import nn

from clipscope.engine.per_sample._common import (
    CHUNK_ELEMENTS,
    Directions,
    cat_tokens,
    sum64,
    up,
)
from clipscope.engine.per_sample.factors import Factors, Zero, storage_bytes
from clipscope.engine.per_sample.family import LayerFamily, grads_of
from clipscope.engine.per_sample.registry import register_module_rule

__all__ = ["EmbeddingFactors", "EmbeddingFamily"]


def _tokens(mod: nn.Embedding, calls, batch: int):
    used = grads_of(calls)
    if not used:
        return None
    idx = cat_tokens([c.inputs[0].reshape(batch, -1) for c, _ in used])
    b = cat_tokens([g.reshape(batch, -1, g.shape[-1]) for _, g in used])
    b = up(b)
    if mod.padding_idx is not None:
        b = b * (idx != mod.padding_idx).unsqueeze(-1).to(b.dtype)
    return idx, b


class EmbeddingFactors(Factors):
    """Token ids ``(B, T)`` and output gradients ``(B, T, D)`` (padding tokens' zeroed)."""

    def __init__(self, idx: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.idx, self.b, self.shape = idx, b, tuple(shape)
        self.names = ("weight",)

    def kept_tensors(self):  # noqa: D102
        return [self.idx, self.b]

    @property
    def nbytes(self) -> int:  # noqa: D102
        return storage_bytes(self.kept_tensors())

    def sq(self, name):
        """Same-token Gram sums of the output gradients."""
        idx, b = self.idx, self.b
        T = idx.shape[1]
        sq = torch.zeros(idx.shape[0], dtype=torch.float64, device=b.device)
        step = max(1, CHUNK_ELEMENTS // max(1, T * T))
        for s in range(0, idx.shape[0], step):
            i, bb = idx[s : s + step], b[s : s + step]
            same = i.unsqueeze(2) == i.unsqueeze(1)
            gram = torch.bmm(bb, bb.transpose(1, 2))
            sq[s : s + step] = sum64(gram.mul_(same), (1, 2))
        return sq

    def proj(self, name, dirs: Directions):
        """``⟨Σ_t e_{i_t} b_tᵀ, u wᵀ⟩ = Σ_t u[i_t] (b_t·w)``."""
        b = self.b
        bw = (b.reshape(-1, b.shape[-1]) @ dirs.w.to(b.dtype)).double()
        return (dirs.u[self.idx.reshape(-1)] * bw).sum(0)

    def dots(self, vectors):
        """``Σ_t b_t·V[i_t]`` per sample."""
        rows = vectors["weight"].to(self.b.dtype)[self.idx]  # (B, T, D)
        return sum64(rows.mul_(self.b), (1, 2))

    def weighted(self, name, weights):
        """``Σ_j w_j Σ_t`` of ``b_t`` added to row ``i_t``, for every row of ``weights``."""
        w = weights.to(self.b.device).double()
        flat_idx = self.idx.reshape(-1)
        b = self.b.double()
        out = torch.zeros(w.shape[0], *self.shape, dtype=torch.float64, device=self.b.device)
        for e in range(w.shape[0]):
            scaled = (b * w[e].view(-1, 1, 1)).reshape(-1, b.shape[-1])
            out[e].index_add_(0, flat_idx, scaled)
        return out


@register_module_rule(nn.Embedding)
class EmbeddingFamily(LayerFamily):
    """``nn.Embedding`` with any ``padding_idx``, ``max_norm`` and ``sparse``."""

    name = "embedding"

    def claims(self, mod):
        """Not for ``scale_grad_by_freq`` (see the module docstring)."""
        return super().claims(mod) and not mod.scale_grad_by_freq

    def batch1(self, mod):
        """``scale_grad_by_freq``: the gradient is defined per batch (module docstring)."""
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True: torch divides the gradient by the token counts of the "
                "whole batch, so per-sample gradients come from batch-1 backward passes"
            )
        return None

    def factors(self, mod, calls, names, batch):
        """Keep the token ids and output gradients of every call."""
        tk = _tokens(mod, calls, batch)
        if tk is None:
            return Zero({"weight": tuple(mod.weight.shape)}, batch, mod.weight.device)
        return EmbeddingFactors(tk[0], tk[1], mod.weight.shape)

    def batch_grad(self, mod, calls, names, batch):
        """``Σ_t`` of ``b_t`` added to row ``i_t``."""
        tk = _tokens(mod, calls, batch)
        w = torch.zeros(mod.weight.shape, dtype=torch.float64, device=mod.weight.device)
        if tk is not None:
            idx, b = tk
            w.index_add_(0, idx.reshape(-1), b.reshape(-1, b.shape[-1]).double())
        return {"weight": w}
