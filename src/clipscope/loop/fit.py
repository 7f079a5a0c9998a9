r"""``fit``: train with a clipped incremental method, driving the measurement units.

:func:`fit_loop` is the loop on one page; :func:`fit` is its keyword form.
Epoch ``k`` starts at the point ``x_k``: the units visit it (the engine's probe
runs once if one of them needs it), then the m steps of the epoch run in the
method's order (:mod:`clipscope.methods`), then the units close the epoch.
``epochs = E`` gives points ``x_0 … x_E`` (``E = 0``: only the diagnostics at
``x_0``). What is measured, and how, is the units' business
(:mod:`clipscope.loop.measures`, :mod:`clipscope.loop.duties`); the loop never
asks which unit is which.

Sequential (language-model) components: under ``"igc"`` the recurrent state
flows from step to step, detached (truncated BPTT), and restarts from zeros at
each epoch; under the other orders consecutive steps are not neighbouring
windows, so the state restarts from zeros at every step. The model trains in
the mode the caller left it in (``fit`` never calls ``model.train()``).

``per_sample = True`` (:class:`~clipscope.config.FitConfig`) changes the
measurements only: every probe (the epoch-start probes at ``probe_every`` and
the final point) makes every **sample** of the components a component of its
own, on the engine's per-sample route (:func:`clipscope.probe` with
``batch_sizes=[1]``): m = N, sizes 1, f = (1/N) Σ_j ℓ_j with ℓ_j =
``loss_fn(model(x_j), y_j)`` sample j's own mean loss, and ρ(η), c1, ... describe
clipping each sample's gradient at η. The training loop is unchanged: it
still steps on the loop's components in the method's order with the clip it
was given (the same trajectory, bitwise, as without ``per_sample``); ``igc_drift``
(39), a statement about the loop's own components, is not recorded. Refused
before anything is written, as by ``Monitor(..., per_sample=True)``
(:func:`check_loss_form`, :func:`check_per_sample`,
:func:`~clipscope.config.check_per_sample_settings`): a ``loss(model, batch)``,
sequential components, train-mode BatchNorm, samples that interact in the
forward, ``eta = "descent-safe"``, ``smoothness_every >= 1``, a route that is
not a per-sample route.

Under an initialised ``torch.distributed`` process group (``torchrun``) every
rank runs the same loop on the same config, data and model (checked: an
all-gathered fingerprint): each step splits the component's batch over the
ranks and clips the all-reduced gradient
(:class:`~clipscope.engine.distributed.StepReducer`), the probes split the
components, signals are acted on by all ranks at the same step, and rank 0
alone writes the run directory (``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from clipscope.config import FitConfig, resume_setting
from clipscope.engine import batch_coupled_modules, trainable_params
from clipscope.engine import distributed as _dist
from clipscope.engine.losses import (
    check_loss_fn,
    loss_form,
    mean_loss,
    weighted_component_loss,
)
from clipscope.errors import ConfigError, Interrupted, NonFiniteError
from clipscope.loop.duties import NTASGD, Checkpointing, OnStep, _toml_text
from clipscope.loop.measures import (
    HeldOutMetric,
    IGCDrift,
    ProbeStatistics,
    Smoothness,
    StepStatistics,
)
from clipscope.loop.state import History, LoopState, upgrade_checkpoint
from clipscope.loop.thresholds import ThresholdRule, make_rule
from clipscope.loop.units import Finish, IntervalEnd, Point, Step, Unit, Units
from clipscope.methods import (
    clipped_step,
    describe_optimizer,
    make_optimizer,
    make_order,
    make_schedule,
)
from clipscope.run.directory import CHECKPOINT_FORMAT, RunDirectory

__all__ = [
    "Loop",
    "check_batch_coupling",
    "check_loss_form",
    "check_per_sample",
    "fit",
    "fit_loop",
    "standard_units",
]


def _quiet(text: str) -> None:
    pass


def check_batch_coupling(model: nn.Module, components: Any) -> None:
    """Refuse a size-1 component under train-mode BatchNorm (edge case 9), before any step.

    Its batch statistics would be those of one sample (torch fails mid-run, or
    the variance is 0). Raises :class:`~clipscope.errors.ConfigError`: use
    batches of at least 2, ``last_batch = "drop"``, or a model without
    batch-coupled layers (eval-mode BatchNorm, GroupNorm).
    """
    coupled = batch_coupled_modules(model)
    sizes = [] if getattr(components, "sequential", False) else components.sizes
    small = [i for i, size in enumerate(sizes) if size < 2]
    if coupled and small:
        raise ConfigError(
            f"component(s) {small[:5]} hold a single sample, but {coupled[:3]} normalize "
            'with batch statistics in train mode; use batch_size >= 2, last_batch = "drop" '
            "for a size-1 last batch, or a model without train-mode BatchNorm"
        )


def check_loss_form(
    loss_fn: Any, components: Any, route: str = "auto", per_sample: bool = False
) -> str:
    """Return the loss form (:func:`~clipscope.engine.losses.check_loss_fn`) the probes will use.

    With ``per_sample`` the form the per-sample route needs: ``loss(output,
    target)`` on ``(x, y)`` batches; a ``loss(model, batch)`` is refused with
    the Hugging Face way out named
    (:class:`~clipscope.loop.integrations.hf.PerSampleLM`).

    Raises
    ------
    TypeError, ValueError
        As :func:`~clipscope.engine.losses.check_loss_fn`.
    """
    try:
        return check_loss_fn(loss_fn, components, route, [1] if per_sample else None)
    except ValueError as exc:
        if per_sample and loss_form(loss_fn) == "model_batch":
            raise ValueError(
                f"{exc}. A Hugging Face causal LM: use "
                "clipscope.loop.integrations.hf.PerSampleLM(model), with its loss and "
                "components (docs/integrations.md, 'Per-sample components')"
            ) from None
        raise


def check_per_sample(
    model: nn.Module, loss_fn: Any, components: Any, params: Sequence[torch.Tensor], seed: int
) -> None:
    """Refuse, before anything runs, what the per-sample route would refuse at every probe.

    The one check of per-sample components (``per_sample=True``) for
    :func:`fit_loop` and :class:`~clipscope.loop.monitor.Monitor`: sequential
    components and train-mode BatchNorm (``ConfigError``); samples that
    interact in the forward (``ValueError``, from
    :func:`~clipscope.engine.per_sample.batch.check_independent_samples` on the
    first rows of component 0, as the probe checks them).
    """
    # imported here: a loop of mini-batch components does not load the per-sample machinery
    from clipscope.engine.per_sample.batch import check_independent_samples
    from clipscope.engine.probe import REPEAT_ROWS, SEQUENTIAL_NOT_SAMPLES
    from clipscope.engine.verify import tolerance

    if getattr(components, "sequential", False):
        raise ConfigError(f"per_sample=True needs independent samples; {SEQUENTIAL_NOT_SAMPLES}")
    coupled = batch_coupled_modules(model)
    if coupled:
        raise ConfigError(
            f"per_sample=True: module(s) {coupled[:3]} normalize with batch statistics "
            "(train-mode BatchNorm couples the samples of a batch); use mini-batch components "
            "or put BatchNorm in eval mode"
        )
    x, y = components.batch(0, params[0].device)
    tol = tolerance(params[0].dtype)
    rows = slice(0, REPEAT_ROWS)
    check_independent_samples(model, mean_loss(loss_fn), x[rows], y[rows], tol, seed)


def standard_units(
    config: FitConfig,
    *,
    heldout: Callable[[nn.Module], float] | None = None,
    directory: RunDirectory | None = None,
    resume: bool = False,
    force: bool = False,
    extra: Sequence[Unit] = (),
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[Unit]:
    """Return the units :func:`fit_loop` drives for ``config``, in order (persisting last).

    A threshold rule (``eta = "descent-safe"`` or ``"autoclip"``,
    :func:`clipscope.loop.thresholds.make_rule`) comes first: the units that
    read η at a point read the rule's η in force.
    """
    rule = make_rule(config)
    eta = config.eta if rule is None else rule
    units: list[Unit] = [] if rule is None else [rule]
    units.append(ProbeStatistics(eta, config.etas, config.probe_every))
    if heldout is not None:
        units.append(HeldOutMetric(heldout))
    if config.smoothness_every:
        units.append(
            Smoothness(
                config.smoothness_every,
                config.smoothness_components,
                config.smoothness_tol,
                config.smoothness_max_iter,
            )
        )
    if config.optimizer_switch == "nt-asgd":
        units.append(NTASGD(heldout, config.nonmono))
    if config.method == "igc" and not config.per_sample:  # (39) is over the loop's components
        units.append(IGCDrift(eta))
    units += [StepStatistics(), *extra]
    if on_step is not None:
        units.append(OnStep(on_step))
    if directory is not None:
        every, keep = config.checkpoint_every, config.keep_checkpoints
        units.append(Checkpointing(directory, every=every, keep=keep, resume=resume, force=force))
    return units


class Loop:
    """What a checkpoint holds: model, optimizer, schedule, order, RNG, position, units.

    ``state_dict()`` is the checkpoint payload (:data:`clipscope.loop.state.CHECKPOINT_KEYS`);
    ``load_state_dict()`` restores one (also one written before the units existed).
    """

    def __init__(
        self, model, loss_fn, components, config, optimizer, units, setting, log, reducer=None
    ):
        self.model, self.loss_fn, self.components, self.config = model, loss_fn, components, config
        self.reducer = reducer  # a StepReducer under torch.distributed, else None
        self.params = trainable_params(model)
        self.loss_form = check_loss_fn(loss_fn, components)
        self.optimizer, self.units, self.setting, self.log = optimizer, units, setting, log
        self.order = make_order(config.method, len(components), config.seed)
        self.scheduler = make_schedule(
            optimizer,
            config.schedule,
            epochs=config.epochs,
            milestones=config.milestones,
            gamma=config.schedule_gamma,
        )
        self.state = LoopState()
        #: the unit that sets η (``eta = "descent-safe"`` / ``"autoclip"``), else None
        self.rule = next((u for u in units if isinstance(u, ThresholdRule)), None)

    @property
    def lr(self) -> float:
        """α of the first parameter group now."""
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def preconditioner(self) -> torch.optim.Optimizer | None:
        """The optimizer whose state is the step's preconditioner P (Adam, AdamW), else None.

        Every probe reads P = diag(√v̂) + ε, bias-corrected, from this optimizer's
        state (never changed) and records ρ_P beside ρ (:class:`ProbeStatistics`).
        """
        return self.optimizer if isinstance(self.optimizer, torch.optim.Adam) else None

    def state_dict(self) -> dict[str, Any]:
        """Return the checkpoint payload (under torch.distributed: called by every rank)."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "setting": self.setting,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "order": self.order.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "loop": self.state.state_dict(),
            "units": self.units.state_dict(),
        }
        if self.reducer is not None:  # each rank carries the recurrent state of its columns
            group = self.reducer.ranks
            states = group.objects(self.state.rnn_state)
            payload["ranks"] = {"world": group.world, "rnn_states": states}
        return payload

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint payload."""
        payload = upgrade_checkpoint(payload)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        self.order.load_state_dict(payload["order"])
        torch.random.set_rng_state(payload["torch_rng"])
        if payload.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        self.state.load_state_dict(payload["loop"])
        self.units.load_state_dict(payload["units"])
        saved = payload.get("ranks") or {"world": 1, "rnn_states": [self.state.rnn_state]}
        world = 1 if self.reducer is None else self.reducer.ranks.world
        if saved["world"] != world and any(s is not None for s in saved["rnn_states"]):
            raise ConfigError(
                f"this checkpoint was written by {saved['world']} process(es) in the middle of "
                "an epoch that carries a recurrent state per process; resume it with "
                f"{saved['world']} process(es) (now {world}), or from a checkpoint at an "
                "epoch boundary"
            )
        if saved["world"] == world:
            self.state.rnn_state = saved["rnn_states"][0 if world == 1 else self.reducer.ranks.rank]


def fit(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    method: str = "igc",
    *,
    heldout: Callable[[nn.Module], float] | None = None,
    run_dir: str | Path | RunDirectory | None = None,
    resume: bool = False,
    force: bool = False,
    optimizer: str | torch.optim.Optimizer | None = None,
    units: Sequence[Unit] = (),
    on_step: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
    **settings: Any,
) -> History:
    """Train ``model`` with a clipped incremental method; probe f at each epoch start.

    The keyword form of :func:`fit_loop`: ``method`` and ``settings`` become a
    :class:`~clipscope.config.FitConfig` (``lr`` is required; every other key
    and its default are listed there: ``eta`` (a number, or ``"descent-safe"``
    with ``rho_target``, ``eta_min``, ``eta_max``, or ``"autoclip"`` with
    ``autoclip_percentile``: :mod:`clipscope.loop.thresholds`), ``epochs``, ``seed``,
    ``probe_every``, ``etas``, ``momentum``, ``weight_decay``, ``schedule``,
    ``milestones``, ``schedule_gamma``, ``zhang_gamma``, ``dropout``,
    ``route``, ``per_sample`` (per-sample probes, the steps unchanged: the
    module docstring), ``checkpoint_every``, ``keep_checkpoints``, ``smoothness_every``
    and its options, ``optimizer_switch``, ``nonmono``, ``progress``).
    ``optimizer`` is either a setting (``"sgd"``, ``"adam"``, ``"adamw"``, with
    ``betas``, ``eps``, ``weight_decay``, and ``momentum`` for SGD) or an
    optimizer object of your own (see :func:`fit_loop`).

    >>> from clipscope.components import Components
    >>> X, Y = torch.randn(8, 2), torch.randn(8)
    >>> comps = Components.from_tensors(X, Y, batch_size=4)
    >>> model = torch.nn.Linear(2, 1)
    >>> loss = lambda out, y: ((out.squeeze(-1) - y) ** 2).mean()
    >>> h = fit(model, loss, comps, "igc", lr=0.1, eta=1.0, epochs=2, progress=False)
    >>> h.status, len(h.rows), h.steps
    ('completed', 3, 4)
    """
    if isinstance(optimizer, str):
        settings["optimizer"], optimizer = optimizer, None
    config = FitConfig(method=method, **settings)
    return fit_loop(
        model, loss_fn, components, config, heldout=heldout, run_dir=run_dir, resume=resume,
        force=force, optimizer=optimizer, units=units, on_step=on_step, log=log,
    )  # fmt: skip


def fit_loop(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    config: FitConfig,
    *,
    heldout: Callable[[nn.Module], float] | None = None,
    run_dir: str | Path | RunDirectory | None = None,
    resume: bool = False,
    force: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    units: Sequence[Unit] = (),
    on_step: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> History:
    """Train with ``config``'s method, driving the measurement units; return the :class:`History`.

    Parameters
    ----------
    model, loss_fn, components
        ``loss_fn(model(x), y)`` (or ``loss_fn(out, y)`` with ``out, state =
        model(x, state)`` for sequential components; or ``loss_fn(model, batch)``,
        :func:`clipscope.engine.losses.loss_form`) is the component's mean loss.
    config : FitConfig
        The settings (validated).
    heldout : callable, optional
        ``heldout(model) -> float``: the ``heldout`` column at each probe, and
        NT-ASGD's trigger (lower must be better there).
    run_dir : str, Path or RunDirectory, optional
        Persist rows, component arrays and checkpoints there
        (:class:`~clipscope.loop.duties.Checkpointing`).
    resume, force : bool
        Continue the run in ``run_dir`` from its newest loadable checkpoint;
        accept a changed setting (logged).
    optimizer : torch.optim.Optimizer, optional
        Any optimizer over the model's parameters; it steps on the clipped
        gradient. Default: the config's (:func:`clipscope.methods.make_optimizer`:
        ``optimizer``, ``lr``, ``momentum``, ``betas``, ``eps``,
        ``weight_decay``). The run records the given optimizer's class and first
        param group (:func:`clipscope.methods.describe_optimizer`) in place of the
        config's optimizer keys, which must then be left at their defaults or
        agree with it (``lr`` always).
    units : sequence of Unit
        More units, run after the standard ones (:func:`standard_units`).
    on_step : callable, optional
        ``on_step(step, i, norm)`` after each step (tests inject faults here).
    log : callable, optional
        ``log(text)`` for the run's messages.

    Raises
    ------
    ConfigError
        NT-ASGD without ``heldout``; a size-1 component under train-mode
        BatchNorm; an ``optimizer`` object whose settings contradict the
        config's; ``per_sample`` with sequential components or train-mode
        BatchNorm (nothing has run).
    TypeError, ValueError
        ``per_sample`` with a ``loss(model, batch)`` or with samples that
        interact in the forward (:func:`check_loss_form`,
        :func:`check_per_sample`; nothing has run).
    NonFiniteError
        A non-finite loss, gradient or step (the last good checkpoint is kept).
    Interrupted
        After SIGTERM/SIGINT (with ``run_dir``): checkpointed, then raised.
    RanksDisagree
        Under torch.distributed: the ranks were given different settings, data
        or models (:class:`~clipscope.engine.distributed.RanksDisagree`, a
        ValueError naming what differs; nothing has run).
    DistributedError
        A rank died or did not reach a collective within the timeout.
    """
    if config.optimizer_switch == "nt-asgd" and heldout is None:
        raise ConfigError("optimizer_switch='nt-asgd' needs a heldout metric to trigger on")
    model = _dist.unwrap(model)  # DistributedDataParallel: its module (our own all-reduce)
    check_batch_coupling(model, components)
    group, writer = _dist.ranks(), _dist.is_writer()
    say = (log or _quiet) if writer else _quiet
    directory = None
    if run_dir is not None:
        directory = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(run_dir)
        directory.log = log or directory.log
    m = len(components)
    setting = {**(config.setting() if directory is None or directory.setting is None
                  else directory.setting), "m": m}  # fmt: skip
    params = trainable_params(model)
    if config.per_sample:  # the probes' checks; the steps' loss is checked by Loop
        check_loss_form(loss_fn, components, config.route, per_sample=True)
        check_per_sample(model, loss_fn, components, params, config.seed)
    if optimizer is None:
        optimizer = make_optimizer(
            params, config.lr, config.momentum, config.weight_decay, optimizer=config.optimizer,
            betas=config.betas, eps=config.eps,
        )  # fmt: skip
    else:  # the user's: the record says what it is
        setting.update(_optimizer_setting(config, optimizer))
    reducer = None if group is None else _reducer(group, model, loss_fn, components, params,
                                                  optimizer, setting, config, say)  # fmt: skip
    if directory is not None and "config.toml" not in directory.files:  # fit() called directly
        # what `clipscope report` and `clipscope theory` label the run by (method, η, batch
        # size); the model, loss and data are the caller's, so nothing can rebuild them
        directory.files["config.toml"] = _toml_text(
            {"kind": "fit", **setting, "batch_size": int(components.batch_size)},
            "clipscope.fit: the loop's settings (the model, loss and data are the caller's)",
        )
    all_units = Units(
        standard_units(config, heldout=heldout, directory=directory, resume=resume, force=force,
                       extra=units, on_step=on_step),
        route=config.route, dropout=config.dropout, seed=config.seed,
        progress=config.progress and writer, batch_sizes=[1] if config.per_sample else None,
    )  # fmt: skip
    loop = Loop(model, loss_fn, components, config, optimizer, all_units, setting, say, reducer)
    st, order, epochs = loop.state, loop.order, config.epochs
    carry_state = config.method == "igc" and bool(getattr(components, "sequential", False))
    history = History(method=config.method)
    stop = _StopFlag(group)
    all_units.start(loop)
    bar = _progress(config.progress and writer, total=epochs, initial=st.epoch)
    t0 = time.perf_counter()

    def point(k: int) -> Point:
        return Point(
            model, loss_fn, components, params, k, st.step, k == epochs, st.rows,
            config.dropout, config.seed, log=say, loop=loop,
        )  # fmt: skip

    try:
        with stop.installed(directory is not None):
            if st.probed and st.epoch < epochs:  # resumed inside an epoch: who needs the steps
                all_units.plan(point(st.epoch))
            while True:
                k = st.epoch
                if not st.probed:
                    st.probed = True
                    here = point(k)
                    fields = {"epoch": k, "step": st.step, "lr": loop.lr,
                              "wall_time": time.perf_counter() - t0}  # fmt: skip
                    all_units.visit(here, fields)
                    if here.row is not None:
                        _summary_line(say, here.row)
                    stop.raise_if_set(st)  # a signal during a long probe: stop now
                if k >= epochs:
                    break
                if st.pos == 0:
                    st.indices = order.next_epoch()
                    st.rnn_state = None
                    if group is not None:  # one order on every rank (the same seeded generator)
                        group.check_same({"order": hashlib.sha256(repr(st.indices).encode())
                                          .hexdigest()[:16]})  # fmt: skip
                while st.pos < m:
                    step = _step(loop, st.indices[st.pos], carry_state, stop)
                    all_units.after_update(step)
                    stop.raise_if_set(st, synced=True)
                row = st.row(k)
                if loop.scheduler is not None:
                    loop.scheduler.step()
                st.next_epoch()
                bar.update(1)
                all_units.at_interval_end(IntervalEnd(k, m, row, log=say, loop=loop))
                stop.raise_if_set(st)
    except NonFiniteError as exc:
        where = st.indices[st.pos] if st.indices and st.pos < len(st.indices) else "?"
        message = (
            f"non-finite value at epoch {st.epoch}, step {st.step + 1} (component {where}): "
            f"{exc}; " + ("the last good checkpoint is kept" if directory else "training stopped")
        )
        _finish(all_units, loop, history, "nonfinite", message)
        raise NonFiniteError(message) from exc
    except Interrupted as exc:
        _finish(all_units, loop, history, "interrupted", str(exc))
        raise
    except KeyboardInterrupt:  # raised by the caller's code, not by the signal handler
        if group is None:  # (under torch.distributed: as below)
            _finish(all_units, loop, history, "interrupted", "KeyboardInterrupt")
        raise
    except Exception as exc:  # a unit's, a callback's or the model's error: the run failed
        # summary.json says so (nothing else is written: the last checkpoint stands). Not
        # under torch.distributed: a rank that died or hung leaves the others nothing to
        # agree on; the run directory then has no summary.json, which the report reads as
        # a run that did not finish
        if group is None:
            _finish(all_units, loop, history, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
    history.run_dir = None if directory is None else directory.path
    return _finish(all_units, loop, history, "completed", None)


#: The config keys an optimizer object of the user's replaces in the run's record.
_OPTIMIZER_KEYS = ("optimizer", "momentum", "betas", "eps", "weight_decay")


def _optimizer_setting(config: FitConfig, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Return the optimizer keys of the setting from the user's ``optimizer``; refuse clashes.

    A config key set away from its default (``lr`` always) must equal the
    optimizer's first param group's value: otherwise the record would describe
    another run. New keys at their defaults stay out of the setting
    (:func:`~clipscope.config.resume_setting`), as in :meth:`FitConfig.setting`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer must be 'sgd', 'adam', 'adamw' or a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    described = describe_optimizer(optimizer)
    defaults = FitConfig(lr=config.lr).to_dict()
    ours = config.to_dict()
    for key in ("lr", *_OPTIMIZER_KEYS):
        if key not in described or (key != "lr" and ours[key] == defaults[key]):
            continue
        if ours[key] != described[key]:
            raise ConfigError(
                f"fit: {key} = {ours[key]!r}, but the optimizer you passed has {key} = "
                f"{described[key]!r} ({described['class']}): set it in one place"
            )
    return resume_setting({k: described[k] for k in _OPTIMIZER_KEYS if k in described})


def _reducer(group, model, loss_fn, components, params, optimizer, setting, config, say):
    """Check that every rank runs the same thing; return the step's :class:`StepReducer`."""
    hyper = {
        f"{key}[{j}]": value
        for j, g in enumerate(optimizer.param_groups)
        for key, value in g.items()
        if key != "params"
    }
    group.check_same({
        "config": dict(setting),
        "optimizer": {"type": type(optimizer).__name__, **hyper},
        "data": _dist.components_fingerprint(components),
        "model": _dist.model_fingerprint(model, params),
    })  # fmt: skip
    coupled = bool(batch_coupled_modules(model))
    say(
        f"torch.distributed: {group.world} processes; "
        + (
            f"{batch_coupled_modules(model)[:3]} couple the samples of a batch (train-mode "
            "BatchNorm): every process computes whole components (exact, no speed-up)"
            if coupled
            else "each component's batch is split over them, its gradient all-reduced"
        )
    )
    if not coupled:  # the parts' losses must combine into the component's (exact, or refused)
        _dist.check_split_loss(
            model, loss_fn, components, group.world, form=loss_form(loss_fn), seed=config.seed
        )
    return _dist.StepReducer(group, params, coupled=coupled, seed=config.seed)


