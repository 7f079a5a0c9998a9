"""A Monitor's run in the report (issue 20, item 5): its steps, "step" not "epoch", a final probe.

The records come from a real Monitor over a float64 IGC loop (``test_monitor.problem``);
the report's numbers are checked against the stored per-step arrays and a float64
reference probe.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipscope import Monitor
from clipscope.engine import reference_probe
from clipscope.report import build_report, plots
from clipscope.run.directory import load_run
from clipscope.run.study import load_study
from test_monitor import problem, run_loop

ETA = 0.5


@pytest.mark.parametrize(
    "steps,every,extra_step,expected",
    [
        (13, 4, None, [0, 4, 8, 12, 13]),  # the update after x_12 gives x_13: probed at close
        (12, 4, None, [0, 4, 8, 12]),  # x_12 is due anyway: probed once
        (13, 4, 13, [0, 4, 8, 12, 13]),  # step(13) told the clock, not due: probed at close
        (12, 4, 12, [0, 4, 8, 12]),  # step(12) probed it already: no second probe
        (7, 5, None, [0, 5, 7]),
    ],
    ids=["after-update", "due", "told-not-due", "already-probed", "every-5"],
)
def test_close_probe_takes_the_final_parameters(steps, every, extra_step, expected):
    model, loss_fn, comps = problem()
    monitor = Monitor(model, loss_fn, comps, eta=ETA, every=every)
    run_loop(model, loss_fn, comps, steps, [monitor])
    if extra_step is not None:
        monitor.step(extra_step)
    monitor.close(probe=True)
    assert [r["step"] for r in monitor.rows] == expected
    assert all(type(r["step"]) is int for r in monitor.rows)
    ref = reference_probe(model, loss_fn, comps, etas=(ETA,))  # float64, one autograd call each
    last = monitor.rows[-1]
    assert last["grad_norm"] == pytest.approx(float(ref.grad_norm), rel=1e-9)
    assert last["c1"] == pytest.approx(float(ref.stats.c1), rel=1e-9)
    monitor.close(probe=True)  # idempotent: closed, nothing more
    assert len(monitor.rows) == len(expected)


def test_close_without_probe_keeps_the_old_behaviour():
    model, loss_fn, comps = problem()
    monitor = Monitor(model, loss_fn, comps, eta=ETA, every=4)
    run_loop(model, loss_fn, comps, 13, [monitor])
    monitor.close()
    assert [r["step"] for r in monitor.rows] == [0, 4, 8, 12]


LOOP_ETA = 1.5  # the report's run clips some steps, not all


@pytest.fixture(scope="module")
def monitor_run(tmp_path_factory):
    model, loss_fn, comps = problem()
    run = tmp_path_factory.mktemp("monitor") / "run"
    with Monitor(model, loss_fn, comps, eta=LOOP_ETA, every=4, run_dir=run) as monitor:
        run_loop(model, loss_fn, comps, 13, [monitor], eta=LOOP_ETA)
        monitor.close(probe=True)
    build_report(run)
    return run


def test_the_findings_of_a_monitor_run_are_about_its_steps(monitor_run):
    found = json.loads((monitor_run / "findings.json").read_text())["tasks"]["run"]
    assert found["kind"] == "run"
    assert "fig1_trend" not in found and "positive_cos_share_b1" not in found
    (label,) = found["steps"]
    steps = found["steps"][label]
    arrays = load_run(monitor_run).step_arrays()
    norms = arrays["step_grad_norm"]
    assert steps["steps"] == norms.size == 13  # every update between the probes
    assert (steps["first_step"], steps["last_step"]) == (1, 13)
    share = float(np.mean(norms > LOOP_ETA))
    assert 0 < share < 1 and steps["clipped_share"] == pytest.approx(share)
    assert steps["grad_norm_max"] == pytest.approx(float(norms.max()))
    assert steps["cos_mean"] == pytest.approx(float(np.nanmean(arrays["step_cos"])))
    assert steps["probes"]["step"] == [0, 4, 8, 12, 13]
    # probes are named by their step, never by an epoch
    assert found["min_rho"]["at"].startswith("step ")
    assert "epoch" not in found["eta_advice"]["decided_by"]
    assert found["theorems"][0]["verdict"] == "not applicable"
    assert "a training loop of your own" in found["theorems"][0]["reason"]


def test_the_report_of_a_monitor_run_shows_its_steps(monitor_run):
    text = (monitor_run / "report.html").read_text()
    assert "steps of monitor-B6" in text and "13 steps (1 … 13)" in text
    assert "Figure 1" not in text and "batch size 1" not in text
    assert (monitor_run / "figures" / "run-steps.png").is_file()
    assert "Monitor B=6" in text and "EXTERNAL" not in text


def test_the_step_figure_and_the_probe_axes(monitor_run):
    task = load_study(monitor_run)[0]
    fig = plots.monitor_steps(task)
    top, bottom = fig.axes
    lines = {line.get_label(): line for line in top.get_lines() + bottom.get_lines()}
    arrays = load_run(monitor_run).step_arrays()
    norm_line = next(v for k, v in lines.items() if k.endswith("‖g‖ of each loop step"))
    np.testing.assert_array_equal(norm_line.get_xdata(), arrays["step"])
    np.testing.assert_array_equal(norm_line.get_ydata(), arrays["step_grad_norm"])
    probe_line = lines["mean cos θ_ki at each probe"]
    np.testing.assert_array_equal(probe_line.get_xdata(), [0, 4, 8, 12, 13])
    # the last interval's clipped share is drawn up to the last step, not cut at its probe
    share_line = lines["share of the interval's steps clipped"]
    assert share_line.get_xdata()[-1] == arrays["step"].max()
    assert bottom.get_xlabel() == "step (optimizer updates)"
    plots.figure_png(fig)
    fig = plots.per_epoch(task, "c1", "c1", "t")
    assert fig.axes[0].get_xlabel().startswith("step")
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), [0, 4, 8, 12, 13])
    plots.figure_png(fig)


def test_a_per_sample_monitor_run_is_titled_by_its_components():
    """``Monitor per-sample``, not ``Monitor B=1``: the loop's steps are its mini-batches."""
    from clipscope.report.plots import run_title

    class Run:
        kind, method, batch_size = "monitor", "monitor", 1

        def __init__(self, config):
            self.config = config

        def setting(self, key, default=None):
            return self.config.get(key, default)

    assert run_title({}, Run({"per_sample": True})) == "Monitor per-sample"
    assert run_title({}, Run({"per_sample": True, "optimizer": "adamw"})) == (
        "Monitor-AdamW per-sample"
    )
    assert run_title({}, Run({})) == "Monitor B=1"


