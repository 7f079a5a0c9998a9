"""The report as a person would see it: built from hand-written records only."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clipscope.report import build_report
from clipscope.run.directory import load_run

COLUMNS = ["epoch", "loss", "grad_norm", "c1", "c2", "b_noise"]


def write_run(path: Path, *, epochs: int, eta: float, batch: int, seed: int, nan_rows=()) -> None:
    """Write a run directory in the runner's format from random component vectors."""
    rng = np.random.default_rng(seed)
    (path / "components").mkdir(parents=True)
    eta_text = "inf" if math.isinf(eta) else repr(eta)
    (path / "config.toml").write_text(
        f'method = "igc"\neta = {eta_text}\nbatch_size = {batch}\nlr = 0.01\n'
    )
    with open(path / "epochs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for k in range(epochs):
            g = rng.normal(size=(12, 5)) + np.array([1.0, 0, 0, 0, 0])
            full = g.mean(axis=0)
            norms, dots = np.linalg.norm(g, axis=1), g @ full
            gn = float(np.linalg.norm(full))
            np.savez(
                path / "components" / f"epoch_{k:04d}.npz",
                norms=norms,
                dots=dots,
                losses=norms**2,
                grad_norm=gn,
            )
            cos = dots / (norms * gn)
            row = [k, float(np.mean(norms**2)), gn, cos.mean(), norms.min() / norms.max(), 3.0]
            writer.writerow(["nan" if k in nan_rows and i > 0 else v for i, v in enumerate(row)])


def write_study(root: Path, epochs: int = 4, nan_rows=()) -> Path:
    runs = []
    for batch in (4, 8):
        rel = f"runs/toy/igc-B{batch}"
        write_run(root / rel, epochs=epochs, eta=0.5, batch=batch, seed=batch, nan_rows=nan_rows)
        runs.append({"method": "igc", "batch_size": batch, "dir": rel})
    cross = {
        "batch_sizes": [1, 2, 4, 8],
        "c1": [0.2, 0.3, 0.45, 0.6],
        "predicted_cos": [0.25, 0.33, 0.45, 0.58],
    }
    (root / "cross_section").mkdir()
    (root / "cross_section" / "toy.json").write_text(json.dumps(cross))
    study = {"tasks": {"toy": {"runs": runs, "cross_section": "cross_section/toy.json"}}}
    (root / "study.json").write_text(json.dumps(study))
    return root


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(path: Path) -> list[tuple[str, dict]]:
    collector = _Collector()
    collector.feed(path.read_text())
    return collector.tags


def test_report_structure(tmp_path):
    report = build_report(write_study(tmp_path))
    tags = parse(report)
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) == 6  # five per-task figures and the η advice
    assert all(attrs["src"].startswith("data:image/png;base64,") for attrs in images)
    assert sum(tag == "table" for tag, _ in tags) == 2  # the findings and the runs
    assert sum(tag == "tr" for tag, _ in tags) == 5 + 3  # 5 findings; header + two runs
    assert len(list((tmp_path / "figures").glob("*.png"))) == 6
    assert (tmp_path / "findings.json").is_file()
    text = report.read_text()
    assert "IGC B=4" in text and "IGC B=8" in text


@pytest.mark.parametrize(
    "epochs,nan_rows",
    [(1, ()), (5, (1, 3)), (3, (0, 1, 2))],
    ids=["one-epoch", "nan-gaps", "all-nan"],
)
def test_report_copes_with_nan_and_single_epoch(tmp_path, epochs, nan_rows):
    report = build_report(write_study(tmp_path, epochs=epochs, nan_rows=nan_rows))
    assert sum(tag == "img" for tag, _ in parse(report)) == 6


def test_report_table_values_match_records(tmp_path):
    """ρ(η) in the table equals a brute-force recomputation from the stored arrays."""
    write_study(tmp_path)
    run = load_run(tmp_path / "runs/toy/igc-B4")
    arrays = run.components()
    n, d, gn = arrays["norms"], arrays["dots"], float(arrays["grad_norm"])
    rho = np.sum(np.minimum(n, 0.5) * d / n) / (len(n) * gn**2)
    assert f"{rho:.4g}" in build_report(tmp_path).read_text()


def test_report_cli_single_run(tmp_path):
    write_run(tmp_path / "run", epochs=2, eta=math.inf, batch=4, seed=1)
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "report", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "report.html").is_file()


