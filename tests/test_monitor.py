"""The Monitor: fit's units driven from a loop of your own.

Its rows are fit's rows on the same trajectory; training is bitwise unchanged; the
per-step statistics match a float64 brute force; the run directory is what the report
and the theorem check read; a resumed Monitor ends with the same records as an
uninterrupted one; bad input is refused before anything is written.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clipscope import Components, Monitor, fit
from clipscope.clipping import clip_grads_
from clipscope.engine import reference_probe
from clipscope.errors import ConfigError
from clipscope.run.directory import TIMING_COLUMNS, load_run, read_rows

F64 = torch.float64


def problem(seed=0, n=24, dtype=F64, dropout=0.0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=dtype)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + 0.5 * torch.randn(
        n, generator=gen, dtype=dtype
    )
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 8), nn.Tanh()]
    layers += [nn.Dropout(dropout)] if dropout else []
    model = nn.Sequential(*layers, nn.Linear(8, 1)).to(dtype)

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, Components.from_tensors(X, Y, batch_size=6, seed=seed)


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def run_loop(model, loss_fn, comps, steps, monitors=(), *, eta=0.5, lr=0.1, start=0, opt=None):
    """Run a cyclic (IGC) loop with the paper's clip; return the optimizer."""
    params = list(model.parameters())
    opt = opt or torch.optim.SGD(params, lr=lr)
    for step in range(start, steps):
        for monitor in monitors:
            monitor.step(step, lr=lr)
        x, y = comps.batch(step % comps.m)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        norm = clip_grads_(params, eta)
        for monitor in monitors:
            monitor.gradient(norm, loss=loss)
        opt.step()
    return opt


def test_the_monitor_over_an_igc_loop_gives_fits_rows():
    """Same units, same trajectory: every column fit writes (but the drift) is equal."""
    model, loss_fn, comps = problem()
    reference = copy.deepcopy(model)
    history = fit(reference, loss_fn, comps, "igc", lr=0.1, eta=0.5, epochs=3, progress=False)
    m = comps.m
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=m, smoothness_every=None)
    run_loop(model, loss_fn, comps, 3 * m, [monitor])
    monitor.step(3 * m, lr=0.1)  # the last point, which fit probes too
    monitor.close()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert len(monitor.rows) == len(history.rows) == 4
    for mine, theirs in zip(monitor.rows, history.rows, strict=True):
        for key, value in theirs.items():
            if key not in (*TIMING_COLUMNS, "igc_drift"):
                assert same(mine[key], value), key
    assert all(np.isfinite(r["train_cos"]) for r in monitor.rows[:-1])
    assert math.isnan(monitor.rows[-1]["train_norm"])  # no interval after the last point


def test_training_is_bitwise_the_same_with_or_without_the_monitor(tmp_path):
    plain, loss_fn, comps = problem(dtype=torch.float32, dropout=0.3)
    watched = copy.deepcopy(plain)
    torch.manual_seed(5)
    run_loop(plain, loss_fn, comps, 9)
    monitor = Monitor(watched, loss_fn, comps, eta=0.5, every=2, smoothness_every=1,
                      etas=(0.1,), run_dir=tmp_path / "run")  # fmt: skip
    torch.manual_seed(5)
    run_loop(watched, loss_fn, comps, 9, [monitor])
    monitor.close()
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [int(r["step"]) for r in monitor.rows] == [0, 2, 4, 6, 8]
    assert np.isfinite([r["hess_norm"] for r in monitor.rows]).all()