def test_per_sample_answers_say_what_they_are_about():
    """findings.json's per_sample_components note reaches the report's headline."""
    from clipscope.report.findings import PER_SAMPLE_NOTE
    from clipscope.report.html import findings_section

    task = {
        "kind": "run",
        "runs": ["monitor-B1"],
        "per_sample_components": {"runs": ["monitor-B1"], "note": PER_SAMPLE_NOTE},
        "min_rho": {"value": None},
        "eta_advice": {"target": 0.9, "eta_max": None},
        "theorems": [],
        "threads": {},
    }
    text = findings_section({"tasks": {"run": task}})
    assert "monitor-B1: per-sample components" in text and "no threshold" in text
    del task["per_sample_components"]
    assert "per-sample" not in findings_section({"tasks": {"run": task}})


def test_steps_without_a_recorded_norm_are_counted_not_hidden(monitor_run, tmp_path):
    """A new user's trial: a step the Trainer clipped without a logged norm (NaN) was dropped.

    The report then gave a max ‖g‖ below η while saying that a step was clipped at η. Now
    the unknown norms are counted, and a clipped one is said to lie above η.
    """
    import shutil

    run = tmp_path / "run"
    shutil.copytree(monitor_run, run)
    paths = sorted((run / "components").glob("epoch_*_steps.npz"))
    every = np.concatenate([np.load(p)["step_grad_norm"] for p in paths])
    for path in paths:  # the largest norm of the run: clipped (it is above η)
        arrays = dict(np.load(path))
        norms, clipped = arrays["step_grad_norm"], arrays["step_clipped"]
        if norms.size and float(np.max(norms)) == float(every.max()):
            top = int(np.argmax(norms))
            assert clipped[top] == 1
            norms[top] = np.nan
            np.savez(path, **arrays)
    every[int(np.argmax(every))] = np.nan
    build_report(run)
    found = json.loads((run / "findings.json").read_text())["tasks"]["run"]
    (steps,) = found["steps"].values()
    assert steps["grad_norm_unknown"] == 1 and steps["grad_norm_unknown_clipped"] == 1
    assert steps["grad_norm_max"] == pytest.approx(float(np.nanmax(every)))
    text = (run / "report.html").read_text()
    assert "over the 12 steps with a recorded ‖g‖ (1 unknown" in text
    assert f"1 of them clipped, so their ‖g‖ was above η = {LOOP_ETA:g}" in text
