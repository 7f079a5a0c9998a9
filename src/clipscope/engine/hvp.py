r"""Hessian-vector products of ``f = (1/m) Σ_i f_i`` at fixed parameters, and ∇f from the same pass.

``∇²f(x) v = (1/m) Σ_i ∇(⟨∇f_i(x), v⟩)`` by double backward, one pass over the
components per product, accumulated in float64 (each ``f_i`` the **mean** loss
of its batch, paper eq. (1)). The component losses come from
:func:`clipscope.engine.losses.component_losses`, so ``f_i`` is exactly the
function the probe differentiates (dropout policy, the detached state chain of
sequential components: for those it is the truncated-BPTT ``f_i``, whose
incoming state is recomputed at ``x`` and detached).

* :func:`hvp` -- one product ``∇²f(x) v`` (or ``∇²f_i(x) v``);
* :class:`HessianOperator` -- ``v ↦ ∇²f(x) v`` as a ``matvec`` for
  :mod:`clipscope.math.eigen`, which also leaves ``∇f(x)`` from its first pass;
* :func:`component_hessians` -- per component ``(i, ‖∇f_i‖, v ↦ ∇²f_i v)`` with
  the first-derivative graph kept while a solver runs;
* :func:`full_gradient` -- ``∇f(x)`` in one pass.

What the products *mean* (``‖∇²f‖``, the (L0, L1) fit) is decided elsewhere
(:mod:`clipscope.smoothness`, :mod:`clipscope.math.smoothness`).

The model is never changed: evaluations run inside :func:`hessian_context`
(:func:`~clipscope.engine.guard.model_guard`: parameters, buffers, ``.grad``,
modes and the RNG restored, also on an exception). NaN/inf gradients or
products raise :class:`~clipscope.errors.NonFiniteError` naming the component
and parameters.

Backends: double backward through cuDNN RNN kernels is not implemented
(pytorch#5878, #25315). When the model contains a ``torch.nn.RNNBase``
module (LSTM, GRU, RNN), cuDNN is switched off for the duration of the call
(``torch.backends.cudnn.enabled = False``, restored afterwards; only that flag
is touched, unlike ``torch.backends.cudnn.flags(...)`` which would also reset
``deterministic`` and ``benchmark``). On CPU, double backward through
``nn.LSTM`` with oneDNN enabled was checked against the dense float64 Hessian
(torch 2.13; agreement to 1e-15 in float64, 3e-7 absolute in float32), so oneDNN is
left on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.engine.distributed import Shard, ranks
from clipscope.engine.guard import check_dropout_policy, model_guard
from clipscope.engine.losses import (
    check_grad_compatible,
    check_repeatable,
    component_losses,
    loss_form,
    param_names,
    trainable_params,
)
from clipscope.errors import NonFiniteError

__all__ = [
    "HessianOperator",
    "check_component_index",
    "check_function",
    "check_model",
    "component_hessians",
    "double_backward_backend",
    "full_gradient",
    "full_gradient_pass",
    "hessian_context",
    "hvp",
    "prepare",
]


@contextlib.contextmanager
def double_backward_backend(model: nn.Module) -> Iterator[None]:
    """Switch cuDNN off while ``model`` holds an RNN module (no cuDNN RNN double backward)."""
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    before = torch.backends.cudnn.enabled
    try:
        if has_rnn:
            torch.backends.cudnn.enabled = False
        yield
    finally:
        torch.backends.cudnn.enabled = before


def _flatten(tensors: Sequence[torch.Tensor | None], params: list) -> torch.Tensor:
    """One float64 vector; ``None`` (a parameter the loss does not use) counts as zeros."""
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            if t is None
            else t.detach().reshape(-1).to(torch.float64)
            for t, p in zip(tensors, params, strict=True)
        ]
    )


def _unflatten(vec: torch.Tensor, params: list) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(vec[start : start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return out


def _check_finite(vec: torch.Tensor, what: str, i: int, model: nn.Module, params: list) -> Any:
    """Return ``vec``; a NaN/inf entry is a ValueError naming the component and parameter(s)."""
    if bool(torch.isfinite(vec).all()):
        return vec
    bad, start = [], 0
    for name, p in zip(param_names(model, params), params, strict=True):
        if not bool(torch.isfinite(vec[start : start + p.numel()]).all()):
            bad.append(name)
        start += p.numel()
    raise NonFiniteError(
        f"component {i}: non-finite {what} in parameter(s) {', '.join(bad)}; "
        "the model was left unchanged"
    )


def _hv_from_grads(grads: Sequence, v: torch.Tensor, params: list, retain: bool) -> torch.Tensor:
    """``∇⟨g, v⟩`` for a first-derivative graph ``g`` (zeros where ``g`` is constant in x)."""
    dot = None
    for g, u in zip(grads, _unflatten(v, params), strict=True):
        if g is not None and g.requires_grad:
            term = (g * u).sum()
            dot = term if dot is None else dot + term
    if dot is None:
        return torch.zeros_like(v)
    hv = torch.autograd.grad(dot, params, retain_graph=retain, allow_unused=True)
    return _flatten(hv, params)


def check_model(model: Any, dropout: Any = "off") -> None:
    """TypeError unless ``model`` is an ``nn.Module``; ValueError for an unknown dropout policy."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    check_dropout_policy(dropout)