def test_step_statistics_match_a_float64_brute_force(tmp_path):
    """Norm before clipping, clipped at η, cos with the last probe's ∇f (float32 model)."""
    model, loss_fn, comps = problem(dtype=torch.float32)
    params = list(model.parameters())
    eta, every = 1.6, 3
    before = Monitor(model, loss_fn, comps, eta=eta, every=every, run_dir=tmp_path / "a")
    after = Monitor(model, loss_fn, comps, eta=eta, every=every, run_dir=tmp_path / "b")
    opt = torch.optim.SGD(params, lr=0.2)
    grads, full, expected = [], None, []
    for step in range(9):
        for monitor in (before, after):
            monitor.step(step)
        if step % every == 0:  # ∇f_k by the brute force, at the same point
            full = torch.cat([g.reshape(-1) for g in reference_probe(
                copy.deepcopy(model).double(), loss_fn, _double(comps)).full_grad])  # fmt: skip
        x, y = comps.batch(step % comps.m)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()
        before.gradient()  # before clipping: the norm is read from .grad
        norm = torch.nn.utils.clip_grad_norm_(params, eta)  # torch's operator
        after.gradient(norm)  # after clipping: the norm before it, as torch returns it
        expected.append((float(g.norm()), float(g @ full / (g.norm() * full.norm()))))
        grads.append(g)
        opt.step()
    for monitor in (before, after):
        monitor.close()
        path = monitor.run_dir / "components"
        arrays = [np.load(path / f"epoch_{k:04d}_steps.npz") for k in range(3)]
        norms = np.concatenate([a["step_grad_norm"] for a in arrays])
        cos = np.concatenate([a["step_cos"] for a in arrays])
        clipped = np.concatenate([a["step_clipped"] for a in arrays])
        numbers = np.concatenate([a["step"] for a in arrays])
        np.testing.assert_array_equal(numbers, np.arange(1, 10))
        np.testing.assert_allclose(norms, [n for n, _ in expected], rtol=2e-6)
        np.testing.assert_allclose(cos, [c for _, c in expected], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(clipped, [float(n > eta) for n, _ in expected])
        assert 0 < clipped.sum() < 9  # both cases occur
        rows = read_rows(monitor.run_dir / "epochs.csv")
        np.testing.assert_allclose(rows["train_cos"], [c.mean() for c in np.split(cos, 3)])
        shares = [c.mean() for c in np.split(clipped, 3)]
        np.testing.assert_allclose(rows["train_clipped_share"], shares)


def _double(comps):
    X, Y = comps._source
    return Components.from_tensors(X.double(), Y.double(), comps.batch_size, seed=comps.seed)


def test_the_run_directory_is_read_by_report_and_theory(tmp_path):
    model, loss_fn, comps = problem()
    run = tmp_path / "run"
    with Monitor(model, loss_fn, comps, eta=0.5, every=4, etas=(0.2,), run_dir=run) as monitor:
        run_loop(model, loss_fn, comps, 13, [monitor])
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert files == [
        "components/epoch_0000.npz", "components/epoch_0000_steps.npz",
        "components/epoch_0001.npz", "components/epoch_0001_steps.npz",
        "components/epoch_0002.npz", "components/epoch_0002_steps.npz",
        "components/epoch_0003.npz", "components/epoch_0003_steps.npz",
        "config.toml", "env.json", "epochs.csv", "summary.json",
    ]  # fmt: skip
    record = load_run(run)
    assert record.eta == 0.5 and record.n_rows == 4 and record.method == "external"
    np.testing.assert_array_equal(record.column("step"), [0, 4, 8, 12])
    assert np.isfinite(record.column("traj_smoothness")[:-1]).all()
    assert "rho@0.2" in record.rows
    env = json.loads((run / "env.json").read_text())
    assert env["components"]["m"] == comps.m and "conventions" in env
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rows"] == 4 and summary["step"] == 12
    cli = [sys.executable, "-m", "clipscope"]
    out = subprocess.run([*cli, "theory", str(run)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "recorded_trajectory" in out.stdout and "no theorem" in out.stdout
    out = subprocess.run([*cli, "report", str(run)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (run / "report.html").is_file()
    # one probe: no secant recorded, and nothing to measure from (the model is the user's)
    one = tmp_path / "one"
    with Monitor(model, loss_fn, comps, eta=0.5, every=4, run_dir=one) as monitor:
        monitor.step(0)
    out = subprocess.run([*cli, "theory", str(one)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "estimate used: none" in out.stdout


def _states_equal(run_a: Path, run_b: Path):
    rows_a, rows_b = read_rows(run_a / "epochs.csv"), read_rows(run_b / "epochs.csv")
    assert set(rows_a) == set(rows_b)
    for key in rows_a:
        if key not in TIMING_COLUMNS:
            np.testing.assert_array_equal(rows_a[key], rows_b[key], err_msg=key)
    names = sorted(p.name for p in (run_a / "components").iterdir())
    assert names == sorted(p.name for p in (run_b / "components").iterdir())
    for name in names:
        with np.load(run_a / "components" / name) as a, np.load(run_b / "components" / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")


@pytest.mark.parametrize("stop", [5, 8], ids=["mid-interval", "at-a-point"])
def test_a_resumed_monitor_ends_with_the_records_of_an_uninterrupted_one(tmp_path, stop):
    """Checkpoint at ``stop``, run on (files written after it), crash, resume from it."""
    kw = {"eta": 0.5, "every": 4, "etas": (0.2,)}
    model, loss_fn, comps = problem()
    start_state = copy.deepcopy(model.state_dict())
    with Monitor(model, loss_fn, comps, run_dir=tmp_path / "whole", **kw) as whole:
        run_loop(model, loss_fn, comps, 14, [whole])

    model.load_state_dict(start_state)
    first = Monitor(model, loss_fn, comps, run_dir=tmp_path / "resumed", **kw)
    opt = run_loop(model, loss_fn, comps, stop, [first])
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "monitor": first.state_dict()}, ckpt)  # fmt: skip
    run_loop(model, loss_fn, comps, 13, [first], start=stop, opt=opt)  # then a crash: no close()
    assert len(read_rows(tmp_path / "resumed" / "epochs.csv")["step"]) == 4

    state = torch.load(ckpt, weights_only=True)
    model.load_state_dict(state["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(state["opt"])
    second = Monitor(model, loss_fn, comps, run_dir=tmp_path / "resumed", **kw)
    second.load_state_dict(state["monitor"])
    with second:
        run_loop(model, loss_fn, comps, 14, [second], start=stop, opt=opt)
    _states_equal(tmp_path / "whole", tmp_path / "resumed")
    for mine, theirs in zip(second.rows, whole.rows, strict=True):
        assert all(same(mine[k], v) for k, v in theirs.items() if k not in TIMING_COLUMNS)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    model, loss_fn, comps = problem()
    run = tmp_path / "run"
    kw = {"eta": 0.5, "every": 2, "run_dir": run}
    with pytest.raises(ValueError, match="scalar tensor"):
        Monitor(model, lambda out, y: (out.squeeze(-1) - y) ** 2, comps, **kw)
    with pytest.raises(RuntimeError) as info:  # a batch the model rejects
        Monitor(nn.Linear(5, 1).double(), loss_fn, comps, **kw)
    assert "component 0" in "".join(getattr(info.value, "__notes__", []))
    for every in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="every"):
            Monitor(model, loss_fn, comps, eta=0.5, every=every, run_dir=run)
    with pytest.raises(ConfigError, match="eta"):
        Monitor(model, loss_fn, comps, eta=-1.0, every=2, run_dir=run)
    with pytest.raises(ConfigError, match="route"):
        Monitor(model, loss_fn, comps, eta=0.5, every=2, route="per-sample", run_dir=run)
    with pytest.raises(TypeError, match="Unit"):
        Monitor(model, loss_fn, comps, eta=0.5, every=2, units=[object()], run_dir=run)
    assert not run.exists()

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=tmp_path / "file")

    other = tmp_path / "other"  # a run_dir that holds another run
    other.mkdir()
    (other / "epochs.csv").write_text("epoch\n0\n")
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=other)
    with pytest.raises(FileExistsError, match="another run"):
        monitor.step(0)
    assert sorted(p.name for p in other.iterdir()) == ["epochs.csv"]


def test_a_refused_monitor_leaves_the_run_it_found_untouched(tmp_path):
    """Running one's script twice: the second Monitor is refused and writes nothing on exit."""
    run = tmp_path / "run"

    def train() -> None:
        model, loss_fn, comps = problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=run) as monitor:
            for s in range(4):
                monitor.step(s)
                opt.zero_grad()
                loss_fn(
                    model(comps.batch(s % len(comps))[0]), comps.batch(s % len(comps))[1]
                ).backward()
                monitor.gradient()
                opt.step()

    train()
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert len(read_rows(run / "epochs.csv")["epoch"]) >= 2
    with pytest.raises(FileExistsError, match="another run"):
        train()
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


class Items(torch.utils.data.Dataset):
    def __init__(self, X, Y):
        self.X, self.Y, self.n = X, Y, len(X)

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return {"x": self.X[j], "y": self.Y[j]}


def test_a_dataset_that_changes_length_between_probes_is_refused(tmp_path):
    model, _, comps = problem()
    data = Items(*comps._source)
    dicts = Components.from_dataset(data, batch_size=6)

    def loss(model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

    monitor = Monitor(model, loss, dicts, eta=0.5, every=2, run_dir=tmp_path / "run")
    monitor.step(0)
    monitor.step(1)
    written = (tmp_path / "run" / "epochs.csv").read_text()
    data.n -= 1
    with pytest.raises(ValueError, match="23 items now"):
        monitor.step(2)
    assert len(monitor.rows) == 1
    assert (tmp_path / "run" / "epochs.csv").read_text() == written


def test_the_clock_refuses_going_back_and_repeats_do_nothing():
    model, loss_fn, comps = problem()
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=2)
    monitor.gradient()  # before the first probe: nothing to relate the step to
    assert monitor.step(0) is not None
    assert monitor.step(0) is None and len(monitor.rows) == 1  # accumulation: same step
    with pytest.raises(ValueError, match=r"no trainable parameter has a .grad"):
        monitor.gradient()
    monitor.step(3)
    with pytest.raises(ValueError, match="comes after step 3"):
        monitor.step(2)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="int >= 0"):
            monitor.step(bad)
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step(4)


def test_state_loads_only_with_the_same_settings_and_before_starting(tmp_path):
    model, loss_fn, comps = problem()
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=tmp_path / "a")
    monitor.step(0)
    state = monitor.state_dict()
    with pytest.raises(RuntimeError, match="before the first step"):
        monitor.load_state_dict(state)
    other = Monitor(model, loss_fn, comps, eta=0.25, every=2)
    with pytest.raises(ConfigError, match=r"eta: 0.5 -> 0.25"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="not a clipscope Monitor state"):
        other.load_state_dict({"rows": []})
    # the state belongs to run a; run_dir b holds another run
    b = Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=tmp_path / "b")
    b.step(0)
    moved = Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=tmp_path / "b")
    moved.load_state_dict(state)
    with pytest.raises(FileExistsError, match="holds another run"):
        moved.step(1)


