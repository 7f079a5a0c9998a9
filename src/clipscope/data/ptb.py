"""Penn Treebank (Mikolov's preprocessed text) for language modeling.

The files ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` (from
Mikolov's ``simple-examples`` archive, also shipped with awd-lstm-lm's
``getdata.sh``) are lowercase, one sentence a line, numbers as ``N``, rare
words already ``<unk>``: 10,000 word types with ``<eos>``. Nothing is
downloaded; point ``data_dir`` at the folder that holds them.

As in awd-lstm-lm's ``data.py``, each line becomes ``line.split() + ['<eos>']``
and ids are given in order of first appearance over train, valid, test.
Standard sizes with all three files: 929,589 / 73,760 / 82,430 tokens and a
10,000-word vocabulary. The vocabulary is built from the splits you load, so
load all three to get the standard ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipscope.data.text import EOS, Corpus, Vocabulary, tokenize_file

__all__ = ["PTB_SPLITS", "load_ptb"]

PTB_SPLITS = ("train", "valid", "test")


def load_ptb(data_dir: str | Path, splits: Sequence[str] = PTB_SPLITS) -> Corpus:
    """Load PTB splits as ``{split: LongTensor of ids}`` (a :class:`~clipscope.data.text.Corpus`).

    Parameters
    ----------
    data_dir : path
        Folder with ``ptb.<split>.txt`` files.
    splits : sequence of str
        Any of ``"train"``, ``"valid"``, ``"test"``; read in that canonical
        order to build the vocabulary.

    Raises
    ------
    FileNotFoundError
        naming the folder and every missing file.
    ValueError
        for an unknown split name or an empty file.
    """
    bad = [s for s in splits if s not in PTB_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {PTB_SPLITS}, got {list(splits)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"PTB data directory {str(root)!r} does not exist")
    order = [s for s in PTB_SPLITS if s in splits]
    missing = [f"ptb.{s}.txt" for s in order if not (root / f"ptb.{s}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"PTB directory {str(root)!r} lacks {', '.join(missing)}")
    vocab = Vocabulary()
    data = {s: tokenize_file(root / f"ptb.{s}.txt", vocab, add_eos=True) for s in order}
    vocab.freeze()
    meta = {
        "dataset": "ptb",
        "files": [f"ptb.{s}.txt" for s in order],
        "tokenization": f"whitespace words, {EOS} after every line (Mikolov / awd-lstm-lm)",
        "vocabulary": "closed: every word of the loaded splits, ids by first appearance",
    }
    return Corpus(data, vocab, meta)
