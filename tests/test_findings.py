"""findings.json: every answer re-derived from hand-written records, against direct computations."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from clipscope.math.advice import advise
from clipscope.math.stats import ComponentStats
from clipscope.report import build_report
from clipscope.report.findings import (
    rank_trend,
    run_points,
    study_findings,
    theorem_verdicts,
)
from clipscope.run.directory import load_run
from clipscope.run.study import load_study
from test_report import add_smoothness, write_run, write_study


@pytest.mark.parametrize(
    "values,spearman,p,direction",
    [
        ([0.1, 0.2, 0.3, 0.4], 1.0, 2 / 24, "increasing"),  # exact: 2 of 24 orderings as extreme
        ([0.4, 0.3, 0.2, 0.1], -1.0, 2 / 24, "decreasing"),
        ([0.1, 0.3, 0.2, 0.4], 0.8, 8 / 24, "increasing"),  # ρ_s ≥ 0.8: 4 of 24, twice
        ([0.1, 0.2, math.nan, 0.4], 1.0, 2 / 6, "increasing"),  # NaN dropped, n = 3
    ],
)
def test_rank_trend_is_scipy_spearman_with_an_exact_p_value(values, spearman, p, direction):
    out = rank_trend([8, 16, 32, 64], values)
    assert out["spearman"] == pytest.approx(spearman)
    assert out["p_value"] == pytest.approx(p)
    assert out["direction"] == direction
    assert out["monotone"] == (abs(spearman) == 1.0)
    finite = [(b, v) for b, v in zip([8, 16, 32, 64], values, strict=True) if np.isfinite(v)]
    expected = scipy_stats.spearmanr(*zip(*finite, strict=True)).statistic
    assert out["spearman"] == pytest.approx(expected)


@pytest.mark.parametrize("values", [[0.5], [math.nan, 0.3], [0.2, 0.2, 0.2]])
def test_rank_trend_without_a_trend_to_measure(values):
    out = rank_trend([8, 16, 32][: len(values)], values)
    assert out["direction"] is None and math.isnan(out["spearman"])


def _study(tmp_path: Path, epochs: int = 4) -> Path:
    root = write_study(tmp_path, epochs=epochs)
    rng = np.random.default_rng(7)
    g = rng.normal(size=(40, 5)) + np.array([0.4, 0, 0, 0, 0])
    full = g.mean(axis=0)
    section = {
        "point": "igc-B4",
        "epoch": epochs - 1,
        "sample": "one training sample",
        "route": "per-sample",
        "m": 40,
        "norms": np.linalg.norm(g, axis=1).tolist(),
        "dots": (g @ full).tolist(),
        "grad_norm": float(np.linalg.norm(full)),
    }
    (root / "cross_section" / "toy-per-sample.json").write_text(json.dumps(section))
    meta = json.loads((root / "study.json").read_text())
    meta["tasks"]["toy"]["per_sample"] = "cross_section/toy-per-sample.json"
    (root / "study.json").write_text(json.dumps(meta))
    return root


def test_findings_are_the_records_recomputed(tmp_path):
    root = _study(tmp_path)
    report = build_report(root)
    found = json.loads((root / "findings.json").read_text())  # strict JSON: no NaN
    task = found["tasks"]["toy"]
    assert set(task) >= {"fig1_trend", "positive_cos_share_b1", "min_rho", "eta_advice", "theorems"}
    runs = {b: load_run(root / f"runs/toy/igc-B{b}") for b in (4, 8)}

    # Figure 1: the run-averaged c1 and c2 of epochs.csv, ranked over batch sizes
    trend = task["fig1_trend"]
    assert trend["method"] == "igc"
    for key, column in (("mean_cos_vs_batch_size", "c1"), ("c2_vs_batch_size", "c2")):
        means = [float(np.mean(runs[b].column(column))) for b in (4, 8)]
        assert trend[key]["values"] == pytest.approx(means)
        assert trend[key]["spearman"] == (1.0 if means[1] > means[0] else -1.0)
        table = trend[key]["per_epoch"]["table"]
        assert table[2] == pytest.approx([runs[b].column(column)[2] for b in (4, 8)])

    # batch size 1: the share of positive per-sample cosines of the stored section
    section = json.loads((root / "cross_section/toy-per-sample.json").read_text())
    cos = np.array(section["dots"]) / np.array(section["norms"]) / section["grad_norm"]
    assert task["positive_cos_share_b1"]["share"] == pytest.approx(np.mean(cos > 0))
    assert task["positive_cos_share_b1"]["n"] == 40

    # min ρ at the run's η, brute force from the stored arrays
    brute = []
    for b, run in runs.items():
        for epoch in sorted(run.component_files):
            a = run.components(epoch)
            n, d, gn = a["norms"], a["dots"], float(a["grad_norm"])
            brute.append((float(np.sum(np.minimum(n, 0.5) / n * d) / (len(n) * gn**2)), b, epoch))
    value, b, epoch = min(brute)
    low = task["min_rho"]
    assert low["value"] == pytest.approx(value, rel=1e-12)
    assert (low["run"], low["epoch"], low["reversed"]) == (f"igc-B{b}", epoch, value < 0)

    # η advice: advise() over every probe of every run
    points = [s for run in runs.values() for _, s in run_points(run)]
    expect = advise(points, 0.9)
    assert task["eta_advice"]["eta_max"] == pytest.approx(expect.eta_max)
    assert task["eta_advice"]["eta_reversal"] == pytest.approx(expect.eta_reversal)
    assert task["eta_advice"]["n_points"] == 8
    assert set(task["eta_advice"]["per_run"]) == {"igc-B4", "igc-B8"}

    # no smoothness recorded: every theorem is "not checked", named per run
    assert [t["verdict"] for t in task["theorems"]] == ["not checked"] * 2
    text = report.read_text()
    # two batch sizes: no trend is stated (docs/reproduce.md, "Labels": at least 3)
    assert trend["mean_cos_vs_batch_size"]["label"]["label"] == "undecided"
    assert "Findings" in text and "no trend can be stated" in text and "grows with B" not in text
    assert "Not checked" in text


def test_findings_with_another_target(tmp_path):
    root = _study(tmp_path)
    low = study_findings(root, target=0.5)["tasks"]["toy"]["eta_advice"]["eta_max"]
    high = study_findings(root, target=0.99)["tasks"]["toy"]["eta_advice"]["eta_max"]
    assert low <= high
    with pytest.raises(ValueError, match="target"):
        study_findings(root, target=0.0)


def _set(run: Path, **values) -> None:
    """Rewrite config keys and add `hess_iterations` to the recorded smoothness."""
    lines = []
    for line in (run / "config.toml").read_text().splitlines():
        key = line.split("=")[0].strip()
        if key not in values:
            lines.append(line)
    lines += [f"{k} = {v!r}" for k, v in values.items()]
    (run / "config.toml").write_text("\n".join(lines) + "\n")
    with open(run / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["hess_iterations"] = "7.0" if row.get("hess_norm") not in (None, "nan") else "nan"
    with open(run / "epochs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    "lr,verdict,failing",
    [(1e-6, "satisfied", None), (0.5, "violated", "(44)")],
    ids=["small-step", "large-step"],
)
def test_theorem_verdicts_from_recorded_smoothness(tmp_path, lr, verdict, failing):
    root = write_study(tmp_path, epochs=4)
    run = root / "runs/toy/igc-B4"
    add_smoothness(run, columns=("hess_norm",))
    _set(run, lr=lr, smoothness_tol=0.01, smoothness_max_iter=30)
    task = load_study(root)[0]
    entry = next(t for t in theorem_verdicts(task) if t["run"] == "igc-B4")
    assert entry["theorem"].startswith("Theorem 3.2")
    assert (entry["verdict"], entry["failing"]) == (verdict, failing)
    assert entry["deciding"]["quantity"] == "α / α_max (44)"
    assert entry["deciding"]["alpha"] == lr
    ratio = lr / entry["deciding"]["alpha_max"]
    assert entry["deciding"]["value"] == pytest.approx(ratio)
    assert (ratio > 1) == (verdict == "violated")
    assert entry["constants"]["L0"] == pytest.approx(1.0) and entry["constants"]["L1"] == 2.0
    assert entry["constants"]["L0i"] == pytest.approx(3.0)
    assert entry["lanczos"] == {
        "tol": 0.01,
        "max_iter": 30,
        "iterations_max": 7,
        "iterations_min": 7,
        "component_iterations_max": None,
        "solves": 4,
        "all_converged": True,
    }
    other = next(t for t in theorem_verdicts(task) if t["run"] == "igc-B8")
    assert other["verdict"] == "not checked"


def test_a_run_whose_mean_cosine_turns_negative_violates_a3(tmp_path):
    run = tmp_path / "run"
    write_run(run, epochs=2, eta=0.5, batch=4, seed=3)
    with open(run / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[1]["c1"] = "-0.25"
    with open(run / "epochs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (entry,) = theorem_verdicts(load_study(run)[0])
    assert (entry["verdict"], entry["failing"]) == ("violated", "(A3)")
    assert entry["deciding"]["value"] == -0.25


def test_unconverged_solves_never_read_satisfied(tmp_path):
    root = write_study(tmp_path, epochs=4)
    run = root / "runs/toy/igc-B4"
    add_smoothness(run, columns=("hess_norm",))
    _set(run, lr=1e-6)
    text = (run / "epochs.csv").read_text().replace(",1.0,7.0", ",0.0,7.0")
    (run / "epochs.csv").write_text(text)
    entry = next(t for t in theorem_verdicts(load_study(root)[0]) if t["run"] == "igc-B4")
    assert entry["verdict"] == "not checked" and "lower bound" in entry["note"]


def test_positive_share_without_a_section_says_why(tmp_path):
    found = study_findings(write_study(tmp_path))["tasks"]["toy"]
    assert found["positive_cos_share_b1"]["share"] is None
    assert "per_sample" in found["positive_cos_share_b1"]["reason"]


def test_points_skip_probes_without_a_finite_full_gradient(tmp_path):
    write_run(tmp_path / "run", epochs=3, eta=0.5, batch=4, seed=1)
    path = tmp_path / "run" / "components" / "epoch_0001.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays["grad_norm"] = np.float64("nan")
    np.savez(path, **arrays)
    points = run_points(load_run(tmp_path / "run"))
    assert [epoch for epoch, _ in points] == [0, 2]
    assert all(isinstance(s, ComponentStats) for _, s in points)


def test_a_failed_batch_size_1_probe_is_reported_with_its_reason(tmp_path):
    root = write_study(tmp_path)
    (root / "cross_section" / "toy-per-sample.json").write_text(
        json.dumps({"point": "runs/toy/igc-B4", "reason": "train-mode BatchNorm"})
    )
    meta = json.loads((root / "study.json").read_text())
    meta["tasks"]["toy"]["per_sample"] = "cross_section/toy-per-sample.json"
    (root / "study.json").write_text(json.dumps(meta))
    share = study_findings(root)["tasks"]["toy"]["positive_cos_share_b1"]
    assert share["share"] is None and "train-mode BatchNorm" in share["reason"]
