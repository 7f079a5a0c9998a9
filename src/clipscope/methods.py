r"""Clipped incremental gradient methods: the orders and the clipped step.

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
(``clip_grads_`` leaves gradients untouched then). The optimizer
(:data:`OPTIMIZERS`: ``"sgd"``, ``"adam"``, ``"adamw"``; :func:`make_optimizer`),
momentum, weight decay and a learning-rate schedule (``"constant"``,
``"step"``, ``"cosine"``) are options the paper's pure methods leave off: the
optimizer steps on the clipped gradient C(g; η); weight decay is added by the
optimizer *after* clipping (SGD and Adam: an L2 term ``λx`` added to C(g; η);
AdamW: the decoupled ``x ← x(1 − αλ)``), so it is never part of the clipped
gradient; momentum (SGD) and Adam's moments average clipped gradients. All
are recorded (:func:`describe_optimizer`).

Sequential (language-model) components: under ``"igc"`` the recurrent state
flows from step to step, detached (truncated BPTT), and restarts from zeros at
each epoch; under the other orders consecutive steps are not neighbouring
windows, so the state restarts from zeros at every step.

Orders are :class:`torch.utils.data.Sampler`\ s with their own
``torch.Generator`` and ``state_dict()``; the step works with any
``torch.optim.Optimizer``. The loop that walks them, probes and records is
:func:`clipscope.fit` (:mod:`clipscope.loop`).

>>> order = make_order("igc", m=3, seed=0)
>>> [order.next_epoch() for _ in range(2)]
[[0, 1, 2], [0, 1, 2]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from clipscope.clipping import check_eta, clip_grads_, grad_norm
from clipscope.errors import NonFiniteError

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Cyclic",
    "Order",
    "Reshuffle",
    "ShuffleOnce",
    "WithReplacement",
    "check_method",
    "clipped_step",
    "describe_optimizer",
    "make_optimizer",
    "make_order",
    "make_schedule",
]

SCHEDULES = ("constant", "step", "cosine")
#: The optimizers a config may name (``torch.optim.SGD``, ``Adam``, ``AdamW``).
OPTIMIZERS = ("sgd", "adam", "adamw")
#: Those with a preconditioner P = diag(√v̂) + ε (issue 22's ρ_P reads their state).
ADAPTIVE_OPTIMIZERS = ("adam", "adamw")


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
    params: Iterable[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    *,
    optimizer: str = "sgd",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    r"""Return the run's ``torch.optim`` optimizer; it steps on the clipped gradient C(g; η).

    * ``"sgd"`` -- ``torch.optim.SGD(lr, momentum, weight_decay)`` (the paper: 0 and 0);
    * ``"adam"`` -- ``torch.optim.Adam(lr, betas, eps, weight_decay)``: the L2 term
      ``λx`` is added by torch to the gradient it is given, i.e. *after* clipping,
      so the moments average ``C(g; η) + λx`` and the clipped part excludes the decay;
    * ``"adamw"`` -- ``torch.optim.AdamW(lr, betas, eps, weight_decay)``: decoupled
      decay ``x ← x − αλx`` first, then the Adam step on the moments of ``C(g; η)``
      alone (Loshchilov & Hutter, 2019).

    Every other option is torch's default (no amsgrad, no nesterov, no dampening).
    The values are a :class:`clipscope.config.FitConfig`'s, validated there.

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> type(make_optimizer([w], 0.1, optimizer="adamw", weight_decay=0.1)).__name__
    'AdamW'
    """
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer in ADAPTIVE_OPTIMIZERS:
        if momentum:
            raise ValueError(f"optimizer {optimizer!r} takes no momentum (its betas[0] is one)")
        kind = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        return kind(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")


#: The hyperparameters :func:`describe_optimizer` reads from a param group, when present.
_HYPER = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad")
_NAMES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Return what a run records of its optimizer: its class and first param group's settings.

    ``{"optimizer": "sgd" | "adam" | "adamw" (exactly those torch classes) or the
    class's qualified name, "class": qualified name, "param_groups": k, and each
    of lr, momentum, dampening, nesterov, betas (a list), eps, weight_decay,
    amsgrad the first group has}``; plain values only (JSON and TOML).

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> d = describe_optimizer(torch.optim.Adam([w], lr=0.1))
    >>> d["optimizer"], d["class"], d["betas"]
    ('adam', 'torch.optim.adam.Adam', [0.9, 0.999])
    """
    kind = type(optimizer)
    qualified = f"{kind.__module__}.{kind.__qualname__}"
    group = optimizer.param_groups[0]
    out: dict[str, Any] = {
        "optimizer": _NAMES.get(kind, qualified),
        "class": qualified,
        "param_groups": len(optimizer.param_groups),
    }
    for key in _HYPER:
        if key in group:
            value = group[key]
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            out[key] = [float(v) for v in value] if isinstance(value, (tuple, list)) else value
    return out


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
    eta: float | Callable[[float], float],
    *,
    params: Sequence[torch.Tensor] | None = None,
    before_step: Callable[[float], None] | None = None,
    reduce: Callable[[list[torch.Tensor], torch.Tensor], float] | None = None,
) -> float:
    """One clipped step ``x ← x − α·C(∇f_i(x); η)`` with any optimizer; return ‖∇f_i(x)‖.

    ``closure()`` returns the component's scalar loss f_i(x) (no backward).
    The step zeroes the gradients, backpropagates, (with ``reduce``) combines
    the gradients of several processes, clips all of ``params``
    (default: the optimizer's) by one global norm with
    :func:`~clipscope.clipping.clip_grads_`, calls ``before_step(norm)`` if given
    (``norm`` = ‖∇f_i(x)‖ before clipping; it sees the clipped ``.grad``), then
    ``optimizer.step()``. η = ∞ leaves the gradients bitwise untouched.

    ``reduce(params, loss) -> f_i``, when given, runs right after the backward of
    this process's part of the component (its ``closure()``): it replaces every
    ``.grad`` by the whole component's gradient and returns the component's
    loss (:class:`clipscope.engine.distributed.StepReducer` under
    ``torch.distributed``), so C(·; η) is applied to the all-reduced gradient.
    The loss is then checked after the reduction, on every process alike.

    ``eta`` may be a function ``eta(norm) -> η`` of the step gradient's norm
    ‖∇f_i(x)‖ (before clipping, float64; AutoClip,
    :class:`clipscope.loop.thresholds.AutoClip`): it is called once per step,
    after the backward (and ``reduce``) and only when the norm is finite, and
    the gradient is clipped at the η it returns.

    Raises
    ------
    NonFiniteError
        When the loss or the gradient is NaN/inf, or a step size does not fit
        the parameters' dtype (``lr = 1e200`` with float32: the update would
        overflow); the parameters and the optimizer state are unchanged.

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> clipped_step(opt, lambda: 0.5 * (w**2).sum(), eta=1.0)
    5.0
    >>> w.detach()
    tensor([2.4000, 3.2000])
    """
    rule = eta if callable(eta) else None
    eta = math.inf if rule is not None else check_eta(eta)
    params = _params_of(optimizer) if params is None else list(params)
    _check_step_sizes(optimizer)
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    if reduce is None and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"the component loss is {float(loss.detach())}")
    loss.backward()
    if reduce is not None:  # every process: the same gradient and loss from here on
        value = reduce(params, loss)
        if not math.isfinite(value):
            raise NonFiniteError(f"the component loss is {value}")
    if rule is not None:
        unique = {id(p): p for p in params}.values()  # tied weights once, as clip_grads_
        grads = [p.grad for p in unique if p.grad is not None]
        seen = float(grad_norm(grads)) if grads else math.nan
        if not math.isfinite(seen):
            raise NonFiniteError(f"the gradient norm is {seen}")
        eta = check_eta(rule(seen))
    try:
        norm = clip_grads_(params, eta)
    except ValueError as exc:
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not math.isfinite(float(grad_norm(grads))):
            raise NonFiniteError(str(exc)) from exc
        raise
    if before_step is not None:
        before_step(float(norm))
    optimizer.step()
    return float(norm)


def _check_step_sizes(optimizer: torch.optim.Optimizer) -> None:
    """NonFiniteError when a group's ``lr`` exceeds what its parameters' dtype can hold.

    torch would raise a RuntimeError inside ``optimizer.step()`` ("value cannot be
    converted to type float without overflow"); the update is non-finite either way.
    """
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if not isinstance(lr, (int, float)):
            continue
        for p in group["params"]:
            if p.is_floating_point() and abs(lr) > torch.finfo(p.dtype).max:
                raise NonFiniteError(
                    f"the step size lr = {lr!r} is larger than the largest {p.dtype} "
                    f"({torch.finfo(p.dtype).max:.4g}): the update would not be finite"
                )
