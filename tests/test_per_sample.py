"""Per-sample route: the reported failures with their right values, the checks, the API.

The zoo (``test_per_sample_zoo.py``) compares whole architectures with the
float64 brute force and the family tests (``test_per_sample_families.py``)
each layer rule; this file holds the six failures of issue 9 as they were
reported, the verification machinery (structural check, spot check, strict,
consistency), precision, and the functions' contracts.
"""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from clipscope.components import Components
from clipscope.engine import probe, reference_probe
from clipscope.engine.common import Flat, package
from clipscope.engine.per_sample import (
    Plan,
    ghost_pass,
    per_sample_dots,
    per_sample_grads_reference,
    per_sample_losses,
    per_sample_sq_norms,
)
from clipscope.engine.per_sample._common import gram_sq_norm
from clipscope.engine.verify import (
    ConsistencyWarning,
    PerSampleFallbackWarning,
    VerificationError,
    check_consistency,
)
from clipscope.models.awd_lstm import WeightDropLSTM
from zoo import NanoGPT, SampleAxisInside, lm_loss, prelu_mlp

ETAS = (0.3, math.inf)


def singles(X, Y):
    return Components.from_tensors(X, Y, batch_size=1)


# ----------------------------------------------------------------------------- the six failures


class GPTTie(nn.Module):
    """Issue 9, failure 1: ``F.linear(emb(x).sum(1), emb.weight)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(2, 1)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[1.0], [2.0]]))

    def forward(self, x):
        return F.linear(self.emb(x).sum(1), self.emb.weight)


class EinsumTie(GPTTie):
    """The same tie through ``torch.einsum``, which no use rule serves."""

    def forward(self, x):
        return torch.einsum("bd,vd->bv", self.emb(x).sum(1), self.emb.weight)


@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
def test_failure_1_weight_used_outside_its_module(route):
    """The embedding rule and the tied head's use (F.linear), summed with their cross term."""
    X, Y = torch.tensor([[0], [1]]), torch.tensor([0, 1])
    model = GPTTie()
    comps = Components.from_tensors(X, Y, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1], strict=True)
    np.testing.assert_allclose(res.norms, [0.7310585786, 0.4297924150], rtol=1e-6)  # float32
    ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-6)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-6)
    assert res.grad_norm == pytest.approx(ref.grad_norm, rel=1e-6)
    assert res.route == route and res.verification["fallback"] == {}
    assert res.verification["uses"] == {"emb.weight": ["embedding", "linear"]}


@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
def test_a_use_no_rule_serves_is_named_and_exact(route):
    X, Y = torch.tensor([[0], [1]]), torch.tensor([0, 1])
    model = EinsumTie()
    comps = Components.from_tensors(X, Y, batch_size=2)
    with pytest.warns(PerSampleFallbackWarning, match=r"emb\.weight.*\[use\].*einsum"):
        res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1])
    ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-6)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-6)
    assert res.route == f"{route}+fallback" and "emb.weight" in res.verification["fallback"]
    # a use without a rule is a planned fallback, not a failed check: strict does not refuse it
    with pytest.warns(PerSampleFallbackWarning):
        probe(model, F.cross_entropy, comps, route=route, batch_sizes=[1], strict=True)


