r"""Relaxed smoothness: ‖∇²f‖ by Hessian-vector products, and the (L0, L1) fit.

The paper's (A2) asks ``‖∇²f(x)‖ ≤ L0 + L1 ‖∇f(x)‖`` and (A5) the same for
every component ``f_i`` with ``L0i, L1i`` (DESIGN §3). This module measures
both sides at points of a run and fits the constants.

Three layers, from pure to model-bound:

* **Linear algebra** on a ``matvec`` callable (no model, no autograd):
  :func:`power_iteration` and :func:`lanczos` estimate ``‖H‖ = max |λ(H)|`` of a
  symmetric operator ``H``; :func:`trajectory_smoothness` and
  :func:`trajectory_pairs` work on flat parameter and gradient vectors;
  :func:`fit_l0_l1` fits the envelope to ``(‖∇f‖, ‖∇²f‖)`` pairs.
* **Hessian-vector products** of ``f = (1/m) Σ_i f_i`` (paper eq. (1), each
  ``f_i`` the **mean** loss of its batch) at fixed parameters:
  ``∇²f(x) v = (1/m) Σ_i ∇(⟨∇f_i(x), v⟩)`` by double backward, one pass over
  the components per product, accumulated in float64 (:func:`hvp`,
  :func:`hessian_norm`), and the per-component ``‖∇²f_i‖`` for (A5)
  (:func:`component_hessian_norms`, one forward per component: its
  first-derivative graph is kept while the solver runs).
* **Trajectory estimate** of Zhang et al. (2020) from two model states
  (:func:`trajectory_smoothness_from_states`).

The model is never changed: every evaluation runs inside
:func:`clipscope.engine.model_guard` (parameters, buffers such as BatchNorm
running statistics, ``.grad``, train/eval flags and the RNG are restored, also
on an exception), and the components' losses come from
:func:`clipscope.engine.component_losses` (dropout policy, the detached state
chain of sequential components), so ``f_i`` is exactly the function the probe
differentiates. For sequential components this is the truncated-BPTT
``f_i``: its incoming state is recomputed at ``x`` and detached, so the
Hessian does not flow into earlier windows.

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
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.engine import component_losses, model_guard, param_names, trainable_params
from clipscope.engine.guard import check_dropout_policy

__all__ = [
    "FIT_FLAGS",
    "EigenEstimate",
    "HessianNorm",
    "SmoothnessFit",
    "SmoothnessProbe",
    "TrajectoryStep",
    "component_hessian_norms",
    "fit_components",
    "fit_l0_l1",
    "full_gradient",
    "hessian_norm",
    "hvp",
    "lanczos",
    "power_iteration",
    "trajectory_pairs",
    "trajectory_smoothness",
    "trajectory_smoothness_from_states",
]

METHODS = ("lanczos", "power")
FIT_METHODS = ("hull", "quantile")
DEFAULT_TOL = 1e-4
DEFAULT_MAX_ITER = {"power": 100, "lanczos": 30}

#: What each flag of :class:`SmoothnessFit` means.
FIT_FLAGS = {
    "nonfinite_dropped": "pairs with a NaN or infinite value were dropped",
    "too_few_points": "fewer than two usable pairs: L0, L1 are NaN",
    "equal_grad_norms": "every gradient norm is the same: the slope is not identified, NaN",
    "negative_slope_clamped": "the best unconstrained line falls; L1 was clamped to 0",
    "negative_intercept_clamped": "the best unconstrained line has L0 < 0; L0 was clamped to 0",
}

# A point counts as above a fitted line when y > line · (1 + ABOVE_RTOL).
ABOVE_RTOL = 1e-9
# The fits evaluate every candidate slope while (candidates × points) stays below this.
EXHAUSTIVE_WORK = 50_000_000


# -- linear algebra on a matvec ------------------------------------------------
@dataclass(frozen=True)
class EigenEstimate:
    """An estimate of ``‖H‖ = max |λ(H)|`` of a symmetric operator.

    Attributes
    ----------
    value : float
        The estimate (≥ 0).
    iterations : int
        Products ``H v`` used.
    converged : bool
        Whether the stopping rule of the method was met within ``max_iter``.
    residual : float
        The quantity the stopping rule compares with ``tol`` (relative).
    method : str
        ``"power"`` or ``"lanczos"``.
    """

    value: float
    iterations: int
    converged: bool
    residual: float
    method: str


def _check_solver_args(n: Any, max_iter: Any, tol: Any) -> tuple[int, int, float]:
    for name, v in (("n", n), ("max_iter", max_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    return n, max_iter, float(tol)


def _start_vector(n: int, seed: int, device: Any) -> torch.Tensor:
    # A private generator: the caller's RNG stream is not consumed.
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    return v / torch.linalg.vector_norm(v)


def _apply(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    w = matvec(v)
    if not isinstance(w, torch.Tensor) or w.shape != v.shape:
        raise ValueError(f"matvec must return a tensor of shape {tuple(v.shape)}")
    w = w.to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the Hessian-vector product is not finite (NaN or inf)")
    return w


def power_iteration(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    max_iter: int = DEFAULT_MAX_ITER["power"],
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> EigenEstimate:
    r"""Estimate ``‖H‖ = max |λ(H)|`` of a symmetric ``H`` by power iteration.

    ``v_0`` is a unit Gaussian vector (seeded, private generator);
    ``μ_k = ‖H v_k‖`` and ``v_{k+1} = H v_k / μ_k``. Since
    ``μ_k = ‖H^{k+1} v_0‖ / ‖H^k v_0‖``, the sequence is nondecreasing
    (Cauchy–Schwarz) and every ``μ_k ≤ ‖H‖``: a lower bound that converges to
    ``‖H‖`` at rate ``(|λ_2|/|λ_1|)^{2k}`` — also when ``λ`` and ``−λ`` are
    both extreme, where the Rayleigh quotient would oscillate.

    Stopping rule: ``|μ_k − μ_{k−1}| ≤ tol · μ_k`` (relative change; the
    ``residual`` reported), or ``μ_k = 0`` (then ``H v_0 = 0``: for a random
    ``v_0`` this means ``H = 0`` with probability one).

    Parameters
    ----------
    matvec : callable
        ``v ↦ H v`` on float64 vectors of shape ``(n,)``.
    n : int
        Dimension.
    max_iter : int
        Most products ``H v``.
    tol : float
        Relative tolerance in (0, 1).
    seed : int
        Seed of the start vector.
    device : torch.device or str, optional
        Where the vectors live.

    Returns
    -------
    EigenEstimate

    Examples
    --------
    >>> H = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))
    >>> est = power_iteration(lambda v: H @ v, 3, tol=1e-12, max_iter=500)
    >>> round(est.value, 8), est.converged
    (3.0, True)
    """
    n, max_iter, tol = _check_solver_args(n, max_iter, tol)
    v = _start_vector(n, seed, device)
    mu_prev, residual = math.nan, math.inf
    for k in range(1, max_iter + 1):
        w = _apply(matvec, v)
        mu = float(torch.linalg.vector_norm(w))
        if mu == 0.0:
            return EigenEstimate(0.0, k, True, 0.0, "power")
        if k > 1:
            residual = abs(mu - mu_prev) / mu
            if residual <= tol:
                return EigenEstimate(mu, k, True, residual, "power")
        v, mu_prev = w / mu, mu
    return EigenEstimate(mu_prev, max_iter, False, residual, "power")


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    max_iter: int = DEFAULT_MAX_ITER["lanczos"],
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> EigenEstimate:
    r"""Estimate ``‖H‖ = max |λ(H)|`` of a symmetric ``H`` by Lanczos with full reorthogonalization.

    After ``k`` products the Krylov basis ``Q_k`` (orthonormal, kept in
    float64 and re-orthogonalized twice against all previous vectors: memory
    ``k · n · 8`` bytes) gives the tridiagonal ``T_k = Q_kᵀ H Q_k``; its
    eigenpairs ``(θ_j, s_j)`` are the Ritz pairs. The estimate is the Ritz value
    of largest ``|θ|``, ``θ*``.

    Stopping rule: the Ritz residual ``‖H Q_k s − θ* Q_k s‖ = β_k |s_k|``
    (``s_k`` the last entry of ``θ*``'s eigenvector, ``β_k`` the next
    off-diagonal) satisfies ``β_k |s_k| ≤ tol · |θ*|`` (``residual`` reports the
    ratio); then ``H`` has an eigenvalue within ``tol·|θ*|`` of ``θ*``. Also
    stops, converged, when the Krylov space is invariant (``β_k ≈ 0``) or has
    reached dimension ``n``. As with any Krylov method, a start vector nearly
    orthogonal to the top eigenvector can make it converge to a smaller one.

    Parameters and return value as :func:`power_iteration`.

    Examples
    --------
    >>> H = torch.diag(torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64))
    >>> est = lanczos(lambda v: H @ v, 3)
    >>> round(est.value, 12), est.converged, est.iterations
    (3.0, True, 3)
    """
    n, max_iter, tol = _check_solver_args(n, max_iter, tol)
    q = _start_vector(n, seed, device)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    value, residual = math.nan, math.inf
    for k in range(1, min(max_iter, n) + 1):
        w = _apply(matvec, q)
        alphas.append(float(q @ w))
        Q = torch.stack(basis)
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough")
            w = w - Q.T @ (Q @ w)
        beta = float(torch.linalg.vector_norm(w))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        j = int(torch.argmax(theta.abs()))
        value = abs(float(theta[j]))
        scale = max(value, float(theta.abs().max()), 1e-300)
        residual = beta * abs(float(S[-1, j])) / scale
        invariant = beta <= 1e-12 * max(scale, float(np.abs(alphas).max()), 1e-300)
        if residual <= tol or invariant or k == n:
            return EigenEstimate(value, k, True, residual, "lanczos")
        q = w / beta
        betas.append(beta)
        basis.append(q)
    return EigenEstimate(value, min(max_iter, n), False, residual, "lanczos")


def _solve(
    method: str, matvec: Callable, n: int, max_iter: int | None, tol: float, seed: int, device: Any
) -> EigenEstimate:
    solver = power_iteration if method == "power" else lanczos
    iters = DEFAULT_MAX_ITER[method] if max_iter is None else max_iter
    return solver(matvec, n, max_iter=iters, tol=tol, seed=seed, device=device)


# -- Hessian-vector products of the model --------------------------------------
@contextlib.contextmanager
def _double_backward_backend(model: nn.Module) -> Iterator[None]:
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
    raise ValueError(
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


def _check_common(
    model: Any, method: str | None = None, tol: Any = DEFAULT_TOL, dropout: Any = "off"
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    check_dropout_policy(dropout)
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_solver_args(1, 1, tol)


def _check_index(component: Any, m: int) -> int:
    if isinstance(component, bool) or not isinstance(component, (int, np.integer)):
        raise TypeError(f"component must be an int index, got {component!r}")
    if not 0 <= int(component) < m:
        raise IndexError(f"component {component} out of range for m = {m}")
    return int(component)


class _FullObjective:
    """``v ↦ ∇²f(x) v`` for ``f = (1/m) Σ f_i``: one pass over the components per product.

    The first product also accumulates ``∇f(x) = (1/m) Σ ∇f_i(x)`` (float64),
    which costs nothing extra since ``∇f_i`` is built anyway.
    """

    def __init__(self, model, loss_fn, components, params, dropout, seed) -> None:
        self.args = (model, loss_fn, components)
        self.kw = {"dropout": dropout, "seed": seed, "params": params}
        self.params = params
        self.m = len(components)
        self.grad: torch.Tensor | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros_like(v, dtype=torch.float64)
        gacc = torch.zeros_like(acc) if self.grad is None else None
        with contextlib.closing(component_losses(*self.args, **self.kw)) as losses:
            for i, loss in losses:
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                if gacc is not None:
                    g = _flatten(grads, self.params)
                    gacc += _check_finite(g, "gradient", i, self.args[0], self.params)
                hv = _hv_from_grads(grads, v, self.params, retain=False)
                acc += _check_finite(hv, "Hessian-vector product", i, self.args[0], self.params)
        if gacc is not None:
            self.grad = gacc / self.m
        return acc / self.m


def _prepare(model, components, params, vector=None):
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
    _check_common(model, dropout=dropout)
    params, _, vec = _prepare(model, components, params, vector)
    if component is not None:
        component = _check_index(component, len(components))
    with model_guard(model), _double_backward_backend(model), torch.enable_grad():
        if component is None:
            return _FullObjective(model, loss_fn, components, params, dropout, seed)(vec)
        losses = component_losses(
            model, loss_fn, components, dropout=dropout, seed=seed, params=params, only=[component]
        )
        with contextlib.closing(losses):
            i, loss = next(losses)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            out = _hv_from_grads(grads, vec, params, retain=False)
            return _check_finite(out, "Hessian-vector product", i, model, params)


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


def _json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


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
    backward with ``create_graph``, backward again); :func:`lanczos` usually
    needs far fewer products than :func:`power_iteration` for the same
    tolerance (see their stopping rules). ``‖∇f(x)‖`` comes from the first
    pass. With ``component=i`` it is ``‖∇²f_i‖`` and ``‖∇f_i‖``
    (:func:`component_hessian_norms`).

    Parameters
    ----------
    model, loss_fn, components, dropout, seed, params
        As for :func:`hvp`.
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
    _check_common(model, method, tol, dropout)
    params, n, _ = _prepare(model, components, params)
    if component is not None:
        i = _check_index(component, len(components))
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
    device = params[0].device
    with model_guard(model), _double_backward_backend(model), torch.enable_grad():
        op = _FullObjective(model, loss_fn, components, params, dropout, seed)
        est = _solve(method, op, n, max_iter, tol, start_seed, device)
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
    through it. Memory: one component's double-backward graph at a time.
    Arguments as :func:`hessian_norm`; the results are in component order.
    """
    _check_common(model, method, tol, dropout)
    params, n, _ = _prepare(model, components, params)
    wanted = None
    if only is not None:
        wanted = sorted({_check_index(i, len(components)) for i in only})
    device = params[0].device
    out = []
    with model_guard(model), _double_backward_backend(model), torch.enable_grad():
        losses = component_losses(
            model, loss_fn, components, dropout=dropout, seed=seed, params=params, only=wanted
        )
        with contextlib.closing(losses):
            for i, loss in losses:
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                grad_norm = float(
                    torch.linalg.vector_norm(
                        _check_finite(_flatten(grads, params), "gradient", i, model, params)
                    )
                )

                def matvec(v, grads=grads, i=i):
                    hv = _hv_from_grads(grads, v, params, retain=True)
                    return _check_finite(hv, "Hessian-vector product", i, model, params)

                est = _solve(method, matvec, n, max_iter, tol, start_seed, device)
                del grads, matvec  # frees this component's graph before the next forward
                out.append(
                    HessianNorm(
                        est.value,
                        grad_norm,
                        method,
                        est.iterations,
                        est.converged,
                        est.residual,
                        tol,
                        i,
                        n,
                    )
                )
    return out


