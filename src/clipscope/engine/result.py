"""What a probe returns: :class:`ProbeResult`, :class:`MultiProbeResult`, the noise scale.

Everything here is numpy on the per-component scalars ``n_i``, ``d_i``,
``‖∇f‖`` and the per-η clipped-sum scalars; nothing runs autograd.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MultiProbeResult", "ProbeResult", "noise_scale"]


def noise_scale(
    norms: np.ndarray, grad_norm: float, batch_size: int, n_samples: int
) -> dict[str, Any]:
    r"""Gradient noise scale from the component norms -- a **heuristic**.

    With ``Σ_i g_i = m ∇f``, the mean squared deviation of the components is
    ``S = (1/m) Σ_i ‖g_i − ∇f‖² = (1/m) Σ_i n_i² − ‖∇f‖²``. If each component
    were a uniformly random B-subset of the N samples drawn without
    replacement, ``E S = (tr Σ / B)·(N − B)/(N − 1)`` with ``tr Σ`` the
    per-sample gradient variance, so

    .. math:: \widehat{\operatorname{tr}Σ} = B\,S\,(N-1)/(N-B), \qquad
              B_\text{noise} = \widehat{\operatorname{tr}Σ}/‖∇f‖^2 .

    The predicted mean cosine between a batch gradient of size ``B'`` and ∇f is
    ``(1 + B_noise/B')^{-1/2}`` (McCandlish et al.'s large-N form), or with the
    finite-population correction ``(1 + B_noise (N−B')/(B'(N−1)))^{-1/2}``.
    These treat ``‖g‖`` as concentrated and the partition as random; corpus-order
    partitions, unequal batch sizes and heavy tails all break them. They are
    reported next to the measured mean cosine, not used by any theorem.

    >>> out = noise_scale(np.array([3.0, 5.0]), 4.0, batch_size=2, n_samples=4)
    >>> out["trace_sigma"], out["B_noise"]
    (3.0, 0.1875)
    """
    norms = np.asarray(norms, dtype=np.float64)
    m = len(norms)
    g2 = float(grad_norm) ** 2
    s = float(np.mean(norms**2)) - g2
    s = max(s, 0.0)  # rounding can make it slightly negative when all g_i agree
    if n_samples > batch_size:
        trace = batch_size * s * (n_samples - 1) / (n_samples - batch_size)
    else:
        trace = math.nan  # m = 1: one component is the whole data, no spread to see
    b_noise = trace / g2 if g2 > 0 else math.nan
    return {
        "heuristic": True,
        "m": m,
        "batch_size": int(batch_size),
        "n_samples": int(n_samples),
        "mean_sq_deviation": s,
        "trace_sigma": trace,
        "B_noise": b_noise,
    }


def predicted_cos(b_noise: float, batch_size: int, n_samples: int | None = None) -> float:
    """Predicted mean cosine ``(1 + B_noise/B)^(-1/2)`` (with FPC when ``n_samples`` is given).

    >>> round(predicted_cos(3.0, 1), 3), predicted_cos(3.0, 4, n_samples=4)
    (0.5, 1.0)
    """
    if not math.isfinite(b_noise):
        return math.nan
    ratio = b_noise / batch_size
    if n_samples is not None:
        ratio *= (n_samples - batch_size) / (n_samples - 1) if n_samples > 1 else 0.0
    return (1.0 + ratio) ** -0.5


def _stats(norms: np.ndarray, dots: np.ndarray, grad_norm: float) -> Any:
    try:
        from clipscope.stats import ComponentStats
    except ImportError:  # pragma: no cover - the stats module is written in parallel
        return None
    return ComponentStats(norms, dots, grad_norm)


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
    noise : dict
        :func:`noise_scale` plus the predicted and measured mean cosine.
    full_grad : list of torch.Tensor or None
        ∇f as float64 tensors shaped like the parameters (``keep_full_grad=True``).
    info : dict
        Provenance: dropout policy, seed, components record, pass-2 mismatch, ...
    verification : dict
        What the engine checked (:mod:`clipscope.engine.verify`): ``consistency``
        (Cauchy–Schwarz and ``Σ d_i = m‖∇f‖²``) on every route; on the
        per-sample route also the rule serving each module, every parameter that
        went to the exact fallback and why, the structural checks, and the spot
        check (``spot_checks`` samples, their indices and largest errors).
    """

    norms: np.ndarray
    dots: np.ndarray
    grad_norm: float
    losses: np.ndarray
    clipped: dict[float, tuple[float, float]]
    route: str
    batch_size: int
    sizes: np.ndarray
    noise: dict[str, Any] = field(default_factory=dict)
    full_grad: list | None = None
    info: dict[str, Any] = field(default_factory=dict)
    stats: Any = None
    verification: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.norms = np.asarray(self.norms, dtype=np.float64)
        self.dots = np.asarray(self.dots, dtype=np.float64)
        self.losses = np.asarray(self.losses, dtype=np.float64)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.grad_norm = float(self.grad_norm)
        if self.stats is None:
            self.stats = _stats(self.norms, self.dots, self.grad_norm)
        n_samples = int(self.info.get("n_samples", self.sizes.sum()))
        if not self.noise:
            self.noise = noise_scale(self.norms, self.grad_norm, self.batch_size, n_samples)
        b = self.noise.get("B_noise", math.nan)
        self.noise["predicted_cos"] = predicted_cos(b, self.batch_size)
        self.noise["predicted_cos_fpc"] = predicted_cos(b, self.batch_size, n_samples)
        self.noise["measured_mean_cos"] = _nanmean(self.cos)

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
        """``cos θ_i = d_i / (n_i ‖∇f‖)``; NaN where a norm is 0."""
        denom = self.norms * self.grad_norm
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom > 0, self.dots / np.where(denom > 0, denom, 1.0), np.nan)

    @property
    def beta(self) -> np.ndarray:
        """``β_i = d_i / ‖∇f‖²`` (19); ``Σ β_i = m`` (20)."""
        g2 = self.grad_norm**2
        return self.dots / g2 if g2 > 0 else np.full_like(self.dots, np.nan)

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
        """Small JSON-safe summary (no per-component arrays)."""
        cos = self.cos
        out: dict[str, Any] = {
            "route": self.route,
            "batch_size": self.batch_size,
            "m": self.m,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "norm_min": float(self.norms.min()),
            "norm_max": float(self.norms.max()),
            "cos_min": _nanmin(cos),
            "cos_mean": _nanmean(cos),
            "frac_negative_cos": float(np.mean(cos < 0)),
            "sum_beta": float(np.sum(self.beta)),
            "clipped": {
                _eta_key(eta): {"norm": n, "cos": c} for eta, (n, c) in self.clipped.items()
            },
            "noise": {k: _json_float(v) for k, v in self.noise.items()},
        }
        for key in ("c1", "c2"):
            value = getattr(self.stats, key, None)
            if value is not None:
                out[key] = _json_float(float(value))
        return {k: _json_float(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: :meth:`summary`, the per-component arrays and ``info``."""
        return {
            **self.summary(),
            "norms": [_json_float(v) for v in self.norms.tolist()],
            "dots": [_json_float(v) for v in self.dots.tolist()],
            "losses": [_json_float(v) for v in self.losses.tolist()],
            "sizes": self.sizes.tolist(),
            "info": self.info,
            "verification": self.verification,
        }


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


def _nanmean(a: np.ndarray) -> float:
    ok = ~np.isnan(a)
    return float(np.mean(a[ok])) if ok.any() else math.nan


def _nanmin(a: np.ndarray) -> float:
    ok = ~np.isnan(a)
    return float(np.min(a[ok])) if ok.any() else math.nan
