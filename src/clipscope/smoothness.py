r"""Relaxed smoothness of a model: ``‖∇²f(x)‖`` and ``‖∇²f_i(x)‖`` at its current parameters.

The paper's (A2) asks ``‖∇²f(x)‖ ≤ L0 + L1 ‖∇f(x)‖`` and (A5) the same for
every component ``f_i`` with ``L0i, L1i`` (DESIGN §3). This module measures
the pairs: the engine's Hessian-vector products (:mod:`clipscope.engine.hvp`)
fed to Lanczos or power iteration (:mod:`clipscope.math.eigen`), and Zhang et
al.'s secant between two saved model states. Fitting the constants to the
pairs is pure arithmetic: :func:`clipscope.math.smoothness.fit_l0_l1`.

* :func:`hessian_norm` -- ``‖∇²f(x)‖`` and ``‖∇f(x)‖`` (an (A2) pair);
* :func:`component_hessian_norms` -- ``‖∇²f_i(x)‖`` and ``‖∇f_i(x)‖`` (A5);
* :func:`trajectory_smoothness_from_states` -- the secant between two states.

The model is never changed (every evaluation runs under
:func:`clipscope.engine.model_guard`); a NaN/inf product raises
:class:`~clipscope.errors.NonFiniteError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from clipscope.engine.hvp import (
    HessianOperator,
    check_component_index,
    check_function,
    check_model,
    component_hessians,
    full_gradient_pass,
    hessian_context,
    prepare,
)
from clipscope.math.eigen import DEFAULT_TOL, SOLVERS, check_solver_args, solve
from clipscope.math.smoothness import trajectory_smoothness

__all__ = [
    "HessianNorm",
    "TrajectoryStep",
    "component_hessian_norms",
    "hessian_norm",
    "trajectory_smoothness_from_states",
]


def _check(model: Any, method: str, tol: Any, dropout: Any) -> None:
    check_model(model, dropout)
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    check_solver_args(1, 1, tol)


def _json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass(frozen=True)
class HessianNorm:
    """``‖∇²f(x)‖`` (or ``‖∇²f_i(x)‖``) with ``‖∇f(x)‖`` at the same point: one (A2)/(A5) pair.

    Attributes
    ----------
    hess_norm : float
        Estimate of the largest ``|eigenvalue|`` of the Hessian.
    grad_norm : float
        ``‖∇f(x)‖`` (or ``‖∇f_i(x)‖``), float64.
    method : str
        ``"power"`` or ``"lanczos"``.
    iterations : int
        Hessian-vector products used.
    converged : bool
        Whether the method's stopping rule was met.
    residual : float
        The stopping rule's relative quantity.
    tol : float
        The tolerance it was compared with.
    component : int or None
        ``None`` for ``f``, ``i`` for ``f_i``.
    n_params : int
        Dimension of the Hessian.
    """

    hess_norm: float
    grad_norm: float
    method: str
    iterations: int
    converged: bool
    residual: float
    tol: float
    component: int | None
    n_params: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (non-finite floats become ``None``)."""
        return {k: _json(v) for k, v in asdict(self).items()}