def test_an_exception_in_the_loop_is_recorded_as_failed(tmp_path):
    model, loss_fn, comps = problem()
    with pytest.raises(RuntimeError, match="boom"):
        with Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=tmp_path / "r") as monitor:
            monitor.step(0)
            raise RuntimeError("boom")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["message"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_a_second_gradient_call_before_the_parameters_change_warns(optimizer):
    """Gradient accumulation calling gradient() per micro-batch would record extra updates."""
    import warnings

    from clipscope.loop.monitor import RepeatedGradientWarning

    model, loss_fn, comps = problem()
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.05)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=0.01, fused=True)
    )
    x, y = comps.batch(0)
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain loop (fused optimizers included) never warns
        for s in range(3):
            monitor.step(s)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            monitor.gradient()
            opt.step()
    monitor.step(3)
    opt.zero_grad()
    loss_fn(model(x), y).backward()  # two micro-batches, a gradient() call after each
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.gradient()  # the first call after an optimizer step: fine
    loss_fn(model(x), y).backward()
    with pytest.warns(RepeatedGradientWarning, match="once, after the last micro-batch"):
        monitor.gradient()
    monitor.close()


# -- a model whose trainable parameters change mid-run (issue 24, item 5) ---------------


def _change(case, model):
    """Change the parameter set the way a user would."""
    torch.manual_seed(11)
    if case == "new-head":
        model[2] = nn.Linear(8, 1).double()
    elif case == "freeze":
        model[0].weight.requires_grad_(False)
    elif case == "unfreeze":
        model[0].weight.requires_grad_(True)
    elif case == "append":
        model.append(nn.Linear(1, 1).double())


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _flat64(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


@pytest.mark.parametrize("at", [4, 6], ids=["mid-interval", "at-a-probe"])
@pytest.mark.parametrize("case", ["new-head", "freeze", "unfreeze", "append"])
def test_a_changed_parameter_set_restarts_what_depends_on_it(tmp_path, case, at):
    """Step norms, cosines and secants against a float64 brute force over the current set.

    The user's optimizer covers the trainable parameters only, so a frozen one keeps
    its last (stale) ``.grad``: the Monitor must not read it.
    """
    model, loss_fn, comps = problem()
    if case == "unfreeze":
        model[0].weight.requires_grad_(False)
    every, steps = 3, 12
    messages = []
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=every, run_dir=tmp_path / "run",
                      log=messages.append)  # fmt: skip
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    probes, expected = {}, []  # step -> (ids, x, ∇f); one (norm, cos) per update
    for step in range(steps + 1):
        if step == at:
            _change(case, model)
            opt = torch.optim.SGD(_trainable(model), lr=0.1)
        monitor.step(step)
        ids = [id(p) for p in _trainable(model)]
        if step % every == 0:
            ref = reference_probe(model, loss_fn, comps, params=_trainable(model))
            probes[step] = (ids, _flat64(_trainable(model)), _flat64(ref.full_grad))
        if step == steps:
            break
        x, y = comps.batch(step % comps.m)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        g = _flat64(p.grad for p in _trainable(model))
        last_ids, _, full = probes[step - step % every]
        cos = float(g @ full / (g.norm() * full.norm())) if last_ids == ids else math.nan
        expected.append((float(g.norm()), cos))
        monitor.gradient()
        opt.step()
    monitor.close()
    run = tmp_path / "run"
    arrays = [np.load(run / "components" / f"epoch_{k:04d}_steps.npz") for k in range(4)]
    norms = np.concatenate([a["step_grad_norm"] for a in arrays])
    cos = np.concatenate([a["step_cos"] for a in arrays])
    np.testing.assert_allclose(norms, [n for n, _ in expected], rtol=1e-12)
    np.testing.assert_allclose(cos, [c for _, c in expected], rtol=1e-10, atol=1e-12)
    assert np.isnan(cos).sum() == (2 if at == 4 else 0)  # the rest of the changed interval
    traj = read_rows(run / "epochs.csv")["traj_smoothness"]
    points = sorted(probes)
    for k, (a, b) in enumerate(itertools.pairwise(points)):
        ids_a, x_a, g_a = probes[a]
        ids_b, x_b, g_b = probes[b]
        want = float((g_b - g_a).norm() / (x_b - x_a).norm()) if ids_a == ids_b else math.nan
        np.testing.assert_allclose(traj[k], want, rtol=1e-10, err_msg=f"row {k}")
    assert np.isnan(traj).sum() == 2  # the secant across the change, and the last row
    notes = [m for m in messages if "trainable parameters changed" in m]
    assert len(notes) == 1 and ("update 5" in notes[0] if at == 4 else "step 6" in notes[0])


