r"""A small GPT-2-style language model (nanoGPT's architecture) with the sequential LM interface.

:class:`GPT` is the batch-first transformer: token and learned position
embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention through
:func:`torch.nn.functional.scaled_dot_product_attention` with
``is_causal=True``, then a GELU MLP of width ``4·d``, each added to the
residual stream), a final LayerNorm and a head tied to the token embedding
(``logits = LN(x) Eᵀ``, no bias), initialised as nanoGPT does (normal, std
0.02; the residual projections std ``0.02/√(2·n_layer)``; zero biases). No
dropout: every component loss is a function of the parameters alone.

:class:`GPTLM` wraps it in the project's sequential interface
``model(inp (T, B), state) -> (logits (T, B, V), state)``: the ``state`` is
passed through unchanged (``None`` stays ``None``). A window is read on its
own: the model attends only within its ``T ≤ context`` tokens, never to an
earlier window, so consecutive components are independent given the
parameters (unlike an LSTM's carried state).

Why scaled-dot-product attention and not ``nn.MultiheadAttention``: the
functional call keeps the projections as two ordinary ``nn.Linear`` (``qkv``,
``proj``) as nanoGPT writes them, which the per-sample route's Linear rule
serves (``nn.MultiheadAttention`` has a rule of its own, ``docs/engine.md``);
``tests/test_gpt.py`` checks that ``probe(..., batch_sizes=[1])`` on
``GPTLM.transformer`` reports no fallback.

>>> m = GPTLM(vocab=11, n_layer=1, n_head=2, d_model=8, context=6)
>>> logits, state = m(torch.zeros(5, 3, dtype=torch.long), None)
>>> tuple(logits.shape), state is None, m.transformer.lm_head_weight is m.transformer.wte.weight
((5, 3, 11), True, True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clipscope.models._checks import check_positive_int

__all__ = ["GPT", "GPTLM", "Block", "CausalSelfAttention"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``(B, T, d)``: ``qkv`` and ``proj`` Linears."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(B, T, d)``: position t attends to positions ``≤ t`` only."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU, width 4d)."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block's output, shaped like ``x`` ``(B, T, d)``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """Batch-first GPT: ``idx (B, T)`` int64 -> logits ``(B, T, vocab)``; ``T ≤ context``.

    Parameters
    ----------
    vocab : int
        Vocabulary size V (the task passes the corpus' size).
    n_layer, n_head, d_model : int
        Blocks, attention heads, width (``d_model`` a multiple of ``n_head``).
    context : int
        The longest window (rows of the position embedding).

    Raises
    ------
    TypeError, ValueError
        A size that is not a positive int, or ``d_model`` not a multiple of
        ``n_head``; at call time a window longer than ``context``.
    """

    def __init__(
        self, vocab: int, n_layer: int = 2, n_head: int = 4, d_model: int = 64, context: int = 64
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab", vocab),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("d_model", d_model),
            ("context", context),
        ):
            check_positive_int(value, name)
        self.context = context
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self._init_weights(n_layer)

    @property
    def lm_head_weight(self) -> nn.Parameter:
        """The head's weight: the token embedding's (tied)."""
        return self.wte.weight

    def _init_weights(self, n_layer: int) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, mean=0.0, std=0.02)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, mean=0.0, std=0.02)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/√(2·n_layer)
            for lin in (block.attn.proj, block.fc_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, T, vocab)`` of ``idx (B, T)``; position t sees tokens ``≤ t``."""
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids (B, T), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"window of {T} tokens is longer than the context {self.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied head


class GPTLM(nn.Module):
    """:class:`GPT` with the sequential LM interface ``(inp (T, B), state) -> (logits, state)``.

    ``logits`` is ``(T, B, vocab)``; ``state`` is returned as given (the model
    keeps none: each window is read on its own). Arguments as :class:`GPT`;
    ``self.transformer`` is the batch-first model and
    ``self.context`` its longest window.
    """

    def __init__(
        self, vocab: int, n_layer: int = 2, n_head: int = 4, d_model: int = 64, context: int = 64
    ) -> None:
        super().__init__()
        self.transformer = GPT(vocab, n_layer, n_head, d_model, context)
        self.context = self.transformer.context

    def forward(self, inp: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Return ``(logits (T, B, V), state)`` for ``inp (T, B)``; ``state`` unchanged."""
        if inp.dim() != 2:
            raise ValueError(f"GPTLM expects token ids (T, B), got shape {tuple(inp.shape)}")
        return self.transformer(inp.t()).transpose(0, 1), state
