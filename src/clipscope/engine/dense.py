r"""The dense routes: every component gradient ``g_i`` as one flat vector.

``"two-pass"`` and ``"dyadic"`` (:func:`sweep`)
    pass 1: ``g_i`` → ``n_i``, ``f_i`` and ``Σ g_i``; pass 2: ``g_i`` again → ``d_i``
    and ``Σ_i γ_i(η) g_i``. The dyadic levels ``2^l b`` are the size-weighted
    parents of consecutive children, merged while the children pass by.
``"keep"`` (:func:`keep_pass`)
    one pass storing every ``g_i``; dots and clipped sums as chunked float64
    matrix-vector products.

What each costs and when :func:`~clipscope.engine.probe.probe` picks it: the
module docstring of :mod:`clipscope.engine.probe`.
"""

from __future__ import annotations

import numpy as np
import torch

from clipscope.engine.common import (
    gammas,
    norm64,
    norm_and_cos,
    preconditioned_clipped,
    progress_bar,
)
from clipscope.engine.losses import component_losses

__all__ = ["keep_pass", "sweep"]

_CHUNK_ROWS = 256  # rows of the kept matrix cast to float64 at a time


class _Level:
    """Sum-reducible accumulators of one batch-size level."""

    def __init__(self, n: int, device: torch.device, merges: bool) -> None:
        self.sum_grad = torch.zeros(n, dtype=torch.float64, device=device)
        self.norms: list[float] = []
        self.losses: list[float] = []
        self.sizes: list[int] = []
        # the parent being merged from consecutive children (levels above the base)
        self.pending = torch.zeros(n if merges else 0, dtype=torch.float64, device=device)
        self.pending_loss = 0.0
        self.pending_w = 0
        self.pending_count = 0

    def close_parent(self) -> None:
        parent = self.pending / self.pending_w
        self.norms.append(norm64(parent))
        self.losses.append(self.pending_loss / self.pending_w)
        self.sizes.append(self.pending_w)
        self.sum_grad += parent
        self.pending.zero_()
        self.pending_loss, self.pending_w, self.pending_count = 0.0, 0, 0


def sweep(
    model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels, shard, precond=None
):
    """Two passes at the base batch size; levels > 1 are the dyadic parents.

    ``shard``: this rank's block (whole top-level parents), completed after each pass.
    ``precond`` (a :class:`~clipscope.engine.preconditioner.Preconditioner`): pass 2
    also dots each ``g_i`` with every level's ``u_l = P⁻¹∇f_l``, in the same product
    as the dots with ``∇f_l``; parents' dots merge the same way.
    """
    sizes = [int(s) for s in components.sizes]
    drop_last = bool(getattr(components, "drop_last", False))
    levels = [_Level(flat.n, flat.device, merges=level > 0) for level in range(n_levels)]
    m = len(components)
    # pass 1: norms, losses, Σ g (and the dyadic carry)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device, only=shard.only
    )
    for i, loss in progress_bar(shard.losses(stream), len(shard), progress, "probe pass 1"):
        _add_child(levels, flat.grad(loss, i).double(), sizes[i], loss)
    for lev in levels[1:]:
        if lev.pending_count and not drop_last:
            lev.close_parent()
    full = _complete(levels, shard)
    # parent of child i at level l, and its weight s_i / s_P
    parent = [[i >> level for i in range(m)] for level in range(n_levels)]
    gam = [gammas(np.array(lev.norms), etas) for lev in levels]  # (E, m_l)
    us = [precond.direction(f) for f in full] if precond is not None else []
    # rows 0..L-1: the dots with each level's ∇f_l; rows L..2L-1: with its u_l
    child_dots = np.zeros((n_levels + len(us), m))
    clip_acc = torch.zeros(n_levels * len(etas), flat.n, dtype=torch.float64, device=flat.device)
    mismatch = 0.0
    full_mat = torch.stack(full + us)  # (L, n), or (2L, n) with u
    # pass 2: dots with each level's ∇f, clipped sums
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device, only=shard.only
    )
    for i, loss in progress_bar(shard.losses(stream), len(shard), progress, "probe pass 2"):
        g = flat.grad(loss, i).double()
        n1 = levels[0].norms[i]
        mismatch = max(mismatch, abs(norm64(g) - n1) / n1 if n1 > 0 else norm64(g))
        child_dots[:, i] = (full_mat @ g).cpu().numpy()
        if etas:
            coef = _clip_coefficients(levels, parent, gam, sizes, i, len(etas))
            clip_acc.addr_(torch.from_numpy(coef.reshape(-1)).to(flat.device), g)
    shard.sum_(clip_acc)
    mismatch = shard.max(mismatch)
    child_dots = np.stack(shard.complete(*child_dots))
    results = []
    for level, lev in enumerate(levels):
        r = _level_result(
            level, lev, components, parent, child_dots, clip_acc, full, etas, mismatch
        )
        if precond is not None:
            rows = clip_acc[level * len(etas) : (level + 1) * len(etas)]
            r["u"] = us[level]
            r["pdots"] = _parent_dots(level, lev, components, parent, child_dots[n_levels + level])
            r["clipped_p"] = preconditioned_clipped(
                rows, etas, full[level], us[level], precond.inverse
            )
        results.append(r)
    return results


