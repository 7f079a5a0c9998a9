"""One entry point from a config's ``data`` name to training and held-out tensors.

The runner calls :func:`load_splits`; each dataset keeps its own loader and
conventions (recorded in ``describe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("digits", "text", "cifar10", "ptb", "mikolov", "chars")
#: The datasets read from files in ``data_dir`` (the others ship with the installed packages).
FILE_DATASETS = ("cifar10", "ptb", "mikolov", "chars")
#: The word-level corpora whose training and held-out files a config may name.
WORD_CORPORA = ("ptb", "mikolov")
#: The datasets whose files a config names (``train_file`` / ``heldout_file``).
NAMED_FILE_DATASETS = (*WORD_CORPORA, "chars")


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


def load_splits(
    name: str, data_dir: str | Path | None = None, *, train_file: str = "", heldout_file: str = ""
) -> Splits:
    """Load dataset ``name`` (one of :data:`DATASETS`) as train / held-out splits.

    ``digits`` and ``text`` are embedded (no files needed); ``cifar10`` reads the
    official python-pickle folder and ``ptb`` Mikolov's text files from ``data_dir``.
    CIFAR-10 images are scaled to [0, 1] and normalized, without augmentation.
    ``mikolov`` is any word-level corpus in Mikolov's format: ``train_file`` and
    ``heldout_file`` (names in ``data_dir``) are required; for ``ptb`` they
    default to ``ptb.train.txt`` and ``ptb.valid.txt`` (a user with only
    ``ptb.valid.txt`` and ``ptb.test.txt`` names those two). ``chars`` is a
    character-level corpus from the plain-text ``train_file`` (required; e.g.
    tinyshakespeare's ``input.txt``): its first 90 % trained on, the last 10 %
    held out, or all of ``heldout_file`` held out when that is named
    (:func:`clipscope.data.chars.load_char_corpus`).

    >>> s = load_splits("digits")
    >>> tuple(s.train[0].shape), s.vocab_size
    ((1536, 1, 8, 8), None)
    """
    if (train_file or heldout_file) and name not in NAMED_FILE_DATASETS:
        raise ValueError(
            f"train_file / heldout_file name the files of a word-level corpus "
            f"({', '.join(WORD_CORPORA)}) or a character-level one (chars), "
            f"not of dataset {name!r}"
        )
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
    if name == "chars":
        from clipscope.data.chars import load_char_corpus

        if not train_file:
            raise ValueError("dataset 'chars' needs train_file (a text file in data_dir)")
        corpus = load_char_corpus(data_dir, train_file, heldout_file)
        return Splits(corpus["train"], corpus["valid"], corpus.describe(), len(corpus.vocab))
    if name == "ptb" and not (train_file or heldout_file):
        from clipscope.data.ptb import load_ptb

        corpus = load_ptb(data_dir, splits=("train", "valid"))
        return Splits(corpus["train"], corpus["valid"], corpus.describe(), len(corpus.vocab))
    if name in WORD_CORPORA:
        from clipscope.data.ptb import PTB_FILES, load_word_corpus

        if name == "ptb":
            train_file, heldout_file = train_file or PTB_FILES[0], heldout_file or PTB_FILES[1]
        elif not (train_file and heldout_file):
            key = "heldout_file" if train_file else "train_file"
            raise ValueError(f"dataset 'mikolov' needs {key} (a file name in data_dir)")
        corpus = load_word_corpus(data_dir, train_file, heldout_file, dataset=name)
        return Splits(corpus["train"], corpus["valid"], corpus.describe(), len(corpus.vocab))
    raise ValueError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")
