r"""One parameter, several uses: per-sample gradients that are sums of kept forms.

A parameter used in more than one place -- an embedding whose weight is also
the output projection (GPT-2's tied ``lm_head``, ``F.linear(h, wte.weight)``),
a weight registered in two modules, a module weight also read outside its
module -- has, for sample j, the gradient ``g_j = Σ_k g_j^{(k)}``, one term per
use, each in the kept form its rule writes (:mod:`~clipscope.engine.per_sample.factors`).
Dots, batch-gradient projections and weighted sums are linear and add up;
the squared norm needs the cross terms:

.. math:: ‖g_j‖^2 = \sum_k ‖g_j^{(k)}‖^2 + 2 \sum_{k < l} ⟨g_j^{(k)}, g_j^{(l)}⟩ .

:func:`cross` forms ``⟨g_j^{(k)}, g_j^{(l)}⟩`` for every sample without
forming the per-sample gradients where both forms allow it:

* Tokens × Tokens (``Σ_t b_t a_tᵀ`` and ``Σ_s b'_s a'_sᵀ``):
  ``Σ_{t,s} (a_t·a'_s)(b_t·b'_s)`` -- Li et al.'s ghost identity across two uses;
* Tokens × embedding rows (``Σ_t e_{i_t} c_tᵀ``): ``Σ_{t,s} b'_s[i_t] (c_t·a'_s)``;
* embedding rows × embedding rows: ``Σ_{t,s: i_t = i'_s} c_t·c'_s``;
* anything × per-sample rows ``R_j``: ``⟨g_j^{(k)}, R_j⟩`` by :func:`dots_rows`;

and otherwise from one side's per-sample gradients, materialized in blocks
(``weighted`` with the identity's rows), which is exact and bounded in memory.
Every cross product accumulates in float64; the sum of squares can lose
digits where the uses cancel, which the per-sample route's spot check sees
like any other rule error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipscope.engine.per_sample._common import CHUNK_ELEMENTS, Directions, sum64, up
from clipscope.engine.per_sample.embedding import EmbeddingFactors
from clipscope.engine.per_sample.factors import (
    Factors,
    Rows,
    Tokens,
    Zero,
    storage_bytes,
    tensors_of,
)

__all__ = ["Part", "Summed", "cross", "dots_rows"]

#: One use's kept form and the name under which it holds the parameter.
Part = tuple[Factors, str]


def _tokens_weight(f: Factors, name: str) -> bool:
    return isinstance(f, Tokens) and name == f.weight and f.a is not None


def _tokens_bias(f: Factors, name: str) -> bool:
    return isinstance(f, Tokens) and name == f.bias


def _gram_cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x yᵀ`` per sample, ``(B, T, T')``, in the wider of the two dtypes."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    return torch.bmm(x.to(dtype), y.to(dtype).transpose(1, 2))


def _chunks(batch: int, per_sample: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for s in range(0, batch, step):
        yield slice(s, min(batch, s + step))


def _tokens_tokens(f: Tokens, g: Tokens) -> torch.Tensor:
    B, T, _ = f.b.shape
    T2 = g.b.shape[1]
    out = torch.empty(B, dtype=torch.float64, device=f.b.device)
    for s in _chunks(B, T * T2):
        ga = _gram_cross(f.a[s], g.a[s])
        gb = _gram_cross(f.b[s], g.b[s])
        out[s] = sum64(ga.mul_(gb), (1, 2))
    return out


def _tokens_embedding(f: Tokens, e: EmbeddingFactors) -> torch.Tensor:
    """``Σ_{t,s} b_s[i_t] (c_t·a_s)``: f's rows ``b`` index the embedding's rows."""
    B, S, _ = f.b.shape
    T = e.idx.shape[1]
    out = torch.empty(B, dtype=torch.float64, device=f.b.device)
    for s in _chunks(B, S * T):
        picked = torch.gather(f.b[s], 2, e.idx[s].unsqueeze(1).expand(-1, S, -1))  # (n, S, T)
        dots = _gram_cross(f.a[s], e.b[s])  # (n, S, T)
        out[s] = sum64(dots.mul_(picked.to(dots.dtype)), (1, 2))
    return out


def _embedding_embedding(e: EmbeddingFactors, h: EmbeddingFactors) -> torch.Tensor:
    B, T = e.idx.shape
    T2 = h.idx.shape[1]
    out = torch.empty(B, dtype=torch.float64, device=e.b.device)
    for s in _chunks(B, T * T2):
        same = e.idx[s].unsqueeze(2) == h.idx[s].unsqueeze(1)
        out[s] = sum64(_gram_cross(e.b[s], h.b[s]).mul_(same), (1, 2))
    return out


def dots_rows(f: Factors, name: str, rows: torch.Tensor) -> torch.Tensor | None:
    """``⟨g_j(p), R_j⟩`` for every sample j, float64 ``(B,)``, or None where not written out.

    ``rows`` ``(B, *shape)``: one tensor per sample (another use's per-sample
    gradients). Tokens: ``Σ_t b_tᵀ R_j a_t``; embedding rows: ``Σ_t c_t·R_j[i_t]``;
    rows: the elementwise product.
    """
    B = rows.shape[0]
    if isinstance(f, Zero):
        return torch.zeros(B, dtype=torch.float64, device=rows.device)
    if isinstance(f, Rows):
        mine = f.rows[name].reshape(B, -1)
        dtype = torch.promote_types(mine.dtype, rows.dtype)
        return sum64(mine.to(dtype) * rows.reshape(B, -1).to(dtype), (1,))
    if _tokens_weight(f, name):
        R = up(rows).reshape(B, f.b.shape[-1], -1)
        dtype = torch.promote_types(R.dtype, f.b.dtype)
        bR = torch.bmm(f.b.to(dtype), R.to(dtype))  # (B, T, P)
        return sum64(bR.mul_(f.a.to(dtype)), (1, 2))
    if _tokens_bias(f, name):
        return (f.per_bias.double() * rows.reshape(B, -1).double()).sum(1)
    if isinstance(f, EmbeddingFactors):
        R = up(rows).reshape(B, -1, f.b.shape[-1])  # (B, V, D)
        picked = torch.gather(R, 1, f.idx.unsqueeze(-1).expand(-1, -1, R.shape[-1]))  # (B, T, D)
        dtype = torch.promote_types(picked.dtype, f.b.dtype)
        return sum64(picked.to(dtype) * f.b.to(dtype), (1, 2))
    return None


def _materialized(f: Factors, name: str, batch: int, shape: Sequence[int], device) -> Rows:
    """Per-sample gradients ``(B, *shape)`` from ``weighted`` with the identity's rows."""
    eye = torch.eye(batch, dtype=torch.float64, device=device)
    return Rows({name: f.weighted(name, eye).reshape(batch, *shape)})


