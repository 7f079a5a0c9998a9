r"""Per-sample rules matched by how a parameter is *used*, not by the module that owns it.

Module rules (:mod:`~clipscope.engine.per_sample.linear` and its siblings) see
a parameter through the calls of the module that registers it. Transformers
use parameters outside any such call: a class token or a learned position
table added to the activations (ViT, BERT, GPT-2's ``wpe``), a scale that
multiplies them (LayerScale, a hand-written RMSNorm's ``weight * x̂``), a weight
read as a matrix (``F.linear(h, wte.weight)``, a tied output projection,
``x @ W``). :class:`UseRecorder` sees them: during the recorded forward it is a
:class:`torch.overrides.TorchFunctionMode` that follows every torch function
call and sorts each tensor into

* **data**: the model's input and everything computed from it;
* **parameter-derived**: a parameter, or computed from parameters and
  constants only (a slice of a position table, ``cls.expand(B, -1, -1)``,
  ``wpe(arange(T))``); its :class:`Source` says how;
* **constant**: everything else (buffers, ``arange``, masks not built from
  the input).

A call that meets data and a parameter-derived tensor is a **use**. A use rule
(:class:`UseRule`, registered for the torch functions it understands) records
what it needs and names the outputs whose gradients it needs; after the
backward of ``Σ_j ℓ_j`` it writes the per-sample gradient of the
parameter-derived operand ``D`` from them, which :func:`chain_back` carries to
the parameters ``D`` came from (closed forms for expand, reshape, permute and
embedding lookups of constant ids; otherwise the batched vector-Jacobian
product of the derivation, ``J_Dᵀ G_j`` for every sample at once). The
results are :class:`~clipscope.engine.per_sample.factors.Factors`, summed per
parameter with every other use (:mod:`~clipscope.engine.per_sample.summed`).

The rules here, with sample j's gradient of the parameter-derived operand
``D`` (``b = ∂(Σ_k ℓ_k)/∂output``, the samples on dim 0 of the output):

===========================  ====================================================
``x + D``, ``x - D``, ``D - x``  ``± Σ_{broadcast dims} b_j``
``x * D``                    ``Σ_{broadcast dims} b_j ⊙ x_j``
``D / x``, ``x / D``         ``Σ b_j / x_j``, ``−Σ b_j ⊙ (x_j / D) / D``
``F.linear(x, D_W, D_b)``    ``Σ_t b_{jt} x_{jt}ᵀ`` and ``Σ_t b_{jt}`` (tokens)
``x @ D``                    ``Σ_t x_{jt} b_{jt}ᵀ`` (tokens)
``F.embedding(ids, D)``      rows ``ids_j`` of ``b_j`` (an embedding's form)
``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``  ``Σ b_j ⊙ x̂_j`` and ``Σ b_j``
``torch.cat``, ``torch.stack`` (D among the parts)  the part of ``b_j`` that is D's
===========================  ====================================================

Every use must have the samples on dim 0 of the data operand and of the
output; a parameter used in any other way (another torch function, the
samples elsewhere, a parameter whose dim 0 meets the batch) is named with the
reason, and the per-sample route takes it from the exact fallback. Nothing
here is trusted: the structural check compares the sum over samples of every
parameter's per-sample gradients, all uses together, with its actual batch
gradient, and the spot check compares samples with their own backward.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from clipscope.engine.per_sample.embedding import EmbeddingFactors
from clipscope.engine.per_sample.factors import Factors, Rows, Tokens
from clipscope.engine.per_sample.family import Unsupported
from clipscope.engine.per_sample.registry import registry

__all__ = [
    "Source",
    "UseRecorder",
    "UseRule",
    "UseSite",
    "chain_back",
    "register_use_rule",
]

#: Elements (``B·numel``) of per-sample gradients a use may form in full (float64: 256 MiB).
ROWS_LIMIT = 1 << 25

Tensor = torch.Tensor
_T = torch.Tensor


# -- sources: how a parameter-derived tensor depends on the parameters ------------------
@dataclass
class Source:
    """How a parameter-derived tensor ``D`` was computed from the parameters.

    ``kind``:

    * ``"param"``: ``D`` is parameter ``k`` itself;
    * ``"expand"``: ``D = parent.expand(...)`` (``info``: the parent's shape);
    * ``"reshape"``: the parent's elements in the same order, maybe another dtype
      (view, reshape, flatten, (un)squeeze, contiguous, clone, casts);
    * ``"permute"``: ``D = parent.permute(info)``;
    * ``"embedding"``: ``D = weight[ids]`` for constant ids (``info``: ids, padding index);
    * ``"generic"``: anything else; the per-sample gradient is carried back by
      autograd through ``tensor`` (kept alive by the uses that need it).
    """

    kind: str
    params: frozenset[int]
    parent: Source | None = None
    k: int = -1
    info: Any = None
    tensor: Any = None  # generic: a weak reference until a use keeps it


def _param_source(k: int) -> Source:
    return Source("param", frozenset([k]), k=k)


# -- what a use rule hands back: sample j's gradient of a parameter-derived operand -----
@dataclass
class Grad:
    """Per-sample gradients of one parameter-derived operand ``D``.

    ``form``:

    * ``"bcast"``: ``data`` ``(B, *D.shape)``, one full gradient of ``D`` per sample;
    * ``"row"``: ``D.shape[0] = B`` and sample j reaches only row j of ``D``:
      ``data`` ``(B, *D.shape[1:])``;
    * ``"tokens"``: a 2-D ``D``, ``g_j(D) = Σ_t b_{jt} a_{jt}ᵀ``; ``data = (a, b)``;
    * ``"bias"``: ``g_j(D) = Σ_t b_{jt}``; ``data = b`` ``(B, T, Q)``;
    * ``"lookup"``: ``D[ids]`` was looked up: ``data = (ids (B, T), b (B, T, E), padding_idx)``.
    """

    form: str
    data: Any


@dataclass
class UseSite:
    """One use: the rule, the parameter-derived operands, what the rule kept, the gradients."""

    rule: UseRule
    func: Callable
    operands: list[tuple[Any, Source, torch.Size]]  # (role, source, shape of D)
    kept: dict = field(default_factory=dict)
    grads: list = field(default_factory=list)  # filled by the output hooks
    problem: str | None = None
    tensors: list = field(default_factory=list)  # generic operands kept for their graph
    skip: frozenset = frozenset()  # parameters the running module rule serves


class UseRule:
    """Base class of a rule for uses through some torch functions.

    Subclasses set :attr:`name` and :attr:`functions` and implement
    :meth:`record` (check the call, keep what :meth:`grads` needs, return the
    outputs whose gradients it needs) and :meth:`grads` (the per-sample
    gradient of each parameter-derived operand, from the recorded call).
    """

    name: ClassVar[str] = "use"
    functions: ClassVar[tuple[Callable, ...]] = ()
    #: the functions' argument names, so that a keyword operand gets its position as role
    arg_names: ClassVar[tuple[str, ...]] = ()

    def record(
        self, site: UseSite, args: tuple, kwargs: dict, out: Any, batch: int
    ) -> list[torch.Tensor]:
        """Keep what :meth:`grads` needs in ``site.kept``; return the outputs to hook."""
        raise NotImplementedError

    def grads(self, site: UseSite, batch: int) -> list[Grad]:
        """Return one :class:`Grad` per entry of ``site.operands``."""
        raise NotImplementedError


def register_use_rule(cls: type[UseRule]) -> type[UseRule]:
    """Class decorator: serve the uses of ``cls.functions`` by an instance of ``cls``.

    Registered in :data:`~clipscope.engine.per_sample.registry.registry`
    (:meth:`~clipscope.engine.per_sample.registry.RuleRegistry.register_use`); a
    later registration for the same function replaces the earlier one.
    """
    registry.register_use(cls(), cls.functions)
    return cls


def _keep(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keep a recorded operand with its version: the model may overwrite it after the call."""
    return t, t._version


def _kept(kept: tuple[torch.Tensor, int], what: str) -> torch.Tensor:
    t, version = kept
    if t._version != version:
        raise Unsupported(f"{what} was modified in place after the call")
    return t


def _out_has_batch(out: Any, batch: int) -> bool:
    return isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == batch


def _samples_problem(what: str, t: Any, batch: int) -> str:
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
    return f"{what} has shape {shape}: the samples of a batch of {batch} are not along its dim 0"


# -- the rules ----------------------------------------------------------------------------
_ADD = (torch.add, _T.add, _T.add_, _T.__add__, _T.__radd__, _T.__iadd__)
_SUB = (torch.sub, _T.sub, _T.sub_, _T.__sub__, _T.__isub__, torch.subtract, _T.subtract)
_MUL = (torch.mul, _T.mul, _T.mul_, _T.__mul__, _T.__rmul__, _T.__imul__, torch.multiply)
_DIV = (
    torch.div, _T.div, _T.div_, _T.__truediv__, _T.__itruediv__, torch.true_divide,
    _T.true_divide, torch.divide, _T.divide,
)  # fmt: skip
_INPLACE = {
    _T.add_, _T.__iadd__, _T.sub_, _T.__isub__, _T.mul_, _T.__imul__, _T.div_, _T.__itruediv__
}  # fmt: skip


@register_use_rule
class ElementwiseRule(UseRule):
    """``x ± D``, ``x * D``, ``x / D``, ``D / x``, ``D`` broadcast (or one row per sample).

    The output gradient ``b`` times the operation's derivative in ``D`` -- ``±1``,
    ``x``, ``1/x``, ``−(x/D)/D`` -- summed over the dims along which ``D`` is broadcast.
    """

    name = "broadcast"
    functions = _ADD + _SUB + _MUL + _DIV
    arg_names = ("input", "other")

    def record(self, site, args, kwargs, out, batch):
        ((role, _, shape),) = site.operands  # one parameter-derived operand (checked by the caller)
        if len(args) < 2 or role not in (0, 1):
            raise Unsupported(f"{site.func.__name__} with this signature")
        other = args[1 - role]
        if not _out_has_batch(out, batch):
            raise Unsupported(_samples_problem("the output", out, batch))
        if not isinstance(other, torch.Tensor) or other.dim() == 0 or other.shape[0] != batch:
            raise Unsupported(_samples_problem("the data operand", other, batch))
        if len(shape) > out.dim() or (len(shape) == out.dim() and shape[0] not in (1, batch)):
            raise Unsupported(f"an operand of shape {tuple(shape)} against {tuple(out.shape)}")
        if site.func in _DIV and kwargs.get("rounding_mode", args[2] if len(args) > 2 else None):
            raise Unsupported("a rounded division (its derivative is 0 almost everywhere)")
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        sign = 1.0
        if site.func in _SUB and role == 1:
            sign = -1.0
        if site.func in _ADD + _SUB and role == 1:  # alpha scales the second operand
            sign *= float(alpha)
        site.kept.update(sign=sign, out_shape=tuple(out.shape))
        kept = site.kept.pop("pre", None)  # the data operand before an in-place op changed it
        data = other.detach() if kept is None else kept
        if site.func in _MUL:  # ∂(x D)/∂D = x
            site.kept["factor"] = _keep(data)
        elif site.func in _DIV and role == 0:  # ∂(D / x)/∂D = 1 / x
            site.kept["factor"] = _keep(data)
            site.kept["reciprocal"] = True
        elif site.func in _DIV:  # ∂(x / D)/∂D = −(x / D) / D
            site.kept["factor"] = _keep(out.detach())
            site.kept["over"] = _keep(args[1].detach())
        return [out]

    def before(self, site: UseSite, args: tuple) -> None:
        """In-place product or quotient: keep the data operand before it is overwritten."""
        ((role, _, _),) = site.operands
        if site.func in _INPLACE and site.func in _MUL + _DIV and role == 1:
            site.kept["pre"] = args[0].detach().clone()

    def grads(self, site, batch):
        ((_, _, shape),) = site.operands
        b = site.grads[0]
        if "factor" in site.kept:
            factor = _kept(site.kept["factor"], "an operand of the product or quotient")
            if site.kept.get("reciprocal"):
                b = b / factor
            elif "over" in site.kept:
                b = -(b * factor) / _kept(site.kept["over"], "the divisor")
            else:
                b = b * factor
        elif site.kept["sign"] != 1.0:
            b = b * site.kept["sign"]
        nd = b.dim() - 1
        if len(shape) == b.dim() and shape[0] == batch and batch > 1:
            return [Grad("row", b.sum_to_size((batch, *shape[1:])))]
        tail = tuple(shape[1:]) if len(shape) == b.dim() else tuple(shape)
        g = b.sum_to_size((batch,) + (1,) * (nd - len(tail)) + tail).reshape(batch, *tail)
        return [Grad("bcast", g.reshape(batch, *shape))]


@register_use_rule
class LinearUseRule(UseRule):
    """``F.linear(x, D_W, D_b)``: Goodfellow's / Li et al.'s tokens, the samples on dim 0 of x."""

    name = "linear"
    functions = (F.linear,)
    arg_names = ("input", "weight", "bias")

    def record(self, site, args, kwargs, out, batch):
        x = args[0]
        roles = {r for r, _, _ in site.operands}
        if 0 in roles:
            raise Unsupported("F.linear with a parameter as its input")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != batch:
            raise Unsupported(_samples_problem("the input of F.linear", x, batch))
        if not _out_has_batch(out, batch):
            raise Unsupported(_samples_problem("the output of F.linear", out, batch))
        site.kept["a"] = _keep(x.detach())
        return [out]

    def grads(self, site, batch):
        a = _kept(site.kept["a"], "the input of F.linear")
        b = site.grads[0]
        a = a.reshape(batch, -1, a.shape[-1])
        b = b.reshape(batch, -1, b.shape[-1])
        return [Grad("tokens", (a, b)) if r == 1 else Grad("bias", b) for r, _, _ in site.operands]


@register_use_rule
class MatmulUseRule(UseRule):
    """``x @ D`` with a 2-D ``D`` and the samples on dim 0 of ``x``: ``Σ_t x_t b_tᵀ``."""

    name = "matmul"
    functions = (torch.matmul, _T.matmul, _T.__matmul__)
    arg_names = ("input", "other")

    def record(self, site, args, kwargs, out, batch):
        ((role, _, shape),) = site.operands
        x = args[0]
        if role != 1 or len(shape) != 2:
            raise Unsupported("x @ D needs a 2-D parameter on the right")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != batch:
            raise Unsupported(_samples_problem("the left operand of @", x, batch))
        if not _out_has_batch(out, batch):
            raise Unsupported(_samples_problem("the output of @", out, batch))
        site.kept["x"] = _keep(x.detach())
        return [out]

    def grads(self, site, batch):
        x = _kept(site.kept["x"], "the left operand of @")
        b = site.grads[0]
        x = x.reshape(batch, -1, x.shape[-1])  # rows of D
        b = b.reshape(batch, -1, b.shape[-1])  # columns of D
        return [Grad("tokens", (b, x))]  # g(D) = Σ_t x_t b_tᵀ: "b" the rows, "a" the columns


@register_use_rule
class EmbeddingUseRule(UseRule):
    """``F.embedding(ids, D)`` with the samples on dim 0 of the ids."""

    name = "embedding"
    functions = (F.embedding,)
    arg_names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq")

    def record(self, site, args, kwargs, out, batch):
        roles = {r for r, _, _ in site.operands}
        ids = args[0]
        if roles != {1}:
            raise Unsupported("F.embedding with parameter-derived ids")
        if kwargs.get("scale_grad_by_freq", args[5] if len(args) > 5 else False):
            raise Unsupported("scale_grad_by_freq=True: the gradient is defined per batch")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 1 or ids.shape[0] != batch:
            raise Unsupported(_samples_problem("the ids of F.embedding", ids, batch))
        pad = kwargs.get("padding_idx", args[2] if len(args) > 2 else None)
        site.kept.update(ids=_keep(ids.detach()), pad=pad)
        return [out]

    def grads(self, site, batch):
        ids = _kept(site.kept["ids"], "the ids of F.embedding").reshape(batch, -1)
        b = site.grads[0]
        return [Grad("lookup", (ids, b.reshape(batch, ids.shape[1], -1), site.kept["pad"]))]


_NORMS = (F.layer_norm, F.rms_norm, F.group_norm)


@register_use_rule
class NormUseRule(UseRule):
    """``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm`` with parameter-derived affine terms."""

    name = "norm"
    functions = _NORMS
    arg_names = ("input", "normalized_shape", "weight", "bias", "eps")  # group_norm: see below

    def record(self, site, args, kwargs, out, batch):
        x = args[0]
        roles = {r for r, _, _ in site.operands}
        if 0 in roles:
            raise Unsupported(f"{site.func.__name__} of a parameter")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != batch:
            raise Unsupported(_samples_problem(f"the input of {site.func.__name__}", x, batch))
        if not _out_has_batch(out, batch):
            raise Unsupported(_samples_problem("the output", out, batch))
        names = {
            F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
            F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
            F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
        }[site.func]
        bound = dict(zip(names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        site.kept.update(
            x=_keep(x.detach()), bound={k: v for k, v in bound.items() if k != "input"}
        )
        site.kept["roles"] = {r: names[r] for r, _, _ in site.operands}
        return [out]

    def _normalized(self, site) -> torch.Tensor:
        x, bound = _kept(site.kept["x"], "the normalized input"), site.kept["bound"]
        if site.func is F.layer_norm:
            return F.layer_norm(x, bound["normalized_shape"], None, None, bound.get("eps", 1e-5))
        if site.func is F.rms_norm:
            return F.rms_norm(x, bound["normalized_shape"], None, bound.get("eps"))
        return F.group_norm(x, bound["num_groups"], None, None, bound.get("eps", 1e-5))

    def grads(self, site, batch):
        b = site.grads[0]
        xhat = None
        out = []
        for r, _, shape in site.operands:
            if site.kept["roles"][r] == "weight":
                xhat = self._normalized(site) if xhat is None else xhat
                prod = b * xhat
            else:
                prod = b
            if site.func is F.group_norm:  # (C,) along dim 1
                g = prod.reshape(batch, prod.shape[1], -1).sum(2)
            else:
                g = prod.reshape(batch, -1, math.prod(shape)).sum(1)
            out.append(Grad("bcast", g.reshape(batch, *shape)))
        return out


@register_use_rule
class CatRule(UseRule):
    """``torch.cat`` / ``torch.stack`` along a dim other than the samples' (a class token)."""

    name = "concatenate"
    functions = (torch.cat, torch.concat, torch.concatenate, torch.stack)

    def record(self, site, args, kwargs, out, batch):
        parts = args[0]
        dim = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else 0))
        if not _out_has_batch(out, batch):
            raise Unsupported(_samples_problem("the output", out, batch))
        dim = dim % out.dim()
        if dim == 0:
            raise Unsupported("concatenated along the samples' dim 0")
        offsets, start = [], 0
        for t in parts:
            size = 1 if site.func is torch.stack else t.shape[dim]
            offsets.append((start, size))
            start += size
        for _role, _, shape in site.operands:
            if shape[0] != batch:
                raise Unsupported(_samples_problem("a concatenated parameter", shape, batch))
        site.kept.update(dim=dim, offsets=offsets)
        return [out]

    def grads(self, site, batch):
        b = site.grads[0]
        dim, offsets = site.kept["dim"], site.kept["offsets"]
        out = []
        for role, _, _ in site.operands:
            start, size = offsets[role]
            part = b.narrow(dim, start, size)
            if site.func is torch.stack:
                part = part.squeeze(dim)
            out.append(Grad("row", part))
        return out


# -- derivations ------------------------------------------------------------------------
_RESHAPE = {
    _T.view, _T.reshape, torch.reshape, _T.flatten, torch.flatten, _T.unsqueeze,
    torch.unsqueeze, _T.squeeze, torch.squeeze, _T.contiguous, _T.clone, torch.clone,
    _T.to, _T.float, _T.double, _T.half, _T.bfloat16, _T.type_as, _T.view_as, _T.reshape_as,
}  # fmt: skip
_EXPAND = {_T.expand, _T.expand_as, torch.broadcast_to, _T.broadcast_to}
_PERMUTE = {_T.permute, torch.permute, _T.transpose, torch.transpose, _T.t, torch.t, _T.swapaxes}


def _perm_of(func: Callable, args: tuple, kwargs: dict, ndim: int) -> list[int] | None:
    if func in (_T.t, torch.t):
        return [1, 0] if ndim == 2 else list(range(ndim))
    if func in (_T.permute, torch.permute):
        dims = kwargs.get("dims", args[1:])
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [d % ndim for d in dims]
    d0 = kwargs.get("dim0", args[1] if len(args) > 1 else None)
    d1 = kwargs.get("dim1", args[2] if len(args) > 2 else None)
    if d0 is None or d1 is None:
        return None
    perm = list(range(ndim))
    perm[d0 % ndim], perm[d1 % ndim] = perm[d1 % ndim], perm[d0 % ndim]
    return perm


_PROPERTIES = {_T.T: "T", _T.mT: "mT"}


def _derive(func, args, kwargs, sources: list[tuple[Any, Source]], out: Any) -> Source | None:
    """Return the :class:`Source` of ``out``, computed from parameter-derived inputs only."""
    params = frozenset().union(*(s.params for _, s in sources))
    first = args[0] if args else None
    single = len(sources) == 1 and sources[0][0] is first and isinstance(out, torch.Tensor)
    if single and sources[0][1].kind != "generic":  # (autograd carries a generic one back)
        parent = sources[0][1]
        shape = tuple(first.shape)
        if func in _RESHAPE and out.numel() == first.numel():
            return Source("reshape", params, parent, info=shape)
        if func in _EXPAND:
            return Source("expand", params, parent, info=shape)
        if func in _PERMUTE:
            perm = _perm_of(func, args, kwargs, first.dim())
            if perm is not None:
                return Source("permute", params, parent, info=perm)
        prop = _PROPERTIES.get(getattr(func, "__self__", None))
        if prop is not None:
            n = first.dim()
            perm = list(range(n))[::-1] if prop == "T" else [*range(n - 2), n - 1, n - 2]
            return Source("permute", params, parent, info=perm)
    if func is F.embedding and len(sources) == 1 and sources[0][1].kind == "param":
        ids = args[0]
        if isinstance(ids, torch.Tensor) and sources[0][0] is (args[1] if len(args) > 1 else None):
            if not kwargs.get("scale_grad_by_freq", args[5] if len(args) > 5 else False):
                pad = kwargs.get("padding_idx", args[2] if len(args) > 2 else None)
                return Source("embedding", params, k=sources[0][1].k, info=(ids.detach(), pad))
    return Source("generic", params)


# -- carrying per-sample gradients back to the parameters --------------------------------
def _rows_guard(batch: int, numel: int, what: str) -> None:
    if batch * numel > ROWS_LIMIT:
        raise Unsupported(
            f"{what} would need {batch}×{numel} per-sample elements (limit {ROWS_LIMIT})"
        )


def _materialize(grad: Grad, shape: Sequence[int], batch: int) -> Grad:
    """Form a tokens / bias / lookup gradient as per-sample tensors of ``D``'s shape."""
    _rows_guard(batch, math.prod(shape), "forming a derived weight's per-sample gradients")
    if grad.form == "tokens":
        a, b = grad.data
        g = torch.bmm(b.transpose(1, 2).double(), a.double())
    elif grad.form == "bias":
        g = grad.data.double().sum(1)
    else:  # lookup
        ids, b, pad = grad.data
        g = torch.zeros(batch, *shape, dtype=torch.float64, device=b.device)
        bb = b.double()
        if pad is not None:
            bb = bb * (ids != pad).unsqueeze(-1)
        g.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, shape[-1]), bb)
    return Grad("bcast", g.reshape(batch, *shape))


