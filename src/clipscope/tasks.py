"""The one factory of models, data and losses: a config (or a built-in name) becomes a task.

A *task* is ``(model, loss_fn, components, heldout)`` (:class:`Task`): what
:func:`clipscope.fit` trains and :func:`clipscope.probe` measures.

* :func:`build_task` -- from a :class:`~clipscope.config.TrainConfig`:
  ``least_squares`` (synthetic, built in), ``classification`` and
  ``language_model`` (:func:`clipscope.models.build_model` and
  :func:`clipscope.data.load_splits`; e.g. ``model = "gpt"`` on
  ``data = "chars"``, the ``tinyshakespeare-gpt`` study task). Bad values raise
  :class:`~clipscope.errors.ConfigError` naming the key (``data``, ``model``,
  ``model_kwargs``, ``ar_alpha``/``tar_beta``) before any file is written.
* :func:`builtin_task` -- the tiny synthetic tasks of ``clipscope probe --task``
  (:data:`BUILTIN_TASKS`): seconds anywhere.

Losses are each component's **mean** loss (the paper's eq. (1) averages the
``f_i`` with weight ``1/m``); ``heldout(model) -> float`` is the task metric:
held-out loss (least squares), accuracy (classification), perplexity (language
models, lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from clipscope.components import Components, SequentialComponents, detach_state
from clipscope.config import TrainConfig, available_memory
from clipscope.errors import ConfigError

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "build_task",
    "builtin_task",
    "check_model_memory",
    "lm_loss",
    "model_state_bytes",
]

BUILTIN_TASKS = ("mlp", "lstm")


class Task(NamedTuple):
    """``(model, loss_fn, components, heldout)``; unpacks like a tuple."""

    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    components: Components | SequentialComponents
    heldout: Callable[[nn.Module], float] | None


def lm_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Token-mean cross entropy of ``(T, B, V)`` logits against ``(T, B)`` targets."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def build_task(cfg: TrainConfig) -> Task:
    """Build the task of a config on ``cfg.device`` in ``cfg.dtype``; seeded by ``cfg.seed``.

    The model is initialized under ``torch.manual_seed(cfg.seed)``; the data and
    the fixed partition follow ``cfg.data_seed``. ``heldout`` is None when
    ``cfg.heldout`` is false or the data has no held-out split.

    Raises
    ------
    ConfigError
        An unknown ``data`` or ``model`` name, ``model_kwargs`` the model does
        not take or a model whose training state does not fit in the memory
        available (:func:`check_model_memory`, before anything is allocated),
        AR/TAR with a model that does not record its activations, a held-out
        split too short for ``heldout_tokens``.
    """
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if cfg.task == "least_squares":
        model, loss_fn, comps, heldout = _least_squares(cfg, dtype)
    else:
        model, loss_fn, comps, heldout = _library_task(cfg, dtype)
    model = model.to(cfg.device)
    comps.to(cfg.device)
    return Task(model, loss_fn, comps, heldout if cfg.heldout else None)


def _least_squares(cfg: TrainConfig, dtype: torch.dtype):
    """Synthetic least squares: y = X w* + noise; f_i = ½·mean over the batch of (xᵀw − y)²."""
    gen = torch.Generator().manual_seed(cfg.data_seed)
    n = cfg.n_samples or 256
    X = torch.randn(2 * n, cfg.dim, generator=gen, dtype=dtype)
    w = torch.randn(cfg.dim, generator=gen, dtype=dtype)
    Y = X @ w + cfg.noise * torch.randn(2 * n, generator=gen, dtype=dtype)
    comps = Components.from_tensors(
        X[:n], Y[:n], cfg.batch_size, seed=cfg.data_seed, drop_last=cfg.last_batch == "drop"
    )
    comps.data_description = {
        "name": "synthetic",
        "kind": "least squares y = X w* + noise",
        "n_samples": n,
        "dim": cfg.dim,
        "noise": cfg.noise,
        "heldout": f"{n} more samples of the same distribution",
    }
    torch.manual_seed(cfg.seed)
    model = nn.Linear(cfg.dim, 1, bias=False).to(dtype)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    Xh, Yh = X[n:], Y[n:]

    def heldout(model: nn.Module) -> float:
        device = next(model.parameters()).device
        return float(loss_fn(model(Xh.to(device)), Yh.to(device)))

    return model, loss_fn, comps, heldout


def _model(cfg: TrainConfig, dtype: torch.dtype, **extra: Any) -> nn.Module:
    """Build the config's model: refused by name (ConfigError) before anything is allocated.

    The model is first built on the ``meta`` device (shapes only, no memory) and
    its memory checked (:func:`check_model_memory`); a build the estimate missed
    that still runs out of memory is refused the same way, not as an allocator
    traceback.
    """
    from clipscope.models import MODEL_NAMES, build_model

    if cfg.model not in MODEL_NAMES:
        raise ConfigError(
            f"config: bad value for 'model': {cfg.model!r} (valid: {', '.join(MODEL_NAMES)})"
        )
    kwargs = {**dict(cfg.model_kwargs), **extra}
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_kwargs}
    try:
        with torch.device("meta"):
            shapes = build_model(cfg.model, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config: bad value for 'model_kwargs': {given!r} ({exc})") from None
    except Exception:
        shapes = None
    if shapes is not None:
        check_model_memory(cfg, shapes)
    torch.manual_seed(cfg.seed)
    try:
        return build_model(cfg.model, **kwargs).to(dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config: bad value for 'model_kwargs': {given!r} ({exc})") from None
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, MemoryError) and "alloc" not in text and "memory" not in text:
            raise
        raise ConfigError(
            f"config: bad value for 'model_kwargs': {given!r} (model {cfg.model!r} does not "
            f"fit in memory on {cfg.device}: {text})"
        ) from None


def model_state_bytes(model: nn.Module, cfg: TrainConfig) -> tuple[int, int]:
    """Return ``(parameters, bytes)``: the model's parameter count and what training keeps.

    Bytes = (weights + gradients + the optimizer's state per parameter) × the
    dtype's size, plus the buffers: 2 copies for SGD, 3 with momentum, 4 for
    Adam/AdamW (two moments). A lower bound of a run's memory (activations,
    the data and the probe's ∇f come on top). Tied weights count once. Works
    on a ``meta`` model (nothing allocated).
    """
    itemsize = 8 if cfg.dtype == "float64" else 4
    params = {id(p): p.numel() for p in model.parameters()}
    buffers = sum(b.numel() for b in model.buffers())
    copies = 2 + (2 if cfg.optimizer in ("adam", "adamw") else 1 if cfg.momentum else 0)
    n = sum(params.values())
    return n, (copies * n + buffers) * itemsize


def check_model_memory(cfg: TrainConfig, model: nn.Module) -> None:
    """ConfigError naming ``model_kwargs`` when the model's training state exceeds the memory.

    ``model`` is the config's model built on the ``meta`` device; the memory is
    what is available now on ``cfg.device`` (:func:`clipscope.config.available_memory`).
    """
    n, need = model_state_bytes(model, cfg)
    have = available_memory(cfg.device)
    if have is not None and need > have:
        given = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_kwargs}
        raise ConfigError(
            f"config: bad value for 'model_kwargs': {given!r} (model {cfg.model!r} has {n:,} "
            f"parameters; their {cfg.dtype} weights, gradients and {cfg.optimizer} state need "
            f"at least {need:,} bytes, but {have:,} bytes of memory are available on {cfg.device})"
        )


def _library_task(cfg: TrainConfig, dtype: torch.dtype):
    from clipscope.data import DATASETS, load_splits

    if cfg.data not in DATASETS:
        raise ConfigError(
            f"config: bad value for 'data': {cfg.data!r} (valid: {', '.join(DATASETS)})"
        )
    splits = load_splits(
        cfg.data, cfg.data_dir, train_file=cfg.train_file, heldout_file=cfg.heldout_file
    )
    train, test = splits.train, splits.test
    description = {"name": cfg.data, **splits.describe}
    if cfg.task == "language_model":
        if cfg.n_samples:  # samples are tokens here
            train = train[: cfg.n_samples]
        try:
            comps = SequentialComponents.from_tokens(
                train, cfg.batch_size, cfg.bptt, drop_last=cfg.last_batch == "drop"
            )
        except ValueError as exc:  # e.g. a text too short for one batch
            raise ConfigError(
                f"config: bad value for 'batch_size': {cfg.batch_size} (training split of "
                f"{len(train)} tokens: {exc})"
            ) from None
        vocab = splits.vocab_size or int(train.max()) + 1
        extra = {} if "vocab" in dict(cfg.model_kwargs) else {"vocab": vocab}
        model = _model(cfg, dtype, **extra)
        _check_context(cfg, model)
        loss_fn = _lm_loss(cfg, model)
        heldout = None
        if test is not None:
            tokens = test[: cfg.heldout_tokens] if cfg.heldout_tokens else test
            heldout = _lm_perplexity(tokens, cfg.batch_size, cfg.bptt, cfg.device)
        comps.data_description = description
        return model, loss_fn, comps, heldout
    X, Y = train
    if cfg.n_samples:
        X, Y = X[: cfg.n_samples], Y[: cfg.n_samples]
    X = X.to(dtype) if X.is_floating_point() else X
    comps = Components.from_tensors(
        X, Y, cfg.batch_size, seed=cfg.data_seed, drop_last=cfg.last_batch == "drop"
    )
    model = _model(cfg, dtype)
    heldout = None
    if test is not None:
        Xt, Yt = test
        Xt = Xt.to(dtype) if Xt.is_floating_point() else Xt

        def heldout(model: nn.Module) -> float:
            model.eval()
            return float((model(Xt.to(cfg.device)).argmax(-1) == Yt.to(cfg.device)).double().mean())

    comps.data_description = description
    return model, F.cross_entropy, comps, heldout


def _check_context(cfg: TrainConfig, model: nn.Module) -> None:
    """ConfigError naming ``bptt`` when a model with a fixed context cannot read a window.

    Models that attend over a bounded window (:class:`clipscope.models.GPTLM`:
    ``model.context`` rows of position embedding) need ``bptt ≤ context``.
    """
    context = getattr(model, "context", None)
    if isinstance(context, int) and cfg.bptt > context:
        raise ConfigError(
            f"config: bad value for 'bptt': {cfg.bptt} (model {cfg.model!r} reads windows of "
            f"at most {context} tokens; set bptt <= {context} or model_kwargs.context >= "
            f"{cfg.bptt})"
        )


def _lm_loss(cfg: TrainConfig, model: nn.Module) -> Callable:
    """Return the LM component loss: token-mean cross entropy, plus AR/TAR when configured.

    With ``ar_alpha = α`` or ``tar_beta = β`` nonzero every ``f_i`` (training
    steps and probes alike) is :func:`clipscope.models.awd_lstm_loss`'s
    ``CE + α·mean(d²) + β·mean((r[t+1] − r[t])²)``; the model must keep its
    last layer's activations (``last_activations``), otherwise ConfigError
    naming the key.
    """
    if not (cfg.ar_alpha or cfg.tar_beta):
        return lm_loss
    if not hasattr(model, "last_activations"):
        key = "ar_alpha" if cfg.ar_alpha else "tar_beta"
        raise ConfigError(
            f"config: bad value for '{key}': {getattr(cfg, key)!r} (model {cfg.model!r} "
            "does not record activations for AR/TAR; use model = 'awd-lstm' or set it to 0)"
        )
    from clipscope.models import awd_lstm_loss

    return awd_lstm_loss(model, cfg.ar_alpha, cfg.tar_beta)


def _lm_perplexity(
    tokens: torch.Tensor, batch_size: int, bptt: int, device: str
) -> Callable[[nn.Module], float]:
    """Return ``heldout(model)`` = held-out perplexity ``exp(Σ_t CE_t / N_tokens)``.

    The held-out stream is batchified like the training stream (the run's
    ``batch_size`` columns, windows of ``bptt`` rows, the shorter last window
    kept, the ``len mod B`` tail dropped); the windows run in order with the
    recurrent state carried (detached), the model in eval mode (no dropout),
    and the cross entropy (without AR/TAR) is summed over every target token
    and divided by their number, so the result does not depend on ``bptt``.
    The loop runs it under ``model_guard`` and ``no_grad``, which restore the
    model's mode.
    """
    try:
        windows = SequentialComponents.from_tokens(tokens, batch_size, bptt).to(device)
    except ValueError as exc:
        raise ConfigError(
            f"config: bad value for 'heldout_tokens': held-out split of {len(tokens)} tokens "
            f"({exc})"
        ) from None

    def heldout(model: nn.Module) -> float:
        model.eval()
        total, count, state = 0.0, 0, None
        for inp, target in windows:
            out, state = model(inp, state)
            state = detach_state(state)
            ce = F.cross_entropy(
                out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(ce.double())
            count += target.numel()
        mean = total / count
        return math.exp(mean) if mean < 709.0 else math.inf  # exp overflows a float past 709.78

    return heldout


def builtin_task(
    name: str, n_samples: int = 512, batch_size: int = 16, seed: int = 0, bptt: int = 8
) -> Task:
    """Build a tiny synthetic task (float32, CPU) of ``clipscope probe --task``; no held-out.

    * ``mlp``: Gaussian-blob classification (4 classes in 8 dimensions), a
      2-layer tanh MLP, cross entropy;
    * ``lstm``: random tokens (vocabulary 20), a 16-wide LSTM language model
      with a tied decoder (:class:`clipscope.models.SmallLSTMLM`), sequential
      components with the state carried between windows.
    """
    from clipscope.models import MLP, SmallLSTMLM

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        classes, dim = 4, 8
        centers = 2.0 * torch.randn(classes, dim, generator=gen)
        Y = torch.randint(0, classes, (n_samples,), generator=gen)
        X = centers[Y] + torch.randn(n_samples, dim, generator=gen)
        model = MLP(dim, hidden=(16,), out_features=classes)
        comps = Components.from_tensors(X, Y, batch_size=batch_size, seed=seed)
        return Task(model, F.cross_entropy, comps, None)
    if name == "lstm":
        vocab = 20
        tokens = torch.randint(0, vocab, (n_samples,), generator=gen)
        model = SmallLSTMLM(vocab, emb=16, hidden=16, tied=True)
        comps = SequentialComponents.from_tokens(tokens, batch_size=batch_size, bptt=bptt)
        return Task(model, lm_loss, comps, None)
    raise ValueError(f"task must be one of {BUILTIN_TASKS}, got {name!r}")