class WeightDropOnly(nn.Module):
    """The project's WeightDropLSTM in an LM whose only randomness is the DropConnect mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.rnn = WeightDropLSTM(4, 4, weight_dropout=0.5)
        self.dec = nn.Linear(4, 7)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x).transpose(0, 1))
        return self.dec(out.transpose(0, 1))


@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
def test_failure_2_weightdrop_lstm_fixed_masks(route):
    """One DropConnect mask per chunk, replayed when the LSTM is re-run per sample."""
    from clipscope.engine.guard import component_seed

    torch.manual_seed(0)
    model = WeightDropOnly().double().train()
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, 7, (6, 5), generator=gen), torch.randint(0, 7, (6, 5), generator=gen)
    comps = Components.from_tensors(X, Y, batch_size=3)  # 2 chunks of 3 samples
    res = probe(model, lm_loss, comps, ETAS, route=route, dropout="fixed", seed=4)
    rows = []
    for c in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(component_seed(4, c))
            state = torch.random.get_rng_state()
        rows.append(
            per_sample_grads_reference(
                model, lm_loss, X[3 * c : 3 * c + 3], Y[3 * c : 3 * c + 3], rng_state=state
            )
        )
    G = torch.cat(rows)
    full = G.mean(0)
    np.testing.assert_allclose(res.norms, G.norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(res.dots, (G @ full).numpy(), rtol=1e-10)
    assert res.grad_norm == pytest.approx(float(full.norm()), rel=1e-10)
    for eta in ETAS:
        total = sum(min(1.0, eta / float(n)) * g for g, n in zip(G, G.norm(dim=1), strict=True))
        assert res.clipped[eta][0] == pytest.approx(float(total.norm()), rel=1e-10)
    assert res.route == route  # exact by the module-local loop, no fallback
    assert res.verification["rules"]["rnn"] == "rnn-loop"


def test_failure_3_half_precision_does_not_overflow():
    model = nn.Linear(1, 1, bias=False).half()
    with torch.no_grad():
        model.weight.fill_(1.0)
    X, Y = torch.tensor([[20.0], [10.0]]).half(), torch.zeros(2, 1).half()
    res = probe(
        model, F.mse_loss, Components.from_tensors(X, Y, batch_size=2), ETAS, batch_sizes=[1]
    )
    np.testing.assert_allclose(res.norms, [800.0, 200.0], rtol=1e-3)
    np.testing.assert_allclose(res.dots, [400000.0, 100000.0], rtol=1e-3)
    assert res.grad_norm == pytest.approx(500.0, rel=1e-3)
    two = probe(model, F.mse_loss, singles(X, Y), ETAS, route="two-pass")
    np.testing.assert_allclose(res.dots, two.dots, rtol=1e-3)
    assert res.clipped[math.inf][0] == pytest.approx(1000.0, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_squares_and_sums_in_float64(dtype):
    """Gram products and batch sums that overflow the dtype (but not float64) stay exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(9, 2)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(40.0)
    X = (torch.randn(8, 3, 4) * 30).to(dtype)  # activations ~1e3: their squares overflow fp16
    Y = torch.randint(0, 2, (8,))
    res = probe(
        model, F.cross_entropy, Components.from_tensors(X, Y, batch_size=8), ETAS, batch_sizes=[1]
    )
    G = per_sample_grads_reference(model, F.cross_entropy, X, Y)
    assert np.isfinite(res.norms).all() and np.isfinite(res.dots).all()
    rtol = 3e-2 if dtype == torch.float16 else 1e-1
    np.testing.assert_allclose(res.norms, G.norm(dim=1).numpy(), rtol=rtol)
    scale = float(G.norm(dim=1).max() * G.mean(0).norm())
    np.testing.assert_allclose(res.dots, (G @ G.mean(0)).numpy(), rtol=0, atol=rtol * scale)


