"""A batch of independent samples: input checks, per-sample losses, kernel settings.

Inside a batch of B samples (``model(x)`` with the samples along dim 0 of
``x`` and of the output, ``loss_fn(output, target)`` the batch's **mean**
loss), sample j's component is ``ℓ_j = loss_fn(model(x)[j:j+1], y[j:j+1])``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from clipscope.engine.guard import (
    batch_coupled_modules,
    dropout_modules,
    dropout_policy,
    model_guard,
    rng_for_component,
)

_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

__all__ = [
    "check_independent_samples",
    "check_inputs",
    "draws_masks",
    "kernels_for_derivatives",
    "per_sample_from_output",
    "per_sample_losses",
    "randomness_active",
]


def check_inputs(model: Any, loss_fn: Any, x: Any) -> int:
    """Validate the arguments of every per-sample function; return the batch size B.

    Raises ``TypeError`` for a non-module model or a non-callable loss,
    ``ValueError`` for an input without a sample axis, an empty batch, or
    modules that couple the samples (train-mode BatchNorm).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn)!r}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(
            f"x must be a tensor with the samples along dim 0, got {getattr(x, 'shape', x)!r}"
        )
    if x.shape[0] == 0:
        raise ValueError("x holds no samples (batch size 0)")
    coupled = batch_coupled_modules(model)
    if coupled:
        raise ValueError(
            f"per-sample components need eval-mode BatchNorm or GroupNorm: modules {coupled} "
            "normalize with batch statistics (train mode or no running stats), which couples "
            "the samples of a batch"
        )
    return int(x.shape[0])


def check_independent_samples(
    model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: Any, tol: float, seed: int = 0
) -> dict[str, Any]:
    """Refuse a model that couples the samples of a batch: the per-sample route's premise.

    The per-sample route takes sample j's loss ``ℓ_j`` from the batch forward
    (its output row j) and, where a rule fails or for its spot check, sample j's
    gradient from a forward of sample j alone. Both are sample j's component
    only when row j of the batch output does not depend on the other samples.
    Train-mode BatchNorm modules are refused by name (:func:`check_inputs`); this
    check catches the rest: batch statistics computed in the model
    (``F.batch_norm(..., training=True)``, centring ``x - x.mean(0)``), an
    in-batch similarity or contrastive head (an InfoNCE logit matrix ``B × B``).
    The ``B`` samples of ``x`` (the first rows of the first chunk) are evaluated
    once as a batch and once each alone, without gradients, dropout modules off,
    under :func:`~clipscope.engine.guard.model_guard`; ``|ℓ_j^batch − ℓ_j^alone|``
    must be at most ``tol`` times the largest ``|ℓ_j|``. Costs one forward of
    ``B`` samples and ``B`` of one.

    Randomness outside the dropout modules (attention dropout applied
    functionally by a module in train mode, under ``dropout="fixed"``) makes the
    two evaluations differ by itself: when a second batch forward under another
    seed differs from the first, the comparison is made again with every module
    in eval mode (where Hugging Face attention draws no mask), and a coupling it
    finds there is refused as well. Its record then says ``checked: "eval
    mode"``; a coupling that exists only in train mode outside BatchNorm cannot
    be seen. When even eval mode draws random numbers, nothing can be compared:
    ``checked`` is False and a :class:`UserWarning` says so.

    Returns ``{"samples": B, "max_error": float, "checked": True | "eval mode" | False}``.

    Raises
    ------
    ValueError
        A sample's loss alone differs from its loss in the batch, or a sample
        alone cannot be evaluated (torch's error is quoted); the message says
        what couples samples and which routes serve such a model.
    """
    batch = int(x.shape[0])
    record: dict[str, Any] = {"samples": batch, "max_error": 0.0, "checked": True}
    if batch < 2:
        return record
    with model_guard(model), torch.no_grad(), dropout_policy(model, "off"):
        found = _coupling(model, loss_fn, x, y, tol, seed)
        record["max_error"] = found["error"]
        if found["error"] <= tol:
            return record
        if found["random"]:  # functional dropout in train mode: look again in eval mode
            model.eval()  # (model_guard restores every module's mode)
            found = _coupling(model, loss_fn, x, y, tol, seed)
            record.update(max_error=found["error"], checked="eval mode")
            if found["error"] <= tol:
                return record
            if found["random"]:
                record["checked"] = False
                warnings.warn(
                    "per-sample components: whether the samples interact in the forward could "
                    "not be checked: the model draws random numbers outside its dropout modules "
                    "even in eval mode, so a batch forward and each sample alone differ by "
                    "themselves (record: result.info['independent_samples'])",
                    UserWarning,
                    stacklevel=3,
                )
                return record
    where = " (compared with every module in eval mode)" if record["checked"] == "eval mode" else ""
    worst, error = found["worst"], found["error"]
    raise ValueError(
        f"per-sample components need samples that do not interact in the forward, but sample "
        f"{worst}'s loss is {float(found['together'][worst]):.9g} in a batch of {batch} and "
        f"{float(found['alone'][worst]):.9g} alone (relative difference {error:.3g} > {tol:g})"
        f"{where}: the model couples the samples of a batch (statistics over the batch, such as "
        "F.batch_norm in training mode or centring x - x.mean(0); an in-batch similarity or "
        "contrastive head). Its per-sample gradients would mix batch-1 gradients with "
        "batch-forward losses. Use mini-batch components (route='two-pass' or 'keep'), where "
        "each component is a batch with its own statistics"
    )