# -- the trajectory estimate of Zhang et al. -----------------------------------
def _flat64(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite entries")
    return t


def trajectory_smoothness(x0: Any, g0: Any, x1: Any, g1: Any) -> float:
    r"""Zhang et al.'s local smoothness estimate ``‖∇f(x_1) − ∇f(x_0)‖ / ‖x_1 − x_0‖``.

    Flat vectors (tensors or arrays) of parameters ``x`` and full gradients
    ``g = ∇f(x)``, computed in float64. ``NaN`` when ``x_1 = x_0`` (no step).
    For an ``(L0, L1)``-smooth ``f`` and a short step it is at most about
    ``L0 + L1 ‖∇f(x_0)‖``, so it pairs with ``‖∇f(x_0)‖`` (J. Zhang, T. He,
    S. Sra, A. Jadbabaie, "Why gradient clipping accelerates training", ICLR
    2020, Fig. 1). It never exceeds the largest ``‖∇²f‖`` on the segment.

    >>> trajectory_smoothness([0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [3.0, 4.0])
    5.0
    """
    x0, g0, x1, g1 = (_flat64(v, n) for v, n in ((x0, "x0"), (g0, "g0"), (x1, "x1"), (g1, "g1")))
    if not x0.shape == g0.shape == x1.shape == g1.shape:
        raise ValueError(
            f"x0, g0, x1, g1 must have the same length, got "
            f"{x0.numel()}, {g0.numel()}, {x1.numel()}, {g1.numel()}"
        )
    step = float(torch.linalg.vector_norm(x1 - x0))
    if step == 0.0:
        return math.nan
    return float(torch.linalg.vector_norm(g1 - g0)) / step


def trajectory_pairs(xs: Sequence[Any], gs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(‖∇f(x_k)‖, L̂_k)`` for ``k = 0 … K−1`` along ``x_0 … x_K``: inputs of :func:`fit_l0_l1`.

    ``L̂_k = ‖g_{k+1} − g_k‖ / ‖x_{k+1} − x_k‖`` (:func:`trajectory_smoothness`).

    >>> gn, L = trajectory_pairs([[0.0], [1.0], [3.0]], [[0.0], [2.0], [6.0]])
    >>> gn.tolist(), L.tolist()
    ([0.0, 2.0], [2.0, 2.0])
    """
    if len(xs) != len(gs):
        raise ValueError(f"xs and gs must have the same length, got {len(xs)} and {len(gs)}")
    grad_norms = np.array([float(torch.linalg.vector_norm(_flat64(g, "g"))) for g in gs[:-1]])
    est = np.array(
        [trajectory_smoothness(xs[k], gs[k], xs[k + 1], gs[k + 1]) for k in range(len(xs) - 1)]
    )
    return grad_norms, est


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
    _check_common(model, dropout=dropout)
    params, _, _ = _prepare(model, components, params)
    with model_guard(model), _double_backward_backend(model), torch.enable_grad():
        return _full_gradient(model, loss_fn, components, params, dropout, seed)


def _full_gradient(model, loss_fn, components, params, dropout, seed) -> torch.Tensor:
    acc = None
    losses = component_losses(model, loss_fn, components, dropout=dropout, seed=seed, params=params)
    with contextlib.closing(losses):
        for i, loss in losses:
            g = torch.autograd.grad(loss, params, allow_unused=True)
            g = _check_finite(_flatten(g, params), "gradient", i, model, params)
            acc = g if acc is None else acc + g
    return acc / len(components)


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
    _check_common(model, dropout=dropout)
    sa, sb = _model_state(state_a), _model_state(state_b)
    params, _, _ = _prepare(model, components, params)
    points = []
    with model_guard(model), _double_backward_backend(model), torch.enable_grad():
        for st in (sa, sb):
            model.load_state_dict(st)
            x = _flatten(params, params)
            g = _full_gradient(model, loss_fn, components, params, dropout, seed)
            points.append((x, g))
    (xa, ga), (xb, gb) = points
    return TrajectoryStep(
        estimate=trajectory_smoothness(xa, ga, xb, gb),
        grad_norm=float(torch.linalg.vector_norm(ga)),
        grad_norm_next=float(torch.linalg.vector_norm(gb)),
        step_norm=float(torch.linalg.vector_norm(xb - xa)),
    )


# -- the (L0, L1) fit ----------------------------------------------------------
@dataclass(frozen=True)
class SmoothnessFit:
    r"""``(L0, L1)`` with ``‖∇²f‖ ≤ L0 + L1 ‖∇f‖`` fitted to observed pairs (:func:`fit_l0_l1`).

    Attributes
    ----------
    L0, L1 : float
        The line's intercept and slope (≥ 0), NaN when the data are degenerate.
    method : str
        ``"hull"`` or ``"quantile"``.
    n_points : int
        Pairs used (after dropping non-finite ones).
    n_above : int
        Used pairs strictly above the line (``y > line·(1 + 1e-9)``); 0 for
        the hull and when nothing was fitted.
    flags : tuple of str
        Keys of :data:`FIT_FLAGS`; empty for a clean fit.
    x_range : tuple of float
        ``(min, max)`` of the used gradient norms (NaN when none).
    quantile : float or None
        The quantile level of the ``"quantile"`` method.
    n_dropped : int
        Non-finite pairs dropped.
    """

    L0: float
    L1: float
    method: str
    n_points: int
    n_above: int
    flags: tuple[str, ...] = ()
    x_range: tuple[float, float] = (math.nan, math.nan)
    quantile: float | None = None
    n_dropped: int = 0
    messages: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        """Whether a line was fitted (L0 and L1 finite)."""
        return math.isfinite(self.L0) and math.isfinite(self.L1)

    def bound(self, grad_norm: Any) -> Any:
        """``L0 + L1 · ‖∇f‖``: the fitted bound on ``‖∇²f‖``."""
        return self.L0 + self.L1 * np.asarray(grad_norm, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (non-finite floats become ``None``)."""
        d = asdict(self)
        d["flags"] = list(self.flags)
        d["messages"] = list(self.messages)
        d["x_range"] = [_json(float(v)) for v in self.x_range]
        return {k: _json(v) for k, v in d.items()}


def _as_pairs(grad_norms: Any, hess_norms: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(grad_norms, dtype=np.float64)
    y = np.asarray(hess_norms, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"grad_norms and hess_norms must be 1-D of the same length, got shapes "
            f"{x.shape} and {y.shape}"
        )
    for name, a in (("grad_norms", x), ("hess_norms", y)):
        bad = np.flatnonzero(a < 0)
        if bad.size:
            raise ValueError(f"{name} must be >= 0 (norms), got {a[bad[0]]} at index {bad[0]}")
    return x, y


def _upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper convex hull, left to right (Andrew's monotone chain)."""
    order = np.lexsort((y, x))
    hx: list[float] = []
    hy: list[float] = []
    for px, py in zip(x[order], y[order], strict=True):
        if hx and hx[-1] == px:  # same x: the larger y (sorted last) wins
            hx.pop()
            hy.pop()
        while (
            len(hx) >= 2
            and (hx[-1] - hx[-2]) * (py - hy[-2]) - (hy[-1] - hy[-2]) * (px - hx[-2]) >= 0
        ):  # the middle point is on or below the chord
            hx.pop()
            hy.pop()
        hx.append(float(px))
        hy.append(float(py))
    return np.array(hx), np.array(hy)


def _profile_argmin(
    phi: Callable[[np.ndarray], np.ndarray], cands: np.ndarray, n: int
) -> tuple[float, float]:
    """Minimize a convex profile ``φ(L1)`` over its sorted candidate breakpoints.

    Every candidate is evaluated (chunked, vectorized) while
    ``len(cands) · n ≤ EXHAUSTIVE_WORK``; ties go to the smallest L1. Beyond
    that, a binary search on the sign of ``φ(c_{k+1}) − φ(c_k)``: exact in
    exact arithmetic; in floating point a near-tie may stop it slightly
    (relative ~1e-7) above the optimum.
    """
    if len(cands) == 0:
        return math.nan, math.nan
    if len(cands) * n <= EXHAUSTIVE_WORK:
        step = max(1, (1 << 20) // max(n, 1))
        vals = np.concatenate([phi(cands[s : s + step]) for s in range(0, len(cands), step)])
        j = int(np.argmin(vals))
        return float(cands[j]), float(vals[j])

    def at(k: int) -> float:
        return float(phi(cands[k : k + 1])[0])

    lo, hi = 0, len(cands) - 1
    while hi - lo > 2:
        mid = (lo + hi) // 2
        if at(mid) <= at(mid + 1):
            hi = mid + 1
        else:
            lo = mid + 1
    best = min(range(max(lo - 1, 0), min(hi + 2, len(cands))), key=at)
    return float(cands[best]), at(best)


def _finite_or_inf(v: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(v), v, np.inf)


def _fit_hull(x: np.ndarray, y: np.ndarray) -> tuple[float, float, list[str]]:
    """Find the line above all points with L0, L1 ≥ 0 of least value at the midpoint x̄.

    For fixed L1 the least feasible intercept is ``max(0, max_j(y_j − L1 x_j))``
    (attained on an upper-hull vertex), so the objective
    ``φ(L1) = max(0, max_v(y_v − L1 x_v)) + L1 x̄`` is convex and piecewise
    linear with breakpoints among 0, the hull's edge slopes and ``y_v / x_v``.
    """
    hx, hy = _upper_hull(x, y)
    xbar = 0.5 * (x.min() + x.max())
    with np.errstate(over="ignore"):  # near-vertical edges: an infinite slope is no candidate
        slopes = np.diff(hy) / np.diff(hx)
        cands = np.concatenate([[0.0], slopes, hy[hx > 0] / hx[hx > 0]])
    cands = np.unique(cands[np.isfinite(cands) & (cands >= 0)])

    def phi(L1: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            top = np.max(hy[None, :] - L1[:, None] * hx[None, :], axis=1)
            return _finite_or_inf(np.maximum(top, 0.0) + L1 * xbar)

    L1, value = _profile_argmin(phi, cands, len(hx))  # L1 = 0 is a candidate: value finite
    L0 = max(0.0, float(np.max(hy - L1 * hx)))
    # Unconstrained optimum: the upper concave envelope at x̄ (interpolated on the hull).
    free = float(np.interp(xbar, hx, hy))
    flags = []
    if value > free * (1 + 1e-12) + 1e-300:
        if L1 == 0.0:
            flags.append("negative_slope_clamped")
        if L0 == 0.0:
            flags.append("negative_intercept_clamped")
    return L0, L1, flags


def _fit_quantile(x: np.ndarray, y: np.ndarray, q: float) -> tuple[float, float, list[str]]:
    """Linear quantile regression at level q with L0, L1 ≥ 0, solved exactly.

    Minimizes ``Σ_j ρ_q(y_j − L0 − L1 x_j)`` (``ρ_q(u) = u(q − 1{u<0})``). For
    fixed L1 the best intercept is a q-quantile of ``y − L1 x`` (the
    ``⌈nq⌉``-th smallest, clamped at 0); the profile in L1 is convex with
    breakpoints at pair slopes, ``y_j/x_j`` and 0 (vertices of the LP), so
    minimizing over those candidates is exact. O(n²) candidates.
    """
    n = len(x)
    k = max(math.ceil(n * q) - 1, 0)

    def intercepts(L1: np.ndarray, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            r = y[None, :] - L1[:, None] * x[None, :]
        b = np.partition(r, k, axis=1)[:, k]
        return r, (np.maximum(b, 0.0) if clamp else b)

    def profile(clamp: bool) -> Callable[[np.ndarray], np.ndarray]:
        def phi(L1: np.ndarray) -> np.ndarray:
            r, b = intercepts(L1, clamp)
            with np.errstate(over="ignore", invalid="ignore"):
                u = r - b[:, None]
                return _finite_or_inf(np.sum(np.where(u >= 0, q * u, (q - 1) * u), axis=1))

        return phi

    iu, ju = np.triu_indices(n, 1)
    dx = x[ju] - x[iu]
    keep = dx != 0
    with np.errstate(over="ignore"):  # near-vertical pairs: an infinite slope is no candidate
        pair = (y[ju] - y[iu])[keep] / dx[keep]
        cons = np.concatenate([[0.0], pair, y[x > 0] / x[x > 0]])
    free_c = np.unique(pair[np.isfinite(pair)])
    cons = np.unique(cons[np.isfinite(cons) & (cons >= 0)])
    L1, value = _profile_argmin(profile(True), cons, n)
    L0 = float(intercepts(np.array([L1]), True)[1][0])
    _, free = _profile_argmin(profile(False), free_c, n)
    flags = []
    if value > free * (1 + 1e-12) + 1e-300:  # False when free is NaN (no finite pair slope)
        if L1 == 0.0:
            flags.append("negative_slope_clamped")
        if L0 == 0.0:
            flags.append("negative_intercept_clamped")
    return L0, L1, flags


def fit_l0_l1(
    grad_norms: Any,
    hess_norms: Any,
    method: str = "hull",
    *,
    quantile: float = 0.95,
) -> SmoothnessFit:
    r"""Fit ``(L0, L1)`` of (A2)/(A5), ``‖∇²f‖ ≤ L0 + L1‖∇f‖``, to observed pairs.

    Points ``(x_j, y_j) = (‖∇f(x_j)‖, ‖∇²f(x_j)‖)``; lines ``y = L0 + L1 x``
    with ``L0 ≥ 0``, ``L1 ≥ 0``.

    * ``"hull"`` (the upper envelope): among lines above **every** point,
      the one of least area over the observed range ``[x_min, x_max]``.
      That area is ``(x_max − x_min)(L0 + L1 x̄)`` with ``x̄`` the midpoint, so
      this minimizes the line's value at ``x̄``: a two-variable LP whose
      solution, without the sign constraints, is the supporting line of the
      upper convex hull at ``x̄``. Solved exactly on the hull's vertices
      (ties: the smallest L1). ``n_above`` is 0.
    * ``"quantile"``: linear quantile regression at level ``quantile`` (in
      (0, 1); Koenker–Bassett pinball loss) with the same sign constraints,
      solved exactly; at most ``n(1 − quantile)`` points lie strictly above,
      and ``n_above`` counts them. Less sensitive than the hull to a few
      outlying estimates (an unconverged eigenvalue solve, say).

    Degenerate data give a result with ``flags`` (:data:`FIT_FLAGS`) instead
    of an error (edge case 27): non-finite pairs are dropped
    (``"nonfinite_dropped"``); fewer than two pairs or all gradient norms
    equal give ``L0 = L1 = NaN``; when the best unconstrained line has a
    negative slope (or intercept) it is clamped to 0 and flagged.

    Parameters
    ----------
    grad_norms, hess_norms : array_like
        1-D, same length, entries ≥ 0 (NaN/inf allowed and dropped).
    method : {"hull", "quantile"}
        See above.
    quantile : float
        Level of the ``"quantile"`` method.

    Returns
    -------
    SmoothnessFit

    Raises
    ------
    ValueError
        For a negative norm, mismatched shapes, an unknown method or a
        quantile outside (0, 1).

    Examples
    --------
    >>> fit = fit_l0_l1([1.0, 2.0, 3.0, 2.0], [2.0, 3.0, 4.0, 2.5])
    >>> fit.L0, fit.L1, fit.n_above, fit.flags
    (1.0, 1.0, 0, ())
    >>> fit_l0_l1([1.0], [2.0]).flags
    ('too_few_points',)
    """
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
        raise ValueError(f"quantile must be a number in (0, 1), got {quantile!r}")
    x, y = _as_pairs(grad_norms, hess_norms)
    finite = np.isfinite(x) & np.isfinite(y)
    n_dropped = int((~finite).sum())
    x, y = x[finite], y[finite]
    flags = ["nonfinite_dropped"] if n_dropped else []
    q = float(quantile) if method == "quantile" else None
    x_range = (float(x.min()), float(x.max())) if x.size else (math.nan, math.nan)

    def result(L0: float, L1: float, n_above: int) -> SmoothnessFit:
        return SmoothnessFit(
            L0=L0,
            L1=L1,
            method=method,
            n_points=int(x.size),
            n_above=n_above,
            flags=tuple(flags),
            x_range=x_range,
            quantile=q,
            n_dropped=n_dropped,
            messages=tuple(FIT_FLAGS[f] for f in flags),
        )

    if x.size < 2:
        flags.append("too_few_points")
        return result(math.nan, math.nan, 0)
    if x.min() == x.max():
        flags.append("equal_grad_norms")
        return result(math.nan, math.nan, 0)
    if method == "hull":
        L0, L1, more = _fit_hull(x, y)
    else:
        L0, L1, more = _fit_quantile(x, y, float(quantile))
    flags += more
    with np.errstate(over="ignore"):
        line = L0 + L1 * x
    n_above = int(np.sum(y > line * (1 + ABOVE_RTOL)))
    return result(L0, L1, n_above)


def fit_components(
    grad_norms: Any,
    hess_norms: Any,
    method: str = "hull",
    *,
    quantile: float = 0.95,
) -> list[SmoothnessFit]:
    r"""One (A5) fit per component: ``(L0i, L1i)`` from ``(‖∇f_i(x_k)‖, ‖∇²f_i(x_k)‖)``.

    ``grad_norms[k, i]`` and ``hess_norms[k, i]`` hold component ``i`` at the
    ``k``-th probe point (shape ``(K, m)``); column ``i`` goes to
    :func:`fit_l0_l1`. The theorems use ``max_i L0i`` and ``max_i L1i``
    (:func:`clipscope.theory.igc_G`).

    >>> fits = fit_components([[1.0, 2.0], [2.0, 4.0]], [[1.0, 1.0], [2.0, 1.0]])
    >>> [(f.L0, f.L1) for f in fits]
    [(0.0, 1.0), (1.0, 0.0)]
    """
    x = np.asarray(grad_norms, dtype=np.float64)
    y = np.asarray(hess_norms, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"grad_norms and hess_norms must be 2-D (points × components) of the same shape, "
            f"got {x.shape} and {y.shape}"
        )
    return [fit_l0_l1(x[:, i], y[:, i], method, quantile=quantile) for i in range(x.shape[1])]


# -- the smoothness probe of a training run ------------------------------------
@dataclass(frozen=True)
class SmoothnessProbe:
    r"""When and how a run measures ``‖∇²f(x_k)‖`` (and ``‖∇²f_i(x_k)‖``) at its probe points.

    :func:`clipscope.methods.fit` takes one of these (``smoothness=``): at
    probe number ``p`` (0-based, counting the rows of ``epochs.csv``) it calls
    :meth:`measure` when :meth:`due` says so — every ``every``-th probe and
    the last one. Along the run it also records Zhang et al.'s secant
    estimate between consecutive probe points (:func:`trajectory_smoothness`),
    from the ``∇f`` the probe already computes.

    Attributes
    ----------
    every : int
        Measure at every ``every``-th probe (≥ 1).
    components : bool
        Also ``‖∇²f_i(x_k)‖`` for every component (A5): one Lanczos solve per
        component, so about ``m`` times the cost of the full one.
    tol : float
        Relative tolerance of the Lanczos stopping rule, in (0, 1).
    max_iter : int
        Most Hessian-vector products per solve.

    >>> SmoothnessProbe(every=2).due(4, last=False), SmoothnessProbe(every=2).due(3, last=True)
    (True, True)
    """

    every: int = 1
    components: bool = False
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER["lanczos"]

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an int >= 1, got {self.every!r}")
        if not isinstance(self.components, bool):
            raise TypeError(f"components must be a bool, got {self.components!r}")
        _check_solver_args(1, self.max_iter, self.tol)

    def due(self, probe_index: int, last: bool) -> bool:
        """Whether probe number ``probe_index`` (0-based) measures the Hessian norm."""
        return probe_index % self.every == 0 or last

    def to_dict(self) -> dict[str, Any]:
        """Plain values (part of the run's settings that a resume must match)."""
        return asdict(self)

    def measure(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        components: Any,
        *,
        dropout: str = "off",
        seed: int = 0,
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Measure at the current parameters; return ``(row entries, component arrays)``.

        Row entries: ``hess_norm`` (Lanczos ``‖∇²f(x)‖``) and ``hess_converged``
        (1/0). Arrays (only with ``components``): ``hess_norms[i] = ‖∇²f_i(x)‖``
        and ``hess_converged[i]``. The model is left untouched (every solve
        runs under :func:`clipscope.engine.model_guard`; the start vector has a
        private generator).
        """
        kw = {"tol": self.tol, "max_iter": self.max_iter, "dropout": dropout, "seed": seed}
        full = hessian_norm(model, loss_fn, components, method="lanczos", **kw)
        row = {"hess_norm": float(full.hess_norm), "hess_converged": float(full.converged)}
        arrays: dict[str, np.ndarray] = {}
        if self.components:
            per = component_hessian_norms(model, loss_fn, components, method="lanczos", **kw)
            arrays["hess_norms"] = np.array([r.hess_norm for r in per], dtype=np.float64)
            arrays["hess_converged"] = np.array([r.converged for r in per], dtype=bool)
        return row, arrays
