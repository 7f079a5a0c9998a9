r"""Normalization layers: LayerNorm, RMSNorm, GroupNorm, InstanceNorm, eval-mode BatchNorm.

Each computes ``y = x̂ ⊙ weight + bias`` with ``x̂`` the input normalized
(per sample for LayerNorm, RMSNorm, GroupNorm and InstanceNorm; with the
running statistics for eval-mode BatchNorm), the affine parameters broadcast
over the other dims. So

.. math:: g_j(\text{weight}) = \sum_{\text{other dims}} b_j ⊙ \hat x_j, \qquad
          g_j(\text{bias}) = \sum_{\text{other dims}} b_j,

small tensors, formed per sample; ``x̂`` is recomputed from the recorded input
with the module's own ``eps`` (``F.layer_norm``, ``F.rms_norm``,
``F.group_norm``, ``F.instance_norm`` without affine).

Preconditions: the module's own forward; BatchNorm in eval mode with running
statistics (in train mode it couples the samples, and the per-sample route
refuses it before anything runs).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from clipscope.engine.per_sample._common import up
from clipscope.engine.per_sample.factors import Rows, Zero
from clipscope.engine.per_sample.family import LayerFamily, grads_of
from clipscope.engine.per_sample.registry import register_module_rule

__all__ = ["NormFamily"]

_INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_BATCH = nn.modules.batchnorm._BatchNorm


def _normalized(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``x̂``: the input normalized exactly as ``mod`` does before its affine map."""
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
    if isinstance(mod, nn.RMSNorm):
        return F.rms_norm(a, mod.normalized_shape, None, mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return F.group_norm(a, mod.num_groups, None, None, mod.eps)
    if isinstance(mod, _INSTANCE):
        use_input = mod.training or not mod.track_running_stats
        rm = None if mod.running_mean is None else mod.running_mean.to(a.dtype)
        rv = None if mod.running_var is None else mod.running_var.to(a.dtype)
        # running statistics are not touched: the copies above are what F updates
        return F.instance_norm(
            a,
            rm if rm is None else rm.clone(),
            rv if rv is None else rv.clone(),
            None,
            None,
            use_input,
            0.0,
            mod.eps,
        )
    shape = (1, -1) + (1,) * (a.dim() - 2)
    mean = mod.running_mean.to(a.dtype).view(shape)
    var = mod.running_var.to(a.dtype).view(shape)
    return (a - mean) / torch.sqrt(var + mod.eps)


def _affine_grads(mod: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """Per-sample ``(∂/∂weight, ∂/∂bias)``, both ``(B, *affine shape)``, in the work dtype."""
    a, b = up(a), up(b)
    B = a.shape[0]
    prod = b * _normalized(mod, a)
    if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
        k = len(mod.normalized_shape)
        dims = tuple(range(1, a.dim() - k))
        return (prod.sum(dims), b.sum(dims)) if dims else (prod, b)
    prod, bb = prod.reshape(B, a.shape[1], -1), b.reshape(B, a.shape[1], -1)
    return prod.sum(2), bb.sum(2)


@register_module_rule(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, *_INSTANCE, _BATCH)
class NormFamily(LayerFamily):
    """LayerNorm, RMSNorm, GroupNorm, InstanceNorm (affine) and eval-mode BatchNorm."""

    name = "norm"

    def claims(self, mod):
        """Any of the types with its own forward (BatchNorm subclasses keep ``_BatchNorm``'s)."""
        if isinstance(mod, _BATCH):
            return type(mod).forward is _BATCH.forward
        return super().claims(mod)

    def precondition(self, mod):
        """BatchNorm must normalize with running statistics."""
        if isinstance(mod, _BATCH) and (mod.training or mod.running_mean is None):
            return "BatchNorm normalizes with batch statistics (train mode), coupling the samples"
        return None

    def _grads(self, mod, calls, batch):
        used = grads_of(calls)
        gw = gb = None
        for c, g in used:
            cw, cb = _affine_grads(mod, c.inputs[0], g)
            gw = cw if gw is None else gw + cw
            gb = cb if gb is None else gb + cb
        return gw, gb

    def factors(self, mod, calls, names, batch):
        """Keep the per-sample affine gradients themselves (as small as the parameters)."""
        gw, gb = self._grads(mod, calls, batch)
        rows = {}
        for name, g in (("weight", gw), ("bias", gb)):
            if name in names and g is not None:
                rows[name] = g.reshape(batch, *getattr(mod, name).shape)
        if not rows:
            shapes = {n: tuple(getattr(mod, n).shape) for n in names}
            return Zero(shapes, batch, next(iter(mod.parameters())).device)
        return Rows(rows)

    def batch_grad(self, mod, calls, names, batch):
        """Sum the per-sample affine gradients."""
        gw, gb = self._grads(mod, calls, batch)
        out = {}
        for name, g in (("weight", gw), ("bias", gb)):
            if name in names:
                p = getattr(mod, name)
                out[name] = torch.zeros_like(p) if g is None else g.sum(0).reshape(p.shape)
        return out
