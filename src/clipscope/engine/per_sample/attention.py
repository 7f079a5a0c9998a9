r"""``nn.MultiheadAttention``: its projections' per-sample gradients, read inside the call.

``nn.MultiheadAttention.forward`` calls ``F.multi_head_attention_forward`` with
its parameters -- the packed ``in_proj_weight``/``in_proj_bias`` (or
``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ), ``bias_k``/``bias_v``,
and ``out_proj.weight``/``out_proj.bias`` of a child module it never calls.
Every parameter enters the function through one of two ops:

* a **projection** ``F.linear(x, W', b')`` with ``W'`` the whole weight or a
  block of its rows (``in_proj_weight.split``/``.chunk`` for cross-attention
  and separate inputs): sample n's gradient of those rows is
  ``Σ_t b_{nt} x_{nt}ᵀ`` (and ``Σ_t b_{nt}`` for the bias rows), the Linear
  formulas (:mod:`~clipscope.engine.per_sample.linear`), with ``b`` the
  gradient of the summed loss w.r.t. that projection's output;
* ``bias_k.repeat(1, N, 1)`` (``add_bias_kv``), concatenated to the keys:
  sample n's gradient is the gradient of the repeated tensor at ``[0, n]``.

``add_zero_attn``, the masks (``key_padding_mask``, ``attn_mask``,
``is_causal``), ``need_weights`` and ``average_attn_weights`` only change the
attention between the projections, which has no parameter: the recorded
``b`` already carries them. So does attention dropout (train mode with
``dropout > 0`` under the ``"fixed"`` policy): its mask is applied to each
sample's own attention weights in the batch forward, and ``b`` is the gradient
through those masks -- the component the ``"fixed"`` policy defines.

Inside the function everything is sequence-first: the module transposes
``batch_first`` inputs before the call, so the in-projection inputs are
``(L, N, E)`` with sample n's tokens at ``[:, n]``, and the out-projection
input is ``(L·N, E)`` with row ``l·N + n``. The sample axis is the module's
batch axis, whatever ``batch_first`` says; a call whose batch axis does not
hold the probe's B samples (or an unbatched call) is refused, visibly. A
model that puts its samples on the attention's sequence axis couples them (the
attention mixes them), which no per-sample rule serves: with ``T = B`` the
shapes cannot tell, and the spot check finds it (``tests/test_per_sample_zoo.py``).

**Seeing inside.** The module's ``forward`` is wrapped for the recorded
forward (:meth:`MultiheadAttentionFamily.recording`) to run under a
``torch.overrides.TorchFunctionMode``. To such a mode
``F.multi_head_attention_forward`` is one opaque call; the mode runs instead
a copy of the function whose ``has_torch_function`` is ``False``, under
itself, and so sees every call inside (the projections, ``split``/``chunk``,
``repeat``, ``cat``, attention). Each call is passed on unchanged
(``func(*args, **kwargs)``: a mode beneath sees it too); the output is
bitwise the plain call's. Checks beside it: the copy must not dispatch again
(another torch version), and no parameter may be used by any call other than
a projection, a view (``split``/``chunk``) or ``repeat`` -- otherwise the
call is refused and the parameters take the exact fallback with the reason.
What is missed despite this shows in the structural check.

The packed ``in_proj_weight`` is served as disjoint blocks of rows, one per
distinct projection (all of it for packed self-attention, ``q | k, v`` for
``key is value``, ``q | k | v`` otherwise; two calls that slice it
differently are refined to common blocks): ``‖g_n‖²`` adds over the blocks,
dots and γ-weighted sums are formed per block, and the structural check
projects each block on its rows of the directions (:class:`RowBlocks`).
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from clipscope.engine.per_sample._common import (
    Directions,
    cat_tokens,
    gram_sq_norm,
    per_sample_matrices,
    sq_sum,
    sum64,
    up,
)
from clipscope.engine.per_sample.factors import (
    Factors,
    Joined,
    Rows,
    Tokens,
    Zero,
    storage_bytes,
    token_dots,
)
from clipscope.engine.per_sample.family import Call, LayerFamily, Unsupported
from clipscope.engine.per_sample.registry import register_module_rule

__all__ = ["MultiheadAttentionFamily", "RowBlocks"]

_OWN = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_KV_BIAS = ("bias_k", "bias_v")
_CHILD = ("out_proj.weight", "out_proj.bias")
# ops that take views of a parameter (its blocks of rows) before the projections; each
# output must share the parameter's storage (a copy would hide the use that follows)
_VIEWS = (
    torch.Tensor.split,
    torch.Tensor.chunk,
    torch.Tensor.narrow,
    torch.Tensor.__getitem__,
    torch.split,
    torch.chunk,
    torch.narrow,
)
_INSIDE_ATTENTION = (
    "nn.MultiheadAttention uses its projections' weights without calling them as modules"
)


# ----------------------------------------------------------------------------- seeing inside


def _never(*args: Any, **kwargs: Any) -> bool:
    return False


def _opened(func: Any) -> types.FunctionType | None:
    """Return a copy of ``func`` that does not hand itself to torch-function modes, or None.

    Built at every call from the live module globals (a user's patch of
    ``torch.nn.functional`` is seen as the plain call would see it).
    """
    code = getattr(func, "__code__", None)
    glob = getattr(func, "__globals__", None)
    if code is None or glob is None or "has_torch_function" not in code.co_names:
        return None
    g = dict(glob)
    g["has_torch_function"] = _never
    clone = types.FunctionType(code, g, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


@dataclass
class _Piece:
    """One use of the parameters inside the call: a projection or a ``repeat``."""

    weight: tuple[str, slice] | None  # (parameter name, its rows) of a projection's weight
    bias: tuple[str, slice] | None  # the same for its bias, or the repeated bias_k / bias_v
    a: torch.Tensor | None  # the projection's input, (N, T, P) sample-major, detached
    layout: str  # the output: "seq" (L, N, Q), "rows" (L·N, Q) or "repeat" (1, N, E)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _Capture(TorchFunctionMode):
    """The uses of one module's parameters inside its ``F.multi_head_attention_forward``.

    Changes nothing: every call is passed on as it came; the bookkeeping runs
    with torch functions disabled (a mode beneath sees only the model's calls).
    """

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        with torch._C.DisableTorchFunction():
            self.params = {
                n: (p, p.untyped_storage().data_ptr(), p.storage_offset())
                for n, p in params.items()
            }
        self.storages = {s for _, s, _ in self.params.values()}
        self.opened = False
        self.inside = False
        self.problem: str | None = None
        self.shape: tuple[int, ...] = ()
        self.pieces: list[_Piece] = []
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            if self.opened:  # the copy dispatched again, or a second call: see nothing more
                self._refuse(
                    "F.multi_head_attention_forward could not be opened (it dispatched again: "
                    "another torch version?)"
                )
                return func(*args, **kwargs)
            clone = _opened(func)
            if clone is None:
                self._refuse("F.multi_head_attention_forward is not a plain Python function here")
                return func(*args, **kwargs)
            self.opened = self.inside = True
            with torch._C.DisableTorchFunction():
                query = args[0] if args else kwargs["query"]
                self.shape = tuple(query.shape)
            try:
                with self:
                    return clone(*args, **kwargs)
            finally:
                self.inside = False
        out = func(*args, **kwargs)
        if self.inside and self.problem is None:
            with torch._C.DisableTorchFunction():
                self._see(func, args, kwargs, out)
        return out

    def _refuse(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason

    def _owner(self, t: Any) -> str | None:
        """Return the served parameter whose storage ``t`` shares, or None."""
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() not in self.storages:
            return None
        ptr = t.untyped_storage().data_ptr()
        return next(n for n, (_, s, _) in self.params.items() if s == ptr)

    def _rows(self, t: Any) -> tuple[str, slice] | None:
        """``(name, rows)`` when ``t`` is a block of rows of a served parameter, else None."""
        name = self._owner(t)
        if name is None:
            return None
        p, _, offset = self.params[name]
        row = p.stride(0) if p.dim() else 1
        start, rem = divmod(t.storage_offset() - offset, max(row, 1))
        if (
            rem
            or t.dtype != p.dtype
            or t.shape[1:] != p.shape[1:]
            or t.stride() != p.stride()
            or not p.is_contiguous()
            or not 0 <= start <= start + t.shape[0] <= p.shape[0]
        ):
            return None
        return name, slice(start, start + t.shape[0])

    def _see(self, func, args, kwargs, out) -> None:
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            w_of, b_of = self._owner(w), self._owner(b)
            if w_of is None and b_of is None:
                return  # a projection of nothing served
            weight, bias = self._rows(w), self._rows(b)
            if (
                weight is None
                or (b_of is not None and bias is None)
                or (bias is not None and bias[1].stop - bias[1].start != w.shape[0])
            ):
                self._refuse(f"a projection uses {w_of or b_of} in a way the rule does not know")
                return
            layout = {3: "seq", 2: "rows"}.get(x.dim())
            if layout is None:
                self._refuse(f"a projection got an input of shape {tuple(x.shape)}")
                return
            self.pieces.append(_Piece(weight, bias, x.detach(), layout))
            self.outputs.append(out)
            return
        if func is torch.Tensor.repeat and self._owner(args[0]) is not None:
            whole = self._rows(args[0])
            name = whole[0] if whole is not None else None
            p = self.params[name][0] if name is not None else None
            n = self.shape[1] if len(self.shape) == 3 else 1
            if (
                name not in _KV_BIAS
                or p.shape != args[0].shape
                or tuple(out.shape) != (1, n, p.shape[-1])
            ):
                self._refuse(f"{self._owner(args[0])} is repeated to {tuple(out.shape)}")
                return
            self.pieces.append(_Piece(None, whole, None, "repeat"))
            self.outputs.append(out)
            return
        if func in _VIEWS:
            owner = next((n for n in map(self._owner, _tensors((args, kwargs))) if n), None)
            if owner is not None and any(self._owner(t) is None for t in _tensors(out)):
                self._refuse(f"{owner} is copied inside F.multi_head_attention_forward")
            return
        for t in _tensors((args, kwargs)):
            name = self._owner(t)
            if name is not None and any(True for _ in _tensors(out)):
                what = getattr(func, "__qualname__", None) or repr(func)
                self._refuse(f"{name} is used through {what} inside F.multi_head_attention_forward")
                return


# ----------------------------------------------------------------------------- kept forms


class RowBlocks(Factors):
    r"""One weight ``(Q, P)`` whose per-sample gradient is ``Σ_t b_t a_tᵀ`` on disjoint row blocks.

    Parameters
    ----------
    name : str
        The parameter's name in the rule (``"in_proj_weight"``).
    shape : tuple of int
        The weight's shape ``(Q, P)``.
    blocks : list of ``(rows, a, b)``
        ``rows`` a slice of ``[0, Q)``, ``a`` ``(B, T, P)``, ``b`` ``(B, T, |rows|)``;
        rows outside every block have gradient 0.
    materialize : bool
        Keep a block's per-sample matrices ``(B, |rows|, P)`` instead of its
        tokens where they hold fewer numbers (``T(P + |rows|) > P|rows|``), as
        the Linear rule does.
    """

    def __init__(self, name, shape, blocks, materialize: bool = True) -> None:
        self.name, self.shape, self.names = name, tuple(shape), (name,)
        self.blocks: list[tuple[slice, torch.Tensor | None, torch.Tensor]] = []
        for rows, a, b in blocks:
            a, b = up(a), up(b)
            T, P, Q = a.shape[1], a.shape[2], b.shape[2]
            if materialize and T > 1 and T * (P + Q) > P * Q:
                self.blocks.append((rows, None, per_sample_matrices(a, b)))
            else:
                self.blocks.append((rows, a, b))

    def kept_tensors(self):  # noqa: D102
        return [t for _, a, b in self.blocks for t in (a, b) if t is not None]

    @property
    def nbytes(self) -> int:  # noqa: D102
        return storage_bytes(self.kept_tensors())

    def sq(self, name):  # noqa: D102
        out = None
        for _, a, b in self.blocks:
            s = sq_sum(b, (1, 2)) if a is None else gram_sq_norm(a, b)
            out = s if out is None else out + s
        return out

    def proj(self, name, dirs: Directions):  # noqa: D102
        out = dirs.u.new_zeros(dirs.u.shape[1])
        if dirs.u.shape[1] == 0:
            return out
        for rows, a, b in self.blocks:
            if a is None:  # b: the per-sample matrices of these rows
                out += dirs.of_rows(b, rows=rows)
            else:
                out += dirs.of_factors(a, b, rows=rows)
        return out

    def dots(self, vectors):  # noqa: D102
        v = vectors[self.name]
        out = None
        for rows, a, b in self.blocks:
            vr = v[rows]
            if a is None:
                d = sum64(b * vr.to(b.dtype), (1, 2))
            else:
                d = token_dots(a, b, vr)
            out = d if out is None else out + d
        return out

    def weighted(self, name, weights):  # noqa: D102
        w = weights.to(device=self.blocks[0][2].device)
        out = torch.zeros(w.shape[0], *self.shape, dtype=torch.float64, device=w.device)
        for rows, a, b in self.blocks:
            if a is None:
                flat = b.reshape(b.shape[0], -1)
                part = (w.double() @ flat.double()).reshape(w.shape[0], *b.shape[1:])
            else:
                shape = (b.shape[-1], a.shape[-1])
                part = Tokens(a, b, weight="w", shape=shape).weighted("w", w)
            out[:, rows] = part
        return out

    def total(self) -> torch.Tensor:
        """``Σ_n g_n``, float64 ``(Q, P)``."""
        out = torch.zeros(self.shape, dtype=torch.float64, device=self.blocks[0][2].device)
        for rows, a, b in self.blocks:
            if a is None:
                out[rows] = sum64(b, (0,))
            else:
                b2, a2 = b.reshape(-1, b.shape[-1]), a.reshape(-1, a.shape[-1])
                out[rows] = (b2.t() @ a2).double()
        return out


def _sample_major(g: torch.Tensor, layout: str, length: int, n: int) -> torch.Tensor:
    """Return a projection's output gradient as ``(N, T, Q)``, a repeated bias's as ``(N, E)``."""
    if layout == "seq":
        return g.transpose(0, 1)
    if layout == "rows":
        return g.reshape(length, n, g.shape[-1]).transpose(0, 1)
    return g[0]


def _refine(pieces: list[tuple[slice, torch.Tensor, torch.Tensor]]) -> list[tuple]:
    """Disjoint blocks of rows from projections that may cover different rows of one weight."""
    cuts = sorted({r.start for r, _, _ in pieces} | {r.stop for r, _, _ in pieces})
    blocks = []
    for s, e in itertools.pairwise(cuts):
        cover = [
            (a, b[..., s - r.start : e - r.start])
            for r, a, b in pieces
            if r.start <= s and e <= r.stop
        ]
        if cover:
            blocks.append(
                (slice(s, e), cat_tokens([a for a, _ in cover]), cat_tokens([b for _, b in cover]))
            )
    return blocks


# ----------------------------------------------------------------------------- the rule


@register_module_rule(nn.MultiheadAttention)
class MultiheadAttentionFamily(LayerFamily):
    """``nn.MultiheadAttention`` (its own forward): every option, its out projection included."""

    name = "multihead-attention"

    def __init__(self) -> None:
        self._pending: dict[int, list[_Capture]] = {}

    def param_names(self, mod):
        """Its own parameters, and ``out_proj.weight``/``out_proj.bias`` of the child it reads."""
        own = [n for n in (*_OWN, *_KV_BIAS) if isinstance(getattr(mod, n, None), nn.Parameter)]
        out = getattr(mod, "out_proj", None)
        if isinstance(out, nn.Module):
            own += [
                f"out_proj.{n}"
                for n in ("weight", "bias")
                if isinstance(out._parameters.get(n), nn.Parameter)
            ]
        return tuple(own)

    def excludes(self, mod):
        """Keep every rule off an ``nn.MultiheadAttention``'s children: it reads, never calls them.

        Their parameters are served by this rule (:meth:`param_names`) or, when
        it does not serve the attention, go to the exact fallback.
        """
        if not isinstance(mod, nn.MultiheadAttention):
            return {}
        return {child: _INSIDE_ATTENTION for child in mod.modules() if child is not mod}

    @contextlib.contextmanager
    def recording(self, mod):
        """Run each call of ``mod`` under a ``_Capture`` (module docstring); restore on exit."""
        pending = self._pending.setdefault(id(mod), [])
        served = {n: mod.get_parameter(n) for n in self.param_names(mod)}
        had, previous = "forward" in mod.__dict__, mod.__dict__.get("forward")
        inner = mod.forward

        def forward(*args, **kwargs):
            capture = _Capture(served)
            with capture:
                out = inner(*args, **kwargs)
            pending.append(capture)
            return out

        mod.forward = forward
        try:
            yield
        finally:
            if had:
                mod.forward = previous
            else:
                del mod.forward
            self._pending.pop(id(mod), None)

    def record(self, mod, args, output, batch, before=None):
        """Keep the projections' inputs; return the outputs whose gradients the forms need."""
        pending = self._pending.get(id(mod))
        capture = pending.pop() if pending else None
        problem = None
        if capture is None:
            problem = "the call was not seen inside (not during the recorded forward)"
        elif capture.problem is not None:
            problem = capture.problem
        elif not capture.opened:
            problem = (
                "F.multi_head_attention_forward did not run (the fast path "
                "torch._native_multi_head_attention has no per-sample rule)"
            )
        elif len(capture.shape) != 3:
            problem = f"unbatched input {capture.shape}: no sample axis"
        elif capture.shape[1] != batch:
            side = "dim 0" if mod.batch_first else "dim 1"
            problem = (
                f"MultiheadAttention(batch_first={mod.batch_first}) got a batch of "
                f"{capture.shape[1]} along {side} of its input, not the probe's {batch} samples"
            )
        if problem is not None:
            return Call(problem=problem), []
        length, n = capture.shape[0], capture.shape[1]
        pieces = []
        for p in capture.pieces:
            a = p.a
            if p.layout == "seq":
                if a.shape[1] != n:
                    return Call(problem=f"a projection got input {tuple(a.shape)}"), []
                a = a.transpose(0, 1)
            elif p.layout == "rows":
                if a.shape[0] != length * n:
                    return Call(problem=f"a projection got input {tuple(a.shape)}"), []
                a = a.reshape(length, n, a.shape[-1]).transpose(0, 1)
            pieces.append(_Piece(p.weight, p.bias, a, p.layout))
        call = Call(
            grads=[None] * len(capture.outputs),
            extra={"pieces": pieces, "length": length, "n": n},
        )
        return call, capture.outputs

    # -- the forms -------------------------------------------------------------
    def _collect(self, mod, calls, names, batch):
        """``({weight: [(rows, a, b)]}, {vector parameter: per-sample rows (B, *shape)})``."""
        weights: dict[str, list] = {}
        vectors: dict[str, torch.Tensor] = {}
        for call in calls:
            if call.problem is not None:
                raise Unsupported(call.problem)
            length, n = call.extra["length"], call.extra["n"]
            for piece, g in zip(call.extra["pieces"], call.grads, strict=True):
                if g is None:
                    continue
                g = up(_sample_major(g, piece.layout, length, n))
                if piece.layout == "repeat":
                    name = piece.bias[0]
                    if name in names:
                        rows = g.reshape(batch, *mod.get_parameter(name).shape)
                        vectors[name] = rows if name not in vectors else vectors[name] + rows
                    continue
                wname, wrows = piece.weight
                if wname in names:
                    weights.setdefault(wname, []).append((wrows, up(piece.a), g))
                if piece.bias is not None and piece.bias[0] in names:
                    bname, brows = piece.bias
                    if bname not in vectors:
                        p = mod.get_parameter(bname)
                        vectors[bname] = g.new_zeros(batch, *p.shape)
                    vectors[bname][:, brows] += g.sum(1)
        return weights, vectors

    def _factors(self, mod, calls, names, batch, materialize):
        weights, vectors = self._collect(mod, calls, names, batch)
        parts: list[Factors] = [
            RowBlocks(n, tuple(mod.get_parameter(n).shape), _refine(p), materialize)
            for n, p in weights.items()
        ]
        if vectors:
            parts.append(Rows(vectors))
        missing = [n for n in names if n not in weights and n not in vectors]
        if missing:
            shapes = {n: tuple(mod.get_parameter(n).shape) for n in missing}
            parts.append(Zero(shapes, batch, mod.get_parameter(missing[0]).device))
        return Joined(parts)

    def factors(self, mod, calls, names, batch):
        """Keep each weight as :class:`RowBlocks`, the biases and ``bias_k/v`` as rows."""
        return self._factors(mod, calls, names, batch, materialize=True)

    def per_sample(self, mod, calls, names, batch, dirs):
        """Norms from the tokens (nothing kept): Gram sums or per-sample matrices in chunks."""
        return self._factors(mod, calls, names, batch, materialize=False).ghost(names, dirs)

    def dots(self, mod, calls, names, vectors, batch):
        """``Σ_blocks Σ_t b_t·(V[rows] a_t)`` plus the biases' rows times ``v``."""
        kept = self._factors(mod, calls, names, batch, materialize=False)
        return kept.dots({n: vectors[n] for n in names})

    def batch_grad(self, mod, calls, names, batch):
        """``Σ_n g_n`` of every parameter, formed in full."""
        kept = self._factors(mod, calls, names, batch, materialize=False)
        out = {}
        for n in names:
            part = kept.owner[n]
            if isinstance(part, RowBlocks):
                out[n] = part.total()
            elif isinstance(part, Rows):
                out[n] = sum64(part.rows[n], (0,))
            else:
                out[n] = torch.zeros(mod.get_parameter(n).shape, dtype=torch.float64)
        return out
