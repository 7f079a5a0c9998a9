"""Orders, the clipped step and ``fit``, against hand-written float64 loops."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clipscope.atomic import latest_checkpoint
from clipscope.clipping import grad_norm
from clipscope.components import Components, SequentialComponents
from clipscope.errors import ConfigError, NonFiniteError
from clipscope.loop import Needs, Unit, fit, nt_asgd_switch
from clipscope.methods import METHODS, clipped_step, make_optimizer, make_order

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# -- problems (test cases are data) --------------------------------------------


def least_squares(n=40, d=5, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    comps = Components.from_tensors(X, Y, batch, seed=seed)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).double()

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, comps


def mlp(n=30, d=4, batch=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Y = torch.randint(3, (n,), generator=gen)
    comps = Components.from_tensors(X, Y, batch, seed=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, nn.functional.cross_entropy, comps


PROBLEMS = [
    pytest.param(least_squares, id="least-squares"),
    pytest.param(mlp, id="mlp-unequal-last-batch"),
]


def hand_order(method, m, seed, epochs):
    """Yield the documented order protocol, written out: one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m, generator=gen).tolist() if method == "shuffle_once" else None
    for _ in range(epochs):
        if method == "igc":
            yield list(range(m))
        elif method in ("sgd", "zhang"):
            yield torch.randint(m, (m,), generator=gen).tolist()
        elif method == "rr":
            yield torch.randperm(m, generator=gen).tolist()
        else:
            yield list(perm)


def hand_loop(model, loss_fn, comps, method, lr, eta, epochs, seed, gamma=None):
    """X ← x − α·min{1, η/‖g‖}·g (zhang: x ← x − min{α, γ/‖g‖}·g), no optimizer object."""
    params = list(model.parameters())
    for order in hand_order(method, comps.m, seed, epochs):
        for i in order:
            x, y = comps.batch(i)
            grads = torch.autograd.grad(loss_fn(model(x), y), params)
            n = float(grad_norm(grads))
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if method == "zhang":
                        p.sub_(min(lr, gamma / n) * g)
                    else:
                        if n > eta:
                            g = g * (eta / n)
                        p.add_(g, alpha=-lr)
    return model


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- orders --------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 7])
def test_cyclic_visits_each_component_once_per_epoch(m):
    order = make_order("igc", m, seed=3)
    for _ in range(3):
        assert order.next_epoch() == list(range(m))
    assert order.counts.tolist() == [3] * m


@pytest.mark.parametrize("method", ["rr", "shuffle_once"])
def test_permutation_orders(method):
    order = make_order(method, 9, seed=0)
    epochs = [order.next_epoch() for _ in range(4)]
    assert all(sorted(e) == list(range(9)) for e in epochs)
    distinct = len({tuple(e) for e in epochs})
    assert distinct == (1 if method == "shuffle_once" else 4)


def test_with_replacement_counts_recorded():
    order = make_order("sgd", 5, seed=2)
    draws = [order.next_epoch() for _ in range(20)]
    flat_draws = [i for e in draws for i in e]
    assert len(flat_draws) == 100
    assert order.counts.tolist() == np.bincount(flat_draws, minlength=5).tolist()
    assert any(len(set(e)) < 5 for e in draws)  # repeats happen: with replacement


@pytest.mark.parametrize("method", METHODS)
def test_order_state_dict_continues_exactly(method):
    a = make_order(method, 6, seed=4)
    a.next_epoch()
    state = a.state_dict()
    expected = [a.next_epoch() for _ in range(3)]
    b = make_order(method, 6, seed=99)
    b.load_state_dict(state)
    assert [b.next_epoch() for _ in range(3)] == expected
    assert torch.equal(a.counts, b.counts)


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    m=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    epochs=st.integers(1, 4),
)
def test_order_invariants(method, m, seed, epochs):
    """Every epoch has m indices in range; permutation orders visit each index once."""
    order = make_order(method, m, seed)
    drawn = [order.next_epoch() for _ in range(epochs)]
    assert all(len(e) == m and all(0 <= i < m for i in e) for e in drawn)
    if method not in ("sgd", "zhang"):
        assert all(sorted(e) == list(range(m)) for e in drawn)
    assert order.counts.sum() == m * epochs and order.epoch == epochs
    assert order.counts.tolist() == np.bincount([i for e in drawn for i in e], minlength=m).tolist()


