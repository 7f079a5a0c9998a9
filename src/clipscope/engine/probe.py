r"""The probe: exact ``n_i = ‖g_i‖``, ``d_i = ⟨g_i, ∇f⟩``, ``‖∇f‖`` and clipped sums.

At fixed parameters ``x``, with ``g_i = ∇f_i(x)`` the gradient of component
``i``'s **mean** loss and ``∇f = (1/m) Σ_i g_i`` (17), a probe returns every
``n_i``, ``d_i``, ``f_i``, ``‖∇f‖``, and for each requested η the norm of
``Σ_i C(g_i; η)`` (4) and its cosine with ∇f. All norms, dots and sums are
accumulated in float64, whatever the model's dtype.

Routes (DESIGN §4), all exact, all compared in the tests with
:func:`reference_probe` (each ``g_i`` by its own autograd call, explicit dots):

``"two-pass"``
    pass 1: ``g_i`` → ``n_i``, ``f_i`` and ``Σ g_i``; pass 2: ``g_i`` again → ``d_i``
    and ``Σ_i γ_i(η) g_i`` (``γ_i(η) = min{1, η/n_i}`` needs ``n_i`` from pass 1).
    Memory O(n·|η|); about two epochs of forward+backward (measured 1.76 E on
    the bench's small CNN, 2 CPU cores), plus one float64 axpy of length n per
    component for each η.
``"keep"``
    one pass that stores every ``g_i`` (the parameters' dtype) when
    ``m·n·itemsize ≤ memory_budget``; dots and clipped sums are then chunked
    float64 matrix-vector products. About one epoch.
``"dyadic"``
    one two-pass sweep at the smallest batch size ``b`` serves ``b, 2b, 4b, …``:
    the mean loss of a parent batch is the size-weighted mean of its two
    consecutive children's, so ``g_P = (s_a g_a + s_b g_b)/(s_a + s_b)`` and, for
    the level's own ``∇f_l``, ``d_P = (s_a d_a + s_b d_b)/(s_a + s_b)``; the clipped
    sum is ``Σ_P γ_P g_P = Σ_c γ_{P(c)} (s_c/s_P) g_c``. Unequal last batches
    enter with their true weights; with ``drop_last`` an incomplete parent is
    dropped, which is exactly the partition at batch size ``2^l b``. Refuses
    train-mode BatchNorm (the children's batch statistics are not the
    parent's). Memory O(levels·n + m).
``"per-sample"``
    every sample of the given components (used as chunks) is a component of
    batch size 1: per-sample norms and dots come from
    :mod:`clipscope.engine.per_sample` (ghost norms, forward-mode dots), ``∇f``
    from ordinary chunk backwards. Refuses train-mode BatchNorm.

``route="auto"`` picks ``dyadic`` when several batch sizes are asked for,
``per-sample`` for ``batch_sizes=[1]``, else ``keep`` when it fits the memory
budget, else ``two-pass``; ``result.route`` says which ran.

Reductions are sums (``Σ g_i``, ``Σ γ_i g_i``, per-component scalars placed by
index), so components could later be split across processes with one
all-reduce of the vectors and a gather of the scalars; nothing here does that.

Batches are moved to the device of the first parameter.

The probe leaves the model exactly as found (:func:`~clipscope.engine.guard.model_guard`):
parameters, buffers, ``.grad``, train/eval flags and the global RNG. It uses
``torch.autograd.grad`` and never writes ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.engine.guard import (
    batch_coupled_modules,
    check_dropout_policy,
    dropout_policy,
    model_guard,
    rng_for_component,
)
from clipscope.engine.losses import (
    check_loss_fn,
    component_losses,
    param_names,
    trainable_params,
)
from clipscope.engine.result import MultiProbeResult, ProbeResult
from clipscope.errors import NonFiniteError
from clipscope.math.stats import check_eta

__all__ = ["ROUTES", "probe", "reference_probe"]

ROUTES = ("auto", "two-pass", "keep", "dyadic", "per-sample")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for the keep route's stored g_i
_CHUNK_ROWS = 256  # rows of the kept matrix cast to float64 at a time


# -- small helpers -------------------------------------------------------------
def _check_etas(etas: Iterable[float]) -> list[float]:
    out: list[float] = []
    for eta in etas:
        value = float(check_eta(eta))
        if value not in out:
            out.append(value)
    return out


def _gammas(norms: np.ndarray, etas: Sequence[float]) -> np.ndarray:
    """``γ_i(η) = min{1, η/n_i}`` (21), shape ``(|η|, m)``; 1 where ``n_i = 0``."""
    norms = np.asarray(norms, dtype=np.float64)
    out = np.ones((len(etas), len(norms)))
    for k, eta in enumerate(etas):
        over = norms > eta
        out[k, over] = eta / norms[over]
    return out


class _Flat:
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


def _norm64(v: torch.Tensor) -> float:
    """Euclidean norm in float64, rescaled when the squares would overflow."""
    v64 = v.double()
    n = float(torch.linalg.vector_norm(v64))
    if math.isinf(n):
        scale = float(v64.abs().max())
        n = scale * float(torch.linalg.vector_norm(v64 / scale))
    return n


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    na, nb = _norm64(a), _norm64(b)
    dot = float(a @ b)
    return na, (dot / (na * nb) if na > 0 and nb > 0 else math.nan)


def _progress(iterable: Iterable, total: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


# -- the public entry ----------------------------------------------------------
def probe(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    etas: Iterable[float] = (),
    route: str = "auto",
    *,
    dropout: str = "off",
    seed: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    batch_sizes: Sequence[int] | None = None,
    levels: int | None = None,
    params: Iterable[torch.Tensor] | None = None,
    progress: bool = False,
    keep_full_grad: bool = False,
) -> ProbeResult | MultiProbeResult:
    """Measure ``n_i``, ``d_i``, ``f_i``, ``‖∇f‖`` and clipped sums at the current parameters.

    Parameters
    ----------
    model : nn.Module
        ``model(x)`` for :class:`~clipscope.components.Components`;
        ``model(inp, state) -> (output, state)`` for sequential components.
    loss_fn : callable
        ``loss_fn(output, target)``, or ``loss_fn(model, batch)`` when its first two
        parameters are named so (:func:`~clipscope.engine.losses.loss_form`) ->
        the batch's **mean** loss (a 0-d tensor). The per-sample route needs the
        first form.
    components : Components or SequentialComponents
        The fixed partition; ``f = (1/m) Σ_i f_i``.
    etas : iterable of float
        Thresholds η > 0 (``inf`` allowed) for the clipped sums.
    route : {"auto", "two-pass", "keep", "dyadic", "per-sample"}
        See the module docstring.
    dropout : {"off", "fixed"}
        Dropout policy (:mod:`clipscope.engine.guard`).
    seed : int
        Seed of the ``"fixed"`` dropout masks.
    memory_budget : int
        Bytes the keep route may use for the stored ``g_i``.
    batch_sizes : sequence of int, optional
        Dyadic: ``[b, 2b, 4b, ...]`` with ``b`` the components' batch size;
        ``[1]`` asks for per-sample components.
    levels : int, optional
        Dyadic: the number of batch sizes ``b, …, 2^(levels-1) b``.
    params : iterable of Tensor, optional
        The parameters ``g_i`` is taken over (default: every trainable one).
    progress : bool
        Show a tqdm bar per pass.
    keep_full_grad : bool
        Return ∇f (float64, shaped like the parameters) in ``result.full_grad``.

    Returns
    -------
    ProbeResult or MultiProbeResult
        ``MultiProbeResult`` (``{batch size: ProbeResult}``) for the dyadic route.

    Examples
    --------
    >>> from clipscope.components import Components
    >>> X, Y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    >>> comps = Components.from_tensors(X, Y, batch_size=4)
    >>> r = probe(nn.Linear(3, 2), nn.functional.cross_entropy, comps, etas=[1.0])
    >>> r.route, r.m, round(float(r.beta.sum()), 6)  # Σβ = m (20)
    ('keep', 3, 3.0)
    >>> sorted(probe(nn.Linear(3, 2), nn.functional.cross_entropy, comps, levels=2))
    [4, 8]
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    etas = _check_etas(etas)
    check_dropout_policy(dropout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be a non-negative int (bytes), got {memory_budget!r}")
    _check_components(components)
    check_loss_fn(loss_fn, components, route, batch_sizes)  # its form fits route and batches
    params = trainable_params(model, params)
    flat = _Flat(model, params)
    m = len(components)
    base_b = int(components.batch_size)
    sizes_dyadic = _dyadic_sizes(base_b, batch_sizes, levels)
    if route == "auto":
        if batch_sizes is not None and list(batch_sizes) == [1] and base_b != 1:
            route = "per-sample"
        elif len(sizes_dyadic) > 1:
            route = "dyadic"
        elif m * flat.n * flat.dtype.itemsize <= memory_budget:
            route = "keep"
        else:
            route = "two-pass"
    wants_single = batch_sizes is not None and list(batch_sizes) == [1] and base_b != 1
    if wants_single and route != "per-sample":
        raise ValueError(f"batch_sizes=[1] needs route='per-sample' (or 'auto'), got {route!r}")
    if route not in ("dyadic",) and len(sizes_dyadic) > 1:
        raise ValueError(f"several batch sizes {sizes_dyadic} need route='dyadic' (or 'auto')")
    if route == "keep" and m * flat.n * flat.dtype.itemsize > memory_budget:
        raise ValueError(
            f"route='keep' needs m·n·itemsize = {m * flat.n * flat.dtype.itemsize} bytes, "
            f"more than memory_budget={memory_budget}"
        )
    if route in ("dyadic", "per-sample"):
        if getattr(components, "sequential", False):
            raise ValueError(
                f"route={route!r} needs independent samples; sequential (language-model) "
                "components carry a state between windows and cannot be merged or split"
            )
        coupled = batch_coupled_modules(model)
        if coupled:
            raise ValueError(
                f"route={route!r} would change the answer: module(s) {coupled} normalize with "
                "batch statistics (train-mode BatchNorm couples the samples of a batch); "
                "use route='two-pass' or 'keep', or put BatchNorm in eval mode"
            )
    if route == "dyadic" and getattr(components, "drop_last", False):
        empty = [b for k, b in enumerate(sizes_dyadic) if m >> k == 0]
        if empty:
            raise ValueError(
                f"batch size(s) {empty} leave no full batch of the {sum(components.sizes)} "
                "kept samples with drop_last=True"
            )
    info = {
        "dropout": dropout,
        "seed": seed,
        "components": components.describe(),
        "n_params": flat.n,
        "dtype": str(flat.dtype).replace("torch.", ""),
        "n_samples": int(sum(components.sizes)),
    }
    with model_guard(model), torch.enable_grad():
        if route == "per-sample":
            result = _per_sample(model, loss_fn, components, flat, etas, dropout, seed, progress)
        elif route == "keep":
            result = _keep(model, loss_fn, components, flat, etas, dropout, seed, progress)
        else:
            levels_ = len(sizes_dyadic) if route == "dyadic" else 1
            result = _sweep(
                model, loss_fn, components, flat, etas, dropout, seed, progress, levels_
            )
    return _package(result, route, info, flat, keep_full_grad, components)


def _check_components(components: Any) -> None:
    needed = ("batch", "sizes", "batch_size", "describe", "__len__")
    missing = [name for name in needed if not hasattr(components, name)]
    if missing:
        raise TypeError(
            "components must be clipscope.Components or SequentialComponents (missing "
            f"{', '.join(missing)}), got {type(components).__name__}"
        )


def _dyadic_sizes(b: int, batch_sizes: Sequence[int] | None, levels: int | None) -> list[int]:
    if batch_sizes is not None and levels is not None:
        raise ValueError("give batch_sizes or levels, not both")
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")
        return [b << k for k in range(levels)]
    if batch_sizes is None:
        return [b]
    sizes = [int(s) for s in batch_sizes]
    if sizes == [1]:
        return [b]
    expected = [b << k for k in range(len(sizes))]
    if sorted(sizes) != expected:
        raise ValueError(
            f"batch_sizes must be the components' batch size times powers of two, "
            f"{expected}, got {list(batch_sizes)}"
        )
    return expected


# -- routes ---------------------------------------------------------------------
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
        self.norms.append(_norm64(parent))
        self.losses.append(self.pending_loss / self.pending_w)
        self.sizes.append(self.pending_w)
        self.sum_grad += parent
        self.pending.zero_()
        self.pending_loss, self.pending_w, self.pending_count = 0.0, 0, 0


def _sweep(model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels):
    """Two passes at the base batch size; levels > 1 are the dyadic parents."""
    sizes = [int(s) for s in components.sizes]
    drop_last = bool(getattr(components, "drop_last", False))
    levels = [_Level(flat.n, flat.device, merges=level > 0) for level in range(n_levels)]
    m = len(components)
    # pass 1: norms, losses, Σ g (and the dyadic carry)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device
    )
    for i, loss in _progress(stream, m, progress, "probe pass 1"):
        g = flat.grad(loss, i).double()
        s = sizes[i]
        base = levels[0]
        base.norms.append(_norm64(g))
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
    for lev in levels[1:]:
        if lev.pending_count and not drop_last:
            lev.close_parent()
    full = [lev.sum_grad / len(lev.norms) for lev in levels]
    full_mat = torch.stack(full)  # (L, n)
    # parent of child i at level l, and its weight s_i / s_P
    parent = [[i >> level for i in range(m)] for level in range(n_levels)]
    gam = [_gammas(np.array(lev.norms), etas) for lev in levels]  # (E, m_l)
    child_dots = np.zeros((n_levels, m))
    clip_acc = torch.zeros(n_levels * len(etas), flat.n, dtype=torch.float64, device=flat.device)
    mismatch = 0.0
    # pass 2: dots with each level's ∇f, clipped sums
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device
    )
    for i, loss in _progress(stream, m, progress, "probe pass 2"):
        g = flat.grad(loss, i).double()
        n1 = levels[0].norms[i]
        mismatch = max(mismatch, abs(_norm64(g) - n1) / n1 if n1 > 0 else _norm64(g))
        child_dots[:, i] = (full_mat @ g).cpu().numpy()
        if etas:
            coef = np.empty((n_levels, len(etas)))
            for level in range(n_levels):
                p = parent[level][i]
                if p >= len(levels[level].norms):  # a dropped incomplete parent
                    coef[level] = 0.0
                    continue
                coef[level] = gam[level][:, p] * sizes[i] / levels[level].sizes[p]
            clip_acc.addr_(torch.from_numpy(coef.reshape(-1)).to(flat.device), g)
    out = []
    for level, lev in enumerate(levels):
        m_l = len(lev.norms)
        weights = np.array(sizes, dtype=np.float64)
        dots = np.zeros(m_l)
        for i in range(m):
            p = parent[level][i]
            if p < m_l:
                dots[p] += weights[i] * child_dots[level, i]
        dots /= np.array(lev.sizes, dtype=np.float64)
        clipped = {
            eta: _cos(clip_acc[level * len(etas) + k], full[level]) for k, eta in enumerate(etas)
        }
        out.append(
            {
                "norms": np.array(lev.norms),
                "dots": dots,
                "losses": np.array(lev.losses),
                "sizes": np.array(lev.sizes),
                "full": full[level],
                "clipped": clipped,
                "batch_size": int(components.batch_size) << level,
                "mismatch": mismatch,
            }
        )
    return out


