"""Arithmetic shared by the per-sample rules: float64 accumulation, Gram sums, test directions.

Every rule turns what a module call recorded (its input ``a`` and the
gradient ``b`` of the summed loss w.r.t. its output) into per-sample squared
norms. Three habits hold everywhere:

* **float64 accumulation.** Squares and sums of squares are formed in
  float64. Matrix products of recorded factors run in :func:`work_dtype`: the
  model's dtype for float32/float64, float64 for float16/bfloat16 (whose
  products and Gram sums overflow long before float64 would). A float32
  product that still overflows is redone in float64. Reductions to float64
  go through :func:`sum64` (a float64 copy, then the sum: the same float64
  accumulation as ``t.sum(dtype=torch.float64)``, up to 2x faster on CPU for
  wide tensors, in blocks of bounded size).
* **Bounded memory.** Anything that materializes per-sample gradients does it
  in chunks of at most :data:`CHUNK_ELEMENTS` numbers.
* **Test directions.** The structural check (:mod:`clipscope.engine.verify`)
  compares, for every parameter, the batch gradient a rule accounts for with
  the parameter's actual batch gradient. Both sides are projected on ``k``
  random rank-one matrices ``R_i = u_i w_iᵀ`` (:class:`Directions`), so the
  rule never forms its batch gradient: for a Linear, ``⟨Σ_t b_t a_tᵀ, u wᵀ⟩ =
  Σ_t (b_t·u)(a_t·w)`` costs ``O(T(P + Q))`` instead of ``O(TPQ)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "Directions",
    "cat_tokens",
    "dense_grad",
    "gram_sq_norm",
    "per_sample_matrices",
    "rng_replay",
    "rng_snapshot",
    "sq_sum",
    "sum64",
    "up",
    "work_dtype",
]

# Largest number of numbers one chunk of materialized per-sample gradients may
# hold (about 256 MiB in float32).
CHUNK_ELEMENTS = 1 << 26

# Elements of a tensor that :func:`sum64` copies to float64 at a time (16 MiB).
SUM64_BLOCK = 1 << 21


def rng_snapshot(device: torch.device | None = None) -> tuple:
    """Return the global RNG state (CPU, and ``device``'s when it is a CUDA device)."""
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = (device, torch.cuda.get_rng_state(device))
    return torch.random.get_rng_state(), cuda


@contextlib.contextmanager
def rng_replay(snapshot: tuple) -> Iterator[None]:
    """Run the block from a recorded RNG state; the caller's stream is restored afterwards."""
    cpu, cuda = snapshot
    devices = [cuda[0]] if cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        yield


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for products of recorded factors: float32/float64 as is, anything else float64.

    >>> work_dtype(torch.float16), work_dtype(torch.float32)
    (torch.float64, torch.float32)
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`work_dtype` (no copy for float32/float64)."""
    dt = work_dtype(t.dtype)
    return t if t.dtype == dt else t.to(dt)


def sq_sum(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``Σ t²`` over ``dims`` in float64 (squared in float64, so nothing overflows)."""
    t = t.to(torch.float64, copy=True)  # a copy of its own: squared in place
    return t.square_().sum(dims)


def sum64(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``Σ t`` over ``dims``, accumulated in float64: float64 ``t.sum(dims)``.

    The float64 copy is summed (not ``t.sum(dims, dtype=torch.float64)``, whose
    CPU kernel converts element by element: up to 2x slower on the rules'
    ``(B, T, Q)`` products); the copy is made a block of samples (dim 0) at a
    time, at most :data:`SUM64_BLOCK` elements. Every float32 element is exact
    in float64: the result is the float64 sum of the same numbers.

    >>> t = torch.randn(5, 3, 4)
    >>> bool(torch.allclose(sum64(t, (1, 2)), t.double().sum((1, 2)), rtol=1e-15, atol=0))
    True
    """
    if t.dtype == torch.float64:
        return t.sum(dims)
    dims = tuple(d % t.dim() for d in dims)
    n = t.shape[0] if t.dim() else 1
    step = max(1, SUM64_BLOCK // max(1, t[0].numel() if t.dim() else 1))
    if step >= n:
        return t.double().sum(dims)
    parts = [t[s : s + step].double().sum(dims) for s in range(0, n, step)]
    if 0 in dims:
        return torch.stack(parts).sum(0)
    return torch.cat(parts)


def per_sample_matrices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G_j = Σ_t b_{jt} a_{jt}ᵀ`` for every sample, ``(B, Q, P)`` in the work dtype.

    ``a`` ``(B, T, P)``, ``b`` ``(B, T, Q)``: one batched product per chunk of
    at most :data:`CHUNK_ELEMENTS` numbers of output, the sum over a sample's
    tokens in the work dtype, as the model's own weight-gradient product.
    """
    a, b = up(a), up(b)
    B, _, P = a.shape
    Q = b.shape[2]
    step = max(1, CHUNK_ELEMENTS // max(1, P * Q))
    if step >= B:
        return torch.bmm(b.transpose(1, 2), a)
    return torch.cat(
        [torch.bmm(b[s : s + step].transpose(1, 2), a[s : s + step]) for s in range(0, B, step)]
    )


def dense_grad(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """Return a gradient as a dense tensor: zeros for ``None`` (unused), sparse densified."""
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.layout != torch.strided else g


def cat_tokens(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(B, T_k, ·)`` token tensors of a shared module's calls along dim 1."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def gram_sq_norm(a: torch.Tensor, b: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
    """``‖Σ_t b_t a_tᵀ‖²`` for every sample, float64 ``(B,)``.

    ``a`` ``(B, T, P)``, ``b`` ``(B, T, Q)``. Whichever costs less: the ghost
    identity ``Σ_{t,s} (a_t·a_s)(b_t·b_s)`` (Li et al. 2021) when
    ``T(P + Q) ≤ PQ``, else the per-sample matrices in chunks. ``T = 1`` is
    ``‖a‖²‖b‖²`` (Goodfellow 2015). ``shared``: a dict through which the
    Gram matrices ``b bᵀ`` pass to the next call with the same ``b`` (an LSTM
    layer's two weights share their gate gradients), when they fit one chunk;
    that call removes them.

    >>> a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    >>> G = torch.einsum("btq,btp->bqp", b, a)
    >>> bool(torch.allclose(gram_sq_norm(a, b), G.square().sum((1, 2))))
    True
    """
    a, b = up(a), up(b)
    B, T, P = a.shape
    Q = b.shape[2]
    if T == 1:
        return sq_sum(a, (1, 2)) * sq_sum(b, (1, 2))
    if T * (P + Q) <= P * Q:
        out = _ghost_gram(a, b, shared)
        if not bool(torch.isfinite(out).all()) and a.dtype != torch.float64:
            out = _ghost_gram(a.double(), b.double())
        return out
    out = torch.empty(B, dtype=torch.float64, device=a.device)
    step = max(1, CHUNK_ELEMENTS // max(1, P * Q))
    for s in range(0, B, step):
        g = per_sample_matrices(a[s : s + step], b[s : s + step])  # (chunk, Q, P)
        out[s : s + step] = sq_sum(g, (1, 2))
    return out


def _ghost_gram(a: torch.Tensor, b: torch.Tensor, shared: dict | None = None) -> torch.Tensor:
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    T = a.shape[1]
    step = max(1, CHUNK_ELEMENTS // max(1, T * T))
    whole = step >= a.shape[0]  # one chunk: b bᵀ may be kept for the next call with this b
    for s in range(0, a.shape[0], step):
        ga = torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))
        gb = None
        if whole and shared is not None:
            gb = shared.pop("gram", None)  # the second call takes it: nothing stays behind
        if gb is None:
            gb = torch.bmm(b[s : s + step], b[s : s + step].transpose(1, 2))
            if whole and shared is not None:
                shared["gram"] = gb
        # ga is a fresh product: multiplied in place, then summed in float64
        out[s : s + step] = sum64(ga.mul_(gb), (1, 2))
    return out


class Directions:
    """``k`` random rank-one test matrices ``R_i = u_i w_iᵀ`` for one parameter.

    The parameter is viewed as a ``(Q, P)`` matrix (``Q = shape[0]``, ``P`` the
    product of the other dims; a vector is ``(Q, 1)``). ``u`` ``(Q, k)`` and
    ``w`` ``(P, k)`` have independent standard normal entries (float64), so for
    any fixed error ``δ`` the projection ``u_iᵀ δ w_i`` has variance ``‖δ‖²_F``:
    an error of relative size ρ shows as ρ times the gradient's scale, not
    diluted by the parameter count.

    >>> d = Directions((3, 2), k=2, generator=torch.Generator().manual_seed(0))
    >>> G = torch.randn(3, 2, dtype=torch.float64)
    >>> a, b = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    >>> bool(torch.allclose(d.of_factors(a, b), d.of_tensor(b.t() @ a)))
    True
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        k: int = 2,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.shape = tuple(shape)
        self.Q = int(shape[0]) if len(shape) else 1
        self.P = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        u = torch.randn(self.Q, k, dtype=torch.float64, generator=generator)
        w = torch.randn(self.P, k, dtype=torch.float64, generator=generator)
        # column-major (the same values): a product with k columns reads them as k contiguous
        # rows, 3x faster on CPU than row-major ones (a (2240, 3000) by (3000, 2) product);
        # .to(dtype) keeps the layout
        self.u, self.w = (t.t().contiguous().t().to(device) for t in (u, w))

    def to(self, device: torch.device) -> Directions:
        """Move to ``device`` in place (a no-op when already there); returns self."""
        if self.u.device != device:
            self.u, self.w = self.u.to(device), self.w.to(device)
        return self

    def of_factors(
        self, a: torch.Tensor, b: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """``Σ_t ⟨b_t a_tᵀ, R_i⟩ = Σ_t (b_t·u_i)(a_t·w_i)`` for every i, float64 ``(k,)``.

        ``a`` ``(..., P)``, ``b`` ``(..., Q')``; ``rows`` selects the ``Q'`` rows of
        ``u`` that ``b`` feeds (one group of a grouped convolution).
        """
        if self.u.shape[1] == 0:
            return self.u.new_zeros(0)
        u = self.u if rows is None else self.u[rows]
        a, b = up(a), up(b)
        # matmul reads strided (transposed) views in place: no copy of the patches
        au = torch.matmul(a, self.w.to(a.dtype)).reshape(-1, self.w.shape[1])
        bu = torch.matmul(b, u.to(b.dtype)).reshape(-1, u.shape[1])
        return (au.double() * bu.double()).sum(0)

    def of_factors_t(
        self, a: torch.Tensor, b: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        """:meth:`of_factors` with tokens along the last dim: ``a (B, P, T)``, ``b (B, Q', T)``.

        The layout ``F.unfold`` and a convolution's output gradient already
        have: two batched products with a ``(k, ·)`` matrix, no copies.
        """
        if self.u.shape[1] == 0:
            return self.u.new_zeros(0)
        u = self.u if rows is None else self.u[rows]
        a, b = up(a), up(b)
        aw = torch.matmul(self.w.t().to(a.dtype), a)  # (B, k, T)
        bu = torch.matmul(u.t().to(b.dtype), b)
        return (aw.double() * bu.double()).sum((0, 2))

    def of_rows(self, G: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``⟨Σ_j G_j, R_i⟩`` for every i, float64 ``(k,)``, from per-sample matrices.

        ``G`` ``(B, Q', P)`` (or ``(B, Q'·P)``): the per-sample gradients of the
        ``Q'`` rows ``rows`` (default: all). One product ``G w`` reads them once
        in the work dtype, a length-``P`` dot per row as in :meth:`of_factors`;
        the sums over the samples and the rows run in float64. Never a float64
        copy of ``G``.
        """
        if self.u.shape[1] == 0:
            return self.u.new_zeros(0)
        u = self.u if rows is None else self.u[rows]
        G = up(G)
        B = G.shape[0]
        Gw = G.reshape(-1, self.P) @ self.w.to(G.dtype)  # (B·Q', k)
        return (sum64(Gw.reshape(B, -1, Gw.shape[1]), (0,)) * u).sum(0)

    def of_vector(self, b: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``Σ_t ⟨b_t, R_i⟩`` for a vector parameter (``P = 1``), float64 ``(k,)``."""
        u = self.u if rows is None else self.u[rows]
        return (b.reshape(-1, b.shape[-1]).double() @ u).sum(0) * self.w[0]

    def of_tensor(self, G: torch.Tensor) -> torch.Tensor:
        """``⟨G, R_i⟩`` for every i, float64 ``(k,)``; ``G`` parameter-shaped, dense or sparse."""
        if G.is_sparse:
            G = G.coalesce()
            rows = G.indices()[0]
            vals = up(G.values()).reshape(rows.shape[0], -1)
            return ((vals @ self.w.to(vals.dtype)).double() * self.u[rows]).sum(0)
        if G.layout != torch.strided:
            G = G.to_dense()
        G = up(G).reshape(self.Q, self.P)
        return ((G @ self.w.to(G.dtype)).double() * self.u).sum(0)
