r"""Components across processes (torch.distributed, ``torchrun``): one result on every rank.

clipscope's reductions are sums, so a probe and a training step split over
processes with PyTorch's own collectives and nothing else (DESIGN §7). When a
default process group is initialised (``torch.distributed.init_process_group``,
e.g. by ``clipscope train`` launched with ``torchrun``) and has more than one
rank, every rank calls the same function with the same inputs:

**Probe** (:class:`Shard`). The partition stays the global one. Rank ``r``
evaluates a contiguous block of components (``Shard.start … Shard.stop - 1``),
the float64 vectors ``Σ_i g_i`` and ``Σ_i γ_i(η) g_i`` are all-reduced where
the routes' sums complete, and the per-component scalars ``n_i, d_i, f_i`` are
all-gathered in index order. Every rank returns the whole result; it equals
the one-process result up to the order of the float64 additions. Dyadic blocks
are whole top-level parents (``2^(L-1)`` consecutive components), so no parent
straddles two ranks. Sequential (language-model) components carry the
recurrent state from window ``i-1`` into ``i``: a rank whose block starts at
``s`` first runs windows ``0 … s-1`` forward only, without gradients, to get
the exact state at ``s`` (cost: up to ``(W-1)/W`` of a no-grad forward epoch
per pass on the last rank).

**Training step** (:class:`StepReducer`). Each component's batch is split
over the ranks (samples on dim 0; the ``B`` columns of a language-model
window); each rank backpropagates the mean loss of its part, and one float64
all-reduce forms ``g = Σ_r (s_r/s) g_r`` -- the gradient of the component's
mean loss, exact for parts of unequal size -- together with the loss, a
failure flag and the stop signal. Every rank then applies the exact
``C(g; η)`` to the same ``g``. A model whose samples are coupled in training
(train-mode BatchNorm) is not split: every rank computes the whole component
and rank 0's gradient is the one used (exact, no speed-up).

**Agreement.** :meth:`Ranks.check_same` all-gathers fingerprints (config,
data, model, arguments) and raises :class:`RanksDisagree` naming what
differs. An exception on one rank reaches the others at their next
collective (:meth:`Ranks.together`): every rank raises, none waits for the
timeout. A rank that dies makes the others' next collective fail; that is a
:class:`DistributedError` naming the rank and the collective. Only rank 0
writes files (:func:`on_writer`); the others learn whether the write worked.

``docs/distributed.md`` has the launch commands and the communication volume.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import importlib
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "Ranks",
    "RanksDisagree",
    "Shard",
    "StepReducer",
    "active",
    "check_split_loss",
    "components_fingerprint",
    "distributed_setup",
    "init_from_env",
    "is_writer",
    "model_fingerprint",
    "on_writer",
    "ranks",
    "shutdown",
    "split_batch",
    "unwrap",
]

#: Seconds a collective may wait for the other ranks (``init_from_env``'s default;
#: ``CLIPSCOPE_DIST_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or did not reach it within the timeout."""


class RanksDisagree(ValueError):
    """The ranks were given different inputs (config, data, model or arguments)."""


# -- the process group -------------------------------------------------------------------
def active() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return not active() or dist.get_rank() == 0


