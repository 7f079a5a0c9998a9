"""Call a model on a component: the two forms of a loss, and the components' losses ``f_i``.

:func:`component_loss` is the one place that turns a component's batch into its
scalar mean loss ``f_i``; :func:`component_losses` iterates it over the
components at the current parameters. The probe's mini-batch routes, the
Hessian-vector products, ``fit``'s steps and the ``Monitor`` all go through it,
so every consumer sees the same ``f_i``.

**The two forms of a loss** (:func:`loss_form` decides, from the signature only):

``"model_batch"``
    ``loss_fn(model, batch) -> f_i``: the function calls the model itself, so
    ``lambda model, batch: model(**batch).loss`` works with a dataset of dicts.
    Chosen **exactly when the first two parameters are named** ``model`` **and**
    ``batch`` (in that order, positional). Works with every batch structure
    and the mini-batch routes (two-pass, keep, dyadic); refused by the
    per-sample route (it needs per-sample losses from the model's output) and by
    sequential components (the recurrent state is clipscope's to carry).
``"output_target"``
    every other callable: ``loss_fn(model(x), y)`` for a batch ``(x, y)``, and
    ``output, state = model(inp, state); loss_fn(output, target)`` along the
    detached state chain for
    :class:`~clipscope.components.SequentialComponents`. A batch that is not an
    ``(x, y)`` pair (a dict, one tensor, a triple) is refused with a message
    naming the other form; it is never unpacked.

**Declared weights.** A loss whose value is a *weighted* mean -- the token
mean of a padded language-model batch (``ignore_index=-100``), a class-weighted
cross-entropy -- may return ``(sum, count)`` instead of the mean: two 0-d
tensors (or a number for ``count``), ``sum`` the weighted sum of the per-token
(per-sample) losses and ``count`` the total weight, a positive constant (not a
function of the parameters). The component's loss is then
``f_i = sum / count``, the same number the mean form gives, and ``count`` is its
declared weight: the dyadic route merges two components by these weights
(``f_P = (sum_a + sum_b)/(count_a + count_b)``), not by their sample counts.
:func:`component_loss` returns ``f_i``; :func:`component_losses` yields the
weights with ``weights=True``; :func:`mean_loss` turns such a loss into its mean
form (the per-sample route: each sample's own weighted mean).

The rule never guesses from the batch or from a trial call. A function whose
first parameter is ``model`` but whose second is not ``batch`` is ambiguous and
refused (:class:`TypeError`); rename its parameters to say which form it is.
An exception raised inside the model or the loss gets a note saying which
component and which form were used.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from clipscope.components import detach_state
from clipscope.engine.guard import (
    BufferHold,
    check_dropout_policy,
    component_seed,
    dropout_modules,
    dropout_policy,
    model_guard,
    rng_for_component,
    rng_seeded,
    rng_states,
)

__all__ = [
    "LOSS_FORMS",
    "REPEAT_TOLERANCE",
    "check_grad_compatible",
    "check_loss_fn",
    "check_repeatable",
    "component_loss",
    "component_losses",
    "declared_mean",
    "loss_form",
    "mean_loss",
    "param_names",
    "trainable_params",
    "weighted_component_loss",
]

#: The two forms of a loss function (:func:`loss_form`).
LOSS_FORMS = ("output_target", "model_batch")

_RULE = (
    "a loss is called as loss_fn(model, batch) exactly when its first two parameters are "
    "named (model, batch), else as loss_fn(model(x), y) on an (x, y) batch"
)


def loss_form(loss_fn: Callable[..., Any]) -> str:
    """Return ``"model_batch"`` or ``"output_target"``: how ``loss_fn`` is called.

    The rule (module docstring): ``"model_batch"`` exactly when the first two
    parameters of ``inspect.signature(loss_fn)`` are positional and named
    ``model`` and ``batch``; ``"output_target"`` for every other callable,
    including those whose signature cannot be read (C functions).

    Raises
    ------
    TypeError
        ``loss_fn`` is not callable; or its first parameter is named ``model``
        while the second is not ``batch`` (ambiguous: rename the parameters).

    >>> loss_form(lambda model, batch: model(**batch).loss)
    'model_batch'
    >>> import torch.nn.functional as F
    >>> loss_form(F.cross_entropy), loss_form(lambda out, y: (out - y).pow(2).mean())
    ('output_target', 'output_target')
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    try:
        params = list(inspect.signature(loss_fn).parameters.values())
    except (TypeError, ValueError):  # no readable signature: a C function
        return "output_target"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params[:2] if p.kind in positional]
    if names == ["model", "batch"]:
        return "model_batch"
    if names[:1] == ["model"]:
        raise TypeError(
            f"loss_fn's parameters start with (model, {names[1] if len(names) > 1 else ''}"
            f"{'' if len(names) > 1 else '...'}): ambiguous. Name them exactly (model, batch) "
            "for loss_fn(model, batch), or rename the first one for loss_fn(output, target) "
            f"({_RULE})"
        )
    return "output_target"


