r"""The measurement units: what a row of ``epochs.csv`` holds, each from one small object.

=====================  ==========================  ==================================  =========
unit                   needs                       fills                               state
=====================  ==========================  ==================================  =========
:class:`ProbeStatistics`  PROBE at its points       §2 statistics, ``rho@η``, arrays;   --
                                                   with Adam/AdamW ``rho_p``, ...
:class:`HeldOutMetric`  nothing (a probed point)   ``heldout``, ``heldout_seconds``    --
:class:`Smoothness`    FULL_GRADIENT               ``hess_norm``, ``hess_converged``,  previous
                                                   ``hess_iterations``,                point
                                                   ``traj_smoothness``, ``hess_norms``
:class:`IGCDrift`      FULL_GRADIENT,              ``igc_drift`` (39)                  running
                       STEP_GRADIENT                                                   sum, ∇f_k
:class:`StepStatistics`  nothing                   ``train_loss``, ``train_norm``,     sums
                                                   ``train_clipped_share``
:class:`StepGradient`  FULL_GRADIENT,              ``train_cos``, ``train_min_cos``;   ∇f_k,
                       STEP_GRADIENT               per-step arrays                     steps
=====================  ==========================  ==================================  =========

Each is independent of the others; a row is the sum of what the units of a
loop write into it. The statistics themselves are :mod:`clipscope.math.stats`'s
(through ``point.probe.stats``); the units only say which go into the record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from clipscope.config import check_setting
from clipscope.engine import model_guard
from clipscope.errors import NonFiniteError
from clipscope.loop.thresholds import ThresholdRule
from clipscope.loop.units import IntervalEnd, Needs, Point, Step, Unit
from clipscope.math.smoothness import trajectory_smoothness
from clipscope.run.directory import eta_column
from clipscope.smoothness import component_hessian_norms, hessian_norm

__all__ = [
    "HeldOutMetric",
    "IGCDrift",
    "ProbeStatistics",
    "Smoothness",
    "StepGradient",
    "StepStatistics",
    "gradient_products",
]


class ProbeStatistics(Unit):
    """The §2 statistics of the probe at x_k: the standard columns of a row and the component file.

    Needs ``PROBE`` at every ``every``-th point and at the last one (``every = 0``:
    never). Fills ``loss`` = f(x_k), ``grad_norm`` = ‖∇f_k‖, ``c1``, ``c2``,
    ``min_cos``, ``neg_cos_share``, ``a3_holds``, ``rho`` = ρ_k(η),
    ``clipped_fraction``, ``bound33_lhs`` = D_k(η), ``bound33_rhs`` (33),
    ``b_noise`` (the noise-scale heuristic) and ``rho@η`` for each η of
    ``etas``; the component arrays ``norms``, ``dots``, ``losses``,
    ``grad_norm`` and ``sizes`` (from which every statistic can be recomputed),
    ``route`` (the route that ran, a string) and ``fallback`` (the names of the
    parameters the per-sample route took from its exact fallback; empty else).

    When the probe measured the dots with ``u = P⁻¹∇f_k`` (the loop's optimizer is
    an Adam or AdamW: ``point.probe.preconditioned``), also the preconditioned
    columns (:data:`~clipscope.run.directory.PRECONDITIONED_COLUMNS`): ``rho_p`` =
    ρ_P(η), ``c1_p``, ``min_cos_p``, ``neg_cos_p_share``, ``a3_p_holds`` (the
    cosines to u), ``p_unset_share`` (coordinates without optimizer state, P = 1),
    ``decay_ratio`` (the weight decay's descent ⟨∇f, Δ⟩/⟨∇f, u⟩), ``rho_p@η`` for
    each η of ``etas``; and the arrays ``dots_p``, ``u_norm``, ``grad_u_inner``
    (⟨g_i, u⟩, ‖u‖, ⟨∇f, u⟩: every preconditioned statistic recomputes from them
    and ``norms``, :class:`~clipscope.math.stats.DirectionStats`).

    Parameters
    ----------
    eta : float or ThresholdRule
        The run's threshold η (> 0, ``inf`` allowed), or the rule that sets it
        (:mod:`clipscope.loop.thresholds`; it must have decided at the point
        already: it comes first in the units). A NaN η (AutoClip at x_0) leaves
        the η columns NaN.
    etas : sequence of float
        Extra thresholds for the ``rho@η`` columns.
    every : int
        Probe every this many points (and always at the last); 0 never.
    """

    name = "probe_statistics"

    def __init__(
        self, eta: float | ThresholdRule, etas: Sequence[float] = (), every: int = 1
    ) -> None:
        self.eta = _eta_of(eta)
        self.etas = check_setting("etas", tuple(etas))
        self.every = check_setting("probe_every", every)

    def needs(self, point: Point) -> Needs:
        """``PROBE`` at every ``every``-th point and the last."""
        due = self.every > 0 and (point.epoch % self.every == 0 or point.last)
        return Needs.PROBE if due else Needs.NOTHING

    def at_point(self, point: Point) -> None:
        """Write the statistics of ``point.probe`` into the row and the component arrays."""
        result = point.probe
        if result is None or point.row is None:
            return
        stats = result.stats
        eta = self.eta()
        descent = float(stats.descent(eta)) if eta > 0 else math.nan
        point.row.update(
            loss=float(np.mean(result.losses)),
            grad_norm=float(result.grad_norm),
            c1=float(stats.c1),
            c2=float(stats.c2),
            min_cos=stats.min_cos,
            neg_cos_share=stats.negative_cos_share,
            a3_holds=float(bool(stats.a3_holds)),
            rho=float(stats.ratio(eta)) if eta > 0 else math.nan,
            clipped_fraction=float(stats.clipped_fraction(eta)) if eta > 0 else math.nan,
            bound33_lhs=descent,
            bound33_rhs=float(stats.bound33(eta)) if eta > 0 else math.nan,
            b_noise=float(result.noise["B_noise"]),
        )
        for e in self.etas:
            point.row[eta_column(e)] = float(stats.ratio(e))
        # which route ran, and the parameters the per-sample route took from its exact
        # fallback (slower, still exact): provenance the report names
        fallback = sorted((result.verification or {}).get("fallback") or {})
        point.arrays.update(
            norms=result.norms,
            dots=result.dots,
            losses=result.losses,
            grad_norm=np.float64(result.grad_norm),
            sizes=result.sizes,
            route=np.array(str(result.route)),
            fallback=np.array(fallback, dtype=str),
        )
        pre = result.preconditioned
        if pre is None:
            return
        pstats = pre.stats
        point.row.update(
            rho_p=float(pstats.ratio(eta)) if eta > 0 else math.nan,
            c1_p=float(pstats.c1),
            min_cos_p=pstats.min_cos,
            neg_cos_p_share=pstats.negative_cos_share,
            a3_p_holds=float(bool(pstats.a3_holds)),
            p_unset_share=float(pre.info.get("unset_share", 0.0)),
            decay_ratio=float(pre.info.get("decay", {}).get("ratio", math.nan)),
        )
        for e in self.etas:
            point.row[eta_column(e, "rho_p")] = float(pstats.ratio(e))
        point.arrays.update(
            dots_p=pre.dots,
            u_norm=np.float64(pre.direction_norm),
            grad_u_inner=np.float64(pre.inner),
        )


class HeldOutMetric(Unit):
    """``heldout``: the task's held-out metric at every probed point.

    ``metric(model) -> float`` runs under :func:`~clipscope.engine.model_guard`
    and ``torch.no_grad`` (parameters, buffers, modes and RNG restored): a
    held-out loss, an accuracy, a perplexity.
    """

    name = "heldout"

    def __init__(self, metric: Callable[[nn.Module], float]) -> None:
        if not callable(metric):
            raise TypeError(f"metric must be callable as metric(model), got {metric!r}")
        self.metric = metric

    def __call__(self, model: nn.Module) -> float:
        """Evaluate the metric at the current parameters; the model is left untouched."""
        with model_guard(model), torch.no_grad():
            return float(self.metric(model))

    def at_point(self, point: Point) -> None:
        """Fill ``heldout`` of a probed point's row, and ``heldout_seconds`` (its wall time)."""
        if point.row is not None:
            start = time.perf_counter()
            point.row["heldout"] = self(point.model)
            point.row["heldout_seconds"] = time.perf_counter() - start


class Smoothness(Unit):
    r"""Relaxed smoothness at the probed points: Lanczos ``‖∇²f(x_k)‖`` and Zhang et al.'s secant.

    At probe number ``p`` (0-based, counting rows) it measures when :meth:`due`
    says so -- every ``every``-th probe and the last one: ``hess_norm`` =
    ``‖∇²f(x_k)‖`` by Lanczos (:func:`clipscope.smoothness.hessian_norm`),
    ``hess_converged`` (1/0) and ``hess_iterations`` (Hessian-vector products
    used); with ``components=True`` also the component arrays
    ``hess_norms[i] = ‖∇²f_i(x_k)‖``, ``hess_converged`` and ``hess_iterations``
    (one solve per component: about the cost of the full solve again). At
    *every* probe it keeps x_k and the probe's ∇f_k (float64; needs
    ``FULL_GRADIENT``) and, at the next probe x_{k'}, writes
    ``traj_smoothness`` = ``‖∇f(x_{k'}) − ∇f(x_k)‖ / ‖x_{k'} − x_k‖`` into the
    row of x_k (NaN in the last row). A NaN/inf Hessian-vector product is
    recorded as NaN with a message, not raised: the probe already found f and
    ∇f finite, and the measurement is a diagnostic. Everything runs under
    ``model_guard``: training is bitwise the same with or without it.

    A change of the trainable parameter set between two probes (the
    ``Monitor``: :meth:`parameters_changed`; or shapes that differ from the
    kept point's) leaves that secant NaN: x and ∇f of different parameter sets
    are not comparable. The next probe starts over.

    State: the previous probe's ``{"epoch", "x", "g", "shapes"}`` (16 bytes per parameter).

    Parameters
    ----------
    every : int
        Measure the Hessian norm at every ``every``-th probe (>= 1).
    components : bool
        Also ``‖∇²f_i(x_k)‖`` for every component (A5).
    tol : float
        Relative tolerance of the Lanczos stopping rule, in (0, 1).
    max_iter : int
        Most Hessian-vector products per solve.
    hessian : bool
        False: never measure the Hessian norm, only the secants (which cost no
        Hessian-vector product; the ``Monitor``'s default).

    >>> Smoothness(every=2).due(4, last=False), Smoothness(every=2).due(3, last=True)
    (True, True)
    >>> Smoothness(hessian=False).due(0, last=True)
    False
    """

    name = "smoothness"

    def __init__(
        self,
        every: int = 1,
        components: bool = False,
        tol: float = 1e-4,
        max_iter: int = 30,
        *,
        hessian: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not isinstance(hessian, bool):
            raise TypeError(f"hessian must be a bool, got {hessian!r}")
        self.hessian = hessian
        if not isinstance(components, bool):
            raise TypeError(f"components must be a bool, got {components!r}")
        self.every = every
        self.components = components
        self.tol = check_setting("smoothness_tol", tol)
        self.max_iter = check_setting("smoothness_max_iter", max_iter)
        self.previous: dict[str, Any] | None = None

    def due(self, probe_index: int, last: bool) -> bool:
        """Whether probe number ``probe_index`` (0-based) measures the Hessian norm."""
        return self.hessian and (probe_index % self.every == 0 or last)

    def measure(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        components: Any,
        *,
        dropout: str = "off",
        seed: int = 0,
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Measure at the current parameters; return ``(row entries, component arrays)``.

        The model is left untouched (every solve runs under ``model_guard``; the
        start vector has a private generator).
        """
        kw = {"tol": self.tol, "max_iter": self.max_iter, "dropout": dropout, "seed": seed}
        full = hessian_norm(model, loss_fn, components, method="lanczos", **kw)
        row = {
            "hess_norm": float(full.hess_norm),
            "hess_converged": float(full.converged),
            "hess_iterations": float(full.iterations),
        }
        arrays: dict[str, np.ndarray] = {}
        if self.components:
            per = component_hessian_norms(model, loss_fn, components, method="lanczos", **kw)
            arrays["hess_norms"] = np.array([r.hess_norm for r in per], dtype=np.float64)
            arrays["hess_converged"] = np.array([r.converged for r in per], dtype=bool)
            arrays["hess_iterations"] = np.array([r.iterations for r in per], dtype=np.int64)
        return row, arrays

    def needs(self, point: Point) -> Needs:
        """∇f_k of every probed point, for the secant."""
        return Needs.FULL_GRADIENT

    def at_point(self, point: Point) -> None:
        """Fill the smoothness columns of a probed point; the secant into the previous row."""
        row = point.row
        if row is None:
            return
        row.update(
            hess_norm=math.nan,
            hess_converged=math.nan,
            hess_iterations=math.nan,
            traj_smoothness=math.nan,
        )
        if self.due(point.index, point.last):
            try:
                entries, arrays = self.measure(
                    point.model,
                    point.loss_fn,
                    point.components,
                    dropout=point.dropout,
                    seed=point.seed,
                )
                row.update(entries)
                point.arrays.update(arrays)
            except NonFiniteError as exc:
                point.log(f"warning: Hessian norm not measured at epoch {point.epoch}: {exc}")
        with torch.no_grad():
            x = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in point.params]).clone()
        g = torch.cat([t.reshape(-1).to(torch.float64) for t in point.probe.full_grad]).clone()
        shapes = [list(p.shape) for p in point.params]
        prev = self.previous
        if prev is not None and (
            prev.get("shapes", shapes) != shapes or prev["x"].numel() != x.numel()
        ):
            point.log(
                f"note: the trainable parameters at epoch {point.epoch} are not those of "
                f"epoch {prev['epoch']}: no secant (traj_smoothness) between them"
            )
            prev = None
        if prev is not None:
            before = next(
                (r for r in reversed(point.rows) if r.get("epoch") == prev["epoch"]), None
            )
            if before is not None:
                before["traj_smoothness"] = trajectory_smoothness(prev["x"], prev["g"], x, g)
        self.previous = (
            None if point.last else {"epoch": point.epoch, "x": x, "g": g, "shapes": shapes}
        )

    def parameters_changed(self, params: list[torch.Tensor]) -> None:
        """Forget the kept point: no secant across a change of the parameter set."""
        self.previous = None

    def state_dict(self) -> dict[str, Any]:
        """``{"previous": {"epoch", "x", "g", "shapes"} or None}``."""
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.previous = state.get("previous")


class IGCDrift(Unit):
    r"""The IGC drift, term (39): ``igc_drift = Σ_i ⟨C(∇f_i(x_{k,i−1}); η), ∇f_k⟩ − D_k(η)``.

    In an interval that starts at a probed point (not the last), it keeps the
    probe's ∇f_k (float64; needs ``FULL_GRADIENT``) and D_k(η) (23), and before
    every update (``STEP_GRADIENT``) adds the step's clipped gradient -- the one
    actually used, at x_{k,i−1} -- dotted with ∇f_k, in float64. At the interval's
    end the difference goes into the row of x_k, next to ``grad_norm`` =
    ‖∇f_k‖, so ``|igc_drift| ≤ αηm²G‖∇f_k‖`` (42) can be checked. It is the
    paper's quantity for cyclic orders; :func:`clipscope.fit` uses it for
    ``method = "igc"`` only. Training steps use the model's own dropout; the
    probe uses its ``dropout`` policy, so with active dropout the drift also
    holds mask noise.

    State: the running sum, ∇f_k and D_k(η) (NaN / None outside a measured interval).
    """

    name = "igc_drift"

    def __init__(self, eta: float | ThresholdRule) -> None:
        self.eta = _eta_of(eta)  # with a rule: D_k at the η in force at x_k
        self.sum = math.nan
        self.full_grad: list[torch.Tensor] | None = None
        self.descent = math.nan

    def needs(self, point: Point) -> Needs:
        """∇f_k and the step gradients, in every interval (none after the last point)."""
        return Needs.NOTHING if point.last else Needs.FULL_GRADIENT | Needs.STEP_GRADIENT

    def at_point(self, point: Point) -> None:
        """Start measuring when the point was probed with ∇f_k."""
        result = point.probe
        if point.last or result is None or result.full_grad is None:
            return
        self.full_grad = [g.detach().double().clone() for g in result.full_grad]
        eta = self.eta()
        self.descent = float(result.stats.descent(eta)) if eta > 0 else math.nan
        self.sum = 0.0

    def before_update(self, step: Step) -> None:
        """Add ⟨clipped step gradient, ∇f_k⟩ (float64)."""
        if self.full_grad is None or math.isnan(self.sum):
            return
        with torch.no_grad():
            dot = sum(
                float(torch.sum(p.grad.double() * g))
                for p, g in zip(step.params, self.full_grad, strict=True)
                if p.grad is not None
            )
        self.sum += dot

    def parameters_changed(self, params: list[torch.Tensor]) -> None:
        """Stop measuring this interval (its drift stays NaN): ∇f_k is of other parameters."""
        self.sum, self.full_grad, self.descent = math.nan, None, math.nan

    def at_interval_end(self, end: IntervalEnd) -> None:
        """Write ``igc_drift`` into the row of x_k; stop measuring."""
        if end.row is not None and self.full_grad is not None and not math.isnan(self.sum):
            end.row["igc_drift"] = self.sum - self.descent
        self.sum, self.full_grad, self.descent = math.nan, None, math.nan

    def state_dict(self) -> dict[str, Any]:
        """``{"sum", "full_grad", "descent"}``."""
        return {"sum": self.sum, "full_grad": self.full_grad, "descent": self.descent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.sum = state.get("sum", math.nan)
        self.full_grad = state.get("full_grad")
        self.descent = state.get("descent", math.nan)


class StepStatistics(Unit):
    """Means over an interval's updates: ``train_loss``, ``train_norm``, ``train_clipped_share``.

    ``train_loss`` is the mean of f_i at the points the steps started from,
    ``train_norm`` the mean pre-clipping ‖∇f_i‖, ``train_clipped_share`` the
    share of steps with ‖∇f_i‖ > η (the step's own η; :attr:`Step.clip_indicator`).
    They go into the row of the interval's start point; without one, a log line
    says them. An interval without steps gets NaN.

    State: the three running sums.
    """

    name = "step_statistics"

    def __init__(self) -> None:
        self.norms, self.losses, self.clipped = 0.0, 0.0, 0

    def after_update(self, step: Step) -> None:
        """Add the step's norm, loss and whether it was clipped."""
        self.norms += step.grad_norm
        self.losses += step.loss
        self.clipped += step.clip_indicator

    def at_interval_end(self, end: IntervalEnd) -> None:
        """Write the means into the row of x_k (or the log); start over (no steps: NaN)."""
        m = end.steps

        def mean(total: float) -> float:
            return total / m if m else math.nan

        if end.row is not None:
            end.row["train_loss"] = mean(self.losses)
            end.row["train_norm"] = mean(self.norms)
            end.row["train_clipped_share"] = mean(self.clipped)
        else:
            end.log(
                f"epoch {end.epoch:4d}  (no probe)  mean step loss={mean(self.losses):.6g}  "
                f"clipped steps={self.clipped:g} of {m}"
            )
        self.norms, self.losses, self.clipped = 0.0, 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        """``{"norms", "losses", "clipped"}`` sums."""
        return {"norms": self.norms, "losses": self.losses, "clipped": self.clipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.norms = state.get("norms", 0.0)
        self.losses = state.get("losses", 0.0)
        self.clipped = state.get("clipped", 0)


def _eta_of(eta: float | ThresholdRule) -> Callable[[], float]:
    """Return a function giving the η in force: a fixed, validated number, or the rule's."""
    if isinstance(eta, ThresholdRule):
        return lambda: eta.eta
    value = check_setting("eta", eta)
    if not isinstance(value, float):
        raise ValueError(f"eta {value!r} is a rule: pass the rule's unit (make_rule)")
    return lambda: value


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 gradients stay float64; every narrower float is read as float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_products(
    params: Sequence[torch.Tensor],
    full: Sequence[torch.Tensor] | None = None,
    *,
    stacked: Sequence[torch.Tensor] | None = None,
) -> tuple[float, ...]:
    r"""Return ``(‖g‖², ⟨g, v⟩)`` of the gradient ``g`` in the parameters' ``.grad``.

    ``⟨g, v⟩`` is NaN without ``v``. With ``stacked`` -- per parameter a
    ``(k, numel)`` matrix whose rows are k directions ``v_1 … v_k`` (the
    ``Monitor``: ∇f_k and ``u_k = P⁻¹∇f_k``) -- return
    ``(‖g‖², ⟨g, v_1⟩, …, ⟨g, v_k⟩)`` from one matrix-vector product per tensor
    (one read of the gradient for all k dots).

    The free per-step statistics' one pass over the gradient: per parameter
    tensor a dot product in float32 (float64 for float64 gradients; float16 and
    bfloat16 are read as float32), summed across tensors in float64, with one
    device synchronisation for all the numbers. ``v`` (``full``, ``stacked``)
    holds one tensor per parameter in that dtype. A parameter without ``.grad``
    counts as zero. Relative rounding error: that of a float32 dot product
    within a tensor (about 1e-7·√(size), ≲ 1e-5 for tensors up to 10⁷ entries);
    the probe's statistics are float64 throughout. An overflow shows as ``inf``.

    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
    >>> gradient_products([w], [torch.tensor([1.0, 0.0])])
    (25.0, 3.0)
    >>> gradient_products([w], stacked=[torch.tensor([[1.0, 0.0], [0.0, 2.0]])])
    (25.0, 3.0, 8.0)
    """
    k_dirs = 1 if stacked is None else (stacked[0].shape[0] if len(stacked) else 1)
    sq, dots, device = [], [], None
    for k, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        v = g.detach().reshape(-1)
        work = _work_dtype(v.dtype)
        if v.dtype != work:
            v = v.to(work)
        if device is None:
            device = v.device
        sq.append(torch.dot(v, v).to(device))
        if stacked is not None:
            dots.append(torch.mv(stacked[k], v).to(device))
        elif full is not None:
            dots.append(torch.dot(v, full[k].reshape(-1)).reshape(1).to(device))
    if not sq:
        return (math.nan,) * (1 + k_dirs)
    total = torch.stack(sq).double().sum().reshape(1)
    if not dots:
        return float(total), math.nan
    values = torch.cat([total, torch.stack(dots).double().sum(0)]).tolist()  # one sync
    return tuple(float(x) for x in values)


class StepGradient(Unit):
    r"""The free per-step statistics: the step gradient's norm, clipped at η or not, cos with ∇f_k.

    For every update of an interval that starts at a probed point x_k, from the
    gradient the step already computed (no forward, no backward):

    * ``step_grad_norm``: the norm before clipping (:attr:`Step.grad_norm`);
    * ``step_clipped``: 1 when the step was clipped at η (:attr:`Step.clip_indicator`:
      ``‖g‖ > η``, the paper's C(·; η) changes g), 0 when not, NaN when unknown;
    * ``step_cos``: ``cos∠(g, ∇f_k) = ⟨g, ∇f_k⟩ / (‖g‖‖∇f_k‖)`` with ``g`` the
      gradient in ``.grad`` when :meth:`before_update` runs (under ``fit``: the
      clipped one) and ∇f_k the full gradient of the last probe. A norm clip
      multiplies ``g`` by a positive number, so the cosine is the same before
      and after it. Clamped to [−1, 1]; NaN when ``g`` or ∇f_k is zero or not
      finite. Computed by :func:`gradient_products` (float32 within a tensor);
    * ``step_cos_p`` (only when the probe at x_k measured the preconditioned
      direction ``u_k = P_k⁻¹∇f_k``: an Adam/AdamW loop):
      ``cos∠(g, u_k) = ⟨g, u_k⟩ / (‖g‖‖u_k‖)``, the step gradient's cosine with
      ``u_k``, normalised like the probe's cosines to u (``c1_p``, ``min_cos_p``).
      Its sign is that of ``⟨P_k⁻¹ C(g; η), ∇f_k⟩``: whether the step's clipped,
      preconditioned update (P frozen at the probe, momentum only delaying it)
      descends f at x_k to first order. Clipping, a positive rescaling, leaves it
      unchanged. Computed in the same pass as ``step_cos`` (one matrix-vector
      product per tensor with the rows ∇f_k and u_k);
    * ``step_loss``: :attr:`Step.loss`; ``step``: :attr:`Step.number`.

    At the interval's end the row of x_k gets ``train_cos`` (mean of the
    defined cosines) and ``train_min_cos`` (with P also ``train_cos_p`` and
    ``train_min_cos_p``), and the per-step arrays go into ``end.arrays`` (the
    ``Monitor``'s :class:`~clipscope.loop.duties.Records` writes them to
    ``components/epoch_XXXX_steps.npz``). Cost per step: one pass over the
    gradient and ∇f_k (and u_k).

    When the trainable parameter set changes inside an interval (the
    ``Monitor``: :meth:`parameters_changed`), ∇f_k belongs to the old set: the
    cosines of the interval's later steps are NaN; norms and losses go on.

    State: ∇f_k (in the gradients' dtype: 4 bytes per float32 parameter; with P
    the rows ∇f_k and u_k, 8 bytes), ‖u_k‖, whether the interval is measured,
    and its per-step values.
    """

    name = "step_gradient"
    _FIELDS = ("step", "step_grad_norm", "step_clipped", "step_cos", "step_loss")

    def __init__(self) -> None:
        self.full: list[torch.Tensor] | None = None
        self.full_norm = math.nan
        # with P: per parameter the (2, numel) rows ∇f_k and u_k (self.full views the first)
        self.stacked: list[torch.Tensor] | None = None
        self.u_norm = math.nan
        self.active = False  # whether the current interval is measured
        self.records: dict[str, list[float]] = {f: [] for f in self._FIELDS}
        self.pending_cos = self.pending_cos_p = math.nan

    def needs(self, point: Point) -> Needs:
        """∇f_k and the step gradients, in every interval (none after the last point)."""
        return Needs.NOTHING if point.last else Needs.FULL_GRADIENT | Needs.STEP_GRADIENT

    def at_point(self, point: Point) -> None:
        """Keep ∇f_k (and u_k) of a probed point, in each parameter's working dtype and device."""
        self._reset()
        result = point.probe
        if point.last or result is None or result.full_grad is None:
            return
        pre = result.preconditioned
        if pre is not None and pre.direction is not None:
            self.stacked = [
                torch.stack([g.reshape(-1), u.reshape(-1)]).to(
                    device=p.device, dtype=_work_dtype(p.dtype)
                )
                for g, u, p in zip(result.full_grad, pre.direction, point.params, strict=True)
            ]
            self.full = [
                r[0].view(p.shape) for r, p in zip(self.stacked, point.params, strict=True)
            ]
            self.u_norm = float(pre.direction_norm)
            self.records["step_cos_p"] = []
        else:
            self.full = [
                g.detach().to(device=p.device, dtype=_work_dtype(p.dtype))
                for g, p in zip(result.full_grad, point.params, strict=True)
            ]
        self.full_norm = float(result.grad_norm)
        self.active = True

    def parameters_changed(self, params: list[torch.Tensor]) -> None:
        """Drop ∇f_k and u_k (of the old parameters): NaN cosines until the next probe."""
        self.full, self.stacked = None, None
        self.full_norm = self.u_norm = self.pending_cos = self.pending_cos_p = math.nan

    def before_update(self, step: Step) -> None:
        """cos∠(g, ∇f_k) (and cos∠(g, u_k)) of the gradient in ``.grad``."""
        if self.full is None:
            return
        products = step.products or gradient_products(step.params, self.full, stacked=self.stacked)
        sq, dot = products[0], products[1]
        self.pending_cos = _cosine(dot, sq, self.full_norm)
        if self.stacked is not None and len(products) > 2:
            self.pending_cos_p = _cosine(products[2], sq, self.u_norm)

    def after_update(self, step: Step) -> None:
        """Record the step (its cosines from :meth:`before_update`)."""
        if not self.active:
            return
        values = (step.number, step.grad_norm, step.clip_indicator, self.pending_cos, step.loss)
        for name, value in zip(self._FIELDS, values, strict=True):
            self.records[name].append(float(value))
        if "step_cos_p" in self.records:
            self.records["step_cos_p"].append(float(self.pending_cos_p))
        self.pending_cos = self.pending_cos_p = math.nan

    def at_interval_end(self, end: IntervalEnd) -> None:
        """``train_cos``, ``train_min_cos`` into the row of x_k; the per-step arrays; start over."""
        if self.active:
            for name, column in (("step_cos", "train_cos"), ("step_cos_p", "train_cos_p")):
                if name not in self.records or end.row is None:
                    continue
                cos = [c for c in self.records[name] if not math.isnan(c)]
                end.row[column] = sum(cos) / len(cos) if cos else math.nan
                end.row[column.replace("train_", "train_min_")] = min(cos) if cos else math.nan
            for name, values in self.records.items():
                end.arrays[name] = np.asarray(values, dtype=np.float64)
        self._reset()

    def _reset(self) -> None:
        self.full, self.stacked = None, None
        self.full_norm = self.u_norm = self.pending_cos = self.pending_cos_p = math.nan
        self.active = False
        self.records = {f: [] for f in self._FIELDS}

    def state_dict(self) -> dict[str, Any]:
        """``{"full", "full_norm", "stacked", "u_norm", "active", "records", ...}``."""
        return {
            "full": self.full if self.stacked is None else None,
            "full_norm": self.full_norm,
            "stacked": self.stacked,
            "u_norm": self.u_norm,
            "active": self.active,
            "records": {k: list(v) for k, v in self.records.items()},
            "pending_cos": self.pending_cos,
            "pending_cos_p": self.pending_cos_p,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (one saved before the preconditioned rows, too)."""
        self.stacked = state.get("stacked")
        self.full = state.get("full")
        if self.stacked is not None:
            self.full = [rows[0] for rows in self.stacked]  # flat views: shapes do not matter
        self.full_norm = state.get("full_norm", math.nan)
        self.u_norm = state.get("u_norm", math.nan)
        self.active = bool(state.get("active", self.full is not None))
        records = state.get("records") or {}
        self.records = {f: list(records.get(f, [])) for f in self._FIELDS}
        if "step_cos_p" in records:
            self.records["step_cos_p"] = list(records["step_cos_p"])
        self.pending_cos = state.get("pending_cos", math.nan)
        self.pending_cos_p = state.get("pending_cos_p", math.nan)


def _cosine(dot: float, sq: float, other_norm: float) -> float:
    """``dot / (√sq · other_norm)`` clamped to [−1, 1]; NaN when a norm is 0 or not finite."""
    denominator = math.sqrt(sq) * other_norm if sq >= 0 else math.nan
    cos = dot / denominator if denominator > 0 and math.isfinite(denominator) else math.nan
    return max(-1.0, min(1.0, cos)) if math.isfinite(cos) else math.nan