def ranks(enabled: bool | None = None) -> Ranks | None:
    """Return the :class:`Ranks` of the default group, or None to compute in this process only.

    ``enabled=None``: the group when one with more than one rank is initialised;
    ``False``: None; ``True``: the group, and :class:`RuntimeError` when there is none.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"distributed must be None, True or False, got {enabled!r}")
    if enabled is False:
        return None
    if not active():
        if enabled:
            raise RuntimeError(
                "distributed=True needs an initialised torch.distributed process group with "
                "more than one rank (launch with torchrun and call init_process_group)"
            )
        return None
    return Ranks()


def init_from_env(device: str = "cpu", timeout: float | None = None) -> bool:
    """Initialise the default process group when launched by ``torchrun``; return whether it did.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, or a group
    exists already. The backend is NCCL for a CUDA ``device`` (each rank on
    ``cuda:LOCAL_RANK``), else gloo. ``timeout`` (seconds; default
    ``CLIPSCOPE_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`) bounds every
    collective: a rank that waits longer fails with :class:`DistributedError`.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    seconds = timeout if timeout is not None else _env_timeout()
    if not (isinstance(seconds, (int, float)) and seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"the distributed timeout must be a positive number, got {seconds!r}")
    backend = "gloo"
    if str(device).startswith("cuda"):
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch.distributed.nn.functional binds ``group.WORLD`` into default arguments when
    # first imported. torch imports it lazily (torch.use_deterministic_algorithms ->
    # inductor -> FSDP -> _shard); after init_process_group that binding would keep the
    # group alive past destroy_process_group, and gloo's worker threads with it (see
    # shutdown). Imported now, it binds None, the default group.
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(seconds)))
    atexit.register(shutdown)
    return True


def _env_timeout() -> float:
    text = os.environ.get("CLIPSCOPE_DIST_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"CLIPSCOPE_DIST_TIMEOUT must be seconds, got {text!r}") from None


def distributed_setup() -> dict[str, Any]:
    """Return ``{"world_size", "backend"}`` for ``env.json`` (1 and None without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {"world_size": 1, "backend": None}
    return {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}


def shutdown() -> None:
    """Destroy the default process group (after :func:`init_from_env` returned True).

    ``destroy_process_group`` frees the group -- which joins gloo's worker
    threads while the interpreter is still alive -- only when nothing else
    references it. When something does (``torch.distributed.nn.functional``'s
    default arguments did when it was imported after ``init_process_group``;
    :func:`init_from_env` now imports it first), the threads run on into
    interpreter shutdown: one that drops the last collective's tensors there
    needs the GIL, Python ends the thread inside a C++ destructor, and the
    process aborts (SIGABRT, "terminate called without an active exception")
    after all its work is done.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module a probe or a step runs on: ``DistributedDataParallel``'s ``.module``.

    Probing and stepping through ``.module`` with ``torch.autograd.grad`` (or a
    backward after a forward that did not go through DDP) never fires DDP's
    gradient all-reduce. FSDP (and any model whose parameters are
    ``DTensor`` shards) splits the parameters themselves, so a component
    gradient is not this rank's to compute: refused.

    Raises
    ------
    TypeError
        The model is, or contains, an FSDP module, or holds ``DTensor`` parameters.
    """
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, nn.Module):
        fsdp = _fsdp_classes()
        if fsdp and any(isinstance(m, fsdp) for m in model.modules()):
            raise TypeError(
                "FSDP-wrapped models are not supported: FSDP shards every parameter across "
                "the ranks, so no rank holds the component gradients clipscope measures. Probe "
                "the unwrapped model (each rank with the full parameters) instead; "
                "DistributedDataParallel is supported"
            )
        sharded = [n for n, p in model.named_parameters() if _is_dtensor(p)]
        if sharded:
            raise TypeError(
                f"parameters {sharded[:3]} are DTensors (sharded across the ranks): no rank "
                "holds the component gradients clipscope measures; probe a model whose "
                "parameters every rank holds in full"
            )
    return model


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(p, DTensor)


def _fsdp_classes() -> tuple[type, ...]:
    """FSDP's module classes, from ``torch.distributed.fsdp`` only if it is imported already.

    A model that contains an FSDP module implies the import happened; importing
    it here would not find one more, and it would be harmful: FSDP imports
    ``torch.distributed.nn.functional``, whose default arguments bind
    ``group.WORLD`` at import time, so after ``init_process_group`` they keep the
    group alive past ``destroy_process_group`` (its gloo threads then outlive
    the interpreter: SIGABRT at exit, see :func:`shutdown`).
    """
    module = sys.modules.get("torch.distributed.fsdp")
    names = ("FullyShardedDataParallel", "FSDPModule")
    return tuple(c for c in (getattr(module, n, None) for n in names) if isinstance(c, type))


# -- collectives ---------------------------------------------------------------------------
def _mark(exc: BaseException) -> BaseException:
    exc.__dict__["_clipscope_agreed"] = True  # seen by Ranks.together
    return exc


def _agreed(exc: BaseException) -> bool:
    return bool(getattr(exc, "__dict__", {}).get("_clipscope_agreed", False))


def _note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(text)


class Ranks:
    """The ranks of the default process group and the collectives clipscope uses.

    Every collective first exchanges a status flag, so that a rank whose local
    work raised (:meth:`together`) makes every rank raise at the same point
    instead of leaving them waiting. A collective that fails (a rank died, the
    timeout passed) raises :class:`DistributedError`. Vectors are reduced in
    float64. Tensors live on the model's device for the sums; the small
    metadata exchanges use CPU tensors with gloo, the current CUDA device with
    NCCL.
    """

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        backend = str(dist.get_backend())
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world})"

    # the one place torch's collectives are called
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # DistBackendError, a closed connection, a timeout
            raise _mark(
                DistributedError(
                    f"rank {self.rank} of {self.world}: {what} failed ({exc}). Another rank "
                    "died or did not reach this point within the process group's timeout; "
                    "every file already written is intact (a run continues with --resume)"
                )
            ) from exc

    def _status(self, failure: BaseException | None) -> None:
        """Exchange 'ok' / 'failed'; on a failure every rank raises (the failing one its own)."""
        flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64)
        flag = flag.to(self.device)
        self._call("the status exchange", dist.all_reduce, flag)
        if float(flag.item()) == 0.0:
            return
        mine = None if failure is None else _portable(failure)
        reports = self._call("the failure report", _all_gather_object, mine, self.world)
        if failure is not None:
            raise _mark(failure)
        rank, exc = next((r, e) for r, e in enumerate(reports) if e is not None)
        _note(exc, f"clipscope: raised on rank {rank} of {self.world}; every rank stopped here")
        raise _mark(exc)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run work with collectives so that an exception on one rank is raised on every rank.

        On leaving, every rank exchanges its status once more; a rank that
        raised between two collectives announces it at the others' next one.
        """
        try:
            yield
        except Exception as exc:
            if _agreed(exc):
                raise
            self._status(exc)
            raise
        self._status(None)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce a float64 tensor in place (sum over ranks); return it."""
        if tensor.dtype != torch.float64:
            raise TypeError(f"clipscope reduces vectors in float64, got {tensor.dtype}")
        self._status(None)
        self._call("an all-reduce of float64 sums", dist.all_reduce, tensor)
        return tensor

    def max(self, value: float) -> float:
        """Return the largest ``value`` over the ranks."""
        self._status(None)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._call("an all-reduce (max)", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``(k, l_r)`` float64 tensor along dim 1, in rank order."""
        self._status(None)
        local = local.to(device=self.device, dtype=torch.float64)
        length = torch.tensor([local.shape[1]], dtype=torch.int64, device=self.device)
        lengths = [torch.zeros_like(length) for _ in range(self.world)]
        self._call("an all-gather of lengths", dist.all_gather, lengths, length)
        sizes = [int(v.item()) for v in lengths]
        width = max([*sizes, 1])
        padded = torch.zeros(local.shape[0], width, dtype=torch.float64, device=self.device)
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._call("an all-gather of per-component values", dist.all_gather, parts, padded)
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes, strict=True)], dim=1)

    def objects(self, obj: Any) -> list[Any]:
        """All-gather a picklable object; return every rank's, in rank order."""
        self._status(None)
        return self._call("an all-gather of objects", _all_gather_object, obj, self.world)

    def broadcast(self, obj: Any) -> Any:
        """Return rank 0's picklable object on every rank."""
        self._status(None)
        box = [obj]
        self._call("a broadcast from rank 0", dist.broadcast_object_list, box, 0)
        return box[0]

    def check_same(self, fingerprints: Mapping[str, Any]) -> None:
        """Raise :class:`RanksDisagree` naming each entry that differs from rank 0's.

        ``fingerprints`` maps a name (``"config"``, ``"data"``, ``"model"``,
        ``"arguments"``) to a small picklable value: a digest, or a dict of
        settings (then the message lists the keys that differ).
        """
        every = self.objects(dict(fingerprints))
        lines = []
        for name, ours in every[0].items():
            for r, theirs in enumerate(every[1:], start=1):
                value = theirs.get(name)
                if value == ours:
                    continue
                if isinstance(ours, Mapping) and isinstance(value, Mapping):
                    keys = sorted(set(ours) | set(value), key=str)
                    diff = [
                        f"{k}: {ours.get(k)!r} on rank 0, {value.get(k)!r} on rank {r}"
                        for k in keys
                        if ours.get(k) != value.get(k)
                    ]
                    lines.append(f"{name} differs on rank {r}: " + "; ".join(diff))
                else:
                    lines.append(f"{name} differs on rank {r} (fingerprint {value!r} vs {ours!r})")
        if lines:
            raise _mark(
                RanksDisagree(
                    "the ranks were given different inputs; every rank must run the same call "
                    "on the same config, data and model:\n  " + "\n  ".join(lines)
                )
            )


def _all_gather_object(obj: Any, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a :class:`DistributedError` with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return DistributedError(f"{type(exc).__name__}: {exc}")


def on_writer(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (the one that writes files) and return its result on every rank.

    Without a process group ``fn`` just runs. Under one, rank 0 runs it and
    broadcasts the result (it must be picklable) or the exception, which
    every rank then raises: a refused directory or a full disk stops all ranks
    at the same point.
    """
    group = ranks()
    if group is None:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if group.rank == 0:
        try:
            outcome = ("ok", fn())
        except Exception as exc:
            outcome = ("error", _portable(exc))
    kind, value = group.broadcast(outcome)
    if kind == "error":
        if group.rank != 0:
            _note(value, "clipscope: raised on rank 0 (the rank that writes files)")
        raise _mark(value)
    return value


# -- fingerprints ----------------------------------------------------------------------------
def _update(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in obj:
            h.update(repr(key).encode())
            _update(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _update(h, item)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def _digest(*objs: Any) -> str:
    h = hashlib.sha256()
    for obj in objs:
        _update(h, obj)
    return h.hexdigest()[:16]


def digest(*objs: Any) -> str:
    """SHA-256 (16 hex digits) of tensors, arrays, mappings, sequences and reprs (a rank check)."""
    return _digest(*objs)


def model_fingerprint(model: nn.Module, params: Sequence[torch.Tensor] | None = None) -> str:
    """SHA-256 (16 hex digits) of every parameter, buffer and train/eval flag of ``model``.

    ``params`` (the ones differentiated) enter by name. One pass over the
    model's bytes: about as long as reading them once.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [] if params is None else [names.get(id(p), "?") for p in params]
    modes = [m.training for m in model.modules()]
    return _digest(type(model).__name__, model.state_dict(), chosen, modes)


def components_fingerprint(components: Any) -> str:
    """SHA-256 (16 hex digits) of a partition: its record, order and three components' batches.

    ``describe()``, the sample order (``order``) or windows (``starts``), and the
    full contents of components ``0``, ``m//2`` and ``m-1``: a different data
    set, seed, batch size or split shows; a difference confined to other
    components' samples with the same partition does not (reading every
    batch would cost a pass over the data).
    """
    m = len(components)
    picks = sorted({0, m // 2, m - 1})
    batches = [components.batch(i) for i in picks]
    order = getattr(components, "order", None)
    starts = getattr(components, "starts", None)
    return _digest(components.describe(), order, starts, list(components.sizes), batches)


# -- the probe's share ---------------------------------------------------------------------
class Shard:
    """A rank's contiguous block of the m components, and the collectives that complete sums.

    Blocks are balanced in units of ``align`` consecutive components (the dyadic
    route's top-level parents); rank ``r`` holds units ``⌊rU/W⌋ … ⌊(r+1)U/W⌋ - 1``
    of ``U = ⌈m/align⌉``, so a block may be empty (more ranks than units: the rank
    idles but takes part in every collective). Without ``ranks`` it is the
    whole range and every method returns its input: the one-process code path
    is the same code.

    >>> s = Shard(5)
    >>> (s.start, s.stop, s.only, s.largest, s.world)
    (0, 5, None, 5, 1)
    """

    def __init__(self, m: int, ranks: Ranks | None = None, align: int = 1) -> None:
        self.m, self.ranks, self.align = int(m), ranks, max(int(align), 1)
        world = 1 if ranks is None else ranks.world
        units = -(-self.m // self.align)
        self.bounds = [
            (
                min(self.m, (r * units // world) * self.align),
                min(self.m, ((r + 1) * units // world) * self.align),
            )
            for r in range(world)
        ]
        self.start, self.stop = self.bounds[0 if ranks is None else ranks.rank]

    @property
    def world(self) -> int:
        """Number of ranks (1 without a process group)."""
        return 1 if self.ranks is None else self.ranks.world

    @property
    def indices(self) -> range:
        """Return the component indices of this rank's block."""
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def largest(self) -> int:
        """Components of the largest block (the keep route's memory test)."""
        return max(b - a for a, b in self.bounds)

    @property
    def only(self) -> range | None:
        """``only=`` for :func:`~clipscope.engine.losses.component_losses` (None: every one)."""
        return None if self.ranks is None else self.indices

    def losses(self, stream: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, Any]]:
        """Yield this block's ``(i, f_i)`` from ``component_losses(..., only=self.only)``.

        Stops after the block's last component and closes the stream, so the
        windows after it are never run (a sequential stream would otherwise
        carry its state to the end).
        """
        if self.ranks is None:
            yield from stream
            return
        with contextlib.closing(stream):
            for _ in range(len(self)):
                yield next(stream)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """:meth:`Ranks.together` (nothing without a process group)."""
        if self.ranks is None:
            yield
            return
        with self.ranks.together():
            yield

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (float64)."""
        return tensor if self.ranks is None else self.ranks.sum_(tensor)

    def max(self, value: float) -> float:
        """Return the largest ``value`` over the ranks."""
        return value if self.ranks is None else self.ranks.max(value)

    def gather(self, *local: Sequence[float] | np.ndarray) -> list[np.ndarray]:
        """Concatenate each rank's local sequences in rank order (float64 arrays).

        All sequences of one call have the same length on a rank (one gather).
        """
        arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in local]
        if self.ranks is None:
            return arrays
        stacked = np.stack(arrays) if arrays[0].size else np.zeros((len(arrays), 0))
        stacked = torch.from_numpy(stacked)
        full = self.ranks.gather(stacked).cpu().numpy()
        return [full[k].copy() for k in range(len(arrays))]

    def complete(
        self, *arrays: np.ndarray, offsets: Sequence[int] | None = None
    ) -> list[np.ndarray]:
        """Return global arrays whose block ``[a, b)`` this rank filled, with every rank's block.

        ``offsets`` maps components to positions (the per-sample route: sample
        offsets of the chunks); by default position ``i`` is component ``i``.
        """
        if self.ranks is None:
            return list(arrays)
        a, b = self.start, self.stop
        if offsets is not None:
            a, b = offsets[a], offsets[b]
        gathered = self.gather(*[np.asarray(x, dtype=np.float64)[a:b] for x in arrays])
        return [g.astype(np.asarray(x).dtype) for g, x in zip(gathered, arrays, strict=True)]

    def objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (``[obj]`` without a process group)."""
        return [obj] if self.ranks is None else self.ranks.objects(obj)


# -- the training step -----------------------------------------------------------------------
def check_split_loss(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    components: Any,
    world: int,
    *,
    form: str,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    r"""Check that a component's loss is the weighted mean of its parts' (:class:`StepReducer`).

    Training under torch.distributed splits each component's batch over the
    ``world`` processes (:meth:`StepReducer.part`) and combines the parts'
    losses and gradients weighted by their sample shares ``s_r/s`` (or by their
    declared counts, for a loss returning ``(sum, count)``). That is the
    component's own gradient exactly when

    .. math:: f_i(x) = \sum_r w_r f_i^r(x) \Big/ \sum_r w_r,

    which fails for a mean over the non-padding tokens of padded batches, class
    weights or an in-batch (contrastive) loss -- unless the loss declares its
    weights. Each process checks it alone (no communication, the same answer
    everywhere) on the first and the last component (``indices``): the whole
    batch's loss and each part's, without gradients, dropout off, the buffers
    restored after each forward (sequential components from a zero state). The
    relative difference must be at most the dtype's tolerance
    (:func:`clipscope.engine.verify.tolerance`).

    Returns the record ``{"components", "max_error", "tolerance", "weights"}``.

    Raises
    ------
    ValueError
        When it does not hold, naming the loss, the component and both values:
        training would silently follow another gradient than the one process's.
    """
    from clipscope.engine import verify
    from clipscope.engine.guard import BufferHold, dropout_policy
    from clipscope.engine.losses import weighted_component_loss

    m = len(components)
    sequential = bool(getattr(components, "sequential", False))
    chosen = sorted({0, m - 1}) if indices is None else list(indices)
    params = [p for p in model.parameters()]
    tol = verify.tolerance(params[0].dtype if params else torch.float32)
    worst, where, kinds = 0.0, None, set()
    hold = BufferHold(model)
    with torch.no_grad(), dropout_policy(model, "off"), contextlib.ExitStack() as stack:
        stack.callback(hold.restore, scan=True)
        for i in chosen:
            batch = components.batch(i)
            size = int(components.batch_size if sequential else components.sizes[i])

            def loss_of(part_batch: Any, i: int = i) -> tuple[float, float | None]:
                hold.restore(scan=True)
                loss, w, _ = weighted_component_loss(
                    model, loss_fn, part_batch, form=form, sequential=sequential, index=i
                )
                return float(loss), w

            whole, _ = loss_of(batch)
            parts = []
            for r in range(world):
                a, b = r * size // world, (r + 1) * size // world
                if b > a:
                    sub = split_batch(batch, size, (a, b), dim=1 if sequential else 0)
                    f, w = loss_of(sub)
                    parts.append((f, w, (b - a) / size))
            declared = [w is not None for _, w, _ in parts]
            kinds.add("declared" if all(declared) else "samples")
            weights = [w if w is not None else share for _, w, share in parts]
            merged = sum(w * f for (f, _, _), w in zip(parts, weights, strict=True)) / sum(weights)
            error = verify.merge_error(whole, merged, max(abs(whole), abs(merged)))
            if not error <= worst:
                worst, where = error, (i, whole, merged, all(declared))
    record = {"components": chosen, "max_error": worst, "tolerance": tol,
              "weights": "declared" if kinds == {"declared"} else "samples"}  # fmt: skip
    if not worst <= tol:
        i, whole, merged, declared = where
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        weights = "their declared counts" if declared else "their sample shares"
        raise ValueError(
            f"under torch.distributed each of the {world} processes takes part of a component's "
            f"batch, and the parts' losses and gradients are combined weighted by {weights}; "
            f"for loss_fn {name!r} that is not the component's own loss: component {i} has "
            f"f_i = {whole:.9g} from its whole batch and {merged:.9g} from its {world} parts "
            f"(relative error {worst:.3g} > {tol:g}). A mean over non-padding tokens, class "
            "weights or an in-batch loss do this: return (sum, count) from loss_fn (the "
            "declared weights, docs/engine.md), or train in one process"
        )
    return record


def split_batch(batch: Any, size: int, part: tuple[int, int], dim: int = 0) -> Any:
    """Return ``batch`` restricted to samples ``part = (a, b)`` of its ``size`` along ``dim``.

    Tensors whose ``dim`` has length ``size`` are narrowed; tuples, lists and
    dicts are walked; anything else (a scalar, a string) is kept whole.

    Raises
    ------
    ValueError
        No tensor of the batch has ``size`` entries along ``dim``.

    >>> x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    >>> split_batch((x, y), 5, (3, 5))[1]
    tensor([3, 4])
    """
    found = [False]

    def cut(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.dim() > dim and obj.shape[dim] == size:
                found[0] = True
                return obj.narrow(dim, part[0], part[1] - part[0])
            return obj
        if isinstance(obj, Mapping):
            return {k: cut(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return tuple(cut(v) for v in obj)
        if isinstance(obj, list):
            return [cut(v) for v in obj]
        return obj

    out = cut(batch)
    if not found[0]:
        raise ValueError(
            f"cannot split a component's batch over the ranks: no tensor in it has the "
            f"component's {size} samples along dim {dim}"
        )
    return out


class StepReducer:
    r"""One training step over the ranks: split the component, all-reduce ``g`` and ``f_i``.

    For component ``i`` of ``s`` samples (a language-model window: ``B`` columns),
    rank ``r`` takes samples ``⌊rs/W⌋ … ⌊(r+1)s/W⌋ - 1`` (:meth:`part`), computes the
    mean loss ``f_i^r`` of its part and its gradient ``g_r``; :meth:`__call__` then
    all-reduces, in float64 and in one message of ``n + k + 6`` numbers (``k``
    parameter tensors), ``Σ_r w_r g_r`` and ``Σ_r w_r f_i^r`` with ``w_r = s_r/s``,
    which are the component's gradient and mean loss exactly (for parts of
    unequal size, and empty ones: ``w_r = 0``), plus whether each parameter has a
    gradient, a failure flag and the stop signal. That presumes the component's
    loss is the sample-weighted mean of its parts' losses, which
    :func:`check_split_loss` checks before training. A loss that declares its
    weights (returns ``(sum, count)``, :func:`clipscope.engine.losses.declared_mean`;
    :attr:`count` is set by the step's closure) is reduced by them instead:
    ``(Σ_r c_r g_r / Σ_r c_r``, ``Σ_r c_r f_i^r / Σ_r c_r)`` with ``c_r`` rank
    ``r``'s declared count, the gradient of ``Σ_r sum_r / Σ_r count_r`` exactly
    (a mean over non-padding tokens). A model that couples the
    samples of a batch in training (``coupled``: train-mode BatchNorm) is not
    split: every rank computes the whole component and only rank 0's gradient
    enters (``w_0 = 1``), so the result is exactly one process's.

    Under ``"fixed"``-free training the ranks' dropout masks come from a
    generator seeded by ``(seed, step, rank)`` (:meth:`rng`), so a resumed run
    draws the same masks without per-rank RNG state in the checkpoint.
    """

    def __init__(
        self, group: Ranks, params: Sequence[torch.Tensor], *, coupled: bool, seed: int = 0
    ) -> None:
        self.ranks = group
        self.params = list(params)
        self.coupled = bool(coupled)
        self.seed = int(seed)
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.weight = 1.0
        #: This step's declared weight (the ``count`` of a loss returning ``(sum, count)``);
        #: None: a loss returning its mean, weighted by the sample share.
        self.count: float | None = None
        self.failure: BaseException | None = None
        self.loss = math.nan
        self.stop = 0

    def part(self, size: int) -> tuple[int, int]:
        """Return this rank's samples ``(a, b)`` of a component of ``size`` (all if coupled)."""
        if self.coupled:
            return 0, size
        r, w = self.ranks.rank, self.ranks.world
        return r * size // w, (r + 1) * size // w

    def batch(self, batch: Any, size: int, *, sequential: bool = False) -> Any:
        """Return this rank's part of a component's ``batch`` (None: empty); set its weight.

        Samples are on dim 0; a language-model window ``(T, B)`` splits its ``B``
        columns (dim 1), so each rank carries the recurrent state of its columns.
        """
        a, b = self.part(size)
        self.count = None  # the closure sets it when the loss declares its weight
        if self.coupled:
            self.weight = 1.0 if self.ranks.rank == 0 else 0.0
            return batch
        self.weight = (b - a) / size
        if b == a:
            return None
        if a == 0 and b == size:
            return batch
        return split_batch(batch, size, (a, b), dim=1 if sequential else 0)

    @contextlib.contextmanager
    def rng(self, step: int) -> Iterator[None]:
        """Draw step ``step``'s dropout masks on this rank from a seed of (seed, step, rank)."""
        from clipscope.engine.guard import component_seed

        rank = 0 if self.coupled else self.ranks.rank
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = [torch.cuda.current_device()] if cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(component_seed(component_seed(self.seed, step), rank))
            yield

    def closure(
        self, closure: Callable[[], torch.Tensor], empty: bool
    ) -> Callable[[], torch.Tensor]:
        """Wrap a step's closure: an empty part, or an exception, gives a zero loss to reduce.

        The exception is kept and raised on every rank by :meth:`__call__`.
        """

        def wrapped() -> torch.Tensor:
            self.failure = None
            if not empty:
                try:
                    return closure()
                except Exception as exc:
                    self.failure = exc
            return torch.zeros((), requires_grad=True)

        return wrapped

    def __call__(self, params: Sequence[torch.Tensor], loss: torch.Tensor, stop: int = 0) -> float:
        """All-reduce this rank's weighted gradient and loss; set every ``.grad``; return ``f_i``.

        ``stop`` is the signal number this rank received (0: none); afterwards
        :attr:`stop` is the one every rank acts on (SIGTERM before SIGINT).

        Raises
        ------
        Exception
            What a rank's closure raised (on every rank).
        ValueError
            The loss declared its weight ``(sum, count)`` on some ranks and returned
            its mean on others (on every rank).
        DistributedError
            A rank died or the timeout passed.
        """
        n, k = self.n, len(self.params)
        declared = self.count is not None and not self.coupled and self.failure is None
        w = self.count if declared else self.weight
        vec = torch.zeros(n + k + 7, dtype=torch.float64, device=self.params[0].device)
        off = 0
        for j, (p, numel) in enumerate(zip(self.params, self.numels, strict=True)):
            g = p.grad
            if g is not None and w != 0.0:
                g = g.to_dense() if g.layout != torch.strided else g
                vec[off : off + numel] = g.detach().reshape(-1).double() * w
            vec[n + j] = 1.0 if g is not None else 0.0
            off += numel
        if self.failure is None and w != 0.0:
            vec[n + k] = float(loss.detach()) * w
        vec[n + k + 1] = 1.0 if self.failure is not None else 0.0
        vec[n + k + 2] = 1.0 if stop == signal.SIGTERM else 0.0
        vec[n + k + 3] = 1.0 if stop and stop != signal.SIGTERM else 0.0
        # the declared counts' sum, the ranks that declared one, the ranks with a mean loss
        vec[n + k + 4] = w if declared else 0.0
        vec[n + k + 5] = 1.0 if declared else 0.0
        vec[n + k + 6] = 1.0 if not declared and self.weight != 0.0 else 0.0
        self.ranks._call("the all-reduce of the step's gradient", dist.all_reduce, vec)
        tail = vec[n:].cpu()
        if float(tail[k + 1]) > 0:  # some rank's closure raised: all raise, at this step
            reports = self.ranks._call(
                "the failure report", _all_gather_object,
                None if self.failure is None else _portable(self.failure), self.ranks.world,
            )  # fmt: skip
            if self.failure is not None:
                raise _mark(self.failure)
            rank, exc = next((r, e) for r, e in enumerate(reports) if e is not None)
            _note(exc, f"clipscope: raised on rank {rank} of {self.ranks.world} during the step")
            raise _mark(exc)
        self.stop = (
            int(signal.SIGTERM) if tail[k + 2] > 0 else int(signal.SIGINT) if tail[k + 3] > 0 else 0
        )
        if tail[k + 5] > 0 and tail[k + 6] > 0:
            raise ValueError(
                "loss_fn returned (sum, count) on some processes and a mean on others for the "
                "same component: the parts cannot be combined; return one form everywhere"
            )
        if tail[k + 5] > 0:  # declared weights: Σ_r c_r g_r / Σ_r c_r
            vec[:n] /= tail[k + 4]
            vec[n + k] /= tail[k + 4]
            tail = vec[n:].cpu()
        off = 0
        for j, (p, numel) in enumerate(zip(self.params, self.numels, strict=True)):
            p.grad = vec[off : off + numel].view_as(p).to(p.dtype) if tail[j] > 0 else None
            off += numel
        self.loss = float(tail[k])
        return self.loss
