"""Models: parameter counts, shapes, tied weights, the dropout contract, state flow."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipscope.engine.guard import (
    batch_coupled_modules,
    dropout_modules,
    dropout_policy,
    rng_for_component,
)
from clipscope.models import (
    AWDLSTM,
    MLP,
    MODEL_NAMES,
    EmbeddingDropout,
    LockedDropout,
    SmallCNN,
    SmallLSTMLM,
    WeightDropLSTM,
    awd_lstm_loss,
    build_model,
    resnet18_cifar,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lstm_params(n_in: int, n_hid: int) -> int:
    """Torch LSTM: four gates, W_ih (4H×I), W_hh (4H×H), two bias vectors (4H each)."""
    return 4 * n_hid * (n_in + n_hid) + 2 * 4 * n_hid


# ---------------------------------------------------------------- parameter counts


def test_resnet18_cifar_has_the_reference_parameter_count():
    assert n_params(resnet18_cifar()) == 11_173_962


def test_resnet18_cifar_structure():
    model = resnet18_cifar()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(convs) == 1 + 8 * 2 + 3
    assert [m.out_channels for m in shortcuts] == [128, 256, 512]
    assert all(m.stride == (2, 2) for m in shortcuts)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert all(m.bias is None for m in convs)
    assert model.linear.in_features == 512 and model.linear.out_features == 10


def test_resnet18_forward_on_two_images():
    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="32, 32"):
        model(torch.randn(2, 1, 32, 32))


def test_awd_lstm_parameter_count_against_the_layer_formula():
    model = AWDLSTM(ntoken=10_000)
    expected = (
        10_000 * 400  # embedding, shared with the decoder
        + 10_000  # decoder bias
        + lstm_params(400, 1150)
        + lstm_params(1150, 1150)
        + lstm_params(1150, 400)
    )
    assert n_params(model) == expected == 24_221_600
    assert abs(expected / 1e6 - 24.2) < 0.05  # the reference's "24M" PTB model


def test_awd_lstm_untied_adds_a_decoder_matrix_and_widens_the_last_layer():
    tied, untied = AWDLSTM(100, 8, 12), AWDLSTM(100, 8, 12, tie_weights=False)
    extra = 100 * 12 + lstm_params(12, 12) - lstm_params(12, 8)
    assert n_params(untied) - n_params(tied) == extra


# ---------------------------------------------------------------- tied weights


@pytest.mark.parametrize(
    ("model_fn", "enc", "dec"),
    [
        (lambda: AWDLSTM(60, 8, 12), "encoder", "decoder"),
        (lambda: SmallLSTMLM(60), "embedding", "decoder"),
        (lambda: SmallLSTMLM(60, emb=16, hidden=16), "embedding", "decoder"),
    ],
    ids=["awd-lstm", "small-lm-projected", "small-lm-same-width"],
)
def test_tied_decoder_is_one_parameter(model_fn, enc, dec):
    model = model_fn()
    w = getattr(model, enc).weight
    assert getattr(model, dec).weight is w
    assert sum(p is w for p in model.parameters()) == 1
    logits, _ = model(torch.randint(0, 60, (4, 2)), None)
    logits.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    ("emb", "hidden", "tied"), [(64, 128, True), (16, 16, True), (8, 12, False)]
)
def test_small_lm_parameter_count(emb, hidden, tied):
    vocab = 50
    proj = hidden * emb if tied and emb != hidden else 0
    decoder = vocab + (0 if tied else vocab * hidden)
    expected = vocab * emb + lstm_params(emb, hidden) + proj + decoder
    assert n_params(SmallLSTMLM(vocab, emb, hidden, tied)) == expected


def test_small_lm_untied_has_its_own_decoder():
    model = SmallLSTMLM(60, emb=16, hidden=32, tied=False)
    assert model.decoder.weight is not model.embedding.weight
    assert model.proj is None and model.decoder.in_features == 32


# ---------------------------------------------------------------- sequential interface

SEQ_CASES = [
    (lambda: AWDLSTM(40, 6, 10), "awd-lstm"),
    (lambda: SmallLSTMLM(40, emb=8, hidden=12), "small-lstm-lm"),
    (lambda: SmallLSTMLM(40, emb=8, hidden=12, dropout=0.3), "small-lstm-lm-dropout"),
]


@pytest.mark.parametrize("model_fn", [c[0] for c in SEQ_CASES], ids=[c[1] for c in SEQ_CASES])
def test_state_flows_across_windows(model_fn):
    """Two windows with the state passed on equal one window over the whole sequence (eval)."""
    torch.manual_seed(1)
    model = model_fn().double().eval()
    inp = torch.randint(0, 40, (9, 3))
    full, state_full = model(inp, None)
    first, state = model(inp[:4], None)
    second, state_two = model(inp[4:], state)
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=0, atol=1e-12)
    for a, b in zip(_flat(state_two), _flat(state_full), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert full.shape == (9, 3, 40)
    zeros, _ = model(inp, _zeros_like_state(state_full))
    torch.testing.assert_close(zeros, full, rtol=0, atol=0)


def _flat(state):
    return [t for hc in (state if isinstance(state, list) else [state]) for t in hc]


def _zeros_like_state(state):
    if isinstance(state, list):
        return [tuple(torch.zeros_like(t) for t in hc) for hc in state]
    return tuple(torch.zeros_like(t) for t in state)


@pytest.mark.parametrize("model_fn", [c[0] for c in SEQ_CASES], ids=[c[1] for c in SEQ_CASES])
def test_sequential_models_reject_bad_tokens(model_fn):
    model = model_fn()
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(3, 2), None)
    with pytest.raises(ValueError, match=r"\(T, B\)"):
        model(torch.zeros(3, dtype=torch.long), None)


def test_awd_lstm_rejects_a_malformed_state():
    model = AWDLSTM(40, 6, 10)
    _, state = model(torch.zeros(3, 2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="3 \\(h, c\\) pairs"):
        model(torch.zeros(3, 2, dtype=torch.long), state[:2])
    with pytest.raises(ValueError, match=r"state\[0\]"):
        model(torch.zeros(3, 5, dtype=torch.long), state)


# ---------------------------------------------------------------- dropout contract


def test_awd_lstm_dropout_modules_are_all_visible_to_the_engine():
    model = AWDLSTM(40, 6, 10)
    found = dropout_modules(model)
    kinds = sorted(type(m).__name__ for m in found)
    assert kinds == ["EmbeddingDropout"] + ["LockedDropout"] * 4 + ["WeightDropLSTM"] * 3
    assert all(type(m).clipscope_dropout is True for m in found)


def _no_dropout_twin(model: AWDLSTM) -> AWDLSTM:
    twin = copy.deepcopy(model)
    for m in dropout_modules(twin):
        if isinstance(m, WeightDropLSTM):
            m.weight_dropout = 0.0
        else:
            m.p = 0.0
    return twin


def test_dropout_is_a_no_op_in_eval_and_draws_no_random_numbers():
    torch.manual_seed(2)
    model = AWDLSTM(40, 6, 10).double()
    inp = torch.randint(0, 40, (5, 3))
    reference, _ = _no_dropout_twin(model).train()(inp, None)
    rng = torch.random.get_rng_state()
    out, _ = model.eval()(inp, None)
    assert torch.equal(torch.random.get_rng_state(), rng)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    model.train()
    with dropout_policy(model, "off"):
        off, _ = model(inp, None)
    torch.testing.assert_close(off, reference, rtol=0, atol=0)
    train_out, _ = model(inp, None)
    assert not torch.allclose(train_out, reference)


def test_dropout_masks_come_from_the_global_rng():
    model = AWDLSTM(40, 6, 10).double().train()
    inp = torch.randint(0, 40, (5, 3), generator=torch.Generator().manual_seed(0))
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(model(inp, None)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])
    fixed = []
    for i in (0, 0, 1):
        with rng_for_component("fixed", 3, i):
            fixed.append(model(inp, None)[0])
    torch.testing.assert_close(fixed[0], fixed[1], rtol=0, atol=0)
    assert not torch.allclose(fixed[0], fixed[2])


def test_locked_dropout_shares_one_mask_over_time():
    torch.manual_seed(0)
    drop = LockedDropout(0.25)
    y = drop(torch.ones(6, 4, 50, dtype=torch.float64))
    assert torch.equal(y, y[:1].expand_as(y))
    assert set(y.unique().tolist()) <= {0.0, 1 / 0.75}
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LockedDropout(1.0)


def test_embedding_dropout_matches_masking_the_weight_rows():
    """Reference: mask E's rows with V Bernoulli draws, then embed; same values and gradient."""
    vocab, p = 30, 0.4
    emb = nn.Embedding(vocab, 5).double()
    ids = torch.randint(0, vocab, (7, 3), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    ours = EmbeddingDropout(p)(emb(ids), ids, vocab)
    (g_ours,) = torch.autograd.grad(ours.pow(2).sum(), emb.weight)
    torch.manual_seed(5)
    mask = emb.weight.new_empty(vocab, 1).bernoulli_(1 - p) / (1 - p)
    ref = F.embedding(ids, emb.weight * mask)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), emb.weight)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-13)
    assert 0 < (mask == 0).sum() < vocab