def _step(loop: Loop, i: int, carry_state: bool, stop: _StopFlag) -> Step:
    """One clipped step on component ``i``; the units that asked see it before the update.

    Under torch.distributed this rank computes its part of the component's
    batch and ``loop.reducer`` all-reduces the gradient before the clip.
    """
    st, config, model, reducer = loop.state, loop.config, loop.model, loop.reducer
    box: dict[str, Any] = {"state": None}
    rule = loop.rule
    if rule is None:
        eta = config.eta
    elif rule.per_step:  # AutoClip: η from this step's norm (clipped_step calls it once)

        def eta(norm: float) -> float:
            box["eta"] = rule.step_eta(norm)
            return box["eta"]
    else:  # descent-safe: the η decided at the last probe
        eta = rule.eta
    if config.method == "zhang":  # the step-length cap γ: threshold γ/α for this α
        eta = (config.eta if config.zhang_gamma is None else config.zhang_gamma) / loop.lr
    sequential = loop.components.sequential
    batch = loop.components.batch(i)
    if reducer is not None:
        size = loop.components.batch_size if sequential else loop.components.sizes[i]
        batch = reducer.batch(batch, size, sequential=sequential)

    def closure() -> torch.Tensor:
        loss, weight, box["state"] = weighted_component_loss(
            model, loop.loss_fn, batch, form=loop.loss_form,
            state=st.rnn_state if carry_state else None, sequential=sequential, index=i,
        )  # fmt: skip
        if reducer is not None:  # a declared weight combines the ranks' parts (StepReducer)
            reducer.count = weight
        box["loss"] = float(loss.detach())
        return loss

    reduce = None
    if reducer is not None:
        closure = reducer.closure(closure, empty=batch is None)

        def reduce(params: list[torch.Tensor], loss: torch.Tensor) -> float:
            box["loss"] = reducer(params, loss, stop.signum or 0)
            stop.agree(reducer.stop)
            return box["loss"]

    def make(norm: float) -> Step:
        return Step(
            st.step + 1, i, box.get("eta", eta), norm, box["loss"], loop.params,
            closes_interval=st.pos + 1 == len(loop.components), log=loop.log, loop=loop,
            stop_requested=stop.requested,
        )  # fmt: skip

    def before(norm: float) -> None:
        box["step"] = make(norm)
        loop.units.before_update(box["step"])

    wants = loop.units.step_gradient
    with contextlib.nullcontext() if reducer is None else reducer.rng(st.step):
        norm = clipped_step(loop.optimizer, closure, eta, params=loop.params,
                            before_step=before if wants else None, reduce=reduce)  # fmt: skip
    step = box.get("step") or make(norm)
    if carry_state:
        st.rnn_state = box["state"]
    st.pos += 1
    st.step += 1
    return step


