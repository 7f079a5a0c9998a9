"""One entry point from a config's ``data`` name to training and held-out tensors.

The runner calls :func:`load_splits`; each dataset keeps its own loader and
conventions (recorded in ``describe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("digits", "text", "cifar10", "ptb")
#: The datasets read from files in ``data_dir`` (the others ship with the installed packages).
FILE_DATASETS = ("cifar10", "ptb")


@dataclass(frozen=True)
class Splits:
    """Training and held-out data of one dataset.

    ``train``/``test`` are ``(X, Y)`` pairs for classification, 1-D token tensors
    for language modelling; ``vocab_size`` is set for text.
    """

    train: Any
    test: Any
    describe: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None


def load_splits(name: str, data_dir: str | Path | None = None) -> Splits:
    """Load dataset ``name`` (one of :data:`DATASETS`) as train / held-out splits.

    ``digits`` and ``text`` are embedded (no files needed); ``cifar10`` reads the
    official python-pickle folder and ``ptb`` Mikolov's text files from ``data_dir``.
    CIFAR-10 images are scaled to [0, 1] and normalized, without augmentation.

    >>> s = load_splits("digits")
    >>> tuple(s.train[0].shape), s.vocab_size
    ((1536, 1, 8, 8), None)
    """
    if name == "digits":
        from clipscope.data.embedded import load_digits_tensors

        d = load_digits_tensors()
        return Splits((d.x_train, d.y_train), (d.x_valid, d.y_valid), d.describe())
    if name == "text":
        from clipscope.data.embedded import load_embedded_text

        corpus = load_embedded_text()
        return Splits(corpus["train"], corpus["valid"], corpus.describe(), len(corpus.vocab))
    if name in FILE_DATASETS and not data_dir:
        raise ValueError(f"dataset {name!r} reads files: set data_dir (or --data-dir)")
    if name == "cifar10":
        from clipscope.data.cifar10 import Cifar10Transform, load_cifar10, normalize

        xtr, ytr = load_cifar10(data_dir, train=True)
        xte, yte = load_cifar10(data_dir, train=False)
        meta = Cifar10Transform(augment=False).describe()
        return Splits((normalize(xtr), ytr), (normalize(xte), yte), meta)
    if name == "ptb":
        from clipscope.data.ptb import load_ptb

        corpus = load_ptb(data_dir, splits=("train", "valid"))
        return Splits(corpus["train"], corpus["valid"], corpus.describe(), len(corpus.vocab))
    raise ValueError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")
