import csv
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from cases import CASE_IDS, CASES, TinyLM, by_id, lm_loss, mlp
from clipscope.cli import main as cli_main
from clipscope.components import Components
from clipscope.engine import (
    MultiProbeResult,
    batch_coupled_modules,
    component_losses,
    dropout_modules,
    model_guard,
    probe,
    reference_probe,
    trainable_params,
)
from clipscope.math.stats import noise_scale


def snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.random.get_rng_state(),
    }


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["grad_ids"] == b["grad_ids"]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


def brute_force_grads(model, loss_fn, comps, params, dropout="off", seed=0):
    """Each g_i by its own autograd call, flattened, float64."""
    out = []
    with model_guard(model):
        for _, loss in component_losses(model, loss_fn, comps, dropout=dropout, seed=seed):
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [
                torch.zeros(p.numel(), dtype=torch.float64)
                if g is None
                else g.detach().reshape(-1).double()
                for g, p in zip(grads, params, strict=True)
            ]
            out.append(torch.cat(flat))
    return torch.stack(out)


# -- guard and utilities -------------------------------------------------------
def test_model_guard_restores_everything_even_on_error():
    case = by_id("cnn-bn-train")
    model, comps = case.build()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[1].eval()  # a mixed-mode model
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), model_guard(model):
        model.train()
        model(comps.batch(0)[0]).sum().backward()
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[0].weight.grad = None
        torch.rand(3)
        raise RuntimeError("boom")
    assert_same(before, snapshot(model))


def test_component_losses_sequential_state_chain():
    case = by_id("lstm-lm-tied")
    model, comps = case.build()
    # reference: run the windows by hand, carrying the detached state
    state, expected = None, []
    with torch.no_grad():
        for i in range(comps.m):
            inp, tgt = comps.batch(i)
            out, state = model(inp, state)
            expected.append(lm_loss(out, tgt))
    got = [loss.detach() for _, loss in component_losses(model, lm_loss, comps)]
    assert torch.equal(torch.stack(got), torch.stack(expected))
    # only= still carries the state through the skipped windows
    sub = dict(component_losses(model, lm_loss, comps, only=[3, 7]))
    assert sorted(sub) == [3, 7] and torch.equal(sub[7].detach(), expected[7])
    assert sub[7].requires_grad


def test_dropout_modules_contract():
    class Custom(nn.Module):
        clipscope_dropout = True

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Dropout2d(0.1), Custom())
    assert len(dropout_modules(model)) == 3
    assert batch_coupled_modules(model) == []
    bn = nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)).eval()
    assert batch_coupled_modules(bn) == ["0"]


@pytest.mark.parametrize("dropout", ["off", "fixed"])
def test_dropout_policies_repeatable(dropout):
    torch.manual_seed(0)
    model = mlp(torch.float64, dropout=0.5)
    X, Y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    comps = Components.from_tensors(X, Y, batch_size=3)
    params = trainable_params(model)
    loss_fn = nn.functional.cross_entropy
    a = brute_force_grads(model, loss_fn, comps, params, dropout=dropout, seed=1)
    b = brute_force_grads(model, loss_fn, comps, params, dropout=dropout, seed=1)
    assert torch.equal(a, b)
    c = brute_force_grads(model, loss_fn, comps, params, dropout=dropout, seed=2)
    eval_grads = brute_force_grads(model.eval(), loss_fn, comps, params)
    model.train()
    if dropout == "off":
        assert torch.equal(a, c) and torch.equal(a, eval_grads)
    else:
        assert not torch.equal(a, c) and not torch.equal(a, eval_grads)


def test_trainable_params_errors():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        trainable_params(model)
    lm = TinyLM()
    assert len(trainable_params(lm)) == len(list(lm.parameters()))  # tied weight once


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cases_build(case):
    model, comps = case.build()
    assert 5 <= comps.m <= 30
    assert bool(batch_coupled_modules(model)) == case.batch_coupled


