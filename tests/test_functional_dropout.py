"""Attention dropout applied functionally is refused under ``dropout="off"``, exact under "fixed".

A Hugging Face attention module in train mode passes its dropout probability to
``F.scaled_dot_product_attention(dropout_p=...)`` (SDPA) or ``F.dropout`` (eager)
itself: the ``"off"`` policy puts the ``nn.Dropout`` modules in eval mode but
cannot reach that. On a random-init BERT the masks change the loss by ~1e-5
relative, about :data:`~clipscope.engine.losses.REPEAT_TOLERANCE`, so comparing
two losses passed or failed by chance (and a passing probe returned statistics
of a random-mask objective). ``check_repeatable`` now refuses any forward that
draws from torch's generator under ``"off"``, whatever the caller's RNG state.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipscope import Components
from clipscope.engine import probe, reference_probe
from clipscope.engine.losses import REPEAT_TOLERANCE, check_repeatable
from clipscope.engine.per_sample.batch import check_independent_samples

transformers = pytest.importorskip("transformers")

ROUTES = {
    "keep": {"route": "keep"},
    "two-pass": {"route": "two-pass"},
    "dyadic": {"levels": 2},
    "per-sample": {"batch_sizes": [1]},
}


class Logits(nn.Module):
    """A Hugging Face classifier as ``model(x) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def bert(attention: str) -> nn.Module:
    """Return a tiny random BERT in train mode, default dropout probabilities (0.1)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
        attn_implementation=attention,
    )  # fmt: skip
    return Logits(transformers.BertForSequenceClassification(config)).train()


class SDPADropout(nn.Module):
    """Minimal attention: SDPA with ``dropout_p`` while in train mode, no dropout module."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # x: (batch, tokens, 4)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        p = 0.1 if self.training else 0.0
        return self.out(F.scaled_dot_product_attention(q, k, v, dropout_p=p).mean(1))


def tokens(n: int = 16) -> Components:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50, (n, 8), generator=g), torch.randint(0, 2, (n,), generator=g)
    return Components.from_tensors(x, y, batch_size=4)


def sequences(n: int = 16) -> Components:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 5, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Components.from_tensors(x, y, batch_size=4)


def test_bert_attention_dropout_changes_the_loss_by_about_the_tolerance():
    """Why comparing losses alone was a coin flip: the effect is of the tolerance's size."""
    model, comps = bert("sdpa"), tokens()
    x, y = comps.batch(0)
    for layer in model.modules():
        if isinstance(layer, nn.Dropout):
            layer.eval()
    with torch.no_grad():
        losses = []
        for s in range(6):
            torch.manual_seed(s)
            losses.append(float(F.cross_entropy(model(x), y)))
    spread = (max(losses) - min(losses)) / max(losses)
    assert 0 < spread < 100 * REPEAT_TOLERANCE


@pytest.mark.parametrize("caller_seed", [0, 1, 2])
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_off_refuses_functional_attention_dropout_on_every_route(attention, route, caller_seed):
    model, comps = bert(attention), tokens()
    torch.manual_seed(caller_seed)  # whatever the caller's RNG state: refused every time
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"dropout='off'.*drew random numbers.*model\.eval\(\)"):
        probe(model, F.cross_entropy, comps, dropout="off", **ROUTES[route])
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("route", list(ROUTES))
def test_off_refuses_sdpa_dropout_p_of_a_minimal_module(route):
    with pytest.raises(ValueError, match=r"drew random numbers.*dropout='fixed'"):
        probe(SDPADropout(), F.cross_entropy, sequences(), **ROUTES[route])


def test_the_refusal_names_the_attention_modules_in_train_mode():
    model, comps = bert("eager"), tokens()
    with pytest.raises(ValueError, match=r"model\.bert\.encoder\.layer\.0\.attention"):
        check_repeatable(
            model, F.cross_entropy, comps, form="output_target", dropout="off", seed=0,
            device=torch.device("cpu"),
        )  # fmt: skip


