r"""The Monitor in a Lightning ``Trainer``: :class:`MonitorCallback` (``clipscope[lightning]``).

Lightning's order of hooks in an optimizer step, and what the callback does in each:

* ``on_train_batch_start``: ``monitor.step(trainer.global_step)`` -- the
  parameters are x_s after s optimizer steps; a probe when ``s % every == 0``.
  Under gradient accumulation the hook runs for every batch of a step with
  the same ``global_step``; the repeats do nothing;
* ``on_before_optimizer_step``: ``monitor.gradient()`` -- the gradient is
  complete (accumulated, all-reduced, unscaled under mixed precision) and not
  yet clipped: Lightning clips (``gradient_clip_val``) right after this hook,
  with ``torch.nn.utils.clip_grad_norm_`` (``g·min(1, η/(‖g‖ + 1e-6))``, not
  the paper's ``min(1, η/‖g‖)``); the Monitor records the norm before it,
  ``‖g‖ > η`` (the paper's C) and the cosine with the last probe's ∇f;
* ``on_train_start``: the trainer's (first) optimizer is handed to the Monitor
  (:meth:`~clipscope.loop.monitor.Monitor.use_optimizer`): with an Adam or AdamW
  every probe reads its preconditioner P and records ρ_P at the Monitor's η
  beside ρ, and every step ``step_cos_p``. A norm clip at ``gradient_clip_val``
  other than the Monitor's η is refused (:class:`~clipscope.errors.ConfigError`):
  ρ and ρ_P are reported at the threshold the trainer clips at;
* ``on_train_end``: ``monitor.close()``; ``on_exception``: the run directory's
  summary says ``failed`` / ``interrupted``;
* ``state_dict`` / ``load_state_dict``: the Monitor's state travels in
  Lightning's checkpoints (``trainer.fit(..., ckpt_path=...)`` resumes it).

**Descent-safe clipping** (``Monitor(..., eta="descent-safe")``, issue 23): the
Monitor sets η at every probe and the callback sets the trainer's threshold to
it, ``trainer.gradient_clip_val = monitor.eta``, in ``on_train_batch_start``
right after ``monitor.step`` (Lightning reads ``trainer.gradient_clip_val`` at
every optimizer step; η = ∞ is written 0.0, Lightning's "no clipping"). A
``gradient_clip_val`` given to the ``Trainer`` is replaced (a log line says
so); ``gradient_clip_algorithm = "value"`` is refused (the rule sets a norm
threshold). Every change of η is a line of the Monitor's log and its ``eta``
column.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from clipscope.errors import ConfigError
from clipscope.loop.integrations import check_in_train_mode
from clipscope.loop.monitor import Monitor

__all__ = ["MonitorCallback"]


def _lr(trainer: Trainer) -> float:
    optimizers = getattr(trainer, "optimizers", None) or []
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan


class MonitorCallback(Callback):
    """Drive ``monitor`` from a Lightning ``Trainer`` (see the module docstring).

    Parameters
    ----------
    monitor : Monitor
        Built on the ``LightningModule`` the trainer fits (``Monitor(module, loss,
        components, eta=..., every=...)``); its η should be the trainer's
        ``gradient_clip_val``.
    """

    def __init__(self, monitor: Monitor) -> None:
        if not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a clipscope.Monitor, got {type(monitor)!r}")
        self.monitor = monitor

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check ``gradient_clip_val`` and the model in train mode; hand over the optimizer.

        The Monitor's checks run again with the module in train mode (each module's
        mode restored after): a refusal, e.g. of attention dropout applied
        functionally, comes before any step
        (:func:`~clipscope.loop.integrations.check_in_train_mode`).
        """
        clip_at = trainer.gradient_clip_val or 0.0
        algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        if self.monitor.sets_eta:  # descent-safe: the Monitor sets the trainer's threshold
            if str(getattr(algorithm, "value", algorithm)) != "norm":
                raise ConfigError(
                    "the Monitor's eta = 'descent-safe' sets a norm threshold, but the trainer "
                    f"clips with gradient_clip_algorithm={algorithm!r}: use 'norm' (the default)"
                )
            if clip_at > 0:
                self.monitor.log(
                    f"descent-safe: the trainer's gradient_clip_val={clip_at} is replaced by the "
                    "Monitor's η at every probe"
                )
        elif (
            clip_at > 0
            and algorithm == "norm"
            and not math.isclose(float(clip_at), self.monitor.eta, rel_tol=1e-12)
        ):
            raise ConfigError(
                f"the trainer clips at gradient_clip_val={clip_at} but the Monitor's eta is "
                f"{self.monitor.eta}: give both the same threshold (or no gradient_clip_val to "
                "let the Monitor only observe)"
            )
        # Lightning trains the module in train mode: the Monitor's checks again, in that
        # mode, before any step (built on an eval-mode module, they may have passed)
        check_in_train_mode(
            self.monitor, "MonitorCallback.on_train_start", "Lightning",
            "build the Monitor with dropout='fixed' (one fixed mask per component, the same at "
            "every evaluation), or set the dropout applied functionally to 0; module.eval() "
            "before the Monitor does not help, Lightning undoes it",
        )  # fmt: skip
        optimizers = getattr(trainer, "optimizers", None) or []
        if optimizers:
            self.monitor.use_optimizer(optimizers[0])

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """``monitor.step(trainer.global_step)``; descent-safe: ``gradient_clip_val`` = η."""
        self.monitor.step(trainer.global_step, lr=_lr(trainer))
        if self.monitor.sets_eta:
            eta = self.monitor.eta
            trainer.gradient_clip_val = eta if math.isfinite(eta) else 0.0

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        """``monitor.gradient()``: before Lightning clips."""
        self.monitor.gradient()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``monitor.close()``."""
        self.monitor.close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Finish the run directory with the failure in ``summary.json``."""
        self.monitor.__exit__(type(exception), exception, None)

    def state_dict(self) -> dict[str, Any]:
        """Return the Monitor's state (:meth:`Monitor.state_dict`)."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the Monitor (:meth:`Monitor.load_state_dict`)."""
        self.monitor.load_state_dict(state_dict)
