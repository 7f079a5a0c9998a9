"""The probe's preconditioned dots (issue 22): every route against a float64 brute force.

With an Adam/AdamW optimizer's P = √(v/(1 − β₂^t)) + ε frozen at the probe, ``u = P⁻¹∇f``
and ``d^P_i = ⟨g_i, u⟩``. The brute force here reads the optimizer's state by that
formula itself (not through :mod:`clipscope.engine.preconditioner`), forms every g_i
by its own autograd call and sums in float64.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cases import CASE_IDS, CASES, by_id
from clipscope.components import Components
from clipscope.engine import probe, reference_probe, trainable_params
from clipscope.engine.common import check_direction_consistency
from clipscope.engine.preconditioner import Preconditioner
from test_engine import assert_same, brute_force_grads, routes_for, snapshot

ETAS = (0.05, 0.3, 2.0, math.inf)


def step_optimizer(model, loss_fn, comps, opt, steps=3, only=None):
    """Take a few steps on the first components: an optimizer state that is not trivial."""
    with torch.random.fork_rng():
        for i in range(steps):
            opt.zero_grad()
            x, y = comps.batch(i % comps.m)
            out = model(x)
            loss_fn(out[0] if isinstance(out, tuple) else out, y).backward()
            if only is not None:  # the others get no gradient: no state for them
                for p in model.parameters():
                    if all(p is not q for q in only):
                        p.grad = None
            opt.step()
    opt.zero_grad(set_to_none=True)


def brute_p(opt, params):
    """P per parameter from the optimizer's state by Adam's formula (None: no state yet)."""
    out = []
    for p in params:
        group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)
        state = opt.state.get(p)
        if group is None or not state:
            out.append(None)
            continue
        t = float(state["step"])
        v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].double()
        out.append(torch.sqrt(v / (1 - group["betas"][1] ** t)) + group["eps"])
    return out


def brute_preconditioned(model, loss_fn, comps, opt, etas=ETAS):
    """Compute u = ∇f/P (P = 1 without state), d^P = G u, the clipped sums' cosines."""
    params = trainable_params(model)
    G = brute_force_grads(model, loss_fn, comps, params)
    full = G.mean(0)
    P = torch.cat(
        [
            (torch.ones(p.numel(), dtype=torch.float64) if d is None else d.reshape(-1))
            for d, p in zip(brute_p(opt, params), params, strict=True)
        ]
    )
    u = full / P
    norms = G.norm(dim=1)
    clipped = {}
    for eta in etas:
        total = sum(min(1.0, eta / float(n)) * g for g, n in zip(G, norms, strict=True))
        step = total / P
        clipped[eta] = (
            float(total @ u / (total.norm() * u.norm())),
            float(step @ full / (step.norm() * full.norm())),
        )
    return {
        "G": G,
        "u": u,
        "norms": norms.numpy(),
        "pdots": (G @ u).numpy(),
        "inner": float(full @ u),
        "unorm": float(u.norm()),
        "clipped": clipped,
    }


def assert_preconditioned(result, ref, rtol):
    p = result.preconditioned
    assert p is not None
    scale = rtol * float(np.max(ref["norms"])) * ref["unorm"]
    np.testing.assert_allclose(p.dots, ref["pdots"], rtol=rtol, atol=scale)
    assert p.inner == pytest.approx(ref["inner"], rel=rtol)
    assert p.direction_norm == pytest.approx(ref["unorm"], rel=rtol)
    assert set(p.clipped) == set(ref["clipped"])
    for eta, (cos_u, update_cos) in ref["clipped"].items():
        assert p.clipped[eta][0] == pytest.approx(cos_u, rel=rtol, abs=rtol)
        assert p.clipped[eta][1] == pytest.approx(update_cos, rel=rtol, abs=rtol)
    # the identity the engine checks: Σ d^P_i = m⟨∇f, u⟩
    assert float(np.sum(p.dots)) == pytest.approx(p.m * p.inner, rel=10 * rtol)
    if result.route != "reference":  # the engine's own check of the dots with u
        assert p.info["consistency"]["flags"] == []
    # ρ_P from the result against its definition on the brute-force vectors
    G, u = ref["G"], ref["u"]
    for eta in ETAS[:-1]:
        gam = torch.clamp(eta / torch.from_numpy(ref["norms"]), max=1.0)
        want = float((gam[:, None] * G).sum(0) @ u) / (G.shape[0] * ref["inner"])
        assert p.ratio(eta) == pytest.approx(want, rel=10 * rtol, abs=10 * rtol)
    assert p.ratio(math.inf) == pytest.approx(1.0, rel=10 * rtol)