def check_loss_fn(
    loss_fn: Callable[..., Any],
    components: Any,
    route: str | None = None,
    batch_sizes: Iterable[int] | None = None,
) -> str:
    """Check that ``loss_fn``'s form fits the components and the probe route; return the form.

    Raises
    ------
    TypeError
        ``"output_target"`` with components whose batches are not ``(x, y)``
        pairs (``components.batch_structure``); an ambiguous signature.
    ValueError
        ``"model_batch"`` with sequential components, with ``route="per-sample"``
        or with per-sample components asked for (``batch_sizes=[1]``): those
        need the per-sample losses of the model's output.
    """
    form = loss_form(loss_fn)
    structure = getattr(components, "batch_structure", "pair")
    if form == "output_target" and structure != "pair":
        raise TypeError(
            f"loss_fn is called as loss_fn(model(x), y), but the components' batches are "
            f"{_structure_words(components)}, not (x, y) pairs: write the loss as a function "
            "of (model, batch) -- e.g. `lambda model, batch: model(**batch).loss` -- with its "
            f"parameters named exactly (model, batch) ({_RULE})"
        )
    if form == "model_batch":
        if getattr(components, "sequential", False):
            raise ValueError(
                "a loss_fn(model, batch) cannot be used with sequential components: clipscope "
                "carries the recurrent state between windows, so the model is called as "
                "model(inp, state); write the loss as loss_fn(output, target)"
            )
        per_sample = batch_sizes is not None and list(batch_sizes) == [1]
        if route == "per-sample" or per_sample:
            raise ValueError(
                "the per-sample route needs loss_fn(output, target) (it takes per-sample losses "
                "from the model's output), but loss_fn is a function of (model, batch); for "
                "components of one sample each build Components with batch_size=1 and use a "
                "mini-batch route (two-pass, keep)"
            )
    return form


def _structure_words(components: Any) -> str:
    describe = getattr(components, "describe", None)
    text = describe().get("batch") if callable(describe) else None
    return text or str(getattr(components, "batch_structure", "?"))


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(text)


def component_loss(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Any,
    *,
    form: str,
    state: Any = None,
    sequential: bool = False,
    index: int | None = None,
) -> tuple[torch.Tensor, Any]:
    """Return ``(f_i, state)``: component ``index``'s scalar mean loss from its ``batch``.

    ``form`` is :func:`loss_form`'s answer (computed once by the caller).
    ``"model_batch"``: ``loss_fn(model, batch)``, state ``None``.
    ``"output_target"``: ``loss_fn(model(x), y)``; sequential components:
    ``output, state = model(x, state)``, the new state returned detached.
    A loss returning ``(sum, count)`` (declared weights, module docstring) gives
    ``f_i = sum / count``; :func:`weighted_component_loss` also returns ``count``.

    Raises
    ------
    TypeError
        An ``"output_target"`` loss given a batch that is not an ``(x, y)`` pair.
    ValueError
        The loss is neither a 0-d tensor (the batch's mean loss) nor a valid
        ``(sum, count)`` (:func:`declared_mean`).
    """
    loss, _, state = weighted_component_loss(
        model, loss_fn, batch, form=form, state=state, sequential=sequential, index=index
    )
    return loss, state


