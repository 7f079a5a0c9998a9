"""Theorem verdicts respect each theorem's scope (issue 24, item 6).

Theorem 3.1 covers constant-step SGD-clip and Theorem 3.2 constant-step IGC-clip, both
with the plain clipped step. A run outside reads "not applicable: <reason>" in
findings.json, the report and ``clipscope theory``, never a bound.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from clipscope.math.theory import ADAPTIVE_REASON, THEOREM_SCOPE, theorem_scope
from clipscope.report import build_report
from clipscope.report.findings import theorem_verdicts
from clipscope.report.theorem import check_theorem
from clipscope.run.directory import load_run
from clipscope.run.study import load_study
from test_report import add_smoothness, write_run

# (id, config keys added to a recorded IGC run, words of the reason; None = inside the scope)
CASES = [
    ("plain", {}, None),
    ("momentum", {"momentum": 0.9}, "momentum = 0.9 (the theorems cover plain steps"),
    ("weight-decay", {"weight_decay": 1e-4}, "weight_decay = 0.0001"),
    ("cosine", {"schedule": "cosine"}, "schedule = cosine (the theorems take a constant step α)"),
    ("step-with-milestones", {"schedule": "step", "milestones": [2]}, "schedule = step"),
    ("step-without-milestones", {"schedule": "step"}, None),
    ("step-gamma-1", {"schedule": "step", "milestones": [2], "schedule_gamma": 1.0}, None),
    ("adam", {"optimizer": "adam"}, ADAPTIVE_REASON),
    ("adamw", {"optimizer": "adamw"}, ADAPTIVE_REASON),
    ("sgd-optimizer", {"optimizer": "sgd"}, None),
    ("rr", {"method": "rr"}, "method = rr (Theorem 3.1 covers method sgd"),
    ("monitor", {"method": "external", "kind": "monitor"}, "a training loop of your own"),
    ("no-clipping", {"eta": math.inf}, "no clipping (η = ∞)"),
    (
        "momentum-and-cosine",
        {"momentum": 0.9, "schedule": "cosine"},
        "momentum = 0.9 (the theorems cover plain steps without momentum); schedule = cosine",
    ),
]


def _toml(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return json.dumps(value)


def _run(tmp_path: Path, keys: dict) -> Path:
    run = tmp_path / "run"
    write_run(run, epochs=4, eta=0.5, batch=4, seed=3)
    add_smoothness(run, columns=("hess_norm",))  # a verdict could be reached: the scope decides
    lines = [
        line
        for line in (run / "config.toml").read_text().splitlines()
        if line.split("=")[0].strip() not in keys
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
    (run / "config.toml").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize("keys,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdicts_outside_the_scope_are_not_applicable(tmp_path, keys, reason):
    run = _run(tmp_path, keys)
    res = check_theorem(load_run(run))
    (entry,) = theorem_verdicts(load_study(run)[0])
    if reason is None:  # inside: the check runs as before (a verdict from the constants)
        assert res["not_applicable"] is None and res["bound"] is not None
        assert entry["verdict"] in ("satisfied", "violated")
        assert res["scope"] == THEOREM_SCOPE["igc"]
        return
    assert reason in res["not_applicable"]
    assert res["verdict"] == f"not applicable: {res['not_applicable']}"
    assert res["bound"] is None and res["drift"] is None
    assert entry["verdict"] == "not applicable" and entry["reason"] == res["not_applicable"]


# the same words in findings.json, the report and `clipscope theory` (two cases: each is slow)
SHOWN = [c for c in CASES if c[0] in ("momentum-and-cosine", "adam")]


@pytest.mark.parametrize("keys,reason", [c[1:] for c in SHOWN], ids=[c[0] for c in SHOWN])
def test_not_applicable_in_findings_report_and_theory(tmp_path, keys, reason):
    run = _run(tmp_path, keys)
    res = check_theorem(load_run(run))
    report = build_report(run).read_text()
    found = json.loads((run / "findings.json").read_text())["tasks"]["run"]["theorems"][0]
    assert found["verdict"] == "not applicable" and found["reason"] == res["not_applicable"]
    assert reason in found["reason"]
    assert "not applicable: " + res["not_applicable"].replace("'", "&#x27;") in report
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "theory", str(run), "--recorded-only"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(f"not applicable: {res['not_applicable']}")


def test_an_adaptive_run_reads_exactly_the_adaptive_sentence():
    assert theorem_scope("igc", 0.5, optimizer="adam") == (
        "not covered by the paper's theorems (adaptive method)"
    )


def test_runs_without_the_optimizer_key_are_sgd(tmp_path):
    """Runs written before `optimizer` existed: absent = "sgd", inside the scope."""
    run = _run(tmp_path, {})
    assert "optimizer" not in (run / "config.toml").read_text()
    assert check_theorem(load_run(run))["not_applicable"] is None


@pytest.mark.parametrize("method", ["sgd", "igc"])
def test_the_scope_names_the_papers_update_rule(method):
    assert {"sgd": "(9)", "igc": "(10)/(11)"}[method] in THEOREM_SCOPE[method]
    for words in ("constant step α", "finite η", "no momentum", "no weight decay"):
        assert words in THEOREM_SCOPE[method]