def test_a_state_loaded_into_a_model_with_other_parameters_restarts_them(tmp_path):
    """Resume a Monitor after appending a module: no length error, no secant across it."""
    model, loss_fn, comps = problem()
    first = Monitor(model, loss_fn, comps, eta=0.5, every=3)
    opt = run_loop(model, loss_fn, comps, 5, [first])
    state = first.state_dict()
    model.append(nn.Linear(1, 1).double())
    messages = []
    second = Monitor(model, loss_fn, comps, eta=0.5, every=3, log=messages.append)
    second.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_loop(model, loss_fn, comps, 10, [second], start=5, opt=opt)
    second.close()
    traj = [r["traj_smoothness"] for r in second.rows]
    assert math.isfinite(traj[0]) and math.isnan(traj[1]) and math.isfinite(traj[2])
    assert math.isfinite(second.rows[2]["train_cos"])
    assert any("other trainable parameters" in m for m in messages)


# -- an Adam/AdamW loop: the preconditioned statistics (issue 22) ---------------------------
def _p_of(opt, params):
    """P from the optimizer's state by Adam's formula, float64 (1 where there is no state)."""
    out = []
    for p in params:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state = opt.state.get(p)
        if not state:
            out.append(torch.ones_like(p, dtype=F64))
            continue
        bias = 1 - group["betas"][1] ** float(state["step"])
        out.append(torch.sqrt(state["exp_avg_sq"].double() / bias) + group["eps"])
    return out