def weighted_component_loss(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    batch: Any,
    *,
    form: str,
    state: Any = None,
    sequential: bool = False,
    index: int | None = None,
) -> tuple[torch.Tensor, float | None, Any]:
    """Return ``(f_i, weight, state)``: :func:`component_loss` and the declared weight.

    ``weight`` is the ``count`` of a loss returning ``(sum, count)``, None for a
    loss returning its mean (whose weight is then the component's sample count).
    """
    which = f"component {index}" if index is not None else "the batch"
    if form != "model_batch" and (not isinstance(batch, (tuple, list)) or len(batch) != 2):
        raise TypeError(
            f"{which}: loss_fn(model(x), y) needs an (x, y) batch, got "
            f"{type(batch).__name__}; write the loss as a function of (model, batch) ({_RULE})"
        )
    try:
        if form == "model_batch":
            loss = loss_fn(model, batch)
        else:
            x, y = batch
            if sequential:
                out, state = model(x, state)
                state = detach_state(state)
            else:
                out = model(x)
            loss = loss_fn(out, y)
    except Exception as exc:
        call = "loss_fn(model, batch)" if form == "model_batch" else "loss_fn(model(x), y)"
        _note(exc, f"clipscope: while computing {which}'s loss as {call} ({_RULE})")
        raise
    call = "loss_fn(model, batch)" if form == "model_batch" else "loss_fn(model(x), y)"
    loss, weight = declared_mean(loss, f"{which} (called as {call})")
    return loss, weight, state


def declared_mean(value: Any, which: str = "the batch") -> tuple[torch.Tensor, float | None]:
    """Return ``(f, weight)`` from what a loss returned: its mean, or ``(sum, count)``.

    A 0-d tensor is the mean itself (weight None). A pair ``(sum, count)`` is a
    declared-weight loss (module docstring): ``f = sum / count``, weight
    ``float(count)``.

    Raises
    ------
    ValueError
        Anything else; a ``count`` that is not a finite number > 0 or depends
        on the parameters (``requires_grad``: merging by it would not give the
        parent's gradient).

    >>> declared_mean(torch.tensor(2.0))
    (tensor(2.), None)
    >>> declared_mean((torch.tensor(6.0), torch.tensor(3)))
    (tensor(2.), 3.0)
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value, None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        total, count = value
        if isinstance(total, torch.Tensor) and total.dim() == 0:
            if isinstance(count, torch.Tensor) and count.dim() == 0:
                if count.requires_grad:
                    raise ValueError(
                        f"loss_fn returned (sum, count) for {which} with a count that depends on "
                        "the parameters (requires_grad): the declared weight must be a constant "
                        "(a token count, a sum of class weights); detach it"
                    )
                weight = float(count)
            elif isinstance(count, (int, float)) and not isinstance(count, bool):
                weight = float(count)
            else:
                weight = None
            if weight is not None:
                if not (math.isfinite(weight) and weight > 0):
                    raise ValueError(
                        f"loss_fn returned (sum, count) for {which} with count = {weight!r}: "
                        "a weighted mean needs a finite weight > 0 (a batch whose tokens are "
                        "all ignore_index has no loss; leave it out of the data)"
                    )
                return total / weight, weight
    shape = (
        tuple(value.shape)
        if isinstance(value, torch.Tensor)
        else f"{type(value).__name__} of {len(value)}"
        if isinstance(value, (tuple, list))
        else type(value).__name__
    )
    raise ValueError(
        f"loss_fn must return a scalar tensor (the batch's mean loss) or a pair (sum, count) "
        f"of 0-d tensors (a weighted sum and its positive weight), got {shape} for {which}"
    )


def mean_loss(loss_fn: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """``loss_fn`` in its mean form: ``sum / count`` where it returns ``(sum, count)``.

    For code that needs a scalar loss, such as the per-sample route, where each
    sample's component is its own weighted mean ``ℓ_j = sum_j / count_j``. Pure
    tensor arithmetic, so ``torch.func.vmap`` batches it; a sample whose count
    is 0 gives a non-finite ``ℓ_j`` (refused as such). A loss returning its mean
    is returned unchanged.

    >>> f = mean_loss(lambda out, y: ((out - y).square().sum(), out.new_tensor(out.numel())))
    >>> float(f(torch.ones(4), torch.zeros(4)))
    1.0
    """
    if getattr(loss_fn, "_clipscope_mean_of", None) is not None:
        return loss_fn

    def mean_form(output: Any, target: Any) -> torch.Tensor:
        value = loss_fn(output, target)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            total, count = value
            if isinstance(count, torch.Tensor):
                if count.requires_grad:
                    raise ValueError(
                        "loss_fn returned (sum, count) with a count that depends on the "
                        "parameters (requires_grad): the declared weight must be a constant"
                    )
                count = count.to(total.dtype)
            return total / count
        return value

    mean_form._clipscope_mean_of = loss_fn  # type: ignore[attr-defined]
    mean_form.__qualname__ = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    return mean_form


def trainable_params(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> list:
    """Return the parameters the engine differentiates: ``params``, or every ``requires_grad`` one.

    ``model.parameters()`` yields a tied weight (AWD-LSTM encoder/decoder) once,
    so it is counted once in every norm (edge case 21). No trainable parameter
    is an error (edge case 19).
    """
    if params is None:
        out = [p for p in model.parameters() if p.requires_grad]
    else:
        out, seen = [], set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p)!r}")
            if not p.requires_grad:
                raise ValueError("every tensor in params must require grad")
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    if not out:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return out


def param_names(model: nn.Module, params: list) -> list[str]:
    """Names of ``params`` in ``model`` (``'<param k>'`` for tensors it does not own)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"<param {k}>") for k, p in enumerate(params)]