def hessian_norm(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    *,
    method: str = "lanczos",
    max_iter: int | None = None,
    tol: float = DEFAULT_TOL,
    start_seed: int = 0,
    component: int | None = None,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> HessianNorm:
    r"""Estimate ``‖∇²f(x)‖`` (largest ``|eigenvalue|``) and ``‖∇f(x)‖`` at the current parameters.

    Each Hessian-vector product is one pass over the m components (forward,
    backward with ``create_graph``, backward again); :func:`~clipscope.math.eigen.lanczos` usually
    needs far fewer products than :func:`~clipscope.math.eigen.power_iteration` for the same
    tolerance (see their stopping rules). ``‖∇f(x)‖`` comes from the first
    pass. With ``component=i`` it is ``‖∇²f_i‖`` and ``‖∇f_i‖``
    (:func:`component_hessian_norms`).

    Parameters
    ----------
    model, loss_fn, components, dropout, seed, params
        As for :func:`clipscope.engine.hvp.hvp`.
    method : {"lanczos", "power"}
        The eigenvalue solver.
    max_iter : int, optional
        Most products (default 30 for Lanczos, 100 for power iteration).
    tol : float
        Relative tolerance of the stopping rule.
    start_seed : int
        Seed of the solver's start vector (a private generator).
    component : int, optional
        Estimate for ``f_i`` instead of ``f``.

    Returns
    -------
    HessianNorm
    """
    _check(model, method, tol, dropout)
    params, n, _ = prepare(model, components, params)
    if component is not None:  # (component_hessian_norms runs the entry checks)
        i = check_component_index(component, len(components))
        return component_hessian_norms(
            model,
            loss_fn,
            components,
            method=method,
            max_iter=max_iter,
            tol=tol,
            start_seed=start_seed,
            only=[i],
            dropout=dropout,
            seed=seed,
            params=params,
        )[0]
    check_function(model, loss_fn, components, params, dropout, seed)
    device = params[0].device
    with hessian_context(model):
        op = HessianOperator(model, loss_fn, components, params, dropout, seed)
        est = solve(method, op, n, max_iter=max_iter, tol=tol, seed=start_seed, device=device)
        grad_norm = float(torch.linalg.vector_norm(op.grad))
    return HessianNorm(
        est.value, grad_norm, method, est.iterations, est.converged, est.residual, tol, None, n
    )


def component_hessian_norms(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    *,
    method: str = "lanczos",
    max_iter: int | None = None,
    tol: float = DEFAULT_TOL,
    start_seed: int = 0,
    only: Iterable[int] | None = None,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> list[HessianNorm]:
    r"""``‖∇²f_i(x)‖`` and ``‖∇f_i(x)‖`` for every component (or those in ``only``): (A5) pairs.

    One forward per component: ``∇f_i`` is built once with ``create_graph``
    and kept while the solver runs, so each product costs one backward
    through it (:func:`clipscope.engine.hvp.component_hessians`). Memory: one
    component's double-backward graph at a time. Arguments as
    :func:`hessian_norm`; the results are in component order.
    """
    _check(model, method, tol, dropout)
    params, n, _ = prepare(model, components, params)
    check_function(model, loss_fn, components, params, dropout, seed)
    wanted = None
    if only is not None:
        wanted = sorted({check_component_index(i, len(components)) for i in only})
    device = params[0].device
    out = []
    with hessian_context(model):
        for i, grad_norm, matvec in component_hessians(
            model, loss_fn, components, params, dropout=dropout, seed=seed, only=wanted
        ):
            est = solve(
                method, matvec, n, max_iter=max_iter, tol=tol, seed=start_seed, device=device
            )
            del matvec  # the graph of f_i goes before the next component's forward
            estimate = (est.value, grad_norm, method, est.iterations, est.converged)
            out.append(HessianNorm(*estimate, est.residual, tol, i, n))
    return out


@dataclass(frozen=True)
class TrajectoryStep:
    """One step ``x_a → x_b`` of a run, measured (Zhang et al.'s estimate).

    Attributes
    ----------
    estimate : float
        ``‖∇f(x_b) − ∇f(x_a)‖ / ‖x_b − x_a‖`` (NaN for a zero step).
    grad_norm : float
        ``‖∇f(x_a)‖``, the norm the estimate pairs with.
    grad_norm_next : float
        ``‖∇f(x_b)‖``.
    step_norm : float
        ``‖x_b − x_a‖`` over the trainable parameters.
    """

    estimate: float
    grad_norm: float
    grad_norm_next: float
    step_norm: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (non-finite floats become ``None``)."""
        return {k: _json(v) for k, v in asdict(self).items()}


def _model_state(state: Any) -> Mapping[str, Any]:
    if isinstance(state, (str, os.PathLike)):
        from clipscope.atomic import load_checkpoint

        state = load_checkpoint(state)
    if not isinstance(state, Mapping):
        raise TypeError(f"a model state must be a state_dict or a checkpoint path, got {state!r}")
    if "model" in state and isinstance(state["model"], Mapping):
        return state["model"]  # a clipscope checkpoint: {"model": state_dict, ...}
    return state


def trajectory_smoothness_from_states(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    state_a: Any,
    state_b: Any,
    *,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> TrajectoryStep:
    """Zhang et al.'s estimate between two saved states of ``model``.

    ``state_a``, ``state_b``: ``state_dict`` mappings, checkpoint dicts with a
    ``"model"`` entry, or paths of checkpoints written by
    :func:`clipscope.atomic.save_checkpoint` (checksum verified). Each state
    is loaded into ``model`` in turn (buffers included) and ``∇f`` computed in
    one pass; the model is restored afterwards, also on an exception.
    """
    check_model(model, dropout)
    sa, sb = _model_state(state_a), _model_state(state_b)
    params, _, _ = prepare(model, components, params)
    check_function(model, loss_fn, components, params, dropout, seed)
    points = []
    with hessian_context(model):
        for st in (sa, sb):
            model.load_state_dict(st)
            x = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
            g = full_gradient_pass(model, loss_fn, components, params, dropout, seed)
            points.append((x, g))
    (xa, ga), (xb, gb) = points
    return TrajectoryStep(
        estimate=trajectory_smoothness(xa, ga, xb, gb),
        grad_norm=float(torch.linalg.vector_norm(ga)),
        grad_norm_next=float(torch.linalg.vector_norm(gb)),
        step_norm=float(torch.linalg.vector_norm(xb - xa)),
    )
