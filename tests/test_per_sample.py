"""Per-sample route: ghost norms and JVP dots against a brute-force float64 loop."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from clipscope.engine.per_sample import (
    _conv_grouped_ok,
    _gram_sq_norm,
    ghost_pass,
    per_sample_dots,
    per_sample_grads_reference,
    per_sample_losses,
    per_sample_sq_norms,
)

# ----------------------------------------------------------------------------- models


class SeqLinear(nn.Module):
    """(B, T, F) -> LayerNorm -> Linear 8->8 (ghost branch) -> Linear 8->3 (materialized)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(5)
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(self.norm(x)))).mean(1)


class Bag(nn.Module):
    """Token ids (B, T) -> Embedding (padding 0) -> mean -> Linear."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4, padding_idx=0)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(h[:, -1])


class RNNState(nn.Module):
    """Sequence-first GRU or LSTM fed an initial state; the classifier reads h_n."""

    def __init__(self, kind: str = "lstm") -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.h0 = nn.Parameter(torch.randn(2, 1, 3))
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(4, 3, num_layers=2)
        self.out = nn.Linear(3, 3)
        self.kind = kind

    def forward(self, x):
        h0 = self.h0.expand(2, x.shape[0], 3).contiguous()
        hx = (h0, torch.zeros_like(h0)) if self.kind == "lstm" else h0
        seq, state = self.rnn(self.emb(x).transpose(0, 1), hx)
        h = state[0] + state[1] if self.kind == "lstm" else state  # h_n and c_n
        return self.out(h[-1] + seq[0])


class BiLSTM(nn.Module):
    """Bidirectional LSTM (no ghost formula: the module-local loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.rnn = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0].mean(1))


class Tied(nn.Module):
    """Embedding and decoder share one weight; output (B, T, V)."""

    def __init__(self, vocab: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.mix = nn.Linear(4, 4)
        self.dec = nn.Linear(4, vocab)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mix(self.emb(x))))