def _coupling(model, loss_fn, x, y, tol: float, seed: int) -> dict[str, Any]:
    """One comparison of the batch's losses with each sample's alone (no gradients).

    Returns ``together``, ``alone`` (float64 ``(B,)``), the largest relative
    difference ``error`` at sample ``worst``, and ``random``: whether a second
    batch forward under another seed differs from the first by more than
    ``tol`` (only evaluated when ``error > tol``).
    """
    batch = int(x.shape[0])
    with rng_for_component("fixed", seed, 0):
        together = per_sample_losses(model, loss_fn, x, y).double()
    alone = []
    for j in range(batch):
        try:
            with rng_for_component("fixed", seed, 0):
                alone.append(per_sample_losses(model, loss_fn, x[j : j + 1], y[j : j + 1]))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(
                f"per-sample components need samples that do not interact in the forward, "
                f"but sample {j} alone cannot be evaluated ({exc}): the model computes "
                "statistics over the batch (train-mode batch normalization, e.g. through "
                "F.batch_norm). Use mini-batch components (route='two-pass' or 'keep'), or "
                "make the model normalize per sample (eval-mode BatchNorm, GroupNorm, "
                "LayerNorm)"
            ) from exc
    alone_t = torch.cat(alone).double()
    scale = float(torch.maximum(together.abs(), alone_t.abs()).max())
    diff = (together - alone_t).abs()
    worst = int(diff.argmax())
    error = float(diff[worst]) / scale if scale > 0 else float(diff[worst] > 0)
    random = False
    if error > tol:
        with rng_for_component("fixed", seed + 1, 0):
            again = per_sample_losses(model, loss_fn, x, y).double()
        random = float((again - together).abs().max()) > tol * max(scale, 1e-300)
    return {"together": together, "alone": alone_t, "error": error, "worst": worst,
            "random": random}  # fmt: skip