def _keep(model, loss_fn, components, flat, etas, dropout, seed, progress):
    """One pass storing every g_i; dots and clipped sums as chunked float64 products."""
    m = len(components)
    G = torch.empty(m, flat.n, dtype=flat.dtype, device=flat.device)
    sum_grad = torch.zeros(flat.n, dtype=torch.float64, device=flat.device)
    norms, losses = np.zeros(m), np.zeros(m)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device
    )
    for i, loss in _progress(stream, m, progress, "probe (keep)"):
        g = flat.grad(loss, i)
        G[i] = g
        g = g.double()
        norms[i] = _norm64(g)
        losses[i] = float(loss.detach())
        sum_grad += g
    full = sum_grad / m
    dots = torch.empty(m, dtype=torch.float64, device=flat.device)
    gam = torch.from_numpy(_gammas(norms, etas)).to(flat.device)  # (E, m)
    clip_acc = torch.zeros(len(etas), flat.n, dtype=torch.float64, device=flat.device)
    for a in range(0, m, _CHUNK_ROWS):
        rows = G[a : a + _CHUNK_ROWS].double()
        dots[a : a + _CHUNK_ROWS] = rows @ full
        if etas:
            clip_acc += gam[:, a : a + _CHUNK_ROWS] @ rows
    clipped = {eta: _cos(clip_acc[k], full) for k, eta in enumerate(etas)}
    return [
        {
            "norms": norms,
            "dots": dots.cpu().numpy(),
            "losses": losses,
            "sizes": np.array(components.sizes),
            "full": full,
            "clipped": clipped,
            "batch_size": int(components.batch_size),
            "mismatch": 0.0,
        }
    ]


