"""The open registry of per-sample rules: each layer family is one file that registers itself.

A **module rule** is a :class:`~clipscope.engine.per_sample.family.LayerFamily`
subclass, registered by a class decorator that names the module types it
claims (like Opacus' ``@register_grad_sampler(nn.Linear)``)::

    @register_module_rule(nn.Linear)
    class LinearFamily(LayerFamily):
        name = "linear"
        ...

Without types the rule claims by its own :meth:`LayerFamily.claims` predicate.
Importing :mod:`clipscope.engine.per_sample` imports every built-in rule file,
so they are registered before any :class:`~clipscope.engine.per_sample.plan.Plan`
is made; a user registers a rule of their own the same way, from their code,
before probing (``docs/engine.md``, "How to add a layer rule").

**Order.** :class:`~clipscope.engine.per_sample.plan.Plan` asks the rules of
:meth:`RuleRegistry.module_rules` in order -- ascending ``order``, then the
order of registration -- and the first that claims a module and whose
:meth:`LayerFamily.precondition` holds serves it. ``order`` matters only where
two rules claim the same module: the generic recurrent loop (``rnn-loop``,
every ``nn.RNNBase``) registers with ``order=100`` so that the LSTM ghost rule
(``order=0``) is asked first; a user rule that should take a module type over
from a built-in one registers with a negative ``order``.

**Hooks a rule file provides besides its claim**, asked of every registered
rule for every module of the model, whether it claims the module or not:

* :meth:`LayerFamily.batch1` -- the module's gradient is defined per batch
  (``Embedding(scale_grad_by_freq=True)`` divides by the batch's token
  counts): its parameters take batch-1 passes;
* :meth:`LayerFamily.excludes` -- modules no rule may serve, with the reason
  (the children of ``nn.MultiheadAttention``, whose weights it reads without
  calling them).

The planner only iterates the registry; it never names a layer.

**Use rules** (:meth:`RuleRegistry.use_rules`): the second kind of entry,
rules matched by how a *parameter is used* -- a torch function such as
``F.linear``, a broadcast add or multiply, ``F.layer_norm`` -- seen during the
recorded forward by :class:`~clipscope.engine.per_sample.uses.UseRecorder` (a
``torch.overrides.TorchFunctionMode`` beside
:class:`~clipscope.engine.per_sample.recorder.ModuleRecorder`). A use rule is
a :class:`~clipscope.engine.per_sample.uses.UseRule` registered for the torch
functions it serves with :func:`~clipscope.engine.per_sample.uses.register_use_rule`
(:meth:`RuleRegistry.register_use`); the built-in ones live in ``uses.py``.

**Isolation.** :meth:`RuleRegistry.scoped` restores the registry on exit (a
test that registers a rule must not leak it into others);
:meth:`RuleRegistry.unregister` removes one rule.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn

from clipscope.engine.per_sample.family import LayerFamily

__all__ = ["FAMILIES", "RuleRegistry", "register_module_rule", "registry"]

_R = TypeVar("_R", bound=type)


@dataclass(frozen=True)
class _Entry:
    order: int
    seq: int
    rule: LayerFamily


class RuleRegistry:
    """The per-sample rules, looked up by the planner.

    Examples
    --------
    >>> from clipscope.engine.per_sample import registry
    >>> [rule.name for rule in registry.module_rules()][-2:]  # the LSTM ghost first
    ['lstm', 'rnn-loop']
    >>> import torch.nn.functional as F
    >>> registry.use_rules()[F.linear].name  # a weight read by F.linear outside nn.Linear
    'linear'
    """

    def __init__(self) -> None:
        self._module: list[_Entry] = []
        self._use: dict[Callable, Any] = {}
        self._seq = itertools.count()

    # -- registering -------------------------------------------------------------
    def register(self, rule: LayerFamily, *, order: int = 0) -> LayerFamily:
        """Register a module rule instance; return it.

        Raises ``TypeError`` for an object that is not a :class:`LayerFamily`,
        ``ValueError`` for a name already registered (:meth:`unregister` it first).
        """
        if not isinstance(rule, LayerFamily):
            raise TypeError(f"a module rule must be a LayerFamily instance, got {type(rule)!r}")
        if isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(f"order must be an int, got {order!r}")
        if any(e.rule.name == rule.name for e in self._module):
            raise ValueError(
                f"a per-sample rule named {rule.name!r} is registered already; "
                "unregister it first (registry.unregister(name))"
            )
        self._module.append(_Entry(order, next(self._seq), rule))
        self._module.sort(key=lambda e: (e.order, e.seq))
        return rule

    def module_rule(self, *types: type, order: int = 0) -> Callable[[_R], _R]:
        """Class decorator: register an instance of the class as a module rule.

        ``types``: the module types it claims (subclasses included; they become
        the class's ``module_types``). None: the class's own ``module_types`` or
        :meth:`LayerFamily.claims`. ``order``: see the module docstring.
        """
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"module rules claim nn.Module subclasses, got {types!r}")

        def decorate(cls: _R) -> _R:
            if not (isinstance(cls, type) and issubclass(cls, LayerFamily)):
                raise TypeError(
                    f"@register_module_rule decorates LayerFamily subclasses, not {cls!r}"
                )
            if types:
                cls.module_types = tuple(types)
            self.register(cls(), order=order)
            return cls

        return decorate

    def register_use(self, rule: Any, functions: Sequence[Callable]) -> Any:
        """Serve the uses of a parameter through ``functions`` by ``rule``; return it.

        A later registration for the same function replaces the earlier one.
        """
        if not functions:
            raise ValueError("a use rule names the torch functions it serves")
        for fn in functions:
            self._use[fn] = rule
        return rule

    def unregister(self, rule: LayerFamily | type | str) -> None:
        """Remove a rule given as its instance, its class or its name (``KeyError`` if absent)."""
        keep = [e for e in self._module if not _matches(e.rule, rule)]
        if len(keep) == len(self._module):
            raise KeyError(f"no per-sample rule {rule!r} is registered")
        self._module = keep

    @contextlib.contextmanager
    def scoped(self) -> Iterator[RuleRegistry]:
        """Register and unregister freely in the block; the registry is restored on exit."""
        module, use = list(self._module), dict(self._use)
        try:
            yield self
        finally:
            self._module, self._use = module, use

    # -- looking up ----------------------------------------------------------------
    def module_rules(self) -> tuple[LayerFamily, ...]:
        """Return the module rules in the order the planner asks them."""
        return tuple(e.rule for e in self._module)

    def use_rules(self) -> Mapping[Callable, Any]:
        """Return the use rules, ``{torch function: rule}`` (read-only).

        Rules matched by how a parameter is used (``F.linear``, broadcast
        ``torch.add``/``torch.mul``, ``F.layer_norm``, ...): the use recorder asks
        it for the rule of each torch function it sees a parameter pass through.
        """
        return MappingProxyType(self._use)

    def rule_for(self, mod: nn.Module) -> tuple[LayerFamily | None, str | None]:
        """Return ``(the rule serving mod, None)`` or ``(None, why the last claimant refused)``."""
        why = None
        for rule in self.module_rules():
            if rule.claims(mod):
                why = rule.precondition(mod)
                if why is None:
                    return rule, None
        return None, why

    def batch1(self, mod: nn.Module) -> str | None:
        """Why ``mod``'s gradient is defined only by batch-1 backward passes, or None."""
        for rule in self.module_rules():
            reason = rule.batch1(mod)
            if reason is not None:
                return reason
        return None

    def excluded(self, model: nn.Module) -> dict[int, str]:
        """``{id(module): reason}`` for the modules of ``model`` that no rule may serve."""
        out: dict[int, str] = {}
        rules = self.module_rules()
        for mod in model.modules():
            for rule in rules:
                for child, reason in rule.excludes(mod).items():
                    out.setdefault(id(child), reason)
        return out


def _matches(rule: LayerFamily, key: LayerFamily | type | str) -> bool:
    if isinstance(key, str):
        return rule.name == key
    if isinstance(key, type):
        return type(rule) is key
    return rule is key


class _LiveRules(Sequence):
    """A read-only view of :meth:`RuleRegistry.module_rules`, always current."""

    def __init__(self, of: RuleRegistry) -> None:
        self._of = of

    def __getitem__(self, i):
        return self._of.module_rules()[i]

    def __len__(self) -> int:
        return len(self._of.module_rules())

    def __repr__(self) -> str:
        return f"FAMILIES{self._of.module_rules()!r}"


#: The registry :class:`~clipscope.engine.per_sample.plan.Plan` looks rules up in.
registry = RuleRegistry()

#: The registered module rules in order (a live view of ``registry.module_rules()``).
FAMILIES: Sequence[LayerFamily] = _LiveRules(registry)


def register_module_rule(*types: type, order: int = 0) -> Callable[[_R], _R]:
    """Class decorator: register the rule class in :data:`registry` (``registry.module_rule``).

    >>> from torch import nn
    >>> from clipscope.engine.per_sample import LayerFamily, registry
    >>> with registry.scoped():
    ...     @register_module_rule(nn.PReLU)
    ...     class PReLURule(LayerFamily):
    ...         name = "prelu"
    ...     registry.rule_for(nn.PReLU())[0].name
    'prelu'
    >>> registry.rule_for(nn.PReLU())  # gone after the block
    (None, None)
    """
    return registry.module_rule(*types, order=order)
