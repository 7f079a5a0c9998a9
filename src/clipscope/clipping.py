r"""The clipping operator of the paper, exactly, for tensors and for ``.grad``\ s.

The operator (4) of Qian et al. (AISTATS 2021) is

.. math:: C(g; η) = \min\{1, η/‖g‖\}\, g, \qquad C(0; η) = 0,

with ‖·‖ the Euclidean norm over the *whole* tensor (for :func:`clip_grads_`: over all
parameters together). ``η`` must be a positive number; ``η = math.inf`` means no
clipping. Every norm here is computed in float64 after scaling by a power of two
near the largest absolute entry, so a finite gradient whose squared norm would
overflow (a float32 entry of 2e22, or a float64 entry of 1e200) is still clipped
correctly.

How this differs from :func:`torch.nn.utils.clip_grad_norm_`
-------------------------------------------------------------
``clip_grad_norm_(params, max_norm)`` multiplies by
``clamp(max_norm / (total_norm + 1e-6), max=1)``. Consequences (all tested in
``tests/test_clipping.py`` against the real torch function):

1. **Slightly below η.** A gradient of norm ``n > η`` ends at norm
   ``η·n/(n + 1e-6)`` instead of ``η``; the relative gap is ``1e-6/n``, large
   for small gradients.
2. **Clips what is already inside the ball.** A gradient of norm exactly ``η``
   (or in ``(η − 1e-6, η]``) is shrunk by torch and left bitwise unchanged here.
3. **Negative thresholds.** ``max_norm < 0`` makes torch *flip* the gradient;
   here any ``η ≤ 0`` (and NaN, bools, strings, ...) raises :class:`ValueError`
   before anything is touched.
4. **Overflow.** torch squares in the gradient's dtype: a finite float32
   gradient with an entry of 2e22 gets an infinite norm and is silently
   zeroed. Here the norm is finite and the gradient is scaled to norm ``η``.
5. **Non-finite gradients.** torch (by default) turns an ``inf`` entry into
   ``nan`` and zeroes the rest. Here a non-finite norm raises
   :class:`ValueError` naming the parameter, with nothing modified; with
   ``error_if_nonfinite=False`` the result is NaN-filled (never silently zero).
6. **No gradients.** torch returns ``0`` for parameters without gradients;
   here that is a :class:`ValueError` (an empty model is a configuration bug).
7. **Tied parameters.** A tensor listed twice is counted twice in torch's norm
   and scaled twice; here it is counted and scaled once.
8. **Return value.** Both return the norm before clipping; here it is always
   float64 (0-d tensor on the first gradient's device).
9. **Sparse gradients** (``nn.Embedding(sparse=True)``). torch's
   ``clip_grad_norm_`` raises inside ``amax``. Here a sparse COO gradient's
   norm is taken over its coalesced values (duplicate indices summed first, as
   the tensor means), ``clip`` returns a sparse tensor of the same layout, and
   ``clip_grads_`` scales the stored values in place. Compressed layouts
   (CSR, CSC, BSR, BSC) have no duplicates; their stored values are used as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from clipscope.math.stats import check_eta

__all__ = ["check_eta", "clip", "clip_factor", "clip_grads_", "clip_rows", "grad_norm"]


def _pow2_scale(maxabs: torch.Tensor) -> torch.Tensor:
    """Return a power of two near ``maxabs`` (1 where ``maxabs`` is 0 or not finite).

    Dividing by a power of two is exact, so scaled and unscaled norms agree to
    the last bit whenever the unscaled one does not overflow or underflow.
    """
    ok = torch.isfinite(maxabs) & (maxabs > 0)
    _, exponent = torch.frexp(torch.where(ok, maxabs, torch.ones_like(maxabs)))
    return torch.ldexp(torch.ones_like(maxabs), exponent)


def _entries(t: torch.Tensor) -> torch.Tensor:
    """Return the numbers a tensor holds: itself if dense, its (coalesced) values if sparse."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()