def _lstm_loop(x, w_ih, w_hh, b_ih, b_hh, h, c):
    """Float64 LSTM by hand (torch gate order i, f, g, o)."""
    outs = []
    for t in range(x.shape[0]):
        gates = x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weight_drop_lstm_against_a_hand_written_loop(training):
    torch.manual_seed(0)
    rnn = WeightDropLSTM(3, 4, weight_dropout=0.5).double().train(training)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 1, 2, 4, dtype=torch.float64)
    torch.manual_seed(11)
    out, (h, c) = rnn(x, (h0, c0))
    torch.manual_seed(11)
    w_hh = F.dropout(rnn.weight_hh_l0, 0.5, training=training)
    ref, h_ref, c_ref = _lstm_loop(
        x, rnn.weight_ih_l0, w_hh, rnn.bias_ih_l0, rnn.bias_hh_l0, h0[0], c0[0]
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h[0], h_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(c[0], c_ref, rtol=0, atol=1e-12)
    if training:
        assert (w_hh == 0).any()
    (g,) = torch.autograd.grad(out.sum(), rnn.weight_hh_l0)
    (g_ref,) = torch.autograd.grad(ref.sum(), rnn.weight_hh_l0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)


def test_weight_drop_lstm_keeps_nn_lstm_parameters():
    rnn = WeightDropLSTM(3, 4)
    assert isinstance(rnn, nn.LSTM)
    assert [n for n, _ in rnn.named_parameters()] == [
        "weight_ih_l0",
        "weight_hh_l0",
        "bias_ih_l0",
        "bias_hh_l0",
    ]


# ---------------------------------------------------------------- AR / TAR


def test_awd_lstm_loss_is_cross_entropy_plus_ar_and_tar():
    torch.manual_seed(3)
    model = AWDLSTM(40, 6, 10).double().train()
    captured = {}
    model.rnns[-1].register_forward_hook(lambda m, a, out: captured.update(raw=out[0]))
    model.output_dropout.register_forward_hook(lambda m, a, out: captured.update(drop=out))
    inp, target = torch.randint(0, 40, (2, 5, 3))
    logits, _ = model(inp, None)
    loss = awd_lstm_loss(model, alpha=2.0, beta=1.0)(logits, target)
    raw, drop = captured["raw"].detach(), captured["drop"].detach()
    assert not torch.equal(raw, drop)  # output dropout was active
    ce = (
        sum(-torch.log_softmax(logits[t, b], 0)[target[t, b]] for t in range(5) for b in range(3))
        / 15
    )
    ar = sum(float(v) ** 2 for v in drop.flatten()) / drop.numel()
    diff = (raw[1:] - raw[:-1]).flatten()
    tar = sum(float(v) ** 2 for v in diff) / diff.numel()
    torch.testing.assert_close(loss.item(), ce.item() + 2 * ar + tar, rtol=1e-12, atol=0)
    plain = awd_lstm_loss(model, alpha=0, beta=0)(logits, target)
    torch.testing.assert_close(plain, F.cross_entropy(logits.reshape(-1, 40), target.reshape(-1)))


def test_awd_lstm_loss_refuses_foreign_outputs_and_bad_weights():
    model = AWDLSTM(40, 6, 10)
    loss_fn = awd_lstm_loss(model)
    with pytest.raises(RuntimeError, match="no forward"):
        loss_fn(torch.zeros(2, 1, 40), torch.zeros(2, 1, dtype=torch.long))
    logits, _ = model(torch.zeros(2, 1, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match="latest forward"):
        loss_fn(logits.detach(), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        awd_lstm_loss(model, alpha=-1)
    with pytest.raises(TypeError, match="AWDLSTM"):
        awd_lstm_loss(SmallLSTMLM(40))


def test_awd_lstm_copies_and_pickles_after_a_forward():
    model = AWDLSTM(40, 6, 10)
    logits, _ = model(torch.zeros(2, 1, dtype=torch.long), None)
    twin = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="no forward"):
        twin.last_activations()
    assert model.last_activations()[0] is logits
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    again = pickle.loads(pickle.dumps(model))
    for a, b in zip(again.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.decoder.weight is again.encoder.weight


# ---------------------------------------------------------------- small models and registry


def test_small_cnn_has_no_batch_coupling_unless_asked():
    assert batch_coupled_modules(SmallCNN()) == []
    with_bn = SmallCNN(batchnorm=True)
    assert len(batch_coupled_modules(with_bn)) == 2
    assert batch_coupled_modules(with_bn.eval()) == []
    assert SmallCNN()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        SmallCNN()(torch.zeros(3, 8, 8))


def test_mlp_shapes_and_widths():
    model = MLP(12, hidden=(5, 4), out_features=3)
    assert model(torch.zeros(2, 3, 4)).shape == (2, 3)
    assert n_params(model) == (12 * 5 + 5) + (5 * 4 + 4) + (4 * 3 + 3)
    with pytest.raises(ValueError, match="hidden width"):
        MLP(12, hidden=(0,))


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("resnet18-cifar", {}, "ResNetCIFAR"),
        ("awd-lstm", {"ntoken": 30, "ninp": 4, "nhid": 6}, "AWDLSTM"),
        ("small-cnn", {}, "SmallCNN"),
        ("small-lstm-lm", {"vocab": 30}, "SmallLSTMLM"),
        ("mlp", {}, "MLP"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_build_model_registry(name, kwargs, cls):
    assert type(build_model(name, **kwargs)).__name__ == cls
    assert name in MODEL_NAMES


def test_build_model_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="resnet18-cifar, awd-lstm, small-cnn"):
        build_model("resnet50")


@pytest.mark.parametrize(
    ("fn", "exc"),
    [
        (lambda: AWDLSTM(0), ValueError),
        (lambda: AWDLSTM(10, wdrop=1.5), ValueError),
        (lambda: SmallLSTMLM(10.0), TypeError),
        (lambda: SmallCNN(num_classes=True), TypeError),
        (lambda: resnet18_cifar(0), ValueError),
    ],
    ids=["ntoken-0", "wdrop-1.5", "vocab-float", "classes-bool", "resnet-0"],
)
def test_constructors_reject_bad_arguments(fn, exc):
    with pytest.raises(exc):
        fn()


# ---------------------------------------------------------------- with the engine


def test_awd_lstm_components_are_repeatable_under_both_engine_dropout_policies():
    """probe: "fixed" masks give the same g_i on every call and route; "off" equals eval mode."""
    from clipscope import probe
    from clipscope.components import SequentialComponents

    torch.manual_seed(0)
    comps = SequentialComponents.from_tokens(torch.randint(0, 30, (120,)), batch_size=4, bptt=6)
    model = AWDLSTM(30, 6, 8).double()
    loss_fn = awd_lstm_loss(model)
    fixed = [
        probe(model, loss_fn, comps, route=r, dropout="fixed", seed=1)
        for r in ("two-pass",) * 2 + ("keep",)
    ]
    for other in fixed[1:]:
        np.testing.assert_allclose(other.norms, fixed[0].norms, rtol=1e-12, atol=0)
        np.testing.assert_allclose(other.dots, fixed[0].dots, rtol=1e-12, atol=1e-300)
    other_seed = probe(model, loss_fn, comps, route="two-pass", dropout="fixed", seed=2)
    assert not np.allclose(other_seed.norms, fixed[0].norms)
    off = probe(model, loss_fn, comps, route="two-pass", dropout="off")
    assert model.training  # the probe restores the mode
    model.eval()
    in_eval = probe(model, loss_fn, comps, route="two-pass", dropout="off")
    np.testing.assert_allclose(off.norms, in_eval.norms, rtol=1e-12, atol=0)
    assert not np.allclose(off.norms, fixed[0].norms)


def test_awd_lstm_does_not_keep_the_logits_alive():
    model = AWDLSTM(40, 6, 10)
    logits, _ = model(torch.zeros(2, 1, dtype=torch.long), None)
    assert model.last_activations()[0] is logits
    del logits
    with pytest.raises(RuntimeError, match="no longer exist"):
        model.last_activations()