def chain_back(
    source: Source,
    grad: Grad,
    shape: Sequence[int],
    batch: int,
    params: Sequence[torch.Tensor],
    skip: Iterable[int] = (),
    tensor: torch.Tensor | None = None,
) -> list[tuple[int, Factors]]:
    """Carry ``grad`` (sample j's gradient of ``D``, of shape ``shape``) to the parameters.

    Returns ``[(parameter index, Factors serving it under the name "p")]``;
    parameters in ``skip`` (served by their module's rule here) get nothing.
    Raises :class:`Unsupported` where the form cannot be carried exactly
    within :data:`ROWS_LIMIT`.
    """
    skip = set(skip)
    shape = tuple(shape)
    kind = source.kind
    if grad.form == "row" and batch == 1:  # one sample: its row is the whole of D
        grad = Grad("bcast", grad.data.unsqueeze(1))
    if kind == "param":
        if source.k in skip:
            return []
        if grad.form == "tokens":
            a, b = grad.data
            return [(source.k, Tokens(a, b, weight="p", shape=shape))]
        if grad.form == "bias":
            return [(source.k, Tokens(None, grad.data, bias="p"))]
        if grad.form == "lookup":
            ids, b, pad = grad.data
            if pad is not None:
                b = b * (ids != pad).unsqueeze(-1).to(b.dtype)
            return [(source.k, EmbeddingFactors(ids, b, shape))]
        if grad.form == "row":
            raise Unsupported(
                f"a parameter of shape {shape} meets the batch row by row (its dim 0 is the "
                "batch size)"
            )
        return [(source.k, Rows({"p": grad.data}))]
    if kind == "permute" and grad.form == "tokens" and len(shape) == 2 and source.info == [1, 0]:
        a, b = grad.data  # g(Dᵀ) = Σ a bᵀ
        return chain_back(source.parent, Grad("tokens", (b, a)), shape[::-1], batch, params, skip)
    if grad.form in ("tokens", "bias", "lookup"):
        if kind == "reshape" and tuple(source.info) == shape:
            return chain_back(source.parent, grad, shape, batch, params, skip, tensor)
        grad = _materialize(grad, shape, batch)
    return _chain_rows(source, grad, shape, batch, params, skip, tensor)