def component_losses(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    components: Any,
    *,
    dropout: str = "off",
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
    only: Iterable[int] | None = None,
    device: torch.device | str | None = None,
    weights: bool = False,
    hold: BufferHold | None = None,
) -> Iterator[tuple]:
    """Yield ``(i, f_i)`` for each component in order, ``f_i`` a differentiable scalar.

    ``f_i`` (:func:`component_loss`: ``loss_fn(model(x_i), y_i)`` or
    ``loss_fn(model, batch_i)``) is the component's **mean** loss (the paper's
    eq. (1) averages these with weight ``1/m``). Differentiate it with
    ``torch.autograd.grad(f_i, params)`` before advancing the generator.

    Sequential components: the state starts at ``None`` (the model's zero
    state) and flows from window ``i-1`` into ``i`` detached, recomputed at the
    *current* parameters. With ``only``, the other windows still run (under
    ``no_grad``) to carry the state; they are not yielded.

    Dropout: ``dropout="off"`` puts dropout modules in eval mode while the
    generator runs; ``"fixed"`` runs component ``i``'s forward under an RNG
    seeded from ``(seed, i)``, so repeated evaluations see identical masks.

    Buffers: every component is evaluated from the buffers as they were when
    the generator started (``hold``, a :class:`~clipscope.engine.guard.BufferHold`
    made then if not given): whatever a forward wrote (train-mode
    ``spectral_norm``'s power-iteration vectors, BatchNorm's running statistics)
    is put back before the next forward and when the generator finishes, and
    ``hold.written`` names it. Without that, a forward that reads what an
    earlier one wrote would make ``f_i`` depend on the components before it.

    ``weights=True`` yields ``(i, f_i, w_i)``: ``w_i`` the declared weight of a
    loss returning ``(sum, count)`` (module docstring), None for a mean loss.

    The generator changes dropout flags (``"off"``) until it finishes or is
    closed: run it inside :func:`~clipscope.engine.guard.model_guard` when the
    model must stay untouched (:func:`~clipscope.engine.probe` does).

    ``params`` is validated (non-empty, trainable) but not otherwise used here;
    callers pass the same list to ``autograd.grad``.
    """
    check_dropout_policy(dropout)
    trainable_params(model, params)
    form = check_loss_fn(loss_fn, components)
    m = len(components)
    wanted = None if only is None else set(int(i) for i in only)
    if wanted is not None and any(not 0 <= i < m for i in wanted):
        raise IndexError(f"component indices {sorted(wanted)} out of range for m = {m}")
    sequential = bool(getattr(components, "sequential", False))
    hold = BufferHold(model) if hold is None else hold
    forwards = 0  # the values of every buffer are compared once, after the first forward
    try:
        with dropout_policy(model, dropout):
            state = None
            for i in range(m):
                if wanted is not None and i not in wanted:
                    if not sequential:
                        continue
                    hold.restore(scan=forwards == 1)
                    forwards += 1
                    with torch.no_grad(), rng_for_component(dropout, seed, i):
                        _, state = model(*_args(components, i, device, state))
                    state = detach_state(state)
                    continue
                hold.restore(scan=forwards == 1)  # (after the caller's backward of f_{i-1})
                forwards += 1
                with torch.enable_grad(), rng_for_component(dropout, seed, i):
                    batch = (
                        components.batch(i, device) if device is not None else components.batch(i)
                    )
                    loss, weight, state = weighted_component_loss(
                        model, loss_fn, batch, form=form, state=state, sequential=sequential,
                        index=i,
                    )  # fmt: skip
                yield (i, loss, weight) if weights else (i, loss)
    finally:
        hold.restore(scan=forwards == 1)


