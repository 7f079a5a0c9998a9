"""Small gradient-engine problems as data (STYLE §7).

Each :class:`Case` builds a tiny model, its components and a loss; tests expand
``CASES`` with ``pytest.mark.parametrize(..., ids=CASE_IDS)``. Other test files
may import these. All models are tiny (well under a second per route).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clipscope.components import Components, SequentialComponents


@dataclass(frozen=True)
class Case:
    id: str
    model_fn: Callable[[torch.dtype], nn.Module]
    data_fn: Callable[[], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    dtype: torch.dtype = torch.float64
    seed: int = 0
    batch_coupled: bool = False  # train-mode BatchNorm
    per_sample_ok: bool = True  # model(x) on batches of independent samples

    @property
    def rtol(self) -> float:
        return 1e-10 if self.dtype == torch.float64 else 1e-5

    def build(self) -> tuple[nn.Module, Any]:
        torch.manual_seed(self.seed)
        model = self.model_fn(self.dtype)
        comps = self.data_fn()
        return model, comps


def _classification(n, shape, classes, batch_size, seed, dtype=torch.float64, drop_last=False):
    def data_fn():
        gen = torch.Generator().manual_seed(100 + seed)
        X = torch.randn(n, *shape, generator=gen, dtype=dtype)
        Y = torch.randint(0, classes, (n,), generator=gen)
        return Components.from_tensors(X, Y, batch_size=batch_size, seed=seed, drop_last=drop_last)

    return data_fn


def mlp(dtype: torch.dtype, dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(5, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).to(dtype)


def small_cnn(dtype: torch.dtype, batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(1, 3, 3)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4)]
    return nn.Sequential(*layers).to(dtype)


class TinyLM(nn.Module):
    """Embedding -> LSTM -> decoder tied to the embedding; ``model(inp, state)``."""

    def __init__(self, vocab: int = 11, dim: int = 6, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.encoder.weight  # tied: counted once

    def forward(self, inp, state=None):
        out, state = self.rnn(self.drop(self.encoder(inp)), state)
        return self.decoder(self.drop(out)), state


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _tokens(n: int, vocab: int, batch_size: int, bptt: int, seed: int):
    def data_fn():
        gen = torch.Generator().manual_seed(200 + seed)
        tokens = torch.randint(0, vocab, (n,), generator=gen)
        return SequentialComponents.from_tokens(tokens, batch_size=batch_size, bptt=bptt)

    return data_fn


CASES: list[Case] = [
    Case("mlp", mlp, _classification(40, (5,), 3, 4, seed=0), F.cross_entropy),
    Case(
        "mlp-float32",
        mlp,
        _classification(40, (5,), 3, 4, seed=1, dtype=torch.float32),
        F.cross_entropy,
        dtype=torch.float32,
        seed=1,
    ),
    Case("cnn", small_cnn, _classification(24, (1, 6, 6), 4, 3, seed=2), F.cross_entropy, seed=2),
    Case(
        "cnn-bn-train",
        lambda dtype: small_cnn(dtype, batchnorm=True),
        _classification(24, (1, 6, 6), 4, 4, seed=3),
        F.cross_entropy,
        seed=3,
        batch_coupled=True,
    ),
    Case(
        "lstm-lm-tied",
        lambda dtype: TinyLM().to(dtype),
        _tokens(203, 11, 4, 5, seed=4),
        lm_loss,
        seed=4,
        per_sample_ok=False,
    ),
    Case(
        "mlp-unequal-last",
        mlp,
        _classification(23, (5,), 3, 4, seed=5),
        F.cross_entropy,
        seed=5,
    ),
]

CASE_IDS = [c.id for c in CASES]


def by_id(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)