def sparse_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(4, 2, sparse=True), nn.Flatten(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("route", ["two-pass", "keep", "dyadic", "per-sample", "auto"])
def test_failure_4_sparse_gradients_in_every_route(route):
    model = sparse_model()
    X = torch.tensor([[1, 2], [2, 3], [3, 3], [0, 1]])
    Y = torch.randn(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = 1 if route != "per-sample" else 2
    comps = Components.from_tensors(X, Y, batch_size=batch)
    kwargs = {"batch_sizes": [1]} if route == "per-sample" else {}
    if route == "dyadic":
        kwargs = {"levels": 2}
    res = probe(model, F.mse_loss, comps, ETAS, route=route, **kwargs)
    res = res[1] if route == "dyadic" else res
    G = per_sample_grads_reference(model, F.mse_loss, X, Y)
    np.testing.assert_allclose(res.norms, G.norm(dim=1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(res.dots, (G @ G.mean(0)).numpy(), rtol=1e-10)


def test_failure_4_sparse_embedding_norm():
    from clipscope.clipping import clip_grads_

    emb = nn.Embedding(4, 2, sparse=True)
    with torch.no_grad():
        emb.weight.zero_()
    emb(torch.tensor([1])).sum().backward()
    assert emb.weight.grad.is_sparse
    norm = clip_grads_(emb.parameters(), 1.0)
    assert float(norm) == pytest.approx(math.sqrt(2), rel=1e-15)
    expected = torch.zeros(4, 2)
    expected[1] = 1 / math.sqrt(2)
    torch.testing.assert_close(emb.weight.grad.to_dense(), expected)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_failure_5_string_padding(conv):
    torch.manual_seed(0)
    shape = (2, 6) if conv is nn.Conv1d else (2, 5, 5)
    for padding in ("valid", "same"):
        model = nn.Sequential(conv(2, 3, 3, padding=padding), nn.Flatten()).double()
        features = model(torch.zeros(1, *shape, dtype=torch.float64)).shape[1]
        model.append(nn.Linear(features, 2).double())
        X = torch.randn(5, *shape, dtype=torch.float64)
        Y = torch.randint(0, 2, (5,))
        res = probe(
            model,
            F.cross_entropy,
            Components.from_tensors(X, Y, batch_size=5),
            ETAS,
            batch_sizes=[1],
        )
        ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
        np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
        np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10)
        assert res.route == "per-sample-kept"


def test_failure_6_flattened_logits_clear_error():
    class FlatLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e, self.d = nn.Embedding(5, 3), nn.Linear(3, 5)

        def forward(self, x):
            return self.d(self.e(x)).reshape(-1, 5)

    X, Y = torch.randint(0, 5, (4, 6)), torch.randint(0, 5, (4, 6))
    comps = Components.from_tensors(X, Y, batch_size=4)

    def loss(out, y):
        return F.cross_entropy(out, y.reshape(-1))

    with pytest.raises(ValueError, match=r"shape \(24, 5\) for a batch of 4.*\(B, T, V\)"):
        probe(FlatLM(), loss, comps, batch_sizes=[1])
    probe(FlatLM(), loss, comps, route="two-pass")  # mini-batch components are fine


# ----------------------------------------------------------------------------- the checks


def test_spot_check_catches_what_the_structural_check_cannot():
    """A Linear that sees (T, B, F) with T = B: its batch sum is right, its split is not."""
    torch.manual_seed(0)
    model = SampleAxisInside().double()
    X = torch.randn(6, 3, 3, dtype=torch.float64)
    Y = torch.randint(0, 2, (6,))
    comps = Components.from_tensors(X, Y, batch_size=3)
    with pytest.warns(PerSampleFallbackWarning, match=r"lin\.weight.*spot-norm"):
        res = probe(model, F.cross_entropy, comps, ETAS, batch_sizes=[1])
    ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    assert res.verification["attempts"] == 2
    with pytest.raises(VerificationError, match="spot-norm"):
        probe(model, F.cross_entropy, comps, batch_sizes=[1], strict=True)
    # with no spot checks the wrong numbers are not caught: the check is what makes it exact
    res0 = probe(model, F.cross_entropy, comps, batch_sizes=[1], spot_checks=0)
    assert not np.allclose(res0.norms, ref.norms, rtol=1e-3)
    assert res0.verification["spot_checks"] == 0


def test_structural_check_catches_module_rewriting_its_weight(monkeypatch):
    """A Linear whose forward changes the weight it uses: the rule's sum misses the change."""
    torch.manual_seed(0)
    mask = (torch.rand(3, 4) > 0.5).double()

    def masked_forward(self, x):
        return F.linear(x, self.weight * mask, self.bias)

    monkeypatch.setattr(nn.Linear, "forward", masked_forward)  # still "nn.Linear.forward"
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    X, Y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(PerSampleFallbackWarning, match=r"0\.weight.*structural"):
        sq = per_sample_sq_norms(model, F.mse_loss, X, Y)
    G = per_sample_grads_reference(model, F.mse_loss, X, Y)
    torch.testing.assert_close(sq, G.square().sum(1), rtol=1e-10, atol=0)


def test_nanogpt_head_and_verification_record():
    torch.manual_seed(0)
    model = NanoGPT().double()
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 11, (4, 6), generator=gen), torch.randint(0, 11, (4, 6), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        res = probe(
            model,
            lm_loss,
            Components.from_tensors(X, Y, batch_size=2),
            ETAS,
            batch_sizes=[1],
            spot_checks=3,
            seed=5,
        )
    v = res.verification
    assert v["fallback"] == {} and v["events"] == []
    # wte: its embedding rule plus the tied head (F.linear); wpe: looked up at arange(T),
    # its per-sample gradient comes from the broadcast add, carried back through the lookup
    assert v["uses"] == {"wte.weight": ["embedding", "linear"], "wpe.weight": ["broadcast"]}
    assert v["rules"]["attn.qkv"] == "linear" and v["rules"]["ln_1"] == "norm"
    assert v["spot_checks"] == 3 and len(v["spot_samples"]) == 3 and v["spot_seed"] == 5
    assert v["spot_max_norm_error"] < 1e-12 and v["spot_max_dot_error"] < 1e-12
    assert v["structural_checks"] > 0 and v["structural_max_error"] < 1e-9
    import json

    json.dumps(res.to_dict())


def test_rnn_rerun_that_does_not_reproduce_falls_back():
    class NoisyLSTM(nn.LSTM):
        """Input dropout inside forward: masks drawn per batch size, not reproducible per sample."""

        clipscope_dropout = True

        def forward(self, x, hx=None):
            return super().forward(F.dropout(x, 0.5, self.training), hx)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = NoisyLSTM(3, 2, batch_first=True)
            self.out = nn.Linear(2, 2)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Model().double().train()
    X, Y = torch.randn(4, 3, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    comps = Components.from_tensors(X, Y, batch_size=4)
    with pytest.warns(PerSampleFallbackWarning, match=r"rnn\.weight_ih_l0.*\[rule\].*reproduce"):
        res = probe(model, F.cross_entropy, comps, batch_sizes=[1], dropout="fixed", seed=2)
    from clipscope.engine.guard import component_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(2, 0))
        state = torch.random.get_rng_state()
    G = per_sample_grads_reference(model, F.cross_entropy, X, Y, rng_state=state)
    np.testing.assert_allclose(res.norms, G.norm(dim=1).numpy(), rtol=1e-10)


def test_consistency_flags_warn_and_strict_raises():
    assert check_consistency(np.array([1.0, 2.0]), np.array([1.0, 2.0]), 1.0, 1e-9)["flags"] == [
        "dots_sum_mismatch"
    ]
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    comps = Components.from_tensors(X, Y, batch_size=2)

    noise = torch.Generator().manual_seed(0)  # not torch's global RNG, which the entry checks watch

    def noisy(out, y):  # unseeded randomness: pass 2 sees other components than pass 1
        # (only with gradients: the probe's repeatability check, a no-grad forward
        # of component 0, would refuse the loss before the consistency check runs)
        scale = torch.rand((), generator=noise, dtype=out.dtype) if torch.is_grad_enabled() else 0
        return F.cross_entropy(out * (1 + scale), y)

    # such components change between the passes: that is an error before any sum is kept
    for strict in (False, True):
        with pytest.raises(VerificationError, match="pass 2 recomputed"):
            probe(model, noisy, comps, route="two-pass", strict=strict)
    # the consistency check on sums that are not those of one set of gradients
    flat = Flat(model, list(model.parameters()))
    full = torch.zeros(flat.n, dtype=torch.float64)
    full[0] = 1.0

    def sums():
        return [{
            "norms": np.array([1.0, 1.0]), "dots": np.array([3.0, -1.0]), "losses": np.zeros(2),
            "sizes": np.array([4, 4]), "full": full, "clipped": {}, "batch_size": 4,
            "mismatch": 0.0,
        }]  # fmt: skip

    with pytest.warns(ConsistencyWarning, match="cauchy_schwarz_violation"):
        res = package(sums(), "two-pass", {}, flat, False, {}, strict=False)
    assert "cauchy_schwarz_violation" in res.verification["consistency"]["flags"]
    with pytest.raises(VerificationError, match="strict=True"):
        package(sums(), "two-pass", {}, flat, False, {}, strict=True)


def test_planned_fallbacks_are_visible_but_not_errors_under_strict():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    comps = Components.from_tensors(X, Y, batch_size=3)
    with pytest.warns(PerSampleFallbackWarning, match=r"1\.weight.*no per-sample rule for PReLU"):
        res = probe(model, F.cross_entropy, comps, ETAS, batch_sizes=[1], strict=True)
    ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)


def test_bad_spot_checks_refused():
    X, Y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    comps = Components.from_tensors(X, Y, batch_size=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="spot_checks"):
            probe(nn.Linear(3, 2), F.cross_entropy, comps, batch_sizes=[1], spot_checks=bad)


# ----------------------------------------------------------------------------- factor keeping


def _lstm_lm():
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.rnn = nn.LSTM(4, 5, num_layers=2, batch_first=True)
            self.dec = nn.Linear(5, 11)

        def forward(self, x):
            return self.dec(self.rnn(self.emb(x))[0])

    gen = torch.Generator().manual_seed(1)
    X, Y = (
        torch.randint(0, 11, (10, 6), generator=gen),
        torch.randint(0, 11, (10, 6), generator=gen),
    )
    return LM().double(), Components.from_tensors(X, Y, batch_size=4), singles(X, Y)


def test_kept_route_equals_brute_force_and_says_what_it_kept():
    model, comps, ones = _lstm_lm()
    res = probe(model, lm_loss, comps, ETAS, batch_sizes=[1])
    assert res.route == "per-sample-kept"
    factors = res.info["factors"]
    assert factors["kept"] and 0 < factors["bytes"] <= factors["budget"] == 1 << 30
    assert factors["reason"] is None
    ref = reference_probe(model, lm_loss, ones, ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10)
    for eta in ETAS:
        assert res.clipped[eta][0] == pytest.approx(ref.clipped[eta][0], rel=1e-10)
        assert res.clipped[eta][1] == pytest.approx(ref.clipped[eta][1], rel=1e-10)
    assert res.verification["structural_checks"] > 0 and res.verification["spot_checks"] == 4


def test_kept_route_over_budget_auto_runs_two_passes_explicit_refuses():
    model, comps, ones = _lstm_lm()
    before = [p.detach().clone() for p in model.parameters()]
    res = probe(model, lm_loss, comps, ETAS, batch_sizes=[1], memory_budget=1000)
    assert res.route == "per-sample"
    factors = res.info["factors"]
    assert not factors["kept"] and factors["bytes"] > 1000
    assert "more than memory_budget=1000" in factors["reason"]
    ref = reference_probe(model, lm_loss, ones, ETAS)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10)
    with pytest.raises(ValueError, match=r"per-sample-kept.*memory_budget=1000.*per-sample"):
        probe(model, lm_loss, comps, ETAS, route="per-sample-kept", memory_budget=1000)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # the explicit two-pass route keeps nothing
    assert probe(model, lm_loss, comps, route="per-sample").info["factors"]["kept"] is False


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_per_sample_routes_keep_onednn_on_recurrent_models():
    """Neither route runs forward-mode AD on a recurrent model: its own kernels throughout.

    The kept route takes the dots from its factors, the two-pass route from the
    reverse-mode ghost product; an auto probe whose factors are dropped over the budget
    goes on as two passes (no restart: pass 1 ran with pass 2's kernels).
    """
    model, comps, ones = _lstm_lm()
    seen: list[bool] = []
    model.rnn.register_forward_hook(lambda m, i, o: seen.append(torch.backends.mkldnn.enabled))
    with torch.backends.mkldnn.flags(enabled=True):
        assert probe(model, lm_loss, comps, route="per-sample-kept").route == "per-sample-kept"
        assert seen and all(seen)
        seen.clear()
        probe(model, lm_loss, comps, route="per-sample")
        assert seen and all(seen)
        seen.clear()
        res = probe(model, lm_loss, comps, ETAS, batch_sizes=[1], memory_budget=1000)
        assert res.route == "per-sample" and "memory_budget=1000" in res.info["factors"]["reason"]
        assert seen and all(seen)
        # repeatability (2), autograd (1), independent samples (the first rows together,
        # then each alone); per chunk pass 1 and pass 2 (with η: the chunk's factors
        # formed again, its dots and clipped sums from them); the spot checks: no restart
        entry = 2 + 1 + 1 + res.info["independent_samples"]["samples"]
        assert len(seen) == entry + 2 * len(comps) + res.verification["spot_checks"]
    ref = reference_probe(model, lm_loss, ones, ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10)


def test_kept_route_estimate_from_the_first_chunk():
    """A budget between one chunk's factors and all of them: refused after chunk 1 of 3."""
    model, comps, _ = _lstm_lm()
    full = probe(model, lm_loss, comps, batch_sizes=[1]).info["factors"]["bytes"]
    with pytest.raises(ValueError, match="from 4 of 10 samples"):
        probe(model, lm_loss, comps, route="per-sample-kept", memory_budget=full // 2)


def test_kept_route_frees_its_factors():
    """The decoder's inputs are kept factors during the probe, and freed after it."""
    model, comps, _ = _lstm_lm()
    refs = []
    model.dec.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(i[0])))
    res = probe(model, lm_loss, comps, ETAS, batch_sizes=[1])
    assert res.route == "per-sample-kept"
    assert refs and all(r() is None for r in refs)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 5),
    P=st.integers(1, 7),
    Q=st.integers(1, 7),
    E=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_tokens_identities(B, T, P, Q, E, seed):
    """⟨Σ_t b_t a_tᵀ, V⟩ = Σ_t b_t·(V a_t) either way round; Σ_j w_j g_j = (w ⊙ b)ᵀ a."""
    from clipscope.engine.per_sample.factors import Tokens, token_dots

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, P, generator=gen, dtype=torch.float64)
    b = torch.randn(B, T, Q, generator=gen, dtype=torch.float64)
    V = torch.randn(Q, P, generator=gen, dtype=torch.float64)
    w = torch.rand(E, B, generator=gen, dtype=torch.float64)
    per = torch.einsum("btq,btp->bqp", b, a)
    torch.testing.assert_close(token_dots(a, b, V), (per * V).sum((1, 2)), rtol=1e-12, atol=1e-12)
    kept = Tokens(a, b, weight="weight", bias="bias", shape=(Q, P))
    torch.testing.assert_close(
        kept.weighted("weight", w), torch.einsum("eb,bqp->eqp", w, per), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(kept.weighted("bias", w), w @ b.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kept.sq("bias"), b.sum(1).square().sum(1), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- the functions


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_ghost_pass_losses_and_grad_sum():
    model = _mlp()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    out = ghost_pass(model, F.cross_entropy, x, y)
    batch_loss = F.cross_entropy(model(x), y)
    torch.testing.assert_close(out.losses.mean(), batch_loss.detach(), rtol=1e-12, atol=0)
    g = torch.autograd.grad(batch_loss * 6, list(model.parameters()))
    for a, b in zip(out.grad_sum, g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        per_sample_losses(model, F.cross_entropy, x, y).detach(), out.losses, rtol=0, atol=0
    )
    rows = per_sample_grads_reference(model, F.cross_entropy, x, y)
    torch.testing.assert_close(out.sq_norms, rows.square().sum(1), rtol=1e-12, atol=0)


def test_params_subset_with_a_tied_weight():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.mix = nn.Linear(4, 4)
            self.dec = nn.Linear(4, 6)
            self.dec.weight = self.emb.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.mix(self.emb(x))))

    model = Tied().double()
    x, y = torch.randint(0, 6, (3, 5)), torch.randint(0, 6, (3, 5))
    params = [model.mix.weight, model.dec.weight]  # dec.weight is the tied embedding
    rows = per_sample_grads_reference(model, lm_loss, x, y, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)  # both modules' rules, summed
        got = per_sample_sq_norms(model, lm_loss, x, y, params=params)
        v = [torch.randn_like(p) for p in params]
        flat = torch.cat([t.reshape(-1) for t in v])
        dots = per_sample_dots(model, lm_loss, x, y, v, params=params)
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(dots, rows @ flat, rtol=1e-10, atol=1e-12)


