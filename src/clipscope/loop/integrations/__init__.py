"""The Monitor inside other training frameworks, each an optional extra.

=====================================  ==============================  ==========================
module                                 what                            install
=====================================  ==============================  ==========================
:mod:`~.lightning`                     ``MonitorCallback``, a          ``clipscope[lightning]``
                                       ``lightning.pytorch.Callback``
:mod:`~.hf`                            ``MonitorCallback``, a          ``clipscope[hf]``
                                       ``transformers.TrainerCallback``
:mod:`~.tensorboard`                   ``TensorBoardScalars``, a unit  ``clipscope[tensorboard]``
                                       writing rows and per-step
                                       statistics as scalars
=====================================  ==============================  ==========================

Nothing here is imported by ``import clipscope`` or ``import clipscope.loop``;
each module imports its framework when it is imported itself. What each one
records, and which clipping operator each framework applies:
``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Any


def check_in_train_mode(monitor: Any, where: str, framework: str, fix: str = "") -> None:
    """:meth:`Monitor.check_model` with the model in train mode, each module's mode restored.

    A framework trains its model in train mode: every probe after the first sees
    it so, whatever mode it was in when the Monitor was built. Run at the
    framework's train start, before any step. A refusal keeps its exception type
    (``ValueError`` where it has none of its own) and says ``where`` it came
    from, why (``framework`` trains in train mode) and, for a plain
    ``ValueError`` (a loss that changed between two evaluations), ``fix``.
    """
    model = monitor.model
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        monitor.check_model()
    except ValueError as exc:
        # a loss that changes between evaluations is a plain ValueError (ConfigError: a
        # train-mode BatchNorm; NonFiniteError: a NaN loss -- dropout is not their cause)
        tail = f". With {framework}: {fix}" if fix and type(exc) is ValueError else ""
        text = (
            f"{where}: {framework} trains the model in train mode, so the Monitor's probes "
            f"after the first see it in train mode; the Monitor's checks, run again in train "
            f"mode before any step, refuse it: {exc}{tail}"
        )
        try:
            refusal = type(exc)(text)
        except Exception:  # an exception class that takes other arguments
            refusal = ValueError(text)
        raise refusal from exc
    finally:
        for module, training in modes:
            module.training = training
