"""The loop's typed state, what :func:`clipscope.fit` returns, and the checkpoint's layout.

:class:`LoopState` is where the loop stands (epoch, position in it, steps taken,
the epoch's order, the recurrent state) plus the records (``rows``). Each
measurement unit keeps its own state (:meth:`clipscope.loop.units.Unit.state_dict`);
a checkpoint holds both, next to the model, optimizer, schedule, order and RNG
(:data:`CHECKPOINT_KEYS`). :func:`upgrade_checkpoint` reads checkpoints written
before the units existed (one flat 20-key ``loop`` dict).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipscope.run.directory import CHECKPOINT_FORMAT

__all__ = ["CHECKPOINT_KEYS", "History", "LoopState", "upgrade_checkpoint"]

#: What every checkpoint payload holds (``format`` is ``run.directory.CHECKPOINT_FORMAT``).
CHECKPOINT_KEYS = (
    "format",
    "setting",
    "model",
    "optimizer",
    "scheduler",
    "order",
    "torch_rng",
    "cuda_rng",
    "loop",
    "units",
)


@dataclass
class LoopState:
    """Where the loop stands; everything here goes into checkpoints.

    Attributes
    ----------
    epoch : int
        k: the loop is training from x_k to x_{k+1} (or stands at x_k).
    pos : int
        Steps of epoch k already taken.
    step : int
        Steps taken in all.
    probed : bool
        Whether the point x_k has been visited (probed, or needed no probe).
    indices : list of int
        The component order of epoch k (drawn at its first step).
    rows : list of dict
        The records: one row per probe, plain floats (``epochs.csv``).
    rnn_state : object
        The recurrent state carried between IGC steps (sequential components).
    """

    epoch: int = 0
    pos: int = 0
    step: int = 0
    probed: bool = False
    indices: list[int] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    rnn_state: Any = None

    def row(self, epoch: int) -> dict[str, float] | None:
        """Return the record of epoch ``epoch`` (its point x_k), or None when not probed."""
        return next((r for r in reversed(self.rows) if r.get("epoch") == epoch), None)

    def next_epoch(self) -> None:
        """Move to the start of the next epoch (x_{k+1}, not yet visited)."""
        self.epoch += 1
        self.pos, self.probed, self.indices, self.rnn_state = 0, False, [], None

    def state_dict(self) -> dict[str, Any]:
        """Return the fields by name (shared: a checkpoint's ``torch.save`` copies them)."""
        return {name: getattr(self, name) for name in _STATE_FIELDS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (keys of other layouts are ignored)."""
        for name in _STATE_FIELDS:
            setattr(self, name, state[name])


_STATE_FIELDS = ("epoch", "pos", "step", "probed", "indices", "rows", "rnn_state")


# legacy flat loop keys -> (unit name, unit state key)
_LEGACY_UNITS = {
    "ckpt_seq": ("checkpointing", "seq"),
    "drift_sum": ("igc_drift", "sum"),
    "full_grad": ("igc_drift", "full_grad"),
    "descent": ("igc_drift", "descent"),
    "step_norms_sum": ("step_statistics", "norms"),
    "step_loss_sum": ("step_statistics", "losses"),
    "step_clipped": ("step_statistics", "clipped"),
    "traj_prev": ("smoothness", "previous"),
    "nt_history": ("nt_asgd", "history"),
    "asgd_epoch": ("nt_asgd", "switch_epoch"),
    "avg": ("nt_asgd", "average"),
    "avg_n": ("nt_asgd", "count"),
}


def upgrade_checkpoint(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return a checkpoint payload in today's layout (:data:`CHECKPOINT_KEYS`).

    Checkpoints written before the measurement units (no ``format``) kept one
    flat ``loop`` dict with every unit's values; they are split into the loop's
    position and each unit's state. Today's payloads are returned unchanged.
    """
    if "format" in payload:
        return dict(payload)
    flat = dict(payload["loop"])
    units: dict[str, dict[str, Any]] = {}
    for key, (unit, name) in _LEGACY_UNITS.items():
        if key in flat:
            units.setdefault(unit, {})[name] = flat.pop(key)
    return {**payload, "format": CHECKPOINT_FORMAT, "loop": flat, "units": units}


@dataclass
class History:
    """What :func:`clipscope.fit` returns: one row per probe, plus run-level counters.

    Attributes
    ----------
    rows : list of dict
        Per-probe records (the columns of ``epochs.csv``; see
        :mod:`clipscope.run.directory`).
    steps : int
        Clipped steps taken.
    counts : list of int
        How often each component was drawn.
    status : str
        ``"completed"``, ``"interrupted"`` or ``"nonfinite"``.
    method : str
        The method's name.
    run_dir : Path or None
        The run directory, when there is one.
    """

    rows: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    counts: list[int] = field(default_factory=list)
    status: str = "running"
    method: str = "igc"
    run_dir: Path | None = None

    def column(self, name: str) -> np.ndarray:
        """Return one column over the rows as a float64 array (NaN where missing)."""
        return np.array([float(r.get(name, math.nan)) for r in self.rows], dtype=np.float64)
