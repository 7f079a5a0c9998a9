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