def _add_child(levels: list[_Level], g: torch.Tensor, s: int, loss: torch.Tensor) -> None:
    """Component ``g`` (size ``s``) at the base level, and into each level's pending parent."""
    base = levels[0]
    base.norms.append(norm64(g))
    base.losses.append(float(loss.detach()))
    base.sizes.append(s)
    base.sum_grad += g
    for level, lev in enumerate(levels[1:], start=1):
        lev.pending.add_(g, alpha=s)
        lev.pending_loss += s * float(loss.detach())
        lev.pending_w += s
        lev.pending_count += 1
        if lev.pending_count == 1 << level:
            lev.close_parent()


def _complete(levels: list[_Level], shard) -> list[torch.Tensor]:
    """Every rank's parents, in index order; return each level's ∇f."""
    full_sums = shard.sum_(torch.stack([lev.sum_grad for lev in levels]))
    for level, lev in enumerate(levels):
        lev.norms, lev.losses, sizes_l = shard.gather(lev.norms, lev.losses, lev.sizes)
        lev.norms, lev.losses = list(lev.norms), list(lev.losses)
        lev.sizes, lev.sum_grad = [int(v) for v in sizes_l], full_sums[level]
    return [lev.sum_grad / len(lev.norms) for lev in levels]


def _clip_coefficients(levels, parent, gam, sizes, i, n_etas) -> np.ndarray:
    """``γ_{P(i)}(η)·s_i/s_P`` of child i for each level and η, ``(L, |η|)``."""
    coef = np.empty((len(levels), n_etas))
    for level in range(len(levels)):
        p = parent[level][i]
        if p >= len(levels[level].norms):  # a dropped incomplete parent
            coef[level] = 0.0
            continue
        coef[level] = gam[level][:, p] * sizes[i] / levels[level].sizes[p]
    return coef


def _level_result(level, lev, components, parent, child_dots, clip_acc, full, etas, mismatch):
    """One batch size's sums: the parents' dots ``d_P = Σ_c s_c d_c / s_P``, the clipped sums."""
    dots = _parent_dots(level, lev, components, parent, child_dots[level])
    clipped = {
        eta: norm_and_cos(clip_acc[level * len(etas) + k], full[level])
        for k, eta in enumerate(etas)
    }
    return {
        "norms": np.array(lev.norms),
        "dots": dots,
        "losses": np.array(lev.losses),
        "sizes": np.array(lev.sizes),
        "full": full[level],
        "clipped": clipped,
        "batch_size": int(components.batch_size) << level,
        "mismatch": mismatch,
    }


def _parent_dots(level, lev, components, parent, child_row) -> np.ndarray:
    """``d_P = Σ_c s_c d_c / s_P`` of the level's parents from one row of children's dots."""
    m_l = len(lev.norms)
    weights = np.array([int(s) for s in components.sizes], dtype=np.float64)
    dots = np.zeros(m_l)
    for i in range(len(components)):
        p = parent[level][i]
        if p < m_l:
            dots[p] += weights[i] * child_row[i]
    dots /= np.array(lev.sizes, dtype=np.float64)
    return dots


def keep_pass(model, loss_fn, components, flat, etas, dropout, seed, progress, shard, precond=None):
    """One pass storing every g_i; dots and clipped sums as chunked float64 products.

    ``shard``: this rank stores and multiplies its block's rows only. ``precond``:
    the dots with ``u = P⁻¹∇f`` are one more matrix-vector product per block of rows.
    """
    m = len(components)
    G = torch.empty(len(shard), flat.n, dtype=flat.dtype, device=flat.device)
    sum_grad = torch.zeros(flat.n, dtype=torch.float64, device=flat.device)
    norms, losses = np.zeros(m), np.zeros(m)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device, only=shard.only
    )
    for i, loss in progress_bar(shard.losses(stream), len(shard), progress, "probe (keep)"):
        g = flat.grad(loss, i)
        G[i - shard.start] = g
        g = g.double()
        norms[i] = norm64(g)
        losses[i] = float(loss.detach())
        sum_grad += g
    norms, losses = shard.complete(norms, losses)
    full = shard.sum_(sum_grad) / m
    u = precond.direction(full) if precond is not None else None
    directions = [full] if u is None else [full, u]
    dots = torch.zeros(m, len(directions), dtype=torch.float64, device=flat.device)
    gam = torch.from_numpy(gammas(norms, etas)).to(flat.device)  # (E, m)
    clip_acc = torch.zeros(len(etas), flat.n, dtype=torch.float64, device=flat.device)
    for a in range(0, len(shard), _CHUNK_ROWS):  # a: row of G, a + start: component
        rows = G[a : a + _CHUNK_ROWS].double()
        c = a + shard.start
        for k, v in enumerate(directions):  # (matrix-vector products: a 2-column GEMM is slower)
            dots[c : c + len(rows), k] = rows @ v
        if etas:
            clip_acc += gam[:, c : c + len(rows)] @ rows
    shard.sum_(clip_acc)
    columns = shard.complete(*dots.t().cpu().numpy())
    clipped = {eta: norm_and_cos(clip_acc[k], full) for k, eta in enumerate(etas)}
    result = {
        "norms": norms,
        "dots": columns[0],
        "losses": losses,
        "sizes": np.array(components.sizes),
        "full": full,
        "clipped": clipped,
        "batch_size": int(components.batch_size),
        "mismatch": 0.0,
    }
    if u is not None:
        result.update(
            u=u,
            pdots=columns[1],
            clipped_p=preconditioned_clipped(clip_acc, etas, full, u, precond.inverse),
        )
    return [result]
