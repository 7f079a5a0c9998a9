"""The gradient engine (DESIGN §4): per-component norms, dots with ∇f, clipped sums.

Utilities shared with the runner and the smoothness code:

* :func:`model_guard` -- restore parameters, buffers, ``.grad``, modes and RNG;
* :func:`component_losses` -- iterate ``(i, f_i)`` with the dropout policy and
  the sequential state chain;
* :func:`dropout_modules`, :func:`batch_coupled_modules`, :func:`trainable_params`.

The probe itself: :func:`probe` -> :class:`ProbeResult` (or :class:`MultiProbeResult`
for several batch sizes; with ``preconditioner=`` an Adam/AdamW whose P gives
``result.preconditioned``, a :class:`PreconditionedResult`:
:mod:`clipscope.engine.preconditioner`), and its brute-force twin :func:`reference_probe`
(:mod:`clipscope.engine.probe`: the entry and the choice of route;
:mod:`~clipscope.engine.dense` and :mod:`~clipscope.engine.per_sample_route` the
routes; :mod:`~clipscope.engine.per_sample` the per-sample layer rules and their
registry).
Hessian-vector products and ∇f in one pass: :mod:`clipscope.engine.hvp`
(:func:`hvp`, :func:`full_gradient`).

The engine returns ``n_i``, ``d_i``, ``f_i``, ``‖∇f‖`` and sums; what they mean
is :mod:`clipscope.math.stats`'s business (``result.stats``).
The engine's own checks (:mod:`clipscope.engine.verify`) warn with
:class:`PerSampleFallbackWarning` / :class:`ConsistencyWarning` and raise
:class:`VerificationError` under ``strict=True``.
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
from clipscope.engine.hvp import full_gradient, hvp
from clipscope.engine.losses import component_losses, param_names, trainable_params
from clipscope.engine.probe import ROUTES, probe, reference_probe
from clipscope.engine.result import MultiProbeResult, PreconditionedResult, ProbeResult
from clipscope.engine.verify import (
    ConsistencyWarning,
    PerSampleFallbackWarning,
    VerificationError,
)

__all__ = [
    "DROPOUT_POLICIES",
    "ROUTES",
    "ConsistencyWarning",
    "MultiProbeResult",
    "PerSampleFallbackWarning",
    "PreconditionedResult",
    "ProbeResult",
    "VerificationError",
    "batch_coupled_modules",
    "component_losses",
    "component_seed",
    "dropout_modules",
    "dropout_policy",
    "full_gradient",
    "hvp",
    "model_guard",
    "param_names",
    "probe",
    "reference_probe",
    "rng_for_component",
    "trainable_params",
]
