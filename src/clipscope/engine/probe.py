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
    batch size 1, in two passes of bounded memory: pass 1 sums each chunk's
    gradient for ``∇f``; pass 2 forms each chunk's per-sample factors
    (:mod:`clipscope.engine.per_sample`: ghost norms, never per-sample
    gradients where a rule exists) and takes the norms, the dots with ``∇f``
    and the clipped sums from them. Every rule is verified
    (:mod:`clipscope.engine.verify`: a structural check at every chunk, a spot
    check of ``spot_checks`` seeded samples); parameters without a rule or
    whose check fails come from an exact fallback, with a warning, and
    ``result.route`` is then ``"per-sample+fallback"``. Refuses train-mode
    BatchNorm.
``"per-sample-kept"``
    the per-sample route whose pass 1 also keeps, per layer, the factors the
    rules need (:mod:`clipscope.engine.per_sample.kept`) while they fit
    ``memory_budget``; the dots and clipped sums then follow from them once
    ∇f is known, without running the model again. Same checks, same
    fallbacks. When the factors do not fit it refuses (``ValueError``, after
    the chunk that showed it); ``"auto"`` runs ``"per-sample"`` instead.

Every route checks its result for consistency (Cauchy–Schwarz, ``Σ d_i =
m‖∇f‖²``) and warns (``strict=True``: raises) on a violation.

``route="auto"`` picks ``dyadic`` when several batch sizes are asked for,
``per-sample-kept`` for ``batch_sizes=[1]`` when its factors fit the memory
budget (``per-sample`` when not), else ``keep`` when it fits the memory
budget, else ``two-pass``; ``result.route`` says which ran, and
``result.info["factors"]`` what the per-sample routes kept.

Reductions are sums (``Σ g_i``, ``Σ γ_i g_i``, per-component scalars placed by
index). Under an initialised ``torch.distributed`` process group the same call
on every rank splits the components (:class:`~clipscope.engine.distributed.Shard`:
contiguous blocks, the vectors all-reduced in float64 where the sums
complete, the scalars gathered in index order) and returns the whole result
on every rank (``docs/distributed.md``).

Batches are moved to the device of the first parameter.

The probe leaves the model exactly as found (:func:`~clipscope.engine.guard.model_guard`):
parameters, buffers, ``.grad``, train/eval flags and the global RNG. It uses
``torch.autograd.grad`` and never writes ``.grad``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.engine import distributed as _dist
from clipscope.engine import verify
from clipscope.engine.guard import (
    batch_coupled_modules,
    check_dropout_policy,
    dropout_policy,
    model_guard,
    rng_for_component,
)
from clipscope.engine.losses import (
    check_loss_fn,
    check_repeatable,
    component_losses,
    param_names,
    trainable_params,
)
from clipscope.engine.result import MultiProbeResult, ProbeResult
from clipscope.errors import NonFiniteError
from clipscope.math.stats import check_eta

__all__ = ["ROUTES", "probe", "reference_probe"]

