"""``fit(..., per_sample=True)``: every probe of the run measures per-sample components.

At every probe (the epoch starts at ``probe_every`` and the final point) the
recorded norms, dots, losses, ‖∇f‖, f, ρ at η and at ``etas``, c1 and the
clipped share equal each sample's own float64 gradient's at the same
parameters (a brute force: one autograd call per sample on a float64 copy),
1e-10 relative, with no parameter on the per-sample route's fallback (a small
MLP and a tiny random Hugging Face GPT-2 through
:class:`~clipscope.loop.integrations.hf.PerSampleLM`). The training itself is
the loop's: the same trajectory, bitwise, as the same fit without
``per_sample``. What the per-sample route cannot serve is refused before
anything is written; a resume with another ``per_sample`` is another setting;
the report labels the run and says its answers are about per-sample clipping.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from clipscope import Components, fit
from clipscope.components import SequentialComponents
from clipscope.config import FitConfig, parse_config
from clipscope.engine.verify import PerSampleFallbackWarning
from clipscope.errors import ConfigError
from clipscope.loop.units import Unit
from clipscope.run.directory import load_checkpoint, load_run
from test_monitor_per_sample import Centred, close
from test_monitor_per_sample import Check as MonitorCheck
from test_per_sample import SequenceFirstLM, next_token_loss

F64 = torch.float64
ETA = 0.5
ETAS = (0.2, 2.0)
RTOL = 1e-10


class Check(MonitorCheck):
    """The Monitor tests' float64 brute force at every probe, with ρ at ETAS and the arrays."""

    def __init__(self, loss_fn, components):
        super().__init__(loss_fn, components, ETA)
        self.arrays: list[dict] = []

    def at_point(self, point):
        super().at_point(point)
        if point.probe is None:
            return
        ref = self.seen[-1][2]
        gam = [np.minimum(1.0, e / ref["norms"]) for e in ETAS]
        ref["rho_etas"] = [float((g * ref["dots"]).sum() / ref["dots"].sum()) for g in gam]
        self.arrays.append(dict(point.arrays))


def assert_probes_match(check, n, epochs):
    assert len(check.seen) == epochs + 1  # x_0 ... x_E
    for (result, row, ref), arrays in zip(check.seen, check.arrays, strict=True):
        assert result.route in ("per-sample", "per-sample-kept"), result.route
        assert result.verification["fallback"] == {}  # every parameter by a layer rule
        assert result.m == n and result.batch_size == 1 and list(result.sizes) == [1] * n
        assert len(arrays["norms"]) == n and (arrays["sizes"] == 1).all()
        scale_d = ref["grad_norm"] * ref["norms"].max()  # |d_i| <= n_i‖∇f‖
        assert close(arrays["norms"], ref["norms"], RTOL)
        assert close(arrays["dots"], ref["dots"], RTOL, scale=scale_d)
        assert close(arrays["losses"], ref["losses"], RTOL)
        for key in ("grad_norm", "loss", "rho", "c1", "clipped_fraction"):
            assert close(row[key], ref[key], RTOL), (key, row[key], ref[key])
        for e, want in zip(ETAS, ref["rho_etas"], strict=True):
            assert close(row[f"rho@{e:g}"], want, RTOL), (e, row[f"rho@{e:g}"], want)