def per_sample_from_output(
    loss_fn: Callable, out: Any, y: Any, batch: int | None = None
) -> torch.Tensor:
    """``ℓ_j = loss_fn(out[j:j+1], y[j:j+1])`` for every j, shape ``(B,)``, differentiable.

    ``torch.func.vmap`` over the samples; a loss that ``vmap`` cannot batch
    (data-dependent control flow) is evaluated sample by sample instead.
    Raises ``ValueError`` when the output or the target does not have the
    samples along dim 0, saying what to change.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"model(x) returned {type(out).__name__}; per-sample components need a tensor "
            "with the samples along dim 0 (return the logits, or wrap the model)"
        )
    if batch is not None and (out.dim() == 0 or out.shape[0] != batch):
        raise ValueError(
            f"model(x) returned an output of shape {tuple(out.shape)} for a batch of {batch} "
            f"samples: per-sample components need the samples along dim 0 of the output. "
            f"Return (B, ...) from forward (for a language model the logits as (B, T, V), "
            f"not flattened to (B·T, V)) and flatten inside loss_fn, e.g. "
            f"F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)); or use "
            f"mini-batch components (route='two-pass' or 'keep')"
        )
    if batch is not None and isinstance(y, torch.Tensor) and (y.dim() == 0 or y.shape[0] != batch):
        raise ValueError(
            f"the targets have shape {tuple(y.shape)} for a batch of {batch} samples: "
            "per-sample components need the samples along dim 0 of the targets too"
        )

    def one(o: torch.Tensor, t: Any) -> torch.Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    try:
        losses = vmap(one)(out, y)
    except (RuntimeError, ValueError, NotImplementedError):
        # a loss vmap cannot batch (e.g. .item() or data-dependent branches): one by one
        losses = torch.stack(
            [loss_fn(out[j : j + 1], y[j : j + 1]).reshape(()) for j in range(out.shape[0])]
        )
    if losses.dim() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (the batch's mean loss), got shape "
            f"{tuple(losses.shape[1:])} per sample"
        )
    return losses


def per_sample_losses(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], x: torch.Tensor, y: Any
) -> torch.Tensor:
    """Per-sample losses ``ℓ_j = loss_fn(model(x)[j:j+1], y[j:j+1])``, shape ``(B,)``.

    The model runs once on the whole batch; ``loss_fn`` (the mean loss of a
    batch) is applied to each sample's output by ``torch.func.vmap``. Valid
    only when the samples do not interact (no train-mode BatchNorm: that
    raises ``ValueError``). Differentiable.

    >>> import torch.nn.functional as F
    >>> m = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> L = per_sample_losses(m, F.cross_entropy, x, y)
    >>> L.shape, bool(torch.allclose(L.mean(), F.cross_entropy(m(x), y)))
    (torch.Size([4]), True)
    """
    batch = check_inputs(model, loss_fn, x)
    return per_sample_from_output(loss_fn, model(x), y, batch)


def randomness_active(model: nn.Module) -> bool:
    """Whether a forward draws random numbers now (a dropout module in training mode).

    Under the probe's ``"off"`` policy the dropout modules are in eval mode
    and this is False; under ``"fixed"`` with a model in training mode it is
    True, and the per-sample components are defined with the masks of the
    chunk's batch forward.
    """
    return any(m.training for m in dropout_modules(model))


@contextlib.contextmanager
def kernels_for_derivatives(model: nn.Module, onednn: bool = False) -> Iterator[None]:
    """Kernels with forward-mode AD rules for the block, restored afterwards.

    CPU ``nn.LSTM``/``nn.GRU`` under oneDNN and the fused attention kernels
    (``_scaled_dot_product_flash_attention_for_cpu``, the
    ``nn.TransformerEncoderLayer`` fast path) have no forward-AD rule: oneDNN
    is turned off, scaled-dot-product attention runs its math backend and the
    ``nn.MultiheadAttention`` fast path is disabled. Same values, other kernels.

    ``onednn=True``: the block itself runs no forward-mode AD (the per-sample
    route's attempts; a JVP inside one enters this context again with
    ``onednn=False``). oneDNN is left as it is, and so is
    ``F.scaled_dot_product_attention``'s kernel (the model's own, faster and
    lighter than the math backend: it keeps no attention matrix for the
    backward) **unless the model may draw random numbers** (:func:`draws_masks`):
    a dropout mask drawn inside the attention depends on the kernel, and every
    forward of an attempt (pass 1, pass 2, a JVP, the spot checks) must draw the
    same masks, so such an attempt runs the math backend throughout. The
    ``nn.MultiheadAttention`` fast path stays off either way: it bypasses the
    hooks of the modules inside.
    """
    with contextlib.ExitStack() as stack:
        if not onednn and any(isinstance(m, nn.RNNBase) for m in model.modules()):
            with warnings.catch_warnings():
                # torch 2.x warns about TF32 on Intel GPUs whenever the flags are set
                warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
                ctx = torch.backends.mkldnn.flags(enabled=False)
                ctx.__enter__()

            def _restore() -> None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
                    ctx.__exit__(None, None, None)

            stack.callback(_restore)
        # models may call F.scaled_dot_product_attention themselves (nanoGPT): always,
        # where forward-mode AD runs or masks may be drawn
        if not onednn or draws_masks(model):
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if any(isinstance(m, _ATTENTION) for m in model.modules()):
            previous = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            stack.callback(torch.backends.mha.set_fastpath_enabled, previous)
        yield


def draws_masks(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may draw random numbers: any module in training mode.

    Wider than :func:`randomness_active` (dropout modules only): a Hugging Face
    attention module in training mode passes its dropout probability to
    ``F.scaled_dot_product_attention`` itself, with no dropout module to see.
    """
    return any(m.training for m in model.modules())