def cross(first: Part, second: Part, batch: int, shape: Sequence[int], device=None) -> torch.Tensor:
    """``⟨g_j^{(1)}, g_j^{(2)}⟩`` for every sample j, float64 ``(B,)``.

    ``first``, ``second``: ``(factors, name)`` of two uses of one parameter of
    shape ``shape``. Without a closed form for the pair, one side's per-sample
    gradients are formed (``B·numel`` float64 elements).
    """
    (f, n), (g, m) = first, second
    if isinstance(f, Zero) or isinstance(g, Zero):
        return torch.zeros(batch, dtype=torch.float64, device=device)
    if _tokens_weight(f, n) and _tokens_weight(g, m):
        return _tokens_tokens(f, g)
    if _tokens_bias(f, n) and _tokens_bias(g, m):
        return (f.per_bias.double() * g.per_bias.double()).sum(1)
    if _tokens_weight(f, n) and isinstance(g, EmbeddingFactors):
        return _tokens_embedding(f, g)
    if isinstance(f, EmbeddingFactors) and _tokens_weight(g, m):
        return _tokens_embedding(g, f)
    if isinstance(f, EmbeddingFactors) and isinstance(g, EmbeddingFactors):
        return _embedding_embedding(f, g)
    if isinstance(g, Rows):
        out = dots_rows(f, n, g.rows[m])
        if out is not None:
            return out
    if isinstance(f, Rows):
        out = dots_rows(g, m, f.rows[n])
        if out is not None:
            return out
    rows = _materialized(g, m, batch, shape, device)
    out = dots_rows(f, n, rows.rows[m])
    if out is None:  # neither side has a product with rows: both materialized
        mine = _materialized(f, n, batch, shape, device)
        out = dots_rows(mine, n, rows.rows[m])
    return out


class Summed(Factors):
    """The per-sample gradients of one parameter as the sum of its uses' kept forms.

    Parameters
    ----------
    parts : sequence of (Factors, str)
        Each use's kept form and the name it serves the parameter under.
    name : str
        The name this object serves the parameter under.
    shape : tuple of int
        The parameter's shape.
    batch : int
        Samples in the chunk.
    """

    def __init__(
        self, parts: Sequence[Part], name: str, shape: Sequence[int], batch: int, device=None
    ) -> None:
        if not parts:
            raise ValueError("Summed needs at least one part")
        self.parts = list(parts)
        self.name, self.shape, self.batch, self.device = name, tuple(shape), int(batch), device
        self.names = (name,)

    def kept_tensors(self):  # noqa: D102
        return [t for f, _ in self.parts for t in tensors_of(f)]

    @property
    def nbytes(self) -> int:  # noqa: D102
        return storage_bytes(self.kept_tensors())

    def sq(self, name):
        """``Σ_k ‖g^{(k)}‖² + 2 Σ_{k<l} ⟨g^{(k)}, g^{(l)}⟩`` per sample."""
        total = None
        for k, (f, n) in enumerate(self.parts):
            s = f.sq(n)
            for g, m in self.parts[k + 1 :]:
                s = s + 2.0 * cross((f, n), (g, m), self.batch, self.shape, self.device)
            total = s if total is None else total + s
        return total

    def proj(self, name, dirs: Directions):  # noqa: D102
        return sum(f.proj(n, dirs) for f, n in self.parts)

    def dots(self, vectors):  # noqa: D102
        v = vectors[self.name]
        return sum(f.dots({n: v}) for f, n in self.parts)

    def weighted(self, name, weights):  # noqa: D102
        return sum(f.weighted(n, weights) for f, n in self.parts)