def test_an_adamw_loop_records_rho_p_and_each_steps_cosine_with_u(tmp_path):
    """ρ_P, the cosines to u and cos(g, u_k) against a float64 brute force (float32 model)."""
    model, loss_fn, comps = problem(dtype=torch.float32)
    params = list(model.parameters())
    eta, every = 0.8, 3
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    monitor = Monitor(model, loss_fn, comps, eta=eta, every=every, etas=(0.3,), optimizer=opt,
                      run_dir=tmp_path / "run")  # fmt: skip
    want_rows, want_cos = [], []
    u = None
    for step in range(9):
        monitor.step(step)
        if step % every == 0:  # the brute force at the same point, P from the same state
            twin = copy.deepcopy(model).double()
            ref = reference_probe(twin, loss_fn, _double(comps), preconditioner=_p_of(opt, params))
            u = torch.cat([t.reshape(-1) for t in ref.preconditioned.direction])
            pre = ref.preconditioned
            want_rows.append((pre.ratio(eta), pre.ratio(0.3), pre.c1, pre.stats.min_cos))
        x, y = comps.batch(step % comps.m)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()
        monitor.gradient()
        want_cos.append(float(g @ u / (g.norm() * u.norm())))
        clip_grads_(params, eta)
        opt.step()
    monitor.close()
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    for k, (rho_p, rho_p3, c1_p, min_cos_p) in enumerate(want_rows):
        assert rows["rho_p"][k] == pytest.approx(rho_p, rel=1e-5)
        assert rows["rho_p@0.3"][k] == pytest.approx(rho_p3, rel=1e-5)
        assert rows["c1_p"][k] == pytest.approx(c1_p, rel=1e-5, abs=1e-6)
        assert rows["min_cos_p"][k] == pytest.approx(min_cos_p, rel=1e-5, abs=1e-6)
    np.testing.assert_array_equal(rows["p_unset_share"], [1.0, 0.0, 0.0])
    assert rows["rho_p"][0] == pytest.approx(rows["rho"][0], rel=1e-12)  # P = 1 at x_0
    assert not np.allclose(rows["rho_p"][1:], rows["rho"][1:])  # P is not 1 afterwards
    arrays = [
        np.load(tmp_path / "run" / "components" / f"epoch_{k:04d}_steps.npz") for k in range(3)
    ]
    cos_p = np.concatenate([a["step_cos_p"] for a in arrays])
    np.testing.assert_allclose(cos_p, want_cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["train_cos_p"], [c.mean() for c in np.split(cos_p, 3)])
    np.testing.assert_allclose(rows["train_min_cos_p"], [c.min() for c in np.split(cos_p, 3)])
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["optimizer"]["optimizer"] == "adamw"