# -- probe routes vs the brute force ---------------------------------------------
ETAS = (0.05, 0.3, 2.0, math.inf)


def brute_force_stats(model, loss_fn, comps, etas=ETAS):
    """Independent float64 reference: explicit g_i, sums, dots, clipped sums."""
    params = trainable_params(model)
    G = brute_force_grads(model, loss_fn, comps, params)
    full = G.mean(0)
    norms = G.norm(dim=1)
    clipped = {}
    for eta in etas:
        total = sum(min(1.0, eta / float(n)) * g for g, n in zip(G, norms, strict=True))
        clipped[eta] = (float(total.norm()), float(total @ full / (total.norm() * full.norm())))
    return {
        "G": G,
        "full": full,
        "norms": norms.numpy(),
        "dots": (G @ full).numpy(),
        "grad_norm": float(full.norm()),
        "clipped": clipped,
    }


def assert_matches(result, ref, rtol):
    atol = rtol * float(np.max(ref["norms"])) * ref["grad_norm"]
    np.testing.assert_allclose(result.norms, ref["norms"], rtol=rtol)
    np.testing.assert_allclose(result.dots, ref["dots"], rtol=rtol, atol=atol)
    assert result.grad_norm == pytest.approx(ref["grad_norm"], rel=rtol)
    assert set(result.clipped) == set(ref["clipped"])
    for eta, (norm, cos) in ref["clipped"].items():
        assert result.clipped[eta][0] == pytest.approx(norm, rel=rtol)
        assert result.clipped[eta][1] == pytest.approx(cos, rel=rtol, abs=rtol)


def routes_for(case):
    routes = ["two-pass", "keep", "auto"]
    if not case.batch_coupled and case.per_sample_ok:
        routes.append("dyadic")
    return routes


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_routes_match_brute_force(case):
    model, comps = case.build()
    if not comps.sequential:
        with torch.no_grad():
            model(comps.batch(0)[0])  # moves BatchNorm running stats off their init
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)  # a stale .grad the probe must not touch
    before = snapshot(model)
    ref = brute_force_stats(model, case.loss_fn, comps)
    for route in [*routes_for(case), "reference"]:
        if route == "reference":
            result = reference_probe(model, case.loss_fn, comps, ETAS)
        else:
            result = probe(model, case.loss_fn, comps, ETAS, route=route, keep_full_grad=True)
        if route == "dyadic":
            assert isinstance(result, MultiProbeResult) and result.batch_sizes == [comps.batch_size]
            result = result[comps.batch_size]
        assert result.route == ("keep" if route == "auto" else route)
        assert_matches(result, ref, case.rtol)
        # invariants: Σβ = m, (1/m)Σ g_i = ∇f, D(∞) = m‖∇f‖²
        assert result.beta.sum() == pytest.approx(comps.m, rel=case.rtol)
        full = torch.cat([t.reshape(-1) for t in result.full_grad])
        torch.testing.assert_close(full, ref["G"].mean(0), rtol=case.rtol, atol=0)
        assert result.stats.descent(math.inf) == pytest.approx(
            comps.m * result.grad_norm**2, rel=case.rtol
        )
        assert result.clipped[math.inf][0] == pytest.approx(comps.m * result.grad_norm, rel=1e-9)
        assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.batch_coupled and c.per_sample_ok], ids=lambda c: c.id
)
def test_dyadic_levels_match_partitions(case):
    model, comps = case.build()
    result = probe(model, case.loss_fn, comps, ETAS, levels=3)
    assert result.route == "dyadic" and len(result) == 3
    X, Y = comps._source
    for b, level in result.items():
        coarse = Components.from_tensors(X, Y, batch_size=b, seed=comps.seed)
        assert level.m == coarse.m and list(level.sizes) == coarse.sizes
        assert_matches(level, brute_force_stats(model, case.loss_fn, coarse), case.rtol)
        np.testing.assert_allclose(
            level.losses, reference_probe(model, case.loss_fn, coarse).losses, rtol=case.rtol
        )