def grad_norm(tensors: Iterable[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Return the Euclidean norm of all ``tensors`` together, robustly, in float64.

    ``sqrt(Σ_t Σ_j t_j²)`` computed as ``s·sqrt(Σ (t_j/s)²)`` with ``s`` a power of
    two near the largest ``|t_j|``, so finite inputs never overflow. Non-finite
    entries give ``inf`` or ``nan``.

    Parameters
    ----------
    tensors : Tensor or iterable of Tensor
        Any shapes and floating dtypes, dense or sparse; ``None`` entries are skipped.

    Returns
    -------
    Tensor
        0-d float64 tensor on the first tensor's device (``0.0`` on CPU if empty).

    Examples
    --------
    >>> float(grad_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]))
    5.0
    >>> sparse = torch.sparse_coo_tensor([[1, 1]], torch.tensor([[1.0], [2.0]]), (3, 1),
    ...                                  check_invariants=True)
    >>> float(grad_norm(sparse))  # duplicates add up first: the row is [3]
    3.0
    >>> big = torch.tensor([3.0, 4.0]) * 2.0**70  # float32; its squares overflow float32
    >>> float(grad_norm(big)) == 5 * 2.0**70
    True
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    ts = [_entries(t.detach()) for t in tensors if t is not None]
    if not ts:
        return torch.zeros((), dtype=torch.float64)
    device = ts[0].device
    maxabs = torch.stack(
        [t.abs().amax().to(device, torch.float64) if t.numel() else _zero(device) for t in ts]
    )
    # NaN in any tensor must survive amax: torch.amax propagates NaN.
    top = maxabs.amax()
    scale = _pow2_scale(top)
    parts = torch.stack(
        [
            torch.linalg.vector_norm(t.to(device, torch.float64) / scale)
            if t.numel()
            else _zero(device)
            for t in ts
        ]
    )
    return torch.linalg.vector_norm(parts) * scale


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)


def clip_factor(norm, eta):
    """Return the clipping factor ``γ = min{1, η/n}``, with ``γ = 1`` at ``n = 0`` (21).

    Parameters
    ----------
    norm : float, numpy array or Tensor
        Norms ``n ≥ 0``. A NaN norm gives a NaN factor.
    eta : float
        Threshold, validated by :func:`check_eta`.

    Returns
    -------
    float, numpy array or Tensor
        Same kind (and, for tensors, dtype and device) as ``norm``.

    Examples
    --------
    >>> clip_factor(4.0, 2.0), clip_factor(1.0, 2.0), clip_factor(0.0, 2.0)
    (0.5, 1.0, 1.0)
    >>> clip_factor(4.0, math.inf)
    1.0
    """
    eta = check_eta(eta)
    if isinstance(norm, torch.Tensor):
        over = norm > eta
        safe = torch.where(over, norm, torch.ones_like(norm))
        ones = torch.where(torch.isnan(norm), norm, torch.ones_like(norm))
        return torch.where(over, eta / safe, ones)
    arr = np.asarray(norm, dtype=np.float64)
    over = arr > eta
    out = np.where(over, eta / np.where(over, arr, 1.0), np.where(np.isnan(arr), np.nan, 1.0))
    if np.ndim(norm) == 0 and not isinstance(norm, np.ndarray):
        return float(out)
    return out


def _as_tensor(g) -> tuple[torch.Tensor, bool]:
    if isinstance(g, torch.Tensor):
        return g, False
    if isinstance(g, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(g)), True
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(g).__name__}")


def _check_float(g: torch.Tensor, what: str) -> None:
    if not g.is_floating_point():
        raise TypeError(f"{what} must have a real floating dtype, got {g.dtype}")


