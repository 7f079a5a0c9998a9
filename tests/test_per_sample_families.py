"""Each layer family's rules against the float64 brute force, one module at a time.

For every (family, module option) below, one hooked forward and backward records
the module's calls (:func:`record_calls`); then the family's rules must give

* ``per_sample``: the per-sample ``‖g_j(p)‖²`` of each of its parameters and the
  projection of ``Σ_j g_j(p)`` on the structural check's directions,
* ``dots``: ``⟨g_j, v⟩`` over its parameters for a random v,
* ``factors``: the kept form of the factor-keeping route, giving the same norms,
  projections and dots, and the weighted sums ``Σ_j w_j g_j(p)`` of the clipped sums,

equal to the same quantities from each sample's own float64 autograd call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipscope.engine.per_sample import FAMILIES, Plan, per_sample_grads_reference
from clipscope.engine.per_sample.ghost import record_calls
from zoo import Conv1D, SelfAttend


class Head(nn.Module):
    """``module`` followed by a fixed random readout to 3 classes (so b is generic)."""

    def __init__(self, module: nn.Module, features: int, unpack: bool, seq_first: bool) -> None:
        super().__init__()
        self.module = module
        self.unpack = unpack
        self.seq_first = seq_first
        self.register_buffer("readout", torch.randn(features, 3))

    def forward(self, x):
        h = self.module(x.transpose(0, 1) if self.seq_first else x)
        if self.unpack:
            h = h[0]
        if self.seq_first:
            h = h.transpose(0, 1)
        return torch.tanh(h).reshape(h.shape[0], -1) @ self.readout.to(h.dtype)


class Twice(nn.Module):
    """The same module called twice (its calls' factors add up)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(x)))


@dataclass(frozen=True)
class Layer:
    id: str
    family: str
    module_fn: Callable[[], nn.Module]
    x_fn: Callable[[torch.Generator], torch.Tensor]
    features: int
    unpack: bool = False
    seq_first: bool = False


def _f(*shape):
    return lambda g: torch.randn(4, *shape, generator=g, dtype=torch.float64)


def _i(high, *shape):
    return lambda g: torch.randint(0, high, (4, *shape), generator=g)


LAYERS = [
    Layer("linear", "linear", lambda: nn.Linear(5, 3), _f(5), 3),
    Layer("linear-sequence-ghost", "linear", lambda: nn.Linear(9, 8), _f(3, 9), 24),
    Layer("linear-sequence-materialized", "linear", lambda: nn.Linear(2, 2), _f(6, 2), 12),
    Layer("linear-no-bias-4d", "linear", lambda: nn.Linear(3, 2, bias=False), _f(2, 2, 3), 8),
    Layer("conv1d-zeros", "conv", lambda: nn.Conv1d(2, 3, 3, padding=1), _f(2, 6), 18),
    Layer(
        "conv1d-same-circular",
        "conv",
        lambda: nn.Conv1d(2, 2, 4, padding="same", padding_mode="circular"),
        _f(2, 5),
        10,
    ),
    Layer(
        "conv2d-valid-groups",
        "conv",
        lambda: nn.Conv2d(4, 2, 2, padding="valid", groups=2),
        _f(4, 3, 3),
        8,
    ),
    Layer(
        "conv2d-reflect-stride-dilation",
        "conv",
        lambda: nn.Conv2d(2, 3, 3, padding=2, stride=2, dilation=2, padding_mode="reflect"),
        _f(2, 5, 5),
        27,
    ),
    Layer(
        "conv2d-wide-materialized",
        "conv",
        lambda: nn.Conv2d(8, 2, 3, padding="same"),
        _f(8, 4, 4),
        32,
    ),
    Layer(
        "conv2d-kept-raw-factors",  # 576 weights > 64 input + output numbers per sample
        "conv",
        lambda: nn.Conv2d(8, 8, 3, padding=1),
        _f(8, 2, 2),
        32,
    ),
    Layer(
        "conv1d-kept-raw-factors-two-calls",
        "conv",
        lambda: Twice(nn.Conv1d(6, 6, 3, padding=1, padding_mode="reflect")),
        _f(6, 3),
        18,
    ),
    Layer(
        "conv3d-replicate",
        "conv",
        lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="replicate"),
        _f(2, 2, 2, 2),
        54,
    ),
    Layer(
        "conv-transpose1d-output-padding",
        "conv",
        lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, output_padding=1, groups=2),
        _f(2, 3),
        32,
    ),
    Layer(
        "conv-transpose2d",
        "conv",
        lambda: nn.ConvTranspose2d(2, 2, 2, stride=2, padding=1),
        _f(2, 3, 3),
        32,
    ),
    Layer(
        "conv-transpose2d-kept-raw-factors",  # 144 weights > 80 numbers per sample
        "conv",
        lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),
        _f(4, 2, 2),
        64,
    ),
    Layer(
        "conv-transpose3d-dilation",
        "conv",
        lambda: nn.ConvTranspose3d(1, 2, 2, dilation=2),
        _f(1, 2, 2, 2),
        2 * 4 * 4 * 4,
    ),
    Layer("embedding", "embedding", lambda: nn.Embedding(5, 3), _i(5, 6), 18),
    Layer(
        "embedding-padding-idx",
        "embedding",
        lambda: nn.Embedding(5, 3, padding_idx=1),
        _i(5, 6),
        18,
    ),
    Layer(
        "embedding-max-norm", "embedding", lambda: nn.Embedding(5, 3, max_norm=0.5), _i(5, 6), 18
    ),
    Layer("embedding-sparse", "embedding", lambda: nn.Embedding(5, 3, sparse=True), _i(5, 6), 18),
    Layer("layernorm", "norm", lambda: nn.LayerNorm(4), _f(3, 4), 12),
    Layer("layernorm-2d-no-bias", "norm", lambda: nn.LayerNorm((3, 4), bias=False), _f(3, 4), 12),
    Layer("rmsnorm", "norm", lambda: nn.RMSNorm(4, eps=1e-3), _f(3, 4), 12),
    Layer("groupnorm", "norm", lambda: nn.GroupNorm(2, 4), _f(4, 3), 12),
    Layer("instancenorm-affine", "norm", lambda: nn.InstanceNorm1d(3, affine=True), _f(3, 5), 15),
    Layer("batchnorm-eval", "norm", lambda: nn.BatchNorm1d(3).eval(), _f(3), 3),
    Layer(
        "multihead-attention",
        "multihead-attention",
        lambda: SelfAttend(nn.MultiheadAttention(3, 1, batch_first=True)),
        _f(4, 3),
        12,
    ),  # every option: tests/test_per_sample_attention.py
    Layer("hf-conv1d", "hf-conv1d", lambda: Conv1D(8, 6), _f(3, 6), 24),
    Layer("hf-conv1d-materialized", "hf-conv1d", lambda: Conv1D(2, 2), _f(6, 2), 12),
    Layer("hf-conv1d-one-token", "hf-conv1d", lambda: Conv1D(3, 5), _f(5), 3),
    Layer(
        "lstm-2-layers",
        "lstm",
        lambda: nn.LSTM(3, 2, num_layers=2, batch_first=True),
        _f(4, 3),
        8,
        unpack=True,
    ),
    Layer(
        "lstm-seq-first", "lstm", lambda: nn.LSTM(3, 2), _f(5, 3), 10, unpack=True, seq_first=True
    ),
    Layer(
        "gru-loop",
        "rnn-loop",
        lambda: nn.GRU(3, 2, batch_first=True, bidirectional=True),
        _f(4, 3),
        16,
        unpack=True,
    ),
    Layer(
        "lstm-proj-loop",
        "rnn-loop",
        lambda: nn.LSTM(3, 4, proj_size=2, batch_first=True),
        _f(4, 3),
        8,
        unpack=True,
    ),
]


