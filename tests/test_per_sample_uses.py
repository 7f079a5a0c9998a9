"""Use rules (parameters met outside a module rule) against the float64 brute force.

A model runs once under :class:`UseRecorder` with no module rule active, so
every parameter is seen through its uses (``F.linear`` inside ``nn.Linear``
included); after one backward of ``Σ_j ℓ_j`` the per-parameter kept forms,
summed over the uses with :class:`Summed`, must give each sample's squared
norm, dots with a random vector, γ-weighted sums and the batch gradient of
each sample's own float64 autograd call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from clipscope.engine.per_sample.batch import per_sample_from_output
from clipscope.engine.per_sample.embedding import EmbeddingFactors
from clipscope.engine.per_sample.factors import Rows, Tokens
from clipscope.engine.per_sample.summed import Summed, cross
from clipscope.engine.per_sample.uses import UseRecorder


# -- models -------------------------------------------------------------------------------
class HandRMSNorm(nn.Module):
    """Llama's RMSNorm as people write it: ``weight * x * rsqrt(mean(x²) + eps)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class ViT(nn.Module):
    """Patch projection, class and register tokens, position table, RMSNorm, LayerScale."""

    def __init__(self, patch=6, d=8, n=4) -> None:
        super().__init__()
        self.patch = nn.Linear(patch, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.reg = nn.Parameter(torch.randn(d))  # expanded with new leading dims
        self.pos = nn.Parameter(torch.randn(1, n + 2, d))
        self.norm = HandRMSNorm(d)
        self.gamma = nn.Parameter(torch.randn(d))
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.patch(x)
        B = h.shape[0]
        h = torch.cat([self.cls.expand(B, -1, -1), self.reg.expand(B, 1, -1), h], 1) + self.pos
        h = h + self.gamma * torch.tanh(self.fc(self.norm(h)))
        h = h + self.reg.expand(h.shape[1], -1)  # broadcast over the samples, new leading dim
        return self.head(h[:, 0])


class TiedLM(nn.Module):
    """Embedding tied to the output projection, ``wpe(arange(T))``, F.layer_norm, ``@ W.T``."""

    def __init__(self, vocab=11, d=6, t=7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.wpe = nn.Embedding(t, d)
        self.ln_w = nn.Parameter(torch.randn(d))
        self.ln_b = nn.Parameter(torch.randn(d))
        self.W = nn.Parameter(torch.randn(d, d))

    def forward(self, ids):
        h = self.emb(ids) + self.wpe(torch.arange(ids.shape[1]))
        h = F.layer_norm(h, (h.shape[-1],), self.ln_w, self.ln_b)
        h = torch.tanh(h @ self.W.T) - 0.5 * h
        return F.linear(h, self.emb.weight)


class Odd(nn.Module):
    """``sub`` with alpha, ``x @ W``, ``add`` with alpha, a derived scale, stack, in-place mul."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(3, 3))
        self.c = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        h = torch.sub(x, self.a, alpha=2.0)
        h = h @ self.b
        h = torch.add(self.a, h, alpha=3.0) * self.a.sin()
        h = torch.stack([h, self.c[0].expand(h.shape[0], 3)], 1)
        h = h.clone()
        h.mul_(self.c[1])
        return h.sum((1, 2))


class Unserved(nn.Module):
    """Uses no rule serves: einsum, atan2, samples moved off dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.c = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.einsum("bi,ij->bj", x, self.a)
        h = (h.t() + self.b[:, None]).t()
        return torch.atan2(h, self.c).sum(1)


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class Case:
    id: str
    model_fn: Callable[[], nn.Module]
    data_fn: Callable[[torch.Generator], tuple]
    loss_fn: Callable
    kinds: dict  # parameter name -> kept forms expected, in order


def _lm_data(g):
    ids = torch.randint(0, 11, (4, 7), generator=g)
    ids[0, :3] = 0  # padding tokens
    return ids, torch.randint(0, 11, (4, 7), generator=g)


CASES = [
    Case(
        "vit",
        ViT,
        lambda g: (torch.randn(5, 4, 6, generator=g), torch.randint(0, 3, (5,), generator=g)),
        F.cross_entropy,
        {
            "cls": ["Rows"],
            "reg": ["Rows", "Rows"],
            "pos": ["Rows"],
            "norm.weight": ["Rows"],
            "gamma": ["Rows"],
            "patch.weight": ["Tokens"],
            "fc.bias": ["Tokens"],
        },
    ),
    Case(
        "tied-lm",
        TiedLM,
        _lm_data,
        lm_loss,
        {
            "emb.weight": ["EmbeddingFactors", "Tokens"],
            "wpe.weight": ["EmbeddingFactors"],
            "ln_w": ["Rows"],
            "W": ["Tokens"],
        },
    ),
    Case(
        "odd",
        Odd,
        lambda g: (torch.randn(6, 3, generator=g), torch.randn(6, generator=g)),
        F.mse_loss,
        {"a": ["Rows", "Rows", "Rows"], "b": ["Tokens"], "c": ["Rows", "Rows"]},
    ),
    Case(
        "odd-one-sample",
        Odd,
        lambda g: (torch.randn(1, 3, generator=g), torch.randn(1, generator=g)),
        F.mse_loss,
        {"b": ["Tokens"]},
    ),
]


# -- the brute force -----------------------------------------------------------------------
def brute_force(model, loss_fn, x, y, params):
    """Each sample's own float64 gradient, ``(B, *shape)`` per parameter."""
    rows = []
    for j in range(x.shape[0]):
        loss = loss_fn(model(x[j : j + 1]), y[j : j + 1])
        rows.append(torch.autograd.grad(loss, params, allow_unused=True))
    return [
        torch.stack([r[k] if r[k] is not None else torch.zeros_like(p) for r in rows])
        for k, p in enumerate(params)
    ]


def recorded(model, loss_fn, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rec = UseRecorder(params, x.shape[0])
    rec.mark_data(x)
    with rec:
        out = model(x)
    losses = per_sample_from_output(loss_fn, out, y, x.shape[0])
    actual = torch.autograd.grad(
        losses.sum(), params, retain_graph=rec.needs_graph, allow_unused=True
    )
    parts, problems = rec.parts()
    return params, actual, parts, problems


def assert_close(got, want, scale, rtol=1e-10):
    err = float((got - want).abs().max())
    assert err <= rtol * float(scale) + 1e-300, (err, float(scale))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_uses_equal_the_brute_force(case):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.model_fn().double()
    x, y = case.data_fn(g)
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    params, actual, parts, problems = recorded(model, case.loss_fn, x, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not problems, problems
    ref = brute_force(model, case.loss_fn, x, y, params)
    B = x.shape[0]
    for k, p in enumerate(params):
        kept = Summed(parts[k], "p", p.shape, B)
        G = ref[k].reshape(B, -1)
        assert_close(kept.sq("p"), (G * G).sum(1), (G * G).sum(1).max())
        v = torch.randn_like(p)
        scale = G.norm(dim=1).max() * v.norm()
        assert_close(kept.dots({"p": v}), G @ v.reshape(-1), scale)
        w = torch.rand(3, B, dtype=torch.float64, generator=g)
        assert_close(kept.weighted("p", w).reshape(3, -1), w @ G, (w @ G).abs().max())
        assert_close(G.sum(0), actual[k].reshape(-1), G.abs().max())
    for name, kinds in case.kinds.items():
        k = names.index(name)
        assert [type(f).__name__ for f, _ in parts[k]] == kinds, name


def test_float32_uses_match_the_float64_brute_force():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = TiedLM()
    x, y = _lm_data(g)
    params, _, parts, problems = recorded(model, lm_loss, x, y)
    assert not problems
    ref64 = brute_force(model.double(), lm_loss, x, y, [p for p in model.parameters()])
    for k, p in enumerate(params):
        kept = Summed(parts[k], "p", p.shape, x.shape[0])
        G = ref64[k].reshape(x.shape[0], -1)
        assert_close(kept.sq("p"), (G * G).sum(1), (G * G).sum(1).max(), rtol=1e-5)


def test_unserved_uses_are_named():
    torch.manual_seed(0)
    model = Unserved().double()
    _, _, parts, problems = recorded(
        model, F.mse_loss, torch.randn(4, 3, dtype=torch.float64), torch.randn(4).double()
    )
    names = [n for n, _ in model.named_parameters()]
    reasons = {names[k]: r for k, r in problems.items()}
    assert "einsum" in reasons["a"] and "no per-sample use rule" in reasons["a"]
    assert "atan2" in reasons["c"]
    assert "not along its dim 0" in reasons["b"]
    assert not parts


def test_a_parameter_as_large_as_the_batch_is_not_split_row_by_row():
    """``x + P`` with ``P`` of shape ``(B, F)``: each sample reaches one row of P; refused."""

    class RowParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return (x + self.p).sum(1)

    _, _, parts, problems = recorded(
        RowParam().double(), F.mse_loss, torch.randn(4, 3).double(), torch.randn(4).double()
    )
    assert 0 in problems and "row by row" in problems[0] and not parts


# -- broadcast shapes, as a property ---------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    tail=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    keep=st.data(),
    op=st.sampled_from(["add", "sub", "rsub", "mul", "iadd", "div", "rdiv", "idiv", "imul"]),
)
def test_broadcast_uses_equal_the_brute_force(batch, tail, keep, op):
    """``x ∘ P`` for any shape of P broadcast against ``x (B, *tail)``."""
    dims = keep.draw(st.lists(st.booleans(), min_size=len(tail), max_size=len(tail)))
    lead = keep.draw(st.integers(0, len(tail)))
    pshape = [t if d else 1 for t, d in zip(tail, dims, strict=True)][lead:]
    if keep.draw(st.booleans()):
        pshape = [1, *pshape]  # an explicit (1, ...) along the samples' dim

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            # away from 0: the quotients stay of moderate size
            self.p = nn.Parameter(0.5 + torch.rand(pshape, dtype=torch.float64))

        def forward(self, x):
            if op == "add":
                h = x + self.p
            elif op == "sub":
                h = x - self.p
            elif op == "rsub":
                h = self.p - x
            elif op == "mul":
                h = x * self.p
            elif op == "div":
                h = x / self.p
            elif op == "rdiv":
                h = self.p / (1.5 + torch.tanh(x))
            elif op == "idiv":
                h = x.clone()
                h /= self.p
            elif op == "imul":
                h = x.clone()
                h.mul_(self.p)
            else:
                h = x.clone()
                h += self.p
            return torch.tanh(h).reshape(h.shape[0], -1).sum(1)

    torch.manual_seed(0)
    model = M()
    x = torch.randn(batch, *tail, dtype=torch.float64)
    y = torch.randn(batch, dtype=torch.float64)
    params, actual, parts, problems = recorded(model, F.mse_loss, x, y)
    assert not problems
    G = brute_force(model, F.mse_loss, x, y, params)[0].reshape(batch, -1)
    kept = Summed(parts[0], "p", params[0].shape, batch)
    assert_close(kept.sq("p"), (G * G).sum(1), (G * G).sum(1).max() + 1e-300)
    v = torch.randn(params[0].shape, dtype=torch.float64)
    assert_close(kept.dots({"p": v}), G @ v.reshape(-1), G.norm(dim=1).max() * v.norm() + 1e-300)
    ones = torch.ones(1, batch, dtype=torch.float64)
    total = kept.weighted("p", ones).reshape(-1)
    assert_close(total, actual[0].reshape(-1), G.abs().max() + 1e-300)


# -- cross terms between kept forms ------------------------------------------------------------
def _dense(f, name, batch, shape):
    eye = torch.eye(batch, dtype=torch.float64)
    return f.weighted(name, eye).reshape(batch, -1)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), t1=st.integers(1, 4), t2=st.integers(1, 4), seed=st.integers(0, 99))
def test_cross_terms_equal_the_products_of_dense_gradients(batch, t1, t2, seed):
    g = torch.Generator().manual_seed(seed)
    V, D = 5, 3

    def r(*s):
        return torch.randn(*s, dtype=torch.float64, generator=g)

    forms = [
        (Tokens(r(batch, t1, D), r(batch, t1, V), weight="w", shape=(V, D)), "w"),
        (Tokens(r(batch, t2, D), r(batch, t2, V), weight="w", shape=(V, D)), "w"),
        (EmbeddingFactors(torch.randint(0, V, (batch, t1), generator=g), r(batch, t1, D), (V, D)),
         "weight"),
        (EmbeddingFactors(torch.randint(0, V, (batch, t2), generator=g), r(batch, t2, D), (V, D)),
         "weight"),
        (Rows({"w": r(batch, V, D)}), "w"),
    ]  # fmt: skip
    dense = [_dense(f, n, batch, (V, D)) for f, n in forms]
    for i, a in enumerate(forms):
        for j, b in enumerate(forms):
            got = cross(a, b, batch, (V, D))
            want = (dense[i] * dense[j]).sum(1)
            assert_close(got, want, dense[i].norm(dim=1).max() * dense[j].norm(dim=1).max())
