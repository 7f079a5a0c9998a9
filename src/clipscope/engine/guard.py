"""Leave the model exactly as found: :func:`model_guard` and the dropout / BatchNorm policies.

A probe (or a Hessian-vector product, or any diagnostic) runs forwards and
backwards on a model that belongs to a training run. Those must not leak into
the run: BatchNorm forwards in train mode update running statistics, dropout
draws from the global RNG, a ``.backward()`` accumulates into ``.grad``, and a
policy switches modules between train and eval. :func:`model_guard` snapshots
all of that and restores it on exit, also on an exception.

Dropout policy (DESIGN §4: a component must give the same gradient every time
it is evaluated at the same parameters):

* ``"off"``: dropout modules are put in eval mode during the probe (BatchNorm
  and every other module keep their mode);
* ``"fixed"``: dropout stays as the model has it, and component ``i`` runs
  under ``torch.random.fork_rng`` seeded from ``(seed, i)``: the same masks for
  the same component at every evaluation, different masks across components.

**Contract with model code:** a module counts as dropout when it is an instance
of a torch dropout class (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
``FeatureAlphaDropout``), a torch module with built-in dropout
(``nn.MultiheadAttention`` with ``dropout > 0``: attention dropout;
``nn.LSTM``/``nn.GRU``/``nn.RNN`` with ``dropout > 0`` and several layers:
dropout between layers; in both only training mode draws masks), or has the
attribute ``clipscope_dropout = True``
(custom modules such as WeightDrop / LockedDropout / embedding dropout must set
it, and must draw their masks from torch's global RNG in ``forward`` and only
when ``self.training``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DROPOUT_POLICIES",
    "batch_coupled_modules",
    "check_dropout_policy",
    "component_seed",
    "dropout_modules",
    "dropout_policy",
    "model_guard",
    "rng_for_component",
]

DROPOUT_POLICIES = ("off", "fixed")

_TORCH_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Restore parameters, buffers, ``.grad``, train/eval flags and the global RNG on exit.

    Restored bitwise: every parameter's values (in place, so optimizer
    references stay valid), every buffer (BatchNorm ``running_mean``,
    ``running_var``, ``num_batches_tracked``), each parameter's ``.grad`` (the
    same tensor object, with its values, or ``None``), every module's
    ``training`` flag, and the global torch RNG state (CPU, and CUDA when
    CUDA is initialized). Costs one copy of parameters, gradients and buffers.

    >>> m = nn.BatchNorm1d(2)
    >>> before = m.running_mean.clone()
    >>> with model_guard(m):
    ...     _ = m(torch.randn(4, 2)); _ = m.eval()
    >>> torch.equal(m.running_mean, before), m.training
    (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    params = list(model.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    buffers = [b for b in model.buffers() if b is not None]
    saved_buffers = [b.detach().clone() for b in buffers]
    modes = [(mod, mod.training) for mod in model.modules()]
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if _cuda_in_use() else None
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved_params, strict=True):
                p.copy_(v)
            for p, (obj, values) in zip(params, saved_grads, strict=True):
                if obj is not None:
                    obj.copy_(values)
                p.grad = obj
            for b, v in zip(buffers, saved_buffers, strict=True):
                b.copy_(v)
        for mod, flag in modes:
            mod.training = flag
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that count as dropout (torch dropout classes, or ``clipscope_dropout = True``).

    >>> len(dropout_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))))
    1
    >>> len(dropout_modules(nn.LSTM(2, 2, num_layers=2, dropout=0.3)))  # between layers
    1
    """
    return [m for m in model.modules() if _is_dropout(m)]


def _is_dropout(m: nn.Module) -> bool:
    if isinstance(m, _TORCH_DROPOUT) or getattr(m, "clipscope_dropout", False) is True:
        return True
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    if isinstance(m, nn.RNNBase):
        return m.dropout > 0 and m.num_layers > 1
    return False


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Names of modules whose output couples the samples of a batch right now.

    A BatchNorm layer normalizes with the batch's statistics when it is in
    train mode or keeps no running statistics; then a sample's gradient
    depends on the other samples of its batch, so routes that merge or split
    batches (dyadic, per-sample) would change the answer.

    >>> batch_coupled_modules(nn.Sequential(nn.BatchNorm1d(2)))
    ['0']
    >>> batch_coupled_modules(nn.Sequential(nn.BatchNorm1d(2)).eval())
    []
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None
        ):
            out.append(name or type(m).__name__)
    return out


def check_dropout_policy(dropout: Any) -> str:
    """Validate a dropout policy name."""
    if dropout not in DROPOUT_POLICIES:
        raise ValueError(f"dropout must be one of {DROPOUT_POLICIES}, got {dropout!r}")
    return dropout


@contextlib.contextmanager
def dropout_policy(model: nn.Module, dropout: str) -> Iterator[None]:
    """Apply the dropout policy for the duration of the block (dropout modules' flags restored).

    ``"off"`` puts the dropout modules in eval mode; ``"fixed"`` changes no flag
    (the masks are fixed by :func:`rng_for_component`).
    """
    check_dropout_policy(dropout)
    mods = dropout_modules(model) if dropout == "off" else []
    flags = [m.training for m in mods]
    try:
        for m in mods:
            m.train(False)
        yield
    finally:
        for m, flag in zip(mods, flags, strict=True):
            m.train(flag)


def component_seed(seed: int, i: int) -> int:
    """Return a 63-bit seed for component ``i`` derived from ``(seed, i)`` (numpy ``SeedSequence``).

    >>> component_seed(0, 1) == component_seed(0, 1) != component_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def rng_for_component(dropout: str, seed: int, i: int) -> Iterator[None]:
    """Under ``"fixed"``: fork the global RNG and seed it from ``(seed, i)``; else do nothing.

    The caller's RNG stream is untouched either way (``fork_rng`` restores it).
    """
    if dropout != "fixed":
        yield
        return
    devices = [torch.cuda.current_device()] if _cuda_in_use() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(component_seed(seed, i))
        yield