def test_order_is_a_sampler():
    order = make_order("rr", 4, seed=0)
    assert len(order) == 4 and sorted(order) == [0, 1, 2, 3]


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="valid choices: sgd, igc, rr, shuffle_once, zhang"):
        make_order("adam", 3)
    model, loss_fn, comps = least_squares()
    with pytest.raises(ValueError, match="'cyclic'"):
        fit(model, loss_fn, comps, "cyclic", lr=0.1, progress=False)


# -- the step ------------------------------------------------------------------


def test_clipped_step_matches_formula_and_returns_preclip_norm():
    w = nn.Parameter(torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.5)
    norm = clipped_step(opt, lambda: (w * torch.tensor([1.0, 2.0, 3.0]).double()).sum(), 2.0)
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert norm == pytest.approx(math.sqrt(14), rel=1e-15)
    expected = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64) - 0.5 * (2.0 / norm) * g
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-15)


def test_clipped_step_infinite_eta_is_plain_sgd_bitwise():
    torch.manual_seed(0)
    a = nn.Linear(4, 2).double()
    b = copy.deepcopy(a)
    x = torch.randn(5, 4, dtype=torch.float64) * 100
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.3), torch.optim.SGD(b.parameters(), lr=0.3)
    for _ in range(3):
        clipped_step(opt_a, lambda: (a(x) ** 2).mean(), math.inf)
        opt_b.zero_grad()
        (b(x) ** 2).mean().backward()
        opt_b.step()
    assert torch.equal(flat(a), flat(b))


def test_clipped_step_nonfinite_changes_nothing():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=1.0, momentum=0.9)
    clipped_step(opt, lambda: (w**2).sum(), 1.0)
    before, buf = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    with pytest.raises(NonFiniteError, match="nan"):
        clipped_step(opt, lambda: (w * float("nan")).sum(), 1.0)
    with pytest.raises(NonFiniteError):
        clipped_step(opt, lambda: (w * torch.tensor([float("inf"), 0.0])).sum() * 0 + w.sum(), 1.0)
    assert torch.equal(w.detach(), before)
    assert torch.equal(opt.state[w]["momentum_buffer"], buf)


# -- fit vs the hand-written loop -------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("method", ["sgd", "igc", "rr", "shuffle_once"])
@pytest.mark.parametrize("eta", [0.3, math.inf], ids=["eta0.3", "eta-inf"])
def test_fit_equals_hand_loop_bitwise(problem, method, eta):
    model, loss_fn, comps = problem()
    ref = hand_loop(copy.deepcopy(model), loss_fn, comps, method, 0.05, eta, 3, seed=5)
    hist = fit(model, loss_fn, comps, method, lr=0.05, eta=eta, epochs=3, seed=5, progress=False)
    assert torch.equal(flat(model), flat(ref))
    assert hist.steps == 3 * comps.m and sum(hist.counts) == 3 * comps.m
    assert len(hist.rows) == 4 and hist.status == "completed"


def test_fit_zhang_step():
    model, loss_fn, comps = least_squares()
    ref = hand_loop(copy.deepcopy(model), loss_fn, comps, "zhang", 0.5, None, 2, seed=1, gamma=0.2)
    fit(model, loss_fn, comps, "zhang", lr=0.5, eta=0.2, epochs=2, seed=1, progress=False)
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-13, atol=0)


