"""The report's labels follow their written rules (docs/reproduce.md, "Labels"), edge case by case.

Hand-written findings go into the renderer; the test reads back the exact words and
the colour class (``ok`` green, ``warn`` amber, ``bad`` red, ``na`` grey) of each label.
"""

from __future__ import annotations

import html
import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipscope.report import html as report_html
from clipscope.report import plots
from clipscope.report.findings import rank_trend
from clipscope.report.labels import (
    KEPT_WARN,
    MIN_BATCH_SIZES,
    RHO_WEAK,
    descent_label,
    trend_label,
    verdict_class,
)
from clipscope.run.study import load_study
from test_report import write_run

SIZES = [8, 16, 32, 64]


def spans(text: str) -> list[tuple[str, str]]:
    """``(class, text)`` of every labelled span, HTML entities decoded."""
    return [
        (css, html.unescape(body))
        for css, body in re.findall(r'<span class="(ok|warn|bad|na)">(.*?)</span>', text)
    ]


# -- the rules themselves, on rank_trend's own output --------------------------------------

TRENDS = [
    # (id, values over SIZES, label, class, words that must appear)
    ("monotone", [0.1, 0.2, 0.3, 0.4], "grows", "ok", "grows with B, as in the paper"),
    # the digits case: B = 64 below B = 32, ρ_s = 0.8, p = 0.33
    ("one-swap", [0.350, 0.513, 0.686, 0.638], "rises_not_monotone", "warn", "B = 64 below B = 32"),
    ("tiny-rho", [0.1, 0.4, 0.3, 0.2], "no_trend", "bad", "no trend with B (ρ_s = 0.20"),
    ("zero-rho", [0.3, 0.1, 0.4, 0.2], "no_trend", "bad", "no trend with B (ρ_s = 0.00"),
    ("flat-start", [0.2, 0.2, 0.3, 0.4], "rises_not_monotone", "warn", "B = 16 equal to B = 8"),
    ("falls", [0.4, 0.3, 0.2, 0.1], "falls", "bad", "falls with B (ρ_s = -1.00"),
    ("constant", [0.3, 0.3, 0.3, 0.3], "undecided", "na", "the values are equal"),
    ("two-sizes", [0.1, math.nan, math.nan, 0.4], "undecided", "na", "fewer than 3 batch sizes"),
]


@pytest.mark.parametrize(
    "values,label,css,words", [t[1:] for t in TRENDS], ids=[t[0] for t in TRENDS]
)
def test_trend_label_rule(values, label, css, words):
    trend = rank_trend(SIZES, values)
    got = trend_label(trend)
    assert (got["label"], got["class"]) == (label, css)
    assert words in got["text"]
    # the rule as written: "grows" exactly when strictly increasing over >= 3 finite sizes
    finite = [v for v in values if math.isfinite(v)]
    strictly = len(finite) >= MIN_BATCH_SIZES and all(a < b for a, b in itertools.pairwise(finite))
    assert (label == "grows") == strictly
    if label == "rises_not_monotone":
        assert RHO_WEAK <= trend["spearman"] < 1
    if label == "no_trend":
        assert abs(trend["spearman"]) < RHO_WEAK


DESCENTS = [
    # (ρ, label, class, exact text)
    (-0.3, "reversed", "bad", "clipping reversed descent"),
    (0.0, "cancelled", "bad", "clipping cancelled descent (ρ = 0)"),
    (
        0.082,
        "kept_little",
        "warn",
        "clipping kept only 8.2% of the unclipped descent (never reversed it)",
    ),
    (
        0.499,
        "kept_little",
        "warn",
        "clipping kept only 50% of the unclipped descent (never reversed it)",
    ),
    (KEPT_WARN, "kept", "ok", "clipping kept at least 50% of the unclipped descent"),
    (0.93, "kept", "ok", "clipping kept at least 93% of the unclipped descent"),
    (1.2, "kept", "ok", "clipping kept all of the unclipped descent (ρ ≥ 1)"),
    (math.nan, "undecided", "na", "no finite ρ(η) recorded"),
]


@pytest.mark.parametrize("rho,label,css,text", DESCENTS, ids=[str(d[0]) for d in DESCENTS])
def test_descent_label_rule(rho, label, css, text):
    assert descent_label(rho) == {"label": label, "class": css, "text": text}


def test_verdict_classes():
    assert [
        verdict_class(v) for v in ("satisfied", "violated", "not checked", "not applicable")
    ] == [
        "ok",
        "bad",
        "na",
        "na",
    ]


# -- the rendered Findings: hand-written edge cases --------------------------------------------


def _trend(values):
    t = rank_trend(SIZES, values)
    t["label"] = trend_label(t)
    t["per_epoch"] = {"epochs": [0, 1], "increasing_epochs": 1, "monotone_increasing_epochs": 0}
    return t


def _findings(**task):
    base = {
        "kind": "study",
        "fig1_trend": {
            "method": "igc",
            "mean_cos_vs_batch_size": _trend([0.350, 0.513, 0.686, 0.638]),
            "c2_vs_batch_size": _trend([0.1, 0.4, 0.3, 0.2]),
        },
        "positive_cos_share_b1": {"share": None, "reason": "no batch-size-1 cross-section"},
        "min_rho": {
            "value": 0.082,
            "run": "sgd-B8",
            "epoch": 3,
            "at": "epoch 3",
            "eta": 0.5,
            "reversed": False,
            "label": descent_label(0.082),
        },
        "eta_advice": {"target": 0.9, "eta_max": None, "eta_reversal": None},
        "theorems": [],
        "threads": {"setting": 1, "intra_op": 1, "interop": 2, "cpus": 2},
    }
    return {"tasks": {"toy": base | task}}