class Shared(nn.Module):
    """One Linear called twice, with an in-place ReLU after its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lin(self.relu(self.lin(x))))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, padding=1, padding_mode="reflect"),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def wide_conv2d() -> nn.Module:
    """Patch width 72 >= 64: per-sample weight gradients by one grouped convolution."""
    return nn.Sequential(
        nn.Conv2d(16, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    )


def wide_conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(8, 3, 9), nn.Flatten(), nn.Linear(12, 2))


def conv1d_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, dilation=2),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4, 2),
    ).eval()


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _feats(*shape):
    def data(gen, dtype):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return data


def _ints(high, *shape):
    def data(gen, dtype):
        return torch.randint(0, high, shape, generator=gen)

    return data


@dataclass(frozen=True)
class Case:
    id: str
    model_fn: Callable[[], nn.Module]
    x_fn: Callable
    y_fn: Callable
    loss_fn: Callable = F.cross_entropy
    dtype: torch.dtype = torch.float64
    seed: int = 0

    @property
    def rtol(self) -> float:
        return 1e-10 if self.dtype == torch.float64 else 1e-5

    def build(self) -> tuple[nn.Module, torch.Tensor, Any]:
        torch.manual_seed(self.seed)
        model = self.model_fn().to(self.dtype)
        gen = torch.Generator().manual_seed(self.seed)
        return model, self.x_fn(gen, self.dtype), self.y_fn(gen, self.dtype)


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


CASES = [
    Case("mlp", _mlp, _feats(6, 5), _ints(3, 6)),
    Case("mlp-float32", _mlp, _feats(6, 5), _ints(3, 6), dtype=torch.float32, seed=1),
    Case("cnn", cnn, _feats(5, 2, 6, 6), _ints(3, 5), seed=2),
    Case("cnn-float32", cnn, _feats(5, 2, 6, 6), _ints(3, 5), dtype=torch.float32, seed=2),
    Case("wide-conv2d-grouped", wide_conv2d, _feats(4, 16, 6, 6), _ints(3, 4), seed=13),
    Case(
        "wide-conv2d-float32",
        wide_conv2d,
        _feats(4, 16, 6, 6),
        _ints(3, 4),
        dtype=torch.float32,
        seed=13,
    ),
    Case("wide-conv1d", wide_conv1d, _feats(4, 8, 12), _ints(2, 4), seed=14),
    Case("conv1d-bn-eval", conv1d_bn, _feats(4, 3, 8), _ints(2, 4), seed=3),
    Case("embedding-bag", Bag, _ints(7, 5, 6), _ints(3, 5), seed=4),
    Case("sequence-linear", SeqLinear, _feats(4, 3, 5), _ints(3, 4), seed=5),
    Case("lstm", LSTMClassifier, _ints(9, 3, 4), _ints(3, 3), seed=6),
    Case("lstm-float32", LSTMClassifier, _ints(9, 3, 4), _ints(3, 3), dtype=torch.float32, seed=6),
    Case("lstm-seq-first-state", RNNState, _ints(9, 3, 4), _ints(3, 3), seed=10),
    Case("bilstm-loop", BiLSTM, _ints(9, 3, 4), _ints(3, 3), seed=12),
    Case("gru-state", lambda: RNNState("gru"), _ints(9, 3, 4), _ints(3, 3), seed=11),
    Case("tied", Tied, _ints(6, 3, 5), _ints(6, 3, 5), loss_fn=lm_loss, seed=7),
    Case("shared-inplace", Shared, _feats(4, 4), _ints(2, 4), seed=8),
    Case("mse", lambda: nn.Linear(3, 2), _feats(5, 3), _feats(5, 2), loss_fn=F.mse_loss, seed=9),
]
IDS = [c.id for c in CASES]


def _ref(case: Case, model, x, y, params=None) -> torch.Tensor:
    return per_sample_grads_reference(model, case.loss_fn, x, y, params)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sq_norms_match_reference(case):
    model, x, y = case.build()
    expected = _ref(case, model, x, y).square().sum(1)
    got = per_sample_sq_norms(model, case.loss_fn, x, y)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=case.rtol, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dots_match_reference(case):
    model, x, y = case.build()
    rows = _ref(case, model, x, y)
    v = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(1), dtype=case.dtype)
    got = per_sample_dots(model, case.loss_fn, x, y, v)
    expected = rows @ v.double()
    # dots can cancel: compare against the scale of the terms, not each dot alone
    scale = (rows.abs() @ v.double().abs()).max()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=case.rtol * float(scale))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_losses_and_grad_sum(case):
    model, x, y = case.build()
    out = ghost_pass(model, case.loss_fn, x, y)
    params = list(model.parameters())
    batch_loss = case.loss_fn(model(x), y)
    torch.testing.assert_close(out.losses.mean(), batch_loss.detach(), rtol=case.rtol, atol=0)
    g = torch.autograd.grad(batch_loss * x.shape[0], params)
    for a, b in zip(out.grad_sum, g, strict=True):
        torch.testing.assert_close(a, b, rtol=case.rtol, atol=case.rtol)
    torch.testing.assert_close(
        per_sample_losses(model, case.loss_fn, x, y).detach(), out.losses, rtol=0, atol=0
    )


def test_params_subset():
    case = next(c for c in CASES if c.id == "tied")
    model, x, y = case.build()
    params = [model.mix.weight, model.dec.weight]  # dec.weight is the tied embedding
    rows = _ref(case, model, x, y, params)
    got = per_sample_sq_norms(model, case.loss_fn, x, y, params=params)
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-10, atol=0)
    v = [torch.randn_like(p) for p in params]
    flat = torch.cat([t.reshape(-1) for t in v])
    dots = per_sample_dots(model, case.loss_fn, x, y, v, params=params)
    torch.testing.assert_close(dots, rows @ flat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        dots, per_sample_dots(model, case.loss_fn, x, y, flat, params=params), rtol=0, atol=0
    )


def test_wide_convs_take_the_grouped_path():
    b2, b1 = torch.zeros(1, 4, 3, 3), torch.zeros(1, 3, 4)
    assert _conv_grouped_ok(wide_conv2d()[0], [(None, b2)])
    assert _conv_grouped_ok(wide_conv1d()[0], [(None, b1)])
    assert not _conv_grouped_ok(cnn()[0], [(None, torch.zeros(1, 4, 6, 6))])


def test_single_sample_batch():
    model, x, y = CASES[0].build()
    rows = _ref(CASES[0], model, x[:1], y[:1])
    got = per_sample_sq_norms(model, F.cross_entropy, x[:1], y[:1])
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- model untouched


@pytest.mark.parametrize("case_id", ["conv1d-bn-eval", "lstm-seq-first-state", "tied"])
def test_model_untouched(case_id):
    case = next(c for c in CASES if c.id == case_id)
    model, x, y = case.build()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    hooks = [len(m._forward_hooks) for m in model.modules()]
    per_sample_sq_norms(model, case.loss_fn, x, y)
    n = sum(p.numel() for p in model.parameters())
    per_sample_dots(model, case.loss_fn, x, y, torch.ones(n, dtype=case.dtype))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, (obj, vals) in zip(model.parameters(), grads, strict=True):
        assert p.grad is obj and torch.equal(p.grad, vals)
    assert [m.training for m in model.modules()] == flags
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


# ----------------------------------------------------------------------------- refusals


def test_train_mode_batchnorm_refused():
    model = conv1d_bn().double().train()
    x, y = torch.randn(4, 3, 8, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (per_sample_sq_norms, per_sample_losses):
        with pytest.raises(ValueError, match="eval-mode BatchNorm or GroupNorm"):
            fn(model, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="eval-mode BatchNorm"):
        per_sample_dots(model, F.cross_entropy, x, y, torch.zeros(1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_vector_refused():
    model, x, y = CASES[0].build()
    with pytest.raises(ValueError, match="flat with"):
        per_sample_dots(model, F.cross_entropy, x, y, torch.zeros(3))
    with pytest.raises(ValueError, match="one tensor per parameter"):
        per_sample_dots(model, F.cross_entropy, x, y, [torch.zeros(3)])


def test_batch_not_first_refused():
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):  # (B, T, F) -> (T, B, F) inside
            return self.lin(x.transpose(0, 1)).mean(0)

    x, y = torch.randn(4, 5, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="samples along dim 0"):
        per_sample_sq_norms(SeqFirst(), F.cross_entropy, x, y)


def test_dropout_in_fallback_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.PReLU(), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="dropout off"):
        per_sample_sq_norms(model, F.cross_entropy, x, y)
    model.eval()
    rows = per_sample_grads_reference(model, F.cross_entropy, x, y)
    got = per_sample_sq_norms(model, F.cross_entropy, x, y)
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-5, atol=0)


def test_bad_model_and_input():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        per_sample_sq_norms(lambda x: x, F.cross_entropy, torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="no samples"):
        per_sample_sq_norms(nn.Linear(3, 2), F.cross_entropy, torch.zeros(0, 3), torch.zeros(0))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 5),
    T=st.integers(1, 6),
    P=st.integers(1, 9),
    Q=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_gram_identity(B, T, P, Q, seed):
    """‖Σ_t b_t a_tᵀ‖² = Σ_{t,s}(a_t·a_s)(b_t·b_s), whichever branch runs."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, P, generator=gen, dtype=torch.float64)
    b = torch.randn(B, T, Q, generator=gen, dtype=torch.float64)
    per = torch.einsum("btq,btp->bqp", b, a)
    explicit = per.square().sum((1, 2))
    sq, total = _gram_sq_norm(a, b)
    torch.testing.assert_close(sq, explicit, rtol=1e-12, atol=0)
    torch.testing.assert_close(total, per.sum(0), rtol=1e-12, atol=1e-12)
    ghost = (a @ a.transpose(1, 2) * (b @ b.transpose(1, 2))).sum((1, 2))
    torch.testing.assert_close(ghost, explicit, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 6),
    lead=st.lists(st.integers(1, 3), max_size=2),
    P=st.integers(1, 6),
    Q=st.integers(2, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_any_shape(B, lead, P, Q, bias, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(P, Q, bias=bias), nn.Flatten()).double()
    x = torch.randn(B, *lead, P, dtype=torch.float64)
    y = torch.randn(B, Q * int(torch.tensor(lead).prod()) if lead else Q, dtype=torch.float64)
    rows = per_sample_grads_reference(model, F.mse_loss, x, y)
    got = per_sample_sq_norms(model, F.mse_loss, x, y)
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("case_id", ["mlp", "lstm-seq-first-state"])
def test_activations_freed(case_id):
    """No reference cycle (output -> grad_fn -> hook -> slot -> output) keeps a batch alive."""
    case = next(c for c in CASES if c.id == case_id)
    model, x, y = case.build()
    refs = []
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.LSTM)):
            mod.register_forward_hook(
                lambda m, i, o: refs.append(weakref.ref(o if torch.is_tensor(o) else o[0]))
            )
    per_sample_sq_norms(model, case.loss_fn, x, y)
    assert refs and all(r() is None for r in refs)
