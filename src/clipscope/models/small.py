"""Small models for the embedded default tasks: each trains an epoch in seconds on 2 CPU cores.

* :class:`SmallCNN` — 8×8 grayscale digits (scikit-learn's ``load_digits``).
* :class:`SmallLSTMLM` — word-level LM on the embedded English text, with the
  sequential interface ``model(inp (T, B), state) -> (logits (T, B, V), state)``.
* :class:`MLP` — a tiny fully connected classifier (flattens its input).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from clipscope.models._checks import check_positive_int, check_probability

__all__ = ["MLP", "SmallCNN", "SmallLSTMLM"]


class SmallCNN(nn.Module):
    """Two 3×3 conv layers and a two-layer head for ``(N, 1, 8, 8)`` images.

    ``conv(1→c) → ReLU → conv(c→2c) → ReLU → maxpool 2 → Linear(2c·16, 64) → ReLU → Linear(64, k)``.
    No BatchNorm by default, so every sample's loss is independent of the
    others in its batch (all engine routes apply); ``batchnorm=True`` puts a
    ``BatchNorm2d`` after each convolution.

    >>> m = SmallCNN()
    >>> tuple(m(torch.zeros(2, 1, 8, 8)).shape), sum(p.numel() for p in m.parameters())
    ((2, 10), 38282)
    """

    def __init__(self, num_classes: int = 10, channels: int = 16, batchnorm: bool = False) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        c = check_positive_int(channels, "channels")

        def norm(k: int) -> nn.Module:
            return nn.BatchNorm2d(k) if batchnorm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            norm(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            norm(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * c * 16, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"SmallCNN expects (N, 1, 8, 8), got {tuple(x.shape)}")
        return self.head(self.features(x))


class SmallLSTMLM(nn.Module):
    """Embedding → one ``nn.LSTM`` → (projection) → decoder; sequential interface.

    With ``tied=True`` the decoder weight is the embedding weight (one
    ``Parameter``); when ``hidden != emb`` a bias-free ``Linear(hidden, emb)``
    projects the LSTM output to the embedding width first. ``dropout`` is a
    plain ``nn.Dropout`` on the embedding and on the LSTM output (0 = none).

    ``forward(inp (T, B) int64, state=None) -> (logits (T, B, V), (h, c))``
    with ``h, c`` of shape ``(1, B, hidden)``; ``state=None`` means zeros.

    >>> m = SmallLSTMLM(100)
    >>> logits, (h, c) = m(torch.zeros(7, 3, dtype=torch.long))
    >>> tuple(logits.shape), tuple(h.shape), m.decoder.weight is m.embedding.weight
    ((7, 3, 100), (1, 3, 128), True)
    """

    def __init__(
        self, vocab: int, emb: int = 64, hidden: int = 128, tied: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.vocab = check_positive_int(vocab, "vocab")
        check_positive_int(emb, "emb")
        self.hidden = check_positive_int(hidden, "hidden")
        p = check_probability(dropout, "dropout")
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden)
        self.proj = nn.Linear(hidden, emb, bias=False) if tied and hidden != emb else None
        self.drop = nn.Dropout(p) if p > 0 else None
        self.decoder = nn.Linear(emb if tied else hidden, vocab)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tied:
            self.decoder.weight = self.embedding.weight

    def forward(
        self, inp: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Return logits ``(T, B, V)`` and the new ``(h, c)``."""
        if not isinstance(inp, torch.Tensor) or inp.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"inp must be an int64 tensor, got {getattr(inp, 'dtype', inp)!r}")
        if inp.dim() != 2:
            raise ValueError(f"inp must have shape (T, B), got {tuple(inp.shape)}")
        x = self.embedding(inp)
        if self.drop is not None:
            x = self.drop(x)
        x, state = self.rnn(x, state)
        if self.drop is not None:
            x = self.drop(x)
        if self.proj is not None:
            x = self.proj(x)
        return self.decoder(x), state


class MLP(nn.Module):
    """Flatten → ``Linear`` + ``tanh`` per hidden width → ``Linear`` to ``out_features``.

    >>> m = MLP(64, hidden=(32,), out_features=10)
    >>> tuple(m(torch.zeros(5, 1, 8, 8)).shape)
    (5, 10)
    """

    def __init__(
        self, in_features: int = 64, hidden: tuple[int, ...] = (32,), out_features: int = 10
    ) -> None:
        super().__init__()
        widths = [check_positive_int(in_features, "in_features")]
        widths += [check_positive_int(h, "hidden width") for h in hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(widths[-1], check_positive_int(out_features, "out_features")))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``net(flatten(x))``."""
        return self.net(x)