ROUTES = ("auto", "two-pass", "keep", "dyadic", "per-sample", "per-sample-kept")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for the keep route's g_i, per-sample-kept's factors
_CHUNK_ROWS = 256  # rows of the kept matrix cast to float64 at a time
REPEAT_ROWS = 8  # samples the per-sample route's repeatability check evaluates twice
# two-pass per-sample route (and the rebuild after kept factors were dropped): a chunk whose
# fallback parameters' per-sample gradients would exceed this many elements keeps no factors
# in pass 2 (its dots and clipped sums then come from the dot pass and one backward per η,
# in bounded memory)
_LIGHT_ROWS = 1 << 24


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
    strict: bool = False,
    spot_checks: int = 4,
    distributed: bool | None = None,
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
    route : {"auto", "two-pass", "keep", "dyadic", "per-sample", "per-sample-kept"}
        See the module docstring.
    dropout : {"off", "fixed"}
        Dropout policy (:mod:`clipscope.engine.guard`).
    seed : int
        Seed of the ``"fixed"`` dropout masks.
    memory_budget : int
        Bytes the keep route may use for the stored ``g_i``, and the
        per-sample-kept route for its kept factors (estimated from the first
        chunk, checked at every chunk; per process under torch.distributed).
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
    strict : bool
        Raise :class:`~clipscope.engine.verify.VerificationError` when a check
        fails (a per-sample rule's structural or spot check, or the consistency
        of the returned norms and dots), instead of falling back to an exact
        method (per-sample) or warning (consistency).
    spot_checks : int
        Per-sample route: samples whose gradients are recomputed by their own
        backward and compared with the route's norms and dots (seeded by
        ``seed``; recorded in ``result.verification``).
    distributed : bool, optional
        None (default): when a ``torch.distributed`` process group with more
        than one rank is initialised, split the components over its ranks
        (every rank must make the same call; each returns the whole result).
        False: compute everything in this process. True: require a group.

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
    model = _dist.unwrap(model)  # DistributedDataParallel: its module; FSDP refused
    if isinstance(spot_checks, bool) or not isinstance(spot_checks, int) or spot_checks < 0:
        raise ValueError(f"spot_checks must be an int >= 0, got {spot_checks!r}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be a non-negative int (bytes), got {memory_budget!r}")
    _check_components(components)
    # per-sample-kept is the per-sample route keeping its factors: every check of it applies
    keep_factors: bool | str = False
    if route == "per-sample-kept":
        route, keep_factors = "per-sample", "required"
    form = check_loss_fn(loss_fn, components, route, batch_sizes)  # fits route and batches
    params = trainable_params(model, params)
    flat = _Flat(model, params)
    m = len(components)
    base_b = int(components.batch_size)
    sizes_dyadic = _dyadic_sizes(base_b, batch_sizes, levels)
    ranks = _dist.ranks(distributed)
    if ranks is not None:  # every rank must measure the same thing
        arguments = {
            "etas": etas, "route": route, "dropout": dropout, "seed": seed,
            "memory_budget": memory_budget, "batch_sizes": batch_sizes, "levels": levels,
            "strict": strict, "spot_checks": spot_checks, "keep_full_grad": keep_full_grad,
        }  # fmt: skip
        ranks.check_same(_fingerprints(model, loss_fn, components, params, arguments))
    if route == "auto":
        if batch_sizes is not None and list(batch_sizes) == [1] and base_b != 1:
            route, keep_factors = "per-sample", "auto"
        elif len(sizes_dyadic) > 1:
            route = "dyadic"
        elif _dist.Shard(m, ranks).largest * flat.n * flat.dtype.itemsize <= memory_budget:
            route = "keep"
        else:
            route = "two-pass"
    wants_single = batch_sizes is not None and list(batch_sizes) == [1] and base_b != 1
    if wants_single and route != "per-sample":
        raise ValueError(f"batch_sizes=[1] needs route='per-sample' (or 'auto'), got {route!r}")
    if route not in ("dyadic",) and len(sizes_dyadic) > 1:
        raise ValueError(f"several batch sizes {sizes_dyadic} need route='dyadic' (or 'auto')")
    kept = _dist.Shard(m, ranks).largest  # the components one rank stores
    if route == "keep" and kept * flat.n * flat.dtype.itemsize > memory_budget:
        raise ValueError(
            f"route='keep' needs m·n·itemsize = {kept * flat.n * flat.dtype.itemsize} bytes, "
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
        "processes": 1 if ranks is None else ranks.world,
    }
    # f_i must be a function of x: a forward drawing random numbers the dropout
    # policy does not control would make every statistic a sample of noise.
    # The per-sample route's components are samples: its first REPEAT_ROWS, not a chunk.
    check_repeatable(
        model, loss_fn, components, form=form, dropout=dropout, seed=seed,
        device=flat.params[0].device, rows=REPEAT_ROWS if route == "per-sample" else None,
    )  # fmt: skip
    verification: dict = {}
    # dyadic: whole top-level parents per rank, so that no parent straddles two ranks
    shard = _dist.Shard(m, ranks, align=1 << (len(sizes_dyadic) - 1) if route == "dyadic" else 1)
    progress = progress and _dist.is_writer()
    with model_guard(model), torch.enable_grad(), shard.together():
        if route == "per-sample":
            result, verification = _per_sample(
                model, loss_fn, components, flat, etas, dropout, seed, progress, strict,
                spot_checks, shard, keep_factors, memory_budget,
            )  # fmt: skip
            info["factors"] = verification.pop("factors")
            if info["factors"]["kept"]:
                route = "per-sample-kept"
            if verification["fallback"] or verification["dots_fallback"]:
                route += "+fallback"
        elif route == "keep":
            result = _keep(model, loss_fn, components, flat, etas, dropout, seed, progress, shard)
        else:
            levels_ = len(sizes_dyadic) if route == "dyadic" else 1
            result = _sweep(
                model, loss_fn, components, flat, etas, dropout, seed, progress, levels_, shard
            )
    return _package(result, route, info, flat, keep_full_grad, verification, strict)


def _fingerprints(model, loss_fn, components, params, args) -> dict[str, Any]:
    """Return what every rank must agree on before a distributed probe (``check_same``)."""
    arguments = {
        **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in args.items()},
        "m": len(components),
        "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
    }
    return {
        "arguments": arguments,
        "data": _dist.components_fingerprint(components),
        "model": _dist.model_fingerprint(model, params),
    }


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