def check_function(model, loss_fn, components, params: list, dropout: str, seed: int) -> None:
    """Run the probe's entry checks before Hessian-vector products: f must be a function of x.

    :func:`~clipscope.engine.losses.check_repeatable` (component 0 twice; under
    ``"off"`` no random draw at all, so a train-mode attention that applies its
    own dropout is refused) and
    :func:`~clipscope.engine.losses.check_grad_compatible` (the same with
    gradients on; no reentrant checkpointing). Costs three forwards of one
    component. Raises ValueError as they do.
    """
    kw = {"form": loss_form(loss_fn), "dropout": dropout, "seed": seed}
    device = params[0].device if params else torch.device("cpu")
    with hessian_context(model):  # the forwards the products will run (cuDNN off for RNNs)
        check_repeatable(model, loss_fn, components, device=device, **kw)
        check_grad_compatible(model, loss_fn, components, device=device, **kw)


def check_component_index(component: Any, m: int) -> int:
    """Return ``component`` as an int in ``[0, m)``; TypeError / IndexError otherwise."""
    if isinstance(component, bool) or not isinstance(component, (int, np.integer)):
        raise TypeError(f"component must be an int index, got {component!r}")
    if not 0 <= int(component) < m:
        raise IndexError(f"component {component} out of range for m = {m}")
    return int(component)


class HessianOperator:
    """``v ↦ ∇²f(x) v`` for ``f = (1/m) Σ f_i``: one pass over the components per product.

    The first product also accumulates ``∇f(x) = (1/m) Σ ∇f_i(x)`` (float64),
    which costs nothing extra since ``∇f_i`` is built anyway.

    Under an initialised ``torch.distributed`` process group (``distributed=None``,
    the default; False: this process only) every rank must build it and call it
    alike: each rank differentiates its block of components
    (:class:`~clipscope.engine.distributed.Shard`) and the float64 sums are
    all-reduced, so every rank gets the same product (a solver on top runs
    identically everywhere).

    Call it inside :func:`hessian_context` (the model guarded, cuDNN RNNs off,
    grad mode on); ``params`` is the list from :func:`prepare`. Raises
    :class:`~clipscope.errors.NonFiniteError` naming the component and the
    parameters when a gradient or a product is NaN/inf.
    """

    def __init__(
        self, model, loss_fn, components, params, dropout="off", seed=0, *, distributed=None
    ) -> None:
        self.args = (model, loss_fn, components)
        self.params = params
        self.m = len(components)
        self.shard = Shard(self.m, ranks(distributed))
        self.kw = {"dropout": dropout, "seed": seed, "params": params, "only": self.shard.only}
        self.grad: torch.Tensor | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``∇²f(x) v`` (float64) for a flat float64 ``v``."""
        acc = torch.zeros_like(v, dtype=torch.float64)
        gacc = torch.zeros_like(acc) if self.grad is None else None
        with self.shard.together():
            stream = self.shard.losses(component_losses(*self.args, **self.kw))
            with contextlib.closing(stream) as losses:
                for i, loss in losses:
                    grads = torch.autograd.grad(
                        loss, self.params, create_graph=True, allow_unused=True
                    )
                    if gacc is not None:
                        g = _flatten(grads, self.params)
                        gacc += _check_finite(g, "gradient", i, self.args[0], self.params)
                    hv = _hv_from_grads(grads, v, self.params, retain=False)
                    acc += _check_finite(hv, "Hessian-vector product", i, self.args[0], self.params)
            if gacc is not None:
                both = self.shard.sum_(torch.stack([acc, gacc]))  # one all-reduce for the two sums
                acc, gacc = both[0], both[1]
            else:
                self.shard.sum_(acc)
        if gacc is not None:
            self.grad = gacc / self.m
        return acc / self.m


def prepare(model, components, params=None, vector=None):
    """Return ``(params, n, v)``: trainable parameters, their count, ``vector`` flat float64."""
    params = trainable_params(model, params)
    if len(components) < 1:
        raise ValueError("components is empty (m = 0)")
    n = sum(p.numel() for p in params)
    if vector is None:
        return params, n, None
    if isinstance(vector, torch.Tensor):
        vec = vector
    else:
        vec = torch.cat([torch.as_tensor(t).reshape(-1) for t in vector])
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(
            f"vector must have {n} entries (the trainable parameters), got {vec.shape}"
        )
    vec = vec.to(device=params[0].device, dtype=torch.float64)
    if not bool(torch.isfinite(vec).all()):
        raise ValueError("vector has NaN or infinite entries")
    return params, n, vec


def hvp(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    vector: torch.Tensor | Sequence[torch.Tensor],
    *,
    component: int | None = None,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Return ``∇²f(x) v`` (or ``∇²f_i(x) v``) at the current parameters, as a float64 vector.

    ``∇²f(x) v = (1/m) Σ_i ∇_x ⟨∇f_i(x), v⟩`` (double backward per component,
    float64 accumulation; products inside one component run in the
    parameters' dtype). The model is left untouched (:func:`model_guard`).

    Parameters
    ----------
    model, loss_fn, components, dropout, seed, params
        As for :func:`clipscope.engine.probe`; ``loss_fn`` returns the batch's
        **mean** loss, ``f = (1/m) Σ_i f_i``.
    vector : Tensor or sequence of Tensor
        ``v``: one flat vector over the trainable parameters (in
        ``model.parameters()`` order, tied weights once) or tensors shaped
        like them.
    component : int, optional
        ``i``: the product with ``∇²f_i`` instead of ``∇²f``.

    Returns
    -------
    Tensor
        Flat float64 vector on the parameters' device.
    """
    check_model(model, dropout)
    params, _, vec = prepare(model, components, params, vector)
    check_function(model, loss_fn, components, params, dropout, seed)
    if component is not None:
        component = check_component_index(component, len(components))
    with hessian_context(model):
        if component is None:
            return HessianOperator(model, loss_fn, components, params, dropout, seed)(vec)
        losses = component_losses(
            model, loss_fn, components, dropout=dropout, seed=seed, params=params, only=[component]
        )
        with contextlib.closing(losses):
            i, loss = next(losses)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            out = _hv_from_grads(grads, vec, params, retain=False)
            return _check_finite(out, "Hessian-vector product", i, model, params)


