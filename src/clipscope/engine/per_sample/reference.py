"""The slow, obviously-correct twin of the per-sample route (STYLE §5)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from clipscope.engine.losses import trainable_params
from clipscope.engine.per_sample.batch import check_inputs, per_sample_from_output

__all__ = ["per_sample_grads_reference"]


def per_sample_grads_reference(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor] | None = None,
    *,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Brute force: every ``∇ℓ_j`` by its own float64 autograd call, ``(B, n)``.

    The model is copied and cast to float64 (floating inputs and targets too);
    row j is ``∇_θ loss_fn(model(x[j:j+1]), y[j:j+1])`` flattened over
    ``params`` in order. With ``rng_state`` (a CPU RNG state) the component is
    the one of a batch forward with dropout: each row is ``∇ℓ_j`` through a
    fresh batch forward started from that state, so every row sees the same
    masks. For tests only: B backward passes and B·n memory.
    """
    check_inputs(model, loss_fn, x)
    params = trainable_params(model, params)
    index = {id(p): k for k, p in enumerate(model.parameters())}
    missing = [k for k, p in enumerate(params) if id(p) not in index]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the model")
    twin = copy.deepcopy(model).double()
    twin_params = list(twin.parameters())
    chosen = [twin_params[index[id(p)]] for p in params]
    x64 = x.double() if x.is_floating_point() else x
    y64 = y.double() if isinstance(y, torch.Tensor) and y.is_floating_point() else y
    rows = []
    with torch.enable_grad():
        for j in range(x.shape[0]):
            if rng_state is None:
                loss = loss_fn(twin(x64[j : j + 1]), y64[j : j + 1])
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.random.set_rng_state(rng_state)
                    loss = per_sample_from_output(loss_fn, twin(x64), y64, x.shape[0])[j]
            gs = torch.autograd.grad(loss, chosen, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
                        for p, g in zip(chosen, gs, strict=True)
                    ]
                )
            )
    return torch.stack(rows)
