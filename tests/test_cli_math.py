"""``clipscope example1`` and ``clipscope bounds`` run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipscope.cli import main
from clipscope.math import theory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def clipscope(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipscope", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_example1_json(tmp_path):
    alpha = 0.008
    out = tmp_path / "deep" / "ex1"
    proc = clipscope(
        "example1", "--alpha", str(alpha), "--epochs", "60", "--seeds", "50", "--out", str(out),
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["expected_x1"] == pytest.approx(1 + 2 * alpha / 3, rel=1e-14)
    assert data["paper_expected_x1"]["applies"] and data["paper_expected_x1"]["matches"]
    assert (data["alpha"], data["eta"], data["watershed"]) == (alpha, 2.0, 0.5)
    sims = {(s["x0"], s["method"]): s for s in data["simulations"]}
    assert set(sims) == {(x0, m) for x0 in (1.0, 0.25) for m in ("sgd", "igc", "rr")}
    # IGC and RR are all-clipped from x0 = 1 (+αη per epoch); a rare SGD run may cross
    # the watershed by chance (tests/test_example1.py checks the claims in detail)
    assert sims[(1.0, "igc")]["fraction_away"] == sims[(1.0, "rr")]["fraction_away"] == 1.0
    assert sims[(1.0, "sgd")]["fraction_away"] >= 0.9
    assert sims[(0.25, "igc")]["fraction_toward"] == 1.0
    assert sims[(0.25, "sgd")]["fraction_toward"] >= 0.9
    plot = out / "example1.png"
    assert data["plot"] == str(plot)
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_example1_table_default_out(tmp_path):
    proc = clipscope("example1", "--epochs", "20", "--seeds", "20", "--x0", "-3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = theory.expected_x1(-3.0, 0.01, 2.0)
    assert f"{expected:.10g}" in proc.stdout
    assert "1 + 2α/3" not in proc.stdout  # the paper's number applies to x0 = 1 only
    assert "watershed" in proc.stdout
    plot = tmp_path / "clipscope-out" / "example1" / "example1.png"
    assert f"plot: {plot.relative_to(tmp_path)}" in proc.stdout
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_example1_bad_eta_exits_2_as_a_process(tmp_path):
    proc = clipscope("example1", "--eta", "-1", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "clipscope example1: error:" in proc.stderr and "eta" in proc.stderr
    assert not (tmp_path / "x").exists()


# The remaining bad inputs go through the same ``cli.main`` in-process: every
# subprocess pays the start-up of all command modules (seconds on a shared CPU).


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--eta", "0"], "eta"),
        (["--eta", "nan"], "eta"),
        (["--alpha", "0"], "alpha"),
        (["--alpha", "inf"], "alpha"),
        (["--seeds", "0"], "seeds"),
        (["--epochs", "-1"], "epochs"),
    ],
    ids=["eta-zero", "eta-nan", "alpha-zero", "alpha-inf", "seeds", "epochs"],
)
def test_example1_bad_input_exits_2(tmp_path, capsys, args, match):
    assert main(["example1", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "clipscope example1: error:" in err and match in err
    assert not (tmp_path / "x").exists()


SGD_ARGS = [
    "--L0", "3", "--L1", "0.5", "--c1", "0.5", "--c2", "0.25", "--eta", "2", "--alpha", "0.1",
    "--gap", "4",
]  # fmt: skip
IGC_ARGS = [*SGD_ARGS, "--L0i", "1,2", "--L1i", "0.25,0.125", "--m", "2"]


def test_bounds_sgd_json_matches_library():
    proc = clipscope("bounds", "--method", "sgd", *SGD_ARGS, "--grad-norms", "4,1,0", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ref = theory.sgd_bound(
        [4.0, 1.0, 0.0], L0=3, L1=0.5, c1=0.5, c2=0.25, eta=2, alpha=0.1, gap=4
    ).to_dict()
    assert data == ref
    assert data["rhs"] == pytest.approx(80 / 3 + 6.8)
    assert data["condition"]["alpha_max"] == pytest.approx(0.125)


def test_bounds_igc_json_from_file(tmp_path):
    norms = tmp_path / "norms.txt"
    norms.write_text("4\n1, 0\n")
    proc = clipscope(
        "bounds", "--method", "igc", *IGC_ARGS, "--grad-norms-file", str(norms), "--T", "2",
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["G"] == pytest.approx(18.0)
    assert data["drift_bound"] == pytest.approx([57.6, 14.4, 0.0])
    assert data["condition"]["holds"] is False
    assert data["rhs"] == pytest.approx(40 / 3 + 12 + 16)


def test_bounds_text(capsys):
    assert main(["bounds", "--method", "sgd", *SGD_ARGS, "--grad-norms", "4 1 0"]) == 0
    out = capsys.readouterr().out
    assert "(37)" in out and "(38)" in out and "drops /c2" in out
    assert main(["bounds", "--method", "igc", *IGC_ARGS, "--grad-norms", "4 1 0"]) == 0
    out = capsys.readouterr().out
    assert "(43)" in out and "(44)" in out and "(45)" in out and "VIOLATED" in out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--method", "sgd", *SGD_ARGS, "--c1", "1.5", "--grad-norms", "1"], "c1"),
        (["--method", "sgd", *SGD_ARGS, "--grad-norms", "1,2", "--T", "5"], "T + 1"),
        (["--method", "sgd", *SGD_ARGS, "--grad-norms", "1,x"], "--grad-norms"),
        (["--method", "sgd", *SGD_ARGS, "--eta", "inf", "--grad-norms", "1"], "finite"),
        (["--method", "sgd", *SGD_ARGS, "--m", "3", "--grad-norms", "1"], "--m"),
        (["--method", "igc", *SGD_ARGS, "--grad-norms", "1"], "--m"),
        (["--method", "igc", *IGC_ARGS, "--m", "3", "--grad-norms", "1"], "m = 3"),
        (["--method", "sgd", *SGD_ARGS, "--grad-norms-file", "/nonexistent/n.txt"], "n.txt"),
    ],
    ids=["c1", "T", "norms-text", "eta-inf", "sgd-m", "igc-no-m", "igc-len", "missing-file"],
)
def test_bounds_bad_input_exits_2(capsys, args, match):
    assert main(["bounds", *args]) == 2
    err = capsys.readouterr().err
    assert "clipscope bounds: error:" in err and match in err


def test_bounds_bad_input_exits_2_as_a_process():
    proc = clipscope("bounds", "--method", "sgd", *SGD_ARGS, "--c2", "0", "--grad-norms", "1")
    assert proc.returncode == 2
    assert "clipscope bounds: error:" in proc.stderr and "c2" in proc.stderr


def test_version_and_report_help_do_not_import_the_heavy_libraries():
    """`clipscope --version` answers at once; `report` loads matplotlib only when it runs."""
    code = (
        "import sys\n"
        "from clipscope.cli import main, build_parser\n"
        "assert main(['--version']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "build_parser('report')\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("clipscope ")