def _args(components: Any, i: int, device: Any, state: Any) -> tuple:
    x, _ = components.batch(i, device) if device is not None else components.batch(i)
    return x, state


#: Relative change between two evaluations of one component's loss at the same
#: parameters that counts as "not repeatable": dropout changes a loss by far more,
#: floating-point noise (non-deterministic kernels) by far less.
REPEAT_TOLERANCE = 1e-5


def check_repeatable(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    components: Any,
    *,
    form: str,
    dropout: str,
    seed: int,
    device: torch.device,
    rows: int | None = None,
    hold: BufferHold | None = None,
) -> tuple[float, float]:
    """Evaluate component 0 twice at the current parameters; refuse a loss that is random.

    A component's gradient is only defined when f_0 is a function of the
    parameters (DESIGN §4): the dropout policy must control every random
    number the forward draws. Both evaluations run without gradients, under
    the policy, from the same buffers (``hold``, a
    :class:`~clipscope.engine.guard.BufferHold` made here if not given: what the
    first forward wrote is put back before the second, as every route does, and
    ``hold.written`` names it), inside :func:`~clipscope.engine.guard.model_guard`
    (the model, its buffers and the caller's RNG stream are left as found).
    Costs two forward passes of one component.

    Two checks, neither depending on the caller's RNG state:

    * ``"off"``: the forward must draw **no** random number from torch's global
      generators (:func:`~clipscope.engine.guard.rng_states` compared before and
      after each forward; exact, no tolerance). A dropout module is in eval mode
      then, but a module in train mode that applies attention dropout itself
      (``F.dropout(..., training=self.training)``, or
      ``scaled_dot_product_attention(..., dropout_p=p)``, as Hugging Face
      attention does, eager or SDPA) still draws: its effect on the loss can be
      far below any tolerance (a random-init BERT: ~1e-5 relative), so comparing
      losses alone passes or fails by chance. The two evaluations run under two
      different seeds.
    * both policies: the two values of f_0 (``"fixed"``: both under component
      0's seed, the same masks) may differ by at most :data:`REPEAT_TOLERANCE`
      (relative): randomness outside torch's global generators (a generator of
      the model's own, numpy) or a non-deterministic kernel.

    ``rows``: evaluate only the first ``rows`` samples of the first batch: the
    per-sample route, whose components are single samples (its first ``rows``
    components in one forward: more random numbers drawn than by one sample,
    so that equal masks by chance are unlikely), so that the check costs two
    small forwards instead of two of a whole chunk. The batch's ``x`` (and
    ``y``, when it is a tensor) then has the samples along dim 0, as the
    per-sample route requires.

    Returns
    -------
    (float, float)
        The two values of f_0 (possibly non-finite: the caller decides).

    Raises
    ------
    ValueError
        Under ``"off"`` a forward drew random numbers (the message names what to
        do: ``model.eval()``, attention dropout 0, or ``dropout="fixed"``); or
        both values are finite and differ by more than :data:`REPEAT_TOLERANCE`.
    """
    sequential = bool(getattr(components, "sequential", False))
    values, drew = [], False
    with model_guard(model), torch.no_grad(), dropout_policy(model, dropout):
        hold = BufferHold(model) if hold is None else hold
        for k in range(2):
            hold.restore(scan=k == 1)  # every buffer the first forward wrote, by value too
            batch = components.batch(0, device)
            if rows is not None:
                batch = _first_rows(batch, rows)
            # "fixed": component 0's masks both times; "off": two different random states
            rng = (
                rng_for_component(dropout, seed, 0)
                if dropout == "fixed"
                else rng_seeded(component_seed(seed, 0) ^ (k + 1))
            )
            with rng:
                before = rng_states()
                loss, _ = component_loss(
                    model, loss_fn, batch, form=form, sequential=sequential, index=0,
                )  # fmt: skip
                after = rng_states()
            drew = drew or any(not torch.equal(u, v) for u, v in zip(before, after, strict=True))
            values.append(float(loss))
    a, b = values
    if dropout == "off" and drew:
        raise ValueError(_random_forward_message(model, a, b))
    finite = math.isfinite(a) and math.isfinite(b)
    if finite and abs(a - b) > REPEAT_TOLERANCE * max(abs(a), abs(b), 1e-30):
        raise ValueError(
            f"component 0's loss changed between two evaluations at the same parameters "
            f"({a!r} then {b!r}) under dropout={dropout!r}, "
            + (
                "with the same seeded masks both times"
                if dropout == "fixed"
                else "though the forward drew no random number from torch's generators"
            )
            + ": randomness no dropout policy controls (a torch.Generator of the model's "
            "own, numpy or Python random numbers) or a non-deterministic kernel. Make the "
            "forward deterministic (draw masks from torch's global RNG, only in train mode; "
            "torch.use_deterministic_algorithms(True))"
        )
    return a, b


