"""Smoothness: HVPs and ‖∇²f‖ against the dense float64 Hessian; known answers; the (L0, L1) fit."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from cases import TinyLM, lm_loss
from clipscope.atomic import save_checkpoint
from clipscope.components import Components, SequentialComponents, detach_state
from clipscope.engine.hvp import full_gradient, hvp
from clipscope.errors import NonFiniteError
from clipscope.loop import Smoothness
from clipscope.math.eigen import lanczos, power_iteration
from clipscope.math.smoothness import (
    FIT_FLAGS,
    fit_components,
    fit_l0_l1,
    trajectory_pairs,
    trajectory_smoothness,
)
from clipscope.smoothness import (
    component_hessian_norms,
    hessian_norm,
    trajectory_smoothness_from_states,
)

SETTINGS = settings(deadline=None, max_examples=40)
F64 = torch.float64


# -- small problems as data ----------------------------------------------------
def _mlp_case(batchnorm=False):
    def build(dtype=F64):
        torch.manual_seed(0)
        layers = [nn.Linear(4, 5)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(5))
        layers += [nn.Tanh(), nn.Linear(5, 3)]
        model = nn.Sequential(*layers).to(dtype)
        gen = torch.Generator().manual_seed(1)
        X = torch.randn(18, 4, generator=gen, dtype=F64).to(dtype)
        Y = torch.randint(0, 3, (18,), generator=gen)
        comps = Components.from_tensors(X, Y, batch_size=4, seed=0)  # sizes 4,4,4,4,2
        return model, comps, nn.functional.cross_entropy

    return build


def _lstm_case():
    torch.manual_seed(2)
    model = TinyLM(vocab=5, dim=3).to(F64)
    tokens = torch.randint(0, 5, (43,), generator=torch.Generator().manual_seed(3))
    comps = SequentialComponents.from_tokens(tokens, batch_size=2, bptt=5)
    return model, comps, lm_loss


CASES = {"mlp": _mlp_case(), "mlp-bn-train": _mlp_case(batchnorm=True), "lstm-lm": _lstm_case}


def dense_hessian(model, loss_fn, comps, component=None):
    """Return the float64 Hessian of f = (1/m) Σ f_i (or of one f_i), torch.autograd.functional.

    Sequential components: the incoming state of window i is computed at the
    current parameters first and held fixed (the truncated-BPTT f_i).
    """
    model = copy.deepcopy(model)
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    sequential = getattr(comps, "sequential", False)
    batches, state = [], None
    for i in range(len(comps)):
        x, y = comps.batch(i)
        batches.append((x, y, state))
        if sequential:
            with torch.no_grad():
                _, state = copy.deepcopy(model)(x, state)
            state = detach_state(state)
    if component is not None:
        batches = [batches[component]]

    def f(theta):
        params, start = {}, 0
        for n, p in named:
            params[n] = theta[start : start + p.numel()].view_as(p)
            start += p.numel()
        total = 0.0
        for x, y, state in batches:
            out = functional_call(model, params, (x, state) if sequential else (x,))
            total = total + loss_fn(out[0] if sequential else out, y)
        return total / len(batches)

    return torch.autograd.functional.hessian(f, flat, vectorize=True)


def top_abs_eig(H):
    return float(torch.linalg.eigvalsh(H).abs().max())


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, comps, loss_fn = CASES[request.param]()
    return request.param, model, comps, loss_fn, dense_hessian(model, loss_fn, comps)


def snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.random.get_rng_state(),
    }


def assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["grad_ids"] == b["grad_ids"]
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


# -- HVP and eigenvalues against the dense Hessian -----------------------------
def test_hvp_equals_dense_hessian_times_vector(case):
    _, model, comps, loss_fn, H = case
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        v = torch.randn(H.shape[0], generator=gen, dtype=F64)
        hv = hvp(model, loss_fn, comps, v)
        assert hv.dtype == F64
        torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)


def test_component_hvp_equals_dense_component_hessian(case):
    _, model, comps, loss_fn, _ = case
    i = len(comps) - 1  # the last component: the short batch, or the end of the state chain
    Hi = dense_hessian(model, loss_fn, comps, component=i)
    v = torch.randn(Hi.shape[0], generator=torch.Generator().manual_seed(6), dtype=F64)
    torch.testing.assert_close(
        hvp(model, loss_fn, comps, v, component=i), Hi @ v, rtol=1e-10, atol=1e-12
    )


def test_hvp_accepts_vector_shaped_like_params():
    model, comps, loss_fn = CASES["mlp"]()
    v = [torch.randn_like(p) for p in model.parameters()]
    flat = torch.cat([t.reshape(-1) for t in v])
    torch.testing.assert_close(hvp(model, loss_fn, comps, v), hvp(model, loss_fn, comps, flat))


def test_hessian_norm_equals_eigvalsh(case):
    case_id, model, comps, loss_fn, H = case
    n = H.shape[0]
    res = hessian_norm(model, loss_fn, comps, tol=1e-10, max_iter=n)
    assert res.converged and res.method == "lanczos" and res.iterations < n
    assert res.hess_norm == pytest.approx(top_abs_eig(H), rel=1e-8)
    assert res.grad_norm == pytest.approx(float(full_gradient(model, loss_fn, comps).norm()))
    assert res.n_params == n and res.component is None
    if case_id == "lstm-lm":  # power iteration: ~20 passes here (|λ2/λ1| = 0.59)
        res = hessian_norm(model, loss_fn, comps, method="power", tol=1e-10, max_iter=200)
        assert res.converged and res.method == "power"
        assert res.hess_norm == pytest.approx(top_abs_eig(H), rel=1e-7)


def test_component_hessian_norms_equal_eigvalsh():
    model, comps, loss_fn = CASES["lstm-lm"]()
    results = component_hessian_norms(model, loss_fn, comps, tol=1e-10, max_iter=200)
    assert [r.component for r in results] == list(range(len(comps)))
    for r in results[:: len(comps) - 1]:  # first and last window
        Hi = dense_hessian(model, loss_fn, comps, component=r.component)
        assert r.converged
        assert r.hess_norm == pytest.approx(top_abs_eig(Hi), rel=1e-8)
    one = hessian_norm(model, loss_fn, comps, component=2, tol=1e-10, max_iter=200)
    assert one.hess_norm == pytest.approx(results[2].hess_norm, rel=1e-8)
    assert one.grad_norm == pytest.approx(results[2].grad_norm, rel=1e-12)


# -- the pure solvers ------------------------------------------------------------
@SETTINGS
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_lanczos_full_dimension_is_exact(n, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=F64)
    H = A + A.T
    est = lanczos(lambda v: H @ v, n, max_iter=n, tol=1e-12, seed=seed)
    assert est.converged and est.iterations <= n
    assert est.value == pytest.approx(top_abs_eig(H), rel=1e-8, abs=1e-12)


@SETTINGS
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000), iters=st.integers(1, 30))
def test_power_iteration_is_a_lower_bound_that_grows_with_budget(n, seed, iters):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=F64)
    H = A + A.T
    top = top_abs_eig(H)
    small = power_iteration(lambda v: H @ v, n, max_iter=iters, tol=1e-15, seed=seed)
    big = power_iteration(lambda v: H @ v, n, max_iter=iters + 5, tol=1e-15, seed=seed)
    assert small.value <= top * (1 + 1e-12)
    assert small.value <= big.value * (1 + 1e-12)


def test_power_iteration_handles_plus_minus_pair_and_zero():
    H = torch.diag(torch.tensor([2.0, -2.0, 1.0], dtype=F64))
    est = power_iteration(lambda v: H @ v, 3, tol=1e-12, max_iter=500)
    assert est.converged and est.value == pytest.approx(2.0, rel=1e-10)
    for solver in (power_iteration, lanczos):
        zero = solver(lambda v: torch.zeros_like(v), 4)
        assert zero.value == 0.0 and zero.converged


def test_solvers_report_non_convergence_and_bad_args():
    H = torch.diag(torch.linspace(1.0, 0.999, 50, dtype=F64))
    est = power_iteration(lambda v: H @ v, 50, max_iter=3, tol=1e-12)
    assert not est.converged and est.iterations == 3 and est.residual > 1e-12
    est = lanczos(lambda v: H @ v, 50, max_iter=2, tol=1e-15)
    assert not est.converged and est.iterations == 2
    for bad in ({"max_iter": 0}, {"tol": 0.0}, {"tol": 1.5}, {"max_iter": 2.5}):
        with pytest.raises(ValueError):
            lanczos(lambda v: v, 3, **bad)
    with pytest.raises(ValueError, match="not finite"):
        power_iteration(lambda v: v * math.nan, 3)
    with pytest.raises(ValueError, match="shape"):
        lanczos(lambda v: v[:2], 3)


# -- known answers ---------------------------------------------------------------
def _quadratic(d=6, n=24, seed=0):
    """f(w) = (1/N) Σ_j ½ s_j (a_j·w)², i.e. ½ wᵀAw with A = (1/N) Σ s_j a_j a_jᵀ (indefinite)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=F64)
    S = torch.tensor([1.0, -0.3] * (n // 2), dtype=F64)
    comps = Components.from_tensors(X, S, batch_size=4, seed=seed)  # equal batches: mean = 1/N
    model = nn.Linear(d, 1, bias=False).to(F64)

    def loss_fn(out, s):
        return 0.5 * (s * out.squeeze(-1) ** 2).mean()

    A = (X.T * S) @ X / n
    return model, comps, loss_fn, A


def test_quadratic_hessian_norm_and_fit():
    model, comps, loss_fn, A = _quadratic()
    lam = top_abs_eig(A)
    assert torch.linalg.eigvalsh(A).min() < 0 < torch.linalg.eigvalsh(A).max()
    gen = torch.Generator().manual_seed(7)
    gn, hn = [], []
    for _ in range(6):
        with torch.no_grad():
            model.weight.copy_(3 * torch.randn(1, 6, generator=gen, dtype=F64))
        r = hessian_norm(model, loss_fn, comps, tol=1e-12, max_iter=6)
        assert r.hess_norm == pytest.approx(lam, rel=1e-10)
        assert r.grad_norm == pytest.approx(float((A @ model.weight[0].detach()).norm()))
        gn.append(r.grad_norm)
        hn.append(r.hess_norm)
    for method in ("hull", "quantile"):
        fit = fit_l0_l1(gn, hn, method)
        assert fit.L0 == pytest.approx(lam, rel=1e-9)
        assert fit.L1 == pytest.approx(0.0, abs=1e-9 * lam)
        assert fit.n_points == 6


def test_exp_gives_l0_zero_l1_one():
    """f(w) = exp(w): f'' = f' = exp(w), so ‖∇²f‖ = ‖∇f‖ and the envelope is L0 = 0, L1 = 1."""
    model = nn.Linear(1, 1, bias=False).to(F64)
    comps = Components.from_tensors(torch.ones(3, 1, dtype=F64), torch.zeros(3), batch_size=1)

    def loss_fn(out, _):
        return torch.exp(out).mean()

    gn, hn = [], []
    for w in np.linspace(-2.0, 2.0, 9):
        with torch.no_grad():
            model.weight.fill_(float(w))
        r = hessian_norm(model, loss_fn, comps, method="power", tol=1e-12)
        assert r.hess_norm == pytest.approx(math.exp(w), rel=1e-12)
        assert r.grad_norm == pytest.approx(math.exp(w), rel=1e-12)
        gn.append(r.grad_norm)
        hn.append(r.hess_norm)
    fit = fit_l0_l1(gn, hn)
    assert fit.L0 == pytest.approx(0.0, abs=1e-12) and fit.L1 == pytest.approx(1.0, rel=1e-12)
    assert fit.n_above == 0 and fit.flags == ()
    assert fit.x_range == pytest.approx((math.exp(-2), math.exp(2)))


# -- the model stays untouched ---------------------------------------------------
def _busy_model():
    """BatchNorm in train mode, dropout, populated .grad, an eval-mode submodule."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)
    ).to(F64)
    model[2].eval()
    X = torch.randn(16, 4, dtype=F64)
    Y = torch.randint(0, 3, (16,))
    comps = Components.from_tensors(X, Y, batch_size=4, seed=1)
    nn.functional.cross_entropy(model(X), Y).backward()
    model[4].bias.grad = None
    return model, comps, nn.functional.cross_entropy


def test_model_untouched_after_every_entry_point(tmp_path):
    model, comps, loss_fn = _busy_model()
    before = snapshot(model)
    other = {k: v + 0.01 for k, v in model.state_dict().items()}
    n = sum(p.numel() for p in model.parameters())
    hvp(model, loss_fn, comps, torch.ones(n, dtype=F64))
    hvp(model, loss_fn, comps, torch.ones(n, dtype=F64), component=1)
    hessian_norm(model, loss_fn, comps, max_iter=2)
    hessian_norm(model, loss_fn, comps, method="power", max_iter=2, dropout="fixed")
    component_hessian_norms(model, loss_fn, comps, max_iter=2, only=[0, 3])
    full_gradient(model, loss_fn, comps)
    trajectory_smoothness_from_states(model, loss_fn, comps, model.state_dict(), other)
    assert_same(before, snapshot(model))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("entry", ["hvp", "hessian_norm", "component", "trajectory"])
def test_model_untouched_after_exception(entry):
    model, comps, base_loss = _busy_model()
    before = snapshot(model)
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) == 3:  # after two components' forwards changed the running stats
            raise Boom
        return base_loss(out, y)

    n = sum(p.numel() for p in model.parameters())
    run = {
        "hvp": lambda: hvp(model, loss_fn, comps, torch.ones(n, dtype=F64)),
        "hessian_norm": lambda: hessian_norm(model, loss_fn, comps),
        "component": lambda: component_hessian_norms(model, loss_fn, comps),
        "trajectory": lambda: trajectory_smoothness_from_states(
            model, loss_fn, comps, {k: v * 2 for k, v in model.state_dict().items()}, {}
        ),
    }[entry]
    with pytest.raises(Boom):
        run()
    assert_same(before, snapshot(model))


def test_nonfinite_hvp_is_an_error_and_model_untouched():
    model, comps, _ = _busy_model()
    before = snapshot(model)

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out, y) * torch.tensor(math.inf, dtype=F64)

    with pytest.raises(ValueError, match=r"component 0: non-finite gradient in parameter\(s\) 0\."):
        hessian_norm(model, loss_fn, comps)
    assert_same(before, snapshot(model))


def test_cudnn_is_off_during_lstm_hvp_and_restored():
    model, comps, base = CASES["lstm-lm"]()
    seen = []

    def loss_fn(out, y):
        seen.append(torch.backends.cudnn.enabled)
        return base(out, y)

    before = torch.backends.cudnn.enabled
    hessian_norm(model, loss_fn, comps, max_iter=2)
    assert seen and not any(seen)
    assert torch.backends.cudnn.enabled == before
    seen.clear()
    mlp, mcomps, mloss = CASES["mlp"]()
    hvp(
        mlp,
        lambda o, y: (seen.append(torch.backends.cudnn.enabled), mloss(o, y))[1],
        mcomps,
        torch.ones(sum(p.numel() for p in mlp.parameters()), dtype=F64),
    )
    assert all(s == before for s in seen)  # no RNN: the flag is left alone


def test_fixed_dropout_masks_make_hvp_repeatable():
    model, comps, loss_fn = _busy_model()
    model[1].eval()
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=F64)
    a = hvp(model, loss_fn, comps, v, dropout="fixed", seed=3)
    b = hvp(model, loss_fn, comps, v, dropout="fixed", seed=3)
    assert torch.equal(a, b)


def test_bad_inputs_raise_before_anything_runs():
    model, comps, loss_fn = CASES["mlp"]()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="entries"):
        hvp(model, loss_fn, comps, torch.ones(n + 1))
    with pytest.raises(ValueError, match="NaN"):
        hvp(model, loss_fn, comps, torch.full((n,), math.nan))
    with pytest.raises(IndexError):
        hvp(model, loss_fn, comps, torch.ones(n), component=len(comps))
    with pytest.raises(ValueError, match="method"):
        hessian_norm(model, loss_fn, comps, method="arnoldi")
    with pytest.raises(ValueError, match="tol"):
        hessian_norm(model, loss_fn, comps, tol=-1.0)
    with pytest.raises(TypeError):
        hessian_norm("not a model", loss_fn, comps)
    with pytest.raises(TypeError):
        component_hessian_norms(model, loss_fn, comps, only=[True])
    with pytest.raises(ValueError, match="dropout"):
        hvp(model, loss_fn, comps, torch.ones(n), dropout="on")
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        hessian_norm(frozen, loss_fn, comps)


# -- trajectory estimate ---------------------------------------------------------
def test_trajectory_estimate_known_answers(tmp_path):
    model, comps, loss_fn, A = _quadratic()
    evals, evecs = torch.linalg.eigh(A)
    k = int(evals.abs().argmax())
    w0 = torch.randn(1, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    w1 = w0 + 0.5 * evecs[:, k]
    s0, s1 = {"weight": w0}, {"weight": w1}
    step = trajectory_smoothness_from_states(model, loss_fn, comps, s0, s1)
    assert step.estimate == pytest.approx(float(evals.abs().max()), rel=1e-10)
    assert step.step_norm == pytest.approx(0.5)
    assert step.grad_norm == pytest.approx(float((A @ w0[0]).norm()), rel=1e-12)
    assert step.grad_norm_next == pytest.approx(float((A @ w1[0]).norm()), rel=1e-12)
    # from checkpoints on disk (clipscope's {"model": state_dict} format, checksum verified)
    p0, p1 = tmp_path / "ckpt_0.pt", tmp_path / "ckpt_1.pt"
    save_checkpoint(p0, {"model": s0, "epoch": 0})
    save_checkpoint(p1, {"model": s1, "epoch": 1})
    from_disk = trajectory_smoothness_from_states(model, loss_fn, comps, str(p0), p1)
    assert from_disk == step
    assert math.isnan(trajectory_smoothness_from_states(model, loss_fn, comps, s0, s0).estimate)


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(2, 6))
def test_trajectory_pairs_on_a_quadratic_are_bounded_by_the_top_eigenvalue(seed, k):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(5, 5, generator=gen, dtype=F64)
    H = B + B.T
    xs = [torch.randn(5, generator=gen, dtype=F64) for _ in range(k)]
    gs = [H @ x for x in xs]
    gn, est = trajectory_pairs(xs, gs)
    assert len(gn) == len(est) == k - 1
    np.testing.assert_allclose(gn, [float(g.norm()) for g in gs[:-1]])
    assert np.all(est <= top_abs_eig(H) * (1 + 1e-12))
    assert np.all(est >= float(torch.linalg.eigvalsh(H).abs().min()) * (1 - 1e-12))


def test_trajectory_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        trajectory_smoothness([0.0], [0.0], [1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        trajectory_smoothness([0.0], [math.nan], [1.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        trajectory_pairs([[0.0], [1.0]], [[0.0]])
    model, comps, loss_fn, _ = _quadratic()
    with pytest.raises(TypeError, match="state_dict"):
        trajectory_smoothness_from_states(model, loss_fn, comps, 3, {})


# -- the fit ---------------------------------------------------------------------
def test_fit_degenerate_data_is_flagged():
    few = fit_l0_l1([1.0, math.nan], [2.0, 3.0])
    assert math.isnan(few.L0) and math.isnan(few.L1) and not few.ok
    assert few.flags == ("nonfinite_dropped", "too_few_points") and few.n_dropped == 1
    assert few.to_dict()["L0"] is None
    same = fit_l0_l1([2.0, 2.0, 2.0], [1.0, 5.0, 3.0])
    assert same.flags == ("equal_grad_norms",) and math.isnan(same.L1)
    empty = fit_l0_l1([], [])
    assert empty.flags == ("too_few_points",) and empty.n_points == 0
    falling = fit_l0_l1([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert (falling.L0, falling.L1) == (3.0, 0.0)
    assert falling.flags == ("negative_slope_clamped",)
    steep = fit_l0_l1([1.0, 2.0], [1.0, 3.0])  # y = 2x − 1: the intercept would be negative
    assert (steep.L0, steep.L1) == (0.0, 1.5) and steep.flags == ("negative_intercept_clamped",)
    dropped = fit_l0_l1([1.0, math.inf, 2.0, 3.0], [1.0, 1.0, math.nan, 2.0])
    assert dropped.n_points == 2 and dropped.n_dropped == 2 and "nonfinite_dropped" in dropped.flags
    assert (dropped.L0, dropped.L1) == (0.5, 0.5)
    assert set(FIT_FLAGS) >= {f for r in (few, same, falling, steep) for f in r.flags}
    assert all(r.messages == tuple(FIT_FLAGS[f] for f in r.flags) for r in (few, steep))
    for method in ("hull", "quantile"):
        assert fit_l0_l1([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], method).L1 == 0.0


def test_fit_bad_inputs():
    with pytest.raises(ValueError, match="grad_norms must be >= 0"):
        fit_l0_l1([1.0, -1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="hess_norms must be >= 0"):
        fit_l0_l1([1.0, 1.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="same length"):
        fit_l0_l1([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="method"):
        fit_l0_l1([1.0, 2.0], [1.0, 2.0], "lsq")
    for q in (0.0, 1.0, math.nan, True):
        with pytest.raises(ValueError, match="quantile"):
            fit_l0_l1([1.0, 2.0], [1.0, 2.0], "quantile", quantile=q)


def _candidate_lines(x, y):
    """Every vertex of the fit LPs: lines through two points, horizontal, through the origin."""
    lines = [(0.0, 0.0)]
    with np.errstate(all="ignore"):
        for j in range(len(x)):
            lines.append((y[j], 0.0))
            if x[j] > 0:
                lines.append((0.0, y[j] / x[j]))
            for k in range(j + 1, len(x)):
                if x[k] != x[j]:
                    s = (y[k] - y[j]) / (x[k] - x[j])
                    lines.append((y[j] - s * x[j], s))
    return [(a, b) for a, b in lines if a >= 0 and b >= 0 and math.isfinite(a + b)]


points = st.lists(
    st.tuples(st.floats(0, 100, allow_subnormal=False), st.floats(0, 100, allow_subnormal=False)),
    min_size=2,
    max_size=12,
).filter(lambda p: len({a for a, _ in p}) > 1)


@SETTINGS
@given(points)
def test_hull_fit_is_the_least_envelope(pts):
    x, y = (np.array(v) for v in zip(*pts, strict=True))
    fit = fit_l0_l1(x, y)
    assert fit.L0 >= 0 and fit.L1 >= 0 and fit.n_above == 0
    tol = 1e-9 * (1 + y.max())
    assert np.all(y <= fit.bound(x) + tol)
    xbar = 0.5 * (x.min() + x.max())
    with np.errstate(all="ignore"):
        feasible = [(a, b) for a, b in _candidate_lines(x, y) if np.all(y <= a + b * x + tol)]
        best = min(a + b * xbar for a, b in feasible)
    assert fit.L0 + fit.L1 * xbar <= best + tol


def _pinball(r, q):
    return float(np.sum(np.where(r >= 0, q * r, (q - 1) * r)))


@SETTINGS
@given(points, st.sampled_from([0.5, 0.8, 0.95]))
def test_quantile_fit_solves_the_constrained_lp(pts, q):
    x, y = (np.array(v) for v in zip(*pts, strict=True))
    fit = fit_l0_l1(x, y, "quantile", quantile=q)
    assert fit.L0 >= 0 and fit.L1 >= 0
    assert fit.n_above <= len(x) * (1 - q) + 1e-9
    value = _pinball(y - fit.bound(x), q)
    with np.errstate(all="ignore"):
        vals = [_pinball(y - a - b * x, q) for a, b in _candidate_lines(x, y)]
    best = min(v for v in vals if math.isfinite(v))
    assert value <= best + 1e-9 * (1 + np.abs(y).sum())


def test_quantile_fit_tolerates_an_outlier_the_hull_does_not():
    x = np.linspace(1.0, 10.0, 40)
    y = 2.0 + 0.5 * x
    y[7] = 100.0  # one unconverged eigenvalue estimate
    hull, quant = fit_l0_l1(x, y), fit_l0_l1(x, y, "quantile", quantile=0.95)
    assert hull.n_above == 0 and hull.bound(x[7]) >= 100.0
    assert quant.L0 == pytest.approx(2.0) and quant.L1 == pytest.approx(0.5)
    assert quant.n_above == 1
    d = quant.to_dict()
    assert d["method"] == "quantile" and d["quantile"] == 0.95 and d["flags"] == []


@pytest.mark.parametrize("method", ["hull", "quantile"])
def test_binary_search_path_agrees_with_exhaustive_evaluation(method, monkeypatch):
    import clipscope.math.smoothness as sm

    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.uniform(0.1, 10.0, 30)
        y = rng.uniform(0.0, 5.0, 30) + rng.uniform(0.0, 1.0) * x
        exhaustive = fit_l0_l1(x, y, method)
        monkeypatch.setattr(sm, "EXHAUSTIVE_WORK", 0)
        searched = fit_l0_l1(x, y, method)
        monkeypatch.undo()
        assert searched.L0 == pytest.approx(exhaustive.L0, rel=1e-9, abs=1e-12)
        assert searched.L1 == pytest.approx(exhaustive.L1, rel=1e-9, abs=1e-12)


def test_fit_components_is_one_fit_per_column():
    rng = np.random.default_rng(1)
    G = rng.uniform(0.1, 3.0, (7, 4))
    Hn = 0.5 + 2.0 * G + rng.uniform(-0.2, 0.0, (7, 4))
    fits = fit_components(G, Hn, "quantile", quantile=0.8)
    assert len(fits) == 4
    for i, fit in enumerate(fits):
        assert fit == fit_l0_l1(G[:, i], Hn[:, i], "quantile", quantile=0.8)
    with pytest.raises(ValueError, match="2-D"):
        fit_components(G[0], Hn[0])


def test_float32_model_hvp_is_accumulated_in_float64_and_close_to_the_float64_answer():
    model, comps, loss_fn = CASES["mlp"]()
    H = dense_hessian(model, loss_fn, comps)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(9), dtype=F64)
    model32, comps32, _ = CASES["mlp"](torch.float32)
    assert torch.equal(model32[0].weight, model[0].weight.float())
    hv = hvp(model32, loss_fn, comps32, v)
    assert hv.dtype == F64
    torch.testing.assert_close(hv, H @ v, rtol=1e-5, atol=1e-6)


# -- the Smoothness unit: the loop's schedule and measurement -----------------------
@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"every": 0}, ValueError),
        ({"every": True}, ValueError),
        ({"every": 1.5}, ValueError),
        ({"tol": 0.0}, ValueError),
        ({"tol": 1.0}, ValueError),
        ({"max_iter": 0}, ValueError),
        ({"components": 1}, TypeError),
    ],
    ids=str,
)
def test_smoothness_probe_rejects_bad_settings(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        Smoothness(**kwargs)


def test_smoothness_probe_schedule_counts_probes_and_keeps_the_last():
    probe = Smoothness(every=3)
    assert [p for p in range(8) if probe.due(p, last=p == 7)] == [0, 3, 6, 7]


def test_smoothness_probe_measure_equals_the_solvers_and_touches_nothing():
    model, comps, loss_fn = _mlp_case()()
    before = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    row, arrays = Smoothness(components=True, tol=1e-10, max_iter=60).measure(model, loss_fn, comps)
    full = hessian_norm(model, loss_fn, comps, tol=1e-10, max_iter=60)
    per = component_hessian_norms(model, loss_fn, comps, tol=1e-10, max_iter=60)
    assert row == {
        "hess_norm": full.hess_norm,
        "hess_converged": 1.0,
        "hess_iterations": float(full.iterations),
    }
    assert arrays["hess_norms"].tolist() == [r.hess_norm for r in per]
    assert arrays["hess_converged"].all() and arrays["hess_norms"].shape == (len(comps),)
    assert arrays["hess_iterations"].tolist() == [r.iterations for r in per]
    top = top_abs_eig(dense_hessian(model, loss_fn, comps))
    assert row["hess_norm"] == pytest.approx(top, rel=1e-8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_fit_records_nan_for_a_nonfinite_hessian_and_raises_other_errors():
    from clipscope.loop import fit

    class Failing(Smoothness):
        def measure(self, *args, **kwargs):
            raise self.error

    model, comps, loss_fn = _mlp_case()()
    messages = []
    probe = Failing()
    probe.error = NonFiniteError("the Hessian-vector product is not finite (NaN or inf)")
    kw = {"lr": 0.1, "eta": 1.0, "epochs": 1, "progress": False, "units": [probe]}
    history = fit(model, loss_fn, comps, "igc", log=messages.append, **kw)
    assert history.status == "completed" and len(history.rows) == 2
    assert all(math.isnan(r["hess_norm"]) for r in history.rows)
    assert math.isfinite(history.rows[0]["traj_smoothness"])  # the secant needs no Hessian
    assert any("Hessian norm not measured at epoch 0" in m for m in messages)
    probe.error = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        fit(model, loss_fn, comps, "igc", **kw)