@pytest.mark.parametrize("route", ["keep", "two-pass", "dyadic"])
def test_eval_mode_bert_is_accepted_and_exact_against_float64_brute_force(route):
    model, comps = bert("eager").eval(), tokens()
    result = probe(model, F.cross_entropy, comps, **ROUTES[route])
    result = result[4] if route == "dyadic" else result
    brute = reference_probe(copy.deepcopy(model).double(), F.cross_entropy, comps)
    np.testing.assert_allclose(result.norms, brute.norms, rtol=1e-4)
    np.testing.assert_allclose(result.dots, brute.dots, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("route", ["keep", "two-pass"])
def test_fixed_gives_one_mask_per_component_and_matches_the_brute_force(route):
    """Fixed masks control functional dropout: it draws from the forked, seeded RNG."""
    model, comps = bert("eager"), tokens()
    result = probe(model, F.cross_entropy, comps, dropout="fixed", seed=3, **ROUTES[route])
    again = probe(model, F.cross_entropy, comps, dropout="fixed", seed=3, **ROUTES[route])
    np.testing.assert_array_equal(result.norms, again.norms)
    assert result.info["max_pass_mismatch"] == 0.0
    brute = reference_probe(model, F.cross_entropy, comps, dropout="fixed", seed=3)
    np.testing.assert_allclose(result.norms, brute.norms, rtol=1e-5)
    other = reference_probe(model, F.cross_entropy, comps, dropout="fixed", seed=4)
    assert not np.allclose(brute.norms, other.norms, rtol=1e-9, atol=0)  # masks are in it


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_monitor_constructor_refuses_the_same_way(attention):
    from clipscope import Monitor

    model, comps = bert(attention), tokens()
    with pytest.raises(ValueError, match=r"drew random numbers.*model\.eval\(\)"):
        Monitor(model, F.cross_entropy, comps, eta=1.0, every=2, dropout="off")
    Monitor(model, F.cross_entropy, comps, eta=1.0, every=2, dropout="fixed")
    Monitor(model.eval(), F.cross_entropy, comps, eta=1.0, every=2, dropout="off")


class OwnGenerator(nn.Module):
    """Randomness from a generator of its own: no policy controls it, "fixed" does not help."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.fc(x * (1 + 0.5 * torch.rand(x.shape, generator=self.gen)))


@pytest.mark.parametrize("dropout", ["off", "fixed"])
def test_randomness_outside_the_global_generator_is_refused_without_suggesting_fixed(dropout):
    comps = Components.from_tensors(torch.randn(8, 4), torch.randint(0, 3, (8,)), batch_size=4)
    with pytest.raises(ValueError, match=r"changed between two evaluations") as err:
        probe(OwnGenerator(), F.cross_entropy, comps, route="keep", dropout=dropout)
    assert "dropout='fixed' (" not in str(err.value)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_forward_drawing_only_with_gradients_on_is_refused_too(route):
    """check_repeatable runs without gradients; the autograd-compatibility forward sees this."""

    def noisy(out, y):
        scale = torch.rand(()) if torch.is_grad_enabled() else 0.0
        return F.cross_entropy(out * (1 + scale), y)

    comps = Components.from_tensors(torch.randn(16, 3), torch.randint(0, 2, (16,)), batch_size=4)
    with pytest.raises(ValueError, match=r"drew random numbers.*with gradients on"):
        probe(nn.Linear(3, 2), noisy, comps, **ROUTES[route])


def test_the_hessian_routes_refuse_functional_dropout_under_off():
    """hvp, full_gradient, hessian_norm (of f and of f_i) and the secant: the probe's checks."""
    from clipscope.engine.hvp import full_gradient, hvp
    from clipscope.smoothness import hessian_norm, trajectory_smoothness_from_states

    model, comps = SDPADropout(), sequences()
    v = [torch.ones_like(p) for p in model.parameters()]
    state = {k: t.clone() for k, t in model.state_dict().items()}
    calls = [
        lambda: hvp(model, F.cross_entropy, comps, v),
        lambda: full_gradient(model, F.cross_entropy, comps),
        lambda: hessian_norm(model, F.cross_entropy, comps, max_iter=3),
        lambda: hessian_norm(model, F.cross_entropy, comps, max_iter=3, component=1),
        lambda: trajectory_smoothness_from_states(model, F.cross_entropy, comps, state, state),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"drew random numbers"):
            call()
    model.eval()  # no draw: the same calls run
    assert torch.isfinite(hvp(model, F.cross_entropy, comps, v)).all()
    assert hessian_norm(model, F.cross_entropy, comps, max_iter=3).hess_norm >= 0


# ----------------------------------------------------------------------------- coupling


class CoupledSDPA(SDPADropout):
    """:class:`SDPADropout` whose features are centred over the batch: samples interact."""

    def __init__(self, coupled: bool) -> None:
        super().__init__()
        self.coupled = coupled

    def forward(self, x):
        if self.coupled:
            x = x - 0.5 * x.mean(0, keepdim=True)
        return super().forward(x)


@pytest.mark.parametrize("coupled", [True, False])
def test_functional_dropout_does_not_hide_coupled_samples(coupled):
    """Under "fixed", train-mode attention dropout made the independence check unable to tell.

    It then returned ``checked: False`` and a per-sample result of a model whose samples
    interact (a finding of a new user's trial on GPT-2). The check now looks again with
    every module in eval mode: the coupling is refused, and an uncoupled model passes
    with ``checked: "eval mode"``.
    """
    torch.manual_seed(0)
    model = CoupledSDPA(coupled).train()
    comps = sequences()
    if coupled:
        with pytest.raises(ValueError, match=r"interact.*compared with every module in eval mode"):
            probe(model, F.cross_entropy, comps, batch_sizes=[1], dropout="fixed")
        return
    # an uncoupled model passes, checked in eval mode (probing it per sample under "fixed"
    # is another matter: a sample's mask in the batch is not its mask alone, and the route
    # refuses after its spot checks)
    x, y = comps.batch(0)
    record = check_independent_samples(model, F.cross_entropy, x, y, 1e-5)
    assert record["checked"] == "eval mode" and record["max_error"] <= 1e-5
    assert model.training  # the eval-mode comparison left the modes as they were
