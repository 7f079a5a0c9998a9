"""Any dataset, two loss forms: dict batches stay dicts; the form rule is explicit; routes agree.

Every route run with a ``loss(model, batch)`` on a dataset of dicts is compared with the
float64 brute force of the same problem in the ``(output, target)`` form on tensors.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from clipscope import fit, probe
from clipscope.components import Components, SequentialComponents
from clipscope.engine import reference_probe
from clipscope.engine.losses import check_loss_fn, loss_form
from clipscope.run.directory import TIMING_COLUMNS

F64 = torch.float64


def regression(n=22, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=F64)
    noise = 0.3 * torch.randn(n, generator=gen, dtype=F64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + noise
    return X, Y


def model_fn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def mse_of_batch(model, batch):
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


class Dicts(Dataset):
    """A map-style dataset of dicts (what a tokenized Hugging Face dataset gives)."""

    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, j):
        return {"x": self.X[j], "y": self.Y[j]}


# -- the rule -------------------------------------------------------------------------


def _kw_model_batch(model, batch, *, scale=1.0):
    return scale


class Callable2:
    def __call__(self, model, batch):
        return 0


RULE_CASES = [
    (lambda model, batch: 0, "model_batch", "lambda"),
    (_kw_model_batch, "model_batch", "keyword-only extras"),
    (functools.partial(_kw_model_batch, scale=2.0), "model_batch", "partial"),
    (Callable2(), "model_batch", "callable object"),
    (mse, "output_target", "output-target"),
    (lambda out, y: 0, "output_target", "other names"),
    (lambda batch, model: 0, "output_target", "other order"),
    (F.cross_entropy, "output_target", "torch functional"),
    (nn.MSELoss(), "output_target", "loss module"),
    (lambda *args: 0, "output_target", "varargs"),
    (lambda m, b: 0, "output_target", "short names"),
]
RULE_IDS = [c[2] for c in RULE_CASES]


@pytest.mark.parametrize(("fn", "form"), [c[:2] for c in RULE_CASES], ids=RULE_IDS)
def test_the_form_follows_the_parameter_names_only(fn, form):
    assert loss_form(fn) == form


@pytest.mark.parametrize("fn", [lambda model, x: 0, lambda model: 0], ids=["(model, x)", "(model)"])
def test_a_first_parameter_named_model_without_batch_is_ambiguous(fn):
    with pytest.raises(TypeError, match="ambiguous"):
        loss_form(fn)
    with pytest.raises(TypeError, match=r"not callable|callable"):
        loss_form(3)


def test_mismatches_are_clear_errors():
    X, Y = regression()
    dicts = Components.from_dataset(Dicts(X, Y), batch_size=5)
    pairs = Components.from_tensors(X, Y, batch_size=5)
    with pytest.raises(TypeError, match=r"mapping\[x, y\].*\(model, batch\)"):
        check_loss_fn(mse, dicts)
    with pytest.raises(TypeError, match=r"not \(x, y\) pairs"):
        probe(model_fn(), mse, dicts)
    with pytest.raises(ValueError, match=r"per-sample route needs loss_fn\(output, target\)"):
        probe(model_fn(), mse_of_batch, dicts, route="per-sample")
    with pytest.raises(ValueError, match="per-sample"):  # route="auto" does not pick it
        probe(model_fn(), mse_of_batch, dicts, batch_sizes=[1])
    tokens = SequentialComponents.from_tokens(torch.arange(40), batch_size=2, bptt=4)
    with pytest.raises(ValueError, match="sequential"):
        check_loss_fn(lambda model, batch: 0, tokens)
    # the form is decided by the names: a (model, batch) function on pairs is called so
    assert check_loss_fn(lambda model, batch: 0, pairs) == "model_batch"


def test_an_error_inside_the_model_names_the_component_and_the_form():
    X, Y = regression()
    dicts = Components.from_dataset(Dicts(X, Y), batch_size=5)

    def bad(model, batch):
        return model(batch["z"]).sum()

    with pytest.raises(KeyError) as info:
        probe(model_fn(), bad, dicts)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "component 0" in notes and "loss_fn(model, batch)" in notes

    with pytest.raises(ValueError, match=r"scalar tensor.*\(5,\).*loss_fn\(model, batch\)"):
        probe(model_fn(), lambda model, batch: model(batch["x"]).squeeze(-1), dicts)


# -- Components.from_dataset ----------------------------------------------------------


def test_a_dataset_of_dicts_stays_dicts_never_a_tuple_of_keys():
    X, Y = regression(n=10)
    comps = Components.from_dataset(Dicts(X, Y), batch_size=4, seed=3)
    ref = Components.from_tensors(X, Y, batch_size=4, seed=3)
    assert comps.batch_structure == "mapping" and comps.m == 3
    for i in range(comps.m):
        batch = comps.batch(i)
        assert isinstance(batch, dict) and set(batch) == {"x", "y"}
        x, y = ref.batch(i)
        assert torch.equal(batch["x"], x) and torch.equal(batch["y"], y)
    d = comps.describe()
    assert d["batch"] == "mapping[x, y]" and d["collate"].endswith("default_collate")
    assert torch.equal(comps.state_dict()["order"], ref.order)


def test_tuples_tensors_and_a_collate_fn():
    X, Y = regression(n=9)
    pairs = Components.from_dataset(TensorDataset(X, Y), batch_size=4)
    assert pairs.batch_structure == "pair" and isinstance(pairs.batch(0), tuple)
    single = Components.from_dataset(TensorDataset(X), batch_size=4)
    assert single.batch_structure == "sequence"  # a 1-tuple item: neither a pair nor a dict
    tensors = Components.from_dataset(list(X), batch_size=4)
    assert tensors.batch_structure == "tensor" and tensors.batch(2).shape == (1, 3)

    def stack_x(items):
        return {"inputs": torch.stack([x for x, _ in items]), "n": len(items)}

    custom = Components.from_dataset(TensorDataset(X, Y), batch_size=4, collate_fn=stack_x)
    assert custom.batch(1)["n"] == 4 and custom.batch_structure == "mapping"
    assert "stack_x" in custom.describe()["collate"]


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


class Growing(Dicts):
    def __len__(self):
        return len(self.X) + self.extra

    extra = 0


def test_bad_datasets_are_refused_at_construction():
    with pytest.raises(TypeError, match="map-style"):
        Components.from_dataset(Stream(), batch_size=2)
    with pytest.raises(TypeError, match="collate_fn"):
        Components.from_dataset([torch.ones(1)], batch_size=1, collate_fn=3)
    ids = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]} for _ in range(4)]
    with pytest.raises(TypeError, match=r"'input_ids'.*list of 3 numbers.*set_format"):
        Components.from_dataset(ids, batch_size=2)
    with pytest.raises(TypeError, match="cannot be collated"):
        Components.from_dataset([object()] * 3, batch_size=2)
    with pytest.raises(ValueError, match="m = 0"):
        Components.from_dataset([], batch_size=2)


def test_a_dataset_whose_length_changes_is_refused():
    X, Y = regression(n=8)
    data = Growing(X, Y)
    comps = Components.from_dataset(data, batch_size=4)
    comps.batch(0)
    data.extra = 1
    with pytest.raises(ValueError, match=r"9 items now.*made from 8"):
        comps.batch(0)


# -- the same answers through every path ------------------------------------------------


@pytest.mark.parametrize("route", ["two-pass", "keep", "dyadic"])
def test_routes_with_a_model_batch_loss_match_the_float64_brute_force(route):
    X, Y = regression(n=23)
    dicts = Components.from_dataset(Dicts(X, Y), batch_size=3, seed=1)
    pairs = Components.from_tensors(X, Y, batch_size=3, seed=1)
    model = model_fn()
    etas = (0.5, math.inf)
    ref = reference_probe(model, mse, pairs, etas=etas)
    kw = {"levels": 2} if route == "dyadic" else {}
    got = probe(model, mse_of_batch, dicts, etas=etas, route=route, **kw)
    got = got[3] if route == "dyadic" else got
    assert got.route == route
    np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-12)
    np.testing.assert_allclose(got.dots, ref.dots, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-12)
    assert got.grad_norm == pytest.approx(ref.grad_norm, rel=1e-12)
    for eta in etas:
        assert got.clipped[eta][0] == pytest.approx(ref.clipped[eta][0], rel=1e-10)


def test_fit_on_a_dataset_of_dicts_equals_fit_on_tensors():
    X, Y = regression(n=20)
    a, b = model_fn(), model_fn()
    kw = {"lr": 0.05, "eta": 0.5, "epochs": 2, "progress": False}
    ha = fit(a, mse, Components.from_tensors(X, Y, batch_size=4, seed=2), "rr", **kw)
    hb = fit(b, mse_of_batch, Components.from_dataset(Dicts(X, Y), 4, seed=2), "rr", **kw)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    for ra, rb in zip(ha.rows, hb.rows, strict=True):
        for key, value in ra.items():
            if key not in TIMING_COLUMNS:
                assert value == rb[key] or (math.isnan(value) and math.isnan(rb[key]))


def test_fit_refuses_a_form_that_does_not_fit_before_any_step(tmp_path):
    X, Y = regression(n=8)
    model = model_fn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"not \(x, y\) pairs"):
        fit(model, mse, Components.from_dataset(Dicts(X, Y), 4), "igc", lr=0.1,
            run_dir=tmp_path / "run", progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hessian_vector_products_take_a_model_batch_loss():
    from clipscope.smoothness import hessian_norm

    X, Y = regression(n=12)
    model = model_fn()
    dicts = Components.from_dataset(Dicts(X, Y), batch_size=4, seed=0)
    pairs = Components.from_tensors(X, Y, batch_size=4, seed=0)
    a = hessian_norm(model, mse_of_batch, dicts, tol=1e-10, max_iter=40)
    b = hessian_norm(model, mse, pairs, tol=1e-10, max_iter=40)
    assert a.hess_norm == pytest.approx(b.hess_norm, rel=1e-10)
