"""Answers under the optimizer's preconditioner (issue 22, item 4): findings, report, advise.

Every run here is written by hand from explicit component vectors g_i and a positive
diagonal preconditioner P, in the runner's format (``dots_p = ⟨g_i, u⟩``, ``u = P⁻¹∇f``,
``u_norm``, ``grad_u_inner``; the ``rho_p`` and ``p_unset_share`` columns), and every
answer is checked against ρ_P evaluated directly from the vectors in float64.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipscope.math.advice import (
    advice_grid,
    advise,
    advise_on_grid,
    grid_reversal_threshold,
    grid_safe_threshold,
    reversal_threshold,
    safe_threshold,
)
from clipscope.math.stats import DirectionStats
from clipscope.math.theory import ADAPTIVE_REASON
from clipscope.report import build_report
from clipscope.report.findings import run_points_p, study_findings
from clipscope.report.labels import preconditioned_label, reversal_label, unset_label
from clipscope.report.theorem import check_theorem
from clipscope.run.directory import load_run

# Plain descent never reversed, preconditioned descent reversed below 1.4865 (P = diag(9, 1)):
# ∇f = (−4/3, −1/3), u = (−4/27, −1/3), ⟨g_i, u⟩ = (13/9, −1/27, −13/27); on η ≤ √5 the profile
# is D_P = −13/27 + η(13/(9√18) − 1/(27√5)), zero at η = (13/27)/(13/(9√18) − 1/(27√5)).
REVERSING = np.array([[-3.0, -3.0], [-2.0, 1.0], [1.0, 1.0]])
REVERSING_P = np.array([9.0, 1.0])
REVERSAL_AT = (13 / 27) / (13 / (9 * math.sqrt(18)) - 1 / (27 * math.sqrt(5)))


def brute_rho_p(g: np.ndarray, p: np.ndarray, etas) -> np.ndarray:
    """ρ_P(η) = Σ_i min(1, η/n_i)⟨g_i, u⟩ / Σ_i ⟨g_i, u⟩ straight from the vectors (float64)."""
    g = np.asarray(g, dtype=np.float64)
    u = g.mean(axis=0) / p
    n = np.linalg.norm(g, axis=1)
    etas = np.atleast_1d(np.asarray(etas, dtype=np.float64))
    with np.errstate(divide="ignore"):  # γ_i = 1 for a zero component (its dot is 0 anyway)
        gamma = np.where(n > 0, np.minimum(1.0, etas[:, None] / n[None, :]), 1.0)
    return (gamma * (g @ u)[None, :]).sum(axis=1) / float((g @ u).sum())


def brute_rho(g: np.ndarray, etas) -> np.ndarray:
    """ρ(η) = the same with P = 1."""
    return brute_rho_p(g, np.ones(g.shape[1]), etas)


def direction_stats(g: np.ndarray, p: np.ndarray) -> DirectionStats:
    """(n_i, ⟨g_i, u⟩, ‖u‖, ⟨∇f, u⟩) of explicit vectors, u = P⁻¹∇f, float64."""
    g = np.asarray(g, dtype=np.float64)
    full = g.mean(axis=0)
    u = full / p
    return DirectionStats(np.linalg.norm(g, axis=1), g @ u, np.linalg.norm(u), full @ u)


def write_run(
    path: Path,
    points: list[tuple[np.ndarray, np.ndarray | None]],
    *,
    eta: float,
    optimizer: str = "adamw",
    unset: list[float] | None = None,
    batch: int = 4,
) -> None:
    """Write a run directory in the runner's format: a probe per (g, P) (P None: no dots_p)."""
    (path / "components").mkdir(parents=True)
    (path / "config.toml").write_text(
        f'method = "igc"\noptimizer = "{optimizer}"\neta = {eta!r}\nbatch_size = {batch}\n'
        "lr = 0.001\n"
    )
    header = ["epoch", "loss", "grad_norm", "c1", "c2", "rho"]
    adaptive = points[0][1] is not None
    if adaptive:
        header += ["rho_p", "p_unset_share"]
    with open(path / "epochs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for k, (g, p) in enumerate(points):
            full = g.mean(axis=0)
            norms = np.linalg.norm(g, axis=1)
            gn = float(np.linalg.norm(full))
            arrays_ = {"norms": norms, "dots": g @ full, "grad_norm": gn}
            cos = (g @ full) / (norms * gn)
            row = [k, 1.0 / (k + 1), gn, cos.mean(), norms.min() / norms.max()]
            row.append(float(brute_rho(g, eta)[0]))
            if p is not None:
                u = full / p
                arrays_ |= {"dots_p": g @ u, "u_norm": np.linalg.norm(u), "grad_u_inner": full @ u}
                row += [float(brute_rho_p(g, p, eta)[0]), (unset or [0.0] * len(points))[k]]
            np.savez(path / "components" / f"epoch_{k:04d}.npz", **arrays_)
            writer.writerow(row)


def random_points(seed: int, n: int = 4, m: int = 10, d: int = 5) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = rng.normal(size=(m, d)) + np.array([0.6] + [0.0] * (d - 1))
        out.append((g, rng.uniform(0.05, 3.0, size=d)))
    return out


def write_study(root: Path, runs: dict[str, tuple[dict, list, float, str]]) -> Path:
    """study.json with the given runs ``{rel: (entry, points, eta, optimizer)}``."""
    entries = []
    for rel, (entry, points, eta, optimizer) in runs.items():
        write_run(root / rel, points, eta=eta, optimizer=optimizer, batch=entry["batch_size"])
        entries.append(entry | {"dir": rel})
    (root / "study.json").write_text(json.dumps({"tasks": {"toy": {"runs": entries}}}))
    return root


# -- the advice on ρ_P: exact, against its slow twin and the vectors -----------------------

vectors = arrays(
    np.float64,
    st.tuples(st.integers(1, 8), st.integers(1, 4)),
    elements=st.floats(-100, 100, allow_subnormal=False),
)
PER_DECADE = 400
STEP = 10 ** (1 / PER_DECADE)


@settings(deadline=None, max_examples=60)
@given(g=vectors, target=st.floats(0.02, 0.99), seed=st.integers(0, 2**16))
def test_advice_on_rho_p_is_exact_against_the_grid_twin_and_the_vectors(g, target, seed):
    p = np.random.default_rng(seed).uniform(0.01, 100.0, size=g.shape[1])
    stats = direction_stats(g, p)
    total = float(stats.descent(math.inf))
    assume(total > 1e-9 * max(1.0, float(np.sum(np.abs(stats.dots)))))
    grid = advice_grid([stats.norms], per_decade=PER_DECADE)
    ratio = brute_rho_p(g, p, grid)
    assume(np.min(np.abs(ratio - target)) > 1e-9 and np.min(np.abs(ratio)) > 1e-9)
    exact = safe_threshold(stats.profile(), target)
    slow = grid_safe_threshold(stats, target, grid)
    assert slow >= exact * (1 - 1e-9)
    assert slow <= max(exact * STEP, grid[0]) * (1 + 1e-9)
    above = np.geomspace(exact, 10 * stats.norms.max(), 300)
    assert np.all(brute_rho_p(g, p, above) >= target - 1e-9)  # the definition, from the vectors
    assert brute_rho_p(g, p, exact * (1 - 1e-6))[0] < target + 1e-9
    rev = reversal_threshold(stats.profile())
    slow_rev = grid_reversal_threshold(stats, grid)
    if rev == 0.0:
        assert slow_rev == 0.0 and np.all(ratio >= 0)
    else:
        assert slow_rev <= rev * (1 + 1e-9) and slow_rev >= rev / STEP * (1 - 1e-9)
        assert brute_rho_p(g, p, rev * (1 - 1e-6))[0] < 1e-9
        after = np.geomspace(rev * (1 + 1e-9), rev * 1e3, 200)
        assert np.all(brute_rho_p(g, p, after) >= -1e-9)
    # advise / advise_on_grid take DirectionStats as they take ComponentStats
    assert advise([stats], target).eta_max == exact
    assert advise_on_grid([stats], target, grid=grid).eta_max == slow


def test_a_preconditioner_can_reverse_what_plain_steps_keep():
    plain = advise([direction_stats(REVERSING, np.ones(2))])
    under_p = advise([direction_stats(REVERSING, REVERSING_P)])
    assert plain.eta_reversal == 0.0
    assert under_p.eta_reversal == pytest.approx(REVERSAL_AT, rel=1e-12)
    assert brute_rho_p(REVERSING, REVERSING_P, REVERSAL_AT * 0.999)[0] < 0
    assert np.all(brute_rho(REVERSING, np.geomspace(1e-3, 10, 500)) >= 0)


# -- findings.json ---------------------------------------------------------------------------


def test_findings_under_p_are_the_vectors_recomputed(tmp_path):
    points = random_points(3)
    write_run(tmp_path / "run", points, eta=0.8, unset=[1.0, 0.0, 0.0, 0.0])
    build_report(tmp_path / "run")
    found = json.loads((tmp_path / "run" / "findings.json").read_text())
    under_p = found["tasks"]["run"]["preconditioned"]
    item = under_p["runs"]["igc-adamw-B4"]
    at_eta = [brute_rho_p(g, p, 0.8)[0] for g, p in points]
    assert item["probes"]["rho_p"] == pytest.approx(at_eta, rel=1e-12)
    assert item["probes"]["rho"] == pytest.approx([brute_rho(g, 0.8)[0] for g, _ in points])
    k = int(np.argmin(at_eta))
    assert item["min_rho_p"]["value"] == pytest.approx(at_eta[k], rel=1e-12)
    assert item["min_rho_p"]["at"] == f"epoch {k}"
    assert item["min_rho_p"]["label"] == preconditioned_label(item["min_rho_p"]["value"])
    # eta_max from the vectors: every η ≥ it keeps 90 % at every probe, just below some probe not
    eta_max = item["eta_advice"]["eta_max"]
    for g, p in points:
        top = np.linalg.norm(g, axis=1).max()
        assert np.all(brute_rho_p(g, p, np.geomspace(eta_max, 10 * top, 400)) >= 0.9 - 1e-9)
    assert min(brute_rho_p(g, p, eta_max * (1 - 1e-7))[0] for g, p in points) < 0.9
    assert under_p["eta_advice"]["eta_max"] == eta_max  # one run: the task's is the run's
    # the ρ answers of the same probes, side by side
    plain = advise([direction_stats(g, np.ones(g.shape[1])) for g, _ in points])
    assert item["sgd_eta_advice"]["eta_max"] == pytest.approx(plain.eta_max, rel=1e-12)
    # the theorem entry shows the measured ρ_P, the same number as the column rho_p
    (theorem,) = found["tasks"]["run"]["theorems"]
    assert theorem["verdict"] == "not applicable" and theorem["reason"] == ADAPTIVE_REASON
    assert theorem["measured"]["value"] == pytest.approx(at_eta[k], rel=1e-12)
    assert check_theorem(load_run(tmp_path / "run"))["measured"]["value"] == pytest.approx(
        at_eta[k], rel=1e-12
    )


def test_reversal_tiny_share_and_unset_p_read_as_their_rules_say(tmp_path):
    # probe 0: P unset for every coordinate (no step yet); probe 1: the reversing example with
    # a quarter of the coordinates unset; probe 2: 1-D g = (1, 2, 3), ρ_P(η) = η/2 below 1
    tiny = (np.array([[1.0], [2.0], [3.0]]), np.array([5.0]))
    points = [(REVERSING, np.ones(2)), (REVERSING, REVERSING_P), tiny]
    write_run(tmp_path / "run", points, eta=2e-5, unset=[1.0, 0.25, 0.0])
    report = build_report(tmp_path / "run").read_text()
    item = json.loads((tmp_path / "run" / "findings.json").read_text())["tasks"]["run"][
        "preconditioned"
    ]
    item = item["runs"]["igc-adamw-B4"]
    assert item["min_rho_p"]["label"]["text"] == (
        "clipping reversed the preconditioned descent (ρ_P < 0)"
    )
    assert item["min_rho_p"]["at"] == "epoch 1" and item["min_rho_p"]["label"]["class"] == "bad"
    assert item["reversed"] is True
    assert item["eta_advice"]["eta_reversal"] == pytest.approx(REVERSAL_AT, rel=1e-12)
    assert item["reversal"] == {
        "label": "below",
        "class": "warn",
        "text": "clipping reverses the preconditioned descent for η just below 1.487 "
        "(igc-adamw-B4 epoch 1); every η > 1.487 keeps it ≥ 0 at every probe",
    }
    assert item["p_unset"]["label"]["text"] == (
        "P = 1 (no optimizer state yet) for 100% of the coordinates at epoch 0: ρ_P = ρ there; "
        "25% of the coordinates at epoch 1"
    )
    assert item["probes"]["rho_p"][2] == pytest.approx(1e-5, rel=1e-12)
    assert preconditioned_label(item["probes"]["rho_p"][2])["text"] == (
        "clipping kept only 0.001% of the preconditioned descent (never reversed it)"
    )
    for words in (
        "clipping reversed the preconditioned descent (ρ_P &lt; 0)",
        "every η &gt; 1.487 keeps it ≥ 0 at every probe",
        "25% of the coordinates at epoch 1",
        "measured instead: smallest ρ_P(η = 2e-05)",
    ):
        assert words in report


def test_a_task_mixing_sgd_and_adamw(tmp_path):
    rng = np.random.default_rng(5)
    sgd_points = [(rng.normal(size=(8, 3)) + np.array([0.5, 0, 0]), None) for _ in range(3)]
    root = write_study(
        tmp_path,
        {
            "runs/toy/igc-B4": ({"method": "igc", "batch_size": 4}, sgd_points, 0.5, "sgd"),
            "runs/toy/igc-adamw-B4": (
                {"method": "igc", "batch_size": 4, "optimizer": "adamw"},
                random_points(9, n=3),
                0.5,
                "adamw",
            ),
        },
    )
    report = build_report(root).read_text()
    task = json.loads((root / "findings.json").read_text())["tasks"]["toy"]
    assert task["runs"] == ["igc-B4", "igc-adamw-B4"]
    assert set(task["preconditioned"]["runs"]) == {"igc-adamw-B4"}
    assert task["preconditioned"]["without_p"] == ["igc-B4"]
    assert task["fig1_trend"]["left_out"] == ["igc-adamw-B4"]  # Figure 1: plain steps only
    assert task["fig1_trend"]["mean_cos_vs_batch_size"]["batch_sizes"] == [4]
    verdicts = {t["run"]: t for t in task["theorems"]}
    assert "measured" not in verdicts["igc-B4"]
    assert verdicts["igc-adamw-B4"]["verdict"] == "not applicable"
    assert verdicts["igc-adamw-B4"]["measured"]["label"]["label"] in ("kept", "kept_little")
    # the plain answers still cover both runs; ρ_P only the AdamW one
    assert task["min_rho"]["per_run"].keys() == {"igc-B4", "igc-adamw-B4"}
    assert "IGC-AdamW B=4" in report and "igc-adamw-B4: η advice under P" in report
    assert (root / "figures" / "toy-rho_p_profile.png").is_file()
    assert (root / "figures" / "toy-rho_p_per_epoch.png").is_file()
    # study_findings reads the same from the directory
    assert study_findings(root)["tasks"]["toy"]["preconditioned"] == task["preconditioned"]


def test_an_adamw_run_without_recorded_dots_says_so(tmp_path):
    rng = np.random.default_rng(1)
    write_run(tmp_path / "run", [(rng.normal(size=(6, 3)), None)], eta=0.5, optimizer="adamw")
    build_report(tmp_path / "run")
    task = json.loads((tmp_path / "run" / "findings.json").read_text())["tasks"]["run"]
    item = task["preconditioned"]["runs"]["igc-adamw-B4"]
    assert item["reason"] == "no preconditioned dots recorded (dots_p)"
    assert task["theorems"][0]["measured"]["value"] is None
    assert run_points_p(load_run(tmp_path / "run")) == []


def test_theorem_sentence_ends_with_the_measured_rho_p(tmp_path):
    points = random_points(4, n=3)
    write_run(tmp_path / "run", points, eta=0.5)
    res = check_theorem(load_run(tmp_path / "run"))
    values = [brute_rho_p(g, p, 0.5)[0] for g, p in points]
    k = int(np.argmin(values))
    assert res["verdict"] == (
        f"not applicable: {ADAPTIVE_REASON}; measured instead: min ρ_P(η = 0.5) over 3 probes "
        f"= {values[k]:.4g} (epoch {k})"
    )


# -- the labels' rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "rho_p,label,css,text",
    [
        (-1e-9, "reversed", "bad", "clipping reversed the preconditioned descent (ρ_P < 0)"),
        (0.0, "cancelled", "bad", "clipping cancelled the preconditioned descent (ρ_P = 0)"),
        (
            1e-5,
            "kept_little",
            "warn",
            "clipping kept only 0.001% of the preconditioned descent (never reversed it)",
        ),
        (
            0.4999,
            "kept_little",
            "warn",
            "clipping kept only 50% of the preconditioned descent (never reversed it)",
        ),
        (0.5, "kept", "ok", "clipping kept at least 50% of the preconditioned descent"),
        (0.93, "kept", "ok", "clipping kept at least 93% of the preconditioned descent"),
        (
            1 - 1e-16,
            "kept",
            "ok",
            "clipping kept at least 99.9% of the preconditioned descent",
        ),
        (1.0, "kept", "ok", "clipping kept all of the preconditioned descent (ρ_P ≥ 1)"),
        (math.nan, "undecided", "na", "no finite ρ_P(η) recorded"),
        (None, "undecided", "na", "no finite ρ_P(η) recorded"),
    ],
)
def test_preconditioned_label_rule(rho_p, label, css, text):
    assert preconditioned_label(rho_p) == {"label": label, "class": css, "text": text}