def rtol_of(case):
    return 1e-10 if case.dtype == torch.float64 else 1e-6


def adam_for(case, model, comps, kind):
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    elif kind == "adam-amsgrad":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    step_optimizer(model, case.loss_fn, comps, opt)
    return opt


# -- every route against the brute force ---------------------------------------------------
@pytest.mark.parametrize("kind", ["adamw", "adam-amsgrad"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_routes_match_brute_force(case, kind):
    model, comps = case.build()
    opt = adam_for(case, model, comps, kind)
    state_before = copy.deepcopy(opt.state_dict())
    before = snapshot(model)
    ref = brute_preconditioned(model, case.loss_fn, comps, opt)
    for route in [*routes_for(case), "reference"]:
        if route == "reference":
            result = reference_probe(model, case.loss_fn, comps, ETAS, preconditioner=opt)
        else:
            result = probe(model, case.loss_fn, comps, ETAS, route=route, preconditioner=opt)
        if route == "dyadic":
            result = result[comps.batch_size]
        assert_preconditioned(result, ref, rtol_of(case))
        assert result.preconditioned.info["without_state"] == []
        assert_same(before, snapshot(model))
    assert_same_state(state_before, opt.state_dict())


def assert_same_state(a, b):
    """Two optimizer state dicts hold the same entries, bitwise."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][name]), name


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.batch_coupled and c.per_sample_ok], ids=lambda c: c.id
)
@pytest.mark.parametrize("route", ["per-sample", "per-sample-kept"])
def test_per_sample_routes_match_brute_force(case, route):
    model, comps = case.build()
    opt = adam_for(case, model, comps, "adamw")
    X, Y = comps._source
    singles = Components.from_tensors(X, Y, batch_size=1, seed=comps.seed)
    ref = brute_preconditioned(model, case.loss_fn, singles, opt)
    result = probe(
        model, case.loss_fn, comps, ETAS, route=route, batch_sizes=[1], preconditioner=opt
    )
    assert result.route == route
    assert_preconditioned(result, ref, rtol_of(case))
    assert result.verification["spot_max_pdot_error"] <= result.verification["tolerance"]


def test_dyadic_levels_each_with_their_own_u():
    case = by_id("mlp")
    model, comps = case.build()
    opt = adam_for(case, model, comps, "adamw")
    result = probe(model, case.loss_fn, comps, ETAS, levels=3, preconditioner=opt)
    X, Y = comps._source
    for b, level in result.items():
        coarse = Components.from_tensors(X, Y, batch_size=b, seed=comps.seed)
        assert_preconditioned(level, brute_preconditioned(model, case.loss_fn, coarse, opt), 1e-10)


@pytest.mark.parametrize("route", ["per-sample", "per-sample-kept"])
def test_classic_order_after_a_dot_fallback(route, monkeypatch):
    """Dots from the factors that fail the spot check: the classic order's dot pass, with u too."""
    from clipscope.engine.per_sample.kept import KeptChunk

    wrong = KeptChunk.dots
    monkeypatch.setattr(KeptChunk, "dots", lambda self, vector: wrong(self, vector) + 1.0)
    case = by_id("mlp")
    model, comps = case.build()
    opt = adam_for(case, model, comps, "adamw")
    X, Y = comps._source
    singles = Components.from_tensors(X, Y, batch_size=1, seed=comps.seed)
    ref = brute_preconditioned(model, case.loss_fn, singles, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = probe(
            model, case.loss_fn, comps, ETAS, route=route, batch_sizes=[1], preconditioner=opt
        )
    assert result.verification["dots_fallback"] is not None and result.route.endswith("+fallback")
    assert_preconditioned(result, ref, 1e-10)


def test_parameters_on_the_fallback():
    """A spot check fails on a model whose samples leave dim 0: its parameters' fallback."""
    from zoo import SampleAxisInside

    torch.manual_seed(0)
    model = SampleAxisInside().double()
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(9, 3, 3, dtype=torch.float64, generator=gen)
    Y = torch.randint(0, 2, (9,), generator=gen)
    comps = Components.from_tensors(X, Y, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step_optimizer(model, F.cross_entropy, comps, opt)
    singles = Components.from_tensors(X, Y, batch_size=1, seed=comps.seed)
    ref = brute_preconditioned(model, F.cross_entropy, singles, opt)
    for route in ("per-sample", "per-sample-kept"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = probe(
                model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1],
                preconditioner=opt,
            )  # fmt: skip
        assert result.route.endswith("+fallback")
        assert_preconditioned(result, ref, 1e-10)


# -- how P is read from the optimizer ---------------------------------------------------------
def test_p_is_adams_denominator_and_the_state_is_only_read():
    """u·lr reproduces torch's own step for a fresh gradient with β1 = 0 and β2's change undone."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    comps = Components.from_tensors(
        torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,)), batch_size=4
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    step_optimizer(model, F.cross_entropy, comps, opt)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    pre = Preconditioner.from_optimizer(opt, params, names)
    want = torch.cat([d.reshape(-1) for d in brute_p(opt, params)])
    torch.testing.assert_close(1.0 / pre.inverse, want, rtol=1e-12, atol=0)
    assert pre.info["steps"] == [3.0, 3.0] and pre.info["source"] == "Adam"
    assert pre.info["p_min"] == pytest.approx(float(want.min()), rel=1e-12)
    assert len(opt.state) == 2  # read with .get: no entry created


def test_parameters_without_state_get_p_1_and_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    comps = by_id("mlp").build()[1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_optimizer(model, F.cross_entropy, comps, opt, only=[model[0].weight, model[0].bias])
    keys = set(opt.state.keys())
    result = probe(model, F.cross_entropy, comps, ETAS, preconditioner=opt, keep_full_grad=True)
    info = result.preconditioned.info
    assert info["without_state"] == ["2.weight", "2.bias"]
    assert info["unset_share"] == pytest.approx(27 / (48 + 27))
    assert set(opt.state.keys()) == keys  # nothing created for the parameters without state
    for k in (2, 3):  # P = 1: u is ∇f there
        torch.testing.assert_close(result.preconditioned.direction[k], result.full_grad[k])
    assert_preconditioned(result, brute_preconditioned(model, F.cross_entropy, comps, opt), 1e-10)


def test_a_fresh_optimizer_gives_back_rho():
    case = by_id("mlp")
    model, comps = case.build()
    opt = torch.optim.Adam(model.parameters())
    result = probe(model, case.loss_fn, comps, ETAS, preconditioner=opt)
    p = result.preconditioned
    assert p.info["unset_share"] == 1.0 and len(p.info["without_state"]) == 4
    np.testing.assert_allclose(p.dots, result.dots, rtol=1e-14)
    for eta in ETAS:
        assert p.ratio(eta) == pytest.approx(result.stats.ratio(eta), rel=1e-12)


def test_a_scalar_p_gives_back_rho_and_its_dots_scale():
    case = by_id("cnn")
    model, comps = case.build()
    given = [torch.full_like(p, 4.0) for p in model.parameters()]
    result = probe(model, case.loss_fn, comps, ETAS, route="two-pass", preconditioner=given)
    p = result.preconditioned
    np.testing.assert_allclose(p.dots, result.dots / 4.0, rtol=1e-12, atol=1e-16)
    for eta in ETAS:
        assert p.ratio(eta) == pytest.approx(result.stats.ratio(eta), rel=1e-10)
    assert p.negative_intervals() == pytest.approx(result.stats.profile().negative_intervals())


def test_groups_learning_rates_and_parameters_the_step_does_not_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    comps = by_id("mlp").build()[1]
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 0.02}, {"params": [model[2].weight], "lr": 0.01}]
    )
    step_optimizer(model, F.cross_entropy, comps, opt)
    result = probe(model, F.cross_entropy, comps, preconditioner=opt, keep_full_grad=True)
    p = result.preconditioned
    assert p.info["not_moved"] == ["2.bias"] and p.info["lr_relative"]
    P = brute_p(opt, list(model.parameters()))
    full = result.full_grad
    torch.testing.assert_close(p.direction[0], full[0] / P[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(p.direction[2], 0.5 * full[2] / P[2], rtol=1e-12, atol=0)
    assert torch.count_nonzero(p.direction[3]) == 0
    assert float(np.sum(p.dots)) == pytest.approx(result.m * p.inner, rel=1e-10)


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_is_reported_apart_and_never_enters_u(decoupled):
    case = by_id("mlp")
    model, comps = case.build()
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = kind(model.parameters(), lr=1e-2, weight_decay=0.1)
    step_optimizer(model, case.loss_fn, comps, opt)
    plain = kind(model.parameters(), lr=1e-2, weight_decay=0.0)
    plain.load_state_dict({**opt.state_dict(), "param_groups": [
        {**opt.state_dict()["param_groups"][0], "weight_decay": 0.0}
    ]})  # fmt: skip
    with_decay = probe(model, case.loss_fn, comps, preconditioner=opt, keep_full_grad=True)
    without = probe(model, case.loss_fn, comps, preconditioner=plain)
    np.testing.assert_array_equal(with_decay.preconditioned.dots, without.preconditioned.dots)
    decay = with_decay.preconditioned.info["decay"]
    assert decay["form"] == ("decoupled" if decoupled else "L2")
    assert without.preconditioned.info["decay"]["form"] == "none"
    x = torch.cat([q.detach().reshape(-1).double() for q in model.parameters()])
    full = torch.cat([g.reshape(-1) for g in with_decay.full_grad])
    P = torch.cat([d.reshape(-1) for d in brute_p(opt, list(model.parameters()))])
    delta = 0.1 * x / P if not decoupled else 0.1 * x
    assert decay["norm"] == pytest.approx(float((0.1 * x).norm()), rel=1e-12)
    assert decay["descent"] == pytest.approx(float(full @ delta), rel=1e-10)
    assert decay["ratio"] == pytest.approx(
        float(full @ delta) / with_decay.preconditioned.inner, rel=1e-10
    )


def test_bad_preconditioners_are_refused_before_anything_runs():
    case = by_id("mlp")
    model, comps = case.build()
    params = list(model.parameters())
    with pytest.raises(TypeError, match="identity"):
        probe(model, case.loss_fn, comps, preconditioner=torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="4 probed parameters"):
        probe(model, case.loss_fn, comps, preconditioner=[torch.ones(3)])
    with pytest.raises(ValueError, match="shape"):
        probe(model, case.loss_fn, comps, preconditioner=[torch.ones(3) for _ in params])
    for bad in (0.0, -1.0, math.nan, math.inf):
        given = [torch.ones_like(p) for p in params]
        given[1][0] = bad
        with pytest.raises(ValueError, match="positive and finite"):
            probe(model, case.loss_fn, comps, preconditioner=given)
    opt = torch.optim.Adam(params, eps=0.0)
    step_optimizer(model, case.loss_fn, comps, opt, only=[params[0]])
    opt.state[params[0]]["exp_avg_sq"][0, 0] = 0.0
    with pytest.raises(ValueError, match="P = 0"):
        probe(model, case.loss_fn, comps, preconditioner=opt)
    opt.state[params[0]]["exp_avg_sq"][0, 0] = math.nan
    with pytest.raises(ValueError, match="exp_avg_sq"):
        probe(model, case.loss_fn, comps, preconditioner=opt)


def test_result_records_are_json_safe():
    case = by_id("mlp")
    model, comps = case.build()
    opt = torch.optim.AdamW(model.parameters())  # no state: NaN ranges in info
    result = probe(model, case.loss_fn, comps, ETAS, preconditioner=opt)
    text = json.dumps(result.to_dict(), allow_nan=False)
    back = json.loads(text)["preconditioned"]
    assert back["inner"] == pytest.approx(result.preconditioned.inner)
    assert back["info"]["p_min"] is None and back["clipped"]["inf"]["cos_u"] == pytest.approx(1.0)
    assert json.dumps(result.summary(), allow_nan=False)


def test_the_direction_consistency_check():
    ok = check_direction_consistency(np.ones(2), np.array([0.5, 0.5]), 1.0, 1.0, 1e-9)
    assert ok["flags"] == []
    bad = check_direction_consistency(np.ones(2), np.array([1.5, 0.5]), 1.0, 1.0, 1e-9)
    assert bad["flags"] == ["cauchy_schwarz_violation", "dots_sum_mismatch"]
    assert bad["worst_component"] == 0


# -- training: fit records ρ_P beside ρ at every probe -------------------------------------
def test_fit_with_adamw_records_rho_p_from_the_state_at_each_probe(tmp_path):
    from clipscope import fit
    from clipscope.math.stats import DirectionStats
    from clipscope.run.directory import PRECONDITIONED_COLUMNS, load_run

    case = by_id("mlp")
    model, comps = case.build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    fit(model, case.loss_fn, comps, "rr", lr=0.02, eta=0.3, epochs=3, etas=[0.05],
        optimizer=opt, run_dir=tmp_path / "run", progress=False)  # fmt: skip
    record = load_run(tmp_path / "run")
    assert set(PRECONDITIONED_COLUMNS) <= set(record.rows) and "rho_p@0.05" in record.rows
    np.testing.assert_array_equal(record.column("p_unset_share"), [1.0, 0.0, 0.0, 0.0])
    assert record.column("rho_p")[0] == pytest.approx(record.column("rho")[0], rel=1e-12)
    for k in range(4):  # every row recomputes from its component file
        arrays = record.components(k)
        stats = DirectionStats(
            arrays["norms"], arrays["dots_p"], arrays["u_norm"], arrays["grad_u_inner"]
        )
        assert record.column("rho_p")[k] == pytest.approx(stats.ratio(0.3), rel=1e-12)
        assert record.column("rho_p@0.05")[k] == pytest.approx(stats.ratio(0.05), rel=1e-12)
        assert record.column("c1_p")[k] == pytest.approx(stats.c1, rel=1e-12)
    # the last point x_3 is the final model with the final optimizer state: the brute force
    ref = brute_preconditioned(model, case.loss_fn, comps, opt)
    last = record.components(3)
    np.testing.assert_allclose(last["dots_p"], ref["pdots"], rtol=1e-10, atol=1e-14)
    assert float(last["grad_u_inner"]) == pytest.approx(ref["inner"], rel=1e-10)
    assert record.column("decay_ratio")[3] != 0.0  # AdamW's decay, reported apart


def test_runs_without_the_preconditioned_records_still_read(tmp_path):
    from clipscope import fit
    from clipscope.run.directory import load_run

    case = by_id("mlp")
    model, comps = case.build()
    fit(model, case.loss_fn, comps, "igc", lr=0.02, eta=0.3, epochs=1,
        run_dir=tmp_path / "sgd", progress=False)  # fmt: skip
    record = load_run(tmp_path / "sgd")
    assert "rho_p" not in record.rows and np.isnan(record.column("rho_p")).all()
    assert "dots_p" not in record.components(0)
