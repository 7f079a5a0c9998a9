r"""``‖H‖ = max |λ(H)|`` of a symmetric operator given as a ``matvec``: power iteration, Lanczos.

Pure linear algebra on float64 vectors (``torch`` tensors, so a ``matvec`` may
run on a GPU): no model, no autograd. The engine's Hessian-vector products
(:mod:`clipscope.engine.hvp`) are one such ``matvec``;
:func:`clipscope.smoothness.hessian_norm` joins the two.

A ``matvec`` that returns NaN or inf raises
:class:`~clipscope.errors.NonFiniteError`; bad arguments raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipscope.errors import NonFiniteError

__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "SOLVERS",
    "EigenEstimate",
    "check_solver_args",
    "lanczos",
    "power_iteration",
    "solve",
]

SOLVERS = ("lanczos", "power")
DEFAULT_TOL = 1e-4
DEFAULT_MAX_ITER = {"power": 100, "lanczos": 30}


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


def check_solver_args(n: Any, max_iter: Any, tol: Any) -> tuple[int, int, float]:
    """Validate a solver's dimension, budget and tolerance; return them (ValueError naming one)."""
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
        raise NonFiniteError("the product H v is not finite (NaN or inf)")
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
    n, max_iter, tol = check_solver_args(n, max_iter, tol)
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
    n, max_iter, tol = check_solver_args(n, max_iter, tol)
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


def solve(
    method: str,
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    max_iter: int | None = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> EigenEstimate:
    """Run the solver named ``method`` (:data:`SOLVERS`); ``max_iter=None`` takes its default."""
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    solver = power_iteration if method == "power" else lanczos
    iters = DEFAULT_MAX_ITER[method] if max_iter is None else max_iter
    return solver(matvec, n, max_iter=iters, tol=tol, seed=seed, device=device)
