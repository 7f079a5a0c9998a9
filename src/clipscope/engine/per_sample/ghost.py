"""Pass 1 of the per-sample route: one hooked forward and one backward per batch.

:func:`ghost_pass` runs the batch forward with hooks on the modules the plan
gives a rule, computes the per-sample losses ``ℓ_j``, and runs **one**
backward of ``Σ_j ℓ_j`` w.r.t. every parameter. The hooks keep each call's
output gradient ``b = ∂(Σ_k ℓ_k)/∂output`` (the sum, not the mean: sample j's
output depends on sample j only, so ``b_j = ∂ℓ_j/∂output_j``). Then:

1. each rule turns its recorded calls into per-sample ``‖g_j(p)‖²``;
2. the **structural check** compares, per parameter, the batch gradient the
   rule accounts for with the parameter's actual batch gradient from that same
   backward (:mod:`clipscope.engine.verify`); a parameter that fails, or whose
   rule refused a call, moves to the exact fallback from here on;
3. the fallback gives the per-sample norms of the remaining parameters;
4. ``∇ Σ_j ℓ_j`` is the backward's actual gradient for the parameters a rule
   served (so ∇f never depends on a rule being right) and the sum of the
   fallback's per-sample gradients for the others.

The hooks are :class:`~clipscope.engine.per_sample.recorder.ModuleRecorder`'s;
the steps are :func:`_batch_norms` (the backward's norms, overflow), ``_Rules``
(steps 1-2, one module at a time) and :func:`_fallback` (step 3).
Norms of disjoint parameter sets add up. Under float16/bfloat16 a batch
gradient that overflows is recomputed with the backward seeded by ``2^-⌈log2 B⌉``
(the per-sample quantities are unscaled exactly, in float64).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from clipscope.engine.per_sample._common import dense_grad
from clipscope.engine.per_sample.batch import (
    check_inputs,
    per_sample_from_output,
    randomness_active,
)
from clipscope.engine.per_sample.factors import Rows, Zero
from clipscope.engine.per_sample.fallback import choose_mode, fallback_stats
from clipscope.engine.per_sample.family import Call, LayerFamily, ParamGhost, Unsupported
from clipscope.engine.per_sample.kept import KeptChunk
from clipscope.engine.per_sample.plan import Plan
from clipscope.engine.per_sample.recorder import ModuleRecorder
from clipscope.engine.per_sample.summed import Summed
from clipscope.engine.per_sample.uses import UseRecorder
from clipscope.engine.verify import losses_differ, structural_error, tolerance
from clipscope.errors import NonFiniteError

__all__ = ["GhostPass", "ghost_pass", "per_sample_sq_norms", "record_calls", "recorded_products"]


class GhostPass(NamedTuple):
    """What one hooked forward + backward of the summed loss gives.

    Attributes
    ----------
    sq_norms : torch.Tensor
        ``(B,)`` float64, ``‖∇ℓ_j‖²`` over the plan's parameters.
    losses : torch.Tensor
        ``(B,)`` detached per-sample losses ``ℓ_j`` (the model's dtype).
    grad_sum : list of torch.Tensor
        ``∇ Σ_j ℓ_j`` for each parameter, float64 (divide by B for the batch's
        mean-loss gradient); None for a parameter whose batch gradient was given
        (``ghost_pass(actual=...)``).
    per_param : dict
        ``{parameter index: (B,) float64 ‖g_j(p)‖²}`` (the spot check's input).
    kept : KeptChunk or None
        With ``keep=True``: every parameter's per-sample gradients in the kept
        form its norms came from (:mod:`~clipscope.engine.per_sample.kept`).
    mismatch : str or None
        With ``expect_losses``: why the losses differ from those (then nothing
        else was computed: ``sq_norms`` are zeros, ``per_param`` is empty).
    """

    sq_norms: torch.Tensor
    losses: torch.Tensor
    grad_sum: list[torch.Tensor | None]
    per_param: dict[int, torch.Tensor]
    kept: KeptChunk | None = None
    mismatch: str | None = None


def _finite(t: torch.Tensor) -> bool:
    if t.layout != torch.strided:
        t = t.coalesce().values() if t.is_sparse else t.values()
    return bool(torch.isfinite(t).all())


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    dense = [t for t in tensors if t.layout == torch.strided]
    ok = bool(torch.stack([torch.isfinite(t).all() for t in dense]).all()) if dense else True
    return ok and all(_finite(t) for t in tensors if t.layout != torch.strided)


def _norm(t: torch.Tensor) -> float:
    if t.layout != torch.strided:
        t = t.coalesce().values() if t.is_sparse else t.values()
    # a float64 copy: torch's reduction with dtype=float64 is several times slower on CPU
    return float(torch.linalg.vector_norm(t.double()))


def ghost_pass(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor] | None = None,
    *,
    plan: Plan | None = None,
    keep: bool = False,
    actual: Sequence[tuple[float, torch.Tensor]] | None = None,
    expect_losses: torch.Tensor | None = None,
    keep_limit: int | None = None,
) -> GhostPass:
    """One hooked forward + backward: per-sample ``‖∇ℓ_j‖²``, losses ``ℓ_j`` and ``∇Σ_j ℓ_j``.

    Every rule's answer is checked structurally against the actual batch
    gradient; parameters without a rule, or whose rule fails, get their norms
    from the exact fallback, each with a
    :class:`~clipscope.engine.verify.PerSampleFallbackWarning`. ``plan`` carries
    those decisions across the batches of one probe (default: a new
    :class:`~clipscope.engine.per_sample.plan.Plan` over ``params``, every
    trainable parameter by default). Leaves the model's parameters, ``.grad``,
    buffers and flags unchanged (the backward uses ``torch.autograd.grad``).

    With ``keep=True`` the norms come from each rule's kept form
    (:meth:`LayerFamily.factors`) and the fallback's per-sample gradients are
    kept too: ``result.kept`` then gives every dot and weighted sum of the
    chunk's per-sample gradients without another pass.

    ``actual``: the batch gradient ``∇Σ_j ℓ_j`` of this very batch, known from
    an earlier pass (the same masks), as ``(‖G_p‖, plan.directions[p]`` applied
    to ``G_p)`` per parameter, float64 (:meth:`Directions.of_tensor`). The
    backward then runs w.r.t. the layer outputs only (autograd forms no
    parameter gradient), the structural check compares each rule's account
    with these, and ``result.grad_sum`` is None for every parameter. float32
    and float64 models only (``ValueError`` otherwise: a float16 batch sum may
    overflow where the samples do not, and then needs the scaled backward).
    ``keep_limit`` (with ``keep=True``): when the fallback's per-sample gradients
    would hold more than this many elements, nothing is kept (``result.kept``
    None; the fallback then runs in bounded pieces, as without ``keep``).
    ``expect_losses``: that pass's per-sample losses. If this forward's differ
    (other random numbers), nothing is checked or computed and
    ``result.mismatch`` says why: a structural check against another pass's
    gradient would blame the rules for it.
    """
    batch = check_inputs(model, loss_fn, x)
    if plan is None:
        plan = Plan(model, params)
    elif params is not None and [id(p) for p in params] != [id(p) for p in plan.params]:
        raise ValueError("params must be the plan's parameters (or None)")
    randomness = randomness_active(model)
    if randomness and plan.batch1:
        names = ", ".join(plan.names[k] for k in sorted(plan.batch1))
        raise ValueError(
            f"{names}: a gradient torch defines per batch (scale_grad_by_freq) cannot be split "
            "per sample while dropout draws masks for the batch (dropout='fixed' in train mode); "
            "use dropout='off' or mini-batch components"
        )
    if actual is not None:
        if plan.params[0].dtype not in (torch.float32, torch.float64):
            raise ValueError("actual= needs a float32 or float64 model")
        if len(actual) != len(plan.params):
            raise ValueError(
                f"actual needs one (norm, projections) per parameter, {len(plan.params)}"
            )
    result = _ghost_once(
        model, loss_fn, x, y, plan, batch, randomness, 1.0, keep, actual, expect_losses,
        keep_limit,
    )  # fmt: skip
    if result is None:  # float16/bfloat16: the batch sum overflowed, the samples did not
        scale = 2.0 ** -math.ceil(math.log2(max(2, batch)))
        result = _ghost_once(model, loss_fn, x, y, plan, batch, randomness, scale, keep)
    return result


class _Recorded(NamedTuple):
    """One hooked forward and its backward: module calls, losses, gradients, the uses."""

    calls: dict[int, list[Call]]
    losses: torch.Tensor
    grads: list
    uses: UseRecorder | None


def _forward_backward(model, loss_fn, x, y, plan, active, batch, scale, retain, outputs_only=False):
    """Run the hooked batch forward and the one backward of ``scale·Σ_j ℓ_j``.

    Two recorders watch the forward: the module rules' (:class:`ModuleRecorder`)
    and, for every parameter not on the fallback, the use recorder
    (:class:`~clipscope.engine.per_sample.uses.UseRecorder`: the parameters'
    uses outside the calls their module rules serve).
    ``outputs_only``: the backward runs w.r.t. the recorded outputs only (their
    gradients are all a product of the factors needs); no parameter gradient.
    """
    tracked = plan.tracked()
    rec = ModuleRecorder(active, batch, index=plan.index if tracked else None)
    uses = None
    if tracked:
        uses = UseRecorder(plan.params, batch, owned=rec.owned, wanted=tracked)
        rec.is_data = uses.is_data
        uses.mark_data(x)
    try:
        with torch.enable_grad():
            with uses if uses is not None else contextlib.nullcontext():
                out = model(x)
            losses = per_sample_from_output(loss_fn, out, y, batch)
    finally:
        outputs = rec.remove() + (uses.outputs if uses is not None else [])
        # the two recorders point at each other (is_data, owned) during the forward only:
        # unlinked, the chunk's recorded calls are freed with the last reference to them,
        # not at the garbage collector's next run
        rec.is_data = None
    if not bool(torch.isfinite(losses).all()):
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        raise NonFiniteError(
            f"per-sample losses of samples {bad} are not finite; nothing was changed"
        )
    # a use's parameter-derived operand computed by anything but a closed form is carried
    # back through its own graph after this backward (uses.chain_back): keep the graph
    retain = retain or (uses is not None and uses.needs_graph)
    seed = torch.full_like(losses, scale)
    if (plan.unchecked or outputs_only) and all(t._version == v for t, v in outputs):
        # w.r.t. the layer outputs (the hooks get every b) and, for the benchmarks'
        # unchecked pass 1, the fallback's parameters: autograd never forms the served
        # layers' weight gradients
        rest = [] if outputs_only else [k for k in range(len(plan.params)) if k in plan.fallback]
        inputs = [t for t, _ in outputs] + [plan.params[k] for k in rest]
        found: tuple = ()
        if inputs:  # (none when no module is served: then nothing to differentiate here)
            with torch.enable_grad():
                found = torch.autograd.grad(
                    losses, inputs, grad_outputs=seed, allow_unused=True, retain_graph=retain
                )
        grads = [None] * len(plan.params)
        for k, g in zip(rest, found[len(outputs) :], strict=True):
            grads[k] = g
        return _Recorded(rec.calls, losses, grads, uses)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            losses, plan.params, grad_outputs=seed, allow_unused=True, retain_graph=retain
        )
    return _Recorded(rec.calls, losses, list(grads), uses)


def record_calls(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    plan: Plan | None = None,
) -> dict[str, tuple[nn.Module, LayerFamily, list[str], list[Call]]]:
    """One hooked forward and backward of ``Σ_j ℓ_j``; every served module's recorded calls.

    ``{module name: (module, family, parameter attributes, calls)}``, each call
    with its output gradients filled in: exactly what the rules of pass 1 see,
    and what a route that keeps factors between passes would keep. Nothing is
    checked here (:func:`ghost_pass` checks).
    """
    batch = check_inputs(model, loss_fn, x)
    plan = Plan(model) if plan is None else plan
    active = plan.ghost_modules()
    calls = _forward_backward(model, loss_fn, x, y, plan, active, batch, 1.0, False).calls
    return {mname: (mod, fam, attrs, calls[id(mod)]) for mname, mod, fam, attrs in active}


def recorded_products(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    plan: Plan,
    scale: float = 1.0,
) -> tuple[dict[int, list[Call]], torch.Tensor, dict, dict]:
    """One hooked forward and a backward of ``scale·Σ_j ℓ_j`` w.r.t. the recorded outputs only.

    ``({id(module): calls}, losses, use parts, use problems)`` for the modules a
    rule still serves and the uses of the parameters outside them
    (:meth:`UseRecorder.parts`): the reverse-mode pass of the per-sample dots
    (each layer's ``⟨g_j, v⟩`` follows from its calls, :meth:`LayerFamily.dots`,
    each use's from its kept form), cheaper than a full backward by the
    parameters' gradients.
    """
    batch = check_inputs(model, loss_fn, x)
    active = plan.ghost_modules()
    rec = _forward_backward(
        model, loss_fn, x, y, plan, active, batch, scale, False, outputs_only=True
    )
    parts, problems = rec.uses.parts() if rec.uses is not None else ({}, {})
    return rec.calls, rec.losses.detach(), parts, problems


def _ghost_once(
    model,
    loss_fn,
    x,
    y,
    plan,
    batch,
    randomness,
    scale,
    keep,
    actual=None,
    expect=None,
    keep_limit=None,
) -> GhostPass | None:
    """One hooked forward and backward of ``scale·Σ_j ℓ_j``, then steps 1-4 of the module docstring.

    None when the float16/bfloat16 batch gradient overflowed at ``scale = 1``
    (:func:`ghost_pass` runs it again with a smaller seed).
    """
    params = plan.params
    active = plan.ghost_modules()
    calls, losses, grads, uses = _forward_backward(
        model, loss_fn, x, y, plan, active, batch, scale, randomness,
        outputs_only=actual is not None,
    )  # fmt: skip
    differ = losses_differ(losses.detach(), expect, params[0].dtype)
    if differ is not None:
        zero = torch.zeros(batch, dtype=torch.float64, device=x.device)
        return GhostPass(zero, losses.detach(), [None] * len(params), {}, None, differ)
    norms = _batch_norms(plan, grads, actual, batch, scale)
    if norms is None:
        return None
    rules = _Rules(plan, batch, scale, keep, actual, grads, norms)
    parts = rules.uses(uses, active)
    for mname, mod, fam, attrs in active:  # 1-2: each rule's answer, checked
        rules.serve(mname, mod, fam, attrs, calls[id(mod)])
    rules.serve_sums(parts)  # the parameters with several uses, or served by their uses
    grad_sum = rules.grad_sums()  # 4: the actual backward's, for the parameters served
    rest = [k for k in range(len(params)) if k not in rules.per_param]
    if rest:  # 3: the rest from the exact fallback
        del grads
        rules.grads = None
        if keep and keep_limit is not None:
            if batch * sum(params[k].numel() for k in rest) > keep_limit:
                keep, rules.kept = False, []  # the fallback in bounded pieces; nothing kept
        _fallback(model, loss_fn, x, y, plan, rest, randomness, losses, keep, rules, grad_sum)
    sq = torch.zeros(batch, dtype=torch.float64, device=x.device)
    for v in rules.per_param.values():
        sq += v.to(sq.device)
    chunk = KeptChunk(batch, rules.kept) if keep else None
    return GhostPass(sq, losses.detach(), grad_sum, rules.per_param, chunk)


def _batch_norms(plan, grads, actual, batch, scale) -> list[float | None] | None:
    """``‖∇_p Σ_j ℓ_j‖`` per parameter (None where unused); None when float16/bfloat16 overflowed.

    ``actual``: the norms an earlier pass formed (and checked finite). A
    non-finite batch gradient otherwise raises :class:`NonFiniteError`.
    """
    params = plan.params
    if actual is not None:  # (checked finite by the pass that formed them)
        norms = [float(n) for n, _ in actual]
    else:
        norms = [None if g is None else _norm(g) for g in grads]
    # a finite float64 norm means finite entries (the elementwise test only when it is not)
    if all(n is None or math.isfinite(n) for n in norms) or _all_finite(
        [g for g in grads if g is not None]
    ):
        return norms
    if scale == 1.0 and params[0].dtype not in (torch.float32, torch.float64):
        return None
    bad = [plan.names[k] for k, g in enumerate(grads) if g is not None and not _finite(g)]
    raise NonFiniteError(
        f"the batch gradient of {batch} samples is not finite in parameter(s) "
        f"{', '.join(bad)} although every per-sample loss is; nothing was changed"
        + ("" if scale == 1.0 else f" (it overflows {params[0].dtype}: run in float32)")
    )


class _Rules:
    """The answers of the rules a plan still serves in one batch, each checked structurally.

    ``per_param`` collects ``{parameter index: (B,) float64 ‖g_j(p)‖²}`` of the
    parameters whose rule passed; ``kept`` (with ``keep``) their kept forms as
    ``(factors, {attribute: parameter index}, scale)``. A parameter whose rule
    refused a call, or failed the check, is moved to the fallback (:meth:`Plan.demote`).
    """

    def __init__(self, plan, batch, scale, keep, actual, grads, norms) -> None:
        self.plan, self.batch, self.scale, self.keep = plan, batch, scale, keep
        self.actual, self.grads, self.norms = actual, grads, norms
        self.tol = tolerance(plan.params[0].dtype)
        # every parameter's error is measured against its own scale (_structural) and a floor
        # for a gradient that vanishes by symmetry (an attention key's bias: the softmax
        # ignores a shift), which is rounding on both sides: the dtype's machine epsilon
        # times the whole batch gradient's norm (as a share of τ, since the bound is scaled
        # by τ). A floor of τ·‖G‖ itself would hide a percent-sized error of any parameter
        # whose gradient is a small part of the whole
        whole = math.sqrt(sum(n * n for n in norms if n is not None))
        self.floor = whole * torch.finfo(plan.params[0].dtype).eps / self.tol
        self.per_param: dict[int, torch.Tensor] = {}
        self.unchecked_sums: dict[int, torch.Tensor] = {}
        self.kept: list = []
        self.multi: set[int] = set()  # parameters with several uses: summed (serve_sums)
        self.sources: dict[int, list] = {}  # their module rules' (factors, attribute)
        self.rule_names: dict[int, list[str]] = {}  # the rules each summed parameter took

    def uses(self, uses: UseRecorder | None, active) -> dict[int, list]:
        """Read the use recorder: demote what a use cannot serve; return the served uses.

        Also decides which parameters have several uses (registered in several
        served modules, or a module's parameter also used outside its calls):
        their rules' kept forms are summed with the uses' in :meth:`serve_sums`.
        """
        plan = self.plan
        parts, problems = uses.parts() if uses is not None else ({}, {})
        for k, why in sorted(problems.items()):
            if k in plan.by_use:
                reason = f"{plan.by_use[k]}; {why}"
            else:
                reason = f"used outside the calls its module rule serves: {why}"
            plan.demote([k], "use", reason)
        parts = {k: v for k, v in parts.items() if k not in plan.fallback}
        for k in parts:
            self.rule_names.setdefault(k, []).extend(sorted(uses.rules_of.get(k, ())))
        seen: dict[int, int] = {}
        for _, mod, _, attrs in active:
            for a in attrs:
                k = plan.index[id(mod.get_parameter(a))]
                seen[k] = seen.get(k, 0) + 1
        self.multi = {k for k, n in seen.items() if n > 1} | (set(parts) & set(seen))
        return parts

    def serve(self, mname, mod, fam, attrs, calls) -> None:
        """One module: its rule's answer (norms and projections), each parameter checked.

        Attributes with several uses only hand their kept form on to :meth:`serve_sums`.
        """
        plan = self.plan
        ks = [plan.index[id(mod.get_parameter(a))] for a in attrs]
        problem = next((c.problem for c in calls if c.problem), None)
        if problem is not None:
            plan.demote(ks, "record", problem)
            return
        dirs = {a: plan.directions[k] for a, k in zip(attrs, ks, strict=True)}
        shared = [a for a, k in zip(attrs, ks, strict=True) if k in self.multi]
        try:
            res = self._answer(mod, fam, calls, attrs, dirs, shared)
        except Unsupported as exc:
            plan.demote(ks, "rule", str(exc))
            return
        for a, k in zip(attrs, ks, strict=True):
            if a in shared:
                continue
            if plan.unchecked:
                self._accept(a, k, res[a])
                total = fam.batch_grad(mod, calls, [a], self.batch)[a]
                self.unchecked_sums[k] = total.double() / self.scale
            elif self._structural(mname or type(mod).__name__, fam.name, k, res[a]):
                self._accept(a, k, res[a])

    def _answer(self, mod, fam, calls, attrs, dirs, shared=()):
        """Return the rule's :class:`ParamGhost` per attribute (its kept form's with ``keep``).

        The kept form of ``shared`` attributes goes to :attr:`sources` instead.
        """
        own = [a for a in attrs if a not in shared]
        if not self.keep and not shared:
            return fam.per_sample(mod, calls, attrs, self.batch, dirs)
        factors = fam.factors(mod, calls, attrs, self.batch)
        for a in shared:
            k = self.plan.index[id(mod.get_parameter(a))]
            self.sources.setdefault(k, [])
            if not isinstance(factors, Zero):  # (a module whose calls were all batch-free)
                self.sources[k].append((factors, a))
                self.rule_names.setdefault(k, []).append(fam.name)
        res = factors.ghost(own, dirs)
        if self.keep:
            self.kept.append((factors, {}, self.scale))
        return res

    def serve_sums(self, parts: dict[int, list]) -> None:
        """Serve the parameters with several uses, or only uses: summed kept forms, checked."""
        plan = self.plan
        # (a parameter left to its uses with none recorded is checked as zero: a use the
        # recorder could not see, inside a custom autograd.Function, fails the check)
        for k in sorted(set(self.sources) | set(parts) | set(plan.by_use)):
            if k in plan.fallback:
                continue  # demoted meanwhile (a module rule that refused one of its calls)
            mine = self.sources.get(k, []) + parts.get(k, [])
            if not mine:  # no call with data, no use that reached the loss
                shape = tuple(plan.params[k].shape)
                mine = [(Zero({"p": shape}, self.batch, plan.params[k].device), "p")]
            if len(mine) == 1:
                factors, name = mine[0]
            else:
                factors, name = Summed(mine, "p", plan.params[k].shape, self.batch), "p"
            ghost = ParamGhost(factors.sq(name), factors.proj(name, plan.directions[k]))
            if self.keep:
                self.kept.append((factors, {}, self.scale))
            if plan.unchecked:
                self._accept(name, k, ghost)
                ones = torch.ones(1, self.batch, dtype=torch.float64)
                total = factors.weighted(name, ones)[0]
                self.unchecked_sums[k] = total / self.scale
            elif self._structural(f"the uses of {plan.names[k]}", "use", k, ghost):
                self._accept(name, k, ghost)
                plan.served_by.setdefault(k, sorted(set(self.rule_names.get(k, []))))

    def _accept(self, a, k, ghost) -> None:
        self.per_param[k] = ghost.sq / (self.scale * self.scale)
        if self.keep:
            self.kept[-1][1][a] = k

    def _structural(self, where, rule, k, ghost) -> bool:
        """Check one parameter structurally; a failure moves it to the fallback."""
        plan = self.plan
        if self.actual is not None:
            seen = self.actual[k][1].to(ghost.proj.device)
        else:
            g = self.grads[k]
            seen = plan.directions[k].of_tensor(
                g if g is not None else torch.zeros_like(plan.params[k])
            )
        # the rounding of a sum of B per-sample gradients grows like their root sum of squares
        # (at most √B times it); their plain sum would shrink a real error's share by up to √B
        spread = float(ghost.sq.clamp(min=0).sum().sqrt())
        bound = (self.norms[k] or 0.0) + spread + self.floor
        err = structural_error(ghost.proj, seen, bound)
        if not err <= self.tol:
            plan.demote(
                [k],
                "structural",
                f"the {rule} rule of {where} accounts for a batch gradient that differs "
                f"from the actual one (relative error {err:.2g} > {self.tol:g}): the parameter "
                "is used outside the module's recorded calls, or the module changes it "
                "during forward",
            )
            return False
        plan.note_structural(err)
        return True

    def grad_sums(self) -> list[torch.Tensor | None]:
        """``∇ Σ_j ℓ_j`` of the parameters served: the actual backward's (float64, unscaled)."""
        params = self.plan.params
        grad_sum: list[torch.Tensor | None] = [None] * len(params)
        for k in self.per_param:
            if k in self.unchecked_sums:
                grad_sum[k] = self.unchecked_sums[k]
            elif self.actual is None:
                g = dense_grad(self.grads[k], params[k]).double()
                grad_sum[k] = g if self.scale == 1.0 else g / self.scale
        return grad_sum


def _fallback(model, loss_fn, x, y, plan, rest, randomness, losses, keep, rules, grad_sum):
    """Exact per-sample norms and sums of the parameters ``rest`` no rule serves.

    Two groups: the parameters defined by batch-1 passes (``plan.batch1``, a
    loop) and the others (:func:`choose_mode`); with ``keep`` their per-sample
    gradients are kept as rows.
    """
    params = plan.params
    groups = [
        ([k for k in rest if k in plan.batch1], "loop"),
        ([k for k in rest if k not in plan.batch1], choose_mode(model, randomness)),
    ]
    for ks, mode in groups:
        if not ks:
            continue
        if mode == "vmap" and plan.vmap_failed:
            mode = "loop"
        fs = fallback_stats(
            model,
            loss_fn,
            x,
            y,
            [params[k] for k in ks],
            mode,
            losses=losses if mode == "graph" else None,
            keep_rows=keep,
        )
        if mode == "vmap" and fs.mode != "vmap":
            plan.vmap_failed = True
        if keep:
            names = {plan.names[k]: k for k in ks}
            rules.kept.append((Rows(dict(zip(names, fs.rows, strict=True))), names, 1.0))
        for i, k in enumerate(ks):
            rules.per_param[k] = fs.sq[i]
            grad_sum[k] = fs.sums[i]


def per_sample_sq_norms(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``‖∇ℓ_j‖²`` for every sample j of the batch, float64 ``(B,)``, by ghost norms.

    ``ℓ_j = loss_fn(model(x_j), y_j)``; the norm runs over ``params`` (default:
    every trainable parameter, tied ones once). Layers with a rule
    (:data:`~clipscope.engine.per_sample.registry.registry`) never materialize
    per-sample gradients (Goodfellow 2015; Li et al. 2021) and are checked
    structurally; other parameters come from an exact fallback, with a
    :class:`~clipscope.engine.verify.PerSampleFallbackWarning`. Train-mode
    BatchNorm raises ``ValueError``.

    >>> import torch.nn.functional as F
    >>> m = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> sq = per_sample_sq_norms(m, F.cross_entropy, x, y)
    >>> g1 = torch.autograd.grad(F.cross_entropy(m(x[1:2]), y[1:2]), list(m.parameters()))
    >>> bool(torch.isclose(sq[1], sum(g.double().square().sum() for g in g1)))
    True
    """
    return ghost_pass(model, loss_fn, x, y, params).sq_norms
