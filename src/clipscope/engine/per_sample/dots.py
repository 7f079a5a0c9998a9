r"""Pass 2 of the per-sample route: ``⟨∇ℓ_j, v⟩`` for every sample, two ways.

``"jvp"`` (forward mode). With ``L(θ) = (ℓ_1(θ), …, ℓ_B(θ))`` the per-sample
loss vector of one batch forward, ``J_L(θ) v = (⟨∇ℓ_1, v⟩, …, ⟨∇ℓ_B, v⟩)``:
one ``torch.func.jvp`` of ``functional_call(model, θ)`` along v gives all B
dots at about the cost of two forwards.

``"ghost"`` (reverse mode, a ghost product). One hooked forward and one
backward w.r.t. the layer outputs only (no parameter gradient is formed), then
each layer's dots from its recorded calls, ``Σ_t b_t·(V a_t)`` for a Linear and
the nn.LSTM gate gradients, ``⟨b_j, conv(a_j; V)⟩`` for a convolution
(:meth:`~clipscope.engine.per_sample.family.LayerFamily.dots`). Forward-mode
AD through CPU ``nn.LSTM`` runs without oneDNN and measured 1.6–2.2 E on the
bench's LSTM LM; the ghost product needs neither and is the default for models
with recurrent modules (``method="auto"``), the JVP for the others. Unlike the
JVP it trusts the layer rules, so it runs only with a plan whose rules pass 1
checked structurally (the probe's), and the spot check compares its dots with
the spot samples' own backward.

Where a gradient is **not** the derivative, the JVP is adjusted or bypassed:
torch's backward gives an Embedding's ``padding_idx`` row gradient 0 (that
row of v is zeroed), and ``scale_grad_by_freq`` rescales by batch counts (those
parameters' dots come from batch-1 backward passes). Where forward-mode AD is
unavailable (an op without a forward-AD rule), or the spot check found the
JVP wrong, every dot comes from exact per-sample gradients
(:mod:`~clipscope.engine.per_sample.fallback`), visibly.

**Precision.** float16/bfloat16 models run the JVP on a float64 copy of the
parameters, buffers and floating inputs, so a dot never overflows where
float64 would not (an fp16 model with ``|g_j| = 800`` and ``|∇f| = 500`` has
dots of 4e5 > 65504); a float32 JVP whose dots overflow is redone the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

from clipscope.engine.per_sample._common import rng_replay, rng_snapshot
from clipscope.engine.per_sample.batch import (
    check_inputs,
    kernels_for_derivatives,
    per_sample_from_output,
    randomness_active,
)
from clipscope.engine.per_sample.fallback import choose_mode, fallback_stats
from clipscope.engine.per_sample.family import Unsupported
from clipscope.engine.per_sample.plan import Plan
from clipscope.engine.verify import losses_differ
from clipscope.errors import NonFiniteError

__all__ = ["DOT_METHODS", "dot_method", "per_sample_dots", "split_vector"]

DOT_METHODS = ("auto", "jvp", "ghost")


def dot_method(model: nn.Module, method: str = "auto", plan: Plan | None = None) -> str:
    """Resolve ``"auto"``: ``"ghost"`` for a model with recurrent modules, else ``"jvp"``.

    The ghost product trusts the layer rules, so it needs a ``plan`` whose rules
    pass 1 (:func:`~clipscope.engine.per_sample.ghost_pass`) has checked
    structurally: without one ``"auto"`` means ``"jvp"`` (forward mode differentiates
    the model itself and needs no rule), and ``"ghost"`` raises ``ValueError``.
    """
    if method not in DOT_METHODS:
        raise ValueError(f"method must be one of {DOT_METHODS}, got {method!r}")
    checked = plan is not None and (
        plan.unchecked or plan.structural_checks > 0 or not plan.ghost_modules()
    )
    if method == "ghost" and not checked:
        raise ValueError(
            "method='ghost' takes the dots from the layer rules, which only a plan checked "
            "by ghost_pass (its structural check) vouches for: pass that plan, or use 'jvp'"
        )
    if method != "auto":
        return method
    recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
    return "ghost" if recurrent and checked else "jvp"


def split_vector(vector: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One float64 tensor per parameter from a flat vector or a per-parameter list."""
    if isinstance(vector, torch.Tensor):
        n = sum(p.numel() for p in params)
        if vector.dim() != 1 or vector.numel() != n:
            raise ValueError(
                f"vector must be flat with {n} entries (the params concatenated), got "
                f"shape {tuple(vector.shape)}"
            )
        parts = list(torch.split(vector, [p.numel() for p in params]))
        parts = [v.reshape(p.shape) for v, p in zip(parts, params, strict=True)]
    else:
        parts = list(vector)
        if len(parts) != len(params) or any(
            not isinstance(v, torch.Tensor) or v.shape != p.shape
            for v, p in zip(parts, params, strict=True)
        ):
            raise ValueError(
                "vector must be a flat tensor or one tensor per parameter with the "
                "parameter's shape"
            )
    return [
        v.detach().to(dtype=torch.float64, device=p.device)
        for v, p in zip(parts, params, strict=True)
    ]