def _random_forward_message(model: nn.Module, a: float, b: float, grad: bool = False) -> str:
    """Word the refusal of a forward that draws random numbers under ``dropout="off"``."""
    suspects = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if m.training and "attention" in type(m).__name__.lower()
    ]
    named = (
        f" (modules in train mode that may apply attention dropout themselves: "
        f"{suspects[:3]}{' …' if len(suspects) > 3 else ''})"
        if suspects
        else ""
    )
    if grad:
        seen = f"with gradients on (its loss {a!r}; without them it drew none)"
    elif a != b:
        seen = (
            f"its loss changed between two evaluations under two random states ({a!r} then {b!r})"
        )
    else:
        seen = f"its loss was {a!r} both times under two random states, by chance or rounding"
    return (
        f"under dropout='off' the forward of component 0 drew random numbers from torch's "
        f"generator, though the policy put its {len(dropout_modules(model))} dropout modules "
        f"in eval mode: {seen}. Something else draws{named}, e.g. attention dropout applied "
        "functionally by a module in train mode (F.dropout(..., training=self.training) or "
        "scaled_dot_product_attention(..., dropout_p=p), as Hugging Face attention does, "
        "eager or SDPA), so every statistic would be one of a random-mask objective. Put the "
        "model in eval mode (model.eval()), or set that dropout to 0 (Hugging Face: the "
        "config's attention dropout, e.g. attn_pdrop for GPT-2, attention_probs_dropout_prob "
        "for BERT and ViT, attention_dropout for Llama), or use "
        "dropout='fixed' (one fixed mask per component, the same at every evaluation)"
    )


#: The grad_fn of a reentrant ``torch.utils.checkpoint`` region in an autograd graph.
_REENTRANT_NODE = "CheckpointFunctionBackward"


