"""Data: CIFAR-10 and PTB from user directories, and embedded defaults that need no download.

* :func:`load_cifar10`, :func:`augment`, :func:`normalize`,
  :class:`Cifar10Transform` — the official python-pickle CIFAR-10;
* :func:`load_ptb`, :func:`load_word_corpus`, :func:`tokenize_file`,
  :class:`Vocabulary`, :class:`Corpus` — Mikolov's PTB text files, or any
  word-level corpus in that format from two named files;
* :func:`load_char_corpus` — a character-level corpus from one plain-text file
  (e.g. tinyshakespeare's ``input.txt``), its last 10 % held out;
* :func:`load_digits_tensors` — scikit-learn's 8×8 digits;
* :func:`load_embedded_text` — Python's own language reference (``pydoc_data``);
* :func:`load_splits` — a config's ``data`` name to train / held-out splits.

Every loader or transform has a ``describe()`` dict of the conventions that
change a component's gradient (augmentation, normalization, tokenization,
vocabulary, split) so a run can record them.
"""

from __future__ import annotations

from clipscope.data.chars import load_char_corpus
from clipscope.data.cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Cifar10Transform,
    augment,
    find_cifar10_dir,
    load_cifar10,
    normalize,
)
from clipscope.data.embedded import (
    DigitsData,
    embedded_text_source,
    load_digits_tensors,
    load_embedded_text,
)
from clipscope.data.ptb import PTB_FILES, PTB_SPLITS, load_ptb, load_word_corpus
from clipscope.data.splits import (
    DATASETS,
    FILE_DATASETS,
    NAMED_FILE_DATASETS,
    WORD_CORPORA,
    Splits,
    load_splits,
)
from clipscope.data.text import EOS, UNK, Corpus, Vocabulary, tokenize_file

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "EOS",
    "FILE_DATASETS",
    "NAMED_FILE_DATASETS",
    "PTB_FILES",
    "PTB_SPLITS",
    "UNK",
    "WORD_CORPORA",
    "Cifar10Transform",
    "Corpus",
    "DigitsData",
    "Splits",
    "Vocabulary",
    "augment",
    "embedded_text_source",
    "find_cifar10_dir",
    "load_char_corpus",
    "load_cifar10",
    "load_digits_tensors",
    "load_embedded_text",
    "load_ptb",
    "load_splits",
    "load_word_corpus",
    "normalize",
    "tokenize_file",
]
