"""``clipscope theory``: a least-squares run whose every constant is known in closed form."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from clipscope import theory
from clipscope.cli import main as cli_main
from clipscope.commands.theory import check_run
from clipscope.config import load_config
from clipscope.report.records import read_rows
from clipscope.runner import build_task, train

CONFIG = """
task = "least_squares"
n_samples = 32
dim = 3
batch_size = 8
method = "{method}"
lr = 0.02
eta = {eta}
epochs = 2
seed = 3
dtype = "float64"
threads = 1
progress = false
heldout = false
"""


def _quiet(text):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("theory")
    threads = torch.get_num_threads()
    out = {}
    for name, method, eta in (("igc", "igc", "1.0"), ("sgd-noclip", "sgd", "inf")):
        cfg = base / f"{name}.toml"
        cfg.write_text(CONFIG.format(method=method, eta=eta))
        assert train(cfg, base / name, echo=_quiet) == 0
        out[name] = base / name
    torch.set_num_threads(threads)
    return out


def _top(H):
    return float(torch.linalg.eigvalsh(H).abs().max())


def test_least_squares_constants_match_closed_form(runs):
    run = runs["igc"]
    res = check_run(run)
    cfg = load_config(run / "config.toml")
    _, _, comps, _ = build_task(cfg)
    # f = (1/m) Σ_i ½ mean_{j∈B_i} (x_jᵀw − y_j)²: ∇²f = (1/m) Σ_i X_iᵀX_i/|B_i|, constant in w.
    blocks = [comps.batch(i)[0] for i in range(comps.m)]
    H = sum(X.T @ X / len(X) for X in blocks) / comps.m
    assert res["L0"] == pytest.approx(_top(H), rel=1e-8)
    assert res["L1"] == pytest.approx(0.0, abs=1e-8 * res["L0"])
    assert res["L0i"] == pytest.approx(max(_top(X.T @ X / len(X)) for X in blocks), rel=1e-8)
    assert res["L1i"] == pytest.approx(0.0, abs=1e-8 * res["L0i"])
    rows = read_rows(run / "epochs.csv")
    assert res["c1"] == rows["c1"].min() and res["c2"] == rows["c2"].min()
    assert res["gap"] == rows["loss"][0] and res["f_star_lower_bound"] == 0.0
    assert res["points"][0]["point"] == "x0" and len(res["points"]) >= 2
    assert res["all_converged"]
    limit = theory.igc_step_limit(
        c1=res["c1"], L1=res["L1"], L0i=res["L0i"], L1i=res["L1i"], eta=1.0, m=comps.m
    )
    assert res["bound"]["condition"]["alpha_max"] == pytest.approx(limit)
    lhs = theory.bound_lhs(rows["grad_norm"], c1=res["c1"], c2=res["c2"], eta=1.0)
    assert res["bound"]["lhs"] == pytest.approx(lhs)
    assert res["drift"]["epochs"] >= 1
    assert ("satisfies" if 0.02 <= limit else "violates") in res["verdict"]


def test_unclipped_sgd_run_is_outside_the_theorems(runs):
    res = check_run(runs["sgd-noclip"])
    assert res["bound"] is None and "η = ∞" in res["verdict"]
    assert "L0i" not in res and math.isfinite(res["L0"])


def test_cli_subprocess_json_and_text(runs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "clipscope", "theory", str(runs["igc"])]
    done = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["theorem"].startswith("Theorem 3.2") and data["L0"] > 0
    assert cli_main(["theory", str(runs["igc"]), "--fit", "quantile"]) == 0


def test_not_a_run_directory_is_exit_2(tmp_path, capsys):
    assert cli_main(["theory", str(tmp_path)]) == 2
    assert "not a clipscope run directory" in capsys.readouterr().err
