r"""Component statistics at one point: pure functions of ``(n_i, d_i, ‖∇f‖)`` (DESIGN §2).

At a point ``x_k`` with component gradients ``g_i = ∇f_i(x_k)`` and full gradient
``∇f = (1/m) Σ_i g_i`` (17), everything here is computed from three inputs only:

* ``norms``: ``n_i = ‖g_i‖``,
* ``dots``: ``d_i = ⟨g_i, ∇f⟩``,
* ``grad_norm``: ``‖∇f‖``.

No torch import, no autograd: inputs are numpy arrays, sequences or (duck-typed)
torch tensors, converted to float64 numpy.

Formulas (equation numbers of Qian et al., AISTATS 2021):

=================  ===========================================================
``cos``            ``cos θ_i = d_i / (n_i ‖∇f‖)``
``beta`` (19)      ``β_i = d_i / ‖∇f‖²``; ``Σ_i β_i = m`` (20)
``t_norm`` (18)    ``‖t_i‖ = sqrt(n_i² − β_i² ‖∇f‖²)`` where ``g_i = β_i ∇f + t_i``
γ (21)             ``γ_i(η) = min{1, η/n_i}``
``descent`` (23)   ``D(η) = ⟨Σ_i C(g_i; η), ∇f⟩ = Σ_i γ_i(η) d_i``
``ratio``          ``ρ(η) = D(η) / (m ‖∇f‖²)``; 1 at ``η = ∞``
``c1`` (31)        mean of the cosines (A3: every cos ≥ 0 and c1 > 0)
``c2`` (32)        ``min_i n_i / max_i n_i``
B2                 ``Σ_i cos θ_i > 0``
``bound33`` (33)   ``m · min{η c1, c2 ‖∇f‖} · ‖∇f‖`` (``D(η) ≥`` this under A3)
(36)               ``max_i ‖g_i − ∇f‖ / n_i``, ``‖g_i − ∇f‖² = n_i² − 2 d_i + ‖∇f‖²``
=================  ===========================================================

Conventions for degenerate inputs (never a crash, never a silent 0/0):

* ``n_i = 0`` (a zero component): ``cos_i`` is NaN (flag ``undefined_cosine``),
  ``γ_i = 1``, its term in ``D(η)`` is 0, and it is left out of ``c1``, A3 and B2
  (it cannot push the update either way). ``c2 = 0``. Its (36) ratio is
  ``‖∇f‖/0 = inf`` (NaN if ``‖∇f‖ = 0`` too).
* ``‖∇f‖ = 0`` (flag ``zero_full_gradient``): ``cos``, ``beta``, ``t_norm``,
  ``ratio``, ``c1`` and ``bound33`` are NaN, A3 and B2 are False; ``descent`` is
  still computed (it is ``⟨·, 0⟩ = 0`` for consistent inputs).
* ``c1`` is the mean over the *defined* cosines; NaN (flag ``no_defined_cosine``)
  when there is none. ``c2`` is NaN when every norm is 0.
* Cosines are clamped to ``[−1, 1]`` (rounding can step outside).
* ``t_norm`` and the (36) radicand are clamped at 0 before the square root.

**Preconditioned steps** (Adam, AdamW; DESIGN §2): a step along ``−P⁻¹C(g_i; η)``
descends along ``u = P⁻¹∇f``. :class:`DirectionStats` is the same table for the
dots ``d^P_i = ⟨g_i, u⟩`` with one more input, ``⟨∇f, u⟩``: the preconditioned
descent ratio ``ρ_P(η) = Σ_i γ_i(η) d^P_i / (m⟨∇f, u⟩)``, cosines to u, A3 under
P, the exact η-profile (:class:`EtaProfile` with ``inner``). :class:`ComponentStats`
is its case ``u = ∇f`` (P = 1), with the quantities only that case has
(``t_norm``, (33), (36)).

Also here, because it is a function of the same three inputs: the gradient
**noise scale** (:func:`noise_scale`, a heuristic) and the mean cosine it
predicts at other batch sizes (:func:`predicted_cos`). This module is the only
place that says what a statistic means; the engine returns ``n_i``, ``d_i``,
``f_i``, ``‖∇f‖`` and sums, and the epochs.csv row, the ``clipscope probe`` table
and the report all read the values below.

Errors: bad input is a :class:`ValueError`; a NaN or infinite input is a
:class:`~clipscope.errors.NonFiniteError` (a ``ValueError`` too).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from clipscope.errors import NonFiniteError

__all__ = [
    "ComponentStats",
    "DirectionStats",
    "EtaProfile",
    "check_eta",
    "noise_scale",
    "predicted_cos",
]

# Relative tolerances for the consistency flags (inputs may come from float32 gradients).
_CS_RTOL = 1e-6
_SUM_RTOL = 1e-4
# Largest number of (eta, component) pairs evaluated in one vectorised block.
_BLOCK = 1 << 20


def check_eta(eta: Any) -> float:
    """Validate a clipping threshold and return it as a float.

    ``η`` must be a real number ``> 0``; ``math.inf`` means no clipping. ints,
    numpy scalars and one-element tensors/arrays are accepted. bools, strings,
    ``None``, complex numbers, NaN, ``η ≤ 0`` and arrays with more than one element
    raise :class:`ValueError` naming the value.

    Examples
    --------
    >>> check_eta(2), check_eta(math.inf)
    (2.0, inf)
    >>> check_eta(-1.0)
    Traceback (most recent call last):
    ...
    ValueError: eta must be a positive number or math.inf, got -1.0
    """
    value = eta
    if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor
        if value.numel() != 1:
            raise ValueError(
                f"eta must be a single number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"eta must be a single number, got an array of shape {value.shape}")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"eta must be a positive number or math.inf, got {eta!r}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"eta is too large for a float: {eta!r}") from None
    if not out > 0:  # also catches NaN
        raise ValueError(f"eta must be a positive number or math.inf, got {eta!r}")
    return out


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        if x.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor")
        x = x.detach().cpu().double().numpy()
    if isinstance(x, (str, bytes)) or x is None:
        raise ValueError(f"{name} must be numbers, got {x!r}")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers: {err}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _check_etas(eta: Any) -> tuple[np.ndarray, bool]:
    """Return ``(etas as a float64 array, was_scalar)``; every entry validated."""
    if isinstance(eta, numbers.Number) or np.ndim(eta) == 0 or _is_scalar_tensor(eta):
        return np.asarray(check_eta(eta)), True
    arr = _to_numpy(eta, "eta")
    bad = ~(arr > 0)
    if bad.any():
        raise ValueError(
            f"eta must be positive numbers or inf, got {arr[bad].flat[0]!r} "
            f"at index {int(np.flatnonzero(bad.ravel())[0])}"
        )
    return arr, False


def _is_scalar_tensor(x: Any) -> bool:
    return hasattr(x, "numel") and hasattr(x, "dim") and x.dim() == 0


def _validate(
    norms: Any, dots: Any, grad_norm: Any, name: str = "grad_norm"
) -> tuple[np.ndarray, np.ndarray, float]:
    n = _to_numpy(norms, "norms")
    d = _to_numpy(dots, "dots")
    g = _to_numpy(grad_norm, name)
    if n.ndim != 1 or d.ndim != 1:
        raise ValueError(f"norms and dots must be 1-D, got shapes {n.shape} and {d.shape}")
    if n.shape != d.shape:
        raise ValueError(f"norms and dots differ in length: {n.size} and {d.size}")
    if n.size == 0:
        raise ValueError("no components (m = 0)")
    if g.size != 1:
        raise ValueError(f"{name} must be one number, got shape {g.shape}")
    for label, arr in (("norms", n), ("dots", d)):
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NonFiniteError(f"{label}[{i}] = {arr[i]} is not finite")
    neg = n < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"norms[{i}] = {n[i]} is negative")
    gn = float(g.reshape(()))
    if not math.isfinite(gn):
        raise NonFiniteError(f"{name} = {gn} is not finite")
    if not gn >= 0:
        raise ValueError(f"{name} must be >= 0, got {gn}")
    n.setflags(write=False)
    d.setflags(write=False)
    return n, d, gn


def _check_inner(inner: Any) -> float:
    """``⟨∇f, v⟩`` of a descent direction: one finite number ``≥ 0``."""
    arr = _to_numpy(inner, "inner")
    if arr.size != 1:
        raise ValueError(f"inner must be one number, got shape {arr.shape}")
    value = float(arr.reshape(()))
    if not math.isfinite(value):
        raise NonFiniteError(f"inner = {value} is not finite")
    if not value >= 0:
        raise ValueError(
            f"inner = ⟨∇f, v⟩ must be >= 0 (v = P⁻¹∇f with P positive definite), got {value}"
        )
    return value


def _blocks(etas: np.ndarray, m: int):
    step = max(1, _BLOCK // max(m, 1))
    for start in range(0, etas.size, step):
        yield slice(start, start + step)


class DirectionStats:
    r"""The clipped components' descent along a direction ``v``: from ``(n, d^v, ‖v‖, ⟨∇f, v⟩)``.

    The general form of :class:`ComponentStats` (which is the case ``v = ∇f``).
    With a step that moves the parameters along ``−A C(g_i; η)`` for a fixed
    symmetric positive (semi)definite ``A`` -- Adam's and AdamW's preconditioner
    ``A = P⁻¹``, frozen at the probe -- one pass over the components changes f
    to first order by ``−α Σ_i γ_i(η) ⟨g_i, A∇f⟩``: the descent is along
    ``v = A∇f`` (DESIGN §2, "Preconditioned steps"). Every quantity below is a
    function of

    * ``norms``: ``n_i = ‖g_i‖`` (the norms the clip uses: ``γ_i(η) = min{1, η/n_i}``),
    * ``dots``: ``d^v_i = ⟨g_i, v⟩``,
    * ``direction_norm``: ``‖v‖``,
    * ``inner``: ``⟨∇f, v⟩ ≥ 0``, so that ``Σ_i d^v_i = m⟨∇f, v⟩`` (checked:
      flag ``dots_sum_mismatch``).

    =================  ========================================================
    ``cos``            ``d^v_i / (n_i ‖v‖)``: the cosine of ``g_i`` with ``v``
    ``beta``           ``d^v_i / ⟨∇f, v⟩``; ``Σ_i β_i = m``
    ``descent``        ``D_v(η) = Σ_i γ_i(η) d^v_i = ⟨Σ_i C(g_i; η), v⟩``
    ``ratio``          ``ρ_v(η) = D_v(η) / (m⟨∇f, v⟩)``; 1 at ``η = ∞``
    ``c1``, A3, B2     as for ``∇f``, with the cosines to ``v``
    ``c2``             ``min n_i / max n_i`` (does not depend on ``v``)
    =================  ========================================================

    With ``v = u = P⁻¹∇f``, ``ratio`` is the preconditioned descent ratio
    ``ρ_P(η) = Σ_i min{1, η/n_i}⟨g_i, u⟩ / Σ_i ⟨g_i, u⟩``. The conventions for
    zero norms are :class:`ComponentStats`'; ``‖v‖ = 0`` (flag
    ``zero_direction``) or ``⟨∇f, v⟩ = 0`` make ``cos`` / ``ratio`` / ``c1`` NaN.
    The paper's (33) and (36) are statements about ``v = ∇f`` only: they are on
    :class:`ComponentStats`, not here.

    Parameters
    ----------
    norms : array_like or Tensor, shape (m,)
        ``n_i ≥ 0``.
    dots : array_like or Tensor, shape (m,)
        ``d^v_i = ⟨g_i, v⟩``.
    direction_norm : float
        ``‖v‖ ≥ 0``.
    inner : float
        ``⟨∇f, v⟩ ≥ 0``.

    Raises
    ------
    ValueError
        Lengths differ or are 0, not 1-D, negative norms, ``‖v‖ < 0`` or ``inner < 0``.
    NonFiniteError
        A NaN or infinite entry.

    Examples
    --------
    ``g = (−2, −2, 10)`` (Example 1 at x = 1), ``P = 4`` (one coordinate): ``u = 0.5``.
    ρ_P is ρ: a scalar preconditioner only rescales the step.

    >>> s = DirectionStats([2.0, 2.0, 10.0], [-1.0, -1.0, 5.0], 0.5, 1.0)
    >>> float(s.ratio(2.0)), float(s.ratio(math.inf)), s.profile().negative_intervals()
    (-0.3333333333333333, 1.0, [(0.0, 4.0)])
    """

    __slots__ = (
        "_beta",
        "_c1",
        "_c2",
        "_cos",
        "_d",
        "_defined",
        "_flags",
        "_inner",
        "_m",
        "_n",
        "_profile",
        "_sorted_n",
        "_total",
        "_vn",
    )
    _ZERO_FLAG = "zero_direction"

    def __init__(self, norms: Any, dots: Any, direction_norm: Any, inner: Any) -> None:
        n, d, vn = _validate(norms, dots, direction_norm, "direction_norm")
        inner = _check_inner(inner)
        self._setup(n, d, vn, inner, n.size * inner)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            beta = d / inner if inner > 0 else np.full(self._m, np.nan)
        beta.setflags(write=False)
        self._beta = beta
        self._flags = self._make_flags()

    def _setup(self, n: np.ndarray, d: np.ndarray, vn: float, inner: float, total: float) -> None:
        """Set the arrays every direction shares: cosines, c1, c2 (``total = m⟨∇f, v⟩``)."""
        self._n, self._d, self._vn, self._m = n, d, vn, n.size
        self._inner, self._total = inner, total
        self._profile: EtaProfile | None = None
        self._sorted_n = np.sort(n)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            defined = (n > 0) & (vn > 0)
            cos = np.full(self._m, np.nan)
            cos[defined] = np.clip(d[defined] / n[defined] / vn, -1.0, 1.0)
        for arr in (cos, defined):
            arr.setflags(write=False)
        self._cos, self._defined = cos, defined
        self._c1 = float(cos[defined].mean()) if defined.any() else math.nan
        nmax = float(n.max())
        self._c2 = float(n.min()) / nmax if nmax > 0 else math.nan

    def _make_flags(self) -> list[str]:
        n, d, vn, m = self._n, self._d, self._vn, self._m
        flags = []
        if m == 1:
            flags.append("m_is_1")
        if (n == 0).any():
            flags.append("zero_component_norm")
        if vn == 0 or self._total == 0:
            flags.append(self._ZERO_FLAG)
        if not self._defined.all():
            flags.append("undefined_cosine")
        if not self._defined.any():
            flags.append("no_defined_cosine")
        with np.errstate(over="ignore"):
            if (np.abs(d) > n * vn * (1 + _CS_RTOL) + 1e-300).any():
                flags.append("cauchy_schwarz_violation")
            total = self._total
            if abs(d.sum() - total) > _SUM_RTOL * (np.abs(d).sum() + total):
                flags.append("dots_sum_mismatch")
        return flags

    # -- inputs ---------------------------------------------------------------
    @property
    def m(self) -> int:
        """Number of components ``m``."""
        return self._m

    @property
    def norms(self) -> np.ndarray:
        """``n_i = ‖g_i‖``."""
        return self._n

    @property
    def dots(self) -> np.ndarray:
        """``d^v_i = ⟨g_i, v⟩``."""
        return self._d

    @property
    def direction_norm(self) -> float:
        """``‖v‖``."""
        return self._vn

    @property
    def inner(self) -> float:
        """``⟨∇f, v⟩`` (``‖∇f‖²`` for :class:`ComponentStats`)."""
        return self._inner

    @property
    def total(self) -> float:
        """``m⟨∇f, v⟩``: what ``Σ_i d^v_i`` is, and the denominator of :meth:`ratio`."""
        return self._total

    # -- per-component --------------------------------------------------------
    @property
    def cos(self) -> np.ndarray:
        """``d_i/(n_i‖v‖)`` in ``[−1, 1]``; NaN where ``n_i = 0`` or ``‖v‖ = 0``."""
        return self._cos

    @property
    def cos_defined(self) -> np.ndarray:
        """Boolean mask of the components whose cosine is defined."""
        return self._defined

    @property
    def beta(self) -> np.ndarray:
        """``β_i = d_i/⟨∇f, v⟩`` (19 for ``v = ∇f``); ``Σ β_i = m`` (20). NaN if it is 0."""
        return self._beta

    # -- scalars --------------------------------------------------------------
    @property
    def c1(self) -> float:
        """Mean of the defined cosines (A3, (31)); NaN when none is defined."""
        return self._c1

    @property
    def c2(self) -> float:
        """``min n_i / max n_i`` (A4, (32)); NaN when every norm is 0."""
        return self._c2

    @property
    def a3_holds(self) -> bool:
        """A3: every defined cosine ``≥ 0`` and ``c1 > 0`` (False if none is defined)."""
        ok = self._defined.any() and bool((self._cos[self._defined] >= 0).all())
        return bool(ok and self._c1 > 0)

    @property
    def b2_holds(self) -> bool:
        """B2: ``Σ cos θ_i > 0`` over the defined cosines (False if none is defined)."""
        return bool(self._defined.any() and self._cos[self._defined].sum() > 0)

    @property
    def min_cos(self) -> float:
        """Smallest defined cosine; NaN when none is defined."""
        cos = self._cos[self._defined]
        return float(cos.min()) if cos.size else math.nan

    @property
    def negative_cos_share(self) -> float:
        """Share of the *defined* cosines that are negative; NaN when none is defined."""
        cos = self._cos[self._defined]
        return float(np.mean(cos < 0)) if cos.size else math.nan

    @property
    def flags(self) -> list[str]:
        """Names of the degenerate or suspicious features of the input.

        ``m_is_1``, ``zero_component_norm``, ``zero_direction`` (``zero_full_gradient``
        for :class:`ComponentStats`), ``undefined_cosine``, ``no_defined_cosine``,
        ``cauchy_schwarz_violation`` (some ``|d_i| > n_i‖v‖(1+1e-6)``),
        ``dots_sum_mismatch`` (``Σ d_i`` differs from ``m⟨∇f, v⟩`` by more than
        ``1e-4·(Σ|d_i| + m⟨∇f, v⟩)``).
        """
        return list(self._flags)

    # -- functions of η -------------------------------------------------------
    def gamma(self, eta: Any) -> np.ndarray:
        """``γ_i(η) = min{1, η/n_i}`` (21), 1 where ``n_i = 0``; shape ``eta.shape + (m,)``."""
        etas, _ = _check_etas(eta)
        e = etas[..., None]
        n = self._n
        return np.where(n > 0, np.minimum(e, n) / np.where(n > 0, n, 1.0), 1.0)

    def descent(self, eta: Any) -> np.ndarray | float:
        """``D(η) = Σ_i min{n_i, η}·d_i/n_i = Σ_i γ_i(η) d_i`` (23), zero components giving 0.

        The direct O(m) evaluation per η (the slow twin of :class:`EtaProfile`).

        Parameters
        ----------
        eta : float or array_like
            One threshold or an array of them (each ``> 0``, ``inf`` allowed).

        Returns
        -------
        float or numpy.ndarray
            ``D`` at each ``η``, same shape as ``eta``.
        """
        etas, scalar = _check_etas(eta)
        flat = etas.ravel()
        out = np.empty(flat.size)
        pos = self._n > 0
        n, d = self._n[pos], self._d[pos]
        for sl in _blocks(flat, n.size):
            e = flat[sl, None]
            out[sl] = (np.minimum(e, n) / n * d).sum(axis=1)  # γ_i = 1 exactly when n_i ≤ η
        return float(out[0]) if scalar else out.reshape(etas.shape)

    def ratio(self, eta: Any) -> np.ndarray | float:
        """``ρ(η) = D(η)/(m⟨∇f, v⟩)``; 1 at ``η = ∞``, negative when clipping reverses descent.

        NaN at every ``η`` when ``m⟨∇f, v⟩ = 0`` (``‖∇f‖ = 0``).
        """
        return _ratio(self.descent(eta), self._total)

    def clipped_fraction(self, eta: Any) -> np.ndarray | float:
        """Share of components with ``n_i > η``."""
        etas, scalar = _check_etas(eta)
        above = self._m - np.searchsorted(self._sorted_n, etas, side="right")
        out = above / self._m
        return float(out) if scalar else out

    def profile(self) -> EtaProfile:
        """Return the exact η-profile of ``D`` (built once, then cached)."""
        if self._profile is None:
            self._profile = EtaProfile(self._n, self._d, self._vn, inner=self._inner)
        return self._profile

    # -- export ---------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Plain-Python summary (floats, ints, bools, list of flags); NaN stays NaN."""
        cos = self._cos[self._defined]
        return {
            "m": self._m,
            "direction_norm": self._vn,
            "inner": self._inner,
            "norm_min": float(self._n.min()),
            "norm_max": float(self._n.max()),
            "norm_mean": float(self._n.mean()),
            "c1": self._c1,
            "c2": self._c2,
            "cos_min": self.min_cos,
            "n_negative_cos": int((cos < 0).sum()),
            "negative_cos_share": self.negative_cos_share,
            "a3_holds": self.a3_holds,
            "b2_holds": self.b2_holds,
            "flags": self.flags,
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the four inputs as lists/floats; ``from_dict`` inverts it exactly."""
        return {
            "norms": self._n.tolist(),
            "dots": self._d.tolist(),
            "direction_norm": self._vn,
            "inner": self._inner,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectionStats:
        """Rebuild from :meth:`to_dict` output."""
        return cls(data["norms"], data["dots"], data["direction_norm"], data["inner"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(m={self._m}, direction_norm={self._vn:.6g}, "
            f"inner={self._inner:.6g}, flags={self._flags})"
        )


class ComponentStats(DirectionStats):
    """Statistics of ``m`` component gradients at one point, from ``(n, d, ‖∇f‖)``.

    :class:`DirectionStats` along ``v = ∇f`` (``‖v‖ = ‖∇f‖``, ``⟨∇f, v⟩ = ‖∇f‖²``),
    plus what only that direction has: ``t_norm`` (18), the (36) ratios and the
    bound (33). See the module docstring for the formulas and for the conventions
    on zero norms and a zero full gradient. Arrays are read-only float64; scalars
    are plain Python floats/bools.

    Parameters
    ----------
    norms : array_like or Tensor, shape (m,)
        ``n_i = ‖g_i‖ ≥ 0``.
    dots : array_like or Tensor, shape (m,)
        ``d_i = ⟨g_i, ∇f⟩``.
    grad_norm : float or 0-d Tensor
        ``‖∇f‖ ≥ 0`` with ``∇f = (1/m) Σ g_i``.

    Raises
    ------
    ValueError
        Lengths differ or are 0, not 1-D, negative norms.
    NonFiniteError
        A NaN or infinite entry (a ``ValueError`` subclass).

    Examples
    --------
    Example 1 of the paper at ``x = 1``: ``g = (−2, −2, 10)``, ``∇f = 2``.

    >>> s = ComponentStats([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)
    >>> float(s.descent(2.0)), float(s.descent(math.inf)), float(s.ratio(math.inf))
    (-4.0, 12.0, 1.0)
    >>> s.profile().negative_intervals()
    [(0.0, 4.0)]
    """

    __slots__ = ("_t", "_zhang")
    _ZERO_FLAG = "zero_full_gradient"

    def __init__(self, norms: Any, dots: Any, grad_norm: Any) -> None:
        n, d, g = _validate(norms, dots, grad_norm)
        m = n.size
        self._setup(n, d, g, g * g, m * g * g)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if g > 0:
                beta = d / g / g
                a = np.abs(d) / g
                t = np.sqrt(np.maximum(0.0, (n - a) * (n + a)))
            else:
                beta = np.full(m, np.nan)
                t = np.full(m, np.nan)
            rad = np.sqrt(np.maximum(0.0, n * n - 2.0 * d + g * g))
            zhang = np.where(n > 0, rad / np.where(n > 0, n, 1.0), math.inf if g > 0 else np.nan)
        for arr in (beta, t, zhang):
            arr.setflags(write=False)
        self._beta, self._t, self._zhang = beta, t, zhang
        self._flags = self._make_flags()

    @property
    def grad_norm(self) -> float:
        """``‖∇f‖``."""
        return self._vn

    @property
    def cos(self) -> np.ndarray:
        """``cos θ_i = d_i/(n_i‖∇f‖)`` in ``[−1, 1]``; NaN where ``n_i = 0`` or ``‖∇f‖ = 0``."""
        return self._cos

    @property
    def beta(self) -> np.ndarray:
        """``β_i = d_i/‖∇f‖²`` (19); ``Σ β_i = m`` (20). NaN if ``‖∇f‖ = 0``."""
        return self._beta

    @property
    def t_norm(self) -> np.ndarray:
        """``‖t_i‖ = sqrt(max(0, n_i² − β_i²‖∇f‖²))`` (18). NaN if ``‖∇f‖ = 0``."""
        return self._t

    @property
    def zhang_ratios(self) -> np.ndarray:
        """Per component ``‖g_i − ∇f‖/n_i``; inf where ``n_i = 0 < ‖∇f‖``, NaN where both 0."""
        return self._zhang

    @property
    def zhang_ratio(self) -> float:
        """(36): ``max_i ‖g_i − ∇f‖/n_i``, NaN entries skipped; NaN if all are NaN."""
        z = self._zhang[~np.isnan(self._zhang)]
        return float(z.max()) if z.size else math.nan

    @property
    def flags(self) -> list[str]:
        """Names of the degenerate or suspicious features of the input.

        ``m_is_1``, ``zero_component_norm``, ``zero_full_gradient``,
        ``undefined_cosine``, ``no_defined_cosine``, ``cauchy_schwarz_violation``
        (some ``|d_i| > n_i‖∇f‖(1+1e-6)``), ``dots_sum_mismatch``
        (``Σ d_i`` differs from ``m‖∇f‖²`` by more than ``1e-4·(Σ|d_i| + m‖∇f‖²)``).
        """
        return list(self._flags)

    def bound33(self, eta: Any) -> np.ndarray | float:
        """Right side of (33): ``m·min{η c1, c2‖∇f‖}·‖∇f‖`` (``η c1 = 0`` when ``c1 = 0``).

        The paper proves ``D(η) ≥ bound33(η)`` under A3 only; the value is returned
        whatever A3 says. NaN when ``c1`` or ``c2`` is NaN.
        """
        etas, scalar = _check_etas(eta)
        with np.errstate(invalid="ignore", over="ignore"):
            ec1 = np.where(self._c1 == 0, 0.0, etas * self._c1)
            out = self._m * np.minimum(ec1, self._c2 * self._vn) * self._vn
        return float(out) if scalar else out

    def profile(self) -> EtaProfile:
        """Return the exact η-profile of ``D`` (built once, then cached)."""
        if self._profile is None:
            self._profile = EtaProfile(self._n, self._d, self._vn)
        return self._profile

    # -- export ---------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Plain-Python summary (floats, ints, bools, list of flags).

        NaN values stay NaN: ``json.dumps`` writes them as ``NaN`` (not strict
        JSON); pass ``allow_nan=False`` to catch them.
        """
        cos = self._cos[self._defined]
        return {
            "m": self._m,
            "grad_norm": self._vn,
            "norm_min": float(self._n.min()),
            "norm_max": float(self._n.max()),
            "norm_mean": float(self._n.mean()),
            "c1": self._c1,
            "c2": self._c2,
            "cos_min": self.min_cos,
            "n_negative_cos": int((cos < 0).sum()),
            "negative_cos_share": self.negative_cos_share,
            "a3_holds": self.a3_holds,
            "b2_holds": self.b2_holds,
            "zhang_ratio": self.zhang_ratio,
            "flags": self.flags,
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the three inputs as lists/floats; ``from_dict`` inverts it exactly."""
        return {"norms": self._n.tolist(), "dots": self._d.tolist(), "grad_norm": self._vn}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentStats:
        """Rebuild from :meth:`to_dict` output."""
        return cls(data["norms"], data["dots"], data["grad_norm"])

    def __repr__(self) -> str:
        return f"ComponentStats(m={self._m}, grad_norm={self._vn:.6g}, flags={self._flags})"


def _ratio(D: np.ndarray | float, total: float) -> np.ndarray | float:
    """``D / total`` (``total = m⟨∇f, v⟩``); NaN everywhere when ``total = 0``."""
    if total == 0:
        return math.nan if np.ndim(D) == 0 else np.full(np.shape(D), np.nan)
    return D / total


class EtaProfile:
    r"""The exact descent product ``D(η)`` for every ``η > 0``: piecewise linear.

    With ``b_1 < … < b_K`` the distinct positive norms and ``b_0 = 0``, on piece
    ``k`` (``η ∈ [b_k, b_{k+1}]``, ``b_{K+1} = ∞``)

    .. math:: D(η) = A_k + η S_k, \quad A_k = \sum_{n_i ≤ b_k} d_i, \quad
              S_k = \sum_{n_i > b_k} d_i / n_i .

    ``D`` is continuous, ``D(0^+) = 0`` and ``D = Σ_{n_i>0} d_i = m‖∇f‖²`` for
    ``η ≥ max n_i``. Zero components contribute nothing.

    The same holds for the dots ``d^v_i = ⟨g_i, v⟩`` with another direction
    (:class:`DirectionStats`; the preconditioned ``u = P⁻¹∇f``): give ``inner =
    ⟨∇f, v⟩`` and ``grad_norm = ‖v‖``, and the ratio's denominator is
    ``m⟨∇f, v⟩`` instead of ``m‖∇f‖²`` (``ratio`` is then ``ρ_P``).

    Parameters
    ----------
    norms, dots, grad_norm
        As for :class:`ComponentStats` (validated the same way).
    inner : float, optional
        ``⟨∇f, v⟩ ≥ 0`` when ``dots`` are with a direction ``v ≠ ∇f``.

    Examples
    --------
    >>> p = EtaProfile([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)
    >>> p.breakpoints.tolist(), p.values.tolist()
    ([2.0, 10.0], [-4.0, 12.0])
    >>> p([1.0, 4.0, 100.0]).tolist()
    [-2.0, 0.0, 12.0]
    >>> p.min_eta_for_ratio(0.5)
    7.0
    """

    def __init__(self, norms: Any, dots: Any, grad_norm: Any, *, inner: Any = None) -> None:
        n, d, g = _validate(norms, dots, grad_norm)
        self._m, self._g = n.size, g
        # the ratio's denominator: m‖∇f‖², or m⟨∇f, v⟩ for the dots with another direction v
        self._total = n.size * g * g if inner is None else n.size * _check_inner(inner)
        pos = n > 0
        order = np.argsort(n[pos], kind="stable")
        ns, ds = n[pos][order], d[pos][order]
        b, start = np.unique(ns, return_index=True)
        if b.size:
            gd = np.add.reduceat(ds, start)
            with np.errstate(over="ignore"):  # only inconsistent inputs (|d_i| ≫ n_i) overflow
                gw = np.add.reduceat(ds / ns, start)
        else:
            gd = gw = np.zeros(0)
        self._b = b
        self._A = np.concatenate([[0.0], np.cumsum(gd)])
        self._S = np.concatenate([np.cumsum(gw[::-1])[::-1], [0.0]])
        self._lo = np.concatenate([[0.0], b])
        self._hi = np.concatenate([b, [math.inf]])
        for arr in (self._b, self._A, self._S, self._lo, self._hi):
            arr.setflags(write=False)

    @property
    def breakpoints(self) -> np.ndarray:
        """The sorted distinct positive norms ``b_1 < … < b_K``."""
        return self._b

    @property
    def values(self) -> np.ndarray:
        """``D(b_k)`` at each breakpoint."""
        return self._A[1:] + self._b * self._S[1:]

    @property
    def pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(lo, hi, intercept A_k, slope S_k)`` of the ``K + 1`` linear pieces."""
        return self._lo, self._hi, self._A, self._S

    def __call__(self, eta: Any) -> np.ndarray | float:
        """``D(η)`` by binary search for the piece; ``eta`` scalar or array."""
        etas, scalar = _check_etas(eta)
        k = np.searchsorted(self._b, etas, side="left")
        S = self._S[k]
        with np.errstate(invalid="ignore"):
            out = self._A[k] + np.where(S == 0, 0.0, etas * S)
        return float(out) if scalar else out

    @property
    def total(self) -> float:
        """The ratio's denominator: ``m‖∇f‖²``, or ``m⟨∇f, v⟩`` (``inner`` given)."""
        return self._total

    def ratio_curve(self, eta: Any) -> np.ndarray | float:
        """``ρ(η) = D(η)/(m‖∇f‖²)`` (or ``/(m⟨∇f, v⟩)``) at the given ``η``; NaN if that is 0."""
        return _ratio(self(eta), self._total)

    # The same names as the direct (slow) evaluations of :class:`ComponentStats`.
    def descent(self, eta: Any) -> np.ndarray | float:
        """``D(η)``, the fast twin of :meth:`ComponentStats.descent`."""
        return self(eta)

    def ratio(self, eta: Any) -> np.ndarray | float:
        """``ρ(η)``, the fast twin of :meth:`ComponentStats.ratio`."""
        return self.ratio_curve(eta)

    def negative_intervals(self) -> list[tuple[float, float]]:
        """Return the closed intervals ``[lo, hi]`` of ``η > 0`` on which ``D(η) ≤ 0``.

        Solved exactly piece by piece, touching intervals merged. ``lo = 0.0``
        means ``(0, hi]`` (η = 0 itself is excluded); ``hi`` may be ``inf`` (only
        when ``m‖∇f‖² = 0``). A single point ``(x, x)`` is where ``D`` touches 0.
        """
        found: list[list[float]] = []
        for lo, hi, A, S in zip(self._lo, self._hi, self._A, self._S, strict=True):
            lo, hi, A, S = float(lo), float(hi), float(A), float(S)
            if S == 0:
                iv = (lo, hi) if A <= 0 else None
            else:
                root = -A / S
                if S > 0:
                    iv = (lo, min(hi, root)) if root >= lo else None
                else:
                    iv = (max(lo, root), hi) if root <= hi else None
            if iv is None or iv[1] <= 0:
                continue
            if found and found[-1][1] >= iv[0]:
                found[-1][1] = max(found[-1][1], iv[1])
            else:
                found.append([iv[0], iv[1]])
        return [(a, b) for a, b in found]

    def min_eta_for_ratio(self, target: float) -> float:
        """``inf{η > 0 : ρ(η) ≥ target}``: the smallest threshold reaching ``target``.

        ``ρ`` is not monotone in general, so ``ρ`` may fall below ``target`` again
        at larger ``η``; this is the first ``η`` where it is reached. Returns
        ``0.0`` when arbitrarily small ``η`` reach it (every ``target < 0``),
        ``math.inf`` when no ``η`` does, ``math.nan`` when ``‖∇f‖ = 0``
        (``ρ`` undefined; with ``inner``: when ``⟨∇f, v⟩ = 0``).
        """
        if isinstance(target, bool) or not isinstance(target, numbers.Real):
            raise ValueError(f"target must be a real number, got {target!r}")
        target = float(target)
        if math.isnan(target):
            raise ValueError("target must be a real number, got nan")
        if self._total == 0:
            return math.nan
        T = target * self._total
        if T < 0:
            return 0.0
        for lo, hi, A, S in zip(self._lo, self._hi, self._A, self._S, strict=True):
            lo, hi, A, S = float(lo), float(hi), float(A), float(S)
            if S == 0:
                if A >= T:
                    return lo
                continue
            root = (T - A) / S
            if S > 0 and root <= hi:
                return max(lo, root)
            if S < 0 and root >= lo and (lo > 0 or root > 0):
                return lo
        return math.inf

    def __repr__(self) -> str:
        return f"EtaProfile(m={self._m}, breakpoints={self._b.size})"


# -- the gradient noise scale (a heuristic) --------------------------------------------


def noise_scale(norms: Any, grad_norm: float, batch_size: int, n_samples: int) -> dict[str, Any]:
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
    finite-population correction ``(1 + B_noise (N−B')/(B'(N−1)))^{-1/2}``
    (:func:`predicted_cos`). These treat ``‖g‖`` as concentrated and the
    partition as random; corpus-order partitions, unequal batch sizes and heavy
    tails all break them. They are reported next to the measured mean cosine,
    not used by any theorem.

    Parameters
    ----------
    norms : array_like, shape (m,)
        ``n_i``.
    grad_norm : float
        ``‖∇f‖``.
    batch_size, n_samples : int
        Nominal component batch size B and the number of samples N.

    Returns
    -------
    dict
        ``heuristic`` (True), ``m``, ``batch_size``, ``n_samples``,
        ``mean_sq_deviation`` (S), ``trace_sigma`` (NaN when ``N ≤ B``) and
        ``B_noise`` (NaN when ``‖∇f‖ = 0``).

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
