"""`clipscope advise` as a real subprocess: the advice, its figures, and clear errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipscope.math.advice import advise
from clipscope.report.findings import run_points
from clipscope.run.directory import load_run
from test_report import write_run, write_study


def clipscope(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipscope", "advise", *args], capture_output=True, text=True
    )


def test_advise_a_study_prints_json_and_writes_one_figure_per_run(tmp_path):
    root = write_study(tmp_path / "study")
    done = clipscope(str(root), "--json", "--target", "0.8")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["target"] == 0.8
    runs = out["tasks"]["toy"]["runs"]
    assert set(runs) == {"igc-B4", "igc-B8"}
    for label, advice in runs.items():
        points = [s for _, s in run_points(load_run(root / "runs/toy" / label))]
        expect = advise(points, 0.8)
        assert advice["eta_max"] == pytest.approx(expect.eta_max)
        assert advice["eta_reversal"] == pytest.approx(expect.eta_reversal)
        assert len(advice["points"]) == len(points)
    overall = out["tasks"]["toy"]["eta_advice"]
    assert overall["eta_max"] == pytest.approx(max(r["eta_max"] for r in runs.values()))
    figures = [Path(p) for p in out["figures"]]
    assert sorted(p.name for p in figures) == ["toy-igc-B4.png", "toy-igc-B8.png"]
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in figures)
    assert figures[0].parent == root / "advice"


def test_advise_a_run_in_words_with_another_out(tmp_path):
    write_run(tmp_path / "run", epochs=3, eta=0.5, batch=4, seed=2)
    done = clipscope(str(tmp_path / "run"), "--out", str(tmp_path / "figs"))
    assert done.returncode == 0, done.stderr
    assert "eta_max =" in done.stdout and "igc-B4" in done.stdout
    assert (tmp_path / "figs" / "igc-B4.png").is_file()


def _nothing_written(path: Path, before: set) -> bool:
    return {p for p in path.rglob("*")} == before


@pytest.mark.parametrize(
    "make,args,message",
    [
        ("empty", [], "holds no runs"),
        ("missing", [], "no such directory"),
        ("file", [], "is a file, not a run directory"),
        ("study-without-runs", [], "names no runs"),
        ("run-without-profiles", [], "no η-profiles"),
        ("study", ["--target", "0"], "target must be in (0, 1]"),
        ("study", ["--target", "1.5"], "target must be in (0, 1]"),
        ("study", ["--target", "nan"], "target must be in (0, 1]"),
    ],
)
def test_bad_input_exits_2_before_writing(tmp_path, make, args, message):
    root = tmp_path / "d"
    if make == "empty":
        root.mkdir()
    elif make == "study-without-runs":
        root.mkdir()
        (root / "study.json").write_text(json.dumps({"tasks": {"toy": {"runs": []}}}))
    elif make == "run-without-profiles":
        write_run(root, epochs=2, eta=0.5, batch=4, seed=1)
        for item in (root / "components").iterdir():
            item.unlink()
    elif make == "study":
        write_study(root)
    elif make == "file":
        root.write_text("eta = 1.0\n")
    before = set(root.rglob("*")) if root.is_dir() else set()
    done = clipscope(str(root), *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not root.is_dir() or _nothing_written(root, before)
    assert [p.name for p in tmp_path.iterdir()] == (["d"] if root.exists() else [])


def test_help_names_the_outputs():
    done = clipscope("--help")
    assert done.returncode == 0
    assert "eta_max" in done.stdout and "--target" in done.stdout