def test_reversal_and_unset_rules():
    assert reversal_label(0.0)["class"] == "ok"
    assert reversal_label(None)["label"] == "undecided"
    assert reversal_label(math.nan)["class"] == "na"
    assert reversal_label(3.0)["text"] == (
        "clipping reverses the preconditioned descent for η just below 3; every η > 3 keeps it "
        "≥ 0 at every probe"
    )
    assert unset_label([("epoch 0", 0.0), ("epoch 1", 0.0)])["label"] == "set"
    assert unset_label([("epoch 0", math.nan)])["label"] == "undecided"
    assert unset_label([("step 8", 0.5)])["text"] == (
        "P = 1 (no optimizer state yet) for 50% of the coordinates at step 8"
    )


# -- clipscope advise --json -----------------------------------------------------------------


def test_advise_json_carries_the_preconditioned_answers(tmp_path):
    points = [(REVERSING, REVERSING_P), *random_points(2, n=2, m=3, d=2)]
    write_run(tmp_path / "run", points, eta=0.5, unset=[0.0, 0.5, 0.0])
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "advise", str(tmp_path / "run"), "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    run = out["tasks"]["run"]["runs"]["igc-adamw-B4"]
    pre = run["preconditioned"]
    expect = advise([direction_stats(g, p) for g, p in points])
    assert pre["eta_max"] == pytest.approx(expect.eta_max, rel=1e-12)
    assert pre["eta_reversal"] == pytest.approx(REVERSAL_AT, rel=1e-12)
    assert pre["reversed"] is True and pre["reversal_at"] == "igc-adamw-B4 epoch 0"
    assert pre["min_rho_p"] == pytest.approx(min(brute_rho_p(g, p, 0.5)[0] for g, p in points))
    assert pre["p_unset_max"] == 0.5
    assert len(pre["points"]) == 3
    assert run["eta_max"] != pre["eta_max"]  # the ρ answer beside it
    assert out["tasks"]["run"]["preconditioned_advice"]["eta_reversal"] == pre["eta_reversal"]
    names = sorted(Path(p).name for p in out["figures"])
    assert names == ["igc-adamw-B4-rho_p.png", "igc-adamw-B4.png"]
    words = subprocess.run(
        [sys.executable, "-m", "clipscope", "advise", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert "igc-adamw-B4 ρ_P" in words.stdout
    assert "reverses the preconditioned descent below 1.487 (igc-adamw-B4 epoch 0)" in words.stdout
    # the probes without optimizer state are named, as the report names them (a new user
    # read an eta_max "set by step 0", where P was still 1, as preconditioned advice)
    assert (
        pre["p_unset"]
        == unset_label([("epoch 0", 0.0), ("epoch 1", 0.5), ("epoch 2", 0.0)])["text"]
    )
    assert f"(igc-adamw-B4 ρ_P: {pre['p_unset']})" in words.stdout
    # all ⟨g_i, u⟩ > 0 (1-D, g = (1, 2, 3)): no η reverses the preconditioned descent
    write_run(tmp_path / "kept", [(np.array([[1.0], [2.0], [3.0]]), np.array([5.0]))], eta=0.5)
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "advise", str(tmp_path / "kept"), "--json"],
        capture_output=True,
        text=True,
    )
    pre = json.loads(done.stdout)["tasks"]["kept"]["runs"]["igc-adamw-B4"]["preconditioned"]
    assert pre["reversed"] is False and pre["eta_reversal"] == 0.0
    assert pre["min_rho_p"] == pytest.approx(0.25, rel=1e-12)  # ρ_P(η) = η/2 below 1


def test_advise_help_says_what_the_preconditioned_fields_mean():
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "advise", "--help"], capture_output=True, text=True
    )
    text = " ".join(done.stdout.split())
    for words in (
        "rho_P(η)",
        "preconditioned",
        "eta_reversal, reversed",
        "min_rho_p",
        "p_unset_max",
        "p_unset:",
    ):
        assert words in text