def mlp_problem(n=20, batch=6, seed=0, dropout=0.0):
    """Return a float64 regression MLP; ``n = 20`` in components of 6, 6, 6, 2 samples."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=F64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + torch.randn(n, generator=gen, dtype=F64)
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 8), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else [])
    model = nn.Sequential(*layers, nn.Linear(8, 1)).to(F64)

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, Components.from_tensors(X, Y, batch_size=batch, seed=seed)


def hf_gpt2_problem(n=8, batch=4, seed=0):
    """Return a tiny random float64 GPT-2 as ``PerSampleLM`` on ``(x, y)`` batches."""
    transformers = pytest.importorskip("transformers")
    from clipscope.loop.integrations import hf

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    lm = hf.PerSampleLM(transformers.GPT2LMHeadModel(config).to(F64))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, 6), generator=gen)
    x, y = lm.collate()([{"input_ids": row, "labels": row} for row in ids])
    return lm, lm.loss, Components.from_tensors(x, y, batch_size=batch, seed=seed)


PROBLEMS = {"mlp": mlp_problem, "hf-gpt2": hf_gpt2_problem}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_every_probe_records_each_samples_own_float64_gradient(tmp_path, name):
    model, loss_fn, comps = PROBLEMS[name]()
    n, epochs = int(sum(comps.sizes)), 2
    check = Check(loss_fn, comps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        history = fit(
            model, loss_fn, comps, "igc", lr=0.05, eta=ETA, etas=ETAS, epochs=epochs,
            per_sample=True, progress=False, units=[check], run_dir=tmp_path / "run",
        )  # fmt: skip
    assert history.status == "completed" and history.steps == epochs * len(comps)
    assert_probes_match(check, n, epochs)
    # (39) is about the loop's own components: not recorded for per-sample probes
    assert all(math.isnan(row["igc_drift"]) for row in history.rows)
    # what the run directory says: per_sample in its setting, N one-sample components a probe
    run = load_run(tmp_path / "run")
    assert run.setting("per_sample") is True and run.setting("kind") == "fit"
    for k in range(epochs + 1):
        arrays = np.load(tmp_path / "run" / "components" / f"epoch_{k:04d}.npz")
        assert len(arrays["norms"]) == n and (arrays["sizes"] == 1).all()
        assert close(arrays["norms"], check.seen[k][2]["norms"], RTOL)


def trajectory(per_sample, method, dropout):
    model, loss_fn, comps = mlp_problem(dropout=dropout)
    torch.manual_seed(7)  # the training's dropout masks
    history = fit(
        model, loss_fn, comps, method, lr=0.05, eta=ETA, epochs=3, per_sample=per_sample,
        progress=False,
    )  # fmt: skip
    params = [p.detach().clone() for p in model.parameters()]
    steps = [(r["train_loss"], r["train_norm"], r["train_clipped_share"]) for r in history.rows]
    return params, steps, history


@pytest.mark.parametrize("method", ["igc", "rr"])
def test_the_probes_leave_the_training_as_it_is(method):
    """The same steps, bitwise, as the same fit without ``per_sample`` (dropout active)."""
    params, steps, history = trajectory(True, method, dropout=0.2)
    base_params, base_steps, base = trajectory(False, method, dropout=0.2)
    assert history.steps == base.steps == 3 * 4 and history.counts == base.counts
    assert all(torch.equal(a, b) for a, b in zip(params, base_params, strict=True))
    assert steps[:-1] == base_steps[:-1]  # the last point has no interval: NaN in both
    # the rows differ: m = N one-sample components against m = 4 mini-batches
    assert history.rows[0]["c1"] != base.rows[0]["c1"]


def test_adam_probes_record_rho_p_of_the_samples():
    """With Adam every probe also reads P from its state: ρ_P over the samples (the Monitor's)."""
    from clipscope.engine import reference_probe

    model, loss_fn, comps = mlp_problem()
    singles = comps.with_batch_size(1)
    seen = []

    class Keep(Unit):
        name = "keep"

        def at_point(self, point):
            if point.probe is not None:
                ref = reference_probe(point.model, loss_fn, singles, etas=(),
                                      preconditioner=point.loop.preconditioner)  # fmt: skip
                seen.append((dict(point.row), ref))

    fit(model, loss_fn, comps, "igc", lr=0.01, eta=ETA, epochs=2, optimizer="adam",
        per_sample=True, progress=False, units=[Keep()])  # fmt: skip
    assert len(seen) == 3
    for row, ref in seen:
        assert close(row["rho_p"], ref.preconditioned.stats.ratio(ETA), RTOL)
        assert close(row["rho"], ref.stats.ratio(ETA), RTOL)
    assert seen[-1][0]["p_unset_share"] == 0.0  # P from Adam's state, not the identity


def _centred():
    return Centred()


def test_what_the_per_sample_route_cannot_serve_is_refused_before_anything_is_written(tmp_path):
    model, loss_fn, comps = mlp_problem()
    run = tmp_path / "run"
    kw = {"lr": 0.1, "eta": ETA, "epochs": 1, "progress": False, "run_dir": run}
    refused = [
        (ConfigError, "per_sample=True runs one of", {"route": "two-pass", "per_sample": True}),
        (ConfigError, "per_sample=True runs one of", {"route": "keep", "per_sample": True}),
        (ConfigError, "set per_sample=True", {"route": "per-sample-kept"}),
        (ConfigError, "expected true or false", {"per_sample": 1}),
        (ConfigError, "Hessian norm", {"per_sample": True, "smoothness_every": 1}),
        (ConfigError, "each sample's gradient", {"per_sample": True, "eta": "descent-safe"}),
    ]
    for kind, match, settings in refused:
        with pytest.raises(kind, match=match):
            fit(model, loss_fn, comps, "igc", **{**kw, **settings})
    X, Y = comps.batch(0)
    dict_comps = Components.from_dataset(
        [{"x": X[j], "y": Y[j]} for j in range(len(X))], batch_size=3
    )
    with pytest.raises(ValueError, match="PerSampleLM"):
        fit(model, lambda model, batch: loss_fn(model(batch["x"]), batch["y"]), dict_comps,
            "igc", per_sample=True, **kw)  # fmt: skip
    with pytest.raises(ValueError, match="do not interact"):
        fit(_centred(), loss_fn, comps, "igc", per_sample=True, **kw)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(ConfigError, match="BatchNorm"):
        fit(bn, loss_fn, comps, "igc", per_sample=True, **kw)
    stream = SequentialComponents.from_tokens(torch.arange(40) % 7, batch_size=2, bptt=4)
    lstm = nn.LSTM(3, 3)
    with pytest.raises(ConfigError, match="sequential"):
        fit(lstm, loss_fn, stream, "igc", per_sample=True, **kw)
    assert not run.exists()
    # the mini-batch fit of the same settings runs: the refusals are per_sample's
    fit(_centred(), loss_fn, comps, "igc", **{**kw, "run_dir": None})


def test_a_resume_with_another_per_sample_is_another_setting(tmp_path):
    run = tmp_path / "run"
    model, loss_fn, comps = mlp_problem()
    kw = {"lr": 0.05, "eta": ETA, "epochs": 1, "progress": False, "run_dir": run}
    fit(model, loss_fn, comps, "igc", per_sample=True, **kw)
    with pytest.raises(ConfigError, match=r"cannot change per_sample: True -> False"):
        fit(model, loss_fn, comps, "igc", resume=True, **kw)
    fit(model, loss_fn, comps, "igc", resume=True, per_sample=True, **kw)  # the same: accepted

    other = tmp_path / "other"
    fit(model, loss_fn, comps, "igc", **{**kw, "run_dir": other})
    # per_sample = False is left out of the setting, as in a run saved before the key existed
    assert "per_sample" not in FitConfig(lr=0.05).setting()
    newest = sorted((other / "checkpoints").glob("ckpt_*.pt"))[-1]
    assert "per_sample" not in load_checkpoint(newest)["setting"]
    with pytest.raises(ConfigError, match=r"cannot change per_sample: False -> True"):
        fit(model, loss_fn, comps, "igc", resume=True, per_sample=True, **{**kw, "run_dir": other})
    fit(model, loss_fn, comps, "igc", resume=True, **{**kw, "run_dir": other})
    # not even with force: the rows would mix per-sample and mini-batch probes (a new user's
    # trial found the report then labelled the run by its last setting)
    for per_sample, where in ((True, other), (False, run)):
        with pytest.raises(ConfigError, match=r"cannot change per_sample: .* even with --force"):
            fit(model, loss_fn, comps, "igc", resume=True, force=True, per_sample=per_sample,
                **{**kw, "run_dir": where})  # fmt: skip


def test_the_report_labels_a_per_sample_fit_run_and_says_what_its_answers_are_about(tmp_path):
    from clipscope.commands.advise import advice_of
    from clipscope.report.findings import PER_SAMPLE_NOTE, task_findings
    from clipscope.report.plots import run_title
    from clipscope.report.theorem import check_theorem
    from clipscope.run.study import load_study

    model, loss_fn, comps = mlp_problem()
    for name, per_sample in (("ps", True), ("mb", False)):
        fit(copy.deepcopy(model), loss_fn, comps, "igc", lr=0.05, eta=ETA, epochs=1,
            per_sample=per_sample, progress=False, run_dir=tmp_path / name)  # fmt: skip
    found = task_findings(load_study(tmp_path / "ps")[0])
    assert found["per_sample_components"] == {"runs": ["igc-B6"], "note": PER_SAMPLE_NOTE}
    assert "per_sample_components" not in task_findings(load_study(tmp_path / "mb")[0])
    run, base = load_run(tmp_path / "ps"), load_run(tmp_path / "mb")
    assert run_title({}, run) == "IGC B=6 per-sample" and run_title({}, base) == "IGC B=6"
    verdict = check_theorem(run)["verdict"]
    assert verdict.startswith("not applicable: the probes measured per-sample components")
    assert not check_theorem(base)["verdict"].startswith("not applicable")
    advice = advice_of(tmp_path / "ps")["tasks"]["ps"]["runs"]["igc-B6"]
    assert "no threshold" in advice["per_sample_components"]


def test_the_config_file_key_reaches_clipscope_train(tmp_path, capsys):
    """``per_sample = true`` in a TOML file: the probes of ``clipscope train`` are per-sample."""
    cfg = parse_config({"per_sample": True, "route": "per-sample", "lr": 0.05})
    assert cfg.fit_config().per_sample is True and cfg.setting()["per_sample"] is True
    with pytest.raises(ConfigError, match="per_sample=True runs one of"):
        parse_config({"per_sample": True, "route": "keep"})
    good = tmp_path / "good.toml"
    good.write_text(
        'task = "least_squares"\nn_samples = 20\nbatch_size = 6\nmethod = "igc"\nlr = 0.05\n'
        "eta = 0.5\nepochs = 1\nper_sample = true\nprogress = false\nthreads = 1\n"
    )
    bad = tmp_path / "bad.toml"
    keep = 'per_sample = true\nroute = "keep"'
    bad.write_text(good.read_text().replace("per_sample = true", keep))
    cli = [sys.executable, "-m", "clipscope", "train"]
    done = subprocess.run([*cli, str(good), "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    arrays = np.load(tmp_path / "run" / "components" / "epoch_0001.npz")
    assert len(arrays["norms"]) == 20 and (arrays["sizes"] == 1).all()
    assert load_run(tmp_path / "run").setting("per_sample") is True
    # the refusals in process (the same entry, cli.main): exit 2, nothing written
    from clipscope.cli import main

    assert main(["train", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "per_sample=True runs one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # a resume with another per_sample: exit 2, the run untouched
    before = (tmp_path / "run" / "epochs.csv").read_text()
    off = tmp_path / "off.toml"
    off.write_text(good.read_text().replace("per_sample = true", "per_sample = false"))
    assert main(["train", str(off), "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "cannot change per_sample: True -> False" in capsys.readouterr().err
    assert (tmp_path / "run" / "epochs.csv").read_text() == before


def test_probe_with_the_config_probes_per_sample_components(tmp_path, capsys):
    """``clipscope probe --config``: the config's ``per_sample`` is a default, as ``route`` is."""
    from clipscope.cli import main

    config = tmp_path / "ps.toml"
    config.write_text(
        'task = "least_squares"\nn_samples = 20\nbatch_size = 6\nlr = 0.05\neta = 0.5\n'
        "per_sample = true\nprogress = false\n"
    )
    out = tmp_path / "probe.csv"
    assert main(["probe", "--config", str(config), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]
    assert list(result) == ["1"] and result["1"]["m"] == 20
    other = tmp_path / "keep.csv"
    assert main(["probe", "--config", str(config), "--out", str(other), "--route", "keep"]) == 2
    assert "the config's per_sample = true needs --route" in capsys.readouterr().err
    assert not other.exists()


def test_the_run_directory_names_the_route_and_the_fallback_of_every_probe(tmp_path):
    """A new user's trial: a probe on the fallback left no trace in the run directory.

    ``nn.TransformerEncoder(batch_first=False)`` with T = the chunk size: the rules cannot
    tell the sample axis, the spot check moves the parameters to the exact fallback. Each
    component file now names the route and those parameters; findings.json and the report
    say which probes used the fallback. A run without fallback says nothing.
    """
    from clipscope.report import build_report

    torch.manual_seed(0)

    X = torch.randint(0, 16, (8, 4))
    comps = Components.from_tensors(X, X, batch_size=4)
    for per_sample in (True, False):
        run = tmp_path / f"run-{per_sample}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerSampleFallbackWarning)
            model = SequenceFirstLM().double().eval()
            fit(model, next_token_loss, comps, "igc", lr=0.01, eta=ETA, epochs=1,
                per_sample=per_sample, progress=False, run_dir=run)  # fmt: skip
        arrays = np.load(run / "components" / "epoch_0000.npz")
        build_report(run)
        (found,) = json.loads((run / "findings.json").read_text())["tasks"].values()
        text = (run / "report.html").read_text()
        if not per_sample:  # mini-batch components: no fallback to name
            assert str(arrays["route"]) in ("keep", "two-pass") and arrays["fallback"].size == 0
            assert "probe_fallbacks" not in found and "exact per-sample fallback" not in text
            continue
        assert str(arrays["route"]).endswith("+fallback")
        assert "enc.layers.0.linear1.weight" in arrays["fallback"].tolist()
        (label, used) = next(iter(found["probe_fallbacks"].items()))
        assert used["probes"] == ["epoch 0", "epoch 1"] and used["of"] == 2
        assert used["params"] == sorted(arrays["fallback"].tolist())
        assert f"{label}: the per-sample route took {len(used['params'])} parameter(s)" in text


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_run_stopped_by_an_error_says_so_in_its_directory(tmp_path, error):
    """A new user's trial: a fit stopped by an error left no summary.json.

    Its report then read like a normal short run. The run now ends with summary.json
    saying failed (interrupted for KeyboardInterrupt) and the error; the report names it.
    """
    from clipscope.report import build_report

    model, loss_fn, comps = mlp_problem()
    run = tmp_path / "run"

    def on_step(step, index, norm):
        if step == 6:
            raise error("stopped by the caller's callback")

    with pytest.raises(error):
        fit(model, loss_fn, comps, "igc", lr=0.05, eta=ETA, epochs=3, per_sample=True,
            progress=False, run_dir=run, on_step=on_step)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    status = "failed" if error is RuntimeError else "interrupted"
    assert summary["status"] == status and summary["step"] == 6
    build_report(run)
    text = (run / "report.html").read_text()
    assert f"stopped: {status}" in text and "the run did not complete" in text


def test_a_killed_run_without_summary_is_said_not_to_have_finished(tmp_path):
    """A run killed with -9 writes nothing at its end: the report says it did not finish."""
    from clipscope.report import build_report

    model, loss_fn, comps = mlp_problem()
    run = tmp_path / "run"
    fit(model, loss_fn, comps, "igc", lr=0.05, eta=ETA, epochs=1, progress=False, run_dir=run)
    build_report(run)
    assert "did not finish" not in (run / "report.html").read_text()
    (run / "summary.json").unlink()  # what kill -9 leaves: checkpoints, rows, no summary
    build_report(run)
    assert "no summary.json: the run did not finish" in (run / "report.html").read_text()
