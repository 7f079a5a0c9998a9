"""The conventions that change a component gradient, as recorded in a run's ``env.json``."""

from __future__ import annotations

from typing import Any

from torch import nn

from clipscope.engine.guard import batch_coupled_modules, dropout_modules

__all__ = ["gradient_conventions"]


def gradient_conventions(model: nn.Module, components: Any, dropout: str) -> dict[str, Any]:
    """Every convention that changes a component gradient, in plain words.

    ``data`` (the loader's ``describe()``, from ``components.data_description``),
    ``augmentation``, ``batchnorm_in_probes``, ``dropout_in_probes`` (the probe's
    ``dropout`` policy), ``hidden_state`` and ``last_batch`` (``keep`` / ``drop``).
    """
    coupled = batch_coupled_modules(model)
    modules = dropout_modules(model)
    return {
        "data": getattr(components, "data_description", None),
        "augmentation": "none (a component is the same function at every visit)",
        "batchnorm_in_probes": (
            f"train mode, each component's own batch statistics ({len(coupled)} layers); "
            "running statistics restored after every probe"
            if coupled
            else "no batch-coupled layers"
        ),
        "dropout_in_probes": (
            f"{dropout}: "
            + ("masks fixed per component" if dropout == "fixed" else "dropout modules off")
            + f" ({len(modules)} modules)"
            if modules
            else "no dropout modules"
        ),
        "hidden_state": (
            "carried from window i-1 into window i, detached; recomputed at the probe point"
            if getattr(components, "sequential", False)
            else "not applicable"
        ),
        "last_batch": "drop" if getattr(components, "drop_last", False) else "keep",
    }