def check_grad_compatible(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    components: Any,
    *,
    form: str,
    dropout: str,
    seed: int,
    device: torch.device,
    rows: int | None = None,
) -> None:
    """Refuse a model whose gradient ``torch.autograd.grad`` cannot take: reentrant checkpointing.

    The engine differentiates with ``torch.autograd.grad`` (it never writes
    ``.grad``). Activation checkpointing with ``use_reentrant=True`` (the
    default of ``torch.utils.checkpoint`` before torch 2.4, and what Hugging Face's
    ``gradient_checkpointing_enable()`` runs when given ``use_reentrant=True``;
    its default is ``False`` in the pinned transformers) supports only ``.backward()``: torch
    raises "incompatible with .grad()" at the first gradient, and a region whose
    inputs do not require grad silently gives its parameters no gradient at all.
    One forward of component 0 (its first ``rows`` samples, as
    :func:`check_repeatable`) with gradients on, under the dropout policy and
    :func:`~clipscope.engine.guard.model_guard`, looks for a reentrant region:
    a ``CheckpointFunctionBackward`` node in the graph, or torch's warning that
    none of a reentrant region's inputs requires grad. Costs one forward.

    Under ``"off"`` the same forward must draw no random number from torch's
    generators (as in :func:`check_repeatable`, whose forwards run without
    gradients: a model drawing only under autograd is caught here).

    Raises
    ------
    ValueError
        A reentrant checkpoint region ran; the message names the fix
        (``use_reentrant=False``). Or, under ``"off"``, the forward drew random
        numbers.
    """
    sequential = bool(getattr(components, "sequential", False))
    with model_guard(model), torch.enable_grad(), dropout_policy(model, dropout):
        batch = components.batch(0, device)
        if rows is not None:
            batch = _first_rows(batch, rows)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with rng_for_component(dropout, seed, 0):
                before = rng_states()
                loss, _ = component_loss(
                    model, loss_fn, batch, form=form, sequential=sequential, index=0
                )
                drew = any(not torch.equal(u, v) for u, v in zip(before, rng_states(), strict=True))
        if dropout == "off" and drew:  # random numbers drawn only with gradients on
            value = float(loss.detach())
            del loss
            raise ValueError(_random_forward_message(model, value, value, grad=True))
        # torch's reentrant checkpoint warns when none of a region's inputs requires grad
        # (the region then has no graph node and its parameters get no gradient)
        silent = any(
            "checkpoint" in str(w.filename) and "requires_grad=True" in str(w.message)
            for w in caught
        )
        for w in caught:  # the others as the user's code would have seen them
            if not silent or "requires_grad=True" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        found = silent or _has_node(loss.grad_fn, _REENTRANT_NODE)
        del loss
    if found:
        raise ValueError(
            "the model uses reentrant activation checkpointing (torch.utils.checkpoint with "
            "use_reentrant=True, e.g. Hugging Face's gradient_checkpointing_enable() given "
            "gradient_checkpointing_kwargs={'use_reentrant': True}), which supports only "
            ".backward(): clipscope differentiates each component "
            "with torch.autograd.grad, which it cannot serve (torch raises 'incompatible with "
            ".grad()', or gives the region's parameters no gradient at all). Use "
            "use_reentrant=False (torch.utils.checkpoint.checkpoint(..., use_reentrant=False); "
            "Hugging Face: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            '{"use_reentrant": False})), or turn checkpointing off while probing'
        )


def _has_node(fn: Any, name: str) -> bool:
    """Whether the autograd graph below ``fn`` holds a node of class ``name``."""
    seen: set[int] = set()
    stack = [fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == name:
            return True
        stack.extend(child for child, _ in getattr(node, "next_functions", ()))
    return False


def _first_rows(batch: Any, rows: int) -> Any:
    """``(x[:rows], y[:rows])`` of an ``(x, y)`` batch (``y`` as it is when not a tensor)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return batch
    x, y = batch
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return batch
    y = y[:rows] if isinstance(y, torch.Tensor) and y.dim() > 0 else y
    return x[:rows], y
