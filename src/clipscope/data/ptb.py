"""Word-level corpora in Mikolov's format: Penn Treebank, or any pair of files named in a config.

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

:func:`load_word_corpus` reads *any* word-level corpus in that format from two
files named by the caller -- one to train on, one held out -- so a user who
has only ``ptb.valid.txt`` and ``ptb.test.txt`` trains on the first and holds
out the second (config keys ``train_file`` and ``heldout_file``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipscope.data.text import EOS, Corpus, Vocabulary, tokenize_file

__all__ = ["PTB_FILES", "PTB_SPLITS", "load_ptb", "load_word_corpus"]

PTB_SPLITS = ("train", "valid", "test")
#: The training and held-out files of ``data = "ptb"`` when the config names none.
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt")


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


def load_word_corpus(
    data_dir: str | Path, train_file: str, heldout_file: str, *, dataset: str = "mikolov"
) -> Corpus:
    r"""Load a word-level corpus in Mikolov's format from two named files: ``train`` and ``valid``.

    Every line is ``line.split() + ['<eos>']`` (awd-lstm-lm's ``data.py``); the
    closed vocabulary holds every word of both files, ids by first appearance
    (training file first). The corpus' splits are ``"train"`` (from
    ``train_file``) and ``"valid"`` (from ``heldout_file``, the held-out text).

    Parameters
    ----------
    data_dir : path
        The folder that holds both files.
    train_file, heldout_file : str
        File names (or paths relative to ``data_dir``); they must differ.
    dataset : str
        The name recorded in ``describe()``.

    Raises
    ------
    FileNotFoundError
        naming the folder and every missing file.
    ValueError
        for an empty name, the same file twice, or an empty file.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("the cat\n"); _ = (d / "b.txt").write_text("a cat\n")
    >>> c = load_word_corpus(d, "a.txt", "b.txt")
    >>> c["train"].tolist(), c["valid"].tolist(), len(c.vocab)
    ([0, 1, 2], [3, 1, 2], 4)
    """
    for key, name in (("train_file", train_file), ("heldout_file", heldout_file)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{key} must name a file in data_dir, got {name!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset} data directory {str(root)!r} does not exist")
    paths = {"train": root / train_file, "valid": root / heldout_file}
    if paths["train"].resolve() == paths["valid"].resolve():
        raise ValueError(
            f"train_file and heldout_file are the same file ({train_file!r}): "
            "the held-out text must not be trained on"
        )
    missing = [str(p.relative_to(root)) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{dataset} directory {str(root)!r} lacks {', '.join(missing)}")
    vocab = Vocabulary()
    data = {s: tokenize_file(p, vocab, add_eos=True) for s, p in paths.items()}
    vocab.freeze()
    meta = {
        "dataset": dataset,
        "files": {"train": train_file, "heldout": heldout_file},
        "tokenization": f"whitespace words, {EOS} after every line (Mikolov / awd-lstm-lm)",
        "vocabulary": "closed: every word of both files, ids by first appearance (train first)",
    }
    return Corpus(data, vocab, meta)
