"""Fixed partitions of a data set into the components ``f_i`` of ``f = (1/m) Σ_i f_i``.

DESIGN §1, paper eq. (1): a component ``f_i`` is the **mean** loss over one fixed
batch of samples. N samples and batch size B give ``m = ceil(N/B)`` components
(``floor(N/B)`` with ``drop_last=True``). The partition is fixed for a run,
reproducible from its seed, and recorded by :meth:`Components.describe` and
:meth:`Components.state_dict`.

Last, smaller batch: kept by default. Then ``f = (1/m) Σ_i f_i`` gives every
component the same weight ``1/m`` whatever its size, so a sample of the short
batch weighs more than one of a full batch; this is the paper's objective (1),
not the plain per-sample mean. ``drop_last=True`` drops it instead; both
choices are recorded.

Two kinds:

* :class:`Components` -- ``batch(i)``: the component's batch, ``(x, y)`` for
  models called ``model(x)`` (from tensors, or a dataset of pairs), or what the
  dataset's items collate to (a dict of tensors, a tensor, ...) for a loss
  written as a function of ``(model, batch)``
  (:func:`clipscope.engine.losses.loss_form`);
* :class:`SequentialComponents` -- a token stream in corpus order, batchified
  into columns and cut into consecutive BPTT windows; ``batch(i) -> (inp,
  target)`` of shape ``(T_i, B)``. Models for them are called ``model(inp,
  state) -> (output, new_state)``, ``state=None`` meaning the model's zero
  initial state; the state flows from window ``i-1`` into window ``i``,
  detached (truncated BPTT). See :func:`detach_state`.

>>> import torch
>>> comps = Components.from_tensors(torch.arange(10.0), torch.arange(10), batch_size=4)
>>> comps.m, comps.sizes
(3, [4, 4, 2])
>>> comps.batch(2)[1].tolist()
[8, 9]
>>> Components.from_tensors(torch.arange(10.0), torch.arange(10), batch_size=4, drop_last=True).m
2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "BATCH_STRUCTURES",
    "Components",
    "SequentialComponents",
    "batch_structure",
    "detach_state",
]


def detach_state(state: Any) -> Any:
    """Return ``state`` with every tensor detached, keeping its tuple/list/dict nesting.

    Recurrent states are a tensor, or (nested) tuples / lists of tensors such as
    an LSTM's ``(h, c)`` per layer; ``None`` stays ``None``.

    >>> h = torch.ones(2, requires_grad=True) * 2
    >>> out = detach_state([(h, h), None])
    >>> out[0][0].requires_grad, out[1] is None
    (False, True)
    """
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, tuple):
        items = [detach_state(s) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    if isinstance(state, list):
        return [detach_state(s) for s in state]
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    raise TypeError(f"recurrent state must be tensors in tuples/lists/dicts, got {type(state)!r}")


def _check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"{name} must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"{name} must be >= 1, got {batch_size}")
    return batch_size


def _check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be None or an int, got {seed!r}")
    return seed


def _to(obj: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, Mapping):  # dicts, and mappings such as transformers' BatchEncoding
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


#: What a component's batch is (``Components.batch_structure``): an ``(x, y)`` pair,
#: a mapping (dict of tensors), one tensor, another sequence, or anything else.
BATCH_STRUCTURES = ("pair", "mapping", "tensor", "sequence", "other")


def batch_structure(batch: Any) -> str:
    """Name the structure of a collated batch (one of :data:`BATCH_STRUCTURES`).

    >>> batch_structure((torch.zeros(2, 3), torch.zeros(2))), batch_structure({"a": torch.ones(1)})
    ('pair', 'mapping')
    """
    if isinstance(batch, torch.Tensor):
        return "tensor"
    if isinstance(batch, Mapping):
        return "mapping"
    if isinstance(batch, (tuple, list)):
        return "pair" if len(batch) == 2 else "sequence"
    return "other"


def _describe_structure(batch: Any) -> str:
    kind = batch_structure(batch)
    if kind == "mapping":
        return f"mapping[{', '.join(str(k) for k in batch)}]"
    if kind == "pair":
        return "(x, y)"
    if kind == "sequence":
        return f"sequence of {len(batch)}"
    return kind if kind == "tensor" else type(batch).__name__


def _number(value: Any) -> bool:
    return isinstance(value, (bool, int, float, complex)) or (
        hasattr(value, "dtype") and getattr(value, "shape", None) == ()
    )


def _check_item(item: Any, where: str = "", depth: int = 0) -> None:
    """Refuse an item that ``default_collate`` would turn into something else than meant.

    A list of numbers *inside* an item (a tokenized field ``"input_ids": [101, 7592,
    ...]``) is collated position by position into one tensor per position: a batch
    the model would misread. Tensors, numpy arrays, numbers and strings are leaves;
    tuples/lists of them at the top level are the item's fields.
    """
    if isinstance(item, Mapping):
        for key, value in item.items():
            _check_item(value, f"{where}[{key!r}]", depth + 1)
    elif isinstance(item, (tuple, list)):
        if depth >= 1 and item and all(_number(v) for v in item):
            raise TypeError(
                f"{where} is a {type(item).__name__} of {len(item)} numbers: "
                "default_collate would make it one tensor per position (transposed), not a "
                "tensor per sample. Store it as a tensor (Hugging Face datasets: "
                "dataset.set_format('torch')) or pass collate_fn"
            )
        for j, value in enumerate(item):
            _check_item(value, f"{where}[{j}]", depth + 1)


def _size_summary(sizes: Sequence[int]) -> dict[str, int]:
    return {"min": min(sizes), "max": max(sizes), "last": sizes[-1]}


class Components:
    """A fixed partition of N samples into m components of batch size B.

    Build it with :meth:`from_tensors` or :meth:`from_dataset`; the constructor is
    internal. ``seed=None`` keeps corpus order; an int draws the permutation
    with a ``torch.Generator`` seeded by it (the same permutation for every B,
    so the components of batch size 2B are unions of two consecutive
    components of batch size B -- the dyadic route relies on this).

    Attributes
    ----------
    m : int
        Number of components, ``ceil(N/B)`` (``floor`` with ``drop_last``).
    sizes : list of int
        Samples per component.
    indices : list of torch.LongTensor
        Sample indices of each component.
    sequential : bool
        ``False``: models are called ``model(x)``.
    """

    sequential = False

    def __init__(
        self,
        source: Any,
        n_samples: int,
        *,
        batch_size: int,
        seed: int | None,
        drop_last: bool,
        kind: str,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        self.batch_size = _check_batch_size(batch_size)
        self.seed = _check_seed(seed)
        self.drop_last = bool(drop_last)
        self.n_samples = int(n_samples)
        self._source = source
        self._kind = kind
        self._collate_fn = collate_fn
        self.batch_structure = "pair"
        self._structure_text = "(x, y)"
        self._device: torch.device | None = None
        if self.seed is None:
            order = torch.arange(self.n_samples)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(self.n_samples, generator=gen)
        n_full, rest = divmod(self.n_samples, self.batch_size)
        m = n_full + (1 if rest and not self.drop_last else 0)
        if m == 0:
            raise ValueError(
                f"no components: {self.n_samples} samples with batch_size={self.batch_size}"
                f"{' and drop_last=True' if self.drop_last else ''} give m = 0"
            )
        self.order = order
        self.indices = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(m)]
        self.sizes = [len(ix) for ix in self.indices]
        self.n_dropped = self.n_samples - sum(self.sizes)

    # -- constructors ---------------------------------------------------------
    @classmethod
    def from_tensors(
        cls,
        X: torch.Tensor,
        Y: torch.Tensor,
        batch_size: int,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> Components:
        """Partition the rows of ``X`` and ``Y`` (same first dimension)."""
        if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
            raise TypeError(f"X and Y must be tensors, got {type(X)!r} and {type(Y)!r}")
        if X.dim() == 0 or Y.dim() == 0 or len(X) != len(Y):
            raise ValueError(
                f"X and Y need the same first dimension, got shapes {tuple(X.shape)} "
                f"and {tuple(Y.shape)}"
            )
        return cls(
            (X, Y), len(X), batch_size=batch_size, seed=seed, drop_last=drop_last, kind="tensors"
        )

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        batch_size: int,
        *,
        seed: int | None = None,
        drop_last: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> Components:
        """Partition a map-style dataset (``len(dataset)`` and ``dataset[j]``).

        Items may be tensors, tuples/lists (``(x, y)``: the ``(output, target)``
        loss form works) or dicts of tensors (``{"input_ids": ..., "labels": ...}``:
        write the loss as a function of ``(model, batch)``). A component's batch is
        ``collate_fn([dataset[j] for j in its indices])``, by default
        ``torch.utils.data.default_collate``: a dict stays a dict, a pair becomes
        the tuple ``(x, y)``, tensors are stacked. The partition is fixed when the
        object is made (``seed`` as in :meth:`from_tensors`) and recorded by
        :meth:`describe` (with the collate function and the batch structure).

        Raises
        ------
        TypeError
            ``dataset`` is not map-style (an ``IterableDataset`` has no fixed
            partition); ``collate_fn`` is not callable; item 0 cannot be collated,
            or holds a list of numbers that ``default_collate`` would transpose.
        ValueError
            No component (an empty dataset, or ``drop_last`` with fewer than
            ``batch_size`` items).

        >>> X, Y = torch.arange(5.0), torch.arange(5)
        >>> ds = [{"x": X[j], "y": Y[j]} for j in range(5)]
        >>> comps = Components.from_dataset(ds, batch_size=2)
        >>> comps.batch(2), comps.batch_structure
        ({'x': tensor([4.]), 'y': tensor([4])}, 'mapping')
        """
        from torch.utils.data import IterableDataset

        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            raise TypeError(
                f"dataset must be map-style (len and indexing), got {type(dataset)!r}; "
                "an IterableDataset has no fixed partition into components"
            )
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable or None, got {collate_fn!r}")
        comps = cls(
            dataset,
            len(dataset),
            batch_size=batch_size,
            seed=seed,
            drop_last=drop_last,
            kind="dataset",
            collate_fn=collate_fn,
        )
        j0 = int(comps.indices[0][0])
        first = dataset[j0]
        if collate_fn is None:
            _check_item(first, f"item {j0}")
        try:
            sample = comps._collate([first])
        except Exception as exc:
            name = "collate_fn" if collate_fn is not None else "default_collate"
            raise TypeError(
                f"item {j0} of the dataset ({type(first).__name__}) cannot "
                f"be collated by {name}: {exc}"
            ) from exc
        comps.batch_structure = batch_structure(sample)
        comps._structure_text = _describe_structure(sample)
        return comps

    # -- access ---------------------------------------------------------------
    @property
    def m(self) -> int:
        """Number of components."""
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str | None) -> Components:
        """Make :meth:`batch` return tensors on ``device`` (in place; returns self)."""
        self._device = None if device is None else torch.device(device)
        return self

    def with_batch_size(self, batch_size: int) -> Components:
        """Return the same samples, seed, ``drop_last`` and collate partitioned at ``batch_size``.

        With the same seed the sample order does not depend on B, so component
        ``p`` at ``2^l B`` is the union of components ``2^l p … 2^l p + 2^l - 1`` at
        ``B`` (the dyadic route's parents; their batches are collated anew, so a
        padding collate pads to the parent's longest sample).

        >>> c = Components.from_tensors(torch.arange(5.0), torch.arange(5), 2, seed=0)
        >>> [ix.tolist() for ix in c.with_batch_size(4).indices] == [
        ...     c.indices[0].tolist() + c.indices[1].tolist(), c.indices[2].tolist()]
        True
        """
        out = Components(
            self._source,
            self.n_samples,
            batch_size=batch_size,
            seed=self.seed,
            drop_last=self.drop_last,
            kind=self._kind,
            collate_fn=self._collate_fn,
        )
        out.batch_structure, out._structure_text = self.batch_structure, self._structure_text
        out._device = self._device
        return out

    def _collate(self, items: list) -> Any:
        if self._collate_fn is not None:
            out = self._collate_fn(items)
        else:
            from torch.utils.data import default_collate

            out = default_collate(items)
        if isinstance(out, list) and len(out) == 2:  # default_collate turns tuples into lists
            out = tuple(out)
        return out

    def batch(self, i: int, device: torch.device | str | None = None) -> Any:
        """Return component ``i``'s batch (on ``device``, else the one set by :meth:`to`).

        ``(x, y)`` for tensors and datasets of pairs; for other datasets what the
        items collate to (:attr:`batch_structure` names it: a dict stays a dict).

        Raises
        ------
        IndexError
            ``i`` outside ``0 … m-1``.
        ValueError
            The dataset's length changed since the partition was made (the
            components of a run are fixed: build new ones for new data).
        """
        if not 0 <= i < len(self.indices):
            raise IndexError(f"component {i} out of range for m = {self.m}")
        ix = self.indices[i]
        if self._kind == "tensors":
            X, Y = self._source
            out = (X[ix.to(X.device)], Y[ix.to(Y.device)])
        else:
            self.check_unchanged()
            out = self._collate([self._source[int(j)] for j in ix])
        return _to(out, device if device is not None else self._device)

    def check_unchanged(self) -> None:
        """Raise :class:`ValueError` when a dataset's length differs from the partition's N."""
        if self._kind != "dataset":
            return
        n = len(self._source)
        if n != self.n_samples:
            raise ValueError(
                f"the dataset has {n} items now, but the components were made from "
                f"{self.n_samples}: a run's components are fixed (the partition, m and every "
                "f_i would change); build new Components for new data"
            )

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self.batch(i)

    # -- records --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-safe record of the partition (a dataset's: also its collate and batch structure)."""
        out = {
            "kind": "components",
            "N": self.n_samples,
            "B": self.batch_size,
            "m": self.m,
            "seed": self.seed,
            "last_batch": "dropped" if self.drop_last else "kept",
            "dropped_samples": self.n_dropped,
            "sizes": _size_summary(self.sizes),
        }
        if self._kind == "dataset":
            fn = self._collate_fn
            out["source"] = f"dataset ({type(self._source).__name__})"
            out["collate"] = (
                "torch.utils.data.default_collate"
                if fn is None
                else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
            )
            out["batch"] = self._structure_text
        return out

    def state_dict(self) -> dict[str, Any]:
        """Return the partition itself (the sample order) plus :meth:`describe`."""
        return {**self.describe(), "order": self.order.clone()}

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"Components(N={d['N']}, B={d['B']}, m={d['m']}, seed={d['seed']}, "
            f"last={d['last_batch']})"
        )


