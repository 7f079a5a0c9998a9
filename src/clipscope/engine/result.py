"""What a probe returns: :class:`ProbeResult` and :class:`MultiProbeResult`.

The engine measures; it does not say what a statistic means. A result holds
``n_i``, ``d_i``, ``f_i``, ``‖∇f‖``, the sizes and the per-η clipped-sum
scalars; every derived quantity (cosines, β, c1, c2, ρ(η), the noise scale, ...)
is read through :attr:`ProbeResult.stats`, a :class:`clipscope.math.stats.ComponentStats`
over the same three inputs, so ``clipscope probe``, ``epochs.csv`` and the report
agree by construction. Nothing here runs autograd.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from clipscope.math.stats import (
    ComponentStats,
    DirectionStats,
    EtaProfile,
    noise_scale,
    predicted_cos,
)

__all__ = ["MultiProbeResult", "PreconditionedResult", "ProbeResult"]


@dataclass
class PreconditionedResult:
    r"""The dots with ``u = P⁻¹∇f`` at one point: the preconditioned descent (DESIGN §2).

    With the optimizer's preconditioner P frozen at the probe, component i moves
    the parameters along ``−P⁻¹C(g_i; η)``; one pass changes f by
    ``−α Σ_i γ_i(η) d^P_i`` to first order, ``d^P_i = ⟨g_i, u⟩``. Every statistic
    is :attr:`stats` (:class:`~clipscope.math.stats.DirectionStats` of
    ``(n_i, d^P_i, ‖u‖, ⟨∇f, u⟩)``); :meth:`ratio` is
    ``ρ_P(η) = Σ_i min{1, η/n_i} d^P_i / Σ_i d^P_i``, whose denominator is
    ``m⟨∇f, u⟩ > 0``.

    Attributes
    ----------
    norms : numpy.ndarray
        ``n_i = ‖g_i‖`` (the probe's; the clip uses them), float64 ``(m,)``.
    dots : numpy.ndarray
        ``d^P_i = ⟨g_i, u⟩``, float64 ``(m,)``.
    direction_norm : float
        ``‖u‖``.
    inner : float
        ``⟨∇f, u⟩ = ⟨∇f, P⁻¹∇f⟩ ≥ 0``.
    clipped : dict
        ``{η: (cos∠(Σ_i C(g_i;η), u), cos∠(P⁻¹Σ_i C(g_i;η), ∇f))}`` for the
        requested η: the clipped sum's cosine with u, and the angle between the
        step one pass takes (P frozen, no momentum) and ∇f. Both have the sign
        of the preconditioned descent ``D_P(η)``.
    info : dict
        How P was read (:mod:`clipscope.engine.preconditioner`: the optimizer,
        its groups, the parameters without state yet (P = 1), those the step
        does not move) and the weight decay's step, reported apart
        (``decay``: ``form``, ``norm`` ‖λx‖, ``descent`` ⟨∇f, Δ⟩, ``ratio``
        ⟨∇f, Δ⟩/⟨∇f, u⟩), and the consistency check of the dots
        (``consistency``: Cauchy–Schwarz with ‖u‖ and ``Σ d^P_i = m⟨∇f, u⟩``).
    direction, inverse : list of torch.Tensor or None
        ``u`` and the diagonal of ``P⁻¹`` (float64, shaped like the
        parameters) with ``keep_full_grad=True``.
    """

    norms: np.ndarray
    dots: np.ndarray
    direction_norm: float
    inner: float
    clipped: dict[float, tuple[float, float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    direction: list | None = None
    inverse: list | None = None

    def __post_init__(self) -> None:
        self.norms = np.asarray(self.norms, dtype=np.float64)
        self.dots = np.asarray(self.dots, dtype=np.float64)
        self.direction_norm = float(self.direction_norm)
        self.inner = float(self.inner)

    @cached_property
    def stats(self) -> DirectionStats:
        """Every statistic along u (:class:`~clipscope.math.stats.DirectionStats`)."""
        return DirectionStats(self.norms, self.dots, self.direction_norm, self.inner)

    @property
    def m(self) -> int:
        """Number of components."""
        return len(self.dots)

    def ratio(self, eta: Any) -> np.ndarray | float:
        """``ρ_P(η)``: 1 at ``η = ∞``, < 0 where clipping reverses the preconditioned descent."""
        return self.stats.ratio(eta)

    def descent(self, eta: Any) -> np.ndarray | float:
        """``D_P(η) = Σ_i min{1, η/n_i} d^P_i = ⟨Σ_i C(g_i; η), u⟩``."""
        return self.stats.descent(eta)

    def profile(self) -> EtaProfile:
        """Return the exact η-profile of ``D_P`` (its ``ratio`` is ρ_P)."""
        return self.stats.profile()

    def negative_intervals(self) -> list[tuple[float, float]]:
        """Return the η where clipping reverses the preconditioned descent (``D_P(η) ≤ 0``)."""
        return self.profile().negative_intervals()

    @property
    def cos(self) -> np.ndarray:
        """``d^P_i / (n_i ‖u‖)``: each component's cosine with u."""
        return self.stats.cos

    @property
    def c1(self) -> float:
        """Mean cosine to u (A3 under P)."""
        return self.stats.c1

    @property
    def a3_holds(self) -> bool:
        """A3 under P: every defined cosine to u ``≥ 0`` and their mean ``> 0``."""
        return self.stats.a3_holds

    def summary(self) -> dict[str, Any]:
        """Small JSON-safe summary (no per-component arrays)."""
        stats = self.stats
        out: dict[str, Any] = {
            "direction_norm": self.direction_norm,
            "inner": self.inner,
            "c1": stats.c1,
            "cos_min": stats.min_cos,
            "frac_negative_cos": stats.negative_cos_share,
            "a3_holds": stats.a3_holds,
            "sum_dots_over_m_inner": float(np.sum(self.dots)) / (self.m * self.inner)
            if self.inner > 0
            else math.nan,
            "clipped": {
                _eta_key(eta): {"cos_u": a, "update_cos": b} for eta, (a, b) in self.clipped.items()
            },
            "flags": stats.flags,
        }
        return {k: _json_float(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: :meth:`summary`, the dots and ``info``."""
        return {
            **self.summary(),
            "dots": [_json_float(v) for v in self.dots.tolist()],
            "info": _json_safe(self.info),
        }


@dataclass
class ProbeResult:
    """Per-component norms and dots with ∇f at one point and one batch size.

    Attributes
    ----------
    norms, dots, losses : numpy.ndarray
        ``n_i = ‖g_i‖``, ``d_i = ⟨g_i, ∇f⟩`` and ``f_i`` (mean loss of component
        ``i``), float64, shape ``(m,)``.
    grad_norm : float
        ``‖∇f‖`` with ``∇f = (1/m) Σ_i g_i`` (17).
    clipped : dict
        ``{η: (‖Σ_i C(g_i; η)‖, cos∠(Σ_i C(g_i; η), ∇f))}`` for the requested η.
    route : str
        The route that ran: ``"two-pass"``, ``"keep"``, ``"dyadic"``, ``"per-sample"``
        or ``"reference"``.
    batch_size : int
        Nominal batch size B of the components (1 for per-sample).
    sizes : numpy.ndarray
        Samples per component.
    full_grad : list of torch.Tensor or None
        ∇f as float64 tensors shaped like the parameters (``keep_full_grad=True``).
    info : dict
        Provenance: dropout policy, seed, components record, pass-2 mismatch, ...
    preconditioned : PreconditionedResult or None
        With ``probe(..., preconditioner=...)``: the dots with ``u = P⁻¹∇f`` and
        every statistic of the preconditioned descent (``.ratio(η)`` is ρ_P(η)).
    verification : dict
        What the engine checked (:mod:`clipscope.engine.verify`): ``consistency``
        (Cauchy–Schwarz and ``Σ d_i = m‖∇f‖²``) on every route; on the
        per-sample route also the rule serving each module, every parameter that
        went to the exact fallback and why, the structural checks, and the spot
        check (``spot_checks`` samples, their indices and largest errors).

    Derived, read-only: :attr:`stats` (every statistic of DESIGN §2),
    :attr:`noise` (the noise-scale heuristic), and :attr:`cos` / :attr:`beta`
    (shortcuts into ``stats``).
    """

    norms: np.ndarray
    dots: np.ndarray
    grad_norm: float
    losses: np.ndarray
    clipped: dict[float, tuple[float, float]]
    route: str
    batch_size: int
    sizes: np.ndarray
    full_grad: list | None = None
    info: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    preconditioned: PreconditionedResult | None = None

    def __post_init__(self) -> None:
        self.norms = np.asarray(self.norms, dtype=np.float64)
        self.dots = np.asarray(self.dots, dtype=np.float64)
        self.losses = np.asarray(self.losses, dtype=np.float64)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.grad_norm = float(self.grad_norm)

    @cached_property
    def stats(self) -> ComponentStats:
        """Every statistic of DESIGN §2 here (:class:`~clipscope.math.stats.ComponentStats`).

        Raises :class:`~clipscope.errors.NonFiniteError` when a norm or a dot is
        NaN/inf (the engine refuses those before it returns, so only a result
        built by hand can).
        """
        return ComponentStats(self.norms, self.dots, self.grad_norm)

    @property
    def n_samples(self) -> int:
        """Samples over all components (``info["n_samples"]``, else the sum of ``sizes``)."""
        return int(self.info.get("n_samples", self.sizes.sum()))

    @cached_property
    def noise(self) -> dict[str, Any]:
        """The noise-scale heuristic (:func:`clipscope.math.stats.noise_scale`).

        Plus ``predicted_cos`` / ``predicted_cos_fpc`` at this batch size
        (:func:`~clipscope.math.stats.predicted_cos`) and the ``measured_mean_cos``
        (= ``stats.c1``, the mean of the defined cosines).
        """
        out = noise_scale(self.norms, self.grad_norm, self.batch_size, self.n_samples)
        b = out["B_noise"]
        out["predicted_cos"] = predicted_cos(b, self.batch_size)
        out["predicted_cos_fpc"] = predicted_cos(b, self.batch_size, self.n_samples)
        out["measured_mean_cos"] = self.stats.c1
        return out

    @property
    def m(self) -> int:
        """Number of components."""
        return len(self.norms)

    @property
    def loss(self) -> float:
        """``f = (1/m) Σ_i f_i`` (1)."""
        return float(np.mean(self.losses))

    @property
    def cos(self) -> np.ndarray:
        """``cos θ_i`` (``stats.cos``): in ``[−1, 1]``, NaN where a norm is 0."""
        return self.stats.cos

    @property
    def beta(self) -> np.ndarray:
        """``β_i = d_i / ‖∇f‖²`` (19, ``stats.beta``); ``Σ β_i = m`` (20)."""
        return self.stats.beta

    def table(self) -> list[dict[str, Any]]:
        """One row per component: index, size, loss, norm, dot, cos, beta (for CSV)."""
        cos, beta = self.cos, self.beta
        return [
            {
                "component": i,
                "size": int(self.sizes[i]),
                "loss": float(self.losses[i]),
                "norm": float(self.norms[i]),
                "dot": float(self.dots[i]),
                "cos": float(cos[i]),
                "beta": float(beta[i]),
            }
            for i in range(self.m)
        ]

    def summary(self) -> dict[str, Any]:
        """Small JSON-safe summary (no per-component arrays); statistics from :attr:`stats`."""
        stats = self.stats
        out: dict[str, Any] = {
            "route": self.route,
            "batch_size": self.batch_size,
            "m": self.m,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "norm_min": float(self.norms.min()),
            "norm_max": float(self.norms.max()),
            "cos_min": stats.min_cos,
            "cos_mean": stats.c1,
            "frac_negative_cos": stats.negative_cos_share,
            "sum_beta": float(np.sum(stats.beta)),
            "clipped": {
                _eta_key(eta): {"norm": n, "cos": c} for eta, (n, c) in self.clipped.items()
            },
            "noise": {k: _json_float(v) for k, v in self.noise.items()},
            "c1": stats.c1,
            "c2": stats.c2,
        }
        if self.preconditioned is not None:
            out["preconditioned"] = self.preconditioned.summary()
        return {k: _json_float(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: :meth:`summary`, the per-component arrays and ``info``."""
        out = {
            **self.summary(),
            "norms": [_json_float(v) for v in self.norms.tolist()],
            "dots": [_json_float(v) for v in self.dots.tolist()],
            "losses": [_json_float(v) for v in self.losses.tolist()],
            "sizes": self.sizes.tolist(),
            "info": self.info,
            "verification": self.verification,
        }
        if self.preconditioned is not None:
            out["preconditioned"] = self.preconditioned.to_dict()
        return out


class MultiProbeResult(Mapping):
    """``{batch size: ProbeResult}`` from one dyadic pass (smallest batch size first)."""

    def __init__(self, results: dict[int, ProbeResult], route: str = "dyadic") -> None:
        self._results = dict(sorted(results.items()))
        self.route = route

    def __getitem__(self, batch_size: int) -> ProbeResult:
        return self._results[batch_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes, ascending."""
        return list(self._results)

    def noise_table(self) -> list[dict[str, Any]]:
        """Predicted mean cosine at every batch size from the smallest one's ``B_noise``.

        One row per batch size: ``predicted_cos`` and ``predicted_cos_fpc`` from the
        noise scale measured at the smallest batch size (:func:`noise_scale`, a
        heuristic), next to the ``measured_mean_cos`` of that level.
        """
        base = self._results[self.batch_sizes[0]]
        b_noise = base.noise.get("B_noise", math.nan)
        n_samples = base.noise.get("n_samples")
        return [
            {
                "batch_size": b,
                "B_noise": b_noise,
                "predicted_cos": predicted_cos(b_noise, b),
                "predicted_cos_fpc": predicted_cos(b_noise, b, n_samples),
                "measured_mean_cos": r.noise["measured_mean_cos"],
            }
            for b, r in self._results.items()
        ]

    def summary(self) -> dict[str, Any]:
        """``{str(batch size): ProbeResult.summary()}``."""
        return {str(b): r.summary() for b, r in self._results.items()}

    def to_dict(self) -> dict[str, Any]:
        """``{str(batch size): ProbeResult.to_dict()}`` plus the route."""
        return {"route": self.route, **{str(b): r.to_dict() for b, r in self._results.items()}}


def _eta_key(eta: float) -> str:
    return "inf" if math.isinf(eta) else repr(float(eta))


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None / "inf" / "-inf", in nested dicts and lists."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
