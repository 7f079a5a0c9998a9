r"""Clipped incremental gradient methods: orders, the clipped step, and :func:`fit`.

The paper's methods (DESIGN §1) take a constant step α and walk through the m
components ``f_i`` of ``f = (1/m) Σ_i f_i`` in some order, moving along the
clipped component gradient

.. math:: x \leftarrow x - α\, C(∇f_i(x); η), \qquad C(g; η) = \min\{1, η/‖g‖\}\, g. \quad (4)

What differs is the order (:data:`METHODS`):

* ``"sgd"`` -- SGD-clip (9): ``i`` uniform on ``0..m-1`` **with replacement**,
  m draws per "epoch"; the number of draws of each component is recorded;
* ``"igc"`` -- IGC-clip (10)/(11): the cyclic order ``0, 1, …, m-1`` every
  epoch (corpus order for language models);
* ``"rr"`` -- RR-clip: a new uniformly random permutation every epoch;
* ``"shuffle_once"`` -- one random permutation, drawn once, reused every epoch;
* ``"zhang"`` -- the clipped SGD step of Zhang et al. (2020), the paper's (35),
  as a comparison: ``x ← x − min{α, γ/‖g‖}·g`` with ``i`` drawn with
  replacement, ``γ = zhang_gamma`` (default η). The step length ‖x_{k+1} − x_k‖
  is capped at γ whatever α is; for a constant α it equals SGD-clip with
  threshold ``γ/α``, and it differs from SGD-clip under a schedule. (Zhang et
  al. write ``h = min{η_c, γη_c/‖g‖}`` for clipped GD, which is ``η_c·C(g; γ)``,
  i.e. plain SGD-clip; we implement the form whose cap does not scale with α
  and say so here.)

η = ``math.inf`` gives the unclipped baselines, bitwise equal to plain SGD
(``clip_grads_`` leaves gradients untouched then). Momentum, weight decay and a
learning-rate schedule (``"constant"``, ``"step"``, ``"cosine"``) are options the
paper's pure methods leave off; weight decay is added by the optimizer *after*
clipping (it is not part of the clipped gradient), momentum averages clipped
gradients. All are recorded.

Sequential (language-model) components: under ``"igc"`` the recurrent state
flows from step to step, detached (truncated BPTT), and restarts from zeros at
each epoch; under the other orders consecutive steps are not neighbouring
windows, so the state restarts from zeros at every step.

Orders are :class:`torch.utils.data.Sampler`\ s with their own
``torch.Generator`` and ``state_dict()``; the step works with any
``torch.optim.Optimizer``.

>>> order = make_order("igc", m=3, seed=0)
>>> [order.next_epoch() for _ in range(2)]
[[0, 1, 2], [0, 1, 2]]
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from clipscope.clipping import check_eta, clip_grads_, grad_norm

__all__ = [
    "METHODS",
    "SCHEDULES",
    "Cyclic",
    "History",
    "Interrupted",
    "NonFiniteError",
    "Order",
    "Reshuffle",
    "ShuffleOnce",
    "WithReplacement",
    "clipped_step",
    "fit",
    "make_optimizer",
    "make_order",
    "make_schedule",
    "nt_asgd_switch",
]

SCHEDULES = ("constant", "step", "cosine")
SWITCHES = ("none", "nt-asgd")


class NonFiniteError(FloatingPointError):
    """A component loss or gradient was NaN/inf; nothing was changed by that step."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the run was checkpointed at a component boundary."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# -- orders -------------------------------------------------------------------


