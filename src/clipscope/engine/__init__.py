"""The gradient engine (DESIGN §4): per-component norms, dots with ∇f, clipped sums.

Utilities shared with the runner and the smoothness code:

* :func:`model_guard` -- restore parameters, buffers, ``.grad``, modes and RNG;
* :func:`component_losses` -- iterate ``(i, f_i)`` with the dropout policy and
  the sequential state chain;
* :func:`dropout_modules`, :func:`batch_coupled_modules`, :func:`trainable_params`.
"""

from clipscope.engine.guard import (
    DROPOUT_POLICIES,
    batch_coupled_modules,
    component_seed,
    dropout_modules,
    dropout_policy,
    model_guard,
    rng_for_component,
)
from clipscope.engine.losses import component_losses, param_names, trainable_params

__all__ = [
    "DROPOUT_POLICIES",
    "batch_coupled_modules",
    "component_losses",
    "component_seed",
    "dropout_modules",
    "dropout_policy",
    "model_guard",
    "param_names",
    "rng_for_component",
    "trainable_params",
]
