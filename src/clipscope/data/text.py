"""Token vocabularies and token-id corpora for language models.

A corpus is a mapping ``split -> 1-D int64 tensor of token ids`` in reading
order, plus the :class:`Vocabulary` that maps ids back to tokens and a
``describe()`` dict of the conventions (tokenization, vocabulary, sizes) that
change what a component's loss is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["EOS", "UNK", "Corpus", "Vocabulary", "tokenize_file"]

EOS = "<eos>"
UNK = "<unk>"


class Vocabulary:
    """Bidirectional map between tokens and ids ``0..len-1``, in order of insertion.

    An open vocabulary grows when :meth:`add` meets a new token; after
    :meth:`freeze` it does not, and :meth:`index` maps an unknown token to
    ``unk`` (when the vocabulary has one) or raises ``KeyError``.

    >>> v = Vocabulary(["the", "cat", "the"])
    >>> len(v), v.index("cat"), v.token(0)
    (2, 1, 'the')
    >>> v = Vocabulary(["a"], unk="<unk>").freeze()
    >>> v.index("zebra") == v.index("<unk>") == 0
    True
    """

    def __init__(self, tokens: Iterable[str] = (), unk: str | None = None) -> None:
        self._itos: list[str] = []
        self._stoi: dict[str, int] = {}
        self.frozen = False
        self.unk = unk
        if unk is not None:
            self.add(unk)
        for tok in tokens:
            self.add(tok)

    def add(self, token: str) -> int:
        """Return the id of ``token``, adding it first when new (open vocabulary only)."""
        idx = self._stoi.get(token)
        if idx is not None:
            return idx
        if not isinstance(token, str) or not token:
            raise ValueError(f"tokens must be non-empty strings, got {token!r}")
        if self.frozen:
            raise KeyError(f"token {token!r} is not in the frozen vocabulary")
        self._stoi[token] = len(self._itos)
        self._itos.append(token)
        return self._stoi[token]

    def freeze(self) -> Vocabulary:
        """Stop growing; unknown tokens map to ``unk`` from now on. Returns ``self``."""
        self.frozen = True
        return self

    def index(self, token: str) -> int:
        """Return the id of ``token``: ``unk``'s for unknown ones (if frozen), else KeyError."""
        idx = self._stoi.get(token)
        if idx is not None:
            return idx
        if self.unk is not None and self.frozen:
            return self._stoi[self.unk]
        raise KeyError(f"token {token!r} is not in the vocabulary")

    def token(self, idx: int) -> str:
        """Return the token with id ``idx``."""
        return self._itos[idx]

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """Return the int64 ids of ``tokens`` (growing an open vocabulary)."""
        get = self.index if self.frozen else self.add
        return torch.tensor([get(t) for t in tokens], dtype=torch.int64)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Return the tokens of ``ids``."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return [self._itos[int(i)] for i in values]

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens in id order."""
        return tuple(self._itos)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._itos == other._itos and self.unk == other.unk

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, unk={self.unk!r}, frozen={self.frozen})"


def tokenize_file(path: str | Path, vocab: Vocabulary, add_eos: bool = True) -> torch.Tensor:
    """Read a whitespace-tokenized text file into a 1-D int64 tensor of ids.

    Mikolov's PTB convention (as in awd-lstm-lm's ``data.py``): every line is
    ``line.split()`` followed by ``<eos>`` when ``add_eos``. An open ``vocab``
    grows with new tokens; a frozen one maps them to its ``unk`` or raises
    ``ValueError`` naming the token, file and line.

    Raises
    ------
    FileNotFoundError
        when ``path`` is not a file.
    ValueError
        when the file holds no tokens, or a token is unknown to a frozen
        vocabulary without ``unk``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    get = vocab.index if vocab.frozen else vocab.add
    ids: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            words = line.split() + ([EOS] if add_eos else [])
            try:
                ids.extend(get(w) for w in words)
            except KeyError as exc:
                raise ValueError(f"{path}:{lineno}: {exc.args[0]}") from None
    if not ids:
        raise ValueError(f"text file {str(path)!r} contains no tokens")
    return torch.tensor(ids, dtype=torch.int64)


class Corpus(Mapping[str, torch.Tensor]):
    """Read-only mapping ``split -> token ids`` with its vocabulary and a ``describe()`` dict.

    Behaves like ``dict(split -> LongTensor)``; ``corpus.vocab`` is the shared
    :class:`Vocabulary` and ``corpus.meta`` the conventions it was built with.
    """

    def __init__(
        self, splits: Mapping[str, torch.Tensor], vocab: Vocabulary, meta: Mapping[str, Any]
    ) -> None:
        self._splits = dict(splits)
        self.vocab = vocab
        self.meta = dict(meta)

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in self._splits:
            raise KeyError(f"no split {split!r}; have {sorted(self._splits)}")
        return self._splits[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)

    def describe(self) -> dict[str, Any]:
        """Return the conventions and sizes of this corpus (recorded with a run)."""
        out = dict(self.meta)
        out["vocab_size"] = len(self.vocab)
        out["n_tokens"] = {k: int(v.numel()) for k, v in self._splits.items()}
        unk_token = self.vocab.unk or UNK  # PTB's text carries <unk> as an ordinary word
        if unk_token in self.vocab:
            unk = self.vocab.index(unk_token)
            out["unk_rate"] = {
                k: round(float((v == unk).double().mean()), 6) for k, v in self._splits.items()
            }
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v.numel()}" for k, v in self._splits.items())
        return f"Corpus({sizes}, vocab={len(self.vocab)})"
