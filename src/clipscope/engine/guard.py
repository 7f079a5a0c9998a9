"""Leave the model as found: :func:`model_guard`, the buffer hold, the dropout / BatchNorm policies.

A probe (or a Hessian-vector product, or any diagnostic) runs forwards and
backwards on a model that belongs to a training run. Those must not leak into
the run: BatchNorm forwards in train mode update running statistics, dropout
draws from the global RNG, a ``.backward()`` accumulates into ``.grad``, and a
policy switches modules between train and eval. :func:`model_guard` snapshots
all of that and restores it on exit, also on an exception.

Buffers a forward rewrites (DESIGN §5): train-mode ``spectral_norm`` (both
``torch.nn.utils.spectral_norm`` and ``torch.nn.utils.parametrizations.spectral_norm``)
runs a step of power iteration in every forward, writing the vectors it reads
(``weight_u``, ``_u``, ``_v``): evaluated one after another, each component
would see another state, and two evaluations of one component differ.
:class:`BufferHold` holds every buffer at its value at the start of a probe:
the engine restores whatever a forward wrote before the next evaluation, and
names what it restored (:attr:`BufferHold.written`). BatchNorm in train mode
writes running statistics it does not read in train mode: holding them changes
no output (and :func:`model_guard` restores them afterwards anyway).

Dropout policy (DESIGN §4: a component must give the same gradient every time
it is evaluated at the same parameters):

* ``"off"``: dropout modules are put in eval mode during the probe (BatchNorm
  and every other module keep their mode). Dropout a module in train mode
  applies itself (Hugging Face attention: ``dropout_p`` to
  ``scaled_dot_product_attention``, or ``F.dropout(..., training=self.training)``)
  is out of its reach: :func:`~clipscope.engine.losses.check_repeatable` refuses
  a forward that draws from torch's generators (:func:`rng_states`) under "off";
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
    "BufferHold",
    "batch_coupled_modules",
    "check_buffers_held",
    "check_dropout_policy",
    "component_seed",
    "dropout_modules",
    "dropout_policy",
    "model_guard",
    "rng_for_component",
    "rng_seeded",
    "rng_states",
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
    # (module, attribute, tensor): a module that replaces a buffer gets its own tensor back
    buffers = [
        (mod, attr, b)
        for mod in model.modules()
        for attr, b in mod._buffers.items()
        if b is not None
    ]
    saved_buffers = {id(b): b.detach().clone() for _, _, b in buffers}
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
            for mod, attr, b in buffers:
                mod._buffers[attr] = b
                b.copy_(saved_buffers[id(b)])
        for mod, flag in modes:
            mod.training = flag
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class BufferHold:
    """Hold a model's buffers at their current values: :meth:`restore` before every evaluation.

    Made at the start of a probe (or of one pass over the components), it keeps a
    copy of every buffer; :meth:`restore` puts back each buffer written since
    (detected by the tensor's version counter, which every in-place write
    increments, or by the module holding another tensor under that name) and
    adds its name to :attr:`written`. So every component is evaluated from the
    same buffers, whatever ran before it. Costs one copy of the buffers and, per
    :meth:`restore`, a look at each buffer's version (a copy only of those written).

    >>> m = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3))
    >>> hold = BufferHold(m)
    >>> u = m.parametrizations.weight[0]._u.clone()
    >>> _ = m(torch.randn(2, 3))  # train mode: one power-iteration step writes _u and _v
    >>> hold.restore(), torch.equal(m.parametrizations.weight[0]._u, u)
    (['parametrizations.weight.0._u', 'parametrizations.weight.0._v'], True)
    >>> hold.written
    ['parametrizations.weight.0._u', 'parametrizations.weight.0._v']
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
        self._slots: list[list[Any]] = []  # [name, module, attribute, tensor, version, copy]
        seen: set[int] = set()
        for mname, mod in model.named_modules():
            for attr, buf in mod._buffers.items():
                if buf is None or id(buf) in seen:
                    continue
                seen.add(id(buf))
                name = f"{mname}.{attr}" if mname else attr
                self._slots.append([name, mod, attr, buf, _version(buf), buf.detach().clone()])
        #: Names of the buffers a forward wrote (restored), in the order first seen.
        self.written: list[str] = []
        self._by_value: set[str] = set()  # written without a new version: restored always

    def restore(self, scan: bool = False) -> list[str]:
        """Put back every buffer written since the last call; return their names.

        A write is seen by the tensor's version counter, or by the module holding
        another tensor. A kernel may also write a buffer in place without a new
        version (BatchNorm's running statistics): ``scan=True`` compares every
        buffer's values too (once, after the first forward, is enough: a buffer
        found so is restored before every later evaluation).
        """
        changed = []
        with torch.no_grad():
            for slot in self._slots:
                name, mod, attr, buf, version, saved = slot
                now = mod._buffers.get(attr)
                written = now is not buf or name in self._by_value
                if not written:
                    if version is None or scan:  # (an inference tensor has no version)
                        written = not torch.equal(buf, saved)
                        if written and version is not None:
                            self._by_value.add(name)
                    else:
                        written = _version(buf) != version
                if not written:
                    continue
                if now is not buf:  # the module replaced its buffer: give it its own back
                    mod._buffers[attr] = buf
                buf.copy_(saved)
                slot[4] = _version(buf)
                changed.append(name)
                if name not in self.written:
                    self.written.append(name)
        return changed


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


def check_buffers_held(route: str, written: list[str]) -> None:
    """Refuse a route that cannot hold the buffers a forward writes (the per-sample route).

    The mini-batch routes evaluate every component from the probe-start buffers
    (:class:`BufferHold`). The per-sample route's forwards (the hooked chunk
    forwards, the batch-1 fallback and spot checks) are not held, so a forward
    that rewrites a buffer it reads would give each of them another state.

    Raises
    ------
    ValueError
        ``route`` is ``"per-sample"`` and ``written`` names a buffer.

    >>> check_buffers_held("two-pass", ["0.weight_u"])
    >>> check_buffers_held("per-sample", [])
    """
    if route == "per-sample" and written:
        raise ValueError(
            f"route='per-sample' needs buffers that the forward does not rewrite, but a forward "
            f"of the model wrote {written[:5]}{' …' if len(written) > 5 else ''} (e.g. "
            "train-mode spectral_norm's power iteration, which reads them again): each "
            "per-sample evaluation would see another state. Put those modules in eval mode, "
            "or use a mini-batch route (two-pass, keep, dyadic), which evaluates every "
            "component from the probe-start buffers"
        )


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
    with rng_seeded(component_seed(seed, i)):
        yield


@contextlib.contextmanager
def rng_seeded(seed: int) -> Iterator[None]:
    """Fork torch's global RNG (CPU, and the current CUDA device when in use) and seed it.

    The caller's RNG stream is untouched (``fork_rng`` restores it on exit).
    """
    devices = [torch.cuda.current_device()] if _cuda_in_use() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def rng_states() -> list[torch.Tensor]:
    """Return the states of torch's global generators: CPU, and every CUDA device when in use.

    Two snapshots differ exactly when something drew random numbers from them in
    between (a dropout mask, ``torch.rand``, SDPA with ``dropout_p > 0``: a CUDA
    state holds the Philox offset, which every draw advances).

    >>> before = rng_states(); _ = torch.rand(1)
    >>> [torch.equal(a, b) for a, b in zip(before, rng_states())][0]
    False
    """
    states = [torch.random.get_rng_state()]
    if _cuda_in_use():
        states.extend(torch.cuda.get_rng_state_all())
    return states
