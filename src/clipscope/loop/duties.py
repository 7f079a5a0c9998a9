r"""Units that act rather than measure: NT-ASGD averaging, checkpointing, a per-step callback.

* :class:`NTASGD` -- Merity et al.'s non-monotonically triggered averaging: a
  trigger on the held-out metric at each point, a float64 running mean of the
  iterates after it, ``asgd_active`` / ``heldout_avg`` columns, the averaged
  model at the end;
* :class:`Checkpointing` -- persists the loop into a
  :class:`~clipscope.run.directory.RunDirectory`: opens (or resumes) it, writes
  the component file of every probed point, a checkpoint after every point,
  every ``every`` updates, at every interval's end and on a signal, and
  ``summary.json`` (plus files other units hand it) at the end;
* :class:`OnStep` -- calls ``on_step(step, i, norm)`` after every update;
* :class:`Records` -- the run directory of a loop whose state lives in the
  user's own checkpoint (the ``Monitor``): the same files as
  :class:`Checkpointing` writes, without checkpoints.

Under ``torch.distributed`` only rank 0 writes (:func:`~clipscope.engine.distributed.on_writer`):
every rank calls the same hooks, rank 0 writes, and every rank learns whether
the write worked (a refused directory or a full disk stops all of them at the
same point). A resume reads the checkpoint on rank 0 and hands it to every rank.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.config import _toml_value, check_setting
from clipscope.engine import model_guard
from clipscope.engine.conventions import gradient_conventions
from clipscope.engine.distributed import distributed_setup, on_writer
from clipscope.engine.preconditioner import unwrap as unwrap_optimizer
from clipscope.loop.units import Finish, IntervalEnd, Point, Step, Unit
from clipscope.methods import describe_optimizer
from clipscope.run.directory import RunDirectory
from clipscope.run.env import environment

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["NTASGD", "Checkpointing", "OnStep", "Records", "nt_asgd_switch"]


def nt_asgd_switch(previous: Sequence[float], current: float, nonmono: int) -> bool:
    """Return whether NT-ASGD (Merity et al., 2018, Alg. 1) switches to averaging now.

    ``previous`` are the held-out metrics (lower is better) of the earlier
    checks, ``current`` this one's. The reference's rule
    (``salesforce/awd-lstm-lm``, ``main.py``): switch when more than
    ``nonmono`` earlier values exist and ``current > min(previous[:-nonmono])``,
    i.e. the metric is worse than the best one of the checks more than
    ``nonmono`` ago. A NaN ``current`` never triggers.

    >>> nt_asgd_switch([5.0, 4.0, 3.0], 3.5, nonmono=2)  # best before the last 2 is 5.0
    False
    >>> nt_asgd_switch([5.0, 4.0, 3.0], 5.5, nonmono=2)
    True
    >>> nt_asgd_switch([5.0, 4.0], 9.0, nonmono=2)  # too few checks yet
    False
    """
    nonmono = check_setting("nonmono", nonmono)
    if len(previous) <= nonmono:
        return False
    return bool(current > min(previous[:-nonmono]))


def _write_env(directory: RunDirectory, loop: Any, seed: int, dropout: str) -> None:
    """Write ``env.json``: versions, device, dtype, seed, components, gradient conventions.

    Under ``fit`` also ``optimizer``: the optimizer's class and first param group's
    settings as it starts (:func:`~clipscope.methods.describe_optimizer`) and the schedule;
    the ``Monitor`` records the user's optimizer the same way when it was given one.
    """
    param = loop.params[0]
    env = environment(
        device=str(param.device), dtype=str(param.dtype).removeprefix("torch."), seed=seed
    )
    env["components"] = loop.components.describe()
    env["conventions"] = gradient_conventions(loop.model, loop.components, dropout)
    env["distributed"] = distributed_setup()
    optimizer = getattr(loop, "optimizer", None)  # fit's loop, or the Monitor's user's (if given)
    if optimizer is not None:
        config = getattr(loop, "config", None)  # the Monitor has no schedule of its own
        env["optimizer"] = {
            **describe_optimizer(unwrap_optimizer(optimizer)),
            "schedule": getattr(config, "schedule", None),
        }
    directory.write_text("env.json", json.dumps(env, indent=2, default=str) + "\n")


def _write_files(directory: RunDirectory, files: dict[str, Any]) -> None:
    """Write the files units handed over at the end (``torch.save``)."""
    for name, obj in files.items():
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        directory.write_bytes(name, buffer.getvalue())


class NTASGD(Unit):
    r"""Non-monotonically triggered averaging of the iterates (Merity et al., 2018).

    At each point x_k with k ≥ 1 that is not the last (the end of interval
    k−1) it evaluates the held-out metric at x_k -- the row's ``heldout`` when
    the point was probed (:class:`~clipscope.loop.measures.HeldOutMetric` runs
    first), else ``heldout(model)`` under ``model_guard`` -- and, once
    :func:`nt_asgd_switch` fires, keeps after every later update the running
    mean ``x̄ ← x̄ + (x − x̄)/n`` in **float64** (torch's ``ASGD`` with ``t0`` at
    the switch and ``λ = 0``). Training and probes stay at the iterates x_k;
    probed rows get ``asgd_active`` (1/0: averaging during the interval that
    starts at x_k) and ``heldout_avg`` (the metric at x̄; NaN before one
    averaged update). A completed run hands ``averaged_model.pt`` (the model's
    state dict with x̄ in the parameters' dtype) to the persisting unit.

    State: the metric history, the switch's epoch, x̄ and its count.

    Parameters
    ----------
    heldout : callable
        ``heldout(model) -> float``, lower is better.
    nonmono : int
        The trigger's window (>= 1).
    """

    name = "nt_asgd"

    def __init__(self, heldout: Callable[[nn.Module], float], nonmono: int = 5) -> None:
        if not callable(heldout):
            raise ValueError("optimizer_switch='nt-asgd' needs a heldout metric to trigger on")
        self.heldout = heldout
        self.nonmono = check_setting("nonmono", nonmono)
        self.history: list[float] = []
        self.switch_epoch: int | None = None
        self.average: list[torch.Tensor] | None = None
        self.count = 0

    def _metric(self, model: nn.Module) -> float:
        with model_guard(model), torch.no_grad():
            return float(self.heldout(model))

    def at_point(self, point: Point) -> None:
        """Trigger check at x_k; ``asgd_active`` and ``heldout_avg`` into a probed row."""
        if self.average is None and point.epoch >= 1 and not point.last:
            row = point.row
            metric = row["heldout"] if row is not None else self._metric(point.model)
            if nt_asgd_switch(self.history, metric, self.nonmono):
                with torch.no_grad():
                    self.average = [p.detach().to(torch.float64).clone() for p in point.params]
                self.count, self.switch_epoch = 0, point.epoch
                point.log(
                    f"NT-ASGD: held-out {metric:.6g} at epoch {point.epoch}; "
                    "averaging the iterates from now on"
                )
            self.history.append(metric)
        if point.row is None:
            return
        point.row["asgd_active"] = float(self.average is not None)
        point.row["heldout_avg"] = float("nan")
        if self.average is not None and self.count > 0:
            with model_guard(point.model), torch.no_grad():
                for p, a in zip(point.params, self.average, strict=True):
                    p.copy_(a.to(p.dtype))
                point.row["heldout_avg"] = float(self.heldout(point.model))

    def after_update(self, step: Step) -> None:
        """``x̄ ← x̄ + (x − x̄)/n`` in float64, once averaging is on."""
        if self.average is None:
            return
        self.count += 1
        n = self.count
        with torch.no_grad():
            for a, p in zip(self.average, step.params, strict=True):
                a.add_((p.detach().to(torch.float64) - a) / n)

    def finish(self, end: Finish) -> None:
        """On completion: hand over ``averaged_model.pt`` (or say it never triggered)."""
        if end.status != "completed":
            return
        if self.average is None or self.count == 0:
            end.log("NT-ASGD: never triggered; no averaged model written")
            return
        by_id = {id(p): a for p, a in zip(end.params, self.average, strict=True)}
        state = {}
        for name, value in end.model.state_dict(keep_vars=True).items():  # tied weights: both
            average = by_id.get(id(value))
            state[name] = (value if average is None else average.to(value.dtype)).detach().clone()
        end.files["averaged_model.pt"] = state
        end.log(f"NT-ASGD: averaged model of {self.count} iterates in averaged_model.pt")

    def state_dict(self) -> dict[str, Any]:
        """``{"history", "switch_epoch", "average", "count"}``."""
        return {
            "history": self.history,
            "switch_epoch": self.switch_epoch,
            "average": self.average,
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.history = list(state.get("history", []))
        self.switch_epoch = state.get("switch_epoch")
        self.average = state.get("average")
        self.count = state.get("count", 0)


class OnStep(Unit):
    """Call ``on_step(step_number, component, grad_norm)`` after every update (fault injection)."""

    name = "on_step"

    def __init__(self, on_step: Callable[[int, int, float], None]) -> None:
        self.on_step = on_step

    def after_update(self, step: Step) -> None:
        """Call the function."""
        self.on_step(step.number, step.component, step.grad_norm)


class Checkpointing(Unit):
    r"""Persist the loop into a run directory, so that a ``kill -9`` loses nothing.

    * :meth:`start`: open the directory (:meth:`RunDirectory.open`: refusals,
      the resume check against the loop's ``setting``), restore the newest
      loadable checkpoint into the loop (``loop.load_state_dict``), rewrite
      ``epochs.csv`` from it, and write ``env.json`` (versions, the components,
      the gradient conventions) unless a resumed run has one;
    * at every point: the component file of a probed point, then a checkpoint;
    * after an update: a checkpoint every ``every`` updates (not at an
      interval's last one, which gets its own) and when a signal arrived;
    * at every interval's end: a checkpoint (the loop has moved to x_{k+1});
    * at the end: the files other units handed over (``torch.save``), then
      ``summary.json``.

    Each checkpoint is ``loop.state_dict()`` (the model, optimizer, schedule,
    order, RNG, position, rows and every unit's state), numbered by this unit's
    counter (its state) so none is overwritten; ``epochs.csv`` is rewritten from
    its rows right after it; the newest ``keep`` are kept.

    Parameters
    ----------
    directory : RunDirectory
        Where (not opened yet).
    every : int
        Also checkpoint every this many updates (0: only at points, interval
        ends and signals).
    keep : int
        Newest checkpoints kept.
    resume, force : bool
        Continue the run in ``directory``; accept changed settings (logged).
    """

    name = "checkpointing"

    def __init__(
        self,
        directory: RunDirectory,
        *,
        every: int = 0,
        keep: int = 3,
        resume: bool = False,
        force: bool = False,
    ) -> None:
        self.directory = directory
        self.every = check_setting("checkpoint_every", every)
        self.keep = check_setting("keep_checkpoints", keep)
        self.resume, self.force = bool(resume), bool(force)
        self.seq = 0
        self._loop: Any = None

    def start(self, loop: Any) -> None:
        """Open the directory; on resume restore the loop from its newest checkpoint."""
        self._loop = loop
        directory = self.directory
        payload = on_writer(
            lambda: directory.open(
                resume=self.resume, force=self.force, setting=loop.setting,
                fits=lambda state: _model_misfit(loop.model, state),
            )
        )  # fmt: skip
        if payload is not None:
            loop.load_state_dict(payload)
            on_writer(lambda: directory.restore_rows(loop.state.rows))
            st = loop.state
            loop.log(f"resumed at epoch {st.epoch}, step {st.step} of {directory.path}")

        def env() -> None:
            if not (payload is not None and (directory.path / "env.json").is_file()):
                _write_env(directory, loop, loop.config.seed, loop.config.dropout)

        on_writer(env)

    def save(self) -> None:
        """Write checkpoint number ``seq + 1`` of the loop, then ``epochs.csv``."""
        self.seq += 1
        rows, seq = self._loop.state.rows, self.seq
        payload = self._loop.state_dict()  # every rank: it gathers their recurrent states
        on_writer(lambda: self.directory.save(payload, seq=seq, rows=rows, keep=self.keep))

    def at_point(self, point: Point) -> None:
        """Write the component file of a probed point, then a checkpoint."""
        if point.row is not None:
            on_writer(lambda: self.directory.write_components(point.epoch, point.arrays))
        self.save()

    def after_update(self, step: Step) -> None:
        """Checkpoint on a signal, and every ``every`` updates inside an interval."""
        due = self.every and step.number % self.every == 0 and not step.closes_interval
        if step.stopping or due:
            self.save()

    def at_interval_end(self, end: IntervalEnd) -> None:
        """Checkpoint the loop, which stands at the next point now."""
        self.save()

    def finish(self, end: Finish) -> None:
        """Write the handed-over files, then ``summary.json``."""

        def write() -> None:
            _write_files(self.directory, end.files)
            self.directory.finish(end.summary)

        on_writer(write)

    def state_dict(self) -> dict[str, Any]:
        """``{"seq": checkpoints written so far}``."""
        return {"seq": self.seq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue numbering after ``seq``."""
        self.seq = state.get("seq", 0)


def _toml_text(setting: Mapping[str, Any], header: str) -> str:
    """``key = value`` lines of the plain values of ``setting`` (None left out)."""
    lines = [f"# {header}"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in setting.items() if v is not None]
    return "\n".join(lines) + "\n"


def _model_misfit(model: nn.Module, state: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's model weights cannot be loaded into ``model``; None when they can.

    Compares the names and shapes of ``model.state_dict()`` with the
    checkpoint's ``"model"`` entry (nothing is loaded).
    """
    saved = state.get("model")
    if not isinstance(saved, Mapping):
        return "it holds no model weights"
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = [
        f"{k}: {tuple(saved[k].shape)} -> {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved and tuple(getattr(saved[k], "shape", v.shape)) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"the model has weights the checkpoint lacks ({', '.join(missing[:4])})")
    if extra:
        parts.append(f"the checkpoint has weights the model lacks ({', '.join(extra[:4])})")
    if shapes:
        parts.append(f"weights of other shapes ({'; '.join(shapes[:4])})")
    return "; ".join(parts) or None


class Records(Unit):
    r"""Write the records of a loop that keeps no checkpoints of its own (the ``Monitor``).

    The loop's state lives in the user's checkpoint (``Monitor.state_dict()``);
    this unit writes everything else of a run directory, every file through
    :class:`~clipscope.run.directory.RunDirectory` (atomic):

    * :meth:`start`: open the directory and write ``config.toml`` (the loop's
      ``setting``: what a resume must match, with its ``run_id``) and
      ``env.json`` (versions, the components, the gradient conventions). A
      fresh loop refuses a directory that holds files
      (:class:`FileExistsError`). A resumed loop (``loop.resumed``) accepts its
      own directory only -- one whose ``config.toml`` has the same ``run_id``
      (else :class:`FileExistsError`: it holds another run) -- and rewrites
      ``epochs.csv`` from the restored rows, deleting component files of points
      the state does not hold (written after the user's checkpoint);
    * at every probed point: ``components/epoch_XXXX.npz`` (the probe's
      arrays), then ``epochs.csv``;
    * at every interval's end: ``components/epoch_XXXX_steps.npz`` (the
      interval's per-step arrays, :attr:`IntervalEnd.arrays`), then
      ``epochs.csv`` (the interval's columns are in the row now);
    * at the end: handed-over files, then ``summary.json``.

    What it reads from ``loop`` (the ``Monitor``): ``setting`` (a flat dict of
    plain values with ``run_id``), ``resumed``, ``rows``, ``model``,
    ``params``, ``components``, ``dropout``, ``seed``, ``log``.

    Parameters
    ----------
    directory : RunDirectory
        Where (not opened yet).
    """

    name = "records"

    def __init__(self, directory: RunDirectory) -> None:
        if not isinstance(directory, RunDirectory):
            raise TypeError(f"directory must be a RunDirectory, got {type(directory)!r}")
        self.directory = directory
        self._rows: list[dict[str, float]] = []

    def check(self, setting: Mapping[str, Any], resumed: bool) -> None:
        """Refuse a directory this loop may not write into (before anything is written).

        Raises
        ------
        FileExistsError
            The path is a file; a fresh loop's directory holds files; a resumed
            loop's directory holds files of another run (another ``run_id``, or
            no ``config.toml``).
        """
        path = self.directory.path
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"run_dir {path} is a file, not a directory")
        if not (path.is_dir() and any(path.iterdir())):
            return
        if not resumed:
            raise FileExistsError(
                f"run_dir {path} exists and holds files of another run: choose an empty or new "
                "directory (or load this run's Monitor state to continue it)"
            )
        stored = None
        config = path / "config.toml"
        if config.is_file():
            try:
                stored = tomllib.loads(config.read_text()).get("run_id")
            except tomllib.TOMLDecodeError:
                stored = None
        if stored != setting.get("run_id"):
            raise FileExistsError(
                f"run_dir {path} holds another run (run_id {stored!r}), not the one of the "
                f"loaded Monitor state (run_id {setting.get('run_id')!r})"
            )

    def start(self, loop: Any) -> None:
        """Open the directory (fresh or resumed), write ``config.toml`` and ``env.json``."""
        directory, setting = self.directory, loop.setting
        self._rows = loop.rows
        directory.files["config.toml"] = _toml_text(
            setting, "clipscope Monitor: the records of a training loop of your own"
        )
        # A Monitor directory has no checkpoints: RunDirectory.open's "no checkpoint yet"
        # line would mislead; everything else it logs (version changes, stray files) is kept.
        directory.log = lambda text: (
            None if text.startswith("--resume: no checkpoint") else (loop.log(text))
        )

        def open_() -> None:
            self.check(setting, loop.resumed)
            fresh = not (directory.path.is_dir() and any(directory.path.iterdir()))
            directory.open(resume=not fresh, setting={})
            if fresh or not (directory.path / "env.json").is_file():
                _write_env(directory, loop, loop.seed, loop.dropout)
            directory.restore_rows(self._rows)

        on_writer(open_)

    def at_point(self, point: Point) -> None:
        """Write the component file of a probed point, then ``epochs.csv``."""
        if point.row is not None:

            def write() -> None:
                self.directory.write_components(point.epoch, point.arrays)
                self.directory.write_rows(point.rows)

            on_writer(write)

    def at_interval_end(self, end: IntervalEnd) -> None:
        """Write the interval's per-step arrays, then ``epochs.csv``."""

        def write() -> None:
            if end.arrays:
                buffer = io.BytesIO()
                np.savez(buffer, **end.arrays)
                name = f"{self.directory.components.name}/epoch_{end.epoch:04d}_steps.npz"
                self.directory.write_bytes(name, buffer.getvalue())
            self.directory.write_rows(self._rows)

        on_writer(write)

    def finish(self, end: Finish) -> None:
        """Write the handed-over files, ``epochs.csv``, then ``summary.json``."""

        def write() -> None:
            _write_files(self.directory, end.files)
            self.directory.write_rows(self._rows)
            self.directory.finish(end.summary)

        on_writer(write)
