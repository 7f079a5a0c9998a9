r"""The report's labels and the rules that set them (``docs/reproduce.md``, "Labels").

Every word of judgement the report and ``findings.json`` print -- "grows with
B", "kept … of the descent", "satisfied" -- comes from one function here, and
each function is the rule written in the docs, with its thresholds named:

* :func:`trend_label`: Figure 1's "grows with B" only when the run averages
  are **strictly increasing** over at least :data:`MIN_BATCH_SIZES` batch
  sizes (Spearman ρ_s = 1); ``RHO_WEAK ≤ ρ_s < 1`` is a warning ("rises, not
  monotone"), ``|ρ_s| < RHO_WEAK`` "no trend", ``ρ_s ≤ −RHO_WEAK`` "falls".
  The p-value is shown, never turned into a word: with n batch sizes the exact
  two-sided p of ρ_s = 1 is 2/n! (0.083 for 4).
* :func:`descent_label`: the smallest ρ(η) = D(η)/(m‖∇f‖²) at the run's η:
  ``ρ < 0`` reversed, ``ρ = 0`` cancelled (both bad), ``0 < ρ < KEPT_WARN``
  a warning ("kept only …"), ``ρ ≥ KEPT_WARN`` kept (good).
* :func:`preconditioned_label`: the same rule for the smallest ρ_P(η) =
  D_P(η)/(m⟨∇f, u⟩), u = P⁻¹∇f (Adam, AdamW), at the run's η, in words about
  the *preconditioned* descent.
* :func:`reversal_label`: whether any η > 0 reverses the preconditioned
  descent at some probe (``eta_reversal`` of the advice on ρ_P): none is good,
  one is a warning naming the threshold below which it happens.
* :func:`unset_label`: probes where parameters had no optimizer state yet
  (P = 1 there): information, no judgement.
* :func:`verdict_class`: a theorem verdict's colour: ``satisfied`` good,
  ``violated`` bad, ``not checked`` / ``not applicable`` neutral.

Each label is ``{"label": key, "class": css class, "text": words}``; the CSS
classes are :data:`OK`, :data:`WARN`, :data:`BAD`, :data:`NA`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BAD",
    "KEPT_WARN",
    "MIN_BATCH_SIZES",
    "NA",
    "OK",
    "RHO_WEAK",
    "WARN",
    "descent_label",
    "drops",
    "preconditioned_label",
    "reversal_label",
    "trend_label",
    "unset_label",
    "verdict_class",
]

OK, WARN, BAD, NA = "ok", "warn", "bad", "na"
#: |Spearman ρ_s| below this over the batch sizes is "no trend".
RHO_WEAK = 0.5
#: Fewest batch sizes with finite values for any trend label.
MIN_BATCH_SIZES = 3
#: A smallest ρ(η) in (0, KEPT_WARN) is a warning: clipping kept less than this share.
KEPT_WARN = 0.5


def _label(key: str, css: str, text: str) -> dict[str, str]:
    return {"label": key, "class": css, "text": text}


def drops(batch_sizes: Sequence[int], values: Sequence[float]) -> list[str]:
    """Neighbouring batch sizes (finite values) where the larger one has the smaller value.

    >>> drops([8, 16, 32, 64], [0.35, 0.51, 0.69, 0.64])
    ['B = 64 below B = 32 (−0.05)']
    """
    pairs = [(b, v) for b, v in zip(batch_sizes, values, strict=True) if math.isfinite(v)]
    return [
        f"B = {b1} below B = {b0} (−{v0 - v1:.2g})" if v1 < v0 else f"B = {b1} equal to B = {b0}"
        for (b0, v0), (b1, v1) in itertools.pairwise(pairs)
        if v1 <= v0
    ]


def trend_label(trend: dict[str, Any]) -> dict[str, str]:
    """Label one Figure 1 trend (a :func:`clipscope.report.findings.rank_trend` dict).

    >>> trend_label({"batch_sizes": [8, 16, 32, 64], "values": [1, 2, 3, 4], "n": 4,
    ...              "spearman": 1.0, "p_value": 0.083})["label"]
    'grows'
    >>> trend_label({"batch_sizes": [8, 16, 32, 64], "values": [1, 2, 4, 3], "n": 4,
    ...              "spearman": 0.8, "p_value": 0.33})["class"]
    'warn'
    """
    n = int(trend.get("n") or 0)
    rho = trend.get("spearman")
    sizes, values = trend.get("batch_sizes", []), trend.get("values", [])
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if n < MIN_BATCH_SIZES or rho is None or not math.isfinite(rho):
        why = (
            "the values are equal at every batch size"
            if len(finite) >= MIN_BATCH_SIZES
            else f"fewer than {MIN_BATCH_SIZES} batch sizes with finite values ({len(finite)})"
        )
        return _label("undecided", NA, f"no trend can be stated: {why}")
    p = trend.get("p_value")
    stat = f"ρ_s = {rho:.2f}" + (
        f", exact p = {p:.2g}" if p is not None and math.isfinite(p) else ""
    )
    clean = [0.0 if v is None else float(v) for v in values]
    if rho == 1.0:
        return _label(
            "grows",
            OK,
            f"grows with B, as in the paper: strictly increasing over {n} batch sizes ({stat})",
        )
    if rho >= RHO_WEAK:
        below = "; ".join(drops(sizes, clean))
        return _label(
            "rises_not_monotone",
            WARN,
            f"rises with B but not monotonically ({below}; {stat}): weaker than the paper's growth",
        )
    if rho > -RHO_WEAK:
        return _label("no_trend", BAD, f"no trend with B ({stat}); the paper: it grows")
    return _label("falls", BAD, f"falls with B ({stat}); the paper: it grows")


def descent_label(rho: float | None) -> dict[str, str]:
    """Label a smallest ρ(η) = D(η)/(m‖∇f‖²) at the run's η (the share of descent kept).

    >>> descent_label(0.082)["text"]
    'clipping kept only 8.2% of the unclipped descent (never reversed it)'
    >>> descent_label(-0.1)["class"], descent_label(0.7)["class"]
    ('bad', 'ok')
    """
    return _kept(
        rho,
        undecided="no finite ρ(η) recorded",
        reversed_="clipping reversed descent",
        cancelled="clipping cancelled descent (ρ = 0)",
        descent="the unclipped descent",
        all_kept="(ρ ≥ 1)",
    )


def _kept(
    share: float | None,
    *,
    undecided: str,
    reversed_: str,
    cancelled: str,
    descent: str,
    all_kept: str,
) -> dict[str, str]:
    """Apply the rule of :func:`descent_label` and :func:`preconditioned_label` in their words."""
    if share is None or not math.isfinite(share):
        return _label("undecided", NA, undecided)
    if share < 0:
        return _label("reversed", BAD, reversed_)
    if share == 0:
        return _label("cancelled", BAD, cancelled)
    if share < KEPT_WARN:
        text = f"clipping kept only {100 * share:.2g}% of {descent} (never reversed it)"
        return _label("kept_little", WARN, text)
    if share >= 1:
        return _label("kept", OK, f"clipping kept all of {descent} {all_kept}")
    return _label("kept", OK, f"clipping kept at least {_at_least(share)} of {descent}")


def _at_least(share: float) -> str:
    """``share`` in (0, 1) as a percentage rounded **down** to 0.1 %: "at least" stays true.

    >>> _at_least(0.5275), _at_least(0.99996), _at_least(0.9)
    ('52.7%', '99.9%', '90%')
    """
    return f"{math.floor(1000 * share) / 10:g}%"


def preconditioned_label(rho_p: float | None) -> dict[str, str]:
    """Label a smallest ρ_P(η) = D_P(η)/(m⟨∇f, u⟩) at the run's η (Adam/AdamW, u = P⁻¹∇f).

    The rule of :func:`descent_label` (the thresholds are the same), in words
    about the preconditioned descent.

    >>> preconditioned_label(1e-5)["text"]
    'clipping kept only 0.001% of the preconditioned descent (never reversed it)'
    >>> preconditioned_label(-0.2)["text"]
    'clipping reversed the preconditioned descent (ρ_P < 0)'
    >>> preconditioned_label(0.9999999999999999)["text"]
    'clipping kept at least 99.9% of the preconditioned descent'
    """
    return _kept(
        rho_p,
        undecided="no finite ρ_P(η) recorded",
        reversed_="clipping reversed the preconditioned descent (ρ_P < 0)",
        cancelled="clipping cancelled the preconditioned descent (ρ_P = 0)",
        descent="the preconditioned descent",
        all_kept="(ρ_P ≥ 1)",
    )


def reversal_label(eta_reversal: float | None, at: str | None = None) -> dict[str, str]:
    """Label whether some η > 0 reverses the preconditioned descent at some probe.

    ``eta_reversal = max_k sup{η : D_P,k(η) < 0}`` (:mod:`clipscope.math.advice`
    on ρ_P); ``at`` names the probe that sets it.

    >>> reversal_label(0.0)["text"]
    'no η > 0 reverses the preconditioned descent at any probe'
    >>> reversal_label(0.12, "igc-adamw-B16 epoch 3")["text"]
    'clipping reverses the preconditioned descent for η just below 0.12 (igc-adamw-B16 epoch 3); every η > 0.12 keeps it ≥ 0 at every probe'
    """  # noqa: E501
    if eta_reversal is None or not math.isfinite(eta_reversal):
        return _label("undecided", NA, "ρ_P is undefined at every probe (⟨∇f, u⟩ = 0)")
    if eta_reversal == 0:
        return _label("never", OK, "no η > 0 reverses the preconditioned descent at any probe")
    where = f" ({at})" if at else ""
    return _label(
        "below",
        WARN,
        f"clipping reverses the preconditioned descent for η just below {eta_reversal:.4g}"
        f"{where}; every η > {eta_reversal:.4g} keeps it ≥ 0 at every probe",
    )


def unset_label(shares: Sequence[tuple[str, float]]) -> dict[str, str]:
    """Name the probes where some parameters had no optimizer state (P = 1 for them).

    ``shares``: ``(probe, share of the coordinates without state)`` for every
    probe. A share of 1 (no step taken yet) makes ρ_P = ρ there.

    >>> unset_label([("epoch 0", 1.0), ("epoch 1", 0.0)])["text"]
    'P = 1 (no optimizer state yet) for 100% of the coordinates at epoch 0: ρ_P = ρ there'
    >>> unset_label([("epoch 0", 0.0)])["label"]
    'set'
    """
    unset = [(name, s) for name, s in shares if math.isfinite(s) and s > 0]
    if not any(math.isfinite(s) for _, s in shares):
        return _label(
            "undecided", NA, "the share of coordinates without optimizer state was not recorded"
        )
    if not unset:
        return _label("set", NA, "P was read from the optimizer's state at every probe")
    parts = [
        f"{100 * s:.3g}% of the coordinates at {name}" + (": ρ_P = ρ there" if s == 1 else "")
        for name, s in unset
    ]
    return _label("unset", NA, "P = 1 (no optimizer state yet) for " + "; ".join(parts))


def verdict_class(verdict: str) -> str:
    """CSS class of a theorem verdict: ``satisfied`` ok, ``violated`` bad, the others neutral."""
    return {"satisfied": OK, "violated": BAD}.get(verdict, NA)
