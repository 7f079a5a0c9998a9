"""What every probe route shares: the flat gradient vector, float64 norms, γ(η), packaging.

A route (:mod:`clipscope.engine.dense`, :mod:`clipscope.engine.per_sample_route`)
sees each component gradient ``g_i`` as one vector over the probed parameters
(:class:`Flat`), accumulates its norms, dots and sums in float64 (:func:`norm64`,
:func:`norm_and_cos`, the clipping weights :func:`gammas`), and hands its sums to
:func:`package`, which checks their consistency (:mod:`clipscope.engine.verify`)
and builds the :class:`~clipscope.engine.result.ProbeResult`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.engine import verify
from clipscope.engine.losses import param_names
from clipscope.engine.result import MultiProbeResult, PreconditionedResult, ProbeResult
from clipscope.errors import NonFiniteError
from clipscope.math.stats import check_eta

__all__ = ["Flat", "check_etas", "gammas", "norm64", "norm_and_cos", "package", "progress_bar"]


def check_etas(etas: Iterable[float]) -> list[float]:
    """Return the thresholds η as floats, each checked (η > 0, inf allowed), without repeats."""
    out: list[float] = []
    for eta in etas:
        value = float(check_eta(eta))
        if value not in out:
            out.append(value)
    return out


def gammas(norms: np.ndarray, etas: Sequence[float]) -> np.ndarray:
    """``γ_i(η) = min{1, η/n_i}`` (21), shape ``(|η|, m)``; 1 where ``n_i = 0``."""
    norms = np.asarray(norms, dtype=np.float64)
    out = np.ones((len(etas), len(norms)))
    for k, eta in enumerate(etas):
        over = norms > eta
        out[k, over] = eta / norms[over]
    return out


class Flat:
    """Flatten per-parameter gradients into one float vector and back."""

    def __init__(self, model: nn.Module, params: list) -> None:
        self.params = params
        self.names = param_names(model, params)
        self.numels = [p.numel() for p in params]
        self.n = sum(self.numels)
        self.dtype = params[0].dtype
        for p in params[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self.device = params[0].device

    def grad(self, loss: torch.Tensor, i: int, retain_graph: bool = False) -> torch.Tensor:
        """``g_i`` as one vector in the parameters' dtype; non-finite -> NonFiniteError."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, retain_graph=retain_graph)
        # a sparse gradient (Embedding(sparse=True)) is exact as a dense vector
        grads = [g if g is None or g.layout == torch.strided else g.to_dense() for g in grads]
        flat = torch.cat(
            [
                torch.zeros(k, dtype=self.dtype, device=self.device)
                if g is None
                else g.detach().reshape(-1).to(self.dtype)
                for g, k in zip(grads, self.numels, strict=True)
            ]
        )
        if not bool(torch.isfinite(flat).all()):
            bad = [
                name
                for name, g in zip(self.names, grads, strict=True)
                if g is not None and not bool(torch.isfinite(g).all())
            ]
            raise NonFiniteError(
                f"component {i}: non-finite gradient in parameter(s) {', '.join(bad)}; "
                "nothing was changed"
            )
        return flat

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into tensors shaped like the parameters (vec's dtype)."""
        out, start = [], 0
        for p, k in zip(self.params, self.numels, strict=True):
            out.append(vec[start : start + k].view_as(p))
            start += k
        return out


def norm64(v: torch.Tensor) -> float:
    """Euclidean norm in float64, rescaled when the squares would overflow."""
    v64 = v.double()
    n = float(torch.linalg.vector_norm(v64))
    if math.isinf(n):
        scale = float(v64.abs().max())
        n = scale * float(torch.linalg.vector_norm(v64 / scale))
    return n


def norm_and_cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Return ``(‖a‖, cos∠(a, b))`` in float64; the cosine is NaN when either vector is 0."""
    na, nb = norm64(a), norm64(b)
    dot = float(a @ b)
    return na, (dot / (na * nb) if na > 0 and nb > 0 else math.nan)


def preconditioned_clipped(
    clip_rows: torch.Tensor,
    etas: Sequence[float],
    full: torch.Tensor,
    u: torch.Tensor,
    inverse: torch.Tensor,
) -> dict[float, tuple[float, float]]:
    """``{η: (cos∠(Σ_i C(g_i;η), u), cos∠(P⁻¹Σ_i C(g_i;η), ∇f))}`` in float64.

    ``clip_rows`` ``(|η|, n)`` the clipped sums, ``full`` ∇f, ``u = P⁻¹∇f`` and
    ``inverse`` the diagonal of ``P⁻¹``
    (:class:`~clipscope.engine.preconditioner.Preconditioner`). Both cosines have
    the sign of the preconditioned descent ``⟨Σ_i C(g_i;η), u⟩ = ⟨P⁻¹Σ_i C(g_i;η), ∇f⟩``;
    the second is the angle between the step one pass takes (P frozen) and ∇f.
    NaN where a vector is 0.
    """
    out = {}
    un, fn = norm64(u), norm64(full)
    inv = inverse.to(u.device)
    for k, eta in enumerate(etas):
        c = clip_rows[k]
        cn, step, dot = norm64(c), norm64(c * inv), float(c @ u)
        out[eta] = (
            dot / (cn * un) if cn > 0 and un > 0 else math.nan,
            dot / (step * fn) if step > 0 and fn > 0 else math.nan,
        )
    return out


def check_direction_consistency(
    norms: np.ndarray, dots: np.ndarray, direction_norm: float, total: float, tol: float
) -> dict[str, Any]:
    """Cauchy–Schwarz and the dot-sum identity for the dots with a direction v (u = P⁻¹∇f).

    ``|d_i| ≤ n_i ‖v‖ (1 + τ) + tiny`` for every i, and
    ``|Σ d_i − m⟨∇f, v⟩| ≤ τ (Σ |d_i| + m⟨∇f, v⟩)`` (``total = m⟨∇f, v⟩``): the
    preconditioned twin of :func:`~clipscope.engine.verify.check_consistency`.

    >>> check_direction_consistency(np.ones(2), np.array([0.5, 0.5]), 1.0, 1.0, 1e-9)["flags"]
    []
    """
    n = np.asarray(norms, dtype=np.float64)
    d = np.asarray(dots, dtype=np.float64)
    flags: list[str] = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        bound = n * direction_norm
        excess = np.abs(d) - bound * (1 + tol)
        worst = int(np.argmax(excess)) if len(n) else 0
        if len(n) and excess[worst] > 1e-300:
            flags.append("cauchy_schwarz_violation")
        err = abs(float(d.sum()) - total)
        scale = float(np.abs(d).sum()) + abs(total)
        if err > tol * scale:
            flags.append("dots_sum_mismatch")
        ratio = np.abs(d) / np.where(bound > 0, bound, np.inf)
    return {
        "flags": flags,
        "tolerance": tol,
        "worst_component": worst if "cauchy_schwarz_violation" in flags else None,
        "max_cauchy_schwarz_ratio": float(np.max(ratio)) if len(n) else 0.0,
        "dots_sum_relative_error": err / scale if scale > 0 else 0.0,
    }


def progress_bar(iterable: Iterable, total: int, enabled: bool, desc: str) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (imported only then)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def package(results, route, info, flat, keep_full_grad, verification, strict, precond=None):
    """Turn a route's per-level sums into results, each checked for consistency.

    ``results`` holds one dict per batch size (``norms``, ``dots``, ``losses``,
    ``sizes``, ``full``, ``clipped``, ``batch_size``, ``mismatch``; with a
    preconditioner ``precond`` also ``pdots`` = ⟨g_i, u⟩, ``u`` = P⁻¹∇f and
    ``clipped_p``, :func:`preconditioned_clipped`). A violation of
    Cauchy–Schwarz or ``Σ d_i = m‖∇f‖²`` (and of ``|d^P_i| ≤ n_i‖u‖``,
    ``Σ d^P_i = m⟨∇f, u⟩``) at the dtype's tolerance warns
    (:class:`~clipscope.engine.verify.ConsistencyWarning`) or, with ``strict``,
    raises :class:`~clipscope.engine.verify.VerificationError`. Returns one
    :class:`ProbeResult`, or a :class:`MultiProbeResult` for the dyadic route.
    """
    packed = {}
    tol = verify.tolerance(flat.dtype)
    for r in results:
        full = r.pop("full")
        level_info = {**info, "max_pass_mismatch": r.pop("mismatch")}
        level_info["n_samples"] = int(np.sum(r["sizes"]))
        grad_norm = norm64(full)
        consistency = verify.check_consistency(r["norms"], r["dots"], grad_norm, tol)
        if consistency["flags"]:
            message = (
                f"route {route!r}, batch size {r['batch_size']}: {', '.join(consistency['flags'])}"
                f" (largest |d_i|/(n_i‖∇f‖) = {consistency['max_cauchy_schwarz_ratio']:.9g}, "
                f"Σd_i vs m‖∇f‖² relative error {consistency['dots_sum_relative_error']:.3g}, "
                f"tolerance {tol:g}): the norms and dots are not those of one set of gradients"
            )
            if strict:
                raise verify.VerificationError(message + " (strict=True)")
            warnings.warn(message, verify.ConsistencyWarning, stacklevel=3)
        preconditioned = None
        if precond is not None:
            preconditioned, message = _preconditioned(
                r, full, route, flat, precond, keep_full_grad, tol
            )
            if message is not None and strict:
                raise verify.VerificationError(message + " (strict=True)")
            if message is not None:
                warnings.warn(message, verify.ConsistencyWarning, stacklevel=3)
        packed[r["batch_size"]] = ProbeResult(
            norms=r["norms"],
            dots=r["dots"],
            grad_norm=grad_norm,
            losses=r["losses"],
            clipped=r["clipped"],
            route=route,
            batch_size=r["batch_size"],
            sizes=r["sizes"],
            full_grad=[t.clone() for t in flat.unflatten(full)] if keep_full_grad else None,
            info=level_info,
            verification={**verification, "consistency": consistency},
            preconditioned=preconditioned,
        )
    if route == "dyadic":
        return MultiProbeResult(packed)
    return next(iter(packed.values()))


def _preconditioned(r, full, route, flat, precond, keep_full_grad, tol):
    """One level's :class:`PreconditionedResult` and the message of a failed check, or None.

    The dots with u are checked like the dots with ∇f (:func:`check_direction_consistency`).
    """
    u = r.pop("u")
    pdots = r.pop("pdots")
    clipped = r.pop("clipped_p")
    inner = float(full.double() @ u)  # Σ ∇f_j² P_j⁻¹ ≥ 0
    unorm = norm64(u)
    m = len(r["norms"])
    consistency = check_direction_consistency(r["norms"], pdots, unorm, m * inner, tol)
    info = {
        **precond.info,
        "decay": precond.decay(flat.params, full, u),
        "consistency": consistency,
    }
    message = None
    if consistency["flags"]:
        message = (
            f"route {route!r}, batch size {r['batch_size']}, the dots with u = P⁻¹∇f: "
            f"{', '.join(consistency['flags'])} (largest |d^P_i|/(n_i‖u‖) = "
            f"{consistency['max_cauchy_schwarz_ratio']:.9g}, Σd^P_i vs m⟨∇f, u⟩ relative error "
            f"{consistency['dots_sum_relative_error']:.3g}, tolerance {tol:g})"
        )
    keep = keep_full_grad
    result = PreconditionedResult(
        norms=r["norms"],
        dots=pdots,
        direction_norm=unorm,
        inner=inner,
        clipped=clipped,
        info=info,
        direction=[t.clone() for t in flat.unflatten(u)] if keep else None,
        inverse=[t.clone() for t in flat.unflatten(precond.inverse.to(u.device))] if keep else None,
    )
    return result, message