def full_gradient(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    *,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``∇f(x) = (1/m) Σ_i ∇f_i(x)`` as one float64 vector (one pass; the model untouched)."""
    check_model(model, dropout)
    params, _, _ = prepare(model, components, params)
    check_function(model, loss_fn, components, params, dropout, seed)
    with hessian_context(model):
        return full_gradient_pass(model, loss_fn, components, params, dropout, seed)


def full_gradient_pass(model, loss_fn, components, params, dropout, seed) -> torch.Tensor:
    """One pass: ``∇f(x)`` as a float64 vector; the caller holds :func:`hessian_context`."""
    acc = None
    losses = component_losses(model, loss_fn, components, dropout=dropout, seed=seed, params=params)
    with contextlib.closing(losses):
        for i, loss in losses:
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = _check_finite(_flatten(g, params), "gradient", i, model, params)
            acc = g if acc is None else acc + g
    return acc / len(components)


@contextlib.contextmanager
def hessian_context(model: nn.Module) -> Iterator[None]:
    """Guard the model, switch cuDNN RNNs off and enable grad: where the operators run."""
    with model_guard(model), double_backward_backend(model), torch.enable_grad():
        yield


def component_hessians(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    params: list,
    *,
    dropout: str = "off",
    seed: int = 0,
    only: Iterable[int] | None = None,
) -> Iterator[tuple[int, float, Callable[[torch.Tensor], torch.Tensor]]]:
    """Yield ``(i, ‖∇f_i(x)‖, v ↦ ∇²f_i(x) v)`` for each component (or those in ``only``).

    One forward per component: ``∇f_i`` is built once with ``create_graph`` and
    kept while the caller uses the ``matvec`` (each product is one backward
    through it); advancing the generator frees that graph. Memory: one
    component's double-backward graph at a time. Run it inside
    :func:`hessian_context`; ``params`` is the list from :func:`prepare`.
    """
    losses = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, params=params, only=only
    )
    with contextlib.closing(losses):
        for i, loss in losses:
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            flat = _check_finite(_flatten(grads, params), "gradient", i, model, params)
            grad_norm = float(torch.linalg.vector_norm(flat))

            def matvec(v, grads=grads, i=i):
                hv = _hv_from_grads(grads, v, params, retain=True)
                return _check_finite(hv, "Hessian-vector product", i, model, params)

            yield i, grad_norm, matvec
            del grads, matvec  # frees this component's graph before the next forward