def test_fit_and_the_monitor_agree_on_rho_p_with_adamw():
    model, loss_fn, comps = problem()
    reference = copy.deepcopy(model)
    m = comps.m
    history = fit(reference, loss_fn, comps, "igc", lr=0.05, eta=0.5, epochs=2, progress=False,
                  optimizer=torch.optim.AdamW(reference.parameters(), lr=0.05))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    monitor = Monitor(model, loss_fn, comps, eta=0.5, every=m, smoothness_every=None,
                      optimizer=opt)  # fmt: skip
    run_loop(model, loss_fn, comps, 2 * m, [monitor], lr=0.05, opt=opt)
    monitor.step(2 * m, lr=0.05)
    monitor.close()
    assert len(monitor.rows) == len(history.rows) == 3
    for mine, theirs in zip(monitor.rows, history.rows, strict=True):
        for key in ("rho", "rho_p", "c1_p", "min_cos_p", "a3_p_holds", "p_unset_share"):
            assert same(mine[key], theirs[key]), key


def test_an_sgd_monitor_writes_no_preconditioned_column(tmp_path):
    model, loss_fn, comps = problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, loss_fn, comps, eta=0.5, every=2, optimizer=opt,
                 run_dir=tmp_path / "run") as monitor:  # fmt: skip
        run_loop(model, loss_fn, comps, 4, [monitor], opt=opt)
    assert monitor.preconditioner is None and monitor.setting["optimizer"] == "SGD"
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    assert not any(k.endswith("_p") or "_p@" in k or k.startswith("train_cos_p") for k in rows)
    with np.load(tmp_path / "run" / "components" / "epoch_0000_steps.npz") as steps:
        assert "step_cos_p" not in steps.files