def _build(layer: Layer):
    torch.manual_seed(0)
    model = Head(layer.module_fn(), layer.features, layer.unpack, layer.seq_first).double()
    gen = torch.Generator().manual_seed(1)
    x = layer.x_fn(gen)
    if layer.family == "norm" and isinstance(model.module, nn.BatchNorm1d):
        with torch.no_grad():
            model.module.running_mean.uniform_(-1, 1)
            model.module.running_var.uniform_(0.5, 2)
    y = torch.randint(0, 3, (x.shape[0],), generator=gen)
    return model, x, y


@pytest.mark.parametrize("layer", LAYERS, ids=[c.id for c in LAYERS])
def test_family_rules_match_brute_force(layer: Layer):
    model, x, y = _build(layer)
    plan = Plan(model)
    assert not plan.fallback, plan.fallback
    served = record_calls(model, F.cross_entropy, x, y, plan)
    (mod, family, attrs, calls) = served["module.inner" if "module.inner" in served else "module"]
    assert family.name == layer.family
    params = [mod.get_parameter(a) for a in attrs]
    rows = per_sample_grads_reference(model, F.cross_entropy, x, y, params)
    sizes = [p.numel() for p in params]
    per_param = dict(zip(attrs, torch.split(rows, sizes, dim=1), strict=True))
    dirs = {a: plan.directions[plan.index[id(mod.get_parameter(a))]] for a in attrs}
    ghost = family.per_sample(mod, calls, attrs, x.shape[0], dirs)
    totals = family.batch_grad(mod, calls, attrs, x.shape[0])
    for a in attrs:
        G = per_param[a]
        torch.testing.assert_close(ghost[a].sq, G.square().sum(1), rtol=1e-10, atol=1e-14)
        total = G.sum(0).reshape(mod.get_parameter(a).shape)
        torch.testing.assert_close(ghost[a].proj, dirs[a].of_tensor(total), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(totals[a].double(), total, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(2)
    vectors = {
        a: torch.randn(mod.get_parameter(a).shape, generator=gen, dtype=torch.float64)
        for a in attrs
    }
    flat = torch.cat([vectors[a].reshape(-1) for a in attrs])
    dots = family.dots(mod, calls, attrs, vectors, x.shape[0])
    torch.testing.assert_close(dots, rows @ flat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", LAYERS, ids=[c.id for c in LAYERS])
def test_family_factors_match_brute_force(layer: Layer):
    """The kept form: norms, projections, dots and γ-weighted sums, all from the factors."""
    model, x, y = _build(layer)
    plan = Plan(model)
    served = record_calls(model, F.cross_entropy, x, y, plan)
    (mod, family, attrs, calls) = served["module.inner" if "module.inner" in served else "module"]
    params = [mod.get_parameter(a) for a in attrs]
    rows = per_sample_grads_reference(model, F.cross_entropy, x, y, params)
    B = x.shape[0]
    per_param = dict(zip(attrs, torch.split(rows, [p.numel() for p in params], dim=1), strict=True))
    dirs = {a: plan.directions[plan.index[id(mod.get_parameter(a))]] for a in attrs}
    kept = family.factors(mod, calls, attrs, B)
    assert set(kept.names) == set(attrs)
    assert kept.nbytes > 0
    ghost = kept.ghost(attrs, dirs)
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand(2, B, generator=gen, dtype=torch.float64)
    vectors = {
        a: torch.randn(mod.get_parameter(a).shape, generator=gen, dtype=torch.float64)
        for a in attrs
    }
    for a in attrs:
        G, shape = per_param[a], mod.get_parameter(a).shape
        torch.testing.assert_close(ghost[a].sq, G.square().sum(1), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(kept.sq(a), G.square().sum(1), rtol=1e-10, atol=1e-14)
        total = G.sum(0).reshape(shape)
        torch.testing.assert_close(ghost[a].proj, dirs[a].of_tensor(total), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            kept.weighted(a, weights), (weights @ G).reshape(2, *shape), rtol=1e-10, atol=1e-12
        )
        one = kept.dots({a: vectors[a]})
        torch.testing.assert_close(one, G @ vectors[a].reshape(-1), rtol=1e-10, atol=1e-12)
    flat = torch.cat([vectors[a].reshape(-1) for a in attrs])
    torch.testing.assert_close(kept.dots(vectors), rows @ flat, rtol=1e-10, atol=1e-12)


def test_kept_forms_are_the_smaller_ones():
    """Convolutions keep raw factors or per-sample weights, whichever holds fewer numbers."""
    from clipscope.engine.per_sample import factors
    from clipscope.engine.per_sample.conv import ConvFactors
    from clipscope.engine.per_sample.factors import Rows

    def kept_weight(layer_id):
        layer = next(c for c in LAYERS if c.id == layer_id)
        model, x, y = _build(layer)
        plan = Plan(model)
        mod, family, attrs, calls = record_calls(model, F.cross_entropy, x, y, plan)["module"]
        return family.factors(mod, calls, attrs, x.shape[0]).owner["weight"]

    assert isinstance(kept_weight("conv2d-kept-raw-factors"), ConvFactors)
    assert isinstance(kept_weight("conv-transpose2d-kept-raw-factors"), ConvFactors)
    assert isinstance(kept_weight("conv2d-wide-materialized"), Rows)
    assert isinstance(kept_weight("linear-sequence-materialized"), Rows)
    assert isinstance(kept_weight("hf-conv1d-materialized"), Rows)
    assert isinstance(kept_weight("hf-conv1d"), factors.Tokens)


def test_every_family_is_tested():
    assert {f.name for f in FAMILIES} == {layer.family for layer in LAYERS}


def test_subclass_with_its_own_forward_is_not_claimed():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    linear = next(f for f in FAMILIES if f.name == "linear")
    assert linear.claims(nn.Linear(2, 2))
    assert linear.claims(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))
    assert not linear.claims(Scaled(2, 2))
    embedding = next(f for f in FAMILIES if f.name == "embedding")
    assert not embedding.claims(nn.Embedding(3, 2, scale_grad_by_freq=True))


@pytest.mark.parametrize("P, Q", [(3, 5), (5, 3)])
def test_tokens_weighted_in_groups_equals_the_brute_force(monkeypatch, P, Q):
    """Several rows of weights at once, in groups when they would not fit one product."""
    from clipscope.engine.per_sample import factors

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, P, dtype=torch.float64, generator=gen)
    b = torch.randn(4, 3, Q, dtype=torch.float64, generator=gen)
    w = torch.rand(5, 4, dtype=torch.float64, generator=gen)
    G = torch.einsum("btq,btp->bqp", b, a)  # per-sample gradients (4, Q, P)
    want = torch.einsum("eb,bqp->eqp", w, G)
    tokens = factors.Tokens(a, b, weight="w", shape=(Q, P))
    torch.testing.assert_close(tokens.weighted("w", w), want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(factors, "CHUNK_ELEMENTS", 2 * 4 * 3 * min(P, Q))  # two rows a group
    torch.testing.assert_close(tokens.weighted("w", w), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_in_float64_blocks_equal_the_whole_and_leave_the_rows_alone(monkeypatch, dtype):
    from clipscope.engine.per_sample import factors

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(5, 2, 3, dtype=dtype, generator=gen)
    v = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    w = torch.rand(3, 5, dtype=torch.float64, generator=gen)
    kept = G.clone()
    monkeypatch.setattr(factors, "_BLOCK", 12)  # two rows a block: three blocks
    rows = factors.Rows({"w": G})
    flat = G.double().reshape(5, -1)
    torch.testing.assert_close(rows.sq("w"), flat.square().sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(rows.dots({"w": v}), flat @ v.reshape(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        rows.weighted("w", w), (w @ flat).reshape(3, 2, 3), rtol=1e-12, atol=1e-14
    )
    assert torch.equal(rows.rows["w"], kept.to(rows.rows["w"].dtype))  # nothing squared in place