def _sweep(model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels, shard):
    """Two passes at the base batch size; levels > 1 are the dyadic parents.

    ``shard``: this rank's block (whole top-level parents), completed after each pass.
    """
    sizes = [int(s) for s in components.sizes]
    drop_last = bool(getattr(components, "drop_last", False))
    levels = [_Level(flat.n, flat.device, merges=level > 0) for level in range(n_levels)]
    m = len(components)
    # pass 1: norms, losses, Σ g (and the dyadic carry)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device, only=shard.only
    )
    for i, loss in _progress(shard.losses(stream), len(shard), progress, "probe pass 1"):
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
    full_sums = shard.sum_(torch.stack([lev.sum_grad for lev in levels]))
    for level, lev in enumerate(levels):  # every rank's parents, in index order
        lev.norms, lev.losses, sizes_l = shard.gather(lev.norms, lev.losses, lev.sizes)
        lev.norms, lev.losses = list(lev.norms), list(lev.losses)
        lev.sizes, lev.sum_grad = [int(v) for v in sizes_l], full_sums[level]
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
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device, only=shard.only
    )
    for i, loss in _progress(shard.losses(stream), len(shard), progress, "probe pass 2"):
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
    shard.sum_(clip_acc)
    mismatch = shard.max(mismatch)
    child_dots = np.stack(shard.complete(*child_dots))
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


def _keep(model, loss_fn, components, flat, etas, dropout, seed, progress, shard):
    """One pass storing every g_i; dots and clipped sums as chunked float64 products.

    ``shard``: this rank stores and multiplies its block's rows only.
    """
    m = len(components)
    G = torch.empty(len(shard), flat.n, dtype=flat.dtype, device=flat.device)
    sum_grad = torch.zeros(flat.n, dtype=torch.float64, device=flat.device)
    norms, losses = np.zeros(m), np.zeros(m)
    stream = component_losses(
        model, loss_fn, components, dropout=dropout, seed=seed, device=flat.device, only=shard.only
    )
    for i, loss in _progress(shard.losses(stream), len(shard), progress, "probe (keep)"):
        g = flat.grad(loss, i)
        G[i - shard.start] = g
        g = g.double()
        norms[i] = _norm64(g)
        losses[i] = float(loss.detach())
        sum_grad += g
    norms, losses = shard.complete(norms, losses)
    full = shard.sum_(sum_grad) / m
    dots = torch.zeros(m, dtype=torch.float64, device=flat.device)
    gam = torch.from_numpy(_gammas(norms, etas)).to(flat.device)  # (E, m)
    clip_acc = torch.zeros(len(etas), flat.n, dtype=torch.float64, device=flat.device)
    for a in range(0, len(shard), _CHUNK_ROWS):  # a: row of G, a + start: component
        rows = G[a : a + _CHUNK_ROWS].double()
        c = a + shard.start
        dots[c : c + len(rows)] = rows @ full
        if etas:
            clip_acc += gam[:, c : c + len(rows)] @ rows
    shard.sum_(clip_acc)
    (dots_np,) = shard.complete(dots.cpu().numpy())
    clipped = {eta: _cos(clip_acc[k], full) for k, eta in enumerate(etas)}
    return [
        {
            "norms": norms,
            "dots": dots_np,
            "losses": losses,
            "sizes": np.array(components.sizes),
            "full": full,
            "clipped": clipped,
            "batch_size": int(components.batch_size),
            "mismatch": 0.0,
        }
    ]