def test_dyadic_drop_last_matches_partitions():
    case = by_id("mlp-unequal-last")
    model, comps0 = case.build()
    X, Y = comps0._source
    comps = Components.from_tensors(X, Y, batch_size=2, seed=5, drop_last=True)  # 23 -> 11 x 2
    result = probe(model, case.loss_fn, comps, ETAS, batch_sizes=[2, 4, 8])
    for b, level in result.items():
        coarse = Components.from_tensors(X, Y, batch_size=b, seed=5, drop_last=True)
        assert level.m == coarse.m
        assert_matches(level, brute_force_stats(model, case.loss_fn, coarse), case.rtol)


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.batch_coupled and c.per_sample_ok], ids=lambda c: c.id
)
@pytest.mark.parametrize("route", ["auto", "per-sample", "per-sample-kept"])
def test_per_sample_route(case, route):
    model, comps = case.build()
    X, Y = comps._source
    singles = Components.from_tensors(X, Y, batch_size=1, seed=comps.seed)
    before = snapshot(model)
    result = probe(
        model, case.loss_fn, comps, ETAS, route=route, batch_sizes=[1], keep_full_grad=True
    )
    # auto keeps the factors when they fit the memory budget (they do here)
    assert result.route == ("per-sample-kept" if route == "auto" else route)
    assert result.batch_size == 1
    assert result.m == len(X)
    ref = brute_force_stats(model, case.loss_fn, singles)
    assert_matches(result, ref, case.rtol)
    np.testing.assert_allclose(
        result.losses, reference_probe(model, case.loss_fn, singles).losses, rtol=case.rtol
    )
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("route", ["dyadic", "per-sample"])
def test_refusals_with_train_mode_batchnorm(route):
    case = by_id("cnn-bn-train")
    model, comps = case.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="BatchNorm"):
        probe(model, case.loss_fn, comps, route=route, levels=2 if route == "dyadic" else None)
    assert_same(before, snapshot(model))
    model.eval()  # eval-mode BatchNorm is per-sample: allowed
    probe(model, case.loss_fn, comps, route=route, levels=2 if route == "dyadic" else None)


def test_refusals_bad_arguments():
    case = by_id("mlp")
    model, comps = case.build()
    with pytest.raises(ValueError, match="route"):
        probe(model, case.loss_fn, comps, route="fast")
    with pytest.raises(ValueError, match="eta"):
        probe(model, case.loss_fn, comps, etas=[0.0])
    with pytest.raises(ValueError, match="dropout"):
        probe(model, case.loss_fn, comps, dropout="on")
    with pytest.raises(ValueError, match="batch_sizes"):
        probe(model, case.loss_fn, comps, batch_sizes=[4, 12])
    with pytest.raises(ValueError, match="per-sample"):
        probe(model, case.loss_fn, comps, batch_sizes=[1], route="keep")
    with pytest.raises(ValueError, match="memory_budget"):
        probe(model, case.loss_fn, comps, route="keep", memory_budget=10)
    lm = by_id("lstm-lm-tied")
    lm_model, lm_comps = lm.build()
    with pytest.raises(ValueError, match="sequential"):
        probe(lm_model, lm.loss_fn, lm_comps, levels=2)


def test_nonfinite_gradient_names_component_and_parameter():
    case = by_id("mlp")
    model, comps = case.build()

    def loss_fn(out, y):
        loss = nn.functional.cross_entropy(out, y)
        return loss * torch.inf if torch.equal(y, comps.batch(2)[1]) else loss

    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"component 2: non-finite gradient in parameter\(s\) 0.weight"
    ):
        probe(model, loss_fn, comps, route="two-pass")
    assert_same(before, snapshot(model))


def test_m_equals_one():
    case = by_id("mlp")
    model, _ = case.build()
    X, Y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    comps = Components.from_tensors(X, Y, batch_size=8)
    for route in ("two-pass", "keep"):
        result = probe(model, case.loss_fn, comps, ETAS, route=route)
        assert result.m == 1
        assert result.cos[0] == pytest.approx(1.0, rel=1e-12)
        assert result.beta.sum() == pytest.approx(1.0, rel=1e-12)
        assert math.isnan(result.noise["trace_sigma"])