def _scaled(g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    # Multiply in float64 and round once to the input dtype (sparse layouts stay sparse).
    return (g.to(torch.float64) * gamma).to(g.dtype)


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    if t.layout == torch.strided:
        return torch.full_like(t, math.nan)
    out = t.coalesce() if t.layout == torch.sparse_coo else t.clone()
    out = out.clone()
    _stored(out).fill_(math.nan)
    return out


def _stored(t: torch.Tensor) -> torch.Tensor:
    """Return the stored values of a tensor, as a view that in-place ops write through."""
    if t.layout == torch.strided:
        return t
    return t._values() if t.layout == torch.sparse_coo else t.values()


def clip(g, eta, *, error_if_nonfinite: bool = True):
    """Return ``C(g; η) = min{1, η/‖g‖}·g`` (4), the norm taken over the whole tensor.

    Exact: no ``+1e-6`` in the denominator, ``C(0; η) = 0``, and ``g`` is returned
    bitwise unchanged (as a copy) when ``‖g‖ ≤ η``, in particular for
    ``η = math.inf``. When scaled, the product is formed in float64 and rounded
    once to ``g``'s dtype, so ``‖C(g; η)‖ ≤ η·(1 + a few ulp of the dtype)``.

    Parameters
    ----------
    g : Tensor or numpy.ndarray
        Real floating tensor of any shape, dense or sparse. Never modified.
    eta : float
        Threshold ``η > 0`` or ``math.inf``; see :func:`check_eta`.
    error_if_nonfinite : bool, default True
        If ‖g‖ is NaN or inf, raise :class:`ValueError`. If False, return a tensor
        of NaN instead when clipping would be needed (``η < ∞``); for ``η = ∞``
        a copy of ``g``. A non-finite gradient is never silently zeroed.

    Returns
    -------
    Tensor or numpy.ndarray
        A new array of ``g``'s type, shape, dtype, device and layout.

    Raises
    ------
    ValueError
        For a bad ``eta`` or a non-finite norm (see above).

    Examples
    --------
    >>> clip(torch.tensor([3.0, 4.0]), 1.0)
    tensor([0.6000, 0.8000])
    >>> clip(torch.tensor([3.0, 4.0]), 5.0)
    tensor([3., 4.])
    >>> clip(torch.zeros(2), 1.0)
    tensor([0., 0.])
    """
    eta = check_eta(eta)
    t, from_numpy = _as_tensor(g)
    _check_float(t, "g")
    if t.layout == torch.sparse_coo:
        t = t.coalesce()  # one value per index: the result is scaled once, like the dense one
    norm = grad_norm(t)
    nval = float(norm)  # a sync point: the branch below needs the value
    if not math.isfinite(nval):
        if error_if_nonfinite:
            raise ValueError(
                f"clip: the norm of g (shape {tuple(t.shape)}) is {nval}; "
                "pass error_if_nonfinite=False to get a NaN result instead"
            )
        out = t.clone() if eta == math.inf else _nan_like(t)
    elif nval > eta:
        out = _scaled(t, eta / norm)
    else:
        out = t.clone()
    return out.numpy() if from_numpy else out


def clip_rows(G, eta, *, error_if_nonfinite: bool = True):
    """Clip each row of a 2-D tensor: row ``i`` becomes ``C(G[i]; η)``.

    The batched form of :func:`clip` (same exactness and conventions); each row's
    norm is computed in float64 with its own power-of-two scaling.

    Parameters
    ----------
    G : Tensor or numpy.ndarray
        Shape ``(m, n)``, real floating dtype. Never modified.
    eta : float
        Threshold ``η > 0`` or ``math.inf``.
    error_if_nonfinite : bool, default True
        Raise :class:`ValueError` naming the first row whose norm is not finite;
        if False such rows become NaN (unchanged when ``η = ∞``).

    Returns
    -------
    Tensor or numpy.ndarray
        New array of ``G``'s type, shape and dtype.

    Examples
    --------
    >>> clip_rows(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), 1.0)
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000],
            [0.0000, 0.0000]])
    """
    eta = check_eta(eta)
    t, from_numpy = _as_tensor(G)
    _check_float(t, "G")
    if t.layout != torch.strided:
        raise TypeError(
            f"clip_rows expects a dense 2-D tensor, got layout {t.layout}; clip each row with "
            "clip(), or pass G.to_dense()"
        )
    if t.dim() != 2:
        raise ValueError(f"clip_rows expects a 2-D tensor, got shape {tuple(t.shape)}")
    norms = row_norms(t)
    bad = ~torch.isfinite(norms)
    if error_if_nonfinite and bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"clip_rows: row {i} has norm {float(norms[i])}; "
            "pass error_if_nonfinite=False to get NaN rows instead"
        )
    gamma = clip_factor(norms, eta)
    if eta != math.inf:
        gamma = torch.where(bad, torch.full_like(gamma, math.nan), gamma)
    keep = (gamma == 1.0)[:, None]
    out = torch.where(keep, t, _scaled(t, gamma[:, None]))
    return out.numpy() if from_numpy else out


