"""Reference models (ResNet18-CIFAR, AWD-LSTM), a small GPT and small models for the defaults.

Classifiers map ``(N, ...)`` inputs to ``(N, classes)`` logits. Language
models use the sequential interface ``model(inp, state) -> (logits, new_state)``
with ``inp`` a ``(T, B)`` int64 tensor, ``logits`` of shape ``(T, B, V)`` and
``state=None`` meaning zeros.

>>> sorted(MODEL_NAMES)
['awd-lstm', 'gpt', 'mlp', 'resnet18-cifar', 'small-cnn', 'small-lstm-lm']
>>> type(build_model("mlp")).__name__
'MLP'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from clipscope.models.awd_lstm import (
    AWDLSTM,
    EmbeddingDropout,
    LockedDropout,
    WeightDropLSTM,
    awd_lstm_loss,
)
from clipscope.models.gpt import GPT, GPTLM
from clipscope.models.resnet import BasicBlock, ResNetCIFAR, resnet18_cifar
from clipscope.models.small import MLP, SmallCNN, SmallLSTMLM

__all__ = [
    "AWDLSTM",
    "GPT",
    "GPTLM",
    "MLP",
    "MODEL_NAMES",
    "BasicBlock",
    "EmbeddingDropout",
    "LockedDropout",
    "ResNetCIFAR",
    "SmallCNN",
    "SmallLSTMLM",
    "WeightDropLSTM",
    "awd_lstm_loss",
    "build_model",
    "resnet18_cifar",
]


def _awd_lstm(vocab: int | None = None, **kwargs: Any) -> AWDLSTM:
    # the runner builds language models with ``vocab=``, like SmallLSTMLM
    if vocab is not None:
        if "ntoken" in kwargs:
            raise ValueError("give the vocabulary size as vocab= or ntoken=, not both")
        kwargs["ntoken"] = vocab
    return AWDLSTM(**kwargs)


# what _awd_lstm takes: vocab, then AWDLSTM's own keywords (for build_model's check)
_awd_lstm.__signature__ = inspect.Signature(
    [inspect.Parameter("vocab", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for k, p in inspect.signature(AWDLSTM.__init__).parameters.items()
        if k != "self"
    ]
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18-cifar": resnet18_cifar,
    "awd-lstm": _awd_lstm,
    "small-cnn": SmallCNN,
    "small-lstm-lm": SmallLSTMLM,
    "gpt": GPTLM,
    "mlp": MLP,
}
MODEL_NAMES = tuple(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the model registered as ``name`` with ``kwargs``.

    Names: ``"resnet18-cifar"``, ``"awd-lstm"``, ``"small-cnn"``,
    ``"small-lstm-lm"`` and ``"gpt"`` (:class:`~clipscope.models.gpt.GPTLM`;
    both need ``vocab=``), ``"mlp"``; ``"awd-lstm"`` takes
    ``vocab=`` as another name for ``AWDLSTM(ntoken=...)``. Unknown names raise
    ``ValueError`` listing the valid ones; keyword arguments the constructor does
    not take raise ``ValueError`` naming them and the ones it takes (checked
    against its signature before anything is built).

    >>> build_model("mlp", bogus=3)
    Traceback (most recent call last):
    ...
    ValueError: model 'mlp' does not take bogus=3; it takes: in_features, hidden, out_features
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    factory = _REGISTRY[name]
    params = _parameters(factory)
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            given = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
            raise ValueError(f"model {name!r} does not take {given}; it takes: {', '.join(params)}")
    return factory(**kwargs)


def _parameters(factory: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    """Return the parameters of a model factory (a class: its ``__init__`` without ``self``)."""
    signature = inspect.signature(factory)  # a class: its __init__ without self
    return dict(signature.parameters)
