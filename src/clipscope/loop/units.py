r"""Measurement units: the protocol a loop drives, the contexts it hands them, the driver.

A *unit* is one measurement (or duty) of a training loop: probe statistics,
the IGC drift, smoothness, the held-out metric, NT-ASGD averaging,
checkpointing (:mod:`clipscope.loop.measures`, :mod:`clipscope.loop.duties`),
or one of your own. It declares

* **what it needs** at a point x_k, through :meth:`Unit.needs` (:class:`Needs`):
  the probe's per-component scalars (``PROBE``), also ∇f_k as vectors
  (``FULL_GRADIENT``), and every step's clipped gradient in the interval that
  follows (``STEP_GRADIENT``). The driver computes the union and runs the
  engine's probe **once** for all units;
* **when it runs**: the hooks it overrides (all optional, all no-ops here) and
  its own schedule (e.g. ``every``) inside them;
* **its state**: :meth:`Unit.state_dict` / :meth:`Unit.load_state_dict`
  (plain values and tensors; a checkpoint holds them under :attr:`Unit.name`).

The loop's clock, in the words of :func:`clipscope.fit` (a user's own loop
drives the same hooks in the same order; an *interval* is the updates between
two consecutive points)::

    start(loop)                           once, before anything
    parameters_changed(params)            the Monitor: whenever the model's trainable
                                          parameters became another set (any time)
    for each point x_k:                   fit: the start of epoch k (k = 0 … E)
        needs(point) for every unit  ->   the probe runs once if any needs PROBE
        at_point(point)                   every unit, in order
        for each update of the interval:  fit: the m steps of epoch k
            before_update(step)           units that needed STEP_GRADIENT; .grad
                                          holds the clipped gradient, x unchanged
            after_update(step)            every unit; x is the new iterate
        at_interval_end(end)              every unit (fit: after the schedule's step)
    finish(end)                           once: completed, interrupted or nonfinite

The driver (:class:`Units`) never asks which unit is which: every hook goes to
every unit, in the order given (units that fill a row first, the one that
persists it last).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from clipscope.engine import ProbeResult, model_guard, probe
from clipscope.errors import NonFiniteError
from clipscope.run.directory import COLUMNS

__all__ = ["Finish", "IntervalEnd", "Needs", "Point", "Step", "Unit", "Units"]


def _quiet(text: str) -> None:
    pass


class Needs(enum.Flag):
    """What a unit needs at a point (combine with ``|``).

    ``PROBE``
        Run the engine's probe at x_k: ``point.probe`` gets ``n_i``, ``d_i``,
        ``f_i``, ``‖∇f_k‖`` (and every statistic through ``point.probe.stats``),
        and the point gets a record (``point.row``). When the loop's
        ``preconditioner`` is an Adam/AdamW optimizer (``Loop.preconditioner``,
        ``Monitor.preconditioner``), also the dots with ``u = P⁻¹∇f_k``
        (``point.probe.preconditioned``, P read from its state at the probe).
    ``FULL_GRADIENT``
        When the point is probed, keep ∇f_k as float64 tensors shaped like the
        parameters (``point.probe.full_grad``). Does not by itself cause a probe.
    ``STEP_GRADIENT``
        Call :meth:`Unit.before_update` at every update of the interval that
        starts here, while ``.grad`` holds the step's clipped gradient.
    """

    NOTHING = 0
    PROBE = enum.auto()
    FULL_GRADIENT = enum.auto()
    STEP_GRADIENT = enum.auto()


@dataclass
class Point:
    """The point x_k, handed to every unit's :meth:`Unit.needs` and :meth:`Unit.at_point`.

    Attributes
    ----------
    model, loss_fn, components, params
        What the loop trains: ``loss_fn(model(x), y)`` (or ``loss_fn(model,
        batch)``, :func:`clipscope.engine.losses.loss_form`) is component i's
        mean loss; ``params`` the trainable parameters (tied weights once).
    epoch : int
        k, the point's index on the loop's clock (the row's ``epoch``): fit's
        epoch; the ``Monitor``'s probe number (its step is ``step``).
    step : int
        Updates taken before x_k.
    last : bool
        Whether x_k is the final point (no interval follows).
    rows : list of dict
        The records so far; a probed point's row is already the last one.
    dropout, seed
        The probe's dropout policy and mask seed; units that evaluate the model
        (smoothness) use the same.
    probe : ProbeResult or None
        Set when the point was probed (a unit needed ``Needs.PROBE``).
    row : dict or None
        This point's record (column name -> float), when probed. Units add
        their columns to it; keys starting with ``_`` are not written.
    arrays : dict of str to numpy.ndarray
        Per-component arrays for ``components/epoch_XXXX.npz``.
    index : int
        Records made before this one (the probe's number, 0-based).
    log : callable
        ``log(text)``: the run's log (``train.log`` under ``clipscope train``).
    loop : object
        The object that owns the state (:class:`clipscope.loop.fit.Loop` under
        ``fit``); units that persist it call its ``state_dict()``.
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    components: Any
    params: list[torch.Tensor]
    epoch: int
    step: int
    last: bool
    rows: list[dict[str, float]]
    dropout: str = "off"
    seed: int = 0
    probe: ProbeResult | None = None
    row: dict[str, float] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    index: int = 0
    log: Callable[[str], None] = _quiet
    loop: Any = None


@dataclass
class Step:
    """One update ``x ← x − α·C(∇f_i(x); η)``, handed to ``before_update`` and ``after_update``.

    Attributes
    ----------
    number : int
        Updates taken, this one included (1-based).
    component : int
        i, the component the step used (-1: a batch of the user's own loop,
        not one of the partition's components).
    eta : float
        The threshold it used (``method = "zhang"``: γ/α; the ``Monitor``: its η).
    grad_norm : float
        The step gradient's norm before clipping (fit: ``‖∇f_i(x)‖``); NaN when
        the loop clipped before the gradient could be seen and did not say.
    loss : float
        The loss at the point the step started from (fit: ``f_i(x)``); NaN when
        not known.
    params : list of Tensor
        The trainable parameters: in ``before_update`` their ``.grad`` is the
        gradient the update applies (fit: the clipped one) and x is unchanged;
        in ``after_update`` x is updated.
    closes_interval : bool
        Whether it is the last update of its interval (fit: of the epoch).
    clipped : bool or None
        Whether the step was clipped at ``eta``; None means ``grad_norm > eta``
        (:attr:`clip_indicator`).
    products : tuple of float or None
        ``(‖g‖², ⟨g, ∇f_k⟩)`` -- with a preconditioner ``(‖g‖², ⟨g, ∇f_k⟩, ⟨g, u_k⟩)``,
        ``u_k = P⁻¹∇f_k`` -- of the gradient in ``.grad`` against the last probe,
        when the loop already computed them (the Monitor reading the norm
        itself): units reuse them instead of reading the gradient again.
    """

    number: int
    component: int
    eta: float
    grad_norm: float
    loss: float
    params: list[torch.Tensor]
    closes_interval: bool = False
    log: Callable[[str], None] = _quiet
    loop: Any = None
    stop_requested: Callable[[], bool] = field(default=lambda: False, repr=False)
    clipped: bool | None = None
    products: tuple[float, ...] | None = None

    @property
    def stopping(self) -> bool:
        """Whether SIGTERM/SIGINT arrived: the loop stops after this update's hooks."""
        return self.stop_requested()

    @property
    def clip_indicator(self) -> float:
        """1.0 when the step was clipped at η, 0.0 when not, NaN when unknown.

        ``clipped`` when given, else ``grad_norm > eta`` (the paper's C(·; η)
        changes g), NaN when ``grad_norm`` is NaN.
        """
        if self.clipped is not None:
            return float(bool(self.clipped))
        return math.nan if math.isnan(self.grad_norm) else float(self.grad_norm > self.eta)


@dataclass
class IntervalEnd:
    """The end of the interval that started at x_k, handed to :meth:`Unit.at_interval_end`.

    Attributes
    ----------
    epoch : int
        k of the interval just finished (its start point's index).
    steps : int
        Updates in it (fit: m).
    row : dict or None
        The record of x_k, when that point was probed: units add the
        interval's columns (``igc_drift``, ``train_loss``, ...).
    arrays : dict of str to numpy.ndarray
        Per-step arrays of the interval (one entry per update), which a
        persisting unit may store next to the point's component file (the
        ``Monitor``'s :class:`~clipscope.loop.duties.Records` does).
    """

    epoch: int
    steps: int
    row: dict[str, float] | None
    log: Callable[[str], None] = _quiet
    loop: Any = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Finish:
    """How the run ended, handed to :meth:`Unit.finish`.

    Attributes
    ----------
    status : str
        ``"completed"``, ``"interrupted"`` or ``"nonfinite"``.
    summary : dict
        What ``summary.json`` holds (status, epoch, step, rows, last_row,
        counts, message).
    model, params
        The model and its trainable parameters at the end.
    files : dict
        ``{file name: object}`` that a persisting unit writes into the run
        directory with ``torch.save`` (NT-ASGD's ``averaged_model.pt``).
    """

    status: str
    summary: dict[str, Any]
    model: nn.Module
    params: list[torch.Tensor]
    files: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = _quiet
    loop: Any = None


class Unit:
    """Base of the measurement units; subclass it and override what the unit uses.

    Every hook is a no-op here, ``needs`` is ``Needs.NOTHING`` and the state is
    empty, so a unit states only what it does. ``name`` keys its state in a
    checkpoint: one unit of each name per loop.
    """

    name: ClassVar[str] = "unit"

    def needs(self, point: Point) -> Needs:
        """Return what this unit needs at ``point`` (asked before the probe runs)."""
        return Needs.NOTHING

    def start(self, loop: Any) -> None:
        """Once, before the first point (a resumed loop: after its state is restored)."""

    def at_point(self, point: Point) -> None:
        """At x_k, after the probe (if any)."""

    def before_update(self, step: Step) -> None:
        """Before an update, ``.grad`` clipped (only when ``needs`` said ``STEP_GRADIENT``)."""

    def after_update(self, step: Step) -> None:
        """After an update."""

    def at_interval_end(self, end: IntervalEnd) -> None:
        """After the last update of the interval that started at x_k."""

    def finish(self, end: Finish) -> None:
        """Once, when the run ends (also on an error or a signal)."""

    def parameters_changed(self, params: list[torch.Tensor]) -> None:
        """React to another set of trainable parameters, now ``params``.

        The ``Monitor`` calls it when the user's model changed its parameter set
        (a re-created layer, a freeze or unfreeze, an appended module). A unit
        whose state is shaped like the parameters (a kept x_k or ∇f_k) drops it
        here and restarts at the next point.
        """

    def state_dict(self) -> dict[str, Any]:
        """Return what a checkpoint keeps of this unit (plain values and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (keys it does not know are ignored)."""


def new_row(fields: dict[str, float]) -> dict[str, float]:
    """Return a record with every standard column NaN, then ``fields`` (the loop's columns)."""
    row = {name: math.nan for name in COLUMNS}
    row.update(fields)
    return row


class Units(Sequence[Unit]):
    """The units of one loop, driven in order; runs the probe once per point for all of them.

    Parameters
    ----------
    units : sequence of Unit
        In the order their hooks run. Names must be distinct.
    route, dropout, seed, progress, batch_sizes
        How the probe runs (:func:`clipscope.engine.probe`): the engine route,
        the dropout policy, the mask seed, a progress bar, the batch sizes
        (``[1]``: per-sample components; None: the components themselves).

    :meth:`plan` (part of :meth:`visit`; on its own when a resumed loop
    continues inside an interval) records each unit's needs at a point;
    :attr:`step_gradient` then says whether any unit needs
    :meth:`Unit.before_update` in the interval that follows.
    """

    def __init__(
        self,
        units: Sequence[Unit],
        *,
        route: str = "auto",
        dropout: str = "off",
        seed: int = 0,
        progress: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        self._units = list(units)
        names = [u.name for u in self._units]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two units share a name: {', '.join(twice)}")
        self.route, self.dropout, self.seed, self.progress = route, dropout, seed, progress
        self.batch_sizes = batch_sizes
        self._step_units: list[Unit] = []

    def __getitem__(self, index):
        return self._units[index]

    def __len__(self) -> int:
        return len(self._units)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self._units)

    @property
    def step_gradient(self) -> bool:
        """Whether a unit needs :meth:`Unit.before_update` in the current interval."""
        return bool(self._step_units)

    def plan(self, point: Point) -> Needs:
        """Ask every unit what it needs at ``point``; return the union (nothing runs)."""
        needs = [unit.needs(point) for unit in self._units]
        self._step_units = [
            u for u, n in zip(self._units, needs, strict=True) if Needs.STEP_GRADIENT in n
        ]
        union = Needs.NOTHING
        for n in needs:
            union |= n
        return union

    def visit(self, point: Point, fields: dict[str, float]) -> None:
        """Visit x_k: ask every unit's needs, probe once if needed, then every ``at_point``.

        A probed point gets a record: :func:`new_row` with ``fields`` (the loop's
        columns: ``epoch``, ``step``, ``lr``, ``wall_time``) and ``probe_seconds``
        (the probe's wall-clock seconds, ``time.perf_counter``: the engine's probe
        only, not the units' work after it), appended to ``point.rows`` before the
        units run.

        Raises
        ------
        NonFiniteError
            When the probe meets a NaN/inf gradient (nothing was recorded).
        """
        needs = self.plan(point)
        if Needs.PROBE in needs:
            start = time.perf_counter()
            try:
                # with an adaptive optimizer (Adam, AdamW) its state gives P, read at the
                # probe (never changed): the probe also measures the dots with u = P⁻¹∇f
                with model_guard(point.model):
                    point.probe = probe(
                        point.model,
                        point.loss_fn,
                        point.components,
                        params=point.params,
                        etas=(),
                        route=self.route,
                        batch_sizes=self.batch_sizes,
                        dropout=self.dropout,
                        seed=self.seed,
                        keep_full_grad=Needs.FULL_GRADIENT in needs,
                        progress=self.progress,
                        preconditioner=getattr(point.loop, "preconditioner", None),
                    )
            except NonFiniteError as exc:
                raise NonFiniteError(f"probe at x_{point.epoch}: {exc}") from exc
            point.index = len(point.rows)
            point.row = new_row(fields)
            point.row["probe_seconds"] = time.perf_counter() - start
            point.rows.append(point.row)
        for unit in self._units:
            unit.at_point(point)

    def start(self, loop: Any) -> None:
        """Every unit's :meth:`Unit.start`."""
        for unit in self._units:
            unit.start(loop)

    def before_update(self, step: Step) -> None:
        """:meth:`Unit.before_update` of the units that needed ``STEP_GRADIENT`` at the point."""
        for unit in self._step_units:
            unit.before_update(step)

    def after_update(self, step: Step) -> None:
        """Every unit's :meth:`Unit.after_update`."""
        for unit in self._units:
            unit.after_update(step)

    def at_interval_end(self, end: IntervalEnd) -> None:
        """Every unit's :meth:`Unit.at_interval_end`."""
        for unit in self._units:
            unit.at_interval_end(end)

    def finish(self, end: Finish) -> None:
        """Every unit's :meth:`Unit.finish`."""
        for unit in self._units:
            unit.finish(end)

    def parameters_changed(self, params: list[torch.Tensor]) -> None:
        """Every unit's :meth:`Unit.parameters_changed`."""
        for unit in self._units:
            unit.parameters_changed(params)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Return ``{unit name: its state}`` for the units that keep any."""
        return {u.name: state for u in self._units if (state := u.state_dict())}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Hand each unit its part of :meth:`state_dict` (units without one keep theirs)."""
        for unit in self._units:
            if unit.name in state:
                unit.load_state_dict(state[unit.name])