def _chain_rows(source, grad, shape, batch, params, skip, tensor):
    kind, g = source.kind, grad.data
    if kind == "expand":
        pshape = tuple(source.info)
        if grad.form == "row":
            if len(pshape) == len(shape) and pshape[0] == batch:
                return chain_back(source.parent, grad, pshape, batch, params, skip)
            tail = pshape[1:] if len(pshape) == len(shape) else pshape
            lead = (1,) * (len(shape) - 1 - len(tail))
            g = g.sum_to_size((batch, *lead, *tail)).reshape(batch, *pshape)
        else:
            extra = len(shape) - len(pshape)
            if extra:
                g = g.sum(tuple(range(1, 1 + extra)))
            g = g.sum_to_size((batch, *pshape))
        return chain_back(source.parent, Grad("bcast", g), pshape, batch, params, skip)
    if kind == "reshape":
        pshape = tuple(source.info)
        if grad.form == "row":
            if not (pshape and pshape[0] == shape[0] == batch):
                raise Unsupported("a per-sample row of a reshaped parameter")
            return chain_back(
                source.parent, Grad("row", g.reshape(batch, *pshape[1:])), pshape, batch,
                params, skip,
            )  # fmt: skip
        return chain_back(
            source.parent, Grad("bcast", g.reshape(batch, *pshape)), pshape, batch, params, skip
        )
    if kind == "permute":
        perm = list(source.info)
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        pshape = tuple(shape[inv[d]] for d in range(len(perm)))
        if grad.form == "row":
            if perm[0] != 0:
                raise Unsupported("a per-sample row of a permuted parameter")
            g = g.permute(0, *[inv[d] for d in range(1, len(perm))])
            return chain_back(source.parent, Grad("row", g), pshape, batch, params, skip)
        g = g.permute(0, *[1 + inv[d] for d in range(len(perm))])
        return chain_back(source.parent, Grad("bcast", g), pshape, batch, params, skip)
    if kind == "embedding":
        if source.k in skip:
            return []
        ids, pad = source.info
        E = shape[-1]
        if grad.form == "row":
            if ids.dim() < 1 or ids.shape[0] != batch:
                raise Unsupported("a per-sample row of an embedding lookup without per-sample ids")
            idx = ids.reshape(batch, -1)
        else:
            idx = ids.reshape(1, -1).expand(batch, -1)
        b = g.reshape(batch, idx.shape[1], E)
        if pad is not None:
            b = b * (idx != pad).unsqueeze(-1).to(b.dtype)
        wshape = tuple(params[source.k].shape)
        return [(source.k, EmbeddingFactors(idx, b, wshape))]
    if kind == "param":
        return chain_back(source, grad, shape, batch, params, skip)
    return _chain_generic(source, grad, shape, batch, params, skip, tensor)


