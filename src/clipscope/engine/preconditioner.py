r"""The preconditioner P of an adaptive step, read from the optimizer: the probe's second direction.

An Adam or AdamW step moves the parameters along ``−P⁻¹ m̂`` with
``P = diag(√v̂) + ε``. Where each component gradient is clipped before the
step (SGD-clip, IGC-clip, RR-clip with Adam; Hugging Face's Trainer with
``max_grad_norm``), component i contributes ``−α P⁻¹ C(g_i; η)`` (momentum only
delays the contribution: the first moment spreads it over later steps with
weights ``(1 − β₁)β₁^k`` that add up to one, bias correction aside), so a pass
over the components changes f by
``−α Σ_i γ_i(η)⟨g_i, u⟩`` to first order, ``u = P⁻¹∇f`` (DESIGN §2,
"Preconditioned steps"). The probe measures the dots ``d^P_i = ⟨g_i, u⟩`` beside
``d_i = ⟨g_i, ∇f⟩`` on every route; this module says what u is.

**P, exactly** (:meth:`Preconditioner.from_optimizer`). For a ``torch.optim.Adam``
or ``AdamW`` (or a subclass), per parameter with optimizer state, in float64:

.. math:: P = \sqrt{v / (1 − β_2^{t})} + ε

with ``v`` the state's ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and
``t`` its ``step``: the bias-corrected second moment as torch's step divides
by it (``denom = v.sqrt() / sqrt(1 − β_2^t) + eps``). This is P **frozen at the
probe** (the state now); the next step first adds its own gradient to ``v``
(``v ← β_2 v + (1 − β_2) g²``, ``t ← t + 1``), a change of relative size
``1 − β_2`` per step that the frozen-P model leaves out. The optimizer's state
is read, never changed (``optimizer.state.get``: no entry is created).

* A parameter without state yet (before its first step) gets ``P = 1``, and is
  named in ``info["without_state"]``.
* A probed parameter the optimizer does not hold, or whose group's learning
  rate is 0, is not moved by the step: its part of u is 0, named in
  ``info["not_moved"]``.
* Parameter groups with different learning rates move their parameters by
  ``lr_g P⁻¹``: u then carries ``lr_g / max_g lr_g`` per group
  (``info["lr_relative"]``), so that ⟨g_i, u⟩ is the descent of the actual
  step. With one learning rate (the usual case) u is exactly ``P⁻¹∇f``.
* Weight decay is not part of the clipped gradient, and never enters u.
  Adam's L2 term ``λx`` is added to the (clipped) gradient inside the step and
  goes through P; AdamW's decoupled decay moves x by ``−α λ x``. The probe
  reports it apart (:meth:`Preconditioner.decay`): ``‖λx‖`` and its first-order
  descent ``⟨∇f, Δ⟩`` with ``Δ = P⁻¹λx`` (L2) or ``λx`` (decoupled), in the
  same units as ``⟨∇f, u⟩``, so that one pass changes f by about
  ``−α m (ρ_P(η)⟨∇f, u⟩ + ⟨∇f, Δ⟩)``.
* ``maximize=True`` is recorded (P does not depend on the gradient's sign; the
  ratio ρ_P is the same).

**A given P** (:meth:`Preconditioner.from_tensors`): one tensor per probed
parameter, shaped like it, the diagonal of P (positive and finite), for other
preconditioners and for tests; u is then exactly ``P⁻¹∇f``.

Errors: a ``ValueError`` for a state that cannot give a P (non-finite or negative
``exp_avg_sq``, shapes that differ from the parameter, ``P = 0`` from ``eps = 0``
and ``v = 0``), complex parameters, a given P that is not positive or not finite;
a ``TypeError`` for another optimizer (SGD's P is the identity: ρ is its answer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Preconditioner", "as_preconditioner", "is_adam", "unwrap"]


def is_adam(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ``torch.optim.Adam`` or ``AdamW`` (a subclass counts)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def unwrap(optimizer: Any) -> Any:
    """Return the torch optimizer inside a wrapper (accelerate, Lightning), else the argument.

    accelerate's ``AcceleratedOptimizer`` is itself a ``torch.optim.Optimizer``
    holding the real one in ``.optimizer``; Lightning's ``LightningOptimizer`` in
    ``._optimizer``.
    """
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class Preconditioner:
    """A diagonal P over the probed parameters, as the flat float64 vector of ``lr_rel / P``.

    Build it with :meth:`from_optimizer` or :meth:`from_tensors` (or
    :func:`as_preconditioner`, which takes either). :meth:`direction` gives
    ``u = P⁻¹∇f`` from the flat full gradient; :attr:`info` says how P was read.

    Attributes
    ----------
    inverse : Tensor
        float64 ``(n,)``: ``lr_g/max lr · 1/P`` per coordinate (0 where the
        step does not move the parameter).
    info : dict
        JSON-safe record of what P is (module docstring).
    """

    def __init__(
        self, inverse: torch.Tensor, info: dict[str, Any], decays: Sequence[tuple] = ()
    ) -> None:
        self.inverse = inverse
        self.info = info
        # per parameter with weight decay: (index, start, stop, λ, lr_g / max lr, L2: through P)
        self._decays = list(decays)

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_tensors(
        cls, diagonal: Sequence[torch.Tensor], params: Sequence[torch.Tensor], names: Sequence[str]
    ) -> Preconditioner:
        """P given as one positive, finite tensor per parameter (shaped like it)."""
        diagonal = list(diagonal)
        if len(diagonal) != len(params):
            raise ValueError(
                f"the preconditioner has {len(diagonal)} tensors for {len(params)} probed "
                "parameters (give one per parameter, shaped like it)"
            )
        parts = []
        for p_diag, param, name in zip(diagonal, params, names, strict=True):
            if not isinstance(p_diag, torch.Tensor) or tuple(p_diag.shape) != tuple(param.shape):
                shape = tuple(p_diag.shape) if isinstance(p_diag, torch.Tensor) else type(p_diag)
                raise ValueError(
                    f"the preconditioner of {name} must be a tensor of shape "
                    f"{tuple(param.shape)}, got {shape}"
                )
            if p_diag.is_complex():
                raise ValueError(f"the preconditioner of {name} is complex")
            d64 = p_diag.detach().to(device=param.device, dtype=torch.float64).reshape(-1)
            bad = ~(torch.isfinite(d64) & (d64 > 0))
            if bool(bad.any()):
                k = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"the preconditioner of {name} must be positive and finite, got "
                    f"{float(d64[k])} at entry {k}"
                )
            parts.append(1.0 / d64)
        inverse = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        info = {
            "source": "tensors", "groups": [], "steps": None, "without_state": [],
            "not_moved": [], "lr_relative": False, "unset_share": 0.0,
            "p_min": float(1.0 / inverse.max()) if inverse.numel() else math.nan,
            "p_max": float(1.0 / inverse.min()) if inverse.numel() else math.nan,
        }  # fmt: skip
        return cls(inverse, info)

    @classmethod
    def from_optimizer(
        cls, optimizer: Any, params: Sequence[torch.Tensor], names: Sequence[str]
    ) -> Preconditioner:
        """P of a ``torch.optim.Adam`` / ``AdamW`` at its current state (module docstring).

        Raises
        ------
        TypeError
            Not an Adam or AdamW.
        ValueError
            A state that gives no P (module docstring).
        """
        optimizer = unwrap(optimizer)
        if not is_adam(optimizer):
            raise TypeError(
                "preconditioner must be a torch.optim.Adam or AdamW (its state gives P), or one "
                f"tensor per probed parameter (P's diagonal); got {type(optimizer).__name__}"
                + (
                    " (SGD's P is the identity: the probe's ρ is already its answer)"
                    if isinstance(optimizer, torch.optim.SGD)
                    else ""
                )
            )
        group_of: dict[int, dict] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
        lrs = [_number(group_of[id(p)]["lr"]) for p in params if id(p) in group_of]
        top = max(lrs, default=0.0)
        total = sum(p.numel() for p in params)
        inverse = torch.zeros(total, dtype=torch.float64, device=params[0].device)
        without, not_moved, steps, decays = [], [], [], []
        groups_used: dict[int, dict] = {}
        p_low, p_high, unset, start = math.inf, -math.inf, 0, 0
        for index, (param, name) in enumerate(zip(params, names, strict=True)):
            if param.is_complex():
                raise ValueError(f"{name} is complex: the probe measures real parameters only")
            part = inverse[start : start + param.numel()]
            start += param.numel()
            group = group_of.get(id(param))
            lr = 0.0 if group is None else _number(group["lr"])
            if group is None or lr == 0.0:
                not_moved.append(name)  # u is 0 there (the zeros of ``inverse``)
                continue
            groups_used.setdefault(id(group), group)
            rel = lr / top
            state = optimizer.state.get(param)  # .get: the defaultdict gains no entry
            read = _adam_p(state, group, param, name)
            if read is None:
                without.append(name)
                unset += param.numel()
                part.fill_(rel)
            else:
                p_diag, low, high = read
                steps.append(_number(state["step"]))
                p_low, p_high = min(p_low, low), max(p_high, high)
                torch.reciprocal(p_diag, out=part)
                if rel != 1.0:
                    part.mul_(rel)
            wd = _number(group.get("weight_decay", 0.0))
            if wd > 0:
                l2 = not _decoupled(group, optimizer)
                decays.append((index, start - param.numel(), start, wd, rel, l2))
        info: dict[str, Any] = {
            "source": type(optimizer).__name__,
            "groups": [_group_record(g, optimizer) for g in groups_used.values()],
            "steps": [min(steps), max(steps)] if steps else None,
            "without_state": without,
            "not_moved": not_moved,
            "lr_relative": len({v for v in lrs if v > 0}) > 1,
            "p_min": p_low if steps else math.nan,
            "p_max": p_high if steps else math.nan,
            "unset_share": unset / total if total else 0.0,
        }
        return cls(inverse, info, decays)

    # -- use -----------------------------------------------------------------------
    def direction(self, full: torch.Tensor) -> torch.Tensor:
        """``u = P⁻¹∇f`` (times ``lr_g / max lr`` per group), float64, like ``full``."""
        return full.double() * self.inverse.to(full.device)

    def decay(
        self, params: Sequence[torch.Tensor], full: torch.Tensor, u: torch.Tensor
    ) -> dict[str, Any]:
        """Measure the weight decay's step, apart from the clipped gradient's (module docstring).

        ``params`` the probed parameters (x), ``full`` ∇f, ``u`` this P's direction. Returns
        ``{"form", "norm", "descent", "ratio"}``: ``‖λx‖``, ``⟨∇f, Δ⟩`` and
        ``⟨∇f, Δ⟩ / ⟨∇f, u⟩`` (NaN when that is 0); ``form`` is ``"none"``,
        ``"L2"`` (through P), ``"decoupled"`` or ``"mixed"``.
        """
        if not self._decays:
            return {"form": "none", "norm": 0.0, "descent": 0.0, "ratio": 0.0}
        full, u = full.double(), u.double()
        norm_sq, descent = 0.0, 0.0
        for k, a, b, wd, rel, l2 in self._decays:
            with torch.no_grad():
                x = params[k].detach().reshape(-1).double()
            # L2: Δ = λ·(rel/P)·x, so ⟨∇f, Δ⟩ = λ⟨u, x⟩; decoupled: Δ = λ·rel·x
            along = u[a:b] if l2 else full[a:b] * rel
            descent += wd * float(along @ x.to(along.device))
            norm_sq += wd * wd * float(x @ x)
        inner = float(full @ u)
        forms = {l2 for *_, l2 in self._decays}
        form = "mixed" if len(forms) > 1 else ("L2" if forms == {True} else "decoupled")
        return {
            "form": form,
            "norm": math.sqrt(norm_sq),
            "descent": descent,
            "ratio": descent / inner if inner > 0 else math.nan,
        }


def as_preconditioner(
    preconditioner: Any, params: Sequence[torch.Tensor], names: Sequence[str]
) -> Preconditioner | None:
    """Return the probe's ``preconditioner=`` argument as a :class:`Preconditioner` or None.

    Accepts a :class:`Preconditioner`, a ``torch.optim.Adam``/``AdamW`` (or a
    wrapper with ``.optimizer``), or a sequence of tensors (P's diagonal per parameter).
    """
    if preconditioner is None or isinstance(preconditioner, Preconditioner):
        return preconditioner
    if isinstance(preconditioner, (list, tuple)):
        return Preconditioner.from_tensors(preconditioner, params, names)
    return Preconditioner.from_optimizer(preconditioner, params, names)


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _adam_p(state: Any, group: dict, param: torch.Tensor, name: str) -> tuple | None:
    """``(√(v/(1 − β₂^t)) + ε`` in float64, its min, its max) from one state; None without one."""
    if not state or "exp_avg_sq" not in state or "step" not in state:
        return None
    t = _number(state["step"])
    if not t > 0:
        return None
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    v = state.get(key)
    if v is None:
        raise ValueError(f"the optimizer state of {name} has no {key!r} (amsgrad)")
    if tuple(v.shape) != tuple(param.shape):
        raise ValueError(
            f"the optimizer state of {name} has {key} of shape {tuple(v.shape)}, the parameter "
            f"{tuple(param.shape)}"
        )
    if v.is_complex():
        raise ValueError(f"the optimizer state of {name} is complex")
    beta2 = _number(group["betas"][1])
    eps = _number(group["eps"])
    bias = 1.0 - beta2**t
    # √(v/(1 − β₂^t)) + ε in float64, on a copy (the state is never written)
    p_diag = v.detach().to(device=param.device, dtype=torch.float64, copy=True).reshape(-1)
    p_diag.div_(bias).sqrt_().add_(eps)
    low, high = (float(x) for x in torch.aminmax(p_diag))  # NaN if any entry is NaN
    if not (math.isfinite(low) and math.isfinite(high)):  # a NaN, inf or negative v (√: NaN)
        v64 = v.detach().double().reshape(-1)
        k = int(torch.nonzero(~(torch.isfinite(v64) & (v64 >= 0)))[0])
        raise ValueError(
            f"the optimizer state of {name} has {key}[{k}] = {float(v64[k])}: no preconditioner"
        )
    if not low > 0:
        k = int(torch.nonzero(~(p_diag > 0))[0])
        raise ValueError(
            f"P = 0 at entry {k} of {name} (eps = {eps} and {key} = 0): the step would divide "
            "by zero there"
        )
    return p_diag, low, high


def _group_record(group: dict, optimizer: Any) -> dict[str, Any]:
    return {
        "lr": _number(group["lr"]),
        "betas": [_number(b) for b in group["betas"]],
        "eps": _number(group["eps"]),
        "weight_decay": _number(group.get("weight_decay", 0.0)),
        "decoupled_weight_decay": _decoupled(group, optimizer),
        "amsgrad": bool(group.get("amsgrad", False)),
        "maximize": bool(group.get("maximize", False)),
        "params": len(group["params"]),
    }


def _decoupled(group: dict, optimizer: Any) -> bool:
    """AdamW's decoupled decay (torch ≥ 2.6 keeps it per group), else Adam's L2 term."""
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
