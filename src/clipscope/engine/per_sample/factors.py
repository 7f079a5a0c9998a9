r"""Per-sample gradients in factored form: what the factor-keeping route keeps between passes.

Every layer rule writes sample j's gradient of a parameter from what the
module's calls recorded. :class:`Factors` is that factored form, kept: once
∇f is known, the per-sample dots and the γ-weighted sums the clipped sums
need follow from it without another forward.

Three forms cover every family:

:class:`Tokens`
    ``g_j(W) = Σ_t b_{jt} a_{jt}ᵀ`` and ``g_j(\text{bias}) = Σ_t b_{jt}`` (Linear on
    any leading dims, the nn.LSTM weights from their gate gradients):

    * ``‖g_j(W)‖²`` by :func:`~clipscope.engine.per_sample._common.gram_sq_norm`;
    * ``⟨g_j(W), V⟩ = Σ_t b_{jt}·(V a_{jt})``: one product with V, on the
      narrower side (``(b V)·a`` when ``Q > P``);
    * ``Σ_j w_j g_j(W) = (w ⊙ b)ᵀ a``: one weight-gradient product per row of w.
:class:`Rows`
    the per-sample gradients themselves, ``(B, numel)`` per parameter, where
    they are as small as the factors (normalization layers, convolutions
    with few weights, the module-local loop, the exact fallback):
    dots and weighted sums are matrix-vector products.
:class:`Joined`
    several forms of one module (a convolution's raw factors and its bias
    rows, the layers of an LSTM).

Convolutions whose per-sample weight gradients are larger than their input
and output gradient keep those (``conv.ConvFactors``); embeddings keep the
token ids and output gradients (``embedding.EmbeddingFactors``).

**Precision** (as everywhere in the per-sample rules): products of recorded
factors run in :func:`~clipscope.engine.per_sample._common.work_dtype`, as the
model's own backward would (the sum over a sample's tokens included); squares,
dots and every sum over samples are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from clipscope.engine.per_sample._common import (
    CHUNK_ELEMENTS,
    Directions,
    gram_sq_norm,
    sq_sum,
    sum64,
    up,
)
from clipscope.engine.per_sample.family import ParamGhost

__all__ = [
    "Factors",
    "Joined",
    "Rows",
    "Tokens",
    "Zero",
    "storage_bytes",
    "tensors_of",
    "token_dots",
]


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the distinct storages among ``tensors`` (a view counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def token_dots(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_t b_{jt}·(V a_{jt})`` for every sample j, float64 ``(B,)``.

    ``a`` ``(B, T, P)``, ``b`` ``(B, T, Q)``, ``v`` ``(Q, P)``; the elementwise
    product runs on the narrower of ``b V`` and ``a Vᵀ``.

    >>> a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    >>> v = torch.randn(5, 4, dtype=torch.float64)
    >>> G = torch.einsum("btq,btp->bqp", b, a)
    >>> bool(torch.allclose(token_dots(a, b, v), (G * v).sum((1, 2))))
    True
    """
    a, b = up(a), up(b)
    v = v.to(a.dtype)
    # the product is a fresh tensor: multiplied in place, then summed in float64
    if b.shape[-1] > a.shape[-1]:
        prod = (b @ v).mul_(a)
    else:
        prod = (a @ v.t()).mul_(b)
    return sum64(prod, (1, 2))