def _per_sample(model, loss_fn, components, flat, etas, dropout, seed, progress):
    """Batch-size-1 components; the given components are processed as chunks.

    Pass 1 per chunk: :func:`~clipscope.engine.per_sample.ghost_pass` (per-sample
    ``‖∇ℓ_j‖²`` by ghost norms, ``ℓ_j``, and ``∇Σ_j ℓ_j``), so ``∇f = (1/N) Σ_j ∇ℓ_j``.
    Pass 2 per chunk: :func:`~clipscope.engine.per_sample.per_sample_dots` (one
    forward-mode JVP along ∇f), and ``Σ_j γ_j(η) ∇ℓ_j = ∇ Σ_j γ_j(η) ℓ_j`` by one
    backward per η. Chunk ``c`` runs under the ``"fixed"`` dropout seed ``(seed, c)``
    in both passes.
    """
    from clipscope.engine import per_sample

    m_chunks = len(components)
    n_samples = int(sum(components.sizes))
    sq_norms, losses = np.zeros(n_samples), np.zeros(n_samples)
    sum_grad = torch.zeros(flat.n, dtype=torch.float64, device=flat.device)
    offsets = np.concatenate([[0], np.cumsum(components.sizes)]).astype(int)
    params = flat.params
    with dropout_policy(model, dropout):
        for c in _progress(range(m_chunks), m_chunks, progress, "per-sample pass 1"):
            x, y = components.batch(c, flat.device)
            with rng_for_component(dropout, seed, c):
                ghost = per_sample.ghost_pass(model, loss_fn, x, y, params=params)
            a, b = offsets[c], offsets[c + 1]
            sq_norms[a:b] = ghost.sq_norms.detach().double().cpu().numpy()
            losses[a:b] = ghost.losses.detach().double().cpu().numpy()
            chunk_sum = torch.cat([g.detach().reshape(-1).double() for g in ghost.grad_sum])
            if not bool(torch.isfinite(chunk_sum).all()) or not np.isfinite(sq_norms[a:b]).all():
                raise NonFiniteError(
                    f"chunk {c}: non-finite per-sample gradient; nothing was changed"
                )
            sum_grad += chunk_sum
        full = sum_grad / n_samples
        norms = np.sqrt(sq_norms)
        gam = torch.from_numpy(_gammas(norms, etas)).to(flat.device)
        clip_acc = torch.zeros(len(etas), flat.n, dtype=torch.float64, device=flat.device)
        dots = np.zeros(n_samples)
        vector = [t.to(p.dtype) for t, p in zip(flat.unflatten(full), params, strict=True)]
        for c in _progress(range(m_chunks), m_chunks, progress, "per-sample pass 2"):
            x, y = components.batch(c, flat.device)
            a, b = offsets[c], offsets[c + 1]
            with rng_for_component(dropout, seed, c):
                d = per_sample.per_sample_dots(model, loss_fn, x, y, vector, params=params)
            dots[a:b] = d.detach().double().cpu().numpy()
            if not etas:
                continue
            with rng_for_component(dropout, seed, c):
                ell = per_sample.per_sample_losses(model, loss_fn, x, y)
            for k in range(len(etas)):
                weights = gam[k, a:b].to(ell.dtype)
                g = flat.grad((weights * ell).sum(), c, retain_graph=k + 1 < len(etas))
                clip_acc[k] += g.double()
    clipped = {eta: _cos(clip_acc[k], full) for k, eta in enumerate(etas)}
    return [
        {
            "norms": norms,
            "dots": dots,
            "losses": losses,
            "sizes": np.ones(n_samples, dtype=np.int64),
            "full": full,
            "clipped": clipped,
            "batch_size": 1,
            "mismatch": 0.0,
        }
    ]


