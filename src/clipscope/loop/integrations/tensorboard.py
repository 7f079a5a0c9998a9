r"""TensorBoard scalars of the Monitor (or ``fit``): :class:`TensorBoardScalars`.

Install with ``pip install clipscope[tensorboard]``.

A unit (:class:`clipscope.loop.Unit`): pass it in ``units=`` of
:class:`~clipscope.loop.Monitor` or :func:`clipscope.fit`. It writes through
``torch.utils.tensorboard.SummaryWriter`` (which needs the ``tensorboard``
package), in the main process only (rank 0 of an initialised process group):

* at every probed point, each numeric column of the row (``loss``,
  ``grad_norm``, ``c1``, ``c2``, ``rho``, ``rho@η``, ``clipped_fraction``, ...;
  not ``epoch``, ``step``, ``wall_time``) as ``{prefix}/{column}`` at
  ``global_step`` = the row's ``step``;
* at the end of every interval, the interval's columns (``train_loss``,
  ``train_norm``, ``train_clipped_share``, ``train_cos``, ``train_min_cos``,
  ``igc_drift``) at the same ``global_step``, and, from the per-step arrays of
  :class:`~clipscope.loop.measures.StepGradient`, ``{prefix}/step/grad_norm``,
  ``{prefix}/step/clipped`` and ``{prefix}/step/cos`` (with an Adam/AdamW also
  ``{prefix}/step/cos_p`` and the rows' ``rho_p``, ...) at each update's number.

NaN values are left out (a gap in the curve). The writer is flushed at every
interval's end and closed at the end when the unit created it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from clipscope.loop.units import Finish, IntervalEnd, Point, Unit

__all__ = ["TensorBoardScalars"]

_SKIP = {"epoch", "step", "wall_time"}
_STEP_ARRAYS = {
    "step_grad_norm": "grad_norm",
    "step_clipped": "clipped",
    "step_cos": "cos",
    "step_cos_p": "cos_p",  # with an Adam/AdamW: the cosine with u = P⁻¹∇f_k
}


def _main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TensorBoardScalars(Unit):
    """Write the Monitor's rows and per-step statistics as TensorBoard scalars.

    Parameters
    ----------
    log_dir : str or Path, optional
        A new ``SummaryWriter`` writes there (created on the first write).
    writer : SummaryWriter, optional
        Or an existing writer (yours; not closed by the unit).
    prefix : str
        Tag prefix.
    """

    name = "tensorboard"

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: SummaryWriter | None = None,
        prefix: str = "clipscope",
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("give log_dir or writer (exactly one)")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.log_dir, self.prefix = log_dir, prefix
        self._writer, self._owned = writer, writer is None

    @property
    def writer(self) -> SummaryWriter | None:
        """The writer (None outside the main process)."""
        if self._writer is None and _main_process():
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def _scalars(self, values: dict[str, Any], step: int, keys: Any = None) -> None:
        writer = self.writer
        if writer is None:
            return
        for key, value in values.items():
            if key in _SKIP or key.startswith("_") or (keys is not None and key not in keys):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"{self.prefix}/{key}", float(value), global_step=step)

    def at_point(self, point: Point) -> None:
        """Every numeric column of a probed point's row."""
        if point.row is not None:
            self._scalars(point.row, int(point.row["step"]))

    def at_interval_end(self, end: IntervalEnd) -> None:
        """Write the interval's columns and the per-step statistics; flush."""
        writer = self.writer
        if writer is None:
            return
        if end.row is not None:
            keys = [k for k in end.row if k.startswith("train_") or k == "igc_drift"]
            self._scalars(end.row, int(end.row["step"]), keys)
        numbers = end.arrays.get("step")
        if numbers is not None:
            for name, tag in _STEP_ARRAYS.items():
                for number, value in zip(numbers, end.arrays.get(name, ()), strict=False):
                    if math.isfinite(value):
                        writer.add_scalar(
                            f"{self.prefix}/step/{tag}", float(value), global_step=int(number)
                        )
        writer.flush()

    def finish(self, end: Finish) -> None:
        """Flush; close the writer the unit created."""
        if self._writer is not None:
            self._writer.flush()
            if self._owned:
                self._writer.close()