class Factors:
    """One module's per-sample gradients in one chunk, in a kept form.

    Subclasses implement :meth:`sq`, :meth:`proj`, :meth:`dots`,
    :meth:`weighted` and :attr:`nbytes` for the parameter names in :attr:`names`
    (the module's attributes, e.g. ``"weight"``).
    """

    names: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes this object keeps alive."""
        raise NotImplementedError

    def sq(self, name: str) -> torch.Tensor:
        """``‖g_j(p)‖²``, float64 ``(B,)``."""
        raise NotImplementedError

    def proj(self, name: str, dirs: Directions) -> torch.Tensor:
        """``⟨Σ_j g_j(p), R_i⟩`` on the structural check's directions, float64 ``(k,)``."""
        raise NotImplementedError

    def dots(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Σ_{p ∈ vectors} ⟨g_j(p), v_p⟩``, float64 ``(B,)`` (only the names given)."""
        raise NotImplementedError

    def weighted(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_j w_{ej} g_j(p)`` for each row of ``weights`` ``(E, B)``, float64 ``(E, *shape)``."""
        raise NotImplementedError

    def ghost(self, names: Iterable[str], dirs: Mapping[str, Directions]) -> dict[str, ParamGhost]:
        """Return the ghost pass's answer (:class:`ParamGhost` per name) from the kept form."""
        return {n: ParamGhost(self.sq(n), self.proj(n, dirs[n])) for n in names}


class Tokens(Factors):
    r"""``g_j(W) = Σ_t b_{jt} a_{jt}ᵀ``, ``g_j(\text{bias}) = Σ_t b_{jt}``.

    Parameters
    ----------
    a : Tensor or None
        ``(B, T, P)`` inputs (None when only a bias is served: then only
        ``Σ_t b_{jt}`` is kept, ``(B, Q)``, and :attr:`b` is None).
    b : Tensor
        ``(B, T, Q)`` output gradients.
    weight, bias : str or None
        The names under which the weight ``(Q, P)`` and the bias ``(Q,)`` are served.
    shape : tuple of int
        The weight's shape (``(Q, P)``).
    per_bias : Tensor, optional
        ``Σ_t b_{jt}`` when already formed (shared by the two biases of an LSTM layer).
    shared : dict, optional
        Where the Gram matrices of ``b`` are kept for another Tokens with the same ``b``
        (an LSTM layer's two weights).
    """

    def __init__(
        self,
        a: torch.Tensor | None,
        b: torch.Tensor,
        *,
        weight: str | None = None,
        bias: str | None = None,
        shape: tuple[int, ...] | None = None,
        per_bias: torch.Tensor | None = None,
        shared: dict | None = None,
    ) -> None:
        self.a = None if a is None else up(a)
        self.b = up(b)
        self.weight, self.bias = weight, bias
        self.shape = tuple(shape) if shape is not None else (self.b.shape[-1], -1)
        self.names = tuple(n for n in (weight, bias) if n is not None)
        self._per_bias = per_bias
        self._shared = shared
        if self.a is None and weight is None:
            # a bias alone needs Σ_t b_t only: the (B, T, Q) gradients are not kept alive
            self.per_bias  # noqa: B018 - formed now
            self.b = None

    @property
    def per_bias(self) -> torch.Tensor:
        """``Σ_t b_{jt}`` per sample, ``(B, Q)`` in the work dtype (as a backward sums them)."""
        if self._per_bias is None:
            self._per_bias = self.b.sum(1)
        return self._per_bias

    @property
    def nbytes(self) -> int:  # noqa: D102
        return storage_bytes(tensors_of(self))

    def sq(self, name):  # noqa: D102
        if name == self.weight:
            return gram_sq_norm(self.a, self.b, self._shared)
        return sq_sum(self.per_bias, (1,))

    def proj(self, name, dirs):  # noqa: D102
        if name == self.weight:
            return dirs.of_factors(self.a, self.b)
        return dirs.of_vector(self.per_bias.double())

    def dots(self, vectors):  # noqa: D102
        first = self.per_bias if self.b is None else self.b
        out = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
        if self.weight in vectors:
            v = vectors[self.weight]
            out += token_dots(self.a, self.b, v.reshape(v.shape[0], -1))
        if self.bias in vectors:
            out += self.per_bias.double() @ vectors[self.bias].double()
        return out

    def weighted(self, name, weights):  # noqa: D102
        if name == self.bias:
            per_bias = self.per_bias
            return weights.to(device=per_bias.device).double() @ per_bias.double()
        w = weights.to(device=self.b.device)
        B, T, Q = self.b.shape
        P = self.a.shape[-1]
        # the weights are per sample: scale the narrower factor, for several rows of weights
        # at once (one product with E·min(P, Q) columns), in groups of bounded size
        narrow, wide = (self.a, self.b) if P <= Q else (self.b, self.a)
        n = narrow.shape[-1]
        wide2 = wide.reshape(B * T, -1)
        step = max(1, CHUNK_ELEMENTS // max(1, B * T * n))
        out = []
        for s in range(0, w.shape[0], step):
            we = w[s : s + step].to(narrow.dtype)
            E = we.shape[0]
            scaled = narrow.unsqueeze(0) * we.view(E, B, 1, 1)  # (E, B, T, n)
            scaled = scaled.permute(1, 2, 0, 3).reshape(B * T, E * n)
            prod = wide2.t() @ scaled  # (wide, E·n)
            prod = prod.reshape(-1, E, n).permute(1, 0, 2)  # (E, wide, n)
            out.append((prod if P <= Q else prod.transpose(1, 2)).double())  # (E, Q, P)
        return torch.cat(out).reshape(w.shape[0], *self.shape)


_BLOCK = 1 << 18  # elements of the rows cast to float64 at a time (2 MiB)


class Rows(Factors):
    """Materialized per-sample gradients: ``{name: (B, *shape)}`` in the work dtype.

    Norms, dots and weighted sums are formed in float64, a block of rows at a
    time; the structural check's projection reads the rows once in the work
    dtype (:meth:`Directions.of_rows`). A view that holds less than half of its
    storage (a class token's slice of a ``(B, T, D)`` gradient) is kept as a
    copy of its own: the storage is not kept alive for it.
    """

    def __init__(self, rows: Mapping[str, torch.Tensor]) -> None:
        self.rows = {n: _compact(up(r.detach())) for n, r in rows.items()}
        self.names = tuple(self.rows)

    @property
    def nbytes(self) -> int:  # noqa: D102
        return storage_bytes(self.rows.values())

    def _flat(self, name: str) -> torch.Tensor:
        r = self.rows[name]
        return r.reshape(r.shape[0], -1)

    def _blocks(self, name: str):
        """``(rows, the rows in float64)`` in blocks of at most ``_BLOCK`` elements.

        A float64 block may be the kept rows themselves (float64 models): read only.
        """
        flat = self._flat(name)
        step = max(1, _BLOCK // max(1, flat.shape[1]))
        for s in range(0, flat.shape[0], step):
            yield slice(s, s + step), flat[s : s + step].double()

    def sq(self, name):  # noqa: D102
        flat = self._flat(name)
        copy = flat.dtype != torch.float64  # then each block is a float64 copy: squared in place
        out = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
        for rows, block in self._blocks(name):
            out[rows] = (block.square_() if copy else block.square()).sum(1)
        return out

    def proj(self, name, dirs):  # noqa: D102
        return dirs.of_rows(self._flat(name))

    def dots(self, vectors):  # noqa: D102
        first = next(iter(self.rows.values()))
        out = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
        for name, v in vectors.items():
            if name in self.rows:
                v64 = v.reshape(-1).double()
                for rows, block in self._blocks(name):
                    out[rows] += block @ v64
        return out

    def weighted(self, name, weights):  # noqa: D102
        r = self.rows[name]
        w = weights.to(r.device).double()
        n = self._flat(name).shape[1]
        flat = torch.zeros(w.shape[0], n, dtype=torch.float64, device=r.device)
        for rows, block in self._blocks(name):
            flat += w[:, rows] @ block
        return flat.reshape(weights.shape[0], *r.shape[1:])


class Zero(Factors):
    """A module none of whose calls reached the loss: every per-sample gradient is 0."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], batch: int, device) -> None:
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.names = tuple(self.shapes)
        self.batch, self.device = batch, device

    @property
    def nbytes(self) -> int:  # noqa: D102
        return 0

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=self.device)

    def sq(self, name):  # noqa: D102
        return self._zeros(self.batch)

    def proj(self, name, dirs):  # noqa: D102
        return self._zeros(dirs.u.shape[1])

    def dots(self, vectors):  # noqa: D102
        return self._zeros(self.batch)

    def weighted(self, name, weights):  # noqa: D102
        return self._zeros(weights.shape[0], *self.shapes[name])


class Joined(Factors):
    """Several :class:`Factors` of one module, each serving its own names."""

    def __init__(self, parts: Iterable[Factors]) -> None:
        self.parts = [p for p in parts if p.names]
        self.owner = {n: p for p in self.parts for n in p.names}
        self.names = tuple(self.owner)

    @property
    def nbytes(self) -> int:  # noqa: D102
        return storage_bytes(t for p in self.parts for t in tensors_of(p))

    def sq(self, name):  # noqa: D102
        return self.owner[name].sq(name)

    def proj(self, name, dirs):  # noqa: D102
        return self.owner[name].proj(name, dirs)

    def dots(self, vectors):  # noqa: D102
        total = None
        for p in self.parts:
            mine = {n: v for n, v in vectors.items() if n in p.names}
            if mine:
                d = p.dots(mine)
                total = d if total is None else total + d
        if total is None:
            raise ValueError("none of the vectors' names is served here")
        return total

    def weighted(self, name, weights):  # noqa: D102
        return self.owner[name].weighted(name, weights)

    def ghost(self, names, dirs):  # noqa: D102
        names = list(names)
        out: dict[str, ParamGhost] = {}
        for p in self.parts:
            mine = [n for n in names if n in p.names]
            if mine:
                out.update(p.ghost(mine, dirs))
        return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view holding less than half of its storage."""
    if 2 * t.numel() * t.element_size() < t.untyped_storage().nbytes():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def tensors_of(f: Factors) -> list[torch.Tensor | None]:
    """Return the tensors a factors object keeps (to count shared storages once)."""
    if isinstance(f, Tokens):
        return [f.a, f.b, f._per_bias if f.bias else None]
    if isinstance(f, Rows):
        return list(f.rows.values())
    if isinstance(f, Joined):
        return [t for p in f.parts for t in tensors_of(p)]
    kept = getattr(f, "kept_tensors", None)
    return list(kept()) if kept is not None else []