def test_fit_momentum_weight_decay_equal_torch_sgd_on_clipped_grads():
    model, _, comps = mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for order in hand_order("rr", comps.m, 0, 2):
        for i in order:
            opt.zero_grad()
            x, y = comps.batch(i)
            nn.functional.cross_entropy(ref(x), y).backward()
            grads = [p.grad for p in ref.parameters()]
            n = float(grad_norm(grads))
            if n > 0.5:
                for g in grads:
                    g.mul_(0.5 / n)
            opt.step()
    hist = fit(
        model,
        nn.functional.cross_entropy,
        comps,
        "rr",
        lr=0.1,
        eta=0.5,
        epochs=2,
        momentum=0.9,
        weight_decay=0.01,
        progress=False,
    )
    assert torch.equal(flat(model), flat(ref))
    assert hist.rows[0]["lr"] == 0.1


def test_fit_with_any_optimizer_clips_before_its_step():
    model, loss_fn, comps = least_squares()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for order in hand_order("igc", comps.m, 0, 2):
        for i in order:
            ref_opt.zero_grad()
            x, y = comps.batch(i)
            loss_fn(ref(x), y).backward()
            n = float(grad_norm([p.grad for p in ref.parameters()]))
            if n > 0.2:
                for p in ref.parameters():
                    p.grad.mul_(0.2 / n)
            ref_opt.step()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    fit(model, loss_fn, comps, "igc", lr=0.01, eta=0.2, epochs=2, optimizer=opt, progress=False)
    assert torch.equal(flat(model), flat(ref))


def hand_adam(model, loss_fn, comps, method, *, lr, eta, epochs, seed, betas, eps, wd, decoupled):
    """Adam / AdamW on C(g; η), written out in float64 (no torch.optim).

    Adam's L2 term is added to the clipped gradient (its moments average C(g; η) + λx);
    AdamW first shrinks x by (1 − αλ), then steps on the moments of C(g; η) alone.
    Returns the norms of the clipped gradients (what the units see in ``.grad``).
    """
    params = list(model.parameters())
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    clipped, t = [], 0
    for order in hand_order(method, comps.m, seed, epochs):
        for i in order:
            t += 1
            x, y = comps.batch(i)
            grads = torch.autograd.grad(loss_fn(model(x), y), params)
            n = float(grad_norm(grads))
            c = [g * min(1.0, eta / n) for g in grads]
            clipped.append(float(grad_norm(c)))
            with torch.no_grad():
                for k, p in enumerate(params):
                    g = c[k] if decoupled else c[k] + wd * p
                    if decoupled:
                        p.mul_(1 - lr * wd)
                    m[k] = b1 * m[k] + (1 - b1) * g
                    v[k] = b2 * v[k] + (1 - b2) * g * g
                    m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return clipped


class _ClippedNorms(Unit):
    """Records ‖.grad‖ before every update: the gradient the optimizer is handed."""

    name = "clipped_norms"

    def __init__(self):
        self.norms = []

    def needs(self, point):
        return Needs.STEP_GRADIENT

    def before_update(self, step):
        self.norms.append(float(grad_norm([p.grad for p in step.params])))


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("method", ["sgd", "igc", "rr"])
@pytest.mark.parametrize("eta", [0.3, math.inf], ids=["eta0.3", "eta-inf"])
def test_fit_with_adam_and_adamw_equals_a_float64_hand_loop(problem, optimizer, method, eta):
    """Clip each component gradient exactly, then the optimizer's step; decay outside the clip."""
    model, loss_fn, comps = problem()
    kw = dict(lr=0.02, eta=eta, epochs=3, seed=5, betas=(0.8, 0.95), eps=1e-6)
    clipped = hand_adam(copy.deepcopy(model), loss_fn, comps, method, wd=0.1,
                        decoupled=optimizer == "adamw", **kw)  # fmt: skip
    ref = copy.deepcopy(model)
    hand_adam(ref, loss_fn, comps, method, wd=0.1, decoupled=optimizer == "adamw", **kw)
    spy = _ClippedNorms()
    hist = fit(model, loss_fn, comps, method, optimizer=optimizer, weight_decay=0.1,
               units=[spy], progress=False, **kw)  # fmt: skip
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-12, atol=1e-14)
    # the units see C(g; η) itself: the decay is not part of the clipped gradient
    np.testing.assert_allclose(spy.norms, clipped, rtol=1e-12)
    if eta < math.inf:
        assert max(spy.norms) <= eta * (1 + 1e-12) and any(
            n == pytest.approx(eta) for n in spy.norms
        )
    assert hist.steps == 3 * comps.m


