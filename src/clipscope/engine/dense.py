r"""The dense routes: every component gradient ``g_i`` as one flat vector.

``"two-pass"`` and ``"dyadic"`` (:func:`sweep`, :func:`dyadic`)
    pass 1: ``g_i`` → ``n_i``, ``f_i`` and ``Σ g_i``; pass 2: ``g_i`` again → ``d_i``
    and ``Σ_i γ_i(η) g_i``. The dyadic levels ``2^l b`` are the weighted parents
    of consecutive children, merged while the children pass by: weighted by the
    children's declared weights (a loss returning ``(sum, count)``,
    :mod:`clipscope.engine.losses`) or else their sample counts. That a parent's
    loss is this weighted mean of its children's is checked first
    (:func:`check_merge`); where it is not, each larger batch size is computed by
    its own two-pass sweep, with a :class:`~clipscope.engine.verify.MergeFallbackWarning`.
``"keep"`` (:func:`keep_pass`)
    one pass storing every ``g_i``; dots and clipped sums as chunked float64
    matrix-vector products.

What each costs and when :func:`~clipscope.engine.probe.probe` picks it: the
module docstring of :mod:`clipscope.engine.probe`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import torch

from clipscope.engine import distributed as _dist
from clipscope.engine import verify
from clipscope.engine.common import (
    gammas,
    norm64,
    norm_and_cos,
    preconditioned_clipped,
    progress_bar,
)
from clipscope.engine.guard import BufferHold, dropout_policy, rng_for_component
from clipscope.engine.losses import component_losses, loss_form, weighted_component_loss

__all__ = ["MERGE_CHECK_PARENTS", "check_merge", "dyadic", "keep_pass", "sweep"]

_CHUNK_ROWS = 256  # rows of the kept matrix cast to float64 at a time
#: Parents per dyadic level whose loss the merge check compares with their children's
#: (the first and the last of each rank's block: the last may hold the smaller last batch).
MERGE_CHECK_PARENTS = 2


class _Level:
    """Sum-reducible accumulators of one batch-size level."""

    def __init__(self, n: int, device: torch.device, merges: bool) -> None:
        self.sum_grad = torch.zeros(n, dtype=torch.float64, device=device)
        self.norms: list[float] = []
        self.losses: list[float] = []
        self.sizes: list[int] = []  # samples per component
        self.weights: list[float] = []  # merge weights: declared, or the sample counts
        # the parent being merged from consecutive children (levels above the base)
        self.pending = torch.zeros(n if merges else 0, dtype=torch.float64, device=device)
        self.pending_loss = 0.0
        self.pending_w = 0.0
        self.pending_size = 0
        self.pending_count = 0

    def close_parent(self) -> None:
        parent = self.pending / self.pending_w
        self.norms.append(norm64(parent))
        self.losses.append(self.pending_loss / self.pending_w)
        self.sizes.append(self.pending_size)
        self.weights.append(self.pending_w)
        self.sum_grad += parent
        self.pending.zero_()
        self.pending_loss, self.pending_w, self.pending_size, self.pending_count = 0.0, 0.0, 0, 0


def sweep(
    model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels, shard, precond=None
):
    """Two passes at the base batch size; levels > 1 are the dyadic parents.

    A parent's gradient is its children's, weighted by their declared weights
    (a loss returning ``(sum, count)``) or else their sample counts; that this
    is the parent's own gradient is :func:`check_merge`'s to check (:func:`dyadic`).
    ``shard``: this rank's block (whole top-level parents), completed after each pass.

    Raises :class:`~clipscope.engine.verify.VerificationError` when pass 2's
    norms differ from pass 1's beyond the dtype's tolerance
    (:func:`~clipscope.engine.verify.check_pass_mismatch`).
    ``precond`` (a :class:`~clipscope.engine.preconditioner.Preconditioner`): pass 2
    also dots each ``g_i`` with every level's ``u_l = P⁻¹∇f_l``, in the same product
    as the dots with ``∇f_l``; parents' dots merge the same way.
    """
    sizes = [int(s) for s in components.sizes]
    drop_last = bool(getattr(components, "drop_last", False))
    levels = [_Level(flat.n, flat.device, merges=level > 0) for level in range(n_levels)]
    m = len(components)
    weights = [float(s) for s in sizes]  # the merge weights, declared ones once seen
    declared: list[int] = []
    # pass 1: norms, losses, Σ g (and the dyadic carry)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device,
        only=shard.only, weights=True,
    )  # fmt: skip
    for i, loss, w in progress_bar(shard.losses(stream), len(shard), progress, "probe pass 1"):
        if w is not None:
            weights[i] = w
            declared.append(i)
        _add_child(levels, flat.grad(loss, i).double(), sizes[i], weights[i], loss)
    if n_levels > 1 and declared and len(declared) != len(shard):
        raise ValueError(
            "loss_fn returned (sum, count) for some components and a mean for others "
            f"(component {next(i for i in shard.indices if i not in set(declared))}): the dyadic "
            "route merges by declared weights only when every component declares one"
        )
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
            coef = _clip_coefficients(levels, parent, gam, weights, i, len(etas))
            clip_acc.addr_(torch.from_numpy(coef.reshape(-1)).to(flat.device), g)
    shard.sum_(clip_acc)
    mismatch = shard.max(mismatch)
    # the components changed between the passes: no number of this sweep can be trusted
    verify.check_pass_mismatch(mismatch, flat.dtype, int(components.batch_size))
    child_dots = np.stack(shard.complete(*child_dots))
    (all_weights,) = shard.complete(np.array(weights))
    results = []
    for level, lev in enumerate(levels):
        r = _level_result(
            level, lev, components, parent, child_dots, clip_acc, full, etas, mismatch, all_weights
        )
        if precond is not None:
            rows = clip_acc[level * len(etas) : (level + 1) * len(etas)]
            r["u"] = us[level]
            r["pdots"] = _parent_dots(
                level, lev, components, parent, child_dots[n_levels + level], all_weights
            )
            r["clipped_p"] = preconditioned_clipped(
                rows, etas, full[level], us[level], precond.inverse
            )
        results.append(r)
    return results


def _add_child(levels: list[_Level], g: torch.Tensor, s: int, w: float, loss) -> None:
    """Component ``g`` (``s`` samples, merge weight ``w``) at the base level and in each parent."""
    base = levels[0]
    value = float(loss.detach())
    base.norms.append(norm64(g))
    base.losses.append(value)
    base.sizes.append(s)
    base.weights.append(w)
    base.sum_grad += g
    for level, lev in enumerate(levels[1:], start=1):
        lev.pending.add_(g, alpha=w)
        lev.pending_loss += w * value
        lev.pending_w += w
        lev.pending_size += s
        lev.pending_count += 1
        if lev.pending_count == 1 << level:
            lev.close_parent()


def _complete(levels: list[_Level], shard) -> list[torch.Tensor]:
    """Every rank's parents, in index order; return each level's ∇f."""
    full_sums = shard.sum_(torch.stack([lev.sum_grad for lev in levels]))
    for level, lev in enumerate(levels):
        lev.norms, lev.losses, sizes_l, weights_l = shard.gather(
            lev.norms, lev.losses, lev.sizes, lev.weights
        )
        lev.norms, lev.losses, lev.weights = list(lev.norms), list(lev.losses), list(weights_l)
        lev.sizes, lev.sum_grad = [int(v) for v in sizes_l], full_sums[level]
    return [lev.sum_grad / len(lev.norms) for lev in levels]


def _clip_coefficients(levels, parent, gam, weights, i, n_etas) -> np.ndarray:
    """``γ_{P(i)}(η)·w_i/w_P`` of child i for each level and η, ``(L, |η|)``."""
    coef = np.empty((len(levels), n_etas))
    for level in range(len(levels)):
        p = parent[level][i]
        if p >= len(levels[level].norms):  # a dropped incomplete parent
            coef[level] = 0.0
            continue
        coef[level] = gam[level][:, p] * weights[i] / levels[level].weights[p]
    return coef


def _level_result(
    level, lev, components, parent, child_dots, clip_acc, full, etas, mismatch, weights
):
    """One batch size's sums: the parents' dots ``d_P = Σ_c w_c d_c / w_P``, the clipped sums."""
    dots = _parent_dots(level, lev, components, parent, child_dots[level], weights)
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


# -- the dyadic route: the merge check, then one sweep or a sweep per batch size ---------
def dyadic(
    model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels, shard, strict,
    precond=None,
):  # fmt: skip
    """Run the dyadic route: ``(results per batch size, {"merge": the merge check's record})``.

    :func:`check_merge` first. When every checked parent's loss is the weighted
    mean of its children's, one :func:`sweep` at the base batch size serves every
    level. When one is not (a token-mean loss over padded batches that does not
    declare its weights, class weights, an in-batch loss, batch statistics in the
    model), merging would be wrong: the base level is swept alone and every
    larger batch size ``2^l b`` by its own two-pass sweep over
    ``components.with_batch_size(2^l b)`` (about 2 epochs per level instead of 2
    for all), with a :class:`~clipscope.engine.verify.MergeFallbackWarning`
    naming the loss and the mismatch; ``strict=True`` raises
    :class:`~clipscope.engine.verify.VerificationError` instead.
    """
    record = check_merge(model, loss_fn, components, n_levels, flat, seed, shard)
    if record["passed"]:
        return sweep(
            model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels, shard,
            precond,
        ), {"merge": record}  # fmt: skip
    b = int(components.batch_size)
    larger = [b << level for level in range(1, n_levels)]
    message = (
        f"dyadic route: {record['reason']}; so the batch sizes {larger} are computed by their "
        "own two-pass sweep each instead of being merged from batch size "
        f"{b} (declare the weights, loss_fn returning (sum, count), where the loss is a "
        "weighted mean)"
    )
    if strict:
        raise verify.VerificationError(message + " (strict=True)")
    warnings.warn(message, verify.MergeFallbackWarning, stacklevel=4)  # probe()'s caller
    record["own_pass"] = larger
    results = sweep(
        model, loss_fn, components, flat, etas, dropout, seed, progress, 1, shard, precond
    )
    for size in larger:
        comps = components.with_batch_size(size)
        results += sweep(
            model, loss_fn, comps, flat, etas, dropout, seed, progress, 1,
            _dist.Shard(len(comps), shard.ranks), precond,
        )  # fmt: skip
    return results, {"merge": record}


def check_merge(model, loss_fn, components, n_levels, flat, seed, shard) -> dict[str, Any]:
    r"""Check that a parent's loss is the weighted mean of its children's, as merging assumes.

    The dyadic route takes a parent ``P`` of batch size ``2^l b`` as the union of
    its consecutive children and merges ``g_P = Σ_c w_c g_c / Σ_c w_c``, with
    ``w_c`` a child's declared weight (``(sum, count)``) or its sample count. That
    is ``P``'s own gradient exactly when

    .. math:: f_P(x) = \frac{\sum_c w_c f_c(x)}{\sum_c w_c},

    which fails for a mean over tokens of padded batches (``ignore_index``),
    class-weighted cross-entropy, in-batch (contrastive) losses and batch
    statistics computed in the model, unless the loss declares its weights and
    is additive in them. Per level, :data:`MERGE_CHECK_PARENTS` parents of this
    rank's block (the first and the last) are evaluated on their own batch
    (``components.with_batch_size(2^l b)``, collated anew) and their children on
    theirs, without gradients, dropout off, from the same buffers; a child's loss
    is evaluated once, however many checked parents hold it. Cost, in forwards
    only: at most ``(2·(2^L − 2) + min(m, 2^L)) / m`` epochs for ``m``
    components and ``L`` levels (a small share for many components; about 3
    epochs of forwards at ``m = 4``, ``L = 3``, where the top level's one
    parent is all the data). The relative difference
    ``|f_P − Σ w_c f_c / Σ w_c| / max(|f_P|, Σ w_c |f_c| / Σ w_c)`` must be at most
    the dtype's tolerance τ (:func:`~clipscope.engine.verify.tolerance`).

    Returns the record: ``passed``, ``weights`` (``"declared"`` or ``"samples"``),
    ``parents`` (how many were checked), ``max_error``, ``tolerance`` and, when
    it failed, ``reason`` (the loss, the parent, both values). Every rank returns
    the same record.
    """
    form = loss_form(loss_fn)
    b = int(components.batch_size)
    device = flat.device
    tol = verify.tolerance(flat.dtype)
    rows: list[tuple] = []  # (error, level, parent, f_P, merged, declared, noise)
    hold = BufferHold(model)
    with torch.no_grad(), dropout_policy(model, "off"), contextlib.ExitStack() as stack:
        stack.callback(hold.restore, scan=True)  # the sweep starts from the same buffers

        def evaluate(comps, i, salt=0):
            hold.restore(scan=True)
            with rng_for_component("fixed", seed + salt, i):  # the same numbers every time
                loss, w, _ = weighted_component_loss(
                    model, loss_fn, comps.batch(i, device), form=form, index=i
                )
            return float(loss), w

        children: dict[int, tuple[float, float | None]] = {}  # each child evaluated once

        def child(c):
            if c not in children:
                children[c] = evaluate(components, c)
            return children[c]

        for level in range(1, n_levels):
            parents = components.with_batch_size(b << level)
            lo, hi = shard.start >> level, min(len(parents), -(-shard.stop >> level))
            chosen = sorted({lo, hi - 1})[:MERGE_CHECK_PARENTS] if hi > lo else []
            for p in chosen:
                f_p, _ = evaluate(parents, p)
                kids = range(p << level, min(len(components), (p + 1) << level))
                values = [child(c) for c in kids]
                ws = [w if w is not None else float(components.sizes[c]) for c, (_, w) in
                      zip(kids, values, strict=True)]  # fmt: skip
                total = sum(ws)
                merged = sum(w * f for w, (f, _) in zip(ws, values, strict=True)) / total
                scale = max(abs(f_p), sum(w * abs(f) for w, (f, _) in zip(ws, values, strict=True))
                            / total)  # fmt: skip
                error = verify.merge_error(f_p, merged, scale)
                noise = False
                if not error <= tol:  # random numbers outside the dropout modules?
                    again, _ = evaluate(parents, p, salt=1)
                    noise = abs(again - f_p) > tol * max(abs(f_p), 1e-300)
                declared = any(w is not None for _, w in values)
                rows.append((error, level, p, f_p, merged, declared, noise))
    rows = [r for rank in shard.objects(rows) for r in rank]
    worst = max(rows, default=(0.0, 0, 0, 0.0, 0.0, False, False))
    record: dict[str, Any] = {
        "passed": worst[0] <= tol,
        "weights": "declared" if any(r[5] for r in rows) else "samples",
        "parents": len(rows),
        "max_error": worst[0],
        "tolerance": tol,
        "own_pass": [],
    }
    if not record["passed"]:
        error, level, p, f_p, merged, declared, noise = worst
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        weights = "their declared weights (count)" if declared else "their sample counts"
        record["reason"] = (
            f"the loss of a parent batch is not the weighted mean of its children's losses, "
            f"which merging assumes: loss_fn {name!r}, batch size {b << level}, parent {p}: "
            f"f_P = {f_p:.9g} from its own batch, {merged:.9g} from its {1 << level} children "
            f"of batch size {b} weighted by {weights} (relative error {error:.3g} > {tol:g})"
            + (
                "; the parent's loss also changes between two evaluations (random numbers the "
                "dropout modules do not draw), so the check cannot tell"
                if noise
                else ""
            )
        )
    return record


def _parent_dots(level, lev, components, parent, child_row, weights) -> np.ndarray:
    """``d_P = Σ_c w_c d_c / w_P`` of the level's parents from one row of children's dots."""
    m_l = len(lev.norms)
    dots = np.zeros(m_l)
    for i in range(len(components)):
        p = parent[level][i]
        if p < m_l:
            dots[p] += weights[i] * child_row[i]
    dots /= np.array(lev.weights, dtype=np.float64)
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
