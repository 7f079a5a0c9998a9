r"""The engine's own checks (DESIGN §5): no number leaves the engine unchecked.

The per-sample ghost path assumes that each parameter is used only by the
module calls it records, with the samples on dim 0, the weights unchanged
during forward, and the batch forward's dropout masks. None of that is
assumed; two independent checks run at every per-sample probe:

**(a) Structural check** (every chunk, every parameter a rule serves). The
rule's batch gradient ``Σ_j g_j(p)`` is compared with the parameter's actual
batch gradient from the same backward, projected on ``k`` random rank-one
matrices ``R_i = u_i w_iᵀ`` (:class:`~clipscope.engine.per_sample._common.Directions`):

.. math:: |⟨G_\text{rule} - G_\text{actual}, R_i⟩| \le
          τ · \big(‖G_\text{actual}‖ + (Σ_j ‖g_j(p)‖^2)^{1/2}\big) + ε ‖G‖,

with ε the dtype's machine epsilon and ``‖G‖`` the whole batch gradient's norm
(all parameters). A weight also used outside its module (``F.linear(h,
emb.weight)``), a module that rewrites its weight in forward, a module whose
``forward`` is never called: all leave part of the actual gradient
unexplained. The right side bounds the rounding of the two sums: a sum of B
per-sample gradients rounds like their root sum of squares (at most √B times
it), and ``ε‖G‖`` covers a gradient that vanishes by symmetry (an attention
key's bias), which is rounding on both sides. A real error of relative size ρ
shows as about ρ times the parameter's own scale (the projections of a fixed
error have variance ``‖δ‖²``), so with ``k = 2`` directions an error of 20 τ is
missed with probability about 2e-3 (a full-rank error) to 2e-2 (a rank-one
error, whose projection is a product of two normals), one of 100 τ with
probability below 1e-4 resp. 1.3e-3, and the usual errors (percents) never in
practice. ``tests/test_structural_strength.py`` pins it in float32: a rule 3 %
wrong shows as 1-3 %, one 0.03 % wrong as 2.6 τ, and both fall back.

**(b) Spot check** (``r`` seeded samples per probe, default 4). Each spot
sample's gradient by its own backward (a batch-1 forward, or under active
dropout a backward of ``ℓ_j`` through its chunk's batch forward) gives
``‖g_j(p)‖²`` per parameter and ``⟨g_j, ∇f⟩``, compared with the route's
values:

.. math:: |s_j(p) - \hat s_j(p)| \le 2τ\,‖g_j‖^2, \qquad
          |d_j - \hat d_j| \le τ\,‖g_j‖\,‖∇f‖ .

This catches what (a) cannot see: a module that sees the sample axis
elsewhere (its batch sum is right, its per-sample split is not), a
forward-mode dot that misses a use of a parameter.

When a check fails, the parameters concerned go to an exact fallback
(:mod:`clipscope.engine.per_sample.fallback`) and a
:class:`PerSampleFallbackWarning` names them and the reason; with
``strict=True`` a :class:`VerificationError` is raised instead.

**Consistency** (every route): with exact inputs, ``|d_i| ≤ n_i ‖∇f‖``
(Cauchy–Schwarz) and ``Σ_i d_i = m ‖∇f‖²``; a violation beyond τ warns with
:class:`ConsistencyWarning` (raises under ``strict``).

**Pass mismatch** (two-pass and dyadic, :func:`check_pass_mismatch`): pass 2
recomputes every ``n_i``; a relative difference from pass 1 beyond τ raises
:class:`VerificationError`, ``strict`` or not: the dots (pass 2's ``g_i``
against pass 1's ∇f) and the clipped sums (pass 1's ``γ_i`` on pass 2's
``g_i``) already mix two sets of components, and no exact method can be fallen
back to, since a component is then not a function of the parameters.

**Merging** (dyadic, :func:`clipscope.engine.dense.check_merge`): a parent's loss
against the weighted mean of its children's; where it fails the larger batch
sizes get their own pass, with a :class:`MergeFallbackWarning` (raises under
``strict``).

The tolerance τ depends only on the model's dtype (:func:`tolerance`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "ConsistencyWarning",
    "MergeFallbackWarning",
    "PerSampleFallbackWarning",
    "VerificationError",
    "check_consistency",
    "check_pass_mismatch",
    "losses_differ",
    "merge_error",
    "spot_samples",
    "tolerance",
]

# Relative tolerance of every check, by the model's dtype: far above the rounding
# of an exact computation (float32 per-sample results agree with the float64
# brute force to about 1e-7), far below the errors the checks exist for (a weight
# used outside its module, a redrawn dropout mask: 1-10 %).
_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 3e-2,
    torch.bfloat16: 1e-1,
}


class PerSampleFallbackWarning(UserWarning):
    """Parameters of a per-sample probe went to an exact fallback; the message says which, why."""


class ConsistencyWarning(UserWarning):
    """A probe's norms and dots violate Cauchy–Schwarz or ``Σ d_i = m‖∇f‖²`` beyond rounding."""


class MergeFallbackWarning(UserWarning):
    """The dyadic route computed its larger batch sizes by their own pass; the message says why."""


class VerificationError(ValueError):
    """A check failed and ``strict=True`` asked for an error instead of a fallback."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance τ of the engine's checks for values computed in ``dtype``.

    >>> tolerance(torch.float64), tolerance(torch.float32)
    (1e-09, 0.0001)
    """
    return _TOLERANCE.get(dtype, 1e-1)


