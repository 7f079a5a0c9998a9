r"""Hugging Face ``transformers.pytorch_utils.Conv1D``: a transposed Linear (GPT-2's projections).

``Conv1D(nf, nx)`` holds ``weight`` ``(nx, nf)`` and ``bias`` ``(nf,)`` and
computes ``y = x W + b`` on inputs ``(B, *, nx)`` (``torch.addmm`` on ``x``
flattened to ``(B·T, nx)``, then viewed back). So sample j's gradients are

.. math:: g_j(W) = \sum_t x_{jt} b_{jt}^\top, \qquad g_j(b) = \sum_t b_{jt},

the Linear formulas (:mod:`~clipscope.engine.per_sample.linear`) with the
roles of input and output gradient swapped: the kept form is
``Tokens(a=b, b=x)`` for the weight (``‖g_j‖²`` by the same Gram sums or
per-sample matrices, whichever is smaller) beside ``Σ_t b_{jt}`` for the bias.
The rule records the module's input ``(B, *, nx)`` and output ``(B, *, nf)``,
not the ``addmm`` inside, so the samples stay on dim 0.

**Detected without importing transformers**: the module's class (or a base
class) is named ``Conv1D`` and defined in a ``transformers`` module, and the
module runs that class's own ``forward`` (a subclass that overrides it could
compute anything). Where transformers is not installed nothing matches and
nothing is imported.
"""

from __future__ import annotations

import torch
from torch import nn

from clipscope.engine.per_sample._common import cat_tokens, per_sample_matrices, up
from clipscope.engine.per_sample.factors import Joined, Rows, Tokens, Zero
from clipscope.engine.per_sample.family import Call, LayerFamily, grads_of
from clipscope.engine.per_sample.registry import register_module_rule

__all__ = ["HFConv1DFamily", "hf_conv1d_class"]


def hf_conv1d_class(mod: nn.Module) -> type | None:
    """Return the class in ``mod``'s type hierarchy that is transformers' ``Conv1D``, or None.

    Matched by name and module path (``Conv1D`` in a ``transformers`` module):
    nothing is imported.
    """
    for cls in type(mod).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if cls.__name__ == "Conv1D" and module.split(".")[0] == "transformers":
            return cls
    return None


def _tokens(calls: list[Call], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All calls' ``(x (B, T, nx), b (B, T, nf))``, or None when no call reached the loss."""
    used = grads_of(calls)
    if not used:
        return None
    x = cat_tokens([c.inputs[0].reshape(batch, -1, c.inputs[0].shape[-1]) for c, _ in used])
    b = cat_tokens([g.reshape(batch, -1, g.shape[-1]) for _, g in used])
    return up(x), up(b)


@register_module_rule()
class HFConv1DFamily(LayerFamily):
    """transformers' ``Conv1D`` with its own forward: ``y = x W + b``, ``W`` ``(nx, nf)``."""

    name = "hf-conv1d"

    def claims(self, mod):
        """Claim a ``transformers`` ``Conv1D`` (name, module path) running its own ``forward``."""
        cls = hf_conv1d_class(mod)
        if cls is None or type(mod).forward is not cls.forward:
            return False
        w = mod._parameters.get("weight")
        return isinstance(w, torch.Tensor) and w.dim() == 2

    def factors(self, mod, calls, names, batch):
        """Keep ``Tokens(a=b, b=x)`` (or per-sample matrices where smaller) and the bias apart."""
        shapes = {n: tuple(getattr(mod, n).shape) for n in names}
        tk = _tokens(calls, batch)
        if tk is None:
            return Zero(shapes, batch, mod.weight.device)
        x, b = tk
        T, nx, nf = x.shape[1], x.shape[2], b.shape[2]
        parts = []
        if "weight" in names:
            if T == 1 or T * (nx + nf) <= nx * nf:
                parts.append(Tokens(b, x, weight="weight", shape=shapes["weight"]))
            else:  # W is (nx, nf): the per-sample matrices Σ_t x_t b_tᵀ
                parts.append(Rows({"weight": per_sample_matrices(b, x)}))
        if "bias" in names:  # (keeps Σ_t b_t only)
            parts.append(Tokens(None, b, bias="bias"))
        return Joined(parts)

    def per_sample(self, mod, calls, names, batch, dirs):
        """From the tokens (Gram sums, or per-sample matrices in chunks): nothing kept."""
        tk = _tokens(calls, batch)
        if tk is None:
            return self.factors(mod, calls, names, batch).ghost(names, dirs)
        return self._tokens_form(mod, tk, names).ghost(names, dirs)

    def dots(self, mod, calls, names, vectors, batch):
        """``Σ_t x_t·(V b_t) + b_t·v_bias`` per sample."""
        tk = _tokens(calls, batch)
        if tk is None:
            return torch.zeros(batch, dtype=torch.float64, device=mod.weight.device)
        return self._tokens_form(mod, tk, names).dots({n: vectors[n] for n in names})

    @staticmethod
    def _tokens_form(mod, tk, names):
        x, b = tk
        parts = []
        if "weight" in names:
            parts.append(Tokens(b, x, weight="weight", shape=tuple(mod.weight.shape)))
        if "bias" in names:
            parts.append(Tokens(None, b, bias="bias"))
        return Joined(parts)

    def batch_grad(self, mod, calls, names, batch):
        """``Σ_{j,t} x_t b_tᵀ`` and ``Σ_{j,t} b_t``."""
        tk = _tokens(calls, batch)
        if tk is None:
            return {n: torch.zeros_like(getattr(mod, n)) for n in names}
        x, b = tk
        b2, x2 = b.reshape(-1, b.shape[-1]), x.reshape(-1, x.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = x2.t() @ b2
        if "bias" in names:
            out["bias"] = b2.sum(0)
        return out