def _finish(
    units: Units, loop: Loop, history: History, status: str, message: str | None
) -> History:
    """Fill the history and tell every unit how the run ended."""
    st = loop.state
    history.rows, history.steps, history.status = st.rows, st.step, status
    history.counts = loop.order.counts.tolist()
    rows = st.rows
    summary = {
        "status": status,
        "epoch": st.epoch,
        "step": st.step,
        "rows": len(rows),
        "last_row": {k: v for k, v in rows[-1].items() if not k.startswith("_")} if rows else None,
        "counts": history.counts if status == "completed" else None,
        "message": message,
    }
    units.finish(Finish(status, summary, loop.model, loop.params, log=loop.log, loop=loop))
    return history


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next component boundary.

    Under torch.distributed a signal counts once the ranks agree on it (at the
    next step's all-reduce, or at :meth:`raise_if_set`), so every rank stops,
    and checkpoints, at the same step.
    """

    _CODES: ClassVar[dict[int, int]] = {signal.SIGTERM: 2, signal.SIGINT: 1}

    def __init__(self, group: Any = None) -> None:
        self.signum: int | None = None  # what this process received
        self.agreed: int | None = None  # under torch.distributed: what every rank acts on
        self.group = group

    def _acted_on(self) -> int | None:
        return self.signum if self.group is None else self.agreed

    def requested(self) -> bool:
        """Whether a signal arrived (under torch.distributed: one the ranks agreed on)."""
        return self._acted_on() is not None

    def agree(self, signum: int) -> None:
        """Take the signal the ranks agreed on at a step's all-reduce (0: none)."""
        if signum:
            self.agreed = signum

    def raise_if_set(self, st: LoopState, synced: bool = False) -> None:
        """Raise :class:`Interrupted` when a signal arrived (the units checkpointed already).

        Under torch.distributed the ranks first agree (a small all-reduce)
        unless ``synced`` (a step's all-reduce just did).
        """
        if self.group is not None and not synced:
            code = int(self.group.max(self._CODES.get(self.signum, 0)))
            self.agree({v: k for k, v in self._CODES.items()}.get(code, 0))
        signum = self._acted_on()
        if signum is not None:
            raise Interrupted(
                signum,
                f"signal {signum}: checkpointed at epoch {st.epoch}, step {st.step}",
            )

    @contextlib.contextmanager
    def installed(self, enabled: bool):
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            self.signum = signum

        try:
            for s in previous:
                signal.signal(s, handler)
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="epochs", unit="epoch", leave=True)


def _summary_line(say: Callable[[str], None], row: dict[str, float]) -> None:
    import math

    text = (
        f"epoch {int(row['epoch']):4d}  f={row['loss']:.6g}  ‖∇f‖={row['grad_norm']:.4g}  "
        f"c1={row['c1']:.3g}  c2={row['c2']:.3g}  ρ(η)={row['rho']:.4g}  "
        f"clipped={row['clipped_fraction']:.2f}"
    )
    if not math.isnan(row.get("heldout", math.nan)):
        text += f"  heldout={row['heldout']:.4g}"
    if not math.isnan(row.get("hess_norm", math.nan)):
        text += f"  ‖∇²f‖={row['hess_norm']:.4g}"
    say(text)
