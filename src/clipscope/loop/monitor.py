r"""``Monitor``: clipscope's measurement units, driven from a training loop of your own.

Your loop trains; at every ``every``-th step the Monitor probes the current
parameters exactly (the engine's probe under the model guard: training stays
bitwise the same) and, with ``run_dir``, writes the run directory that
``clipscope train`` writes, so ``clipscope report`` and ``clipscope theory``
read it unchanged. Between probes it records, from the gradient your step
already computed, the step gradient's norm, whether it was clipped at η and its
cosine with the last probe's ∇f (no forward, no backward).

It is the units of :func:`clipscope.fit` (:mod:`clipscope.loop.measures`,
:mod:`clipscope.loop.duties`) on the loop clock of :mod:`clipscope.loop.units`,
driven from outside. The Monitor's clock:

* a **point** x_k is the parameters after ``step`` optimizer updates, at each
  ``step`` with ``step % every == 0`` that :meth:`Monitor.step` is called with;
  ``k`` counts the points (0, 1, 2, ...: the row's ``epoch``), ``step`` is the
  row's ``step``;
* the **interval** of x_k is the updates until the next point; each update the
  loop reports with :meth:`Monitor.gradient` is one ``Step`` (``before_update``
  right away, while ``.grad`` holds the gradient; ``after_update`` at the next
  :meth:`Monitor.step` or :meth:`Monitor.close`, once the update is applied);
* :meth:`Monitor.close` ends the last interval and finishes the directory.

With ``per_sample=True`` every sample of the components is a component (the
engine's per-sample route; m = N); the steps are still your loop's mini-batch
gradients (``docs/integrations.md``, "Per-sample components"; a Hugging Face
causal LM through :class:`~clipscope.loop.integrations.hf.PerSampleLM`).

Under ``torch.distributed`` (``torchrun``; your loop may wrap the model in
``DistributedDataParallel``) every rank makes the same calls: the probes split
the components over the ranks (every rank gets the whole result), only rank 0
logs and writes ``run_dir``, and the ``run_id`` is rank 0's on every rank.

>>> import torch, clipscope
>>> X, Y = torch.randn(32, 3), torch.randn(32)
>>> comps = clipscope.Components.from_tensors(X, Y, batch_size=8, seed=0)
>>> model = torch.nn.Linear(3, 1)
>>> def loss_fn(out, y):
...     return ((out.squeeze(-1) - y) ** 2).mean()
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> with clipscope.Monitor(model, loss_fn, comps, eta=1.0, every=2) as monitor:
...     for step in range(4):
...         _ = monitor.step(step)                   # probes x_0 and x_2
...         x, y = comps.batch(step % comps.m)
...         opt.zero_grad(); loss_fn(model(x), y).backward()
...         monitor.gradient()                       # ‖g‖, clipped at η?, cos(g, ∇f_k)
...         opt.step()
>>> [int(r["step"]) for r in monitor.rows], len(monitor.rows[0]) > 20
([0, 2], True)
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipscope.config import (
    PER_SAMPLE_ROUTES,
    check_per_sample_settings,
    check_route,
    check_setting,
)
from clipscope.engine import (
    ProbeResult,
    trainable_params,
)
from clipscope.engine import distributed as _dist
from clipscope.engine.losses import check_grad_compatible, check_repeatable
from clipscope.engine.preconditioner import is_adam
from clipscope.engine.preconditioner import unwrap as _unwrap_optimizer
from clipscope.errors import ConfigError, Interrupted, NonFiniteError
from clipscope.loop.duties import Records
from clipscope.loop.fit import check_batch_coupling, check_loss_form, check_per_sample
from clipscope.loop.measures import (
    HeldOutMetric,
    ProbeStatistics,
    Smoothness,
    StepGradient,
    StepStatistics,
    gradient_products,
)
from clipscope.loop.thresholds import DescentSafe
from clipscope.loop.units import Finish, IntervalEnd, Point, Step, Unit, Units
from clipscope.run.directory import RunDirectory, setting_diff

__all__ = ["PER_SAMPLE_ROUTES", "STATE_FORMAT", "Monitor", "RepeatedGradientWarning"]

#: ``format`` of :meth:`Monitor.state_dict`.
STATE_FORMAT = 1


def _signature(params: Sequence[torch.Tensor]) -> list[tuple[int, torch.Size]]:
    """Return what identifies a parameter set: each tensor (held: its id stays unique), its shape.

    The shape catches a parameter resized in place (``p.data = torch.zeros(...)``).
    """
    return [(id(p), p.shape) for p in params]


class RepeatedGradientWarning(UserWarning):
    """:meth:`Monitor.gradient` was called twice without the parameters changing in between."""


def _quiet(text: str) -> None:
    pass


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _counts_as_int(row: dict[str, Any]) -> dict[str, Any]:
    """Return a row of :meth:`Monitor.state_dict` (floats) with ``epoch`` and ``step`` as ints."""
    return {k: int(v) if k in ("epoch", "step") and float(v).is_integer() else v
            for k, v in row.items()}  # fmt: skip


def _scalar(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be one number, got a tensor of {tuple(value.shape)}")
        return float(value.detach())  # a device synchronisation
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {value!r}")
    return float(value)


class Monitor:
    r"""Probe the clipping statistics of your own training loop; record every step's for free.

    Parameters
    ----------
    model : nn.Module
        The model your loop trains (a ``LightningModule``, a Hugging Face model).
    loss : callable
        The component's scalar **mean** loss, either ``loss(model, batch)`` --
        chosen exactly when its first two parameters are named ``model`` and
        ``batch``: ``lambda model, batch: model(**batch).loss`` -- or
        ``loss(output, target)`` on ``(x, y)`` batches
        (:func:`clipscope.engine.losses.loss_form`).
    components : Components or SequentialComponents
        The fixed partition f = (1/m) Σ_i f_i the probes measure
        (:meth:`clipscope.Components.from_dataset` for any map-style dataset).
        Typically a fixed subset of your training data: a probe costs about
        two passes over it (``route="keep"``: one, when m·n fits in memory).
    eta : float or "descent-safe"
        The clipping threshold η > 0 of the statistics (``inf``: none); use
        your loop's own clipping threshold. ``"descent-safe"`` (opt-in): the
        Monitor sets η at every probe and your loop clips at :attr:`eta`
        (every change logged, the ``eta`` column recorded; the Hugging Face and
        Lightning callbacks set the trainer's threshold themselves).
    rho_target, eta_min, eta_max
        ``eta="descent-safe"`` only: the share ρ* of the unclipped descent to
        keep, in (0, 1], and bounds of η (None: none).
    every : int
        Probe at every step with ``step % every == 0`` (>= 1).
    etas : sequence of float
        More thresholds for ``rho@η`` columns.
    route : str
        The probe's engine route (:func:`clipscope.probe`): ``"auto"``,
        ``"two-pass"``, ``"keep"``; with ``per_sample``: ``"auto"`` (keeps the
        per-sample factors while they fit), ``"per-sample"`` (two passes, bounded
        memory), ``"per-sample-kept"`` (refused where the factors do not fit).
    per_sample : bool
        Every **sample** of the components is a component (batch size 1; the
        given components are the probe's chunks): the probe runs the engine's
        per-sample route (:func:`clipscope.probe` with ``batch_sizes=[1]``:
        ghost norms, kept factors, no per-sample gradient where a layer rule
        exists), so m = N (the samples the components hold), ``sizes`` are all 1,
        f = (1/N) Σ_j ℓ_j and ∇f = (1/N) Σ_j ∇ℓ_j, with ℓ_j = ``loss(model(x_j),
        y_j)`` sample j's own mean loss. Needs a ``loss(output, target)`` on
        ``(x, y)`` batches of independent samples (a Hugging Face causal LM:
        :class:`~clipscope.loop.integrations.hf.PerSampleLM`). The step gradient
        :meth:`gradient` reads is still your loop's mini-batch's.
    dropout : {"off", "fixed"}
        The probe's dropout policy (:mod:`clipscope.engine.guard`).
    run_dir : str or Path, optional
        Write the run directory here (:class:`~clipscope.loop.duties.Records`):
        it must be new or empty, unless this Monitor continues a run from
        :meth:`load_state_dict` (then it must be that run's directory).
    seed : int
        The ``"fixed"`` dropout masks' seed.
    smoothness_every : int or None
        0 (default): record Zhang et al.'s secant ``traj_smoothness`` between
        consecutive probes (keeps x_k and ∇f_k: 16 bytes per parameter), so
        ``clipscope theory`` can fit (L0, L1); k >= 1: also Lanczos
        ``‖∇²f(x_k)‖`` at every k-th probe (up to 30 more passes each); None:
        neither.
    heldout : callable, optional
        ``heldout(model) -> float`` for the ``heldout`` column.
    units : sequence of Unit
        More units (your own, :class:`~clipscope.loop.integrations.tensorboard.TensorBoardScalars`),
        run after the standard ones and before the directory's writer.
    log : callable, optional
        ``log(text)``: one line per probe and the directory's messages.
    progress : bool
        A tqdm bar per probe pass.
    optimizer : torch.optim.Optimizer, optional
        Your loop's optimizer. An Adam or AdamW (or a wrapper holding one in
        ``.optimizer``, as accelerate's): every probe then reads its
        preconditioner ``P = √v̂ + ε`` (bias-corrected, from its state at the
        probe; the state is never changed) and records the preconditioned
        statistics beside the plain ones -- ``rho_p`` = ρ_P(η), the cosines to
        ``u = P⁻¹∇f``, ... (:class:`~clipscope.loop.measures.ProbeStatistics`) --
        and every step the cosine of its gradient with ``u_k``, ``step_cos_p``
        (:class:`~clipscope.loop.measures.StepGradient`). Any other optimizer is
        recorded by name only (SGD's P is the identity: ρ is its answer). The
        Lightning and Hugging Face callbacks set it themselves
        (:meth:`use_optimizer`).

    Raises
    ------
    ConfigError
        A bad ``eta``, ``etas``, ``every`` (<= 0), ``route``, ``dropout``, seed;
        ``per_sample`` with sequential components, with a train-mode BatchNorm,
        with ``smoothness_every >= 1`` (the Hessian norm is measured over
        mini-batch components only) or with ``eta="descent-safe"`` (it would set
        the loop's mini-batch threshold from per-sample clipping).
    TypeError
        A model that is not an ``nn.Module``; a ``loss`` whose form does not fit
        the components' batches (:func:`~clipscope.engine.losses.check_loss_fn`).
    ValueError
        A loss that is not a scalar tensor, or that differs between two
        evaluations of the same component (dropout the policy cannot turn off);
        a size-1 component under train-mode BatchNorm; a model with reentrant
        activation checkpointing (``use_reentrant=True``:
        :func:`~clipscope.engine.losses.check_grad_compatible`); ``per_sample``
        with a ``loss(model, batch)``, or with samples that interact in the
        forward (a sample's loss alone differs from its loss in the batch:
        :func:`~clipscope.engine.per_sample.batch.check_independent_samples`).
    NonFiniteError
        The loss of the first component is NaN/inf now.
    FileExistsError
        ``run_dir`` is a file.
    Exception
        Whatever the model raises on a component's batch (with a note naming
        the component and the loss form).

    Every check above runs in the constructor, before anything is written
    (it evaluates the first component twice, under the model guard).

    Notes
    -----
    Costs. A probe: the engine's, over all m components (about 2 epochs of
    forward+backward over them; ``keep``: about 1). Between probes:
    :meth:`gradient` reads the gradient once more (two dot products per
    parameter tensor -- with an Adam/AdamW one dot product and one
    matrix-vector product with the rows ∇f_k and u_k -- and one device
    synchronisation) and re-reads the model's trainable parameters
    (``model.parameters()``: a few µs per tensor on a CPU; about 0.3 ms for 200
    tensors); measured overhead in ``docs/benchmarks.md``. Memory: ∇f_k of the
    last probe in the gradients' dtype (with an Adam/AdamW also u_k), plus x_k
    and ∇f_k in float64 with ``smoothness_every`` not None.

    The trainable parameters are re-read at every probe and every
    :meth:`gradient`: when the set changes (a re-created layer, a freeze or
    unfreeze, an appended module) the statistics follow the new set, and what
    depended on the old one -- the secant ``traj_smoothness`` to the next probe,
    the step cosines until it -- is NaN, with a note in the log.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[..., torch.Tensor],
        components: Any,
        *,
        eta: float | str,
        every: int,
        etas: Sequence[float] = (),
        route: str = "auto",
        dropout: str = "off",
        run_dir: str | Path | None = None,
        seed: int = 0,
        smoothness_every: int | None = 0,
        heldout: Callable[[nn.Module], float] | None = None,
        units: Sequence[Unit] = (),
        log: Callable[[str], None] | None = None,
        progress: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        rho_target: float = 0.9,
        eta_min: float | None = None,
        eta_max: float | None = None,
        per_sample: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
        model = _dist.unwrap(model)  # DistributedDataParallel: probed through its module
        eta = check_setting("eta", eta)
        self._rule: DescentSafe | None = None
        if eta == "autoclip":
            raise ConfigError(
                "config: bad value for 'eta': 'autoclip' (the Monitor sets η at its probes: "
                "eta = 'descent-safe'; AutoClip's η is one line of your loop, "
                "numpy.percentile of the norms clip_grad_norm_ returned)"
            )
        if eta == "descent-safe":
            self._rule = DescentSafe(rho_target, eta_min, eta_max)
        else:
            for key, value, default in (
                ("rho_target", rho_target, 0.9), ("eta_min", eta_min, None),
                ("eta_max", eta_max, None),
            ):  # fmt: skip
                if value != default:
                    raise ConfigError(
                        f"config: bad value for '{key}': {value!r} (read only with "
                        "eta = 'descent-safe')"
                    )
        self._eta = math.nan if self._rule is not None else float(eta)
        self.etas = check_setting("etas", tuple(etas))
        self.every = _int_at_least("every", every, 1)
        if not isinstance(per_sample, bool):
            raise ConfigError(f"per_sample must be True or False, got {per_sample!r}")
        self.per_sample = per_sample
        self.route = check_route(route, per_sample)
        self.dropout = check_setting("dropout", dropout)
        self.seed = check_setting("seed", seed)
        if smoothness_every is not None:
            smoothness_every = _int_at_least("smoothness_every", smoothness_every, 0)
        if per_sample:
            check_per_sample_settings(
                "descent-safe" if self._rule is not None else self._eta, smoothness_every,
                loop="your loop's (the Trainer's)", secants=True,
            )  # fmt: skip
        for unit in units:
            if not isinstance(unit, Unit):
                raise TypeError(f"units must be clipscope.loop.Unit objects, got {unit!r}")
        needed = ("batch", "sizes", "batch_size", "describe", "__len__")
        if any(not hasattr(components, name) for name in needed):
            raise TypeError(
                "components must be clipscope.Components or SequentialComponents, got "
                f"{type(components).__name__}"
            )
        self.model, self.loss, self.components = model, loss, components
        self.loss_form = check_loss_form(loss, components, self.route, per_sample)
        self.params = trainable_params(model)
        self._signature = _signature(self.params)
        check_batch_coupling(model, components)
        self.log = (log or _quiet) if _dist.is_writer() else _quiet
        self.directory: RunDirectory | None = None
        if run_dir is not None:
            self.directory = RunDirectory(run_dir)
            if self.directory.path.exists() and not self.directory.path.is_dir():
                raise FileExistsError(f"run_dir {self.directory.path} is a file, not a directory")
        self._preflight()
        if per_sample:
            check_per_sample(model, loss, components, self.params, self.seed)
        # every probe differentiates with torch.autograd.grad: refuse now, not in the user's loop
        check_grad_compatible(
            model, loss, components, form=self.loss_form, dropout=self.dropout, seed=self.seed,
            device=self.params[0].device,
        )  # fmt: skip
        rule = [] if self._rule is None else [self._rule]  # decides before η is read
        standard: list[Unit] = [*rule, ProbeStatistics(self._rule or self._eta, self.etas, every=1)]
        if heldout is not None:
            standard.append(HeldOutMetric(heldout))
        if smoothness_every is not None:
            every_k, hessian = max(smoothness_every, 1), smoothness_every > 0
            standard.append(Smoothness(every=every_k, hessian=hessian))
        self._step_gradient = StepGradient()
        standard += [StepStatistics(), self._step_gradient, *units]
        if self.directory is not None:
            standard.append(Records(self.directory))
        self._units = Units(
            standard, route=self.route, dropout=self.dropout, seed=self.seed,
            progress=progress and _dist.is_writer(), batch_sizes=[1] if per_sample else None,
        )  # fmt: skip
        d = components.describe()
        group = _dist.ranks()
        run_id = uuid.uuid4().hex if group is None else group.broadcast(uuid.uuid4().hex)
        self.setting: dict[str, Any] = {
            "kind": "monitor",
            "run_id": run_id,
            "method": "external",  # the user's loop: no theorem of the paper is checked
            "eta": self._eta if self._rule is None else "descent-safe",
            **(
                {}
                if self._rule is None
                else {
                    "rho_target": self._rule.target,
                    "eta_min": self._rule.eta_min,
                    "eta_max": self._rule.eta_max,
                }
            ),
            "etas": list(self.etas),
            "every": self.every,
            "route": self.route,
            "dropout": self.dropout,
            "seed": self.seed,
            "loss_form": self.loss_form,
            "secants": smoothness_every is not None,
            "smoothness_every": smoothness_every or 0,
            # per-sample: every kept sample is a component (m = N, batch size 1)
            "batch_size": 1 if per_sample else int(components.batch_size),
            "m": int(sum(components.sizes)) if per_sample else len(components),
            "n_samples": int(d.get("N", sum(components.sizes))),
            "data_seed": d.get("seed"),
            "last_batch": d.get("last_batch"),
            "optimizer": None,
        }
        if per_sample:  # only then: a state saved before these keys existed still matches
            self.setting["per_sample"] = True
            self.setting["chunk_size"] = int(components.batch_size)
        self.optimizer: Any = None
        self.use_optimizer(optimizer)
        self.rows: list[dict[str, float]] = []
        self.resumed = False
        self._k = 0
        self._last_step: int | None = None
        self._open: int | None = None  # k of the point whose interval is running
        self._interval_steps = 0
        self._updates = 0  # updates reported since the last step() call
        self._pending: Step | None = None
        self._pending_mark: tuple = ()
        self._started = False
        self._closed = False
        self._final = False  # close(probe=True) is probing the final parameters
        self._elapsed = 0.0
        self._t0 = time.perf_counter()
        self.last_probe: ProbeResult | None = None

    @property
    def eta(self) -> float:
        """The clipping threshold η in force: the one given, or descent-safe's (opt-in).

        With ``eta="descent-safe"`` it is set at every probe from the exact
        η-profile (:class:`~clipscope.loop.thresholds.DescentSafe`: the smallest η
        keeping ``ρ ≥ rho_target`` from there on, ρ_P with an Adam/AdamW
        ``optimizer``, clamped into ``[eta_min, eta_max]``) and fixed until the
        next probe; before the first probe it is ``eta_max`` (``inf``). Pass it to
        your clip: ``torch.nn.utils.clip_grad_norm_(model.parameters(), monitor.eta)``.
        """
        return self._eta if self._rule is None else self._rule.eta

    @property
    def sets_eta(self) -> bool:
        """Whether the Monitor sets the loop's η (``eta="descent-safe"``)."""
        return self._rule is not None

    @property
    def preconditioner(self) -> torch.optim.Optimizer | None:
        """The optimizer whose state the probes read P from (an Adam or AdamW), else None."""
        return self.optimizer if is_adam(_unwrap_optimizer(self.optimizer)) else None

    def use_optimizer(self, optimizer: Any) -> None:
        """Set the loop's optimizer (before the first :meth:`step`; the callbacks call it).

        Another optimizer of the same class may replace the first one at any time
        (a Lightning ``Trainer.fit`` creates its optimizers anew on each call).

        Raises
        ------
        TypeError
            Not a ``torch.optim.Optimizer`` (nor a wrapper holding one in ``.optimizer``).
        ConfigError
            An optimizer of another class than the one the Monitor started (or its
            loaded state was saved) with: the records would mix two kinds of step.
        """
        if optimizer is None or optimizer is self.optimizer:
            return
        inner = _unwrap_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        name, saved = type(inner).__name__, self.setting.get("optimizer")
        started = getattr(self, "_started", False) or getattr(self, "resumed", False)
        if started and saved != name:
            raise ConfigError(
                f"the Monitor's records were made with optimizer {saved}, this loop's is {name}"
            )
        self.optimizer = optimizer
        self.setting["optimizer"] = name

    # -- checks ---------------------------------------------------------------
    def _preflight(self) -> None:
        """Evaluate component 0 twice under the guard; refuse what the probes would trip on.

        The model must take the batch, f_0 be one finite scalar, and the same both
        times (:func:`~clipscope.engine.losses.check_repeatable`: else the model
        draws random numbers the dropout policy cannot fix).
        """
        a, _ = check_repeatable(
            self.model, self.loss, self.components, form=self.loss_form,
            dropout=self.dropout, seed=self.seed, device=self.params[0].device,
        )  # fmt: skip
        if not math.isfinite(a):
            raise NonFiniteError(f"component 0's loss is {a} at the current parameters")

    def check_model(self) -> None:
        """Run the constructor's checks of the model again, in the mode it is in now.

        For a loop that changes the model after the Monitor was built (a
        Hugging Face ``Trainer`` puts it in train mode: its callback calls this
        at ``on_train_begin``): train-mode BatchNorm against the components'
        batch size, component 0 evaluated twice under the dropout policy
        (finite and the same both times), with ``per_sample`` the samples'
        independence, and the ``torch.autograd.grad`` compatibility. Nothing is
        written; the RNG stream, the gradients and the Monitor's state are as
        before.

        Raises
        ------
        ConfigError, ValueError, NonFiniteError
            As the constructor (its "Raises"): e.g. ``ValueError`` when the model
            now draws random numbers the dropout policy cannot fix.
        """
        check_batch_coupling(self.model, self.components)
        self._preflight()
        if self.per_sample:
            check_per_sample(self.model, self.loss, self.components, self.params, self.seed)
        check_grad_compatible(
            self.model, self.loss, self.components, form=self.loss_form, dropout=self.dropout,
            seed=self.seed, device=self.params[0].device,
        )  # fmt: skip

    # -- the clock ------------------------------------------------------------
    def step(self, step: int, *, lr: float | None = None) -> dict[str, float] | None:
        """Tell the Monitor the parameters are x_step (``step`` updates applied); probe when due.

        Call it once per training step: at the top of the step, or after the
        forward/backward and before ``optimizer.step()`` (the probe leaves
        ``.grad`` as it found it), or after ``optimizer.step()`` with the new
        count. Calling it again with the same ``step`` does nothing (gradient
        accumulation: one optimizer step, several batches). When ``step %
        every == 0`` it probes, appends a row to :attr:`rows` and writes it to
        ``run_dir``.

        Parameters
        ----------
        step : int
            Optimizer updates applied so far (>= 0), never decreasing.
        lr : float, optional
            The step size now, for the row's ``lr`` column.

        Returns
        -------
        dict or None
            The new row (column -> float) when a probe ran.

        Raises
        ------
        ValueError
            ``step`` is smaller than the previous one, or the dataset behind the
            components changed its length.
        NonFiniteError
            The probe met a NaN/inf gradient (nothing was recorded).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (updates applied so far), got {step!r}")
        if self._closed:
            raise RuntimeError("the Monitor is closed")
        last = self._last_step
        if last is not None and step < last:
            raise ValueError(
                f"step {step} comes after step {last}: steps never decrease (a resumed loop "
                "loads the Monitor state saved with its own checkpoint)"
            )
        if last is not None and step == last and not self._final:
            return None
        due = step % self.every == 0 or self._final  # close(probe=True) probes whatever every says
        if due:  # checked before the directory is opened or anything written
            check = getattr(self.components, "check_unchanged", None)
            if check is not None:
                check()
        self._start()
        self._flush()
        self._last_step, self._updates = step, 0
        if not due:
            return None
        self._end_interval()
        self._refresh_params(f"the probe at step {step}")
        point = self._point(self._k, step)
        fields = {
            "epoch": self._k,
            "step": step,
            "lr": math.nan if lr is None else float(lr),
            "wall_time": self._wall_time(),
        }
        self._units.visit(point, fields)
        self._k += 1
        # the units keep what they need of ∇f_k; the result itself need not (8 bytes a parameter)
        self.last_probe = None if point.probe is None else replace(point.probe, full_grad=None)
        if point.row is not None:
            self._open = point.epoch
            self._say(point.row)
        return point.row

    def gradient(
        self,
        grad_norm: float | torch.Tensor | None = None,
        *,
        loss: float | torch.Tensor | None = None,
        clipped: bool | None = None,
    ) -> None:
        """Record the update about to be applied, from the gradient in the parameters' ``.grad``.

        Call it once per optimizer update, after ``backward()`` and before
        ``optimizer.step()``. Before your loop clips, nothing more is needed.
        After it clipped, pass the norm before clipping as ``grad_norm``
        (``torch.nn.utils.clip_grad_norm_`` returns it): the norm of a clipped
        gradient is not the step gradient's; the cosine is unchanged by a norm
        clip. ``clipped`` says whether the step was clipped at η when
        ``grad_norm`` is NaN (not known); otherwise it is ``grad_norm > η``.

        Records (:class:`~clipscope.loop.measures.StepGradient`,
        :class:`~clipscope.loop.measures.StepStatistics`): the norm, whether it
        exceeds η, the cosine with the last probe's ∇f, the ``loss`` if given.
        Updates before the first probe are not recorded (no ∇f yet). Costs one
        pass over the gradient and ∇f_k and one device synchronisation.

        Raises
        ------
        ValueError
            No trainable parameter has a ``.grad`` (call it after ``backward()``).
        """
        if self._closed:
            raise RuntimeError("the Monitor is closed")
        if self._open is None:
            return
        self._refresh_params(f"update {(self._last_step or 0) + self._updates + 1}")
        if all(p.grad is None for p in self.params):
            raise ValueError(
                "no trainable parameter has a .grad: call Monitor.gradient() after backward() "
                "and before optimizer.zero_grad()"
            )
        mark = self._mark()
        if self._pending is not None and self._unchanged(mark):
            warnings.warn(
                "Monitor.gradient() was called again before the parameters changed: each call "
                "records one optimizer update. With gradient accumulation call it once, after "
                "the last micro-batch's backward()",
                RepeatedGradientWarning,
                stacklevel=2,
            )
        self._flush()  # a second update before the next step() call
        self._pending_mark = mark
        products = None
        if grad_norm is None:  # one pass gives the norm and the cosines' dot products
            sg = self._step_gradient
            products = gradient_products(self.params, sg.full, stacked=sg.stacked)
            norm = math.sqrt(products[0])
        else:
            norm = _scalar(grad_norm, "grad_norm")
        self._updates += 1
        step = Step(
            (self._last_step or 0) + self._updates, -1, self.eta, norm,
            math.nan if loss is None else _scalar(loss, "loss"), self.params,
            log=self.log, loop=self, clipped=clipped,
            products=products if self._step_gradient.full is not None else None,
        )  # fmt: skip
        if self._units.step_gradient:
            self._units.before_update(step)
        self._pending = step

    def _refresh_params(self, when: str) -> None:
        """Re-read the model's trainable parameters; restart what depends on a changed set.

        A re-created layer, a freeze, an unfreeze or an appended module makes
        another set: the Monitor reads the gradient of the new one from now on
        (never a ``.grad`` of a parameter no longer trained), and every unit
        drops what it kept of the old one (:meth:`Unit.parameters_changed`: the
        secant to the next probe, the step cosines until it), with a note in the log.
        """
        current = trainable_params(self.model)
        signature = _signature(current)
        if signature == self._signature:
            return
        self._signature = signature
        old = {id(p) for p in self.params}
        now = {id(p) for p in current}
        names = dict((id(p), n) for n, p in self.model.named_parameters(remove_duplicate=False))
        added = [names.get(id(p), "?") for p in current if id(p) not in old]
        gone = len(old - now)
        self.params = current
        self._pending_mark = ()
        self._units.parameters_changed(current)
        self.log(
            f"note: the model's trainable parameters changed before {when} ("
            + (f"{len(added)} new: {', '.join(added[:4])}" if added else "none new")
            + f"; {gone} no longer trained"
            + ("" if added or gone else "; shapes changed")
            + "): the step statistics read the new set from now on; the secant "
            "(traj_smoothness) to the next probe and the step cosines until it are not measured"
        )

    def _mark(self) -> tuple[tuple[int, ...], list[torch.Tensor]]:
        """Return what tells whether an optimizer step ran since the last call.

        The parameters' in-place update counters (most optimizers advance them;
        fused ones do not) and a copy of each parameter's first entry.
        """
        with torch.no_grad():
            firsts = [p.detach().reshape(-1)[:1].clone() for p in self.params]
        return tuple(p._version for p in self.params), firsts

    def _unchanged(self, mark: tuple[tuple[int, ...], list[torch.Tensor]]) -> bool:
        old = self._pending_mark
        return (
            bool(old)
            and old[0] == mark[0]
            and all(torch.equal(a, b) for a, b in zip(old[1], mark[1], strict=True))
        )

    def _amend_pending(self, number: int, grad_norm: float) -> bool:
        """Give the recorded, not yet applied update ``number`` its norm (integrations)."""
        step = self._pending
        if step is None or step.number != number:
            return False
        step.grad_norm, step.clipped = float(grad_norm), None
        return True

    def close(
        self, status: str = "completed", message: str | None = None, *, probe: bool = False
    ) -> None:
        """End the last interval and finish the run directory (``summary.json``); idempotent.

        With ``probe=True`` the final parameters are probed first, whatever ``every``
        says: at step ``s + u`` (``s`` the last :meth:`step`, ``u`` the updates
        reported with :meth:`gradient` since), unless a probe already ran there.
        Inside ``with Monitor(...)``, call ``monitor.close(probe=True)`` as the
        block's last statement (the exit then finds it closed).
        """
        if self._closed:
            return
        if probe:
            final = 0 if self._last_step is None else self._last_step + self._updates
            if not any(int(row["step"]) == final for row in self.rows):
                self._final = True
                try:
                    self.step(final)
                finally:
                    self._final = False
        self._closed = True
        if not self._started:
            return
        self._end_interval()
        rows = self.rows
        last_row = {k: v for k, v in rows[-1].items() if not k.startswith("_")} if rows else None
        summary = {
            "status": status,
            "epoch": self._k,
            "step": self._last_step,
            "rows": len(rows),
            "last_row": last_row,
            "counts": None,
            "message": message,
        }
        end = Finish(status, summary, self.model, self.params, log=self.log, loop=self)
        self._units.finish(end)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if issubclass(exc_type, NonFiniteError):
            status = "nonfinite"
        elif issubclass(exc_type, (KeyboardInterrupt, Interrupted)):
            status = "interrupted"
        else:
            status = "failed"
        self.close(status, f"{exc_type.__name__}: {exc}")

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return what resumes the Monitor: keep it in your checkpoint (plain values and tensors).

        Holds the rows, the clock (points, last step, the open interval, an
        update recorded but not yet applied) and every unit's state (∇f_k of the
        last probe; x_k and ∇f_k in float64 for the secants) and the shapes of
        the trainable parameters (a state loaded into a model with other ones
        restarts what depends on them, with a note). Loadable with
        ``torch.load(weights_only=True)``.
        """
        pending = self._pending
        return {
            "format": STATE_FORMAT,
            "setting": dict(self.setting),
            "points": self._k,
            "last_step": self._last_step,
            "open": self._open,
            "interval_steps": self._interval_steps,
            "updates": self._updates,
            "pending": None
            if pending is None
            else {
                "number": pending.number,
                "grad_norm": float(pending.grad_norm),
                "loss": float(pending.loss),
                "clipped": pending.clipped,
            },
            "rows": [{k: float(v) for k, v in row.items()} for row in self.rows],
            "units": self._units.state_dict(),
            "param_shapes": [list(p.shape) for p in self.params],
            "wall_time": self._wall_time(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (before the first :meth:`step`).

        The next :meth:`step` reopens ``run_dir`` (which must be this run's, or
        new), rewrites ``epochs.csv`` from the restored rows and removes the
        component files of points recorded after the state was saved.

        Raises
        ------
        RuntimeError
            The Monitor has already started.
        ConfigError
            The state was saved with other settings (each difference listed) or
            is not a Monitor state.
        """
        if self._started:
            raise RuntimeError("load_state_dict() must come before the first step()")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError("not a clipscope Monitor state (format missing or unknown)")
        stored = dict(state["setting"])
        keys = (set(stored) | set(self.setting)) - {"run_id"}
        if self.optimizer is None:  # a callback hands it over later (use_optimizer checks it)
            keys -= {"optimizer"}
        diff = setting_diff(stored, self.setting, keys)
        if diff:
            raise ConfigError(
                "the Monitor state was saved with other settings:\n  " + "\n  ".join(diff)
            )
        self.setting["run_id"] = stored["run_id"]
        self.setting["optimizer"] = stored.get("optimizer", self.setting["optimizer"])
        self._k = int(state["points"])
        self._last_step = state["last_step"]
        self._open = state["open"]
        self._interval_steps = int(state["interval_steps"])
        self._updates = int(state["updates"])
        self.rows[:] = [_counts_as_int(row) for row in state["rows"]]
        self._units.load_state_dict(state["units"])
        saved = state.get("param_shapes")
        if saved is not None and saved != [list(p.shape) for p in self.params]:
            self._units.parameters_changed(self.params)  # their kept vectors are another set's
            self.log(
                "note: the Monitor state was saved with other trainable parameters "
                f"({len(saved)} tensors, now {len(self.params)}): the secant to the next probe "
                "and the step cosines until it are not measured"
            )
        pending = state.get("pending")
        self._pending = None
        if pending is not None:
            self._pending = Step(
                pending["number"], -1, self.eta, pending["grad_norm"], pending["loss"],
                self.params, log=self.log, loop=self, clipped=pending["clipped"],
            )  # fmt: skip
        self._elapsed = float(state.get("wall_time", 0.0))
        self._t0 = time.perf_counter()
        self.resumed = True

    # -- internals ------------------------------------------------------------
    @property
    def run_dir(self) -> Path | None:
        """The run directory's path, or None."""
        return None if self.directory is None else self.directory.path

    def _wall_time(self) -> float:
        return self._elapsed + time.perf_counter() - self._t0

    def _point(self, k: int, step: int) -> Point:
        return Point(
            self.model, self.loss, self.components, self.params, k, step, False, self.rows,
            self.dropout, self.seed, log=self.log, loop=self,
        )  # fmt: skip

    def _start(self) -> None:
        if self._started:
            return
        try:
            self._units.start(self)
        except BaseException:
            # Refused (e.g. run_dir holds another run): nothing of this run was
            # written, so close() and __exit__ must not write either.
            self._closed = True
            raise
        self._started = True
        if self._open is not None:  # resumed inside an interval: who needs its steps
            row = next(r for r in reversed(self.rows) if r.get("epoch") == self._open)
            self._units.plan(self._point(self._open, int(row["step"])))

    def _flush(self) -> None:
        """Run every unit's ``after_update`` for the recorded update, now applied."""
        if self._pending is not None:
            step, self._pending = self._pending, None
            self._units.after_update(step)
            self._interval_steps += 1

    def _end_interval(self) -> None:
        self._flush()
        if self._open is None:
            return
        k, self._open = self._open, None
        row = next((r for r in reversed(self.rows) if r.get("epoch") == k), None)
        steps, self._interval_steps = self._interval_steps, 0
        self._units.at_interval_end(IntervalEnd(k, steps, row, log=self.log, loop=self))

    def _say(self, row: dict[str, float]) -> None:
        extra = f"  ρ_P(η)={row['rho_p']:.4g}" if "rho_p" in row else ""
        if self._rule is not None:
            extra += f"  η={self.eta:.4g} (descent-safe)"
        self.log(
            f"probe {int(row['epoch'])} at step {int(row['step'])}: f={row['loss']:.6g}  "
            f"‖∇f‖={row['grad_norm']:.4g}  c1={row['c1']:.3g}  ρ(η)={row['rho']:.4g}{extra}  "
            f"clipped components={row['clipped_fraction']:.2f}"
        )

    def __repr__(self) -> str:
        return (
            f"Monitor(eta={self.eta:g}, every={self.every}, m={self.setting['m']}, "
            f"probes={len(self.rows)}, run_dir={self.run_dir})"
        )