def test_single_sample_batch():
    model = _mlp()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    rows = per_sample_grads_reference(model, F.cross_entropy, x, y)
    got = per_sample_sq_norms(model, F.cross_entropy, x, y)
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-10, atol=0)


def test_model_untouched():
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(24, 2))
        .double()
        .eval()
    )
    x, y = torch.randn(4, 3, 8, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    per_sample_sq_norms(model, F.cross_entropy, x, y)
    n = sum(p.numel() for p in model.parameters())
    per_sample_dots(model, F.cross_entropy, x, y, torch.ones(n, dtype=torch.float64))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, (obj, vals) in zip(model.parameters(), grads, strict=True):
        assert p.grad is obj and torch.equal(p.grad, vals)
    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


def test_train_mode_batchnorm_refused():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(24, 2))
    x, y = torch.randn(4, 3, 8), torch.tensor([0, 1, 1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (per_sample_sq_norms, per_sample_losses):
        with pytest.raises(ValueError, match="eval-mode BatchNorm or GroupNorm"):
            fn(model, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="eval-mode BatchNorm"):
        per_sample_dots(model, F.cross_entropy, x, y, torch.zeros(1))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_vector_model_and_input_refused():
    model = _mlp()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="flat with"):
        per_sample_dots(model, F.cross_entropy, x, y, torch.zeros(3))
    with pytest.raises(ValueError, match="one tensor per parameter"):
        per_sample_dots(model, F.cross_entropy, x, y, [torch.zeros(3)])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        per_sample_sq_norms(lambda x: x, F.cross_entropy, torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="no samples"):
        per_sample_sq_norms(nn.Linear(3, 2), F.cross_entropy, torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="targets have shape"):
        per_sample_sq_norms(model, F.cross_entropy, x, y[:3])


def test_jvp_without_forward_rule_falls_back_for_the_dots():
    """Scaled-dot-product attention's CPU kernels have no forward-AD rule: the math kernel runs."""
    torch.manual_seed(0)
    model = NanoGPT().double()
    x, y = torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6))
    rows = per_sample_grads_reference(model, lm_loss, x, y)
    v = torch.randn(rows.shape[1], dtype=torch.float64)
    plan = Plan(model)
    dots = per_sample_dots(model, lm_loss, x, y, v, plan=plan)
    assert plan.dots_fallback is None
    torch.testing.assert_close(dots, rows @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["mlp", "lstm"])
