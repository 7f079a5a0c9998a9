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
    the loss of a parent batch is the weighted mean of its two consecutive
    children's (weights ``w``: declared by a loss returning ``(sum, count)``, else
    the sample counts), so ``g_P = (w_a g_a + w_b g_b)/(w_a + w_b)`` and, for
    the level's own ``∇f_l``, ``d_P = (w_a d_a + w_b d_b)/(w_a + w_b)``; the clipped
    sum is ``Σ_P γ_P g_P = Σ_c γ_{P(c)} (w_c/w_P) g_c``. That assumption is
    checked first on a few parents per level
    (:func:`~clipscope.engine.dense.check_merge`); where it fails, each larger
    batch size gets its own two-pass sweep, with a warning. Unequal last batches
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

With ``preconditioner=`` (an Adam/AdamW whose state gives P, or P's diagonal:
:mod:`clipscope.engine.preconditioner`) every route also measures the dots
``d^P_i = ⟨g_i, u⟩`` with the second direction ``u = P⁻¹∇f`` where it measures
the dots with ∇f (keep: one more matrix-vector product per block of rows;
two-pass and dyadic: one more row in pass 2's product, each level with its own
``u_l``; per-sample: the kept factors' dots with u, or a second dot pass after
a dot fallback; torch.distributed: gathered like the dots), checked the same
way (``|d^P_i| ≤ n_i‖u‖``, ``Σ_i d^P_i = m⟨∇f, u⟩``): ``result.preconditioned``.

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

This module checks the arguments, chooses the route once and runs it: the
dense routes are in :mod:`clipscope.engine.dense`, the per-sample routes'
driver in :mod:`clipscope.engine.per_sample_route` (the layer rules in
:mod:`clipscope.engine.per_sample`), what the routes share in
:mod:`clipscope.engine.common`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.engine import distributed as _dist
from clipscope.engine.common import Flat, check_etas, norm_and_cos, package
from clipscope.engine.dense import dyadic, keep_pass, sweep
from clipscope.engine.guard import (
    BufferHold,
    batch_coupled_modules,
    check_buffers_held,
    check_dropout_policy,
    model_guard,
)
from clipscope.engine.losses import (
    check_grad_compatible,
    check_loss_fn,
    check_repeatable,
    component_losses,
    mean_loss,
    trainable_params,
)
from clipscope.engine.preconditioner import as_preconditioner
from clipscope.engine.result import MultiProbeResult, PreconditionedResult, ProbeResult
from clipscope.engine.verify import tolerance

__all__ = ["ROUTES", "probe", "reference_probe"]

