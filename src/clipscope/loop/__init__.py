"""The training loop and its measurement units (DESIGN §6).

:func:`fit` trains with a clipped incremental method and drives the units;
a unit (:class:`Unit`) declares what it needs (:class:`Needs`), runs at the
points, updates and interval ends of the loop's clock, and keeps its own
``state_dict``. :class:`Monitor` drives the same units from a user's own loop (plain,
Lightning, Hugging Face: :mod:`clipscope.loop.integrations`).
"""

from clipscope.loop.duties import NTASGD, Checkpointing, OnStep, Records, nt_asgd_switch
from clipscope.loop.fit import Loop, check_batch_coupling, fit, fit_loop, standard_units
from clipscope.loop.measures import (
    HeldOutMetric,
    IGCDrift,
    ProbeStatistics,
    Smoothness,
    StepGradient,
    StepStatistics,
)
from clipscope.loop.monitor import Monitor
from clipscope.loop.state import History, LoopState, upgrade_checkpoint
from clipscope.loop.thresholds import AutoClip, DescentSafe, ThresholdRule
from clipscope.loop.units import Finish, IntervalEnd, Needs, Point, Step, Unit, Units

__all__ = [
    "NTASGD",
    "AutoClip",
    "Checkpointing",
    "DescentSafe",
    "Finish",
    "HeldOutMetric",
    "History",
    "IGCDrift",
    "IntervalEnd",
    "Loop",
    "LoopState",
    "Monitor",
    "Needs",
    "OnStep",
    "Point",
    "ProbeStatistics",
    "Records",
    "Smoothness",
    "Step",
    "StepGradient",
    "StepStatistics",
    "ThresholdRule",
    "Unit",
    "Units",
    "check_batch_coupling",
    "fit",
    "fit_loop",
    "nt_asgd_switch",
    "standard_units",
    "upgrade_checkpoint",
]