def test_activations_freed(case):
    """No reference cycle (output -> grad_fn -> hook -> slot -> output) keeps a batch alive."""
    torch.manual_seed(0)
    if case == "mlp":
        model = _mlp()
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    else:
        model = nn.Sequential(nn.LSTM(3, 3, batch_first=True)).double()
        model = _LastStep(model[0])
        x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    refs = []
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.LSTM)):
            mod.register_forward_hook(
                lambda m, i, o: refs.append(weakref.ref(o if torch.is_tensor(o) else o[0]))
            )
    per_sample_sq_norms(model, F.cross_entropy, x, y)
    assert refs and all(r() is None for r in refs)


class _LastStep(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


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
    torch.testing.assert_close(gram_sq_norm(a, b), explicit, rtol=1e-12, atol=0)
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = per_sample_sq_norms(model, F.mse_loss, x, y)
    torch.testing.assert_close(got, rows.square().sum(1), rtol=1e-10, atol=1e-300)


class OnlyBare(nn.Module):
    """A bare parameter no layer rule serves: nothing is recorded in any pass."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


@pytest.mark.filterwarnings("ignore::clipscope.engine.verify.PerSampleFallbackWarning")
@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
@pytest.mark.parametrize("case", ["bare", "tie-demoted-in-chunk-0"])
def test_nothing_recorded_in_a_chunk_still_runs_and_is_exact(route, case):
    """No served module (from the start, or after chunk 0 moved the only one to the fallback)."""
    torch.manual_seed(0)
    if case == "bare":
        model = OnlyBare()
        X, Y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    else:
        model = GPTTie()
        X, Y = torch.tensor([[0], [1], [1], [0]]), torch.tensor([0, 1, 0, 1])
    ref = reference_probe(model, F.cross_entropy, Components.from_tensors(X, Y, batch_size=1), ETAS)
    res = probe(
        model, F.cross_entropy, Components.from_tensors(X, Y, batch_size=2), ETAS, route=route
    )
    rtol = 1e-10 if case == "bare" else 1e-6  # (GPTTie is float32)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=rtol)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=rtol, atol=1e-12)
    for eta in ETAS:
        assert res.clipped[eta][0] == pytest.approx(ref.clipped[eta][0], rel=rtol)


def test_passes_that_differ_move_the_dots_not_the_rules():
    """Randomness only pass 2 sees (noise under autograd) is named as such, not blamed on rules."""
    from clipscope.engine.verify import VerificationError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    comps = Components.from_tensors(X, Y, batch_size=4)

    noise = torch.Generator().manual_seed(0)  # not torch's global RNG, which the entry checks watch

    def noisy(out, y):  # pass 1's plain forward runs under autograd too: both passes differ
        scale = torch.rand((), generator=noise, dtype=out.dtype) if torch.is_grad_enabled() else 0
        return F.cross_entropy(out * (1 + scale), y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = probe(model, noisy, comps, ETAS, route="per-sample", spot_checks=0)
    stages = [(e["stage"], e["reason"]) for e in res.verification["events"]]
    assert stages and all(stage == "spot-dot" for stage, _ in stages), stages
    assert "does not reproduce pass 1's losses" in stages[0][1]
    assert res.verification["fallback"] == {} and res.verification["attempts"] == 2
    with pytest.raises(VerificationError, match="does not reproduce pass 1's losses"):
        probe(model, noisy, comps, ETAS, route="per-sample", spot_checks=0, strict=True)


@pytest.mark.filterwarnings("ignore::clipscope.engine.verify.PerSampleFallbackWarning")
@pytest.mark.parametrize("how", ["two-pass", "kept-dropped-over-budget"])
def test_two_pass_keeps_no_large_fallback_rows_and_stays_exact(monkeypatch, how):
    """Over the rows limit a chunk's dots and clipped sums come from the dot pass and backwards."""
    import importlib

    probe_module = importlib.import_module("clipscope.engine.per_sample_route")
    monkeypatch.setattr(probe_module, "_LIGHT_ROWS", 0)
    torch.manual_seed(0)
    model = prelu_mlp().double()  # PReLU's weight: on the fallback (F.prelu has no rule)
    X = torch.randn(6, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (6,))
    ones = Components.from_tensors(X, Y, batch_size=1)
    ref = reference_probe(model, F.cross_entropy, ones, ETAS)
    comps = Components.from_tensors(X, Y, batch_size=3)
    if how == "two-pass":
        res = probe(model, F.cross_entropy, comps, ETAS, route="per-sample")
    else:  # auto keeps the factors, drops them over the budget, forms them again per chunk
        res = probe(model, F.cross_entropy, comps, ETAS, batch_sizes=[1], memory_budget=1)
        assert res.info["factors"]["kept"] is False
    assert res.verification["fallback"]
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    scale = ref.norms * ref.grad_norm
    assert np.all(np.abs(res.dots - ref.dots) <= 1e-10 * scale)
    for eta in ETAS:
        assert res.clipped[eta][0] == pytest.approx(ref.clipped[eta][0], rel=1e-10)
        assert res.clipped[eta][1] == pytest.approx(ref.clipped[eta][1], rel=1e-9, abs=1e-9)


class _Scale(torch.autograd.Function):
    """``x * w`` behind a custom autograd.Function (its forward runs without a graph)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
def test_a_use_inside_a_custom_function_fails_the_structural_check(route):
    """The use recorder sees ``x * w`` inside the Function, but no gradient reaches it there."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return self.lin(_Scale.apply(x, self.w))

    torch.manual_seed(0)
    model = Model().double()
    X, Y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    comps = Components.from_tensors(X, Y, batch_size=3)
    with pytest.warns(PerSampleFallbackWarning, match=r"\bw\b.*\[structural\]"):
        res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1])
    ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10, atol=1e-14)
    assert set(res.verification["fallback"]) == {"w"}


