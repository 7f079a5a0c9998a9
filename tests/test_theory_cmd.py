"""``clipscope theory``: a least-squares run whose every constant is known in closed form."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from clipscope.cli import main as cli_main
from clipscope.commands.theory import check_run
from clipscope.config import load_config
from clipscope.math import theory
from clipscope.run.directory import TIMING_COLUMNS, read_rows
from clipscope.tasks import build_task
from clipscope.train import train

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


# -- smoothness recorded during the run (smoothness_every) ---------------------

SMOOTH = """
task = "least_squares"
n_samples = 32
dim = 3
batch_size = 8
method = "igc"
lr = 0.02
eta = 1.0
epochs = 3
seed = 3
dtype = "float64"
threads = 1
progress = false
heldout = false
checkpoint_every = 3
"""
SMOOTH_ON = "smoothness_every = 1\nsmoothness_components = true\nsmoothness_tol = 1e-8\n"
SMOOTH_STEPS = 3 * 4  # epochs × m

KILL_SCRIPT = """
import os, signal, sys
from clipscope.train import train

config, out, at = sys.argv[1], sys.argv[2], int(sys.argv[3])

def on_step(step, i, norm):
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)

sys.exit(train(config, out, on_step=on_step, echo=lambda t: None))
"""


@pytest.fixture(scope="module")
def smooth_runs(tmp_path_factory):
    """Train the same IGC least-squares run with and without the smoothness probe."""
    base = tmp_path_factory.mktemp("smooth")
    threads = torch.get_num_threads()
    out = {}
    for name, extra in (("on", SMOOTH_ON), ("off", "")):
        cfg = base / f"{name}.toml"
        cfg.write_text(SMOOTH + extra)
        assert train(cfg, base / name, echo=_quiet) == 0
        out[name] = (cfg, base / name)
    torch.set_num_threads(threads)
    return out


def _final_model(run):
    from clipscope.atomic import latest_checkpoint

    return latest_checkpoint(run / "checkpoints")[1]["model"]


def _csv(run):
    import csv

    with open(run / "epochs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _lstsq_blocks(run):
    _, _, comps, _ = build_task(load_config(run / "config.toml"))
    blocks = [comps.batch(i)[0] for i in range(comps.m)]
    H = sum(X.T @ X / len(X) for X in blocks) / comps.m
    return blocks, H


def test_recorded_smoothness_matches_closed_form_without_measuring(smooth_runs, monkeypatch):
    """Least squares from a real run: L1 = 0, L0 = λ_max(∇²f), L0i = max_i λ_max(X_iᵀX_i/|B_i|).

    f = (1/m) Σ_i ½ mean over B_i of (xᵀw − y)²; read from the records only.
    """
    import numpy as np

    from clipscope import theory_check as tc

    _, run = smooth_runs["on"]
    blocks, H = _lstsq_blocks(run)
    lam = torch.linalg.eigvalsh(H)
    per = [_top(X.T @ X / len(X)) for X in blocks]

    def refuse(*args, **kwargs):
        raise AssertionError("recorded values exist: nothing may be measured")

    monkeypatch.setattr(tc, "measure_points", refuse)
    res = tc.theory_check(run, measure=True)
    assert res["estimate"] == "recorded_hessian" and res["component_estimate"] == "recorded_hessian"
    assert res["L0"] == pytest.approx(_top(H), rel=1e-10)
    assert res["L1"] == pytest.approx(0.0, abs=1e-8 * res["L0"])
    assert res["L0i"] == pytest.approx(max(per), rel=1e-10)
    assert res["L1i"] == pytest.approx(0.0, abs=1e-8 * res["L0i"])
    assert res["fit"]["n_points"] == 4 and res["all_converged"]
    rows = read_rows(run / "epochs.csv")
    assert np.all(rows["hess_converged"] == 1)
    for k in range(4):
        with np.load(run / f"components/epoch_{k:04d}.npz") as z:
            assert z["hess_norms"] == pytest.approx(per, rel=1e-10)
            assert z["hess_converged"].all()
    # secant of a quadratic: ‖H Δx‖/‖Δx‖ lies in [λ_min, λ_max]; none after the last probe
    traj = rows["traj_smoothness"]
    assert np.isnan(traj[-1]) and np.isfinite(traj[:-1]).all()
    assert np.all(traj[:-1] >= float(lam.abs().min()) * (1 - 1e-10))
    assert np.all(traj[:-1] <= float(lam.abs().max()) * (1 + 1e-10))
    assert res["trajectory_fit"]["n_points"] == 3
    # the theorem's pieces from the same constants
    limit = theory.igc_step_limit(
        c1=res["c1"], L1=res["L1"], L0i=res["L0i"], L1i=res["L1i"], eta=1.0, m=4
    )
    assert res["bound"]["condition"]["alpha_max"] == pytest.approx(limit)
    assert res["bound"]["condition"]["holds"] == (0.02 <= limit)
    drift = np.abs(rows["igc_drift"][np.isfinite(rows["igc_drift"])])
    assert res["drift"]["epochs"] == 3 and res["drift"]["max_drift"] == drift.max()
    assert res["drift"]["min_signed"] <= res["drift"]["max_signed"]
    assert ("satisfies" if 0.02 <= limit else "violates") in res["verdict"]


def test_smoothness_probe_leaves_training_bitwise_unchanged(smooth_runs):
    import numpy as np

    on, off = smooth_runs["on"][1], smooth_runs["off"][1]
    a, b = _final_model(on), _final_model(off)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(_csv(on), _csv(off), strict=True):
        assert {k: v for k, v in x.items() if k in y and k not in TIMING_COLUMNS} == {
            k: v for k, v in y.items() if k not in TIMING_COLUMNS
        }
    assert "hess_norm" not in _csv(off)[0] and "hess_norm" in _csv(on)[0]
    with (
        np.load(on / "components/epoch_0002.npz") as za,
        np.load(off / "components/epoch_0002.npz") as zb,
    ):
        assert all(np.array_equal(za[n], zb[n]) for n in zb.files)


def test_sigkill_then_resume_with_smoothness_is_bitwise_equal(smooth_runs, tmp_path):
    import random
    import signal

    import numpy as np

    from clipscope.atomic import list_checkpoints, load_checkpoint

    cfg, gold = smooth_runs["on"]
    at = random.Random("smooth-kill").randrange(6, SMOOTH_STEPS)
    script = tmp_path / "victim.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(cfg), str(run), str(at)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert state["units"]["smoothness"]["previous"] is not None  # the previous probe travels
    assert train(cfg, run, resume=True, echo=_quiet) == 0
    a, b = _final_model(gold), _final_model(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(_csv(gold), _csv(run), strict=True):
        for column in TIMING_COLUMNS:
            x.pop(column, None), y.pop(column, None)
        assert x == y
    for k in range(4):
        name = f"components/epoch_{k:04d}.npz"
        with np.load(gold / name) as za, np.load(run / name) as zb:
            assert za.files == zb.files and all(np.array_equal(za[n], zb[n]) for n in za.files)


def test_run_without_recorded_values_is_not_measured_when_told(runs, capsys):
    res = check_run(runs["igc"], measure=False)
    assert res["estimate"] is None and res["bound"] is None
    assert "no smoothness values recorded" in res["verdict"]
    assert cli_main(["theory", str(runs["igc"]), "--recorded-only"]) == 0
    assert "estimate used: none" in capsys.readouterr().out


def test_embedded_digits_mlp_end_to_end(tmp_path):
    """Digits through load_splits, an MLP, the probe recording ‖∇²f‖, theory and report."""
    import numpy as np

    from clipscope.report import build_report
    from clipscope.smoothness import hessian_norm
    from clipscope.theory_check import theory_check

    cfg = tmp_path / "digits.toml"
    cfg.write_text(
        'task = "classification"\ndata = "digits"\nmodel = "mlp"\nn_samples = 40\n'
        'batch_size = 20\nmethod = "igc"\nlr = 0.1\neta = 0.5\nepochs = 2\nthreads = 1\n'
        "progress = false\nsmoothness_every = 1\nsmoothness_components = true\n"
        "smoothness_max_iter = 20\nsmoothness_tol = 1e-3\n"
    )
    threads = torch.get_num_threads()
    try:
        assert train(cfg, tmp_path / "run", echo=_quiet) == 0
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    rows = read_rows(run / "epochs.csv")
    assert np.isfinite(rows["hess_norm"]).all() and np.all(rows["hess_norm"] > 0)
    # the recorded x_0 value is the Hessian norm of the seeded initial model
    model, loss_fn, comps, _ = build_task(load_config(run / "config.toml"))
    direct = hessian_norm(model, loss_fn, comps, max_iter=20, tol=1e-3)
    assert rows["hess_norm"][0] == pytest.approx(direct.hess_norm, rel=1e-6)
    res = theory_check(run, measure=False)
    assert res["estimate"] == "recorded_hessian" and res["m"] == 2
    assert math.isfinite(res["L0"]) and math.isfinite(res["L0i"])
    assert res["theorem"].startswith("Theorem 3.2") and res["verdict"]
    page = build_report(run).read_text()
    assert "Theory check: IGC B=20" in page and (run / "figures" / "run-smoothness.png").is_file()