def _chain_generic(source, grad, shape, batch, params, skip, tensor):
    """``J_Dᵀ G_j`` for every sample by one batched vector-Jacobian product through autograd."""
    ks = sorted(k for k in source.params if k not in skip)
    if not ks:
        return []
    if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.grad_fn is None:
        raise Unsupported("the derivation of a parameter-derived tensor is not recorded")
    _rows_guard(batch, sum(params[k].numel() for k in ks), "a derived tensor's per-sample gradient")
    g = grad.data
    if grad.form == "row":
        _rows_guard(batch, batch * math.prod(shape[1:]), "a per-sample row of a derived tensor")
        full = g.new_zeros((batch, *shape))
        idx = torch.arange(batch, device=g.device)
        full[idx, idx] = g
        g = full
    g = g.to(tensor.dtype)
    try:
        with torch.enable_grad():
            found = torch.autograd.grad(
                tensor, [params[k] for k in ks], grad_outputs=g, retain_graph=True,
                allow_unused=True, is_grads_batched=True,
            )  # fmt: skip
    except RuntimeError:  # no batching rule somewhere in the derivation: one sample at a time
        rows = []
        for j in range(batch):
            with torch.enable_grad():
                rows.append(
                    torch.autograd.grad(
                        tensor,
                        [params[k] for k in ks],
                        grad_outputs=g[j],
                        retain_graph=True,
                        allow_unused=True,
                    )
                )
        found = tuple(
            torch.stack([r[i] if r[i] is not None else torch.zeros_like(params[k]) for r in rows])
            for i, k in enumerate(ks)
        )
    out = []
    for k, gk in zip(ks, found, strict=True):
        if gk is None:
            continue
        out.append((k, Rows({"p": gk})))
    return out


