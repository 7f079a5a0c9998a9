"""Descent-safe clipping and AutoClip (issue 23): the η decisions, in math and in training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipscope import fit
from clipscope.components import Components
from clipscope.config import parse_config
from clipscope.loop import Unit
from clipscope.math.advice import advice_grid
from clipscope.math.stats import ComponentStats, DirectionStats, EtaProfile
from clipscope.math.thresholds import (
    autoclip_threshold,
    descent_safe_threshold,
    replay_descent_safe,
    stored_profile,
)
from clipscope.methods import make_order
from clipscope.run.directory import load_run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# -- the math: a float64 brute force over a fine grid --------------------------------


def brute_ratio(norms, dots, eta):
    """ρ(η) = Σ_i min{n_i, η}·d_i/n_i / Σ_i d_i, directly, in float64 (zero norms give 0)."""
    n, d = np.asarray(norms, np.float64), np.asarray(dots, np.float64)
    pos = n > 0
    e = np.asarray(eta, np.float64)[..., None]
    return (np.minimum(e, n[pos]) / n[pos] * d[pos]).sum(-1) / d[pos].sum()


def brute_descent_safe(norms, dots, target, grid):
    """Return the smallest grid η from which on every grid η keeps ρ ≥ target (the slow twin)."""
    bad = np.flatnonzero(brute_ratio(norms, dots, grid) < target)
    return float(grid[0]) if bad.size == 0 else float(grid[bad[-1] + 1])


problems = st.integers(2, 12).flatmap(
    lambda m: st.tuples(
        st.lists(st.floats(0.05, 20.0), min_size=m, max_size=m),
        st.lists(st.floats(-1.0, 1.0), min_size=m, max_size=m),
        st.floats(0.1, 5.0),
    )
)


def _stats(norms, cos, g):
    """Consistent inputs: d_i = n_i·g·cos_i, scaled so that Σ d_i = m g² > 0."""
    n = np.asarray(norms)
    d = n * g * np.asarray(cos)
    if d.sum() <= 1e-3 * np.abs(d).sum():  # make the sum positive (ρ defined)
        d = d + (np.abs(d).sum() + 1.0) / n.size
    return n, d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems, target=st.floats(0.05, 1.0))
def test_descent_safe_equals_the_brute_force_scan(problem, target):
    norms, cos, g = problem
    n, d = _stats(norms, cos, g)
    profile = EtaProfile(n, d, g)
    decision = descent_safe_threshold(profile, target)
    assert decision.reason == "target"
    grid = advice_grid([n], per_decade=4000)
    slow = brute_descent_safe(n, d, target, grid)
    # the grid holds every norm (each linear piece's ends): the exact answer lies in the
    # grid step below the grid's answer
    k = int(np.searchsorted(grid, slow))
    below = grid[k - 1] if k > 0 else 0.0
    assert below - 1e-9 * slow <= decision.eta <= slow * (1 + 1e-12)
    # the breakpoint property, evaluated directly: ρ ≥ ρ* at η, < ρ* just below it
    assert brute_ratio(n, d, decision.eta) >= target - 1e-9
    assert brute_ratio(n, d, decision.eta * (1 - 1e-6)) < target
    # and from η on every larger grid η keeps it
    above = grid[grid >= decision.eta * (1 + 1e-9)]
    assert (brute_ratio(n, d, above) >= target - 1e-9).all()
    assert math.isclose(decision.rho, float(brute_ratio(n, d, decision.eta)), abs_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    problem=problems,
    target=st.floats(0.05, 1.0),
    lo=st.floats(0.01, 30.0),
    width=st.floats(0.0, 30.0),
)
def test_bounds_clamp_and_say_so(problem, target, lo, width):
    norms, cos, g = problem
    n, d = _stats(norms, cos, g)
    profile = EtaProfile(n, d, g)
    free = descent_safe_threshold(profile, target).eta
    hi = lo + width
    bounded = descent_safe_threshold(profile, target, eta_min=lo, eta_max=hi)
    assert bounded.eta == min(max(free, lo), hi)
    assert bounded.unbounded == free
    expected = "eta_min" if free < lo else "eta_max" if free > hi else "target"
    assert bounded.reason == expected


def test_example_1_and_the_undefined_case():
    p = EtaProfile([2.0, 2.0, 10.0], [-4.0, -4.0, 20.0], 2.0)  # D = 2η − 8 on [2, 10]
    assert descent_safe_threshold(p, 0.5).eta == 7.0
    assert descent_safe_threshold(p, 1.0).eta == 10.0
    zero = EtaProfile([1.0, 1.0], [0.0, 0.0], 0.0)  # ∇f = 0: ρ undefined
    d = descent_safe_threshold(zero, 0.9)
    assert (d.eta, d.reason) == (math.inf, "undefined") and math.isnan(d.rho)
    assert descent_safe_threshold(zero, 0.9, eta_max=3.0).eta == 3.0
    with pytest.raises(ValueError, match="target"):
        descent_safe_threshold(p, 0.0)
    with pytest.raises(ValueError, match="eta_min"):
        descent_safe_threshold(p, 0.5, eta_min=3.0, eta_max=2.0)


@settings(max_examples=40, deadline=None)
@given(problem=problems, scale=st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3))
def test_preconditioned_profile_matches_direction_stats(problem, scale):
    """ρ_P from the stored arrays (dots_p, u_norm, grad_u_inner) is DirectionStats' ρ_P."""
    norms = problem[0]
    rng = np.random.default_rng(len(norms))
    m = len(norms)
    grads = rng.normal(size=(m, 3)) * np.asarray(norms)[:, None]
    full = grads.mean(0)
    u = full / np.asarray(scale)  # P⁻¹∇f with P = diag(scale)
    arrays = {
        "norms": np.linalg.norm(grads, axis=1),
        "dots_p": grads @ u,
        "u_norm": np.linalg.norm(u),
        "grad_u_inner": float(full @ u),
    }
    decision = descent_safe_threshold(stored_profile(arrays, True), 0.9)
    stats = DirectionStats(arrays["norms"], arrays["dots_p"], arrays["u_norm"], full @ u)
    assert stats.ratio(decision.eta) >= 0.9 - 1e-9
    assert stats.ratio(decision.eta * (1 - 1e-6)) < 0.9 or decision.eta == 0