def test_a_resumed_adamw_monitor_ends_with_the_records_of_an_uninterrupted_one(tmp_path):
    kw = {"eta": 0.5, "every": 4}
    model, loss_fn, comps = problem()
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with Monitor(model, loss_fn, comps, run_dir=tmp_path / "whole", optimizer=opt, **kw) as whole:
        run_loop(model, loss_fn, comps, 12, [whole], opt=opt)
    model.load_state_dict(start)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    first = Monitor(model, loss_fn, comps, run_dir=tmp_path / "resumed", optimizer=opt, **kw)
    run_loop(model, loss_fn, comps, 6, [first], opt=opt)  # stop mid-interval
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "monitor": first.state_dict()})  # fmt: skip
    model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt.load_state_dict(state["opt"])
    second = Monitor(model, loss_fn, comps, run_dir=tmp_path / "resumed", **kw)
    second.load_state_dict(state["monitor"])  # the optimizer comes after (as the callbacks do)
    second.use_optimizer(opt)
    with second:
        run_loop(model, loss_fn, comps, 12, [second], start=6, opt=opt)
    _states_equal(tmp_path / "whole", tmp_path / "resumed")
    for mine, theirs in zip(second.rows, whole.rows, strict=True):
        assert all(same(mine[k], v) for k, v in theirs.items() if k not in TIMING_COLUMNS)
    assert "train_cos_p" in whole.rows[0]
    third = Monitor(model, loss_fn, comps, **kw)
    third.load_state_dict(state["monitor"])
    with pytest.raises(ConfigError, match="made with optimizer AdamW, this loop's is Adam"):
        third.use_optimizer(torch.optim.Adam(model.parameters()))
    third.use_optimizer(torch.optim.AdamW(model.parameters()))  # the same kind: accepted
    plain = Monitor(model, loss_fn, comps, **kw)
    plain.step(0)  # started without an optimizer: an AdamW would add columns mid-run
    with pytest.raises(ConfigError, match="made with optimizer None"):
        plain.use_optimizer(opt)
