"""The interface every layer family implements, and the registry of families.

A **layer family** (one module per family, like Opacus' one grad-sampler per
layer type) owns three things for the module types it covers:

1. its **preconditions** -- :meth:`LayerFamily.claims` (the module types and
   options its formulas cover, checked once when the probe is planned) and
   :meth:`LayerFamily.precondition` (the module's current state, e.g. train
   mode);
2. what it **records** from each call -- :meth:`LayerFamily.record` keeps the
   inputs it needs (detached) and names the outputs whose gradients it needs;
   the ghost pass fills those gradients (``b = ∂(Σ_k ℓ_k)/∂output``) during its
   one backward;
3. its **rules**, pure functions of the recorded calls:
   :meth:`LayerFamily.per_sample` gives, per parameter, the per-sample squared
   norms ``‖g_j(p)‖²`` and the projection of the batch gradient the rule
   accounts for on the structural-check directions; :meth:`LayerFamily.dots`
   gives ``⟨g_j(θ_mod), v⟩`` for a vector ``v`` given per parameter.

Nothing in a rule depends on when it runs: a route that keeps the recorded
calls of pass 1 (issue 13's factor-keeping route) can call ``dots`` once ∇f
is known, without a second forward. The ghost pass verifies every rule's
result (:mod:`clipscope.engine.verify`); a family never has to be trusted.

A rule that meets something it cannot handle at run time (samples not on
dim 0, a packed sequence, a re-run that does not reproduce the batch) raises
:class:`Unsupported` with a reason, or sets :attr:`Call.problem` from a hook;
the parameters then go to an exact fallback, visibly.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Base class: the preconditions, records and rules of one family of layers.

    Subclasses set :attr:`name` and :attr:`module_types` and implement
    :meth:`per_sample` and :meth:`dots`; most keep the default
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
        """Attributes of ``mod`` holding the parameters the rules compute."""
        return tuple(
            n for n in ("weight", "bias") if isinstance(getattr(mod, n, None), nn.Parameter)
        )

    def precondition(self, mod: nn.Module) -> str | None:
        """Why the rules cannot serve ``mod`` in its current state, or ``None``."""
        return None

    def before(self, mod: nn.Module) -> Any:
        """Run in a forward pre-hook; the return value reaches :meth:`record` as ``before``."""
        return None

    def record(
        self, mod: nn.Module, args: tuple, output: Any, batch: int, before: Any = None
    ) -> tuple[Call, list[torch.Tensor]]:
        """Keep what the rules need from one call; return the call and the outputs to hook."""
        return single_input_record(mod, args, output, batch)

    def per_sample(
        self,
        mod: nn.Module,
        calls: list[Call],
        names: list[str],
        batch: int,
        dirs: dict[str, Directions],
    ) -> dict[str, ParamGhost]:
        """Per-sample squared norms and batch-gradient projections of ``mod``'s ``names``."""
        raise NotImplementedError

    def dots(
        self,
        mod: nn.Module,
        calls: list[Call],
        names: list[str],
        vectors: dict[str, torch.Tensor],
        batch: int,
    ) -> torch.Tensor:
        """``⟨g_j, v⟩`` over ``mod``'s ``names`` for every sample, float64 ``(B,)``."""
        raise NotImplementedError

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
