"""The per-sample structural check's strength, pinned in float32 (issue 24, item 8).

A rule that is a few percent wrong must fall back, visibly, with exact numbers;
one that is wrong by a few times the tolerance τ (1e-4 in float32) must too, so
that a tolerance ten times looser fails these tests. The check must still serve
what is right: the key biases of Hugging Face BERT and ViT, whose gradients
vanish by symmetry (rounding on both sides).

The wrong rule: ``nn.Linear.forward`` patched so that one layer scales half its
weight's rows by ``factor``; the Linear rule still claims it (its forward is still
"nn.Linear.forward") and accounts for the unscaled weight, so its per-sample
gradients of those rows are off by ``factor - 1``.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipscope import Components, probe
from clipscope.engine import reference_probe
from clipscope.engine.per_sample import per_sample_sq_norms
from clipscope.engine.verify import PerSampleFallbackWarning, VerificationError

ETAS = [0.5, math.inf]


@dataclass(frozen=True)
class Wrong:
    id: str
    factor: float  # half the target layer's weight rows are scaled by it in forward
    layer: int  # which Linear of the MLP (0, 1, 2)
    batch: int  # samples in the chunk


WRONG = [
    # a 5 % scale of half the rows: the per-sample gradients about 3 % wrong (3.5 % of the
    # weight's batch gradient); a tolerance 1000 times looser lets these through
    Wrong("3%-first-layer-64", 1.05, 0, 64),
    Wrong("3%-middle-layer-256", 1.05, 1, 256),
    Wrong("3%-first-layer-256", 1.05, 0, 256),
    # a few times τ: a tolerance ten times looser lets these through (and so did the check
    # that measured the error against the plain sum of the per-sample norms plus τ·‖G‖)
    Wrong("0.03%-first-layer-256", 1.0005, 0, 256),
    Wrong("0.05%-last-layer-64", 1.001, 2, 64),
]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def _data(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 10, generator=g), torch.randint(0, 3, (batch,), generator=g)


@pytest.fixture
def wrong_rule(monkeypatch):
    """Patch nn.Linear.forward: ``target`` layers scale half their weight rows by ``factor``."""
    targets: dict[int, float] = {}
    plain = nn.Linear.forward

    def forward(self, x):
        factor = targets.get(id(self))
        if factor is None:
            return plain(self, x)
        scale = torch.ones(self.weight.shape[0], 1, dtype=self.weight.dtype)
        scale[: self.weight.shape[0] // 2] = factor
        return F.linear(x, self.weight * scale, self.bias)

    monkeypatch.setattr(nn.Linear, "forward", forward)  # still "nn.Linear.forward"

    def wrong(model, layer, factor):
        targets[id(model[2 * layer])] = factor
        return model

    return wrong


def brute_force_sq_norms(model, x, y):
    """Each sample's own float64 gradient, its squared norm."""
    out = []
    for j in range(len(x)):
        loss = F.cross_entropy(model(x[j : j + 1]), y[j : j + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        out.append(sum(float(g.double().square().sum()) for g in grads))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("case", WRONG, ids=lambda c: c.id)
def test_a_wrong_float32_rule_fails_the_structural_check(case, wrong_rule):
    model = wrong_rule(_mlp(), case.layer, case.factor)
    X, Y = _data(case.batch)
    name = f"{2 * case.layer}.weight"
    with pytest.warns(PerSampleFallbackWarning, match=rf"{re.escape(name)}.*structural") as rec:
        sq = per_sample_sq_norms(model, F.cross_entropy, X, Y)
    error = float(re.search(r"relative error (\S+) >", str(rec[0].message)).group(1))
    # an error of relative size ρ shows as about ρ (module docstring of verify)
    rho = (case.factor - 1) * math.sqrt(0.5)
    assert 0.1 * rho < error < 2 * rho
    # the numbers come from the exact fallback: as each sample's own gradient
    double = wrong_rule(copy.deepcopy(model).double(), case.layer, case.factor)
    expected = brute_force_sq_norms(double, X.double(), Y)
    torch.testing.assert_close(sq, expected, rtol=2e-5, atol=0)


def test_the_wrong_rule_is_caught_in_a_probe_with_exact_results(wrong_rule):
    """Structurally at the first chunk (no spot check needed), then exact through the fallback."""
    model = wrong_rule(_mlp(), 1, 1.05)
    X, Y = _data(96)
    comps = Components.from_tensors(X, Y, 32)
    double = wrong_rule(copy.deepcopy(model).double(), 1, 1.05)
    ref = reference_probe(double, F.cross_entropy, Components.from_tensors(X.double(), Y, 1), ETAS)
    for spot_checks in (0, 4):
        with pytest.warns(PerSampleFallbackWarning, match=r"2\.weight.*\[structural\]"):
            res = probe(model, F.cross_entropy, comps, ETAS, batch_sizes=[1],
                        spot_checks=spot_checks)  # fmt: skip
        assert res.route.endswith("+fallback") and "2.weight" in res.verification["fallback"]
        np.testing.assert_allclose(res.norms, ref.norms, rtol=2e-5)
        np.testing.assert_allclose(
            res.dots, ref.dots, rtol=2e-4, atol=2e-5 * np.abs(ref.dots).max()
        )
        assert res.grad_norm == pytest.approx(ref.grad_norm, rel=2e-5)
    with pytest.raises(VerificationError, match=r"2\.weight.*structural"):
        probe(model, F.cross_entropy, comps, batch_sizes=[1], strict=True)


def test_a_right_float32_rule_passes_far_below_the_tolerance():
    """The same MLP without the patch: every rule served, the largest error far below τ."""
    X, Y = _data(256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        res = probe(_mlp(), F.cross_entropy, Components.from_tensors(X, Y, 128), batch_sizes=[1])
    assert res.verification["fallback"] == {}
    assert res.verification["structural_max_error"] < 1e-6


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval(), "input_ids"


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config).eval(), "pixel_values"


class Logits(nn.Module):
    """A Hugging Face classifier as ``model(x) -> logits``."""

    def __init__(self, hf: nn.Module, key: str) -> None:
        super().__init__()
        self.hf, self.key = hf, key

    def forward(self, x):
        return self.hf(**{self.key: x}).logits


@pytest.mark.parametrize(
    "build, make_x",
    [(_bert, lambda g: torch.randint(0, 50, (24, 8), generator=g)),
     (_vit, lambda g: torch.randn(24, 3, 8, 8, generator=g))],
    ids=["bert", "vit"],
)  # fmt: skip
def test_hugging_face_key_biases_are_served_in_float32(build, make_x):
    """The key biases' gradients vanish by symmetry: the check must not call that an error."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Logits(*build())
    g = torch.Generator().manual_seed(0)
    X, Y = make_x(g), torch.randint(0, 3, (24,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        res = probe(model, F.cross_entropy, Components.from_tensors(X, Y, 12), ETAS,
                    batch_sizes=[1])  # fmt: skip
    assert res.route == "per-sample-kept" and res.verification["fallback"] == {}
    X64 = X.double() if X.is_floating_point() else X
    ref = reference_probe(copy.deepcopy(model).double(), F.cross_entropy,
                          Components.from_tensors(X64, Y, 1), ETAS)  # fmt: skip
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-4)
    assert res.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4)
