"""Embedded default data: real data that ships with installed packages, no download.

* **Images** — scikit-learn's handwritten digits (``sklearn.datasets.load_digits``:
  1,797 grayscale 8×8 images of the digits 0–9, 16 gray levels, the test part
  of the UCI "Optical Recognition of Handwritten Digits" set).
* **Text** — the Python language reference as shipped with Python itself:
  ``pydoc_data.topics.topics``, the ~80 topic pages that ``help("if")`` and
  friends print (about 465,000 characters of English in Python 3.11). It is
  part of the standard library, so every clipscope install has it; its exact
  content depends on the Python version, so the version and a SHA-256 of the
  text are recorded in ``describe()``.

Text tokenization is **word-level in the style of Mikolov's PTB** so the
embedded LM task and PTB share conventions: lowercase, words
``[a-z]+('[a-z]+)?``, every digit run becomes ``N``, punctuation and markup
are dropped, ``<eos>`` ends each non-empty line, and the vocabulary is capped
(default 2,000 types including ``<unk>`` and ``<eos>``; the rest become
``<unk>``). Word level rather than character level because a word model's
gradient components look like PTB's (large sparse embedding/decoder rows,
a long-tailed unigram distribution) and because an epoch is ~80k tokens,
which a small LSTM covers in seconds; a 2,000-word cap keeps the softmax
cheap while covering about 98% of the running words.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipscope.data.text import EOS, UNK, Corpus, Vocabulary

__all__ = ["DigitsData", "embedded_text_source", "load_digits_tensors", "load_embedded_text"]

DIGITS_N_TRAIN = 1536
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+")


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn digits as tensors: ``x_*`` float32 ``(N, 1, 8, 8)`` in [0, 1], ``y_*`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Return the conventions and sizes (recorded with a run)."""
        return dict(self.meta)


def load_digits_tensors(n_train: int = DIGITS_N_TRAIN) -> DigitsData:
    """Load scikit-learn's 8×8 digits, scaled to [0, 1], with a fixed train / held-out split.

    The split is by position in ``load_digits`` order, no RNG: the first
    ``n_train`` images train (default 1,536 = 3·2⁹, so every dyadic batch
    size up to 512 divides it), the remaining 261 are held out. The images
    are stored writer by writer, so the held-out images are mostly from
    writers the training set does not contain. Pixel values ``v ∈ {0..16}``
    become ``v / 16``.

    >>> d = load_digits_tensors()
    >>> tuple(d.x_train.shape), tuple(d.x_valid.shape), float(d.x_train.max())
    ((1536, 1, 8, 8), (261, 1, 8, 8), 1.0)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images, bunch.target
    n = images.shape[0]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 1 <= n_train < n:
        raise ValueError(f"n_train must be an int in [1, {n - 1}], got {n_train!r}")
    x = torch.from_numpy((images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    meta = {
        "dataset": "sklearn.datasets.load_digits",
        "n_train": n_train,
        "n_valid": n - n_train,
        "split": f"first {n_train} images train, last {n - n_train} held out (load_digits order)",
        "scaling": "x / 16 (16 gray levels -> [0, 1]), float32, shape (N, 1, 8, 8)",
        "augmentation": None,
        "classes": 10,
    }
    return DigitsData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], meta)


def embedded_text_source() -> tuple[str, str]:
    """Return ``(name, text)`` of the embedded English text: Python's own language reference.

    Topic pages of ``pydoc_data.topics`` in sorted key order, joined by newlines.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip it from the stdlib
        raise FileNotFoundError(
            "the embedded text needs the standard-library module pydoc_data.topics, "
            "which this Python lacks; use a PTB directory instead"
        ) from exc
    version = ".".join(map(str, sys.version_info[:3]))
    return f"pydoc_data.topics (Python {version})", "\n".join(topics[k] for k in sorted(topics))


def _lines_of_words(text: str) -> list[list[str]]:
    lines = []
    for line in text.lower().splitlines():
        words = ["N" if w[0].isdigit() else w for w in _WORD.findall(line)]
        if words:
            lines.append(words)
    return lines


def load_embedded_text(
    max_chars: int | None = None, max_vocab: int = 2000, valid_fraction: float = 0.1
) -> Corpus:
    """Load the embedded English text as a word-level corpus with ``"train"`` and ``"valid"``.

    Parameters
    ----------
    max_chars : int, optional
        Use only the first ``max_chars`` characters of the source (whole lines).
    max_vocab : int
        Vocabulary size cap, ``<unk>`` and ``<eos>`` included: the
        ``max_vocab − 2`` most frequent training words (ties by spelling).
    valid_fraction : float
        The last ``ceil(valid_fraction · lines)`` non-empty lines are held out.

    Returns
    -------
    Corpus
        ``{"train": ids, "valid": ids}`` (1-D int64, ``<eos>`` after each
        line), ``.vocab`` built from the training split only, ``describe()``.

    >>> c = load_embedded_text(max_chars=20000, max_vocab=300)
    >>> len(c.vocab), c.vocab.token(0), c.vocab.token(1)
    (300, '<unk>', '<eos>')
    """
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise ValueError(f"max_chars must be None or an int >= 1, got {max_chars!r}")
    if isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 3:
        raise ValueError(f"max_vocab must be an int >= 3, got {max_vocab!r}")
    if not isinstance(valid_fraction, (int, float)) or not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")
    name, text = embedded_text_source()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if max_chars is not None and max_chars < len(text):
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    lines = _lines_of_words(text)
    n_valid = int(np.ceil(valid_fraction * len(lines)))
    if len(lines) - n_valid < 1 or n_valid < 1:
        raise ValueError(f"max_chars={max_chars} leaves {len(lines)} lines: too few to split")
    train_lines, valid_lines = lines[:-n_valid], lines[-n_valid:]
    counts = Counter(w for line in train_lines for w in line)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = Vocabulary([EOS] + [w for w, _ in ranked[: max_vocab - 2]], unk=UNK).freeze()

    def encode(part: list[list[str]]) -> torch.Tensor:
        return vocab.encode(w for line in part for w in [*line, EOS])

    meta = {
        "dataset": "embedded-text",
        "source": name,
        "source_sha256": digest,
        "max_chars": max_chars,
        "tokenization": (
            "word-level PTB style: lowercase, [a-z]+('[a-z]+)?, digit runs -> N, "
            f"punctuation dropped, {EOS} after each non-empty line"
        ),
        "vocabulary": f"{max_vocab} cap incl. {UNK} and {EOS}, most frequent training words",
        "split": f"last {n_valid} of {len(lines)} lines held out (valid)",
    }
    return Corpus({"train": encode(train_lines), "valid": encode(valid_lines)}, vocab, meta)