def row_norms(G: torch.Tensor) -> torch.Tensor:
    """Return the float64 Euclidean norm of each row of a 2-D tensor, overflow-safe.

    Examples
    --------
    >>> row_norms(torch.tensor([[3.0, 4.0], [1e30, 1e30]]))
    tensor([5.0000e+00, 1.4142e+30], dtype=torch.float64)
    """
    x = G.detach().to(torch.float64)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    scale = _pow2_scale(x.abs().amax(dim=1))
    return torch.linalg.vector_norm(x / scale[:, None], dim=1) * scale


def _unique_params(params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"clip_grads_ expects tensors, got {type(p).__name__}")
        if id(p) not in seen:  # tied weights count once
            seen.add(id(p))
            out.append(p)
    return out


def _first_nonfinite(grads: Sequence[torch.Tensor], index: Sequence[int]) -> str:
    for i, g in zip(index, grads, strict=True):
        if not bool(torch.isfinite(_entries(g)).all()):
            return f"parameter {i} (shape {tuple(g.shape)})"
    return "an overflowing sum"  # pragma: no cover - grad_norm is overflow-safe


def clip_grads_(
    params, eta, *, error_if_nonfinite: bool = True, foreach: bool | None = None
) -> torch.Tensor:
    """Clip the ``.grad`` of ``params`` in place by one global norm; return that norm.

    With ``g`` the concatenation of all gradients, every ``.grad`` is multiplied by
    ``γ = min{1, η/‖g‖}`` (4), so the concatenation becomes ``C(g; η)``. Parameters
    whose ``.grad`` is ``None`` are skipped (they count as zero); a parameter listed
    twice (tied weights) counts once. A sparse ``.grad`` (``nn.Embedding(sparse=True)``)
    enters the norm with its coalesced values and is scaled in place. Unlike
    :func:`torch.nn.utils.clip_grad_norm_` there is no ``+1e-6``; see the module
    docstring for every difference.

    Parameters
    ----------
    params : Tensor or iterable of Tensor
        Parameters (e.g. ``model.parameters()``).
    eta : float
        Threshold ``η > 0`` or ``math.inf`` (the grads are left untouched).
    error_if_nonfinite : bool, default True
        Raise :class:`ValueError` naming the first parameter (index in ``params``
        and shape) holding NaN/inf, with no gradient modified. If False and
        ``η < ∞``, every gradient is filled with NaN (never silently zeroed).
    foreach : bool or None, default None
        Use the fused multi-tensor kernel (``torch._foreach_mul_``). ``None``
        uses it when all gradients share one device and dtype.

    Returns
    -------
    Tensor
        ‖g‖ before clipping, a 0-d float64 tensor on the first gradient's device.

    Raises
    ------
    ValueError
        For a bad ``eta``, when no parameter has a gradient, or for a non-finite
        norm (default). Raised before anything is modified.

    Examples
    --------
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> p.grad = torch.tensor([3.0, 4.0])
    >>> float(clip_grads_([p], 1.0)), p.grad
    (5.0, tensor([0.6000, 0.8000]))
    """
    eta = check_eta(eta)
    plist = _unique_params(params)
    index = [i for i, p in enumerate(plist) if p.grad is not None]
    grads = [plist[i].grad for i in index]
    if not grads:
        raise ValueError(
            f"clip_grads_: none of the {len(plist)} parameters has a gradient "
            "(no trainable parameters, or backward was not called)"
        )
    total = grad_norm(grads)
    tval = float(total)  # a sync point: the error check must come before any change
    if not math.isfinite(tval):
        if error_if_nonfinite:
            where = _first_nonfinite(grads, index)
            raise ValueError(
                f"clip_grads_: the gradient norm is {tval}: {where} holds NaN or inf; "
                "no gradient was modified"
            )
        if eta != math.inf:
            with torch.no_grad():
                for g in grads:
                    _stored(g).fill_(math.nan)
        return total
    if tval <= eta:
        return total
    gamma = eta / tval
    if foreach is None:
        foreach = len({(g.device, g.dtype) for g in grads}) == 1 and not any(
            g.is_sparse for g in grads
        )
    with torch.no_grad():
        if foreach:
            torch._foreach_mul_(grads, gamma)
        else:
            for g in grads:
                g.mul_(gamma)
    return total
