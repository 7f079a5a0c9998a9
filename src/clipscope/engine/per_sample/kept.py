r"""The factor-keeping per-sample route: pass 1 keeps what the dots need, pass 2 runs no model.

The per-sample route needs ``⟨g_j, ∇f⟩`` for every sample, and ∇f is known
only after every chunk has been seen. The two-pass route runs the model
again for it (a forward-mode pass, or a hooked forward and backward). This
route keeps, from pass 1, each layer's per-sample gradients in the factored
form its rule already uses (:mod:`~clipscope.engine.per_sample.factors`: the
inputs and output gradients of a Linear, the gate gradients and inputs of an
``nn.LSTM``, a convolution's per-sample weights or its raw input and output
gradient, an embedding's token ids and output gradients) and, for the
parameters on the exact fallback, their per-sample gradients themselves.
Once ∇f is known:

* ``d_j = Σ_layers ⟨g_j(θ_layer), ∇f_layer⟩`` from the kept factors
  (:meth:`KeptChunk.dots`), without a forward;
* every clipped sum ``Σ_j γ_j(η) g_j`` from the same factors
  (:meth:`KeptChunk.weighted`), without a backward.

Everything pass 1 checks still holds: the norms come from the same factors
(:meth:`~clipscope.engine.per_sample.factors.Factors.ghost`) and are checked
structurally against the actual batch gradient; ∇f is the actual backward's
gradient; the spot check compares each spot sample's norms and dot with its
own backward. It costs memory: :attr:`KeptChunk.nbytes` per chunk, checked
against the probe's ``memory_budget``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipscope.engine.per_sample.factors import Factors, storage_bytes, tensors_of

__all__ = ["KeptChunk"]


class KeptChunk:
    """One chunk's per-sample gradients, in kept forms, for every parameter of a plan.

    Parameters
    ----------
    batch : int
        Samples in the chunk.
    entries : list of (Factors, dict, float)
        Each kept form, the parameter index of each name it serves (only the
        names whose check passed), and the scale its factors carry (the
        backward's seed for float16/bfloat16, else 1).
    """

    def __init__(self, batch: int, entries: Sequence[tuple[Factors, dict[str, int], float]]):
        self.batch = int(batch)
        self.entries = [(f, dict(names), float(s)) for f, names, s in entries if names]

    @property
    def nbytes(self) -> int:
        """Bytes the kept forms hold (shared storages counted once)."""
        return storage_bytes(t for f, _, _ in self.entries for t in tensors_of(f))

    @property
    def params(self) -> set[int]:
        """Indices of the parameters served."""
        return {k for _, names, _ in self.entries for k in names.values()}

    def dots(self, vector: Sequence[torch.Tensor]) -> torch.Tensor:
        """``⟨g_j, v⟩`` for every sample, float64 ``(B,)``; ``vector`` one tensor per parameter."""
        out = None
        for f, names, scale in self.entries:
            d = f.dots({n: vector[k] for n, k in names.items()})
            d = d / scale if scale != 1.0 else d
            out = d if out is None else out + d
        if out is None:
            raise ValueError("nothing is kept")
        return out

    def weighted(self, weights: torch.Tensor) -> dict[int, torch.Tensor]:
        """``Σ_j w_{ej} g_j(p)`` per parameter index: float64 ``(E, *shape)``."""
        out: dict[int, torch.Tensor] = {}
        for f, names, scale in self.entries:
            for n, k in names.items():
                w = f.weighted(n, weights)
                out[k] = w / scale if scale != 1.0 else w
        return out