def _package(results, route, info, flat, keep_full_grad, components):
    packed = {}
    for r in results:
        full = r.pop("full")
        level_info = {**info, "max_pass_mismatch": r.pop("mismatch")}
        level_info["n_samples"] = int(np.sum(r["sizes"]))
        packed[r["batch_size"]] = ProbeResult(
            norms=r["norms"],
            dots=r["dots"],
            grad_norm=_norm64(full),
            losses=r["losses"],
            clipped=r["clipped"],
            route=route,
            batch_size=r["batch_size"],
            sizes=r["sizes"],
            full_grad=[t.clone() for t in flat.unflatten(full)] if keep_full_grad else None,
            info=level_info,
        )
    if route == "dyadic":
        return MultiProbeResult(packed)
    return next(iter(packed.values()))


# -- the slow, obviously-correct twin -------------------------------------------
def reference_probe(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    etas: Iterable[float] = (),
    *,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> ProbeResult:
    """Brute force: every ``g_i`` by its own autograd call, kept in float64, explicit sums.

    ``∇f = (1/m) Σ_i g_i``; ``d_i = Σ_j g_ij ∇f_j``; ``Σ_i min{1, η/n_i} g_i`` summed
    explicitly. Memory O(m·n): for tests and small problems only.
    """
    etas = _check_etas(etas)
    params = trainable_params(model, params)
    flat = _Flat(model, params)
    rows, losses = [], []
    with model_guard(model), torch.enable_grad():
        for i, loss in component_losses(
            model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device
        ):
            rows.append(flat.grad(loss, i).double())
            losses.append(float(loss.detach()))
    G = torch.stack(rows)
    full = G.sum(0) / len(rows)
    norms = torch.sqrt((G * G).sum(1))
    dots = (G * full).sum(1)
    clipped = {}
    for eta in etas:
        total = torch.zeros_like(full)
        for i in range(len(rows)):
            n = float(norms[i])
            total += (eta / n if n > eta else 1.0) * G[i]
        clipped[eta] = _cos(total, full)
    info = {"dropout": dropout, "seed": seed, "n_samples": int(sum(components.sizes))}
    return ProbeResult(
        norms=norms.cpu().numpy(),
        dots=dots.cpu().numpy(),
        grad_norm=float(torch.sqrt((full * full).sum())),
        losses=np.array(losses),
        clipped=clipped,
        route="reference",
        batch_size=int(components.batch_size),
        sizes=np.array(components.sizes),
        full_grad=[t.clone() for t in flat.unflatten(full)],
        info=info,
    )