def test_findings_rows_say_what_the_rules_say():
    text = report_html.findings_section(_findings())
    got = spans(text)
    assert (
        "warn",
        "rises with B but not monotonically (B = 64 below B = 32 (−0.048); ρ_s = 0.80, "
        "exact p = 0.33): weaker than the paper's growth",
    ) in got
    p = rank_trend(SIZES, [0.1, 0.4, 0.3, 0.2])["p_value"]
    assert ("bad", f"no trend with B (ρ_s = 0.20, exact p = {p:.2g}); the paper: it grows") in got
    assert ("warn", "clipping kept only 8.2% of the unclipped descent (never reversed it)") in got
    assert "as in the paper" not in text and "never reversed descent" not in text
    assert "torch threads: 1 intra-op (setting 1; 0 = every core), 2 interop, 2 CPUs" in text


def test_theorem_rows_without_component_constants_and_outside_the_scope():
    sgd = {
        "run": "sgd-B64",
        "theorem": "Theorem 3.1 (SGD-clip)",
        "verdict": "violated",
        "failing": "(37)",
        "deciding": {"quantity": "α / α_max (37)", "value": 17.3},
        "lanczos": {
            "tol": 0.01,
            "iterations_max": 16,
            "component_iterations_max": None,
            "all_converged": True,
        },
    }
    momentum = {
        "run": "igc-B64",
        "theorem": "Theorem 3.2 (IGC-clip)",
        "verdict": "not applicable",
        "reason": "momentum = 0.9 (the theorems cover plain steps without momentum)",
        "failing": None,
    }
    text = report_html.findings_section(_findings(theorems=[sgd, momentum]))
    assert "None" not in text
    assert "Lanczos tol 0.01, ≤ 16 products (f); all converged" in text
    assert ("bad", "violated") in spans(text)
    assert (
        "na",
        "not applicable: momentum = 0.9 (the theorems cover plain steps without momentum)",
    ) in spans(text)


def test_a_single_run_has_no_study_rows():
    run = {k: v for k, v in _findings()["tasks"]["toy"].items() if k not in ("fig1_trend",)}
    run.pop("positive_cos_share_b1")
    text = report_html.findings_section({"tasks": {"run": run | {"kind": "run"}}})
    assert "Figure 1" not in text and "batch size 1" not in text
    assert "smallest ρ(η)" in text


# -- the run table: A3 worded as the theorem check words it -----------------------------------


@pytest.mark.parametrize(
    "c1_min,a3_share,rho_last,classes",
    [
        # every cos ≥ 0 at no probe, yet c1 > 0: A3 of the theorems holds (green), the
        # share is information (grey), ρ = 0.08 kept little (amber)
        (0.2, 0.0, 0.08, ("ok", "na", "warn")),
        (-0.1, 0.0, -0.2, ("bad", "na", "bad")),  # A3 fails; clipping reversed descent
        (0.4, 1.0, 0.9, ("ok", "na", "ok")),
    ],
    ids=["a3-holds-weakly", "a3-fails", "clean"],
)
def test_run_table_cells(c1_min, a3_share, rho_last, classes):
    row = report_html.RunSummary(
        label="IGC B=8", epochs=7, eta=0.5, a3_share=a3_share, c1_min=c1_min, c2_min=0.3,
        bound33_checked=0, bound33_held=0, rho_last=rho_last, clipped_last=0.4,
        b_noise_last=3.0, loss_last=1.0,
    )  # fmt: skip
    cells = row.cells()
    headers = report_html._HEADERS
    got = {h: spans(c) for h, c in zip(headers, cells, strict=True)}
    assert got["min c1 (A3: &gt; 0)"][0][0] == classes[0]
    assert got["probes with every cos θ ≥ 0"][0][0] == classes[1]
    assert got["ρ(η) last"][0][0] == classes[2]
    assert got["bound (33) held there"] == [("na", "no probe with every cos θ ≥ 0")]
    assert not any("A3 held" in h for h in headers)


# -- integer epoch ticks ------------------------------------------------------------------------


def test_epoch_axes_have_integer_ticks(tmp_path):
    write_run(tmp_path / "run", epochs=5, eta=0.5, batch=4, seed=2)
    fig = plots.per_epoch(load_study(tmp_path / "run")[0], "c1", "c1", "t")
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plots.figure_png(fig)


def test_epoch_ticks_of_a_short_run_stay_integer(tmp_path):
    write_run(tmp_path / "run", epochs=2, eta=0.5, batch=4, seed=2)  # matplotlib picks 0.25 steps
    fig = plots.per_epoch(load_study(tmp_path / "run")[0], "c1", "c1", "t")
    ticks = np.asarray(fig.axes[0].get_xticks())
    assert np.all(ticks == np.round(ticks))
    plots.figure_png(fig)


@given(st.floats(min_value=KEPT_WARN, max_value=1.0, exclude_max=True))
def test_at_least_never_overstates_the_share_kept(rho):
    """'at least X%' of ρ and ρ_P: X ≤ 100ρ, within 0.1 below it (rounded down, not to nearest)."""
    from clipscope.report.labels import preconditioned_label

    for label in (descent_label(rho), preconditioned_label(rho)):
        shown = float(label["text"].split("at least ")[1].split("%")[0])
        assert shown <= 100 * rho and shown > 100 * rho - 0.1 - 1e-9