ROUTES = ("auto", "two-pass", "keep", "dyadic", "per-sample", "per-sample-kept")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for the keep route's g_i, per-sample-kept's factors
REPEAT_ROWS = 8  # samples the per-sample route's repeatability check evaluates twice


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
    preconditioner: Any = None,
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
        the batch's **mean** loss (a 0-d tensor), or ``(sum, count)`` for a
        weighted mean with its declared weight (:mod:`clipscope.engine.losses`).
        The per-sample route needs the first form.
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
    preconditioner : torch.optim.Adam, torch.optim.AdamW, sequence of Tensor, optional
        The preconditioner P of an adaptive step: the optimizer (its state is
        read, never changed: ``P = √(v/(1 − β₂^t)) + ε`` per parameter, P = 1
        where there is no state yet) or P's diagonal, one positive tensor per
        probed parameter (:mod:`clipscope.engine.preconditioner`). Every route
        then also measures ``d^P_i = ⟨g_i, u⟩`` with ``u = P⁻¹∇f`` (each dyadic
        level with its own ∇f_l), in float64: ``result.preconditioned``
        (:class:`~clipscope.engine.result.PreconditionedResult`;
        ``.ratio(η)`` is ``ρ_P(η)``). Checked like the dots with ∇f
        (``|d^P_i| ≤ n_i‖u‖``, ``Σ_i d^P_i = m⟨∇f, u⟩``).

    Returns
    -------
    ProbeResult or MultiProbeResult
        ``MultiProbeResult`` (``{batch size: ProbeResult}``) for the dyadic route.

    Raises
    ------
    ValueError
        Before anything runs, for what no route can serve exactly (each named in
        the table of ``docs/engine.md``, "What clipscope checks at run time"): a
        loss that changes between two evaluations, a forward that draws random
        numbers under ``dropout="off"`` (attention dropout applied functionally
        by a module in train mode), reentrant activation
        checkpointing, a declared weight that is not a positive constant;
        train-mode BatchNorm on the dyadic and per-sample routes; on the
        per-sample route buffers a forward rewrites and samples that interact
        in the forward.
    VerificationError
        Pass 2 saw other components than pass 1 (strict or not); with
        ``strict=True`` also any failed check that would otherwise fall back or warn.
    NonFiniteError
        A NaN or infinite loss or gradient (nothing is returned).

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
    etas = check_etas(etas)
    check_dropout_policy(dropout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    model = _dist.unwrap(model)  # DistributedDataParallel: its module; FSDP refused
    _check_counts(spot_checks, memory_budget)
    _check_components(components)
    # per-sample-kept is the per-sample route keeping its factors: every check of it applies
    keep_factors: bool | str = False
    if route == "per-sample-kept":
        route, keep_factors = "per-sample", "required"
    form = check_loss_fn(loss_fn, components, route, batch_sizes)  # fits route and batches
    params = trainable_params(model, params)
    flat = Flat(model, params)
    precond = as_preconditioner(preconditioner, params, flat.names)
    sizes_dyadic = _dyadic_sizes(int(components.batch_size), batch_sizes, levels)
    ranks = _dist.ranks(distributed)
    if ranks is not None:  # every rank must measure the same thing
        arguments = {
            "etas": etas, "route": route, "dropout": dropout, "seed": seed,
            "memory_budget": memory_budget, "batch_sizes": batch_sizes, "levels": levels,
            "strict": strict, "spot_checks": spot_checks, "keep_full_grad": keep_full_grad,
        }  # fmt: skip
        prints = _fingerprints(model, loss_fn, components, params, arguments)
        prints["preconditioner"] = None if precond is None else _dist.digest(precond.inverse)
        ranks.check_same(prints)
    if route == "auto":
        route, keep_factors = _auto_route(
            components, batch_sizes, sizes_dyadic, flat, ranks, memory_budget
        )
    _check_route(route, model, components, batch_sizes, sizes_dyadic, flat, ranks, memory_budget)
    info = _provenance(dropout, seed, components, flat, ranks)
    # f_i must be a function of x: a forward drawing random numbers the dropout
    # policy does not control would make every statistic a sample of noise.
    # The per-sample route's components are samples: its first REPEAT_ROWS, not a chunk.
    rows = REPEAT_ROWS if route == "per-sample" else None
    device = flat.params[0].device
    hold = BufferHold(model)  # every route evaluates its components from these buffers
    check_repeatable(
        model, loss_fn, components, form=form, dropout=dropout, seed=seed, device=device,
        rows=rows, hold=hold,
    )  # fmt: skip
    check_buffers_held(route, hold.written)  # the per-sample route cannot hold them
    info["buffers_held"] = list(hold.written)
    # torch.autograd.grad must be able to differentiate the model (no reentrant checkpoint)
    check_grad_compatible(
        model, loss_fn, components, form=form, dropout=dropout, seed=seed, device=device,
        rows=rows,
    )  # fmt: skip
    if route == "per-sample":
        # a sample's component is its own (weighted) mean loss, in a forward of its own
        loss_fn = mean_loss(loss_fn)
        info["independent_samples"] = _check_independent_samples(
            model, loss_fn, components, device, tolerance(flat.dtype), seed
        )
    # dyadic: whole top-level parents per rank, so that no parent straddles two ranks
    m = len(components)
    shard = _dist.Shard(m, ranks, align=1 << (len(sizes_dyadic) - 1) if route == "dyadic" else 1)
    progress = progress and _dist.is_writer()
    with model_guard(model), torch.enable_grad(), shard.together():
        if route == "per-sample":
            result, route, verification = _run_per_sample(
                model, loss_fn, components, flat, etas, dropout, seed, progress, strict,
                spot_checks, shard, keep_factors, memory_budget, info, precond,
            )  # fmt: skip
        else:
            levels_ = len(sizes_dyadic) if route == "dyadic" else 1
            result, verification = _run_dense(
                route, model, loss_fn, components, flat, etas, dropout, seed, progress, levels_,
                shard, strict, precond,
            )  # fmt: skip
    return package(result, route, info, flat, keep_full_grad, verification, strict, precond)


def _run_per_sample(
    model, loss_fn, components, flat, etas, dropout, seed, progress, strict, spot_checks, shard,
    keep_factors, memory_budget, info, precond,
):  # fmt: skip
    """Run the per-sample route: ``(result, the route that ran, verification)``.

    The route's name says what ran: ``"per-sample-kept"`` when the factors were
    kept, ``"+fallback"`` when a parameter or the dots came from the fallback.
    """
    # imported here: `import clipscope.engine` does not load the per-sample machinery
    from clipscope.engine.per_sample_route import run_per_sample

    result, verification = run_per_sample(
        model, loss_fn, components, flat, etas, dropout, seed, progress, strict, spot_checks,
        shard, keep_factors=keep_factors, memory_budget=memory_budget, precond=precond,
    )  # fmt: skip
    info["factors"] = verification.pop("factors")
    route = "per-sample-kept" if info["factors"]["kept"] else "per-sample"
    if verification["fallback"] or verification["dots_fallback"]:
        route += "+fallback"
    return result, route, verification


def _run_dense(
    route, model, loss_fn, components, flat, etas, dropout, seed, progress, n_levels, shard,
    strict, precond,
):  # fmt: skip
    """Run the keep, two-pass or dyadic route: ``(results per level, verification)``.

    The dyadic route's verification holds its merge check (``"merge"``).
    """
    args = (model, loss_fn, components, flat, etas, dropout, seed, progress)
    if route == "keep":
        return keep_pass(*args, shard, precond), {}
    if route == "dyadic":
        return dyadic(*args, n_levels, shard, strict, precond)
    return sweep(*args, n_levels, shard, precond), {}


def _check_independent_samples(model, loss_fn, components, device, tol, seed):
    """Check the per-sample route's premise on the first REPEAT_ROWS samples of the first chunk."""
    # imported here: `import clipscope.engine` does not load the per-sample machinery
    from clipscope.engine.per_sample.batch import check_independent_samples

    x, y = components.batch(0, device)
    return check_independent_samples(
        model, loss_fn, x[:REPEAT_ROWS], y[:REPEAT_ROWS], tol, seed=seed
    )


def _provenance(dropout, seed, components, flat, ranks) -> dict[str, Any]:
    """``result.info``: the route's inputs, the partition, the parameters, the processes."""
    return {
        "dropout": dropout,
        "seed": seed,
        "components": components.describe(),
        "n_params": flat.n,
        "dtype": str(flat.dtype).replace("torch.", ""),
        "n_samples": int(sum(components.sizes)),
        "processes": 1 if ranks is None else ranks.world,
    }


def _check_counts(spot_checks: Any, memory_budget: Any) -> None:
    if isinstance(spot_checks, bool) or not isinstance(spot_checks, int) or spot_checks < 0:
        raise ValueError(f"spot_checks must be an int >= 0, got {spot_checks!r}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be a non-negative int (bytes), got {memory_budget!r}")


def _wants_single(batch_sizes: Sequence[int] | None, base_b: int) -> bool:
    """Whether ``batch_sizes=[1]`` asks for per-sample components of larger components."""
    return batch_sizes is not None and list(batch_sizes) == [1] and base_b != 1


def _auto_route(components, batch_sizes, sizes_dyadic, flat, ranks, memory_budget):
    """``route="auto"``: ``(route, keep_factors)`` (module docstring)."""
    if _wants_single(batch_sizes, int(components.batch_size)):
        return "per-sample", "auto"
    if len(sizes_dyadic) > 1:
        return "dyadic", False
    stored = _dist.Shard(len(components), ranks).largest * flat.n * flat.dtype.itemsize
    return ("keep" if stored <= memory_budget else "two-pass"), False


def _check_route(route, model, components, batch_sizes, sizes_dyadic, flat, ranks, memory_budget):
    """Refuse a route that cannot give the asked-for answer, before anything runs."""
    m = len(components)
    if _wants_single(batch_sizes, int(components.batch_size)) and route != "per-sample":
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
        _check_independent(route, model, components)
    if route == "dyadic" and not hasattr(components, "with_batch_size"):
        raise ValueError(
            "route='dyadic' checks a parent batch against its children, so its components "
            "must regroup at a larger batch size (clipscope.Components.with_batch_size); got "
            f"{type(components).__name__}"
        )
    if route == "dyadic" and getattr(components, "drop_last", False):
        empty = [b for k, b in enumerate(sizes_dyadic) if m >> k == 0]
        if empty:
            raise ValueError(
                f"batch size(s) {empty} leave no full batch of the {sum(components.sizes)} "
                "kept samples with drop_last=True"
            )


#: Why sequential components have no independent samples, and how a stateless model is
#: probed per sample: the refusals of the per-sample route, the dyadic merge, fit and the
#: Monitor with ``per_sample=True`` say it in these words.
SEQUENTIAL_NOT_SAMPLES = (
    "sequential (language-model) components are windows of a token stream read in order, "
    "through which a recurrent model carries its state. A model that keeps no state "
    "(clipscope's model='gpt') is probed per sample from Python: its batch-first core "
    "(model.transformer) on windows as samples, Components.from_tensors(windows, targets) "
    "(docs/training.md)"
)


def _check_independent(route: str, model: nn.Module, components: Any) -> None:
    """Routes that merge or split components need independent samples."""
    if getattr(components, "sequential", False):
        raise ValueError(
            f"route={route!r} needs independent samples and cannot merge or split "
            f"components; {SEQUENTIAL_NOT_SAMPLES}"
        )
    coupled = batch_coupled_modules(model)
    if coupled:
        raise ValueError(
            f"route={route!r} would change the answer: module(s) {coupled} normalize with "
            "batch statistics (train-mode BatchNorm couples the samples of a batch); "
            "use route='two-pass' or 'keep', or put BatchNorm in eval mode"
        )


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
            f"batch_sizes must be [1] (per-sample components: the per-sample route) or the "
            f"components' batch size {b} times powers of two, [b, 2b, 4b, …] ({expected} "
            f"for {len(sizes)} sizes), got {list(batch_sizes)}"
        )
    return expected


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
    preconditioner: Any = None,
) -> ProbeResult:
    """Brute force: every ``g_i`` by its own autograd call, kept in float64, explicit sums.

    ``∇f = (1/m) Σ_i g_i``; ``d_i = Σ_j g_ij ∇f_j``; ``Σ_i min{1, η/n_i} g_i`` summed
    explicitly. With ``preconditioner`` (as for :func:`probe`): ``u_j = ∇f_j / P_j``
    coordinate by coordinate, ``d^P_i = Σ_j g_ij u_j``, the clipped sums' cosines
    with u and of ``P⁻¹Σ_i C(g_i; η)`` with ∇f by their definitions. Memory
    O(m·n): for tests and small problems only.
    """
    etas = check_etas(etas)
    params = trainable_params(model, params)
    flat = Flat(model, params)
    precond = as_preconditioner(preconditioner, params, flat.names)
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
    clipped, sums = {}, {}
    for eta in etas:
        total = torch.zeros_like(full)
        for i in range(len(rows)):
            n = float(norms[i])
            total += (eta / n if n > eta else 1.0) * G[i]
        clipped[eta] = norm_and_cos(total, full)
        sums[eta] = total
    info = {"dropout": dropout, "seed": seed, "n_samples": int(sum(components.sizes))}
    preconditioned = None
    if precond is not None:
        p_diag = 1.0 / precond.inverse.to(full.device)  # inf where the step does not move x
        u = torch.where(torch.isinf(p_diag), torch.zeros_like(full), full / p_diag)
        cos_p = {}
        for eta, total in sums.items():
            step = total / p_diag
            cos_p[eta] = (
                _cos(total, u),
                _cos(step, full),
            )
        preconditioned = PreconditionedResult(
            norms=norms.cpu().numpy(),
            dots=(G * u).sum(1).cpu().numpy(),
            direction_norm=float(torch.sqrt((u * u).sum())),
            inner=float((full * u).sum()),
            clipped=cos_p,
            info=dict(precond.info),
            direction=[t.clone() for t in flat.unflatten(u)],
            inverse=[t.clone() for t in flat.unflatten(1.0 / p_diag)],
        )
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
        preconditioned=preconditioned,
    )


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """``cos∠(a, b)`` by its definition (NaN when either is 0)."""
    na, nb = float(torch.sqrt((a * a).sum())), float(torch.sqrt((b * b).sum()))
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else math.nan
