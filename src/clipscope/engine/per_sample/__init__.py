"""Per-sample components (batch size 1): ghost norms, forward-mode dots, checked, exact.

Route 4 of the engine (DESIGN §4). Inside a batch of B independent samples
(``model(x)`` with the samples along dim 0 of the input and the output,
``loss_fn(output, target)`` the batch's **mean** loss), sample j's component
is ``ℓ_j(θ) = loss_fn(model(x_j), y_j)`` and its gradient ``g_j = ∇ℓ_j``.
Two quantities per sample, without holding the B gradients:

* ``‖g_j‖²`` -- :func:`ghost_pass` (pass 1): one hooked forward and one
  backward of ``Σ_j ℓ_j``; each layer family turns its recorded inputs and
  output gradients into per-sample norms, the same backward gives the actual
  batch gradient ``∇Σ_j ℓ_j``, and every family's answer is checked against
  it (the structural check of :mod:`clipscope.engine.verify`).
* ``⟨g_j, v⟩`` -- :func:`per_sample_dots` (pass 2): one forward-mode JVP of
  the per-sample loss vector along v.

One file per layer family holds its claim, record step and rules
(:class:`~clipscope.engine.per_sample.family.LayerFamily`) and registers them
in the open rule registry (:mod:`.registry`, :func:`register_module_rule`);
importing this package imports every built-in rule file:

========================  =====================================================
:mod:`.linear`            ``nn.Linear`` on any leading dims (Goodfellow 2015; Li et al. 2021)
:mod:`.conv`              Conv1d/2d/3d, ConvTranspose1d/2d/3d, every padding mode
:mod:`.embedding`         ``nn.Embedding`` (``padding_idx``, ``max_norm``, ``sparse``)
:mod:`.norm`              LayerNorm, RMSNorm, GroupNorm, InstanceNorm, eval BatchNorm
:mod:`.rnn`               ``nn.LSTM`` by its gate gradients; any other recurrent
                          module by a module-local per-sample loop
:mod:`.attention`         ``nn.MultiheadAttention`` (its projections seen inside
                          ``F.multi_head_attention_forward``, ``out_proj`` included)
:mod:`.hf_conv1d`         Hugging Face's ``Conv1D`` (GPT-2), without importing transformers
========================  =====================================================

A user's own rule is registered the same way, from the user's code
(``docs/engine.md``, "How to add a layer rule"). Everything else -- a
parameter without a rule (a bare ``nn.Parameter``, ``PReLU``), a tied
weight, a rule whose check failed -- gets its exact per-sample gradients
from :mod:`.fallback`, and a
:class:`~clipscope.engine.verify.PerSampleFallbackWarning` says which and why.
:class:`~clipscope.engine.per_sample.plan.Plan` records every such decision.

All squares, sums and dots are accumulated in float64; float16/bfloat16
factors are upcast before any product. Train-mode BatchNorm couples the
samples and raises ``ValueError``; a model output whose first dimension is not
the sample axis raises ``ValueError`` saying what to change.
:func:`per_sample_grads_reference` is the float64 brute force the tests
compare everything with.
"""

from clipscope.engine.per_sample import (  # noqa: F401 (the rule files register themselves)
    attention,
    conv,
    embedding,
    hf_conv1d,
    linear,
    norm,
    rnn,
    uses,
)
from clipscope.engine.per_sample.batch import per_sample_losses
from clipscope.engine.per_sample.dots import per_sample_dots
from clipscope.engine.per_sample.family import LayerFamily
from clipscope.engine.per_sample.ghost import GhostPass, ghost_pass, per_sample_sq_norms
from clipscope.engine.per_sample.plan import Plan
from clipscope.engine.per_sample.reference import per_sample_grads_reference
from clipscope.engine.per_sample.registry import (
    FAMILIES,
    RuleRegistry,
    register_module_rule,
    registry,
)

__all__ = [
    "FAMILIES",
    "GhostPass",
    "LayerFamily",
    "Plan",
    "RuleRegistry",
    "ghost_pass",
    "per_sample_dots",
    "per_sample_grads_reference",
    "per_sample_losses",
    "per_sample_sq_norms",
    "register_module_rule",
    "registry",
]
