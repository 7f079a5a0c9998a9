r"""Character-level corpora from a plain-text file the user provides (e.g. tinyshakespeare).

Nothing is downloaded: ``data_dir`` is the folder and ``train_file`` the file
name (tinyshakespeare: Karpathy's ``input.txt``, 1,115,394 characters). The
conventions, recorded in ``describe()``:

* **Reading**: the file is decoded as UTF-8, nothing normalised or stripped
  (newlines are characters); one token is one Unicode character.
* **Split** (one file): the first ``⌊0.9·N⌋`` characters are trained on, the
  last ``N − ⌊0.9·N⌋`` held out (nanoGPT's ``shakespeare_char`` split, the
  text in reading order, no shuffling). With ``heldout_file`` set as well, the
  whole ``train_file`` is trained on and the whole ``heldout_file`` held out.
* **Vocabulary**: the sorted distinct characters of the *training* text, ids
  ``0..V-1`` in code-point order. A held-out character that the training text
  never has is mapped to one extra id, ``<unk>``, appended as id ``V`` only
  when there is such a character (its count is ``describe()["n_unknown"]``
  and its rate ``describe()["unk_rate"]``); otherwise the vocabulary is the
  training characters alone. The model is then built with the held-out
  ``<unk>`` row and never sees it in training: a held-out ``<unk>`` costs what
  the model predicts for an id it was never trained on, which counts in the
  perplexity (stated, not hidden). tinyshakespeare's last 10 % holds no
  character the first 90 % lacks (65 characters).

Batching is the language models' sequential one
(:meth:`clipscope.components.SequentialComponents.from_tokens`: ``B``
columns, windows of ``bptt`` rows), done by the task (:mod:`clipscope.tasks`).

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "t.txt").write_text("abcabcabcaz")
>>> c = load_char_corpus(d, "t.txt")
>>> c.vocab.tokens, c["train"].tolist(), c["valid"].tolist()
(('a', 'b', 'c', '<unk>'), [0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 3])
"""

from __future__ import annotations

from pathlib import Path

import torch

from clipscope.data.text import UNK, Corpus, Vocabulary

__all__ = ["HELDOUT_FRACTION", "MIN_CHARS", "load_char_corpus", "split_point"]

#: The held-out share of a single file: its last 10 % (nanoGPT's shakespeare_char split).
HELDOUT_FRACTION = 0.1
#: The fewest characters a split may hold: one input and its next-character target.
MIN_CHARS = 2


def split_point(n: int) -> int:
    """Return the number of training characters of an ``n``-character text: ``⌊0.9·n⌋``.

    Computed in integers (``9n // 10``), so no float rounding moves it.

    >>> split_point(1115394), split_point(10)
    (1003854, 9)
    """
    return (n * 9) // 10


def _read(path: Path, role: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{role} text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{role} text file {str(path)!r} is not UTF-8 text ({exc})") from None
    if not text:
        raise ValueError(f"{role} text file {str(path)!r} is empty")
    return text


def load_char_corpus(data_dir: str | Path, train_file: str, heldout_file: str = "") -> Corpus:
    """Load a character-level corpus: splits ``"train"`` and ``"valid"`` (held out).

    Parameters
    ----------
    data_dir : path
        The folder that holds the file(s).
    train_file : str
        The text file (a name or a path relative to ``data_dir``): its first
        90 % (:func:`split_point`) is trained on and its last 10 % held out,
        unless ``heldout_file`` is given.
    heldout_file : str
        Optional: a second file held out whole (``train_file`` is then
        trained on whole). It must not be ``train_file``.

    Returns
    -------
    Corpus
        ``corpus["train"]``, ``corpus["valid"]``: 1-D int64 tensors of
        character ids; ``corpus.vocab`` the training characters in code-point
        order (plus ``<unk>`` when the held-out text has others: module
        docstring); ``corpus.describe()`` the conventions and sizes.

    Raises
    ------
    FileNotFoundError
        A missing folder or file (named).
    ValueError
        An empty ``train_file`` name, the same file twice, a file that is not
        UTF-8 or is empty, or a split of fewer than :data:`MIN_CHARS`
        characters (no next-character target).
    """
    if not isinstance(train_file, str) or not train_file:
        raise ValueError(f"train_file must name a text file in data_dir, got {train_file!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"character corpus directory {str(root)!r} does not exist")
    text = _read(root / train_file, "training")
    if heldout_file:
        if (root / heldout_file).resolve() == (root / train_file).resolve():
            raise ValueError(
                f"train_file and heldout_file are the same file ({train_file!r}): "
                "the held-out text must not be trained on"
            )
        train_text, held_text = text, _read(root / heldout_file, "held-out")
        split = f"all of {train_file} trained on, all of {heldout_file} held out"
    else:
        cut = split_point(len(text))
        train_text, held_text = text[:cut], text[cut:]
        split = (
            f"first {cut} of {len(text)} characters (floor(0.9 N)) trained on, "
            f"the last {len(text) - cut} held out, in reading order"
        )
    for role, part in (("training", train_text), ("held-out", held_text)):
        if len(part) < MIN_CHARS:
            raise ValueError(
                f"the {role} text of {train_file!r} has {len(part)} character(s); it needs at "
                f"least {MIN_CHARS} (one input and its next-character target)"
            )
    chars = sorted(set(train_text))
    unknown = set(held_text) - set(chars)
    vocab = Vocabulary(chars)
    if unknown:
        vocab.unk = UNK
        vocab.add(UNK)
    vocab.freeze()
    stoi = {c: i for i, c in enumerate(chars)}
    unk_id = len(chars)
    data = {
        "train": torch.tensor([stoi[c] for c in train_text], dtype=torch.int64),
        "valid": torch.tensor([stoi.get(c, unk_id) for c in held_text], dtype=torch.int64),
    }
    meta = {
        "dataset": "chars",
        "files": {"train": train_file, "heldout": heldout_file or train_file},
        "split": split,
        "tokenization": "one token per Unicode character (UTF-8, nothing normalised)",
        "vocabulary": (
            "the training text's distinct characters in code-point order; held-out characters "
            f"outside it map to {UNK} (appended last, only when there are any)"
        ),
        "n_unknown": sum(held_text.count(c) for c in unknown),
    }
    return Corpus(data, vocab, meta)