@pytest.mark.parametrize("route", ["two-pass", "keep", "per-sample"])
def test_probe_dropout_fixed_is_repeatable(route):
    torch.manual_seed(0)
    model = mlp(torch.float64, dropout=0.5)
    X, Y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    comps = Components.from_tensors(X, Y, batch_size=3)
    kwargs = {"batch_sizes": [1]} if route == "per-sample" else {}
    a = probe(
        model,
        nn.functional.cross_entropy,
        comps,
        ETAS,
        route=route,
        dropout="fixed",
        seed=3,
        **kwargs,
    )
    b = probe(
        model,
        nn.functional.cross_entropy,
        comps,
        ETAS,
        route=route,
        dropout="fixed",
        seed=3,
        **kwargs,
    )
    np.testing.assert_array_equal(a.norms, b.norms)
    assert a.info["max_pass_mismatch"] == 0.0
    if route != "per-sample":
        ref = reference_probe(
            model, nn.functional.cross_entropy, comps, ETAS, dropout="fixed", seed=3
        )
        np.testing.assert_allclose(a.norms, ref.norms, rtol=1e-12)
        np.testing.assert_allclose(a.dots, ref.dots, rtol=1e-10)


def test_result_records_are_json_safe():
    case = by_id("mlp-unequal-last")
    model, comps = case.build()
    result = probe(model, case.loss_fn, comps, ETAS)
    text = json.dumps(result.to_dict())
    assert "noise" in text and result.summary()["m"] == comps.m
    rows = result.table()
    assert [r["size"] for r in rows] == comps.sizes
    assert result.noise["heuristic"] is True
    multi = probe(model, case.loss_fn, comps, ETAS, levels=2)
    json.dumps(multi.to_dict())


# -- the CLI, as a real subprocess ---------------------------------------------------
def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "clipscope", "probe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_table(summary, path):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(res["m"] for res in summary["results"].values())
    for b, res in summary["results"].items():
        mine = [r for r in rows if r["batch_size"] == b]
        assert len(mine) == res["m"]
        assert sum(float(r["beta"]) for r in mine) == pytest.approx(res["m"], rel=1e-6)  # float32
        assert "0.5" in res["clipped"]


def test_cli_probe_subprocess(tmp_path):
    args = ("--samples", "96", "--eta", "0.5", "--levels", "2", "--json", "--out", "t.csv")
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert sorted(summary["results"]) == ["16", "32"]
    _check_table(summary, tmp_path / "t.csv")


@pytest.mark.parametrize(
    "extra",
    [[], ["--task", "lstm", "--samples", "400"], ["--per-sample", "--samples", "32"]],
    ids=["mlp", "lstm", "per-sample"],
)
def test_cli_probe_in_process(tmp_path, capsys, extra):
    out = tmp_path / "t.csv"
    code = cli_main(
        ["probe", "--samples", "96", "--eta", "0.5", "--json", "--out", str(out), *extra]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    _check_table(summary, out)
    assert cli_main(["probe", "--out", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    code = cli_main(["probe", "--out", str(out), "--force"])
    assert code == 0 and "table:" in capsys.readouterr().out


# -- properties ---------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 20),
    b=st.integers(1, 4),
    levels=st.integers(1, 4),
    drop=st.booleans(),
    seed=st.one_of(st.none(), st.integers(0, 3)),
)
def test_dyadic_property_every_level_is_its_partition(n, b, levels, drop, seed):
    assume(n >= b or not drop)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(n)
    X, Y = torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,))
    comps = Components.from_tensors(X, Y, batch_size=b, seed=seed, drop_last=drop)
    sizes = [b << k for k in range(levels)]
    if drop and n < sizes[-1]:
        with pytest.raises(ValueError, match="no full batch"):
            probe(model, nn.functional.cross_entropy, comps, levels=levels, route="dyadic")
        return
    result = probe(
        model, nn.functional.cross_entropy, comps, (0.1, 1.0), levels=levels, route="dyadic"
    )
    assert result.batch_sizes == sizes
    for size, level in result.items():
        coarse = Components.from_tensors(X, Y, batch_size=size, seed=seed, drop_last=drop)
        assert level.m == coarse.m and list(level.sizes) == coarse.sizes
        ref = brute_force_stats(model, nn.functional.cross_entropy, coarse, (0.1, 1.0))
        assert_matches(level, ref, 1e-10)


