r"""Threshold rules: units that set the clipping threshold η while the loop trains.

* :class:`DescentSafe` -- ``eta = "descent-safe"``: at each probe, η = the
  smallest threshold whose exact η-profile keeps ``ρ(η') ≥ ρ*`` for every
  ``η' ≥ η`` (ρ_P with Adam/AdamW), clamped into ``[eta_min, eta_max]``
  (:func:`clipscope.math.thresholds.descent_safe_threshold`); fixed between probes;
* :class:`AutoClip` -- ``eta = "autoclip"``: at every step, η = the p-th
  percentile of all gradient norms observed so far, the current one included
  (Seetharaman et al., 2020; :func:`clipscope.math.thresholds.autoclip_threshold`).

Both write the η in force into the ``eta`` column of a probed row (the
interval that starts there: descent-safe's decision; AutoClip's percentile of
the norms seen before the point, NaN at x_0) and keep what they need in the
checkpoint (the η in force; the history of norms), so a resumed run is bitwise
the run that was not stopped. A loop asks :meth:`ThresholdRule.step_eta` for
each step's η; the units that read η at a point (:class:`ProbeStatistics`,
:class:`IGCDrift`) read :attr:`ThresholdRule.eta`, so the rule must come
before them in the loop's units (:func:`clipscope.loop.fit.standard_units`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from clipscope.config import check_setting
from clipscope.loop.units import Needs, Point, Unit
from clipscope.math.thresholds import autoclip_threshold, descent_safe_threshold, stored_profile

__all__ = ["AutoClip", "DescentSafe", "ThresholdRule", "make_rule"]


class ThresholdRule(Unit):
    """Base of the threshold rules: the η in force, and each step's η.

    Attributes
    ----------
    eta : float
        The threshold in force now (NaN: none yet, AutoClip before its first step).
    per_step : bool
        Whether each step's η depends on that step's gradient norm
        (:meth:`step_eta` must then be called with it, once per step).
    """

    per_step = False

    def __init__(self) -> None:
        self.eta = math.nan

    def step_eta(self, norm: float) -> float:
        """Return the η of a step whose gradient norm (before clipping) is ``norm``."""
        return self.eta


class DescentSafe(ThresholdRule):
    r"""``eta = "descent-safe"``: η from the exact η-profile at each probe, fixed in between.

    At a probed point x_k (which must be probed with its component arrays:
    ``point.probe``) the rule builds the η-profile from the probe's
    ``norms``, ``dots`` and ``grad_norm`` -- with a preconditioned probe (Adam,
    AdamW: ``point.probe.preconditioned``) from ``dots_p``, ``u_norm`` and
    ``grad_u_inner`` -- exactly the arrays ``components/epoch_XXXX.npz`` stores,
    and takes :func:`~clipscope.math.thresholds.descent_safe_threshold`. Points
    without a probe keep η. Before the first probe η is ``eta_max`` (``inf``):
    the loop probes x_0 before its first step, so that never trains.

    Every change of η is a log line (old, new, why); the row gets ``eta``.
    State: η in force.

    Parameters
    ----------
    target : float
        ρ* in (0, 1].
    eta_min, eta_max : float or None
        Bounds of η (None: 0 and ``inf``).
    """

    name = "descent_safe"

    def __init__(
        self, target: float = 0.9, eta_min: float | None = None, eta_max: float | None = None
    ) -> None:
        super().__init__()
        self.target = check_setting("rho_target", target)
        self.eta_min = check_setting("eta_min", eta_min)
        self.eta_max = check_setting("eta_max", eta_max)
        if self.eta_min is not None and self.eta_max is not None and self.eta_min > self.eta_max:
            raise ValueError(f"eta_min = {self.eta_min!r} is above eta_max = {self.eta_max!r}")
        self.eta = math.inf if self.eta_max is None else self.eta_max

    def needs(self, point: Point) -> Needs:
        """Nothing of its own: it acts on the points other units probe."""
        return Needs.NOTHING

    def decide(self, arrays: dict[str, Any], preconditioned: bool):
        """Return the :class:`~clipscope.math.thresholds.EtaDecision` for a probe's arrays."""
        profile = stored_profile(arrays, preconditioned)
        return descent_safe_threshold(profile, self.target, self.eta_min, self.eta_max)

    def at_point(self, point: Point) -> None:
        """Set η from the probe at x_k; write ``eta`` into the row; log a change."""
        result = point.probe
        if result is None or point.row is None:
            return
        arrays: dict[str, Any] = {
            "norms": result.norms,
            "dots": result.dots,
            "grad_norm": np.float64(result.grad_norm),
        }
        pre = result.preconditioned
        if pre is not None:
            arrays.update(
                dots_p=pre.dots,
                u_norm=np.float64(pre.direction_norm),
                grad_u_inner=np.float64(pre.inner),
            )
        decision = self.decide(arrays, pre is not None)
        old, self.eta = self.eta, decision.eta
        point.row["eta"] = self.eta
        if self.eta != old:
            share = "ρ_P" if pre is not None else "ρ"
            why = {
                "target": f"the smallest η keeping {share} >= {self.target:g} from there on",
                "eta_min": f"η* = {decision.unbounded:.6g} is below eta_min",
                "eta_max": f"η* = {decision.unbounded:.6g} is above eta_max",
                "undefined": f"{share} is undefined (zero descent direction): eta_max",
            }[decision.reason]
            point.log(
                f"descent-safe: η {old:.6g} -> {self.eta:.6g} at x_{point.epoch} "
                f"(step {point.step}; {why}; {share}(η) = {decision.rho:.4g})"
            )

    def state_dict(self) -> dict[str, Any]:
        """``{"eta": η in force}``."""
        return {"eta": self.eta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.eta = float(state.get("eta", self.eta))


class AutoClip(ThresholdRule):
    r"""``eta = "autoclip"``: η_t = the p-th percentile of every gradient norm seen so far.

    Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks" (IEEE MLSP 2020): at step t the
    norm ‖∇f_{i_t}(x_t)‖ (before clipping) joins the history, then the step is
    clipped at ``numpy.percentile(history, p)`` (numpy's default "linear"
    interpolation, as the paper's code; :func:`~clipscope.math.thresholds.autoclip_threshold`).
    The row of a probed point gets ``eta`` = the percentile of the norms seen
    before it (NaN at x_0); at every probe a log line says it and the number
    of norms. State: the history (float64), whose length is the steps taken.

    Parameters
    ----------
    percentile : float
        p in (0, 100].
    """

    name = "autoclip"
    per_step = True

    def __init__(self, percentile: float = 10.0) -> None:
        super().__init__()
        self.percentile = check_setting("autoclip_percentile", percentile)
        self.history: list[float] = []

    def step_eta(self, norm: float) -> float:
        """Add ``norm`` to the history; return the percentile (the step's η)."""
        self.history.append(float(norm))
        self.eta = autoclip_threshold(self.history, self.percentile)
        return self.eta

    def at_point(self, point: Point) -> None:
        """Write ``eta`` (the percentile of the norms so far; NaN before any) into the row."""
        if point.row is None:
            return
        point.row["eta"] = self.eta
        if self.history:
            point.log(
                f"autoclip: η = {self.eta:.6g} at x_{point.epoch} (step {point.step}; "
                f"p{self.percentile:g} of {len(self.history)} gradient norms)"
            )

    def state_dict(self) -> dict[str, Any]:
        """``{"history": the norms, "eta": η of the last step}``."""
        return {"history": list(self.history), "eta": self.eta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.history = [float(v) for v in state.get("history", [])]
        self.eta = float(state.get("eta", math.nan))


def make_rule(config: Any) -> ThresholdRule | None:
    """Return the rule a config's ``eta`` names (None for a number)."""
    if config.eta == "descent-safe":
        return DescentSafe(config.rho_target, config.eta_min, config.eta_max)
    if config.eta == "autoclip":
        return AutoClip(config.autoclip_percentile)
    return None
