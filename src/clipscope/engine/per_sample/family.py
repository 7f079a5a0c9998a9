"""The interface every per-sample layer rule implements.

A **layer rule** (one file per family of layers, like Opacus' one grad-sampler
per layer type) is a :class:`LayerFamily` subclass registered in
:mod:`~clipscope.engine.per_sample.registry` by its decorator. It owns, for the
modules it claims:

1. its **claim and preconditions** -- :meth:`LayerFamily.claims` (the module
   types and options its formulas cover, checked once when the probe is
   planned) and :meth:`LayerFamily.precondition` (the module's current state,
   e.g. train mode); :meth:`LayerFamily.param_names` (the parameters it
   computes; dotted names such as ``out_proj.weight`` for parameters registered
   on a child module that the module uses without calling it);
   :meth:`LayerFamily.recording` (a context around the recorded forward). Two
   hooks are asked of every module of the model whether the rule claims it or
   not: :meth:`LayerFamily.batch1` (a gradient defined per
   batch) and :meth:`LayerFamily.excludes` (modules no rule may serve);
2. its **record step** -- :meth:`LayerFamily.record` keeps the inputs it needs
   (detached) and names the outputs whose gradients it needs; the ghost pass
   fills those gradients (``b = ∂(Σ_k ℓ_k)/∂output``) during its one backward;
3. its **forms**, pure functions of the recorded calls:

   * kept-factor form, :meth:`LayerFamily.factors`: the per-sample gradients as
     a :class:`~clipscope.engine.per_sample.factors.Factors` (``Tokens``,
     ``Rows``, ``Joined``, ``Zero`` or the family's own), from which norms,
     dots and γ-weighted sums follow;
   * ghost-norm form, :meth:`LayerFamily.per_sample`: per parameter the
     per-sample squared norms ``‖g_j(p)‖²`` and the **structural-check
     directions** -- the projection of the batch gradient the rule accounts for
     on the parameter's :class:`~clipscope.engine.per_sample._common.Directions`
     (:class:`ParamGhost`); by default the kept form's ``sq`` and ``proj``;
   * dots form, :meth:`LayerFamily.dots`: ``⟨g_j(θ_mod), v⟩`` for a vector
     ``v`` given per parameter; by default the kept form's ``dots``;
   * :meth:`LayerFamily.batch_grad`: ``Σ_j g_j(p)`` in full, for the tests and
     the benchmarks (the probe takes the batch gradient from autograd).

Nothing in a rule depends on when it runs: the factor-keeping route keeps the
recorded calls' factors of pass 1 and takes ``dots`` once ∇f is known, without
a second forward. The ghost pass verifies every rule's result
(:mod:`clipscope.engine.verify`: the structural check of each chunk, the spot
check of a few samples); a rule never has to be trusted.

A rule that meets something it cannot handle at run time (samples not on
dim 0, a packed sequence, a re-run that does not reproduce the batch) raises
:class:`Unsupported` with a reason, or sets :attr:`Call.problem` from a hook;
the parameters then go to an exact fallback, visibly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from clipscope.engine.per_sample._common import CHUNK_ELEMENTS, Directions

__all__ = [
    "Call",
    "LayerFamily",
    "ParamGhost",
    "Unsupported",
    "grads_of",
    "materialized_ghost",
    "single_input_record",
    "zeros",
]


class Unsupported(Exception):
    """A rule cannot serve this call; ``str(exc)`` is the reason shown to the user."""


@dataclass
class Call:
    """One recorded call of a module.

    Attributes
    ----------
    inputs : tuple of Tensor
        What the rule needs from the call's inputs, detached.
    grads : list of Tensor or None
        Gradients of the summed loss w.r.t. the outputs the rule hooked, in the
        order :meth:`LayerFamily.record` returned them; ``None`` for an output
        that does not reach the loss.
    extra : dict
        Family-specific (initial state, RNG state, the batch outputs, ...).
    problem : str or None
        Set when the call cannot be used (the rule's parameters then fall back).
    """

    inputs: tuple = ()
    grads: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    problem: str | None = None


@dataclass
class ParamGhost:
    """A rule's answer for one parameter in one batch.

    Attributes
    ----------
    sq : Tensor
        float64 ``(B,)``: ``‖g_j(p)‖²``.
    proj : Tensor
        float64 ``(k,)``: ``⟨Σ_j g_j(p), R_i⟩`` on the parameter's :class:`Directions`.
    """

    sq: torch.Tensor
    proj: torch.Tensor


class LayerFamily:
    """Base class: the claim, record step and forms of one family of layers.

    A subclass sets :attr:`name`, is registered with
    :func:`~clipscope.engine.per_sample.registry.register_module_rule` (which
    sets :attr:`module_types`), and implements :meth:`factors` and
    :meth:`batch_grad`; :meth:`per_sample` and :meth:`dots` follow from the
    factors unless the family has a cheaper form. Most keep the default
    :meth:`record` (one input, one output, samples on dim 0 of both).
    """

    name: ClassVar[str] = "base"
    module_types: ClassVar[tuple[type, ...]] = ()
    #: modules of these types (subclasses included) must run this exact forward;
    #: a subclass that overrides it could compute anything.
    plain_forward: ClassVar[bool] = True

    def claims(self, mod: nn.Module) -> bool:
        """Whether the family's formulas cover this module type and its options."""
        if not isinstance(mod, self.module_types):
            return False
        if not self.plain_forward:
            return True
        return any(isinstance(mod, t) and type(mod).forward is t.forward for t in self.module_types)

    def param_names(self, mod: nn.Module) -> tuple[str, ...]:
        """Names of the parameters the rules compute, as ``mod.get_parameter`` takes them.

        Default: ``weight`` and ``bias`` where they are parameters of ``mod``. A
        dotted name (``"out_proj.weight"``) serves a parameter registered on a
        child module; the planner then gives it to this rule, not to the child's.
        """
        return tuple(
            n for n in ("weight", "bias") if isinstance(getattr(mod, n, None), nn.Parameter)
        )

    def precondition(self, mod: nn.Module) -> str | None:
        """Why the rules cannot serve ``mod`` in its current state, or ``None``."""
        return None

    def batch1(self, mod: nn.Module) -> str | None:
        """Why ``mod``'s gradient is defined only per batch (batch-1 passes serve it), or None.

        Asked of every module of the model, claimed or not, before any claim:
        a module whose batch backward is not the sum of its per-sample
        gradients (it divides by batch counts) gets its per-sample norms, sums,
        dots and clipped sums from batch-1 backward passes.
        """
        return None

    def excludes(self, mod: nn.Module) -> Mapping[nn.Module, str]:
        """Return ``{module: reason}``: modules inside or around ``mod`` that no rule may serve.

        Asked of every module of the model, claimed or not. For a module that
        uses another module's parameters without calling it (the exclusion
        holds for every rule; their parameters go to the exact fallback).
        """
        return {}

    def before(self, mod: nn.Module) -> Any:
        """Run in a forward pre-hook; the return value reaches :meth:`record` as ``before``."""
        return None

    def recording(self, mod: nn.Module) -> contextlib.AbstractContextManager:
        """Return a context held around the whole recorded forward of a served module.

        :class:`~clipscope.engine.per_sample.recorder.ModuleRecorder` enters it for
        every module it hooks when it is created and exits it in ``remove()``
        (also after an exception). For a rule that must see inside the module's
        call, where a pre-hook is too late (``nn.Module.__call__`` has looked up
        ``forward`` before the pre-hooks run): e.g. wrap ``mod.forward`` for the
        block, and restore it on exit. What it captures reaches :meth:`record`
        through the rule's own state; it must not change any value the forward
        computes. Default: none (``contextlib.nullcontext()``).
        """
        return contextlib.nullcontext()

    def record(
        self, mod: nn.Module, args: tuple, output: Any, batch: int, before: Any = None
    ) -> tuple[Call, list[torch.Tensor]]:
        """Keep what the rules need from one call; return the call and the outputs to hook."""
        return single_input_record(mod, args, output, batch)

    def factors(self, mod: nn.Module, calls: list[Call], names: list[str], batch: int) -> Any:
        """Return the per-sample gradients of ``names`` in a kept form (a ``Factors``).

        :class:`~clipscope.engine.per_sample.factors.Factors` with ``sq``,
        ``proj``, ``dots`` and ``weighted`` for each of ``names``; ``Zero`` when
        no call reached the loss. The factor-keeping route keeps it between passes.
        """
        raise NotImplementedError

    def per_sample(
        self,
        mod: nn.Module,
        calls: list[Call],
        names: list[str],
        batch: int,
        dirs: dict[str, Directions],
    ) -> dict[str, ParamGhost]:
        """Per-sample squared norms and batch-gradient projections of ``mod``'s ``names``.

        Default: from :meth:`factors` (its ``sq`` and ``proj`` on ``dirs``).
        """
        return self.factors(mod, calls, names, batch).ghost(names, dirs)

    def dots(
        self,
        mod: nn.Module,
        calls: list[Call],
        names: list[str],
        vectors: dict[str, torch.Tensor],
        batch: int,
    ) -> torch.Tensor:
        """``⟨g_j, v⟩`` over ``mod``'s ``names`` for every sample, float64 ``(B,)``.

        Default: from :meth:`factors`.
        """
        return self.factors(mod, calls, names, batch).dots({n: vectors[n] for n in names})

    def batch_grad(
        self, mod: nn.Module, calls: list[Call], names: list[str], batch: int
    ) -> dict[str, torch.Tensor]:
        """``Σ_j g_j(p)`` for each of ``names``, formed in full from the recorded calls.

        What :meth:`per_sample` only projects. The probe takes the batch
        gradient from autograd; this is for tests and for measuring what the
        structural check costs (``bench/engine.py``).
        """
        raise NotImplementedError


def single_input_record(
    mod: nn.Module, args: tuple, output: Any, batch: int
) -> tuple[Call, list[torch.Tensor]]:
    """Record ``args[0]`` of a one-input, one-output module with the samples on dim 0."""
    a = args[0] if args else None
    call = Call(inputs=(), grads=[None])
    if not isinstance(output, torch.Tensor) or not isinstance(a, torch.Tensor):
        call.problem = f"{type(mod).__name__} was called with a non-tensor input or output"
        return call, []
    if a.dim() == 0 or a.shape[0] != batch or output.dim() == 0 or output.shape[0] != batch:
        call.problem = (
            f"{type(mod).__name__} got input {tuple(a.shape)} -> output "
            f"{tuple(output.shape)}: the samples of a batch of {batch} are not along dim 0"
        )
        return call, []
    call.inputs = (a.detach(),)
    return call, [output]


def grads_of(calls: list[Call], k: int = 0) -> list[tuple[Call, torch.Tensor]]:
    """Return the calls whose ``k``-th hooked output reached the loss, with that gradient."""
    return [(c, c.grads[k]) for c in calls if len(c.grads) > k and c.grads[k] is not None]


def zeros(batch: int, device: Any) -> torch.Tensor:
    """float64 zeros ``(B,)``."""
    return torch.zeros(batch, dtype=torch.float64, device=device)


def materialized_ghost(
    per_sample: Callable[[slice], torch.Tensor],
    batch: int,
    numel: int,
    dirs: Directions,
    device: Any,
) -> ParamGhost:
    """Build a :class:`ParamGhost` from per-sample gradients materialized chunk by chunk.

    ``per_sample(s)`` returns the gradients of samples ``s`` as ``(n, numel)``.
    """
    sq = zeros(batch, device)
    total = None
    step = max(1, CHUNK_ELEMENTS // max(1, numel))
    for start in range(0, batch, step):
        s = slice(start, min(batch, start + step))
        G = per_sample(s).double()
        sq[s] = (G * G).sum(1)
        part = G.sum(0)
        total = part if total is None else total + part
    if total is None:
        return ParamGhost(sq, torch.zeros(dirs.u.shape[1], dtype=torch.float64, device=device))
    return ParamGhost(sq, dirs.of_tensor(total.reshape(dirs.Q, dirs.P)))
