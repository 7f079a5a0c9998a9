"""Iterate the components' losses ``f_i`` at the current parameters.

:func:`component_losses` is the one place that knows how to call a model on a
component: ``loss_fn(model(x), y)`` for :class:`~clipscope.components.Components`,
and ``output, state = model(inp, state); loss_fn(output, target)`` along the
detached state chain for :class:`~clipscope.components.SequentialComponents`.
The two-pass / keep / dyadic routes, Hessian-vector products and the runner's
drift measurement all go through it, so every consumer sees the same ``f_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from clipscope.components import detach_state
from clipscope.engine.guard import check_dropout_policy, dropout_policy, rng_for_component

__all__ = ["component_losses", "param_names", "trainable_params"]


def trainable_params(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> list:
    """Return the parameters the engine differentiates: ``params``, or every ``requires_grad`` one.

    ``model.parameters()`` yields a tied weight (AWD-LSTM encoder/decoder) once,
    so it is counted once in every norm (edge case 21). No trainable parameter
    is an error (edge case 19).
    """
    if params is None:
        out = [p for p in model.parameters() if p.requires_grad]
    else:
        out, seen = [], set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p)!r}")
            if not p.requires_grad:
                raise ValueError("every tensor in params must require grad")
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    if not out:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return out


def param_names(model: nn.Module, params: list) -> list[str]:
    """Names of ``params`` in ``model`` (``'<param k>'`` for tensors it does not own)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"<param {k}>") for k, p in enumerate(params)]


def component_losses(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    *,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
    only: Iterable[int] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(i, f_i)`` for each component in order, ``f_i`` a differentiable scalar.

    ``f_i = loss_fn(model(x_i), y_i)`` is the component's **mean** loss (the
    paper's eq. (1) averages these with weight ``1/m``). Differentiate it with
    ``torch.autograd.grad(f_i, params)`` before advancing the generator.

    Sequential components: the state starts at ``None`` (the model's zero
    state) and flows from window ``i-1`` into ``i`` detached, recomputed at the
    *current* parameters. With ``only``, the other windows still run (under
    ``no_grad``) to carry the state; they are not yielded.

    Dropout: ``dropout="off"`` puts dropout modules in eval mode while the
    generator runs; ``"fixed"`` runs component ``i``'s forward under an RNG
    seeded from ``(seed, i)``, so repeated evaluations see identical masks.

    The generator changes BatchNorm running statistics (train-mode forwards)
    and, for ``"off"``, dropout flags until it finishes or is closed: run it
    inside :func:`~clipscope.engine.guard.model_guard` when the model must stay
    untouched (:func:`~clipscope.engine.probe` does).

    ``params`` is validated (non-empty, trainable) but not otherwise used here;
    callers pass the same list to ``autograd.grad``.
    """
    check_dropout_policy(dropout)
    trainable_params(model, params)
    m = len(components)
    wanted = None if only is None else set(int(i) for i in only)
    if wanted is not None and any(not 0 <= i < m for i in wanted):
        raise IndexError(f"component indices {sorted(wanted)} out of range for m = {m}")
    sequential = bool(getattr(components, "sequential", False))
    with dropout_policy(model, dropout):
        state = None
        for i in range(m):
            if wanted is not None and i not in wanted:
                if not sequential:
                    continue
                with torch.no_grad(), rng_for_component(dropout, seed, i):
                    _, state = model(*_args(components, i, device, state))
                state = detach_state(state)
                continue
            with torch.enable_grad(), rng_for_component(dropout, seed, i):
                x, y = components.batch(i, device) if device is not None else components.batch(i)
                if sequential:
                    out, state = model(x, state)
                    state = detach_state(state)
                else:
                    out = model(x)
                loss = loss_fn(out, y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(
                    f"loss_fn must return a scalar tensor (the batch's mean loss), got "
                    f"{getattr(loss, 'shape', type(loss))} for component {i}"
                )
            yield i, loss


def _args(components: Any, i: int, device: Any, state: Any) -> tuple:
    x, _ = components.batch(i, device) if device is not None else components.batch(i)
    return x, state