def _per_sample(
    model,
    loss_fn,
    components,
    flat,
    etas,
    dropout,
    seed,
    progress,
    strict,
    spot_checks,
    shard,
    keep_factors=False,
    memory_budget=DEFAULT_MEMORY_BUDGET,
):
    """Batch-size-1 components; the given components are processed as chunks.

    Kept factors (``keep_factors``): pass 1 per chunk is
    :func:`~clipscope.engine.per_sample.ghost_pass` with ``keep=True`` (per-sample
    ``‖∇ℓ_j‖²`` by the layer rules, each checked structurally, ``ℓ_j``,
    ``∇Σ_j ℓ_j`` and the chunk's factors), so ``∇f = (1/N) Σ_j ∇ℓ_j``; pass 2
    takes the dots and the γ-weighted sums from the kept factors.

    Two passes: pass 1 per chunk is one plain backward of ``Σ_j ℓ_j``
    (:func:`_chunk_gradient`), whose gradient is kept only as its norm and its
    projections on the structural check's directions; pass 2 per chunk is
    ``ghost_pass(keep=True, actual=...)`` (a backward w.r.t. the layer outputs
    only), and the chunk's norms, dots and γ-weighted sums come from its
    factors. After a dot fallback, the classic order: ``ghost_pass`` norms in
    pass 1; in pass 2 :func:`~clipscope.engine.per_sample.per_sample_dots` and
    ``∇ Σ_j γ_j(η) ℓ_j`` by one backward per η. Factors dropped over the budget
    in pass 1 of an ``auto`` attempt: pass 2 forms each chunk's factors again
    when η are given, else takes the dot pass. Then the spot check of the
    chunk's spot samples. Chunk ``c`` runs under the ``"fixed"`` dropout seed
    ``(seed, c)`` in both passes.

    A failed spot check moves the parameters concerned (or the dots) to the
    exact fallback and runs the probe again; after two such rounds everything
    is on the fallback, and a third failure raises: the components are then not
    reproducible (unseeded randomness) and nothing can be trusted.

    ``shard``: this rank's chunks; the plan's fallbacks and the spot checks'
    failures are merged over the ranks (:func:`_merge_plan`), so every rank
    takes the same decisions and returns the same record.

    ``keep_factors`` (``"auto"``, ``"required"`` or False): pass 1 also keeps each
    chunk's per-sample gradients in factored form
    (:class:`~clipscope.engine.per_sample.kept.KeptChunk`) while their estimated
    total fits ``memory_budget`` (per process: this rank's chunks); pass 2 then
    takes the chunk's dots and γ-weighted sums from them instead of running the
    model. ``"auto"`` drops them when they do not fit (on every rank when on
    one); ``"required"`` raises ``ValueError``.
    """
    from clipscope.engine.per_sample import Plan
    from clipscope.engine.per_sample.batch import kernels_for_derivatives

    n_samples = int(sum(components.sizes))
    spot = verify.spot_samples(n_samples, spot_checks, seed)
    # every forward of one attempt with the same kernels: a dropout mask is drawn in memory
    # order, and oneDNN's LSTM lays its output out differently. oneDNN is only ever turned
    # off for models with recurrent modules (kernels_for_derivatives), and their pass 2 is
    # the reverse-mode ghost product (dot_method), not forward-mode AD, which oneDNN's LSTM
    # lacks: so every attempt keeps the model's own kernels, kept factors or not, and an
    # auto attempt whose factors are dropped over the budget goes on as two passes. Only
    # a dot fallback after a failed spot check runs with oneDNN off.
    with dropout_policy(model, dropout):
        plan = Plan(model, flat.params, seed=seed, strict=strict)
        for attempt in range(3):
            with kernels_for_derivatives(model, onednn=plan.dots_fallback is None):
                result, failures = _per_sample_once(
                    model, loss_fn, components, flat, etas, dropout, seed, progress, plan, spot,
                    shard, keep_factors, memory_budget,
                )  # fmt: skip
            from_factors = result.pop("dots_from_factors")
            if not result["factors"]["kept"]:
                keep_factors = False  # a rerun does not try again what did not fit
            if not failures["params"] and failures["dots"] is None:
                break
            if attempt == 2:
                raise verify.VerificationError(
                    "per-sample spot check failed even with every quantity from exact per-sample "
                    f"gradients ({failures}): the components are not reproducible (randomness "
                    "that the dropout policy does not control?)"
                )
            # passes that saw other random numbers say nothing about the rules: the dots go
            # to per-sample gradients (the classic order), the parameters stay
            differ = failures.get("passes_differ", False)
            if failures["params"] and not differ:  # one event: the first sample's reason
                plan.demote(
                    list(failures["params"]), "spot-norm", next(iter(failures["params"].values()))
                )
            # dots from factors (kept or rebuilt): a parameter's wrong split makes its dots
            # wrong too; rerun with it on the fallback before blaming the dots (a second dot
            # failure demotes them)
            blame_params = from_factors and failures["params"] and attempt == 0 and not differ
            if failures["dots"] is not None and not blame_params:
                plan.demote_dots("spot-dot", failures["dots"])
            if attempt == 1:  # the second failure: nothing from the rules any more
                plan.demote(range(len(flat.params)), "spot-norm", "a second spot-check failure")
                plan.demote_dots("spot-dot", "a second spot-check failure")
    record = plan.record()
    record.update(result.pop("spot"))
    record["factors"] = result.pop("factors")
    record["attempts"] = attempt + 1
    return [result], record