def test_report_cli_missing_dir(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "no such directory" in done.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="Debian's chromium is not installed (make test installs it)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    report = build_report(write_study(tmp_path / "study"))
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1800",
        f"--screenshot={shot}", report.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    # not blank: text and plot lines; the figures show matplotlib's first two line colours
    rgb = (pixels * 255).astype(int)
    assert np.mean(pixels.min(axis=-1) < 0.9) > 0.02
    for colour in ((31, 119, 180), (255, 127, 14)):  # tab:blue, tab:orange
        close = np.abs(rgb - np.array(colour)).sum(axis=-1) < 40
        assert close.sum() > 500, f"no plotted lines of colour {colour} in the screenshot"


# -- smoothness records: the figure and the theory section ---------------------------


def add_smoothness(run: Path, *, columns=("hess_norm", "traj_smoothness"), nan_rows=()) -> None:
    """Add recorded smoothness to a written run: ‖∇²f‖ = 1 + 2‖∇f‖ exactly, ‖∇²f_i‖ likewise."""
    with open(run / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for k, row in enumerate(rows):
        gn = float(row["grad_norm"])
        bad = k in nan_rows
        if "hess_norm" in columns:
            row["hess_norm"] = "nan" if bad else repr(1.0 + 2.0 * gn)
            row["hess_converged"] = "nan" if bad else "1.0"
        if "traj_smoothness" in columns:
            row["traj_smoothness"] = "nan" if bad or k == len(rows) - 1 else repr(0.5 + gn)
        path = run / "components" / f"epoch_{k:04d}.npz"
        with np.load(path) as z:
            arrays = dict(z)
        arrays["hess_norms"] = 3.0 + 0.5 * arrays["norms"]
        np.savez(path, **arrays)
    with open(run / "epochs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    "epochs,nan_rows,columns,fitted",
    [
        (4, (), ("hess_norm", "traj_smoothness"), True),
        (1, (), ("hess_norm", "traj_smoothness"), False),
        (5, (1, 3), ("hess_norm",), True),
        (3, (0, 1, 2), ("hess_norm", "traj_smoothness"), None),
        (4, (), ("traj_smoothness",), True),
    ],
    ids=["clean", "one-epoch", "nan-gaps", "all-nan", "only-secants"],
)
def test_report_smoothness_figure_and_theory_section(tmp_path, epochs, nan_rows, columns, fitted):
    """The sixth figure and a theory table per run, from recorded values only."""
    from clipscope.theory_check import theory_check

    root = write_study(tmp_path, epochs=epochs)
    runs = [root / "runs/toy/igc-B4", root / "runs/toy/igc-B8"]
    for run in runs:
        add_smoothness(run, columns=columns, nan_rows=nan_rows)
    report = build_report(root)
    tags = parse(report)
    assert sum(tag == "img" for tag, _ in tags) == 7
    assert (root / "figures" / "toy-smoothness.png").is_file()
    text = report.read_text()
    res = theory_check(runs[0], measure=False)
    if fitted is None:  # a column of NaN only: nothing recorded, nothing computed
        assert res["estimate"] is None
        assert text.count("no smoothness values recorded in these runs") == 1
        assert "Theory check of IGC B=4, IGC B=8: no smoothness" in text
        assert sum(tag == "table" for tag, _ in tags) == 2  # findings + the task table
        return
    # findings (+ its verdict table when a verdict was reached), the task table, one per run
    assert sum(tag == "table" for tag, _ in tags) == 4 + bool(fitted)
    assert text.count("Theory check: IGC") == 2
    expected = "recorded_hessian" if "hess_norm" in columns else "recorded_trajectory"
    assert res["estimate"] == expected and res["component_estimate"] == "recorded_hessian"
    if fitted:
        assert res["L0i"] == pytest.approx(3.0) and res["L1i"] == pytest.approx(0.5, abs=1e-12)
    else:
        assert math.isnan(res["L0i"]) and "L0i, L1i are missing" not in res["verdict"]
    if fitted:  # the hand-written runs have no igc_drift column: no drift, still a verdict
        assert res["drift"]["epochs"] == 0 and res["verdict"].startswith("α = ")
    if fitted and expected == "recorded_hessian":
        assert (res["L0"], res["L1"]) == (pytest.approx(1.0), pytest.approx(2.0))
        assert "1, 2 (hull fit" in text
    elif fitted:
        assert (res["L0"], res["L1"]) == (pytest.approx(0.5), pytest.approx(1.0))
        assert "secants" in res["verdict"]
    else:
        assert "too_few_points" in res["fit"]["flags"] and "could not be fitted" in res["verdict"]