class SequenceFirstLM(nn.Module):
    """``nn.TransformerEncoder(batch_first=False)``: the rules cannot tell T = B from B."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(8, 16)

    def forward(self, x):
        h = self.emb(x).transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.out(self.enc(h, mask=mask, is_causal=True).transpose(0, 1))


def next_token_loss(out, y):
    """Mean next-token cross-entropy of ``(B, T, V)`` logits against ``(B, T)`` tokens."""
    return F.cross_entropy(out[:, :-1].flatten(0, 1), y[:, 1:].flatten())


def test_the_fallback_hides_torchs_batching_rule_notes_and_names_each_parameter():
    """A new user's trial: ``nn.TransformerEncoder(batch_first=False)`` with T = chunk size.

    The rules cannot tell the sample axis; the spot check moves the parameters to the
    exact fallback. Its ``vmap(grad)`` leaked torch's "performance drop ... batching
    rule" UserWarnings (CPU flash attention), and every parameter's recorded reason
    named the first parameter.
    """
    torch.manual_seed(0)

    X = torch.randint(0, 16, (8, 4))
    comps = Components.from_tensors(X, X, batch_size=4)
    model = SequenceFirstLM().double().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = probe(model, next_token_loss, comps, batch_sizes=[1])
    assert [w for w in caught if issubclass(w.category, PerSampleFallbackWarning)]
    assert not [w for w in caught if "performance drop" in str(w.message)]
    ref = reference_probe(model, next_token_loss, singles(X, X))
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    fallback = res.verification["fallback"]
    assert fallback
    for name, why in fallback.items():
        if why.startswith("sample"):
            assert f"g_j({name})" in why, (name, why)