# -- AutoClip: numpy's percentile, the paper's history ---------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=40),
    p=st.floats(0.01, 100.0),
)
def test_autoclip_is_the_linear_percentile(values, p):
    s = np.sort(np.asarray(values))
    h = (s.size - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, s.size - 1)
    expected = s[lo] + (h - lo) * (s[hi] - s[lo])  # numpy's "linear" (type 7)
    got = autoclip_threshold(values, p)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert s[0] <= got <= s[-1]
    assert autoclip_threshold(values, 100) == s[-1]


# -- in training -----------------------------------------------------------------------


def _problem(seed=0, n=48, batch=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return Components.from_tensors(X, Y, batch_size=batch)


def _loss(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def _model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1).double()


@pytest.mark.parametrize("method", ["sgd", "igc", "rr"])
def test_autoclip_training_equals_a_plain_numpy_reimplementation(method):
    comps, p, lr, epochs = _problem(), 25.0, 0.05, 3
    model = _model()
    history = fit(model, _loss, comps, method, lr=lr, eta="autoclip", autoclip_percentile=p,
                  epochs=epochs, seed=7, progress=False, probe_every=0)  # fmt: skip
    # the reference: the paper's loop, written out (np.percentile of all norms so far)
    ref = _model()
    w = [t.detach().clone() for t in ref.parameters()]
    order, norms, etas = make_order(method, len(comps), seed=7), [], []
    for _ in range(epochs):
        for i in order.next_epoch():
            x, y = comps.batch(i)
            for t, v in zip(ref.parameters(), w, strict=True):
                t.data.copy_(v)
                t.grad = None
            _loss(ref(x), y).backward()
            g = [t.grad.detach().clone() for t in ref.parameters()]
            norm = math.sqrt(sum(float((v**2).sum()) for v in g))
            norms.append(norm)
            eta = float(np.percentile(norms, p))
            etas.append(eta)
            scale = min(1.0, eta / norm)
            w = [v - lr * scale * gv for v, gv in zip(w, g, strict=True)]
    for got, want in zip(model.parameters(), w, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    assert history.steps == len(etas)
    assert len({round(e, 12) for e in etas}) > 3  # η moved


def test_descent_safe_run_records_eta_and_report_replays_it(tmp_path):
    comps, run = _problem(), tmp_path / "run"
    lines: list[str] = []
    h = fit(_model(), _loss, comps, "rr", lr=0.1, eta="descent-safe", rho_target=0.8,
            epochs=3, seed=2, progress=False, run_dir=run, log=lines.append)  # fmt: skip
    recorded = [r["eta"] for r in h.rows]
    assert all(math.isfinite(e) and e > 0 for e in recorded)
    # the rows' ρ at the recorded η is the target (ρ with m‖∇f‖²; equal to rounding)
    assert all(r["rho"] == pytest.approx(0.8, abs=1e-9) for r in h.rows)
    # one log line per change of η
    changes = sum(a != b for a, b in zip([math.inf, *recorded], recorded, strict=False))
    assert sum("descent-safe: η" in t for t in lines) == changes >= 2
    # recomputed from the stored component files alone
    record = load_run(run)
    assert record.eta_rule == "descent-safe" and math.isnan(record.eta)
    files = [record.components(int(k)) for k in record.column("epoch")]
    replayed = replay_descent_safe(files, 0.8)
    assert [d.eta for d in replayed] == recorded
    assert list(record.column("eta")) == recorded
    # and against the brute force on the same arrays
    for arrays, eta in zip(files, recorded, strict=True):
        grid = advice_grid([arrays["norms"]], per_decade=4000)
        slow = brute_descent_safe(arrays["norms"], arrays["dots"], 0.8, grid)
        assert eta <= slow * (1 + 1e-12) and brute_ratio(arrays["norms"], arrays["dots"], eta) >= (
            0.8 - 1e-9
        )
    # η is fixed between probes: each step's clip used the η of its interval
    assert all(r["train_clipped_share"] > 0 for r in h.rows[:-1])


class _StepEtas(Unit):
    """Records each update's η and the rows (a unit of the test's own)."""

    name = "step_etas"

    def __init__(self):
        self.etas, self.rows = [], []

    def at_point(self, point):
        self.rows = point.rows

    def after_update(self, step):
        self.etas.append((step.number, step.eta))


def test_descent_safe_steps_use_the_eta_in_force():
    """Every step of interval k is clipped at the η decided at x_k (not at any other)."""
    comps, probe = _problem(), _StepEtas()
    fit(_model(), _loss, comps, "igc", lr=0.1, eta="descent-safe", rho_target=0.95,
        epochs=2, progress=False, units=[probe])  # fmt: skip
    m = len(comps)
    assert len(probe.etas) == 2 * m
    for step, eta in probe.etas:
        assert eta == probe.rows[(step - 1) // m]["eta"]


def test_descent_safe_under_adamw_uses_rho_p(tmp_path):
    comps, run = _problem(), tmp_path / "run"
    h = fit(_model(), _loss, comps, "rr", optimizer="adamw", lr=0.01, eta="descent-safe",
            rho_target=0.9, epochs=2, seed=1, progress=False, run_dir=run)  # fmt: skip
    assert all(r["rho_p"] == pytest.approx(0.9, abs=1e-9) for r in h.rows)
    record = load_run(run)
    files = [record.components(int(k)) for k in record.column("epoch")]
    assert [d.eta for d in replay_descent_safe(files, 0.9, preconditioned=True)] == [
        r["eta"] for r in h.rows
    ]


def test_stats_of_the_recorded_rows_agree_with_componentstats(tmp_path):
    """The row's clipped_fraction is that of the η in force (not of a fixed η)."""
    comps = _problem()
    h = fit(_model(), _loss, comps, "sgd", lr=0.1, eta="descent-safe", epochs=1,
            progress=False, run_dir=tmp_path / "r")  # fmt: skip
    record = load_run(tmp_path / "r")
    for k, row in enumerate(h.rows):
        a = record.components(k)
        stats = ComponentStats(a["norms"], a["dots"], a["grad_norm"])
        assert row["clipped_fraction"] == stats.clipped_fraction(row["eta"])


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"eta": "descent"}, "eta"),
        ({"eta": "descent-safe", "rho_target": 0.0}, "rho_target"),
        ({"eta": "descent-safe", "rho_target": 1.5}, "rho_target"),
        ({"eta": "descent-safe", "rho_target": "0.9"}, "rho_target"),
        ({"eta": "descent-safe", "eta_min": 0.0}, "eta_min"),
        ({"eta": "descent-safe", "eta_min": 2.0, "eta_max": 1.0}, "eta_min"),
        ({"eta": "descent-safe", "probe_every": 0}, "probe_every"),
        ({"eta": "autoclip", "autoclip_percentile": 0}, "autoclip_percentile"),
        ({"eta": "autoclip", "autoclip_percentile": 101}, "autoclip_percentile"),
        ({"eta": 1.0, "rho_target": 0.5}, "rho_target"),  # does not apply
        ({"eta": "autoclip", "eta_max": 3.0}, "eta_max"),  # does not apply
        ({"eta": "descent-safe", "autoclip_percentile": 50}, "autoclip_percentile"),
        ({"eta": "autoclip", "method": "zhang"}, "eta"),
    ],
    ids=str,
)
def test_bad_settings_name_the_key(raw, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        parse_config(raw)


def test_rule_settings_round_trip_through_config_toml(tmp_path):
    import tomllib

    from clipscope.config import dump_config

    cfg = parse_config({"eta": "descent-safe", "rho_target": 0.5, "eta_max": 4.0})
    assert parse_config(tomllib.loads(dump_config(cfg))) == cfg
    cfg = parse_config({"eta": "autoclip", "autoclip_percentile": 25})
    assert parse_config(tomllib.loads(dump_config(cfg))) == cfg


# -- the report: η over training, recomputed from the stored profiles -------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_report_recomputes_every_eta_and_draws_it(tmp_path, optimizer):
    from clipscope.report.html import build_report
    from clipscope.report.plots import eta_trajectory
    from clipscope.run.study import load_study

    run = tmp_path / "run"
    h = fit(_model(), _loss, _problem(), "igc", optimizer=optimizer, lr=0.05,
            eta="descent-safe", rho_target=0.7, eta_max=50.0, epochs=3, progress=False,
            run_dir=run)  # fmt: skip
    record = load_run(run)
    replayed = record.replay_etas()
    assert [d.eta for d in replayed] == [r["eta"] for r in h.rows]
    assert all(d.reason in ("target", "eta_max") for d in replayed)
    out = tmp_path / "report.html"
    build_report(run, out)
    assert (tmp_path / "figures").is_dir() or out.is_file()
    assert "eta_rule" in out.read_text()
    fig = eta_trajectory(load_study(run)[0])
    assert "DIFFERS" not in fig.axes[0].get_title()
    if optimizer == "adamw":  # the answers under P read each probe's own η (the eta column)
        import json

        found = json.loads((tmp_path / "findings.json").read_text())
        runs = next(iter(found["tasks"].values()))["preconditioned"]["runs"]
        (item,) = runs.values()
        want = min(r["rho_p"] for r in h.rows)  # the run's own rho_p at the η in force
        assert item["min_rho_p"]["value"] == pytest.approx(want, rel=1e-12)


def test_report_names_a_recorded_eta_that_the_profiles_do_not_give(tmp_path):
    """Tamper with one recorded η: the figure's title names the run (the check can fail)."""
    import csv

    from clipscope.report.plots import eta_trajectory
    from clipscope.run.study import load_study

    run = tmp_path / "run"
    fit(_model(), _loss, _problem(), "rr", lr=0.05, eta="descent-safe", epochs=2,
        progress=False, run_dir=run)  # fmt: skip
    path = run / "epochs.csv"
    rows = list(csv.DictReader(path.open()))
    rows[1]["eta"] = str(float(rows[1]["eta"]) * 1.001)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = eta_trajectory(load_study(run)[0])
    assert "DIFFERS" in fig.axes[0].get_title()


def test_report_of_an_autoclip_run(tmp_path):
    """AutoClip has no η at x_0 (NaN): the report still renders, ρ from the η column."""
    from clipscope.report.html import build_report

    run = tmp_path / "run"
    fit(_model(), _loss, _problem(), "sgd", lr=0.05, eta="autoclip", autoclip_percentile=50,
        epochs=2, progress=False, run_dir=run)  # fmt: skip
    record = load_run(run)
    assert record.eta_rule == "autoclip" and record.replay_etas() is None
    etas = record.column("eta")
    assert math.isnan(etas[0]) and np.isfinite(etas[1:]).all()
    assert "eta_rule" in build_report(run, tmp_path / "report.html").read_text()


@pytest.mark.parametrize(
    "line,key",
    [
        ('eta = "descent-safe"\nrho_target = 1.5', "rho_target"),
        ("eta = 1.0\nautoclip_percentile = 50", "autoclip_percentile"),
        ('eta = "autoclip"\nautoclip_percentile = 0', "autoclip_percentile"),
    ],
)
def test_cli_train_refuses_bad_rule_settings_with_exit_2(tmp_path, line, key):
    import subprocess
    import sys

    config = tmp_path / "run.toml"
    config.write_text(f"task = 'least_squares'\nlr = 0.1\nepochs = 1\n{line}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "clipscope", "train", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"'{key}'" in proc.stderr
    assert not out.exists()


# -- the Monitor's opt-in: it sets the threshold of the user's own loop -----------------


def _monitor_problem():
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(
        24, generator=gen, dtype=torch.float64
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return (
        model,
        (lambda out, y: 0.5 * ((out.squeeze(-1) - y) ** 2).mean()),
        Components.from_tensors(X, Y, batch_size=6, seed=0),
    )


def test_monitor_descent_safe_sets_the_loops_threshold_as_fit_does(tmp_path):
    """A loop that clips at monitor.eta is fit(eta="descent-safe") step for step."""
    import copy

    from clipscope import Monitor
    from clipscope.clipping import clip_grads_

    model, loss_fn, comps = _monitor_problem()
    reference = copy.deepcopy(model)
    h = fit(reference, loss_fn, comps, "igc", lr=0.1, eta="descent-safe", rho_target=0.8,
            epochs=3, progress=False)  # fmt: skip
    lines: list[str] = []
    m = comps.m
    monitor = Monitor(
        model, loss_fn, comps, eta="descent-safe", rho_target=0.8, every=m,
        smoothness_every=None, run_dir=tmp_path / "mon", log=lines.append,
    )  # fmt: skip
    assert monitor.eta == math.inf  # before the first probe
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    used = []
    for step in range(3 * m):
        monitor.step(step, lr=0.1)
        x, y = comps.batch(step % m)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        used.append(monitor.eta)
        norm = clip_grads_(list(model.parameters()), monitor.eta)
        monitor.gradient(norm, loss=loss)
        opt.step()
    monitor.step(3 * m, lr=0.1)
    monitor.close()
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want)
    assert [r["eta"] for r in monitor.rows] == [r["eta"] for r in h.rows]
    assert used == [h.rows[s // m]["eta"] for s in range(3 * m)]
    assert sum("descent-safe: η" in t for t in lines) == len({r["eta"] for r in h.rows})
    record = load_run(tmp_path / "mon")
    assert [d.eta for d in record.replay_etas()] == [r["eta"] for r in monitor.rows]


def test_monitor_descent_safe_resumes_with_its_eta(tmp_path):
    from clipscope import Monitor

    model, loss_fn, comps = _monitor_problem()
    first = Monitor(model, loss_fn, comps, eta="descent-safe", every=2, smoothness_every=None)
    first.step(0)
    state = first.state_dict()
    again = Monitor(model, loss_fn, comps, eta="descent-safe", every=2, smoothness_every=None)
    again.load_state_dict(state)
    assert again.eta == first.eta < math.inf
    other = Monitor(model, loss_fn, comps, eta="descent-safe", rho_target=0.5, every=2,
                    smoothness_every=None)  # fmt: skip
    with pytest.raises(ValueError, match="rho_target"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"eta": "autoclip"}, "eta"),
        ({"eta": 1.0, "rho_target": 0.5}, "rho_target"),
        ({"eta": "descent-safe", "rho_target": 2.0}, "rho_target"),
        ({"eta": "descent-safe", "eta_min": -1.0}, "eta_min"),
    ],
)
def test_monitor_refuses_bad_rule_settings(kwargs, key):
    from clipscope import Monitor

    model, loss_fn, comps = _monitor_problem()
    with pytest.raises(ValueError, match=f"'{key}'"):
        Monitor(model, loss_fn, comps, every=2, **kwargs)


def test_the_largest_descent_safe_eta_of_a_run_is_the_advice_over_it(tmp_path):
    """The advice's eta_max at τ over a run's probes is the largest descent-safe η at ρ* = τ."""
    from clipscope.commands.theory import check_run
    from clipscope.math.advice import advise

    run = tmp_path / "run"
    h = fit(_model(), _loss, _problem(), "igc", lr=0.1, eta="descent-safe", rho_target=0.85,
            epochs=3, progress=False, run_dir=run)  # fmt: skip
    record = load_run(run)
    points = [
        (a["norms"], a["dots"], float(a["grad_norm"]))
        for a in (record.components(k) for k in sorted(record.component_files))
    ]
    assert advise(points, 0.85).eta_max == max(r["eta"] for r in h.rows)
    # the theorems are about one fixed η: a rule's run is outside their scope
    assert "set while training" in check_run(run, measure=False)["not_applicable"]