# -- the recorder -----------------------------------------------------------------------
_SKIP = {_T.size, _T.dim, _T.__len__, _T.numel, _T.is_floating_point, _T.element_size,
         _T.is_contiguous, _T.stride, _T.data_ptr, _T.__format__, _T.__repr__,
         _T.__bool__, _T.item, _T.tolist, _T.__int__, _T.__float__, _T.__index__}  # fmt: skip


def _in_place(func: Callable) -> bool:
    """``add_``, ``__iadd__``, ``__setitem__``, ...: the call modifies its first argument."""
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                        "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__",
                        "__ixor__", "__ilshift__", "__irshift__", "__imatmul__")  # fmt: skip
    return name.endswith("_")


def _store(slots: list, k: int, g: torch.Tensor) -> None:
    slots[k] = g.detach()


class UseRecorder(TorchFunctionMode):
    """Follow a forward's torch calls; keep every use of the wanted parameters.

    Parameters
    ----------
    params : sequence of Tensor
        The wanted parameters (index ``k`` in :attr:`sites`' sources).
    batch : int
        Samples in the batch (dim 0 of every data tensor a use meets).
    owned : callable
        ``owned() -> set of parameter indices`` whose uses are served by the
        module rule whose call is running (skipped here).
    wanted : iterable of int, optional
        The indices to follow (default: all); the others are constants here.

    After the forward, :attr:`sites` holds the uses (a site with ``problem``
    could not be served), :attr:`unserved` the parameters met in a call no
    rule serves (with the reason), :attr:`outputs` the hooked outputs.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        batch: int,
        owned: Callable[[], Iterable[int]] = frozenset,
        wanted: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        self.params = list(params)
        keep = None if wanted is None else set(wanted)
        self.index = {id(p): k for k, p in enumerate(self.params) if keep is None or k in keep}
        self.batch = int(batch)
        self.owned = owned
        self._data: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._derived: dict[int, tuple[weakref.ref, Source]] = {}
        self.sites: list[UseSite] = []
        self.unserved: dict[int, str] = {}
        self.outputs: list[tuple[torch.Tensor, int]] = []
        self.needs_graph = False
        self.rules_of: dict[int, set[str]] = {}  # parameter -> the use rules that served it

    # -- tags ----------------------------------------------------------------------------
    def mark_data(self, *values: Any) -> None:
        """Tag the model's inputs (any pytree of tensors) as data."""
        for t in tree_flatten(values)[0]:
            if isinstance(t, torch.Tensor):
                self._data[id(t)] = t

    def is_data(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is the model's input or computed from it."""
        return self._data.get(id(t)) is t

    def source_of(self, t: Any) -> Source | None:
        """Return the :class:`Source` of a parameter-derived tensor, or None."""
        if not isinstance(t, torch.Tensor):
            return None
        k = self.index.get(id(t))
        if k is not None:
            return _param_source(k)
        entry = self._derived.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def _tag_derived(self, t: torch.Tensor, source: Source) -> None:
        if source.kind == "generic":
            self.needs_graph = True
        self._derived[id(t)] = (weakref.ref(t), source)

    # -- the mode ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SKIP:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        data = any(self.is_data(t) for t in tensors)
        derived = []
        for pos, t in self._positions(args, kwargs):
            s = self.source_of(t)
            if s is not None:
                derived.append((pos, t, s))
        site = None
        if data and derived:
            site = self._open_site(func, derived)
            if site is not None and hasattr(site.rule, "before"):
                site.rule.before(site, args)
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if _in_place(func) and args and isinstance(args[0], torch.Tensor):
            outs.append(args[0])  # (the modified tensor, also when the call returns None)
        if data:
            for t in outs:
                self._data[id(t)] = t
                self._derived.pop(id(t), None)  # an in-place use of a derived tensor
            if site is not None:
                self._close_site(site, args, kwargs, out)
        elif derived:
            source = _derive(func, args, kwargs, [(t, s) for _, t, s in derived], out)
            if len(outs) > 1 or _in_place(func):
                source = Source("generic", source.params)
            for t in outs:
                self._tag_derived(t, source)
        return out

    @staticmethod
    def _positions(args: tuple, kwargs: dict):
        """``(role, tensor)`` for every tensor argument: its position, or its keyword."""
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                yield i, a
            elif isinstance(a, (list, tuple)):
                for j, t in enumerate(a):
                    if isinstance(t, torch.Tensor):
                        yield j, t  # a list argument (torch.cat): the index in the list
        for k, a in kwargs.items():
            if isinstance(a, torch.Tensor):
                yield k, a

    def _open_site(self, func, derived) -> UseSite | None:
        owned = frozenset(self.owned())
        mine = [(pos, t, s) for pos, t, s in derived if not s.params <= owned]
        if not mine:
            return None
        rule = registry.use_rules().get(func)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if rule is None:
            for _, _, s in mine:
                for k in s.params - owned:
                    self.unserved.setdefault(k, f"used by {name}, which has no per-sample use rule")
            return None
        operands = []
        site = UseSite(rule=rule, func=func, operands=operands, skip=frozenset(owned))
        for pos, t, s in mine:
            if isinstance(pos, str):  # a keyword operand: its position
                if pos not in rule.arg_names:
                    for k in s.params - owned:
                        self.unserved.setdefault(k, f"used by {name} as {pos}=")
                    return None
                pos = rule.arg_names.index(pos)
            operands.append((pos, s, tuple(t.shape)))
            if s.kind not in ("param", "embedding") or s.parent is not None:
                site.tensors.append(t)  # the derivation's graph, for a generic carry-back
        return site

    def _close_site(self, site: UseSite, args, kwargs, out) -> None:
        try:
            hooked = site.rule.record(site, args, kwargs, out, self.batch)
        except Unsupported as exc:
            site.problem = str(exc)
            hooked = []
        except Exception as exc:  # a hook must not break the user's forward
            site.problem = f"recording the use failed: {exc}"
            hooked = []
        site.grads = [None] * len(hooked)
        for i, t in enumerate(hooked):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(functools.partial(_store, site.grads, i))
                self.outputs.append((t, t._version))
        self.sites.append(site)

    # -- after the backward --------------------------------------------------------------
    def parts(self, skip_module: Callable[[int], bool] = lambda k: False):
        """Per-parameter kept forms of every served use, after the backward.

        Returns ``(parts, problems)``: ``{k: [(Factors, the name it serves k under), ...]}``
        and ``{k: reason}`` for the parameters some use could not serve (with
        :attr:`unserved`).
        """
        parts: dict[int, list[tuple[Factors, str]]] = {}
        problems = dict(self.unserved)
        for site in self.sites:
            ks = set().union(*(s.params for _, s, _ in site.operands))
            if site.problem is not None:
                for k in ks:
                    problems.setdefault(k, f"{site.rule.name} use: {site.problem}")
                continue
            if any(g is None for g in site.grads):
                continue  # the use did not reach the loss: its per-sample gradients are 0
            try:
                grads = site.rule.grads(site, self.batch)
                tensors = iter(site.tensors)
                for (_, source, shape), grad in zip(site.operands, grads, strict=True):
                    needs = source.kind not in ("param", "embedding") or source.parent is not None
                    tensor = next(tensors) if needs else None
                    for k, f in chain_back(
                        source, grad, shape, self.batch, self.params, site.skip, tensor
                    ):
                        parts.setdefault(k, []).append((f, f.names[0]))
                        self.rules_of.setdefault(k, set()).add(site.rule.name)
            except Unsupported as exc:
                for k in ks:
                    problems.setdefault(k, f"{site.rule.name} use: {exc}")
        return parts, problems
