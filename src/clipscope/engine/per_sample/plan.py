"""Which rule serves which parameter, and everything that happened to that choice.

A :class:`Plan` is made once per per-sample probe. For every module that
registers a wanted parameter it asks the rules of the registry
(:meth:`~clipscope.engine.per_sample.registry.RuleRegistry.module_rules`), in
order, whether they claim the module and whether its preconditions hold; the
first that does serves the parameters it names. A rule may name parameters
registered on a child module (dotted names from :meth:`LayerFamily.param_names`,
resolved by ``mod.get_parameter``): they are served with the module that uses
them, and the child is not asked again (the ``nn.MultiheadAttention`` rule
serves ``out_proj.weight`` this way). A parameter registered in several
modules (a tied weight) is served by the rule of each, and the per-sample
gradients of its uses are summed with their cross terms
(:mod:`~clipscope.engine.per_sample.summed`). Two kinds of parameter go to
the exact fallback at once, with the reason: a gradient torch defines per
batch (a rule's ``batch1`` hook: ``scale_grad_by_freq``) and a module a rule
excludes (its ``excludes`` hook: the children of a refused
``nn.MultiheadAttention``, which reads ``out_proj.weight`` without calling
``out_proj``). A parameter no module rule serves (a bare ``nn.Parameter``, a
module without a rule) is left to its **uses** (:attr:`Plan.by_use`;
:mod:`~clipscope.engine.per_sample.uses`): the first recorded forward either
serves every use it makes or names the one it cannot, and then it goes to the
fallback with both reasons. The planner names no layer: every such decision
comes from a rule file. During
the probe the checks of
:mod:`clipscope.engine.verify` move more parameters to the fallback
(:meth:`Plan.demote`); each move is an :class:`Event`, warned about as a
:class:`~clipscope.engine.verify.PerSampleFallbackWarning` (or raised as a
:class:`~clipscope.engine.verify.VerificationError` under ``strict``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clipscope.engine.losses import trainable_params
from clipscope.engine.per_sample._common import Directions
from clipscope.engine.per_sample.family import LayerFamily
from clipscope.engine.per_sample.registry import registry
from clipscope.engine.verify import PerSampleFallbackWarning, VerificationError

__all__ = ["VERIFICATION_STAGES", "Event", "Plan", "unchecked_for_benchmarks"]

_UNCHECKED = False


@contextlib.contextmanager
def unchecked_for_benchmarks() -> Iterator[None]:
    """Plans made in the block skip the structural check: for measuring what it costs.

    Inside, the ghost pass differentiates w.r.t. the recorded layer outputs
    only (autograd never forms the served layers' weight gradients), takes the
    batch gradient from the rules (:meth:`LayerFamily.batch_grad`) and compares
    nothing. ``bench/engine.py`` times the per-sample route with and without
    the checks this way; nothing else may use it.
    """
    global _UNCHECKED
    previous, _UNCHECKED = _UNCHECKED, True
    try:
        yield
    finally:
        _UNCHECKED = previous


#: Stages whose events are failed checks (``strict=True`` raises on them).
VERIFICATION_STAGES = ("structural", "spot-norm", "spot-dot")


@dataclass(frozen=True)
class Event:
    """Parameters (or the dots) moved to an exact fallback, when and why."""

    # "plan", "record", "rule", "use", "structural", "spot-norm", "spot-dot", "jvp", "ghost"
    stage: str
    params: tuple[str, ...]
    reason: str

    def message(self) -> str:
        """One line for a warning or an error."""
        what = ", ".join(self.params) if self.params else "per-sample dots"
        return f"per-sample route: {what} -> exact fallback [{self.stage}]: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record."""
        return {"stage": self.stage, "params": list(self.params), "reason": self.reason}


def _no_rule(mod, attr, excluded, family, why) -> str | None:
    """Why no rule serves ``mod.attr`` (an exclusion, no rule, not its parameter), or None."""
    if excluded is not None:
        return excluded
    if family is None:
        return f"no per-sample rule for {type(mod).__name__}" + (f" ({why})" if why else "")
    if attr not in family.param_names(mod):
        return f"no per-sample rule for parameter {attr!r} of {type(mod).__name__}"
    return None


def _names(model: nn.Module, params: list[torch.Tensor]) -> list[str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    missing = [k for k, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the model")
    return [names[id(p)] for p in params]


class Plan:
    """The per-parameter choice of rule or fallback for one per-sample probe.

    Parameters
    ----------
    model : nn.Module
    params : iterable of Tensor, optional
        Default: every trainable parameter (a tied one once).
    seed : int
        Seeds the structural check's directions.
    directions : int
        Random rank-one test matrices per parameter (``k``).
    strict : bool
        Raise :class:`~clipscope.engine.verify.VerificationError` on a failed check.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[torch.Tensor] | None = None,
        *,
        seed: int = 0,
        directions: int = 2,
        strict: bool = False,
    ) -> None:
        self.model = model
        self.params = trainable_params(model, params)
        self.names = _names(model, self.params)
        self.index = {id(p): k for k, p in enumerate(self.params)}
        self.strict = bool(strict)
        self.unchecked = _UNCHECKED
        self.k = 0 if self.unchecked else int(directions)
        self.events: list[Event] = []
        self.fallback: dict[int, str] = {}  # param index -> reason
        self.batch1: set[int] = set()  # param indices defined by batch-1 backward passes only
        self.dots_fallback: str | None = None  # why every dot comes from per-sample gradients
        self.vmap_failed = False
        self.modules: list[tuple[str, nn.Module, LayerFamily, list[str]]] = []
        # parameters no module rule serves, each with why: their uses decide (uses.py)
        self.by_use: dict[int, str] = {}
        # parameters served by the sum of several rules (module and use rules), which ones
        self.served_by: dict[int, list[str]] = {}
        self.structural_checks = 0
        self.structural_max_error = 0.0
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        self.directions = [Directions(p.shape, self.k, gen, p.device) for p in self.params]
        self._plan()

    # -- planning ------------------------------------------------------------
    def _plan(self) -> None:
        excluded = registry.excluded(self.model)
        planned: dict[str, list[str]] = {}
        through: set[int] = set()  # parameters a rule serves through a module above theirs
        for mname, mod in self.model.named_modules():
            own = {
                attr: p
                for attr, p in mod._parameters.items()
                if p is not None and id(p) in self.index and id(p) not in through
            }
            b1 = registry.batch1(mod)
            family, why = None, None
            if b1 is None and id(mod) not in excluded:
                family, why = registry.rule_for(mod)
            if family is not None:  # a child's parameters the rule serves (dotted names)
                for attr in family.param_names(mod):
                    p = mod.get_parameter(attr) if "." in attr else None
                    if p is not None and id(p) in self.index and id(p) not in through:
                        own[attr] = p
            if not own:
                continue
            covered = []
            for attr, p in own.items():
                k = self.index[id(p)]
                if k in self.fallback:  # a tied weight met again, after a batch-1 module
                    continue
                if b1 is not None:
                    reason = f"{type(mod).__name__}({b1})"
                    self.batch1.add(k)
                elif id(mod) in excluded:
                    reason = excluded[id(mod)]
                else:
                    why_not = _no_rule(mod, attr, None, family, why)
                    if why_not is None:
                        covered.append(attr)
                        if "." in attr:
                            through.add(id(p))
                    else:  # a bare parameter, a module without a rule: its uses may serve it
                        self.by_use.setdefault(k, why_not)
                    continue
                self.fallback[k] = reason
                self.by_use.pop(k, None)
                planned.setdefault(reason, []).append(self.names[k])
            if covered:
                self.modules.append((mname, mod, family, covered))
        # a weight registered in several modules (tied) is served by each of their rules and
        # its uses elsewhere, summed with their cross terms (summed.py)
        for k in set(self.by_use) & self._covered():
            self.by_use.pop(k)
        for reason, names in planned.items():
            self._event(Event("plan", tuple(names), reason))

    def _covered(self) -> set[int]:
        return {
            self.index[id(mod.get_parameter(a))] for _, mod, _, attrs in self.modules for a in attrs
        }

    # -- state -----------------------------------------------------------------
    def ghost_modules(self) -> list[tuple[str, nn.Module, LayerFamily, list[str]]]:
        """Return the modules a rule still serves, with the attributes not moved to the fallback."""
        out = []
        for mname, mod, fam, attrs in self.modules:
            left = [a for a in attrs if self.index[id(mod.get_parameter(a))] not in self.fallback]
            if left:
                out.append((mname, mod, fam, left))
        return out

    def tracked(self) -> set[int]:
        """Parameters not on the fallback: the use recorder follows them outside module rules."""
        return {k for k in range(len(self.params)) if k not in self.fallback}

    def demote(
        self, indices: Iterable[int], stage: str, reason: str, own: dict[int, str] | None = None
    ) -> None:
        """Move parameters to the fallback after a failed check (raises under ``strict``).

        One event with ``reason``; each parameter's recorded reason is its own
        entry of ``own`` where given, else ``reason``.
        """
        new = [k for k in indices if k not in self.fallback]
        if not new:
            return
        for k in new:
            self.fallback[k] = (own or {}).get(k, reason)
        self._event(Event(stage, tuple(self.names[k] for k in new), reason))

    def demote_dots(self, stage: str, reason: str) -> None:
        """Take every per-sample dot from per-sample gradients from now on."""
        if self.dots_fallback is None:
            self.dots_fallback = reason
            self._event(Event(stage, (), reason))

    def _event(self, event: Event) -> None:
        if self.strict and event.stage in VERIFICATION_STAGES:
            raise VerificationError(event.message() + " (strict=True)")
        self.events.append(event)
        warnings.warn(event.message(), PerSampleFallbackWarning, stacklevel=2)

    def note_structural(self, error: float) -> None:
        """Count one passed structural comparison and keep the largest relative error."""
        self.structural_checks += 1
        self.structural_max_error = max(self.structural_max_error, error)

    @property
    def used_fallback(self) -> bool:
        """Whether any parameter or the dots came from the fallback."""
        return bool(self.fallback) or self.dots_fallback is not None

    def record(self) -> dict[str, Any]:
        """JSON-safe summary: the rules used, the fallbacks and the structural checks."""
        return {
            "rules": {
                mname or type(mod).__name__: fam.name for mname, mod, fam, _ in self.ghost_modules()
            },
            "fallback": {self.names[k]: reason for k, reason in sorted(self.fallback.items())},
            "uses": {
                self.names[k]: rules
                for k, rules in sorted(self.served_by.items())
                if k not in self.fallback
            },
            "dots_fallback": self.dots_fallback,
            "events": [e.to_dict() for e in self.events],
            "structural_checks": self.structural_checks,
            "structural_max_error": self.structural_max_error,
            "directions": self.k,
        }
