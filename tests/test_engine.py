import pytest
import torch
from torch import nn

from cases import CASE_IDS, CASES, TinyLM, by_id, lm_loss, mlp
from clipscope.components import Components
from clipscope.engine import (
    batch_coupled_modules,
    component_losses,
    dropout_modules,
    model_guard,
    trainable_params,
)


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