def per_sample_dots(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    vector: torch.Tensor | Sequence[torch.Tensor],
    params: Sequence[torch.Tensor] | None = None,
    *,
    plan: Plan | None = None,
    expect_losses: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """``⟨∇ℓ_j, v⟩`` for every sample j, float64 ``(B,)``: one JVP or one ghost product.

    ``vector`` is a flat tensor (the ``params`` concatenated in order) or one
    tensor per parameter. ``method`` (``"auto"``, ``"jvp"``, ``"ghost"``): see
    the module docstring and :func:`dot_method`; the ghost product covers the
    parameters a rule serves (and needs a ``plan`` that pass 1 checked), the
    others come from their per-sample gradients. ``plan``
    (default: a new one over ``params``) says which parameters' dots must come
    from per-sample gradients instead.
    ``expect_losses`` (the per-sample losses of pass 1) are compared with the
    losses of the forward-mode pass, which it computes anyway: if they differ
    (the same RNG drew other dropout masks -- torch draws a non-contiguous
    tensor's mask in another order under forward-mode AD), the dots come from
    per-sample gradients through the batch forward instead.

    >>> import torch.nn.functional as F
    >>> m = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> v = torch.randn(8)
    >>> d = per_sample_dots(m, F.cross_entropy, x, y, v)
    >>> g2 = torch.autograd.grad(F.cross_entropy(m(x[2:3]), y[2:3]), list(m.parameters()))
    >>> bool(torch.isclose(d[2], torch.cat([g.flatten() for g in g2]).double() @ v.double()))
    True
    """
    batch = check_inputs(model, loss_fn, x)
    if method not in DOT_METHODS:
        raise ValueError(f"method must be one of {DOT_METHODS}, got {method!r}")
    if plan is None:
        plan = Plan(model, params)
    params = plan.params
    tangents = split_vector(vector, params)
    randomness = randomness_active(model)
    # under active dropout every forward here must start from the caller's RNG state
    # (the chunk's), so that a fallback after the JVP sees the same masks
    snapshot = rng_snapshot(x.device) if randomness else None
    n = len(params)
    method = dot_method(model, method, plan)
    forward = [] if plan.dots_fallback else [k for k in range(n) if k not in plan.batch1]
    if method == "ghost":  # the rules' parameters; the others from per-sample gradients
        forward = [k for k in forward if k not in plan.fallback]
    dots = torch.zeros(batch, dtype=torch.float64, device=x.device)
    if forward:
        try:
            with rng_replay(snapshot) if snapshot is not None else contextlib.nullcontext():
                if method == "ghost":
                    losses, jvp_dots = _ghost_dots(model, loss_fn, x, y, plan, tangents, batch)
                else:
                    losses, jvp_dots = _jvp_dots(
                        model, loss_fn, x, y, plan, forward, tangents, batch
                    )
        except (NotImplementedError, RuntimeError, Unsupported) as exc:
            what = "forward-mode AD" if method == "jvp" else "the ghost product"
            plan.demote_dots(method, f"{what} failed ({_first_line(exc)})")
            forward = []
        else:
            differ = losses_differ(losses, expect_losses, plan.params[0].dtype)
            if differ is None:
                dots += jvp_dots
            else:
                plan.demote_dots(
                    "spot-dot",
                    f"the forward-mode pass does not reproduce pass 1's losses ({differ}): "
                    "dropout masks drawn differently",
                )
                forward = []
    reverse = [k for k in range(n) if k not in forward]
    groups = [
        ([k for k in reverse if k in plan.batch1], "loop"),
        ([k for k in reverse if k not in plan.batch1], choose_mode(model, randomness)),
    ]
    for ks, mode in groups:
        if ks:
            if mode == "vmap" and plan.vmap_failed:
                mode = "loop"
            with rng_replay(snapshot) if snapshot is not None else contextlib.nullcontext():
                fs = fallback_stats(
                    model,
                    loss_fn,
                    x,
                    y,
                    [params[k] for k in ks],
                    mode,
                    vector=[tangents[k] for k in ks],
                )
            dots += fs.dots
    return dots


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _ghost_dots(model, loss_fn, x, y, plan, tangents, batch):
    """Reverse-mode ghost product: the served layers' dots from one hooked forward and backward."""
    from clipscope.engine.per_sample.ghost import recorded_products

    reduced = plan.params[0].dtype not in (torch.float32, torch.float64)
    scale = 1.0
    for _ in range(2):  # float16/bfloat16: a batch backward that overflows, seeded smaller
        calls, losses, parts, problems = recorded_products(model, loss_fn, x, y, plan, scale)
        if problems:  # (pass 1 served every use it saw; this chunk makes another)
            k, why = min(problems.items())
            raise Unsupported(f"{plan.names[k]}: {why}")
        dots = torch.zeros(batch, dtype=torch.float64, device=x.device)
        for mname, mod, fam, attrs in plan.ghost_modules():
            problem = next((c.problem for c in calls[id(mod)] if c.problem), None)
            if problem is not None:
                raise Unsupported(f"{mname or type(mod).__name__}: {problem}")
            vectors = {a: tangents[plan.index[id(mod.get_parameter(a))]] for a in attrs}
            dots += fam.dots(mod, calls[id(mod)], attrs, vectors, batch).to(dots.device)
        for k, kept in parts.items():  # the uses outside module rules add up (dots are linear)
            if k not in plan.fallback:
                for f, name in kept:
                    dots += f.dots({name: tangents[k]}).to(dots.device)
        dots = dots / scale
        if bool(torch.isfinite(dots).all()) or not reduced or scale != 1.0:
            break
        scale = 2.0 ** -math.ceil(math.log2(max(2, batch)))
    if not bool(torch.isfinite(dots).all()):
        raise NonFiniteError(
            f"per-sample dots of samples {torch.nonzero(~torch.isfinite(dots)).flatten().tolist()}"
            " are not finite; nothing was changed"
        )
    return losses, dots


def _jvp_dots(model, loss_fn, x, y, plan, ks, tangents, batch) -> torch.Tensor:
    params = [plan.params[k] for k in ks]
    tans = [tangents[k] for k in ks]
    # reverse mode defines the padding row's gradient as 0; forward mode sees the lookup
    position = {id(p): i for i, p in enumerate(params)}
    for mod in model.modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.padding_idx is not None:
            i = position.get(id(mod.weight))
            if i is not None:
                tans[i] = tans[i].clone()
                tans[i][mod.padding_idx] = 0
    low = any(p.dtype not in (torch.float32, torch.float64) for p in params)
    losses, dots = _jvp(model, loss_fn, x, y, plan, ks, params, tans, batch, upcast=low)
    if not bool(torch.isfinite(dots).all()) and not low:
        losses, dots = _jvp(model, loss_fn, x, y, plan, ks, params, tans, batch, upcast=True)
    if not bool(torch.isfinite(dots).all()):
        raise NonFiniteError(
            f"per-sample dots of samples {torch.nonzero(~torch.isfinite(dots)).flatten().tolist()}"
            " are not finite even in float64; nothing was changed"
        )
    return losses, dots


def _jvp(model, loss_fn, x, y, plan, ks, params, tans, batch, *, upcast: bool) -> torch.Tensor:
    names = [plan.names[k] for k in ks]
    if upcast:
        primals = tuple(p.detach().double() for p in params)
        tans = tuple(t.double() for t in tans)
        buffers = {
            n: b.double()
            for n, b in model.named_buffers()
            if b is not None and b.is_floating_point()
        }
        # the other parameters too: one dtype through the whole forward
        others = {
            n: p.detach().double()
            for n, p in model.named_parameters()
            if n not in names and p.is_floating_point()
        }
        x = x.double() if x.is_floating_point() else x
        y = y.double() if isinstance(y, torch.Tensor) and y.is_floating_point() else y
    else:
        primals = tuple(p.detach() for p in params)
        tans = tuple(t.to(p.dtype) for t, p in zip(tans, params, strict=True))
        buffers, others = {}, {}

    def losses_of(*ps: torch.Tensor) -> torch.Tensor:
        state = {**others, **buffers, **dict(zip(names, ps, strict=True))}
        return per_sample_from_output(loss_fn, functional_call(model, state, (x,)), y, batch)

    with kernels_for_derivatives(model):
        losses, dots = jvp(losses_of, primals, tans)
    return losses.detach(), dots.detach().double()