@settings(max_examples=30, deadline=None)
@given(
    data=arrays(
        np.float64, st.tuples(st.integers(2, 7), st.integers(1, 3)), elements=st.floats(-5, 5)
    ),
    b=st.integers(1, 6),
)
def test_noise_scale_trace_is_per_sample_variance(data, b):
    """Over all B-subsets (each a sample without replacement), the estimate is exact."""
    n_samples = len(data)
    assume(b < n_samples)
    subsets = np.array([data[list(s)].mean(0) for s in itertools.combinations(range(n_samples), b)])
    full = subsets.mean(0)
    np.testing.assert_allclose(full, data.mean(0), atol=1e-12)
    out = noise_scale(np.linalg.norm(subsets, axis=1), np.linalg.norm(full), b, n_samples)
    sigma2 = np.mean(np.sum((data - full) ** 2, axis=1))
    assert out["trace_sigma"] == pytest.approx(sigma2, rel=1e-9, abs=1e-9)


# -- more edge cases ------------------------------------------------------------------
def test_auto_falls_back_to_two_pass_when_keep_does_not_fit():
    case = by_id("mlp")
    model, comps = case.build()
    result = probe(model, case.loss_fn, comps, ETAS, memory_budget=1000)
    assert result.route == "two-pass"
    assert_matches(result, brute_force_stats(model, case.loss_fn, comps), case.rtol)
    with pytest.raises(TypeError, match="components"):
        probe(model, case.loss_fn, [comps.batch(0)])


def test_sequential_with_fixed_dropout():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.3).double()
    _, comps = by_id("lstm-lm-tied").build()
    a = probe(model, lm_loss, comps, ETAS, route="two-pass", dropout="fixed", seed=5)
    b = probe(model, lm_loss, comps, ETAS, route="keep", dropout="fixed", seed=5)
    ref = reference_probe(model, lm_loss, comps, ETAS, dropout="fixed", seed=5)
    for res in (a, b):
        np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
        np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10)
        assert res.beta.sum() == pytest.approx(comps.m, rel=1e-10)
    assert a.info["max_pass_mismatch"] == 0.0
    off = probe(model, lm_loss, comps, route="keep", dropout="off")
    assert not np.array_equal(off.norms, a.norms)


def test_zero_gradients_give_nan_cosines_not_errors():
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    Y = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)
    comps = Components.from_tensors(X, Y, batch_size=1)
    # g_1 = -g_2, g_3 = 0: ∇f = 0
    result = probe(model, nn.functional.mse_loss, comps, (0.5,), route="two-pass")
    assert result.grad_norm == 0.0 and result.norms[2] == 0.0
    assert np.isnan(result.cos).all() and np.isnan(result.beta).all()
    assert result.clipped[0.5][0] == pytest.approx(0.0, abs=1e-15)
    json.dumps(result.to_dict())


def test_multi_result_noise_table():
    case = by_id("mlp")
    model, comps = case.build()
    multi = probe(model, case.loss_fn, comps, levels=3)
    rows = multi.noise_table()
    assert [r["batch_size"] for r in rows] == multi.batch_sizes
    base = multi[multi.batch_sizes[0]]
    assert rows[0]["predicted_cos"] == base.noise["predicted_cos"]
    # the prediction rises with the batch size
    assert rows[0]["predicted_cos"] < rows[1]["predicted_cos"] < rows[2]["predicted_cos"]