class Order(Sampler[int]):
    """Base of the component orders: one epoch is a list of m component indices.

    :meth:`next_epoch` draws the next epoch (advancing the own generator and the
    draw counts); iterating the sampler yields one epoch. ``state_dict`` holds
    everything needed to continue the sequence exactly.
    """

    name = "?"

    def __init__(self, m: int, seed: int = 0) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive int, got {m!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.m = m
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.counts = torch.zeros(m, dtype=torch.int64)

    def _draw(self) -> torch.Tensor:
        raise NotImplementedError

    def next_epoch(self) -> list[int]:
        """Draw the component indices of the next epoch (m of them)."""
        order = self._draw()
        self.counts += torch.bincount(order, minlength=self.m)
        self.epoch += 1
        return order.tolist()

    def __iter__(self):
        return iter(self.next_epoch())

    def __len__(self) -> int:
        return self.m

    def state_dict(self) -> dict[str, Any]:
        """Return the generator state, epochs drawn, and per-component draw counts."""
        return {
            "name": self.name,
            "m": self.m,
            "seed": self.seed,
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
            "counts": self.counts.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the sequence saved by :meth:`state_dict`."""
        if state["name"] != self.name or state["m"] != self.m:
            raise ValueError(
                f"order state is for {state['name']!r} with m={state['m']}, "
                f"not {self.name!r} with m={self.m}"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.generator.set_state(state["generator"])
        self.counts = state["counts"].clone()


class Cyclic(Order):
    """IGC: ``0, 1, …, m-1`` every epoch (uses no randomness)."""

    name = "igc"

    def _draw(self) -> torch.Tensor:
        return torch.arange(self.m)


class WithReplacement(Order):
    """SGD: m independent uniform draws per epoch; components may repeat (edge case 11)."""

    name = "sgd"

    def _draw(self) -> torch.Tensor:
        return torch.randint(self.m, (self.m,), generator=self.generator)


class Reshuffle(Order):
    """RR: a fresh uniform permutation each epoch."""

    name = "rr"

    def _draw(self) -> torch.Tensor:
        return torch.randperm(self.m, generator=self.generator)


class ShuffleOnce(Order):
    """Shuffle-once: one permutation drawn at the first epoch, reused ever after."""

    name = "shuffle_once"

    def __init__(self, m: int, seed: int = 0) -> None:
        super().__init__(m, seed)
        self.perm = torch.randperm(self.m, generator=self.generator)

    def _draw(self) -> torch.Tensor:
        return self.perm.clone()

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Order.state_dict`, plus the permutation."""
        return {**super().state_dict(), "perm": self.perm.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the sequence saved by :meth:`state_dict`."""
        super().load_state_dict(state)
        self.perm = state["perm"].clone()


class _Zhang(WithReplacement):
    name = "zhang"


_ORDERS: dict[str, type[Order]] = {
    "sgd": WithReplacement,
    "igc": Cyclic,
    "rr": Reshuffle,
    "shuffle_once": ShuffleOnce,
    "zhang": _Zhang,
}
METHODS = tuple(_ORDERS)


def check_method(method: Any) -> str:
    """Return ``method`` if it names a method, else raise ValueError listing the choices."""
    if method not in _ORDERS:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    return method


def make_order(method: str, m: int, seed: int = 0) -> Order:
    """Return the component order of ``method`` over ``m`` components, seeded by ``seed``.

    >>> make_order("sgd", m=4, seed=1).next_epoch() == make_order("sgd", m=4, seed=1).next_epoch()
    True
    >>> make_order("adam", 3)
    Traceback (most recent call last):
    ...
    ValueError: unknown method 'adam'; valid choices: sgd, igc, rr, shuffle_once, zhang
    """
    return _ORDERS[check_method(method)](m, seed)


# -- optimizer, schedule, step -------------------------------------------------


def make_optimizer(
    params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """``torch.optim.SGD`` with the run's α, momentum and weight decay (the paper: 0 and 0)."""
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= momentum < 1 or weight_decay < 0:
        raise ValueError(
            f"need 0 <= momentum < 1 and weight_decay >= 0, got {momentum!r}, {weight_decay!r}"
        )
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_schedule(
    optimizer: torch.optim.Optimizer,
    schedule: str = "constant",
    *,
    epochs: int = 1,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Return the per-epoch learning-rate schedule: None (constant), step decay, or cosine.

    ``"step"`` multiplies α by ``gamma`` at each epoch in ``milestones``;
    ``"cosine"`` anneals α to 0 over ``epochs`` epochs. Stepped once per epoch.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return None
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(milestones), gamma=gamma
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1))


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def clipped_step(
    optimizer: torch.optim.Optimizer,
    closure: Callable[[], torch.Tensor],
    eta: float,
    *,
    params: Sequence[torch.Tensor] | None = None,
    before_step: Callable[[], None] | None = None,
) -> float:
    """One clipped step ``x ← x − α·C(∇f_i(x); η)`` with any optimizer; return ‖∇f_i(x)‖.

    ``closure()`` returns the component's scalar loss f_i(x) (no backward).
    The step zeroes the gradients, backpropagates, clips all of ``params``
    (default: the optimizer's) by one global norm with
    :func:`~clipscope.clipping.clip_grads_`, calls ``before_step()`` if given
    (it sees the clipped ``.grad``), then ``optimizer.step()``. η = ∞ leaves the
    gradients bitwise untouched.

    Raises
    ------
    NonFiniteError
        When the loss or the gradient is NaN/inf; the parameters and the
        optimizer state are unchanged.

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> clipped_step(opt, lambda: 0.5 * (w**2).sum(), eta=1.0)
    5.0
    >>> w.detach()
    tensor([2.4000, 3.2000])
    """
    eta = check_eta(eta)
    params = _params_of(optimizer) if params is None else list(params)
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"the component loss is {float(loss.detach())}")
    loss.backward()
    try:
        norm = clip_grads_(params, eta)
    except ValueError as exc:
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not math.isfinite(float(grad_norm(grads))):
            raise NonFiniteError(str(exc)) from exc
        raise
    if before_step is not None:
        before_step()
    optimizer.step()
    return float(norm)


# -- history ------------------------------------------------------------------


@dataclass
class History:
    """What :func:`fit` returns: one row per probe, plus run-level counters.

    Attributes
    ----------
    rows : list of dict
        Per-probe records (the columns of ``epochs.csv``; see :mod:`clipscope.runner`).
    steps : int
        Clipped steps taken.
    counts : list of int
        How often each component was drawn.
    status : str
        ``"completed"``, ``"interrupted"`` or ``"nonfinite"``.
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


# -- fit ----------------------------------------------------------------------


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next component boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def raise_if_set(self, st: dict[str, Any]) -> None:
        """Raise :class:`Interrupted` when a signal arrived (call right after a checkpoint)."""
        if self.signum is not None:
            raise Interrupted(
                self.signum,
                f"signal {self.signum}: checkpointed at epoch {st['epoch']}, step {st['step']}",
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


def _component_loss(model, loss_fn, components, i: int, state):
    x, y = components.batch(i)
    if components.sequential:
        out, new_state = model(x, state)
        from clipscope.components import detach_state

        return loss_fn(out, y), detach_state(new_state)
    return loss_fn(model(x), y), None


def nt_asgd_switch(previous: Sequence[float], current: float, nonmono: int) -> bool:
    """Return whether NT-ASGD (Merity et al., 2018, Alg. 1) switches to averaging now.

    ``previous`` are the held-out metrics (lower is better) of the earlier
    epoch ends, ``current`` this one's. The reference's rule
    (``salesforce/awd-lstm-lm``, ``main.py``): switch when more than
    ``nonmono`` earlier values exist and ``current > min(previous[:-nonmono])``,
    i.e. the metric is worse than the best one of the epochs more than
    ``nonmono`` checks ago. A NaN ``current`` never triggers.

    >>> nt_asgd_switch([5.0, 4.0, 3.0], 3.5, nonmono=2)  # best before the last 2 is 5.0
    False
    >>> nt_asgd_switch([5.0, 4.0, 3.0], 5.5, nonmono=2)
    True
    >>> nt_asgd_switch([5.0, 4.0], 9.0, nonmono=2)  # too few checks yet
    False
    """
    if isinstance(nonmono, bool) or not isinstance(nonmono, int) or nonmono < 1:
        raise ValueError(f"nonmono must be an int >= 1, got {nonmono!r}")
    if len(previous) <= nonmono:
        return False
    return bool(current > min(previous[:-nonmono]))


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    components: Any,
    method: str = "igc",
    *,
    lr: float,
    eta: float = math.inf,
    epochs: int = 1,
    seed: int = 0,
    probe_every: int = 1,
    etas: Sequence[float] = (),
    heldout: Callable[[torch.nn.Module], float] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    milestones: Sequence[int] = (),
    schedule_gamma: float = 0.1,
    zhang_gamma: float | None = None,
    dropout: str = "off",
    route: str = "auto",
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    smoothness: Any = None,
    optimizer_switch: str = "none",
    nonmono: int = 5,
    on_step: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> History:
    """Train ``model`` with a clipped incremental method; probe f at each epoch start.

    Epoch ``k`` starts at ``x_k``. Every ``probe_every`` epochs (0: never) the
    engine's :func:`~clipscope.engine.probe` measures, at ``x_k`` and without
    disturbing training (parameters, buffers, modes and RNG restored), the
    per-component norms n_i, dots d_i, ‖∇f_k‖ and the §2 statistics; they
    become one row (see :mod:`clipscope.runner` for the columns). Then the m
    steps of the epoch run in the method's order. ``epochs = E`` gives rows at
    ``x_0 … x_E`` (``E = 0``: only the diagnostics at ``x_0``).

    IGC drift (term (39)): in an IGC epoch that starts with a probe, the run
    accumulates ``S_k = Σ_i ⟨C(∇f_i(x_{k,i−1}); η), ∇f_k⟩`` over the epoch's
    steps (the clipped gradient each step actually used, dotted with the
    probe's ∇f_k, float64) and records ``igc_drift = S_k − D_k(η)`` with
    ``D_k(η) = Σ_i ⟨C(∇f_i(x_k); η), ∇f_k⟩`` (23) from the probe, in the row of
    epoch k, next to ``grad_norm`` = ‖∇f_k‖, so ``|igc_drift| ≤ αηm²G‖∇f_k‖``
    (42) can be checked. Training steps use the model's own dropout; the probe
    uses the ``dropout`` policy, so with active dropout the drift includes the
    mask noise. The model trains in the mode the caller left it in (``fit``
    never calls ``model.train()``; BatchNorm-in-eval policies stay in force).

    Smoothness (with ``smoothness``, a
    :class:`~clipscope.smoothness.SmoothnessProbe`): at the probes it
    selects, the row gets ``hess_norm`` = Lanczos ``‖∇²f(x_k)‖`` and
    ``hess_converged``, and (with ``components=True``) the component file gets
    ``hess_norms[i] = ‖∇²f_i(x_k)‖``. At *every* probe the run keeps ``x_k``
    and the probe's ``∇f(x_k)`` (float64, also in the checkpoints, so a
    resumed run is bitwise equal) and, at the next probe ``x_{k'}``, writes
    Zhang et al.'s secant ``‖∇f(x_{k'}) − ∇f(x_k)‖ / ‖x_{k'} − x_k‖`` into
    the row of epoch k as ``traj_smoothness`` (paired with that row's
    ``grad_norm``; NaN in the last row). All of it runs under ``model_guard``:
    training is bitwise the same with or without it.

    Parameters
    ----------
    model, loss_fn, components
        ``loss_fn(model(x), y)`` (or ``loss_fn(out, y)`` with ``out, state =
        model(x, state)`` for sequential components) is the component's mean loss.
    method : {"igc", "sgd", "rr", "shuffle_once", "zhang"}
        The order (and, for ``"zhang"``, the step rule); see the module docstring.
    lr, eta : float
        Step α and threshold η (``math.inf``: no clipping).
    epochs, seed : int
        Number of epochs (m steps each); seed of the order's generator.
    probe_every : int
        Probe every this many epochs (and always at the last point); 0 never.
    etas : sequence of float
        Extra thresholds for ``rho@η`` columns.
    heldout : callable, optional
        ``heldout(model) -> float``, run under ``model_guard`` at each probe.
    run_dir, resume, force
        Persist rows, component arrays and checkpoints there (see
        :mod:`clipscope.runner`); continue from its last valid checkpoint;
        accept a changed setting on resume.
    optimizer : torch.optim.Optimizer, optional
        Any optimizer over the model's parameters (default: SGD with
        ``lr``, ``momentum``, ``weight_decay``).
    schedule, milestones, schedule_gamma
        Per-epoch learning-rate schedule (see :func:`make_schedule`).
    checkpoint_every : int
        Also checkpoint every this many steps (0: only at epoch boundaries).
    smoothness : clipscope.smoothness.SmoothnessProbe, optional
        Relaxed-smoothness measurements at the probe points (see above).
    optimizer_switch : {"none", "nt-asgd"}
        ``"nt-asgd"``: at each epoch start ``x_k`` (k ≥ 1, the end of epoch
        k−1) evaluate ``heldout`` (lower must be better) and, once
        :func:`nt_asgd_switch` fires (``nonmono``), keep a running float64
        average ``x̄`` of the iterates after every later step (torch's ASGD
        with ``t0`` = the switch, ``λ = 0``). Training and probes stay at the
        SGD iterates ``x_k``; rows get ``asgd_active`` (1/0: averaging during
        the epoch that starts at x_k) and ``heldout_avg`` (``heldout`` at x̄;
        NaN before the first averaged step). x̄ travels in the checkpoints and
        is written to ``run_dir/averaged_model.pt`` (a state dict: x̄ in the
        parameters' dtype, the model's buffers) when the run completes.
    on_step : callable, optional
        ``on_step(step, i, norm)`` after each step (tests inject faults here).

    Returns
    -------
    History

    Raises
    ------
    NonFiniteError
        A non-finite loss or gradient (the last good checkpoint is kept).
    Interrupted
        After SIGTERM/SIGINT (with ``run_dir``): checkpointed, then raised.
    """
    from clipscope.engine import model_guard, trainable_params
    from clipscope.engine.guard import check_dropout_policy
    from clipscope.runner import RunDirectory, probe_row

    method = check_method(method)
    eta = check_eta(eta)
    etas = tuple(check_eta(e) for e in etas)
    for name, value in (("epochs", epochs), ("probe_every", probe_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    if route not in ("auto", "two-pass", "keep"):
        raise ValueError(
            f"route must be 'auto', 'two-pass' or 'keep' (the run's own components), got {route!r}"
        )
    check_dropout_policy(dropout)
    if optimizer_switch not in SWITCHES:
        raise ValueError(f"optimizer_switch must be one of {SWITCHES}, got {optimizer_switch!r}")
    nt_asgd = optimizer_switch == "nt-asgd"
    if nt_asgd:
        nt_asgd_switch([], 0.0, nonmono)  # validates nonmono
        if heldout is None:
            raise ValueError("optimizer_switch='nt-asgd' needs a heldout metric to trigger on")
    gamma_z = eta if zhang_gamma is None else check_eta(zhang_gamma)
    params = trainable_params(model)
    m = len(components)
    order = make_order(method, m, seed)
    if optimizer is None:
        optimizer = make_optimizer(params, lr, momentum, weight_decay)
    scheduler = make_schedule(
        optimizer, schedule, epochs=epochs, milestones=milestones, gamma=schedule_gamma
    )
    carry_state = method == "igc" and bool(getattr(components, "sequential", False))
    say = log or (lambda text: None)
    setting = {
        "method": method,
        "lr": float(lr),
        "eta": eta,
        "seed": seed,
        "m": m,
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "schedule": schedule,
        "probe_every": probe_every,
        "etas": list(etas),
        "epochs": epochs,
    }
    if smoothness is not None:  # only then: runs from before the option still resume
        setting["smoothness"] = smoothness.to_dict()
    if nt_asgd:  # likewise
        setting.update(optimizer_switch=optimizer_switch, nonmono=nonmono)

    # Loop state: everything here goes into checkpoints.
    st: dict[str, Any] = {
        "epoch": 0,  # current epoch k (training from x_k to x_{k+1})
        "pos": 0,  # steps of epoch k already taken
        "probed": False,  # whether x_k has been probed (or needs no probe)
        "step": 0,  # steps taken in all
        "indices": [],  # order of epoch k
        "rows": [],
        "drift_sum": math.nan,  # S_k so far (NaN: no drift measured this epoch)
        "full_grad": None,  # ∇f_k for the drift, as float64 tensors
        "descent": math.nan,  # D_k(η)
        "rnn_state": None,
        "step_norms_sum": 0.0,
        "step_loss_sum": 0.0,
        "step_clipped": 0,
        "ckpt_seq": 0,  # checkpoints written so far (names them; never overwritten)
        "traj_prev": None,  # smoothness: {"epoch", "x", "g"} of the last probe point (float64)
        "nt_history": [],  # NT-ASGD: held-out metric at each epoch start x_k, k >= 1
        "asgd_epoch": None,  # NT-ASGD: epoch whose start triggered the averaging
        "avg": None,  # NT-ASGD: running mean x̄ of the iterates since the switch (float64)
        "avg_n": 0,  # NT-ASGD: iterates averaged into x̄
    }
    history = History(method=method)
    rd = None
    if run_dir is not None:
        rd = RunDirectory(run_dir, log=say)
        saved = rd.prepare(resume=resume)
        if saved is not None:
            rd.check_setting(saved["setting"], setting, force=force)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None and saved.get("scheduler") is not None:
                scheduler.load_state_dict(saved["scheduler"])
            order.load_state_dict(saved["order"])
            torch.random.set_rng_state(saved["torch_rng"])
            if saved.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
            st.update(saved["loop"])
            rd.restore_rows(st["rows"])
            say(f"resumed at epoch {st['epoch']}, step {st['step']} of {rd.path}")

    def checkpoint() -> None:
        if rd is None:
            return
        st["ckpt_seq"] += 1
        rd.save(
            {
                "setting": setting,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "order": order.state_dict(),
                "torch_rng": torch.random.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if _cuda_in_use() else None,
                "loop": st,
            },
            seq=st["ckpt_seq"],
            rows=st["rows"],
            keep=keep_checkpoints,
        )

    def want_probe(k: int) -> bool:
        return probe_every > 0 and (k % probe_every == 0 or k == epochs)

    def drift_dot() -> None:
        fg = st["full_grad"]
        with torch.no_grad():
            dot = sum(
                float(torch.sum(p.grad.double() * g))
                for p, g in zip(params, fg, strict=True)
                if p.grad is not None
            )
        st["drift_sum"] += dot

    stop = _StopFlag()
    bar = _progress(progress, total=epochs, initial=st["epoch"])
    t0 = time.perf_counter()
    try:
        with stop.installed(rd is not None):
            while True:
                k = st["epoch"]
                if not st["probed"]:
                    if want_probe(k):
                        with model_guard(model):
                            result, row = probe_row(
                                model,
                                loss_fn,
                                components,
                                eta=eta,
                                etas=etas,
                                dropout=dropout,
                                route=route,
                                seed=seed,
                                heldout=heldout,
                                keep_full_grad=(method == "igc" and k < epochs)
                                or smoothness is not None,
                                progress=progress,
                            )
                        extra: dict[str, np.ndarray] = {}
                        if smoothness is not None:
                            extra = _record_smoothness(
                                st, row, result, smoothness, params, k, k == epochs, say,
                                lambda: smoothness.measure(
                                    model, loss_fn, components, dropout=dropout, seed=seed
                                ),
                            )  # fmt: skip
                        if nt_asgd:
                            _nt_asgd_epoch(st, row, k, epochs, nonmono, say,
                                           model, params, heldout)  # fmt: skip
                        row.update(epoch=k, step=st["step"], lr=_lr(optimizer))
                        row["wall_time"] = time.perf_counter() - t0
                        st["rows"].append(row)
                        if rd is not None:
                            rd.write_components(k, result, extra)
                        if method == "igc" and result.full_grad is not None and k < epochs:
                            st["full_grad"] = [
                                g.detach().double().clone() for g in result.full_grad
                            ]
                            st["descent"] = row["_descent"]
                            st["drift_sum"] = 0.0
                        row.pop("_descent", None)
                        _summary_line(say, row)
                    elif nt_asgd:
                        _nt_asgd_epoch(st, None, k, epochs, nonmono, say, model, params, heldout)
                    st["probed"] = True
                    checkpoint()
                    stop.raise_if_set(st)  # a signal during a long probe: stop now
                if k >= epochs:
                    break
                if st["pos"] == 0:
                    st["indices"] = order.next_epoch()
                    st["rnn_state"] = None
                while st["pos"] < m:
                    i = st["indices"][st["pos"]]
                    box: dict[str, Any] = {}

                    def closure(i=i, box=box):
                        state = st["rnn_state"] if carry_state else None
                        loss, box["state"] = _component_loss(model, loss_fn, components, i, state)
                        box["loss"] = float(loss.detach())
                        return loss

                    step_eta = eta
                    if method == "zhang":
                        step_eta = gamma_z / _lr(optimizer)
                    use_drift = st["full_grad"] is not None and not math.isnan(st["drift_sum"])
                    norm = clipped_step(
                        optimizer,
                        closure,
                        step_eta,
                        params=params,
                        before_step=drift_dot if use_drift else None,
                    )
                    if carry_state:
                        st["rnn_state"] = box["state"]
                    if st["avg"] is not None:
                        _average_in(st, params)
                    st["pos"] += 1
                    st["step"] += 1
                    st["step_norms_sum"] += norm
                    st["step_loss_sum"] += box["loss"]
                    st["step_clipped"] += int(norm > step_eta)
                    if on_step is not None:
                        on_step(st["step"], i, norm)
                    if stop.signum is not None:
                        checkpoint()
                        stop.raise_if_set(st)
                    if checkpoint_every and st["step"] % checkpoint_every == 0 and st["pos"] < m:
                        checkpoint()
                if not any(r.get("epoch") == k for r in st["rows"]):
                    say(
                        f"epoch {k:4d}  (no probe)  mean step loss={st['step_loss_sum'] / m:.6g}  "
                        f"clipped steps={st['step_clipped'] / m:.2f}"
                    )
                _end_epoch(st, m)
                if scheduler is not None:
                    scheduler.step()
                bar.update(1)
                checkpoint()
                stop.raise_if_set(st)
    except NonFiniteError as exc:
        history.status = "nonfinite"
        if rd is not None:
            rd.finish(history.status, st, message=str(exc))
        raise NonFiniteError(
            f"non-finite value at epoch {st['epoch']}, step {st['step'] + 1} "
            f"(component {st['indices'][st['pos']] if st['indices'] else '?'}): {exc}; "
            + ("the last good checkpoint is kept" if rd is not None else "training stopped")
        ) from exc
    except Interrupted:
        history.status = "interrupted"
        if rd is not None:
            rd.finish(history.status, st)
        raise
    finally:
        bar.close()
    history.rows = st["rows"]
    history.steps = st["step"]
    history.counts = order.counts.tolist()
    history.status = "completed"
    history.run_dir = None if rd is None else rd.path
    if rd is not None:
        if st["avg"] is not None and st["avg_n"] > 0:
            _save_average(rd.path / "averaged_model.pt", model, params, st["avg"])
            say(f"NT-ASGD: averaged model of {st['avg_n']} iterates in averaged_model.pt")
        elif nt_asgd:
            say("NT-ASGD: never triggered; no averaged model written")
        rd.finish(history.status, st, counts=history.counts)
    return history


def _nt_asgd_epoch(
    st: dict[str, Any],
    row: dict[str, float] | None,
    k: int,
    epochs: int,
    nonmono: int,
    say: Callable[[str], None],
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    heldout: Callable[[torch.nn.Module], float],
) -> None:
    """NT-ASGD at the start of epoch k: trigger check at x_k; ``heldout_avg`` at x̄ into ``row``.

    The metric at x_k is the row's ``heldout`` when there is a probe row,
    else ``heldout(model)`` under ``model_guard``. The check runs for
    ``1 <= k < epochs`` while averaging is off; the averaging starts with the
    first step of epoch k.
    """
    from clipscope.engine import model_guard

    if st["avg"] is None and 1 <= k < epochs:
        if row is not None:
            metric = row["heldout"]
        else:
            with model_guard(model), torch.no_grad():
                metric = float(heldout(model))
        if nt_asgd_switch(st["nt_history"], metric, nonmono):
            with torch.no_grad():
                st["avg"] = [p.detach().to(torch.float64).clone() for p in params]
            st["avg_n"], st["asgd_epoch"] = 0, k
            say(f"NT-ASGD: held-out {metric:.6g} at epoch {k}; averaging the iterates from now on")
        st["nt_history"].append(metric)
    if row is None:
        return
    row["asgd_active"] = float(st["avg"] is not None)
    row["heldout_avg"] = math.nan
    if st["avg"] is not None and st["avg_n"] > 0:
        with model_guard(model), torch.no_grad():
            for p, a in zip(params, st["avg"], strict=True):
                p.copy_(a.to(p.dtype))
            row["heldout_avg"] = float(heldout(model))


def _average_in(st: dict[str, Any], params: Sequence[torch.Tensor]) -> None:
    """``x̄ ← x̄ + (x − x̄)/n`` in float64 after a step (torch ASGD's ``ax`` with ``t0`` = switch)."""
    st["avg_n"] += 1
    n = st["avg_n"]
    with torch.no_grad():
        for a, p in zip(st["avg"], params, strict=True):
            a.add_((p.detach().to(torch.float64) - a) / n)


def _save_average(
    path: Path, model: torch.nn.Module, params: Sequence[torch.Tensor], avg: Sequence[torch.Tensor]
) -> None:
    """Write ``averaged_model.pt`` atomically: the model's state dict with x̄ for the parameters."""
    import io

    from clipscope.atomic import atomic_write_bytes

    by_id = {id(p): a for p, a in zip(params, avg, strict=True)}
    state = {}
    for name, value in model.state_dict(keep_vars=True).items():  # tied weights: both names
        average = by_id.get(id(value))
        state[name] = (value if average is None else average.to(value.dtype)).detach().clone()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _record_smoothness(
    st: dict[str, Any],
    row: dict[str, float],
    result: Any,
    smoothness: Any,
    params: Sequence[torch.Tensor],
    k: int,
    last: bool,
    say: Callable[[str], None],
    measure: Callable[[], tuple[dict[str, float], dict[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """Fill the smoothness entries of the new probe row of epoch ``k``; return component arrays.

    ``hess_norm``/``hess_converged`` when this probe is due (NaN otherwise);
    ``traj_smoothness`` of the *previous* probe row from its ``(x, ∇f)`` and
    this one's; then this point becomes the previous one. A non-finite
    Hessian-vector product is recorded as NaN with a message, not raised: the
    probe already found f and ∇f finite, and the measurement is a diagnostic.
    """
    from clipscope.smoothness import trajectory_smoothness

    row.update(hess_norm=math.nan, hess_converged=math.nan, traj_smoothness=math.nan)
    arrays: dict[str, np.ndarray] = {}
    if smoothness.due(len(st["rows"]), last):
        try:
            entries, arrays = measure()
            row.update(entries)
        except ValueError as exc:
            if "finite" not in str(exc):
                raise
            say(f"warning: Hessian norm not measured at epoch {k}: {exc}")
    with torch.no_grad():
        x = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params]).clone()
    g = torch.cat([t.reshape(-1).to(torch.float64) for t in result.full_grad]).clone()
    prev = st["traj_prev"]
    if prev is not None:
        before = next((r for r in reversed(st["rows"]) if r.get("epoch") == prev["epoch"]), None)
        if before is not None:
            before["traj_smoothness"] = trajectory_smoothness(prev["x"], prev["g"], x, g)
    st["traj_prev"] = None if last else {"epoch": k, "x": x, "g": g}
    return arrays


def _end_epoch(st: dict[str, Any], m: int) -> None:
    """Close epoch k: fill the drift and the step averages into its row, move to k+1."""
    k = st["epoch"]
    row = next((r for r in reversed(st["rows"]) if r.get("epoch") == k), None)
    if row is not None:
        if st["full_grad"] is not None and not math.isnan(st["drift_sum"]):
            row["igc_drift"] = st["drift_sum"] - st["descent"]
        row["train_loss"] = st["step_loss_sum"] / m
        row["train_norm"] = st["step_norms_sum"] / m
        row["train_clipped_share"] = st["step_clipped"] / m
    st.update(
        epoch=k + 1,
        pos=0,
        probed=False,
        indices=[],
        drift_sum=math.nan,
        full_grad=None,
        descent=math.nan,
        rnn_state=None,
        step_norms_sum=0.0,
        step_loss_sum=0.0,
        step_clipped=0,
    )


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


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
