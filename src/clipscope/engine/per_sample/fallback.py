"""Exact per-sample gradients for parameters no rule serves, or whose rule failed a check.

Three ways to form ``g_j(p)`` for a set of parameters S, all exact:

``"vmap"``
    ``torch.func.vmap(grad)`` of ``loss_fn(functional_call(model, S, x_j), y_j)``
    over the samples, in chunks of bounded memory: each sample through its own
    batch-1 forward, all of them in one vectorized call.
``"loop"``
    a loop of batch-1 forward+backward passes. Used where ``vmap`` has no
    batching rule (the fused recurrent kernels, sparse gradients), for a
    parameter whose gradient torch defines per batch (``scale_grad_by_freq``),
    and whenever ``vmap`` raises.
``"graph"``
    ``∂ℓ_j/∂S`` through the **batch** forward's graph, one backward per sample.
    The only one of the three that sees the batch forward's dropout masks, so
    it is the mode whenever a forward draws random numbers (policy
    ``"fixed"`` with dropout in training mode): there a component of batch
    size 1 is defined by the masks of its chunk's forward.

The slowest part of a per-sample probe when it runs; every use is reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from clipscope.engine.losses import param_names
from clipscope.engine.per_sample._common import CHUNK_ELEMENTS, dense_grad
from clipscope.engine.per_sample.batch import per_sample_from_output

__all__ = ["MODES", "FallbackStats", "choose_mode", "fallback_stats", "per_sample_grads"]

#: The start of torch's UserWarning for an op that ``vmap`` runs one sample at a time.
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented"

MODES = ("vmap", "loop", "graph")


@dataclass
class FallbackStats:
    """Per-sample quantities of a parameter set S from its exact per-sample gradients.

    Attributes
    ----------
    sq : list of Tensor
        Per parameter of S, float64 ``(B,)``: ``‖g_j(p)‖²``.
    sums : list of Tensor
        Per parameter, float64, parameter-shaped: ``Σ_j g_j(p)``.
    dots : Tensor or None
        float64 ``(B,)``: ``Σ_{p∈S} ⟨g_j(p), v_p⟩`` when a vector was given.
    weighted : list of list of Tensor or None
        For each row ``w`` of ``weights``, per parameter: ``Σ_j w_j g_j(p)`` (float64).
    mode : str
        The mode that ran (``"vmap"`` falls back to ``"loop"`` if it raises).
    rows : list of Tensor or None
        With ``keep_rows=True``: per parameter, the per-sample gradients
        ``(B, *shape)`` themselves (the factor-keeping route keeps them).
    """

    sq: list[torch.Tensor]
    sums: list[torch.Tensor]
    dots: torch.Tensor | None
    weighted: list[list[torch.Tensor]] | None
    mode: str
    rows: list[torch.Tensor] | None = None


def choose_mode(model: nn.Module, randomness: bool) -> str:
    """``"graph"`` under active randomness, ``"loop"`` around recurrent modules, else ``"vmap"``."""
    if randomness:
        return "graph"
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        # the fused LSTM/GRU kernels have no batching rule; a loop of batch-1 passes is
        # also the fastest per-sample method there (measured-facts.md: 2.8 E vs 10.7 E)
        return "loop"
    return "vmap"


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor],
    mode: str,
    *,
    losses: torch.Tensor | None = None,
    only: Sequence[int] | None = None,
) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """Yield ``(samples, [g(p) of shape (n, *p.shape) for p in params])`` chunk by chunk.

    ``losses`` (``"graph"`` only) are the batch forward's per-sample losses with
    their graph; without them a batch forward runs here (under the caller's RNG).
    ``only`` (``"graph"`` only) restricts the backward passes to those samples.
    """
    batch = x.shape[0]
    params = list(params)
    if mode == "graph":
        if losses is None:
            with torch.enable_grad():
                losses = per_sample_from_output(loss_fn, model(x), y, batch)
        for j in range(batch) if only is None else only:
            gs = torch.autograd.grad(losses[j], params, retain_graph=True, allow_unused=True)
            yield (
                slice(j, j + 1),
                [dense_grad(g, p).unsqueeze(0) for g, p in zip(gs, params, strict=True)],
            )
        return
    if mode == "loop":
        with torch.enable_grad():
            for j in range(batch):
                loss = loss_fn(model(x[j : j + 1]), y[j : j + 1])
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                yield (
                    slice(j, j + 1),
                    [dense_grad(g, p).unsqueeze(0) for g, p in zip(gs, params, strict=True)],
                )
        return
    if mode != "vmap":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names = param_names(model, params)

    def loss_one(ps: dict, xj: torch.Tensor, yj: Any) -> torch.Tensor:
        return loss_fn(functional_call(model, ps, (xj.unsqueeze(0),)), yj.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))
    primals = {n: p.detach() for n, p in zip(names, params, strict=True)}
    step = max(1, CHUNK_ELEMENTS // max(1, sum(p.numel() for p in params)))
    for s in range(0, batch, step):
        with warnings.catch_warnings():
            # torch's note that an op (CPU flash attention) runs without a batching rule:
            # the result is exact, the route's cost is in the fallback's record already
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE, category=UserWarning)
            g = per(primals, x[s : s + step], y[s : s + step])
        yield slice(s, min(batch, s + step)), [g[n] for n in names]


def fallback_stats(
    model: nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor],
    mode: str,
    *,
    losses: torch.Tensor | None = None,
    vector: Sequence[torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    keep_rows: bool = False,
) -> FallbackStats:
    """Norms, sums, dots with ``vector`` and ``weights``-weighted sums of the per-sample gradients.

    ``vector`` holds one tensor per parameter; ``weights`` is ``(E, B)``. A
    ``"vmap"`` that raises (an op without a batching rule) is redone as
    ``"loop"``; :attr:`FallbackStats.mode` says which ran.
    """
    args = (losses, vector, weights, keep_rows)
    try:
        return _stats(model, loss_fn, x, y, params, mode, *args)
    except (RuntimeError, NotImplementedError, ValueError):
        if mode != "vmap":
            raise
        return _stats(model, loss_fn, x, y, params, "loop", *args)


def _stats(model, loss_fn, x, y, params, mode, losses, vector, weights, keep) -> FallbackStats:
    params = list(params)
    batch = x.shape[0]
    device = x.device
    sq = [torch.zeros(batch, dtype=torch.float64, device=device) for _ in params]
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    dots = None if vector is None else torch.zeros(batch, dtype=torch.float64, device=device)
    vec = None if vector is None else [v.double().reshape(-1) for v in vector]
    weighted = None
    if weights is not None:
        weights = weights.to(device=device, dtype=torch.float64)
        weighted = [[torch.zeros_like(s) for s in sums] for _ in range(weights.shape[0])]
    rows: list[list[torch.Tensor]] = [[] for _ in params]
    for s, gs in per_sample_grads(model, loss_fn, x, y, params, mode, losses=losses):
        for k, g in enumerate(gs):
            if keep:
                rows[k].append(g.detach())
            g64 = g.detach().double().reshape(g.shape[0], -1)
            sq[k][s] = (g64 * g64).sum(1)
            sums[k] += g64.sum(0).reshape(sums[k].shape)
            if vec is not None:
                dots[s] += g64 @ vec[k]
            if weighted is not None:
                for e in range(weights.shape[0]):
                    weighted[e][k] += (weights[e, s] @ g64).reshape(sums[k].shape)
    kept = [torch.cat(r) for r in rows] if keep else None
    return FallbackStats(sq, sums, dots, weighted, mode, kept)