class SequentialComponents:
    """Consecutive BPTT windows of a token stream: language-model components.

    ``from_tokens(tokens, batch_size=B, bptt=T)`` batchifies the 1-D stream into
    ``B`` columns of ``L = floor(len/B)`` tokens (the ``len mod B`` tail tokens are
    dropped and recorded), then cuts rows ``0..L-1`` into windows: window ``i``
    has input rows ``[iT, iT + T_i)`` and targets one row later, with
    ``T_i = min(T, L - 1 - iT)``. ``m = ceil((L-1)/T)``; a last shorter window
    is kept, or dropped with ``drop_last=True``. Component ``f_i`` is the mean
    loss over its ``T_i·B`` targets. Components are in corpus order and cannot
    be shuffled; the recurrent state flows from window ``i-1`` into ``i``,
    detached.

    >>> comps = SequentialComponents.from_tokens(torch.arange(23), batch_size=2, bptt=4)
    >>> comps.m, comps.lengths, comps.n_dropped_tokens
    (3, [4, 4, 2], 1)
    >>> inp, tgt = comps.batch(0)
    >>> inp[:, 0].tolist(), tgt[:, 0].tolist()
    ([0, 1, 2, 3], [1, 2, 3, 4])
    """

    sequential = True
    seed = None
    batch_structure = "pair"

    def __init__(self, tokens: torch.Tensor, batch_size: int, bptt: int, drop_last: bool) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise TypeError("tokens must be a 1-D tensor of token ids")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        self.batch_size = _check_batch_size(batch_size)
        self.bptt = _check_batch_size(bptt, "bptt")
        self.drop_last = bool(drop_last)
        self.n_tokens = len(tokens)
        rows = self.n_tokens // self.batch_size
        self.n_dropped_tokens = self.n_tokens - rows * self.batch_size
        self.data = tokens[: rows * self.batch_size].view(self.batch_size, rows).t().contiguous()
        usable = max(rows - 1, 0)
        starts = list(range(0, usable, self.bptt))
        lengths = [min(self.bptt, usable - s) for s in starts]
        if self.drop_last and lengths and lengths[-1] < self.bptt:
            starts, lengths = starts[:-1], lengths[:-1]
        if not starts:
            raise ValueError(
                f"no components: {self.n_tokens} tokens with batch_size={self.batch_size}, "
                f"bptt={self.bptt}{' and drop_last=True' if self.drop_last else ''} give m = 0"
            )
        self.starts = starts
        self.lengths = lengths
        self.sizes = [t * self.batch_size for t in lengths]
        self._device: torch.device | None = None

    @classmethod
    def from_tokens(
        cls, tokens: torch.Tensor, batch_size: int, bptt: int, drop_last: bool = False
    ) -> SequentialComponents:
        """Batchify ``tokens`` into ``batch_size`` columns and cut windows of ``bptt`` rows."""
        return cls(tokens, batch_size, bptt, drop_last)

    @property
    def m(self) -> int:
        """Number of components (windows)."""
        return len(self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def indices(self) -> list[torch.Tensor]:
        """Row ranges of each window's inputs (in the batchified ``(L, B)`` array)."""
        return [torch.arange(s, s + t) for s, t in zip(self.starts, self.lengths, strict=True)]

    def to(self, device: torch.device | str | None) -> SequentialComponents:
        """Make :meth:`batch` return tensors on ``device`` (in place; returns self)."""
        self._device = None if device is None else torch.device(device)
        return self

    def batch(
        self, i: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(inp, target)`` of window ``i``, each of shape ``(T_i, B)``."""
        if not 0 <= i < len(self.starts):
            raise IndexError(f"component {i} out of range for m = {self.m}")
        s, t = self.starts[i], self.lengths[i]
        out = (self.data[s : s + t], self.data[s + 1 : s + 1 + t])
        return _to(out, device if device is not None else self._device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self.batch(i)

    def describe(self) -> dict[str, Any]:
        """JSON-safe record of the windows."""
        return {
            "kind": "sequential",
            "N": self.n_tokens,
            "B": self.batch_size,
            "bptt": self.bptt,
            "m": self.m,
            "seed": None,
            "dropped_tokens": self.n_dropped_tokens,
            "last_batch": "dropped" if self.drop_last else "kept",
            "sizes": _size_summary(self.sizes),
            "window_lengths": _size_summary(self.lengths),
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the windowing (starts and lengths) plus :meth:`describe`."""
        return {**self.describe(), "starts": list(self.starts), "lengths": list(self.lengths)}

    def __repr__(self) -> str:
        return (
            f"SequentialComponents(tokens={self.n_tokens}, B={self.batch_size}, "
            f"bptt={self.bptt}, m={self.m})"
        )


def n_components(n_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """``ceil(N/B)``, or ``floor(N/B)`` with ``drop_last``.

    >>> n_components(10, 4), n_components(10, 4, drop_last=True)
    (3, 2)
    """
    _check_batch_size(batch_size)
    return n_samples // batch_size if drop_last else math.ceil(n_samples / batch_size)