def _per_sample_once(
    model,
    loss_fn,
    components,
    flat,
    etas,
    dropout,
    seed,
    progress,
    plan,
    spot,
    shard,
    keep_factors=False,
    memory_budget=DEFAULT_MEMORY_BUDGET,
):
    """One attempt of :func:`_per_sample`: ``(result, failures)``."""
    from clipscope.engine import per_sample
    from clipscope.engine.per_sample.fallback import fallback_stats

    n_samples = int(sum(components.sizes))
    sq_norms, losses = np.zeros(n_samples), np.zeros(n_samples)
    sum_grad = torch.zeros(flat.n, dtype=torch.float64, device=flat.device)
    offsets = np.concatenate([[0], np.cumsum(components.sizes)]).astype(int)
    params = flat.params
    spot_sq: dict[int, dict[int, float]] = {}
    ghost_losses: list[torch.Tensor] = []
    kept: list = []  # each chunk's KeptChunk while the factors fit the budget
    factors = {"kept": bool(keep_factors), "bytes": 0, "budget": memory_budget, "reason": None}
    mine = int(sum(offsets[c + 1] - offsets[c] for c in shard.indices))  # this rank's samples
    seen = 0
    required, requested = keep_factors == "required", bool(keep_factors)
    # Two passes (no factors kept): pass 1 only sums the chunks' gradients for ∇f, and pass 2
    # forms each chunk's factors (pass 1 of the kept route, one chunk at a time) and takes
    # the norms, the dots and the clipped sums from them. After a dot fallback: the classic
    # order (norms in pass 1, dots by the dot pass).
    light = not keep_factors and plan.dots_fallback is None
    reduced = flat.dtype not in (torch.float32, torch.float64)
    actual: list = []  # light, float32/64: each chunk's ∇Σ_j ℓ_j as its norms and projections
    for c in _progress(shard.indices, len(shard), progress, "per-sample pass 1"):
        x, y = components.batch(c, flat.device)
        a, b = offsets[c], offsets[c + 1]
        with rng_for_component(dropout, seed, c):
            if light:
                ghost = None
                ell, grad_sum = _chunk_gradient(model, loss_fn, x, y, flat, plan, reduced)
            else:
                ghost = per_sample.ghost_pass(
                    model, loss_fn, x, y, plan=plan, keep=bool(keep_factors)
                )
                ell, grad_sum = ghost.losses, ghost.grad_sum
                sq_norms[a:b] = ghost.sq_norms.detach().double().cpu().numpy()
        losses[a:b] = ell.detach().double().cpu().numpy()
        finite = np.isfinite(sq_norms[a:b]).all() and np.isfinite(losses[a:b]).all()
        if not finite or not _finite_parts(grad_sum):
            raise NonFiniteError(f"chunk {c}: non-finite per-sample gradient; nothing was changed")
        for part, g in zip(flat.unflatten(sum_grad), grad_sum, strict=True):
            part += g  # float64 views of sum_grad, one per parameter
        ghost_losses.append(ell)
        if ghost is None:
            if not reduced:  # what pass 2's structural check compares with: no weight gradient
                actual.append(
                    [(float(torch.linalg.vector_norm(g)), d.of_tensor(g))
                     for g, d in zip(grad_sum, plan.directions, strict=True)]
                )  # fmt: skip
            continue
        for j in spot[(spot >= a) & (spot < b)]:
            spot_sq[int(j)] = {k: float(v[j - a]) for k, v in ghost.per_param.items()}
        if keep_factors:
            kept.append(ghost.kept)
            factors["bytes"] += ghost.kept.nbytes
            seen += b - a
            estimate = int(factors["bytes"] * mine // seen)  # all chunks, from those seen
            if estimate > memory_budget:
                reason = (
                    f"the per-sample factors need about {estimate} bytes (from {seen} of "
                    f"{mine} samples), more than memory_budget={memory_budget}"
                )
                if required and shard.ranks is None:
                    raise ValueError(
                        f"route='per-sample-kept': {reason}; use route='per-sample' (two "
                        "passes, bounded memory) or a larger memory_budget"
                    )
                keep_factors, kept = False, []
                factors.update(kept=False, bytes=estimate, reason=reason)
        del ghost
    if requested and shard.ranks is not None:  # every rank keeps, or none does
        states = shard.objects((factors["kept"], factors["bytes"], factors["reason"]))
        failed = next((s for s in states if not s[0]), None)
        if failed is not None:
            if required:
                raise ValueError(
                    f"route='per-sample-kept': {failed[2]} (on one rank); use "
                    "route='per-sample' (two passes, bounded memory) or a larger memory_budget"
                )
            kept = []
            factors.update(kept=False, bytes=failed[1], reason=failed[2])
        else:
            factors["bytes"] = max(s[1] for s in states)  # the largest rank's, as the budget
    if not light:  # (the light attempt's norms come in pass 2)
        sq_norms, losses = shard.complete(sq_norms, losses, offsets=offsets)
        gam = torch.from_numpy(_gammas(np.sqrt(sq_norms), etas)).to(flat.device)
    full = shard.sum_(sum_grad) / n_samples
    _merge_plan(plan, shard)  # pass 2 runs with every rank's fallbacks, as one process would
    full_parts = flat.unflatten(full)
    gnorm = _norm64(full)
    clip_acc = torch.zeros(len(etas), flat.n, dtype=torch.float64, device=flat.device)
    dots = np.zeros(n_samples)
    vector = list(full_parts)
    tol = verify.tolerance(flat.dtype)
    failures: dict[str, Any] = {"params": {}, "dots": None}
    spot_record = {
        "spot_checks": len(spot),
        "spot_samples": spot.tolist(),
        "spot_seed": int(seed),
        "spot_max_norm_error": 0.0,
        "spot_max_dot_error": 0.0,
        "tolerance": tol,
    }
    batch1 = sorted(plan.batch1)
    # a dot that failed its spot check is not taken from the same factors again
    use_kept = bool(kept) and plan.dots_fallback is None
    # Factors dropped over the budget in pass 1, η given: pass 2 forms each chunk's factors
    # again, and its dots and every clipped sum follow from them: one forward and backward
    # instead of the dot pass, a forward and a backward per η
    rebuild = not (use_kept or light) and bool(etas) and plan.dots_fallback is None
    # (the same on every rank: a failed dot blames the parameters first)
    from_factors = use_kept or rebuild or light
    for c in _progress(shard.indices, len(shard), progress, "per-sample pass 2"):
        x, y = components.batch(c, flat.device)
        a, b = offsets[c], offsets[c + 1]
        chunk = kept[c - shard.start] if use_kept else None
        if light:
            given = actual[c - shard.start] if actual else None
            with rng_for_component(dropout, seed, c):
                ghost = per_sample.ghost_pass(
                    model, loss_fn, x, y, plan=plan, keep=True, actual=given,
                    expect_losses=ghost_losses[c - shard.start], keep_limit=_LIGHT_ROWS,
                )  # fmt: skip
            if ghost.mismatch is not None:  # other random numbers than pass 1: ∇f, the rules'
                # check and the dots would mix two sets of components; the attempt is redone
                # in the classic order with the dots from per-sample gradients
                failures["passes_differ"] = True
                if failures["dots"] is None:
                    failures["dots"] = (
                        f"chunk {c}: pass 2 does not reproduce pass 1's losses ({ghost.mismatch})"
                    )
                continue  # (this chunk's numbers stay 0; nothing of the attempt is kept)
            sq_norms[a:b] = ghost.sq_norms.detach().double().cpu().numpy()
            if not np.isfinite(sq_norms[a:b]).all():
                raise NonFiniteError(
                    f"chunk {c}: non-finite per-sample gradient; nothing was changed"
                )
            for j in spot[(spot >= a) & (spot < b)]:
                spot_sq[int(j)] = {k: float(v[j - a]) for k, v in ghost.per_param.items()}
            chunk = ghost.kept  # None: the fallback's rows over _LIGHT_ROWS (the dot pass below)
            del ghost
            gam_c = torch.from_numpy(_gammas(np.sqrt(sq_norms[a:b]), etas)).to(flat.device)
        else:
            gam_c = gam[:, a:b]
        if rebuild:
            with rng_for_component(dropout, seed, c):
                again = per_sample.ghost_pass(
                    model, loss_fn, x, y, plan=plan, keep=True, keep_limit=_LIGHT_ROWS
                )
            # the same masks as pass 1, or the chunk takes the dot pass and backwards below
            differ = verify.losses_differ(again.losses, ghost_losses[c - shard.start], flat.dtype)
            if differ is None:
                chunk = again.kept
            del again
        if chunk is not None:
            d = chunk.dots(vector)
        else:
            with rng_for_component(dropout, seed, c):
                d = per_sample.per_sample_dots(
                    model, loss_fn, x, y, vector, plan=plan,
                    expect_losses=ghost_losses[c - shard.start],
                )  # fmt: skip
        dots[a:b] = d.detach().double().cpu().numpy()
        local = [int(j) - a for j in spot[(spot >= a) & (spot < b)]]
        if local:
            with rng_for_component(dropout, seed, c):
                own = _spot_gradients(model, loss_fn, x, y, params, local, plan)
            for i, j in enumerate(local):
                _spot_compare(
                    a + j,
                    [g[i] for g in own],
                    spot_sq[a + j],
                    dots[a + j],
                    full,
                    flat,
                    gnorm,
                    tol,
                    plan,
                    failures,
                    spot_record,
                )
        if not etas:
            continue
        if chunk is not None:  # Σ_j γ_j(η) g_j from the factors, no backward
            for k, w in chunk.weighted(gam_c).items():
                start = sum(flat.numels[:k])
                clip_acc[:, start : start + flat.numels[k]] += w.reshape(len(etas), -1)
            continue
        # γ-weighted sums: one backward of Σ_j γ_j ℓ_j per η (exact for every parameter whose
        # batch gradient is the sum of its per-sample gradients), the rest from batch-1 passes;
        # float16/bfloat16 scale the seed so that the batch sum cannot overflow
        scale = 2.0 ** -math.ceil(math.log2(max(2, b - a))) if reduced else 1.0
        fs = None
        if batch1:
            fs = fallback_stats(
                model, loss_fn, x, y, [params[k] for k in batch1], "loop", weights=gam_c
            )
        with rng_for_component(dropout, seed, c):
            ell = per_sample.per_sample_losses(model, loss_fn, x, y)
            for e in range(len(etas)):
                weights = (gam_c[e] * scale).to(ell.dtype)
                g = flat.grad((weights * ell).sum(), c, retain_graph=e + 1 < len(etas))
                g = g.double() / scale
                if fs is not None:
                    parts = flat.unflatten(g)
                    for i, k in enumerate(batch1):
                        parts[k].copy_(fs.weighted[e][i])
                clip_acc[e] += g
    shard.sum_(clip_acc)
    (dots,) = shard.complete(dots, offsets=offsets)
    if light:
        sq_norms, losses = shard.complete(sq_norms, losses, offsets=offsets)
    norms = np.sqrt(sq_norms)
    failures, spot_record = _merge_checks(failures, spot_record, shard)
    _merge_plan(plan, shard)
    clipped = {eta: _cos(clip_acc[k], full) for k, eta in enumerate(etas)}
    return {
        "norms": norms,
        "dots": dots,
        "losses": losses,
        "sizes": np.ones(n_samples, dtype=np.int64),
        "full": full,
        "clipped": clipped,
        "batch_size": 1,
        "mismatch": 0.0,
        "spot": spot_record,
        "factors": factors,
        "dots_from_factors": from_factors,
    }, failures


def _finite_parts(parts) -> bool:
    """Whether every entry of the float64 tensors is finite.

    A finite float64 sum means finite entries; the elementwise test runs only when it is not.
    """
    total = sum(float(g.sum()) for g in parts)
    return math.isfinite(total) or all(bool(torch.isfinite(g).all()) for g in parts)


def _chunk_gradient(model, loss_fn, x, y, flat, plan, reduced):
    """Pass 1 of the two-pass per-sample route for one chunk: ``(ℓ, Σ_j ∇ℓ_j)``.

    The per-sample losses ``(B,)`` and, per parameter, the float64 sum of the
    chunk's per-sample gradients: one backward of ``Σ_j ℓ_j`` (its batch gradient
    is that sum for every parameter whose gradient is the derivative), the
    parameters that need batch-1 passes (``plan.batch1``) from them.
    float16/bfloat16 scale the seed so that the batch sum cannot overflow.
    """
    from clipscope.engine.per_sample import per_sample_losses
    from clipscope.engine.per_sample._common import dense_grad
    from clipscope.engine.per_sample.fallback import fallback_stats

    params = flat.params
    batch1 = sorted(plan.batch1)
    rest = [k for k in range(len(params)) if k not in plan.batch1]
    scale = 2.0 ** -math.ceil(math.log2(max(2, x.shape[0]))) if reduced else 1.0
    ell = per_sample_losses(model, loss_fn, x, y)
    out: list[torch.Tensor | None] = [None] * len(params)
    if rest:
        seed = ell.sum() if scale == 1.0 else (ell * scale).sum()
        grads = torch.autograd.grad(seed, [params[k] for k in rest], allow_unused=True)
        for k, g in zip(rest, grads, strict=True):
            g = dense_grad(g, params[k]).double()
            out[k] = g if scale == 1.0 else g / scale
    if batch1:
        fs = fallback_stats(model, loss_fn, x, y, [params[k] for k in batch1], "loop")
        for i, k in enumerate(batch1):
            out[k] = fs.sums[i].double().reshape(params[k].shape)
    return ell.detach(), out


def _merge_plan(plan, shard) -> None:
    """Give every rank's plan the fallbacks of all ranks, as one process over the chunks would.

    Rank order is chunk order: each parameter keeps the reason of the first
    rank that moved it, an event of a later rank keeps only the parameters no
    earlier one moved, the dots keep the first reason. Events this rank had
    not seen are warned about here. Structural checks add up; their largest
    error is the largest of all.
    """
    from clipscope.engine.per_sample.plan import Event

    if shard.ranks is None:
        return
    states = shard.objects(
        (plan.events, plan.fallback, plan.dots_fallback, plan.structural_checks,
         plan.structural_max_error, plan.vmap_failed)
    )  # fmt: skip
    mine = {(e.stage, e.params, e.reason) for e in plan.events}
    events: list = []
    moved: set[str] = set()
    fallback: dict[int, str] = {}
    dots = None
    for rank_events, rank_fallback, rank_dots, *_ in states:
        for e in rank_events:
            if not e.params:
                if dots is None:
                    dots = rank_dots if rank_dots is not None else e.reason
                    events.append(e)
                continue
            new = tuple(name for name in e.params if name not in moved)
            if new:
                moved.update(new)
                events.append(Event(e.stage, new, e.reason))
        for k, reason in rank_fallback.items():
            fallback.setdefault(k, reason)
    for e in events:
        if (e.stage, e.params, e.reason) not in mine and not any(
            set(e.params) <= set(p) and e.reason == r for _, p, r in mine
        ):
            warnings.warn(e.message(), verify.PerSampleFallbackWarning, stacklevel=4)
    plan.events = events
    plan.fallback = dict(sorted(fallback.items()))
    plan.dots_fallback = dots if dots is not None else next((s[2] for s in states if s[2]), None)
    plan.structural_checks = sum(s[3] for s in states)
    plan.structural_max_error = max(s[4] for s in states)
    plan.vmap_failed = any(s[5] for s in states)


def _merge_checks(failures, record, shard):
    """Merge every rank's spot checks: the first failure in sample order, the largest errors."""
    if shard.ranks is None:
        return failures, record
    merged: dict[str, Any] = {"params": {}, "dots": None}
    worst = {"spot_max_norm_error": 0.0, "spot_max_dot_error": 0.0}
    for rank_failures, rank_record in shard.objects((failures, record)):
        if rank_failures.get("passes_differ"):
            merged["passes_differ"] = True
        for k, message in rank_failures["params"].items():
            merged["params"].setdefault(k, message)
        if merged["dots"] is None:
            merged["dots"] = rank_failures["dots"]
        for key in worst:
            worst[key] = max(worst[key], rank_record[key])
    return merged, {**record, **worst}


def _spot_gradients(model, loss_fn, x, y, params, local, plan):
    """Return the spot samples' gradients by their own backward, per parameter ``(r, *shape)``.

    Under active dropout: a backward of ``ℓ_j`` through the chunk's batch forward
    (its masks). Otherwise each sample through its own batch-1 forward and
    backward, the paper's component itself (for r = 4 as fast as ``vmap(grad)``
    on the bench's CNN, and it runs any model).
    """
    from clipscope.engine.per_sample.batch import randomness_active
    from clipscope.engine.per_sample.fallback import per_sample_grads

    if randomness_active(model):
        chunks = list(per_sample_grads(model, loss_fn, x, y, params, "graph", only=local))
    else:
        chunks = list(per_sample_grads(model, loss_fn, x[local], y[local], params, "loop"))
    return [torch.cat([gs[k] for _, gs in chunks]) for k in range(len(params))]


def _spot_compare(j, own, route_sq, route_dot, full, flat, gnorm, tol, plan, failures, record):
    """Compare sample j's own gradient with the route's per-parameter norms and its dot."""
    g = torch.cat([t.reshape(-1) for t in own]).double()
    own_sq = [float(v) for v in torch.stack([t.square().sum() for t in flat.unflatten(g)])]
    own_dot = float(g @ full)
    total = sum(own_sq)
    for k, s_own in enumerate(own_sq):
        s_route = route_sq.get(k, math.nan)
        err = abs(s_route - s_own)
        rel = err / total if total > 0 else (0.0 if err == 0 else math.inf)
        record["spot_max_norm_error"] = max(record["spot_max_norm_error"], rel)
        if not err <= 2 * tol * total + 1e-300:
            failures["params"].setdefault(
                k,
                f"sample {j}: ‖g_j({plan.names[k]})‖² = {s_route:.9g} on the route, "
                f"{s_own:.9g} by its own backward",
            )
    scale = math.sqrt(total) * gnorm
    err = abs(route_dot - own_dot)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    record["spot_max_dot_error"] = max(record["spot_max_dot_error"], rel)
    if not err <= tol * scale + 1e-300 and failures["dots"] is None:
        failures["dots"] = (
            f"sample {j}: ⟨g_j, ∇f⟩ = {route_dot:.9g} on the route, {own_dot:.9g} by its own "
            "backward"
        )


def _package(results, route, info, flat, keep_full_grad, verification, strict):
    packed = {}
    tol = verify.tolerance(flat.dtype)
    for r in results:
        full = r.pop("full")
        level_info = {**info, "max_pass_mismatch": r.pop("mismatch")}
        level_info["n_samples"] = int(np.sum(r["sizes"]))
        grad_norm = _norm64(full)
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
