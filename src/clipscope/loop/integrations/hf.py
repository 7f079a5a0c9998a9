r"""The Monitor in a Hugging Face ``Trainer``: :class:`MonitorCallback` (``clipscope[hf]``).

The Trainer's order in an optimizer step, and what the callback does:

* ``on_step_begin``: ``monitor.step(state.global_step)`` -- a probe when due;
* the Trainer runs forward/backward (every accumulated batch), then, with
  ``max_grad_norm > 0``, clips with ``accelerator.clip_grad_norm_`` (torch's
  ``clip_grad_norm_``: ``g·min(1, η/(‖g‖ + 1e-6))``, after unscaling fp16
  gradients) **before any callback sees the gradient**;
* ``on_pre_optimizer_step``: the callback records the step from the gradient
  the optimizer is about to apply. The cosine with ∇f_k is exact (a norm clip
  is a positive rescaling). The norm before clipping is exact where the
  Trainer did not clip (post-clip norm below ``max_grad_norm − 1e-6``: the
  coefficient was 1); where it clipped, the norm is not recoverable from the
  clipped gradient and is recorded as NaN with ``step_clipped = 1`` (the
  Trainer's operator scaled it: ‖g‖ > η − 1e-6; the paper's C clips for
  ‖g‖ > η -- they differ only for ‖g‖ in (η − 1e-6, η]). fp16 without
  clipping: the gradient is still loss-scaled here, so the norm is NaN and
  ``step_clipped`` NaN;
* ``on_log``: where the Trainer logged ``grad_norm`` (its pre-clip norm, at
  every ``logging_steps``-th step), the step gets that exact value and
  ``step_clipped = grad_norm > η``. With ``logging_steps=1`` every step is exact;
* ``on_train_end``: ``monitor.close()``;
* ``on_train_begin``: the Trainer's optimizer is handed to the Monitor
  (:meth:`~clipscope.loop.monitor.Monitor.use_optimizer`). With an Adam or AdamW
  (the Trainer's default ``adamw_torch``, inside accelerate's wrapper) every
  probe reads its preconditioner P and records ρ_P at ``max_grad_norm`` (the
  Monitor's η) beside ρ, and every step ``step_cos_p``. A component of the
  probe's partition plays the role of the Trainer's step mini-batch, which the
  Trainer clips by its **global** norm: the paper's clipped component
  gradient, then ``−lr·P⁻¹`` of it (through Adam's momentum);
* ``on_save`` / ``on_train_begin``: the Monitor's state is saved as
  ``clipscope_monitor.pt`` in each checkpoint folder (by the main process)
  and loaded back when training resumes from that checkpoint.

The Monitor's η must equal the Trainer's ``max_grad_norm`` when the Trainer
clips (else the per-step ``clipped`` flags would describe two thresholds):
``on_train_begin`` refuses a mismatch.

**Descent-safe clipping** (``Monitor(..., eta="descent-safe")``, issue 23): the
Monitor sets η at every probe, and the callback sets the Trainer's threshold
to it: ``args.max_grad_norm = monitor.eta`` in ``on_step_begin``, right after
``monitor.step`` (the Trainer reads ``args.max_grad_norm`` at every step; η =
∞ is written 0, the Trainer's "no clipping"). The ``max_grad_norm`` given in
the ``TrainingArguments`` is replaced (a log line says so); every change of η
is a line of the Monitor's log and its ``eta`` column. The Trainer's clip is
torch's ``clip_grad_norm_`` (``+1e-6``), as above.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from clipscope.atomic import atomic_write_bytes
from clipscope.errors import ConfigError
from clipscope.loop.measures import gradient_products
from clipscope.loop.monitor import Monitor

__all__ = ["STATE_FILE", "MonitorCallback"]

#: The Monitor's state in each of the Trainer's checkpoint folders.
STATE_FILE = "clipscope_monitor.pt"

_SLACK = 1e-5  # relative: float32 rounding of the Trainer's norm against ours


def _lr(kwargs: dict[str, Any]) -> float:
    optimizer = kwargs.get("optimizer")
    if optimizer is None or not getattr(optimizer, "param_groups", None):
        return math.nan
    return float(optimizer.param_groups[0]["lr"])


class MonitorCallback(TrainerCallback):
    """Drive ``monitor`` from a Hugging Face ``Trainer`` (see the module docstring).

    Parameters
    ----------
    monitor : Monitor
        Built on the model the Trainer trains; its η equal to
        ``TrainingArguments.max_grad_norm`` when that is > 0.
    """

    def __init__(self, monitor: Monitor) -> None:
        if not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a clipscope.Monitor, got {type(monitor)!r}")
        self.monitor = monitor

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Check η against ``max_grad_norm``, take the optimizer, load the state on resume."""
        self.monitor.use_optimizer(kwargs.get("optimizer"))
        clip_at = args.max_grad_norm or 0.0
        if self.monitor.sets_eta:  # descent-safe: the Monitor sets the Trainer's threshold
            if clip_at > 0:
                self.monitor.log(
                    f"descent-safe: the Trainer's max_grad_norm={clip_at} is replaced by the "
                    "Monitor's η at every probe"
                )
        elif clip_at > 0 and not math.isclose(clip_at, self.monitor.eta, rel_tol=1e-12):
            raise ConfigError(
                f"the Trainer clips at max_grad_norm={clip_at} but the Monitor's eta is "
                f"{self.monitor.eta}: give both the same threshold (or max_grad_norm=0 to let "
                "the Monitor only observe)"
            )
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.isfile(path):
                self.monitor.load_state_dict(torch.load(path, weights_only=True))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """``monitor.step(state.global_step)``; descent-safe: ``max_grad_norm`` = η."""
        self.monitor.step(state.global_step, lr=_lr(kwargs))
        if self.monitor.sets_eta:
            eta = self.monitor.eta
            args.max_grad_norm = eta if math.isfinite(eta) else 0.0

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Record the update from the (possibly clipped) gradient the optimizer will apply."""
        monitor = self.monitor
        if monitor._open is None:  # before the first probe: nothing is recorded
            return
        clip_at = args.max_grad_norm or 0.0
        now = math.sqrt(gradient_products(monitor.params)[0])
        if clip_at > 0 and not now < (clip_at - 1e-6) * (1 - _SLACK):
            monitor.gradient(math.nan, clipped=True)  # the Trainer clipped: ‖g‖ unknown here
        elif args.fp16 and clip_at <= 0:
            monitor.gradient(math.nan)  # still loss-scaled: neither ‖g‖ nor ‖g‖ > η is known
        else:
            monitor.gradient(now)  # not clipped: the gradient is the step's own

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """Give the step just taken the Trainer's own pre-clip ``grad_norm``, where logged."""
        value = (logs or {}).get("grad_norm")
        if value is not None and math.isfinite(float(value)):
            self.monitor._amend_pending(state.global_step, float(value))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Save the Monitor's state into the checkpoint folder just written (main process)."""
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            buffer = io.BytesIO()
            torch.save(self.monitor.state_dict(), buffer)
            atomic_write_bytes(os.path.join(folder, STATE_FILE), buffer.getvalue())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """``monitor.close()``."""
        self.monitor.close()
