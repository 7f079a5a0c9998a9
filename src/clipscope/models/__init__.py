"""Reference models (ResNet18-CIFAR, AWD-LSTM) and small models for the embedded defaults.

Classifiers map ``(N, ...)`` inputs to ``(N, classes)`` logits. Language
models use the sequential interface ``model(inp, state) -> (logits, new_state)``
with ``inp`` a ``(T, B)`` int64 tensor, ``logits`` of shape ``(T, B, V)`` and
``state=None`` meaning zeros.

>>> sorted(MODEL_NAMES)
['awd-lstm', 'mlp', 'resnet18-cifar', 'small-cnn', 'small-lstm-lm']
>>> type(build_model("mlp")).__name__
'MLP'
"""

from __future__ import annotations

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
from clipscope.models.resnet import BasicBlock, ResNetCIFAR, resnet18_cifar
from clipscope.models.small import MLP, SmallCNN, SmallLSTMLM

__all__ = [
    "AWDLSTM",
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


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18-cifar": resnet18_cifar,
    "awd-lstm": _awd_lstm,
    "small-cnn": SmallCNN,
    "small-lstm-lm": SmallLSTMLM,
    "mlp": MLP,
}
MODEL_NAMES = tuple(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the model registered as ``name`` with ``kwargs``.

    Names: ``"resnet18-cifar"``, ``"awd-lstm"``, ``"small-cnn"``,
    ``"small-lstm-lm"`` (needs ``vocab=``), ``"mlp"``; ``"awd-lstm"`` takes
    ``vocab=`` as another name for ``AWDLSTM(ntoken=...)``. Unknown names raise
    ``ValueError`` listing the valid ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name](**kwargs)