def test_adamw_decay_is_decoupled_and_adam_decay_is_l2_after_the_clip():
    """One step from x with g = ∇f: AdamW's and Adam's first steps, by their formulas."""
    w0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    for optimizer in ("adam", "adamw"):
        w = nn.Parameter(w0.clone())
        opt = make_optimizer([w], 0.1, weight_decay=0.5, optimizer=optimizer, eps=0.0)
        norm = clipped_step(opt, lambda w=w: 0.5 * (w**2).sum(), eta=1.0)  # g = w, ‖g‖ = 5
        assert norm == 5.0
        c = w0 / 5.0  # C(g; 1)
        if optimizer == "adamw":  # x(1 − αλ) − α·sign(c): the first Adam step is ±α
            expected = w0 * (1 - 0.1 * 0.5) - 0.1 * torch.sign(c)
        else:  # moments of c + λx: the sign of c + λx
            expected = w0 - 0.1 * torch.sign(c + 0.5 * w0)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-15, atol=1e-15)


def test_a_users_optimizer_is_recorded_and_contradictions_are_refused(tmp_path):
    model, loss_fn, comps = least_squares()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    fit(model, loss_fn, comps, "igc", lr=0.05, epochs=1, optimizer=opt, progress=False,
        run_dir=tmp_path / "run")  # fmt: skip
    _, state = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert state["setting"]["momentum"] == 0.9 and state["setting"]["weight_decay"] == 0.01
    assert "optimizer" not in state["setting"]  # "sgd": the default, left out as before
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["optimizer"]["class"] == "torch.optim.sgd.SGD"
    assert env["optimizer"]["momentum"] == 0.9 and env["optimizer"]["schedule"] == "constant"
    adam = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.5, 0.6))
    fit(model, loss_fn, comps, "igc", lr=0.05, epochs=1, optimizer=adam, progress=False,
        run_dir=tmp_path / "adam")  # fmt: skip
    _, state = latest_checkpoint(tmp_path / "adam" / "checkpoints")
    assert state["setting"]["optimizer"] == "adam" and state["setting"]["betas"] == [0.5, 0.6]
    before = flat(model).clone()
    for opt, kw, key in [
        (torch.optim.SGD(model.parameters(), lr=0.2), {}, "lr"),
        (torch.optim.SGD(model.parameters(), lr=0.05), {"momentum": 0.5}, "momentum"),
        (torch.optim.Adam(model.parameters(), lr=0.05), {"weight_decay": 0.1}, "weight_decay"),
    ]:
        with pytest.raises(ConfigError, match=f"fit: {key} = .* but the optimizer you passed"):
            fit(model, loss_fn, comps, "igc", lr=0.05, optimizer=opt, progress=False, **kw)
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize("method", ["sgd", "igc", "rr"])
def test_probing_does_not_disturb_training(method):
    """Probes every epoch vs never: identical parameters (dropout draws included)."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(24, 4, generator=gen), torch.randint(2, (24,), generator=gen)
    comps = Components.from_tensors(X, Y, 6, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 2))
    other = copy.deepcopy(net)
    loss = nn.functional.cross_entropy
    kw = dict(lr=0.1, eta=0.5, epochs=3, seed=2, progress=False)
    torch.manual_seed(7)
    a = fit(net, loss, comps, method, probe_every=1, etas=(0.1, 1.0), heldout=lambda m: 0.0, **kw)
    torch.manual_seed(7)
    b = fit(other, loss, comps, method, probe_every=0, **kw)
    assert torch.equal(flat(net), flat(other))
    assert len(a.rows) == 4 and b.rows == []


def test_eta_inf_equals_unclipped_and_huge_eta():
    model, loss_fn, comps = least_squares()
    twin = copy.deepcopy(model)
    fit(model, loss_fn, comps, "igc", lr=0.05, eta=math.inf, epochs=2, progress=False)
    fit(twin, loss_fn, comps, "igc", lr=0.05, eta=1e300, epochs=2, progress=False)
    assert torch.equal(flat(model), flat(twin))


def test_m_equal_one_all_orders_identical():
    model, loss_fn, comps = least_squares(n=5, batch=8)
    finals = []
    for method in ("sgd", "igc", "rr", "shuffle_once"):
        m = copy.deepcopy(model)
        fit(
            m,
            loss_fn,
            comps,
            method,
            lr=0.1,
            eta=0.5,
            epochs=3,
            seed=method.__len__(),
            progress=False,
        )
        finals.append(flat(m))
    assert all(torch.equal(finals[0], f) for f in finals[1:])


def test_epochs_zero_gives_epoch0_diagnostics_only():
    model, loss_fn, comps = least_squares()
    before = flat(model).clone()
    hist = fit(model, loss_fn, comps, "igc", lr=0.1, eta=0.5, epochs=0, progress=False)
    assert hist.steps == 0 and len(hist.rows) == 1 and hist.rows[0]["epoch"] == 0
    assert torch.equal(flat(model), before)


def test_rows_match_brute_force_statistics():
    model, loss_fn, comps = least_squares()
    hist = fit(
        model,
        loss_fn,
        comps,
        "igc",
        lr=0.05,
        eta=0.4,
        epochs=1,
        etas=(0.1, math.inf),
        progress=False,
    )
    row = hist.rows[-1]
    params = list(model.parameters())
    gs = []
    for i in range(comps.m):
        x, y = comps.batch(i)
        gs.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(x), y), params)])
        )
    G = torch.stack(gs)
    full = G.mean(0)
    n, d = G.norm(dim=1), G @ full
    cos = d / (n * full.norm())
    clipped = torch.minimum(n, torch.tensor(0.4, dtype=torch.float64)) * cos * full.norm()
    assert row["grad_norm"] == pytest.approx(float(full.norm()), rel=1e-12)
    assert row["c1"] == pytest.approx(float(cos.mean()), rel=1e-12)
    assert row["c2"] == pytest.approx(float(n.min() / n.max()), rel=1e-12)
    assert row["min_cos"] == pytest.approx(float(cos.min()), rel=1e-12)
    assert row["rho"] == pytest.approx(
        float(clipped.sum() / (comps.m * full.norm() ** 2)), rel=1e-12
    )
    assert row["rho@inf"] == pytest.approx(1.0, rel=1e-12)
    assert row["clipped_fraction"] == float((n > 0.4).double().mean())


def test_igc_drift_matches_brute_force():
    """igc_drift = Σ_i ⟨C(∇f_i(x_{k,i−1}); η) − C(∇f_i(x_k); η), ∇f_k⟩ (39), by hand."""
    model, loss_fn, comps = mlp()
    ref = copy.deepcopy(model)
    lr, eta = 0.2, 0.3
    hist = fit(model, loss_fn, comps, "igc", lr=lr, eta=eta, epochs=2, progress=False)
    params = list(ref.parameters())

    def grad(i):
        x, y = comps.batch(i)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(ref(x), y), params)])

    def C(g):
        n = g.norm()
        return g * min(1.0, eta / float(n)) if n > 0 else g

    for k in range(2):
        start = [grad(i) for i in range(comps.m)]
        full = torch.stack(start).mean(0)
        descent = sum(float(C(g) @ full) for g in start)
        moving = 0.0
        for i in range(comps.m):
            g = C(grad(i))
            moving += float(g @ full)
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.sub_(lr * g[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
        assert hist.rows[k]["igc_drift"] == pytest.approx(moving - descent, rel=1e-9, abs=1e-12)
    assert math.isnan(hist.rows[2]["igc_drift"])
    assert torch.allclose(flat(model), flat(ref), rtol=1e-12, atol=1e-14)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.rnn = nn.RNN(4, 5)
        self.out = nn.Linear(5, 11)

    def forward(self, inp, state):
        h, state = self.rnn(self.emb(inp), state)
        return self.out(h), state


def lm_loss(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("method", ["igc", "rr"])
def test_sequential_state_flows_under_igc_only(method):
    tokens = torch.randint(11, (60,), generator=torch.Generator().manual_seed(0))
    comps = SequentialComponents.from_tokens(tokens, batch_size=2, bptt=5)
    torch.manual_seed(0)
    model = TinyLM().double()
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    for order in hand_order(method, comps.m, 3, 2):
        state = None
        for i in order:
            x, y = comps.batch(i)
            out, new_state = ref(x, state if method == "igc" else None)
            grads = torch.autograd.grad(lm_loss(out, y), params)
            state = new_state.detach()
            n = float(grad_norm(grads))
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * (0.5 / n) if n > 0.5 else g, alpha=-0.3)
    fit(model, lm_loss, comps, method, lr=0.3, eta=0.5, epochs=2, seed=3, progress=False)
    assert torch.equal(flat(model), flat(ref))


def test_nonfinite_stops_fit():
    model, loss_fn, comps = least_squares()
    with pytest.raises(NonFiniteError, match="non-finite value at epoch"):
        fit(
            model,
            loss_fn,
            comps,
            "igc",
            lr=50.0,
            eta=math.inf,
            epochs=200,
            probe_every=0,
            progress=False,
        )
    assert torch.isfinite(flat(model)).all()


def test_nonfinite_parameters_stop_at_the_probe():
    model, loss_fn, comps = least_squares()
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="probe"):
        fit(model, loss_fn, comps, "igc", lr=0.1, eta=1.0, epochs=1, progress=False)


def test_step_schedule_recorded():
    model, loss_fn, comps = least_squares()
    hist = fit(
        model,
        loss_fn,
        comps,
        "igc",
        lr=0.1,
        epochs=3,
        schedule="step",
        milestones=(1, 2, 3),
        schedule_gamma=0.5,
        progress=False,
    )
    assert [r["lr"] for r in hist.rows] == [0.1, 0.05, 0.025, 0.0125]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"epochs": -1}, "epochs"),
        ({"probe_every": 1.5}, "probe_every"),
        ({"checkpoint_every": -2}, "checkpoint_every"),
        ({"lr": -1.0}, "lr"),
        ({"schedule": "linear"}, "schedule"),
        ({"etas": (0.1, -1.0)}, "eta"),
        ({"route": "dyadic"}, "route"),
        ({"dropout": "sometimes"}, "dropout"),
        ({"optimizer_switch": "asgd"}, "optimizer_switch"),
        ({"optimizer_switch": "nt-asgd", "nonmono": 0, "heldout": float}, "nonmono"),
        ({"optimizer_switch": "nt-asgd"}, "heldout"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum.*betas"),
        ({"optimizer": "adamw", "betas": (0.9, 1.0)}, "betas"),
        ({"optimizer": "adamw", "betas": (0.9,)}, "betas"),
        ({"optimizer": "adam", "eps": 0.0}, "eps"),
        ({"optimizer": "adam", "weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.5, 0.9)}, "betas.*optimizer = 'sgd'"),
        ({"eps": 1e-6}, "eps.*optimizer = 'sgd'"),
        ({"optimizer": "adamw", "optimizer_switch": "nt-asgd", "heldout": float}, "NT-ASGD"),
    ],
)
def test_bad_arguments_raise_before_training(kwargs, match):
    model, loss_fn, comps = least_squares()
    before = flat(model).clone()
    with pytest.raises(ValueError, match=match):
        fit(model, loss_fn, comps, "igc", **{"lr": 0.1, **kwargs}, progress=False)
    assert torch.equal(flat(model), before)


# -- NT-ASGD -----------------------------------------------------------------------


def reference_switch_epoch(values, nonmono):
    """salesforce/awd-lstm-lm main.py: after epoch e (1-based) with val_loss = values[e-1]."""
    best_val_loss = []
    for epoch, val_loss in enumerate(values, start=1):
        if len(best_val_loss) > nonmono and val_loss > min(best_val_loss[:-nonmono]):
            return epoch
        best_val_loss.append(val_loss)
    return None


@pytest.mark.parametrize(
    "values,nonmono,expected",
    [
        ([5.0, 4.0, 4.5, 3.9, 4.2, 4.05], 2, 5),  # 4.2 > min(5, 4)
        ([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], 2, None),  # improving: never
        ([5.0, 6.0, 7.0], 1, 3),  # 7 > 5; at epoch 2 only one earlier value
        ([3.0, 9.0, 9.0, 9.0, 9.0], 3, 5),  # needs more than 3 earlier values
        ([3.0, 3.0, 3.0], 1, None),  # not worse: equal does not trigger
    ],
)
def test_nt_asgd_trigger_follows_the_reference_rule(values, nonmono, expected):
    got = next(
        (
            k
            for k in range(1, len(values) + 1)
            if nt_asgd_switch(values[: k - 1], values[k - 1], nonmono)
        ),
        None,
    )
    assert got == reference_switch_epoch(values, nonmono) == expected


def test_nt_asgd_averages_the_iterates_after_the_trigger(tmp_path):
    """Hand-made held-out sequence (no probes): switch at x_5; x̄ = mean of the later iterates."""
    values = iter([5.0, 4.0, 4.5, 3.9, 4.2])  # switch at k = 5: 4.2 > min(5, 4)
    model, loss_fn, comps = least_squares()
    plain = copy.deepcopy(model)
    iterates, messages = [], []
    hist = fit(
        model, loss_fn, comps, "igc", lr=0.05, eta=0.5, epochs=7, probe_every=0,
        heldout=lambda m: next(values), optimizer_switch="nt-asgd", nonmono=2,
        run_dir=tmp_path / "run", progress=False, log=messages.append,
        on_step=lambda step, i, norm: iterates.append((step, flat(model).clone())),
    )  # fmt: skip
    assert any("NT-ASGD: held-out 4.2 at epoch 5" in m for m in messages)
    m = comps.m
    after = torch.stack([x for step, x in iterates if step > 5 * m])
    assert len(after) == 2 * m and hist.steps == 7 * m
    averaged = torch.load(tmp_path / "run" / "averaged_model.pt", weights_only=True)
    torch.testing.assert_close(averaged["weight"].reshape(-1), after.mean(0), rtol=1e-13, atol=0)
    # the training trajectory is plain IGC-clip: the switch changes nothing in it
    fit(plain, loss_fn, comps, "igc", lr=0.05, eta=0.5, epochs=7, probe_every=0, progress=False)
    assert torch.equal(flat(plain), flat(model))


def test_nt_asgd_rows_record_heldout_at_the_average():
    model, loss_fn, comps = least_squares()
    steps = []

    def heldout(model):  # -f(x): rises while training lowers f, so the switch comes early
        with torch.no_grad():
            return -sum(float(loss_fn(model(x), y)) for x, y in comps)

    hist = fit(
        model, loss_fn, comps, "rr", lr=0.05, eta=0.5, epochs=6, heldout=heldout,
        optimizer_switch="nt-asgd", nonmono=1, progress=False,
        on_step=lambda step, i, norm: steps.append(flat(model).clone()),
    )  # fmt: skip
    active = hist.column("asgd_active")
    assert set(active) == {0.0, 1.0} and np.all(np.diff(active) >= 0)
    start = int(np.argmax(active))  # the switch epoch: averaging from its first step
    assert start < len(hist.rows) - 2  # rows after it check x̄ over one and several epochs
    m = comps.m
    for k, row in enumerate(hist.rows):
        if k <= start:
            assert math.isnan(row["heldout_avg"])
            continue
        xbar = torch.stack(steps[start * m : k * m]).mean(0)
        probe = copy.deepcopy(model)
        with torch.no_grad():
            probe.weight.copy_(xbar.reshape(probe.weight.shape))
        assert row["heldout_avg"] == pytest.approx(heldout(probe), rel=1e-12)
        assert row["heldout"] != row["heldout_avg"]
