"""What the ghost pass records during the batch forward, for the rules to read.

:class:`ModuleRecorder` hooks the modules a module rule serves
(:meth:`~clipscope.engine.per_sample.family.LayerFamily.record`): each call of
such a module becomes a :class:`~clipscope.engine.per_sample.family.Call`, and
a tensor hook on each output it names fills in that output's gradient
``b = ∂(Σ_k ℓ_k)/∂output`` during the one backward.

A recorder has three parts the ghost pass relies on: ``calls`` (what the rules
read), ``outputs`` (what a backward w.r.t. the layer outputs differentiates) and
``remove()``. A recorder for rules matched by how a *parameter is used* (a
``torch.overrides.TorchFunctionMode`` seeing ``F.linear``, a broadcast add or
``F.layer_norm`` during the same forward; see
:meth:`~clipscope.engine.per_sample.registry.RuleRegistry.use_rules`) belongs
beside this one, with the same three parts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from clipscope.engine.per_sample.family import Call, LayerFamily

__all__ = ["ModuleRecorder"]


def _store(slots: list, k: int, g: torch.Tensor) -> None:
    slots[k] = g.detach()


class ModuleRecorder:
    """Forward (pre-)hooks that keep each call of the served modules for their rules.

    Parameters
    ----------
    modules : sequence of ``(name, module, rule, attributes)``
        What :meth:`Plan.ghost_modules` returns: each module is hooked for its rule.
    batch : int
        The batch size B (a rule refuses a call without the samples on dim 0).
    index : dict, optional
        ``{id(parameter): index}``: with it the recorder keeps, while a served
        module runs, the indices of the parameters its rule serves (:meth:`owned`,
        which the use recorder skips), and leaves out a call none of whose tensor
        arguments is data (``is_data``, set by the use recorder): such a call
        (``wpe(arange(T))``) computes from parameters and constants only, and the
        use recorder follows its output to where it meets the samples.

    Attributes
    ----------
    calls : dict
        ``{id(module): [Call, ...]}``, one :class:`Call` per forward call, in call
        order; each call's ``grads`` are filled by tensor hooks during the backward.
    outputs : list
        ``(hooked output, its version)``: the tensors a backward w.r.t. the layer
        outputs only differentiates (:func:`~clipscope.engine.per_sample.ghost.ghost_pass`).
    """

    def __init__(
        self, modules: Sequence[tuple], batch: int, index: dict[int, int] | None = None
    ) -> None:
        self.batch = batch
        self.calls: dict[int, list[Call]] = {id(m): [] for _, m, _, _ in modules}
        self.outputs: list[tuple[torch.Tensor, int]] = []  # (hooked output, its version)
        self._before: dict[int, list[Any]] = {id(m): [] for _, m, _, _ in modules}
        self.is_data: Callable[[torch.Tensor], bool] | None = None
        self._serves: dict[int, frozenset[int]] = {}
        self._running: list[frozenset[int]] = []
        if index is not None:
            for _, mod, _, attrs in modules:
                self._serves[id(mod)] = frozenset(index[id(mod.get_parameter(a))] for a in attrs)
        self.handles = []
        # each rule's recording context (LayerFamily.recording), held until remove()
        self._recording = contextlib.ExitStack()
        try:
            for _, mod, fam, _ in modules:
                self._recording.enter_context(fam.recording(mod))
                if type(fam).before is not LayerFamily.before or index is not None:
                    self.handles.append(
                        mod.register_forward_pre_hook(functools.partial(self._pre, fam))
                    )
                self.handles.append(mod.register_forward_hook(functools.partial(self._post, fam)))
        except BaseException:
            self.remove()
            raise

    def owned(self) -> frozenset[int]:
        """Return the indices of the parameters the rules of the modules running now serve."""
        return frozenset().union(*self._running) if self._running else frozenset()

    def _pre(self, fam: Any, mod: nn.Module, args: tuple) -> None:
        if type(fam).before is not LayerFamily.before:
            self._before[id(mod)].append(fam.before(mod))
        if self._serves:
            self._running.append(self._serves[id(mod)])

    def _post(self, fam: Any, mod: nn.Module, args: tuple, output: Any) -> None:
        stack = self._before[id(mod)]
        before = stack.pop() if stack else None
        if self._serves and self._running:
            self._running.pop()
        if self.is_data is not None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and not any(self.is_data(a) for a in tensors):
                return  # parameters and constants only: the use recorder follows the output
        try:
            call, outs = fam.record(mod, args, output, self.batch, before)
        except Exception as exc:  # a hook must not break the user's forward
            call, outs = Call(problem=f"recording the call failed: {exc}"), []
        # the slot list is referenced by the tensor hooks only: output -> grad_fn ->
        # hook -> slot never points back at the output (a cycle through C++ that
        # Python's garbage collector could not free)
        self.calls[id(mod)].append(call)
        for k, t in enumerate(outs):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(functools.partial(_store, call.grads, k))
                self.outputs.append((t, t._version))

    def remove(self) -> list[tuple[torch.Tensor, int]]:
        """Remove the hooks, exit the rules' recording contexts; return the hooked outputs."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self._recording.close()
        outputs, self.outputs = self.outputs, []
        return outputs