def spot_samples(n_samples: int, r: int, seed: int) -> np.ndarray:
    """``min(r, N)`` distinct sample indices, sorted, drawn from ``(seed, "spot")``.

    >>> spot_samples(10, 3, 0).tolist() == spot_samples(10, 3, 0).tolist()
    True
    >>> len(spot_samples(2, 4, 0))
    2
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"spot_checks must be an int >= 0, got {r!r}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5907])
    k = min(r, n_samples)
    return np.sort(rng.choice(n_samples, size=k, replace=False)) if k else np.zeros(0, np.int64)


def structural_error(accounted: torch.Tensor, actual: torch.Tensor, scale: float) -> float:
    """``max_i |accounted_i − actual_i| / scale`` (inf for non-finite values, 0 for 0/0)."""
    err = float((accounted - actual).abs().max()) if accounted.numel() else 0.0
    if not math.isfinite(err):
        return math.inf
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else math.inf


def merge_error(value: float, merged: float, scale: float) -> float:
    """``|value − merged| / scale`` of a loss against its parts' weighted mean.

    0 when they are equal, inf when either is not finite or ``scale`` is 0 with
    a difference. What :func:`~clipscope.engine.dense.check_merge` and
    :func:`~clipscope.engine.distributed.check_split_loss` compare with τ.

    >>> merge_error(2.0, 2.0, 0.0), merge_error(1.0, 1.5, 2.0), merge_error(math.nan, 1.0, 1.0)
    (0.0, 0.25, inf)
    """
    if not (math.isfinite(value) and math.isfinite(merged)):
        return math.inf
    diff = abs(value - merged)
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def check_pass_mismatch(mismatch: float, dtype: torch.dtype, batch_size: int) -> None:
    """Raise when pass 2's norms differ from pass 1's beyond τ (module docstring: why always).

    ``mismatch`` is ``max_i |n_i^(2) − n_i^(1)| / n_i^(1)`` over the components.

    >>> check_pass_mismatch(0.0, torch.float32, 8)
    >>> check_pass_mismatch(7.6e-4, torch.float32, 8)
    Traceback (most recent call last):
    ...
    clipscope.engine.verify.VerificationError: pass 2 recomputed the component norms ...
    """
    tol = tolerance(dtype)
    if mismatch <= tol:
        return
    raise VerificationError(
        f"pass 2 recomputed the component norms at batch size {batch_size} with a relative "
        f"difference of {mismatch:.3g} from pass 1 (tolerance {tol:g}): the components are not "
        "the same functions of the parameters in both passes (randomness the dropout policy "
        "does not control, a buffer the forward rewrites outside the model's buffers, a "
        "non-deterministic kernel far beyond rounding), so the dots and clipped sums would "
        "mix two sets of gradients; nothing is returned (strict or not: no exact method "
        "can be fallen back to)"
    )


def check_consistency(
    norms: np.ndarray, dots: np.ndarray, grad_norm: float, tol: float
) -> dict[str, Any]:
    """Cauchy–Schwarz and the dot-sum identity; returns the record (flags empty when fine).

    ``|d_i| ≤ n_i ‖∇f‖ (1 + τ) + tiny`` for every i, and
    ``|Σ d_i − m ‖∇f‖²| ≤ τ (Σ |d_i| + m ‖∇f‖²)``.

    >>> check_consistency(np.array([1.0, 1.0]), np.array([1.0, 1.0]), 1.0, 1e-9)["flags"]
    []
    >>> check_consistency(np.array([1.0, 1.0]), np.array([3.0, -1.0]), 1.0, 1e-9)["flags"]
    ['cauchy_schwarz_violation']
    """
    n = np.asarray(norms, dtype=np.float64)
    d = np.asarray(dots, dtype=np.float64)
    g = float(grad_norm)
    m = len(n)
    flags: list[str] = []
    with np.errstate(over="ignore", invalid="ignore"):
        bound = n * g
        excess = np.abs(d) - bound * (1 + tol)
        worst = int(np.argmax(excess)) if m else 0
        if m and excess[worst] > 1e-300:
            flags.append("cauchy_schwarz_violation")
        total = float(d.sum())
        sum_err = abs(total - m * g * g)
        sum_scale = float(np.abs(d).sum()) + m * g * g
        if sum_err > tol * sum_scale:
            flags.append("dots_sum_mismatch")
    return {
        "flags": flags,
        "tolerance": tol,
        "worst_component": worst if "cauchy_schwarz_violation" in flags else None,
        "max_cauchy_schwarz_ratio": float(np.max(np.abs(d) / np.where(bound > 0, bound, np.inf)))
        if m
        else 0.0,
        "dots_sum_relative_error": sum_err / sum_scale if sum_scale > 0 else 0.0,
    }


def losses_differ(got: torch.Tensor, expected: torch.Tensor | None, dtype) -> str | None:
    """Why two evaluations' per-sample losses differ (beyond ``dtype``'s tolerance), or None.

    ``expected`` None means nothing to compare. Used to tell that a second pass drew
    other dropout masks than pass 1.
    """
    if expected is None:
        return None
    got, expected = got.double(), expected.to(got.device).double()
    err = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    if err <= tolerance(dtype) * scale + 1e-300:
        return None
    return f"largest difference {err:.3g} for losses up to {scale:.3g}"
