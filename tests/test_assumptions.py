"""What the engine assumes and checks at run time (issue 24), each against a float64 brute force.

* Merging (dyadic): a parent's loss is the weighted mean of its children's. Losses
  that are not (token means over padded batches, class weights, InfoNCE, batch
  centring) fall back to a pass per batch size; losses that declare their weights
  (``(sum, count)``) merge exactly by them. Every level is compared with the brute
  force at that batch size: ``Components`` built at it, and ``reference_probe``.
* Buffers a forward rewrites and reads (train-mode ``spectral_norm``): every
  component from the probe-start buffers; the per-sample route refuses by name; a
  pass-2 mismatch beyond tolerance is an error.
* Reentrant activation checkpointing: refused before anything runs (probe, Monitor).
* Batch coupling on the per-sample route: refused before anything runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from clipscope import Components, Monitor, probe
from clipscope.engine import reference_probe
from clipscope.engine.losses import declared_mean, mean_loss
from clipscope.engine.verify import (
    MergeFallbackWarning,
    VerificationError,
    check_pass_mismatch,
)
from clipscope.errors import NonFiniteError

ETAS = [0.3, math.inf]


def assert_same(res, ref, rtol=1e-10):
    """Compare a route's result with the brute force's: norms, dots, losses, ‖∇f‖, clipped sums."""
    np.testing.assert_allclose(res.norms, ref.norms, rtol=rtol, atol=1e-300)
    scale = float(np.max(np.abs(ref.dots))) + 1e-300
    np.testing.assert_allclose(res.dots, ref.dots, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(res.losses, ref.losses, rtol=rtol)
    np.testing.assert_array_equal(res.sizes, ref.sizes)
    assert res.grad_norm == pytest.approx(ref.grad_norm, rel=rtol)
    for eta in ref.clipped:
        assert res.clipped[eta][0] == pytest.approx(ref.clipped[eta][0], rel=rtol)
        assert res.clipped[eta][1] == pytest.approx(ref.clipped[eta][1], rel=rtol, abs=rtol)


# -- weighted losses: the models, data and losses of each case ----------------------------
class TinyLM(nn.Module):
    """``Embedding(10, 4) + Linear(4, 10)``: logits ``(B, T, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 10)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def token_mean(out, y):
    """Hugging Face's token mean: CE over the targets that are not ``ignore_index=-100``."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100)


def token_sum(out, y):
    """Return the same loss with its weight: ``(Σ CE over real targets, their count)``."""
    y = y.reshape(-1)
    total = F.cross_entropy(out.reshape(-1, out.shape[-1]), y, ignore_index=-100, reduction="sum")
    return total, (y != -100).sum()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=20, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).double().eval()


def _pad(items):
    """Pad a batch to its longest sequence: ``input_ids``, ``attention_mask``, ``labels`` -100."""
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, it in enumerate(items):
        ids[j, : len(it["input_ids"])] = it["input_ids"]
        mask[j, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _gpt2_data(batch_size):
    g = torch.Generator().manual_seed(3)
    lengths = [2, 6, 3, 5, 6, 2, 4, 6, 3, 5, 2, 6]  # length 2: a single target after the shift
    ds = [{"input_ids": torch.randint(1, 20, (n,), generator=g)} for n in lengths]
    return Components.from_dataset(ds, batch_size, seed=0, collate_fn=_pad)


def hf_loss(model, batch):
    """Return the model's own token-mean loss, as a Hugging Face fine-tune writes it."""
    return model(**batch).loss


def hf_declared(model, batch):
    """Return the same loss as (sum, count): the logits, shifted, summed over real targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:].reshape(-1)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), (
        labels != -100
    ).sum()


CLASS_WEIGHT = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)


def weighted_ce(out, y):
    return F.cross_entropy(out, y, weight=CLASS_WEIGHT)


def weighted_ce_sum(out, y):
    return F.cross_entropy(out, y, weight=CLASS_WEIGHT, reduction="sum"), CLASS_WEIGHT[y].sum()


def info_nce(out, y):
    """In-batch InfoNCE: view 0 of each sample against view 1 of every sample of the batch."""
    z = F.normalize(out, dim=-1)
    logits = z[:, 0] @ z[:, 1].T / 0.5
    return F.cross_entropy(logits, torch.arange(len(out)))


def info_nce_sum(out, y):
    z = F.normalize(out, dim=-1)
    logits = z[:, 0] @ z[:, 1].T / 0.5
    return F.cross_entropy(logits, torch.arange(len(out)), reduction="sum"), len(out)


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum"), torch.tensor(len(y))


class Centre(nn.Module):
    """Batch centring: ``x - mean over the batch`` (couples the samples)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _centred():
    return nn.Sequential(nn.Linear(5, 6), Centre(), nn.Tanh(), nn.Linear(6, 3)).double()


def _tensors(n, shape, classes, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return X, torch.randint(0, classes, (n,), generator=g)


def _lm_tensors():
    """Return the issue's smallest case: 2 sequences of 3 tokens; sample 0 has one target."""
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, 10, (2, 3), generator=g), torch.randint(0, 10, (2, 3), generator=g)
    Y[0, 1:] = -100
    return X, Y


def _lm_padded():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randint(0, 10, (10, 5), generator=g), torch.randint(0, 10, (10, 5), generator=g)
    for j, n in enumerate([1, 5, 2, 4, 5, 3, 1, 5, 2, 4]):  # real targets per sample
        Y[j, n:] = -100
    return X, Y


def _from(data, seed=0):
    X, Y = data
    return lambda b: Components.from_tensors(X, Y, b, seed=seed)


@dataclass(frozen=True)
class MergeCase:
    id: str
    model_fn: Callable[[], nn.Module]
    comps_fn: Callable[[int], Components]  # the partition at a batch size
    loss: Callable
    sizes: list[int]
    additive: bool  # a parent's loss is the weighted mean of its children's


MERGE_CASES = [
    # the smallest case: Embedding(10,4)+Linear LM, a single target token, [1, 2]
    MergeCase("smallest-lm", lambda: TinyLM().double(), _from(_lm_tensors()), token_mean,
              [1, 2], False),
    MergeCase("smallest-lm-declared", lambda: TinyLM().double(), _from(_lm_tensors()),
              token_sum, [1, 2], True),
    MergeCase("padded-lm", lambda: TinyLM().double(), _from(_lm_padded()), token_mean,
              [2, 4, 8], False),
    MergeCase("padded-lm-declared", lambda: TinyLM().double(), _from(_lm_padded()),
              token_sum, [2, 4, 8], True),
    MergeCase("hf-gpt2", _gpt2, _gpt2_data, hf_loss, [2, 4, 8], False),
    MergeCase("hf-gpt2-declared", _gpt2, _gpt2_data, hf_declared, [2, 4, 8], True),
    MergeCase("class-weights", _mlp, _from(_tensors(22, (5,), 3, 0)), weighted_ce,
              [3, 6, 12], False),
    MergeCase("class-weights-declared", _mlp, _from(_tensors(22, (5,), 3, 0)),
              weighted_ce_sum, [3, 6, 12], True),
    MergeCase("infonce", lambda: nn.Linear(6, 4).double(), _from(_tensors(16, (2, 6), 1, 4)),
              info_nce, [4, 8, 16], False),
    MergeCase("infonce-declared", lambda: nn.Linear(6, 4).double(),
              _from(_tensors(16, (2, 6), 1, 4)), info_nce_sum, [4, 8, 16], False),
    MergeCase("batch-centring", _centred, _from(_tensors(20, (5,), 3, 5)), F.cross_entropy,
              [2, 4, 8], False),
    MergeCase("batch-centring-declared", _centred, _from(_tensors(20, (5,), 3, 5)), ce_sum,
              [2, 4, 8], False),
    # controls: a plain mean loss is additive in the sample counts, declared or not
    MergeCase("plain-mean", _mlp, _from(_tensors(22, (5,), 3, 6)), F.cross_entropy,
              [3, 6, 12], True),
    MergeCase("plain-mean-declared", _mlp, _from(_tensors(22, (5,), 3, 6)), ce_sum,
              [3, 6, 12], True),
]  # fmt: skip


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c.id)
def test_every_dyadic_level_equals_the_brute_force_at_its_batch_size(case):
    """Merged where the loss is additive, else a pass per batch size; exact either way.

    Additive: by declared weights or by sample counts. Else each larger batch size by its
    own pass, visibly.
    """
    torch.manual_seed(0)
    model = case.model_fn()
    comps = case.comps_fn(case.sizes[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = probe(model, case.loss, comps, ETAS, batch_sizes=case.sizes)
    merged = [w for w in caught if issubclass(w.category, MergeFallbackWarning)]
    record = res[case.sizes[0]].verification["merge"]
    assert record["passed"] is case.additive
    assert res.route == "dyadic"
    if case.additive:
        assert not merged and record["own_pass"] == []
        assert record["max_error"] <= record["tolerance"]
    else:
        assert len(merged) == 1 and record["own_pass"] == case.sizes[1:]
        assert "not the weighted mean of its children" in str(merged[0].message)
        assert getattr(case.loss, "__qualname__", "") in record["reason"]
    declared = "declared" in case.id
    assert record["weights"] == ("declared" if declared else "samples")
    for b in case.sizes:
        ref = reference_probe(model, case.loss, case.comps_fn(b), ETAS)
        assert_same(res[b], ref)


@pytest.mark.parametrize(
    "plain, declared, rtol",
    # (Hugging Face computes its loss from logits.float(): float32 even in a float64 model)
    [(MERGE_CASES[0], MERGE_CASES[1], 1e-12), (MERGE_CASES[4], MERGE_CASES[5], 1e-6),
     (MERGE_CASES[6], MERGE_CASES[7], 1e-12)],
    ids=["smallest-lm", "hf-gpt2", "class-weights"],
)  # fmt: skip
def test_a_declared_weight_loss_defines_the_same_components(plain, declared, rtol):
    """``(sum, count)`` gives f_i = sum/count: the mean form's f_i and g_i, any batch size."""
    torch.manual_seed(0)
    model = plain.model_fn()
    for b in plain.sizes:
        a = reference_probe(model, plain.loss, plain.comps_fn(b), ETAS)
        d = reference_probe(model, declared.loss, declared.comps_fn(b), ETAS)
        assert_same(d, a, rtol=rtol)


def test_the_smallest_case_was_about_100_percent_off_when_merged_by_sample_counts():
    """What the merge check prevents: merging the issue's LM by sample counts is far off."""
    torch.manual_seed(0)
    case = MERGE_CASES[0]
    model = case.model_fn()
    ref = reference_probe(model, case.loss, case.comps_fn(2), ETAS)
    one = reference_probe(model, case.loss, case.comps_fn(1), ETAS)
    merged_loss = float(one.losses.mean())  # what a size-weighted merge would report
    assert abs(merged_loss - ref.losses[0]) > 1e-3 * abs(ref.losses[0])


@pytest.mark.parametrize(
    "case", [MERGE_CASES[0], MERGE_CASES[6], MERGE_CASES[8]], ids=lambda c: c.id
)
def test_strict_refuses_a_loss_that_merging_would_get_wrong(case):
    torch.manual_seed(0)
    with pytest.raises(VerificationError, match=r"not the weighted mean.*strict=True"):
        probe(case.model_fn(), case.loss, case.comps_fn(case.sizes[0]), batch_sizes=case.sizes,
              strict=True)  # fmt: skip


def test_the_merge_check_costs_a_few_parents_per_level():
    """Per level the first and the last parent (and their children): forwards, not passes."""
    torch.manual_seed(0)
    model = _mlp()
    comps = _from(_tensors(64, (5,), 3, 7))(2)
    model.calls = []
    model.register_forward_pre_hook(lambda mod, args: mod.calls.append(args[0].shape[0]))
    res = probe(model, F.cross_entropy, comps, batch_sizes=[2, 4, 8, 16])
    record = res[2].verification["merge"]
    assert record["parents"] == 3 * 2 and record["passed"]
    # 2 entry checks + 1 autograd check, then the merge check, then 2 passes of 32 components
    check = model.calls[3 : len(model.calls) - 64]
    assert sorted(set(check)) == [2, 4, 8, 16]
    # the first and the last parent per level, and their children each once: the top level's
    # two parents hold components 0..7 and 24..31, which hold every lower checked parent's
    assert check.count(2) == 16
    assert sum(check) == 2 * (4 + 8 + 16) + 2 * 16


def test_the_per_sample_route_takes_each_samples_own_weighted_mean():
    """Per-sample components of a declared-weight loss: ℓ_j = sum_j / count_j.

    Each sample weighs 1/N in f (objective (1) at batch size 1): the brute force at
    batch size 1.
    """
    torch.manual_seed(0)
    model = TinyLM().double()
    X, Y = _lm_padded()
    comps = Components.from_tensors(X, Y, 4, seed=0)
    singles = Components.from_tensors(X, Y, 1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served by the rules: no fallback
        res = probe(model, token_sum, comps, ETAS, batch_sizes=[1])
    assert res.route == "per-sample-kept"
    assert_same(res, reference_probe(model, token_sum, singles, ETAS))
    assert_same(res, reference_probe(model, token_mean, singles, ETAS))
    res2 = probe(model, token_sum, comps, ETAS, route="per-sample")
    assert_same(res2, reference_probe(model, token_sum, singles, ETAS))
    # class weights: a sample's weighted mean is its own unweighted loss
    mlp = _mlp()
    X, Y = _tensors(12, (5,), 3, 8)
    res = probe(mlp, weighted_ce_sum, Components.from_tensors(X, Y, 4), ETAS, batch_sizes=[1])
    assert_same(res, reference_probe(mlp, F.cross_entropy, Components.from_tensors(X, Y, 1), ETAS))


def test_a_sample_without_weight_is_refused_on_the_per_sample_route():
    torch.manual_seed(0)
    X, Y = _lm_padded()
    Y[9] = -100  # no target at all: its weighted mean is undefined
    with pytest.raises(NonFiniteError, match=r"samples \[\d+\] are not finite"):
        probe(TinyLM().double(), token_sum, Components.from_tensors(X, Y, 5), batch_sizes=[1])


def test_declared_weights_are_validated():
    total = torch.tensor(3.0, requires_grad=True)
    assert declared_mean((total, 3))[1] == 3.0
    with pytest.raises(ValueError, match=r"count = 0\.0.*finite weight > 0"):
        declared_mean((total, torch.tensor(0)))
    with pytest.raises(ValueError, match="depends on the parameters"):
        declared_mean((total, total * 2))
    with pytest.raises(ValueError, match=r"scalar tensor.*\(sum, count\).*got tuple of 3"):
        declared_mean((total, 1, 2))
    with pytest.raises(ValueError, match=r"got \(2,\)"):
        declared_mean(torch.ones(2))
    f = mean_loss(token_sum)
    assert mean_loss(f) is f and mean_loss(F.cross_entropy)(torch.zeros(1, 2), torch.tensor([0]))
    # through the probe: a batch with no target at all
    X, Y = _lm_tensors()
    Y[0] = -100
    with pytest.raises(ValueError, match=r"component 0 .*count = 0\.0"):
        probe(TinyLM().double(), token_sum, Components.from_tensors(X, Y, 1), route="two-pass")


def test_some_components_declaring_weights_and_others_not_is_refused_by_the_dyadic_route():
    X, Y = _tensors(8, (5,), 3, 9)

    def odd(out, y):
        return ce_sum(out, y) if y[0] % 2 else F.cross_entropy(out, y)

    with pytest.raises(ValueError, match="some components and a mean for others"):
        probe(_mlp(), odd, Components.from_tensors(X, Y, 2), batch_sizes=[2, 4])


# -- buffers a forward rewrites and reads ----------------------------------------------------
def _spectral():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(6, 8)),
        nn.Tanh(),
        nn.utils.spectral_norm(nn.Linear(8, 3)),
    ).double()


def held_brute_force(model, loss_fn, comps):
    """Each component's gradient from the same (probe-start) buffers, float64, explicit sums."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = {n: b.clone() for n, b in model.named_buffers()}
    rows, losses = [], []
    for i in range(len(comps)):
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        x, y = comps.batch(i)
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
        losses.append(float(loss))
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])
    G = torch.stack(rows)
    full = G.mean(0)
    return G.norm(dim=1).numpy(), (G @ full).numpy(), float(full.norm()), np.array(losses)


def _check_held(res, model, comps):
    norms, dots, gnorm, losses = held_brute_force(model, F.cross_entropy, comps)
    np.testing.assert_allclose(res.norms, norms, rtol=1e-10)
    np.testing.assert_allclose(res.dots, dots, rtol=1e-10, atol=1e-10 * np.abs(dots).max())
    np.testing.assert_allclose(res.losses, losses, rtol=1e-12)
    assert res.grad_norm == pytest.approx(gnorm, rel=1e-10)


@pytest.mark.parametrize("route", ["two-pass", "keep", "dyadic"])
def test_spectral_norm_components_are_evaluated_from_the_probe_start_buffers(route):
    model = _spectral()
    X, Y = _tensors(48, (6,), 3, 10)
    comps = Components.from_tensors(X, Y, 6, seed=0)
    before = {n: b.clone() for n, b in model.named_buffers()}
    sizes = [6, 12] if route == "dyadic" else None
    res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=sizes)
    for n, b in model.named_buffers():  # the model left as found
        assert torch.equal(b, before[n]), n
    first = res[6] if route == "dyadic" else res
    held = first.info["buffers_held"]
    assert {"0.parametrizations.weight.0._u", "2.weight_u", "2.weight_v"} <= set(held)
    assert first.info["max_pass_mismatch"] == 0.0
    _check_held(first, model, comps)
    if route == "dyadic":
        assert res[12].verification["merge"]["passed"]
        _check_held(res[12], model, Components.from_tensors(X, Y, 12, seed=0))


def test_the_per_sample_route_refuses_spectral_norm_by_its_buffers_not_dropout():
    model = _spectral()
    X, Y = _tensors(16, (6,), 3, 11)
    with pytest.raises(ValueError, match=r"rewrite.*weight_u") as info:
        probe(model, F.cross_entropy, Components.from_tensors(X, Y, 8), batch_sizes=[1])
    assert "dropout" not in str(info.value)
    model.eval()  # in eval mode spectral_norm reads its vectors without writing them
    res = probe(model, F.cross_entropy, Components.from_tensors(X, Y, 8), batch_sizes=[1])
    assert res.info["buffers_held"] == []


@pytest.mark.parametrize("route", ["two-pass", "keep"])
def test_train_mode_batchnorm_keeps_its_own_batch_statistics_and_its_running_stats(route):
    """BatchNorm's running statistics, written but not read in train mode: held, restored.

    Holding them changes no number; they are restored after the probe.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, Y = _tensors(24, (5,), 3, 12)
    comps = Components.from_tensors(X, Y, 6, seed=0)
    before = model[1].running_mean.clone()
    res = probe(model, F.cross_entropy, comps, ETAS, route=route)
    assert torch.equal(model[1].running_mean, before)
    assert "1.running_mean" in res.info["buffers_held"]
    _check_held(res, model, comps)


class Drift(nn.Module):
    """A hidden state outside the buffers that changes every forward, by 1e-7 relative."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1 + 1e-7 * self.calls)


@pytest.mark.parametrize("strict", [False, True])
def test_a_pass_mismatch_above_tolerance_is_an_error_strict_or_not(strict):
    model = Drift().double()
    X, Y = _tensors(16, (4,), 3, 13)
    # small enough for the repeatability check (1e-5), far above float64's tolerance (1e-9)
    with pytest.raises(VerificationError, match=r"pass 2 recomputed.*tolerance 1e-09"):
        probe(model, F.cross_entropy, Components.from_tensors(X, Y, 4), route="two-pass",
              strict=strict)  # fmt: skip
    check_pass_mismatch(1e-4, torch.float32, 4)  # at the tolerance: accepted
    with pytest.raises(VerificationError, match=r"difference of 0\.00076"):
        check_pass_mismatch(7.6e-4, torch.float32, 4)


# -- reentrant activation checkpointing --------------------------------------------------------
class Checkpointed(nn.Module):
    """A block under ``torch.utils.checkpoint``; ``raw``: its input is the data itself."""

    def __init__(self, reentrant: bool, raw: bool = False) -> None:
        super().__init__()
        self.reentrant, self.raw = reentrant, raw
        self.inp, self.block, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        if self.raw:  # no input of the region requires grad: torch gives block no gradient
            h = checkpoint(self.inp, x, use_reentrant=self.reentrant)
            return self.head(torch.tanh(self.block(torch.tanh(h))))
        h = torch.tanh(self.inp(x))
        h = checkpoint(lambda t: torch.tanh(self.block(t)), h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("raw", [False, True], ids=["in-graph", "raw-input"])
@pytest.mark.parametrize("route", ["two-pass", "keep", "dyadic", "per-sample"])
def test_reentrant_checkpointing_is_refused_before_anything_runs(route, raw):
    torch.manual_seed(0)
    model = Checkpointed(reentrant=True, raw=raw).double()
    X, Y = _tensors(16, (5,), 3, 14)
    comps = Components.from_tensors(X, Y, 4)
    sizes = {"dyadic": [4, 8], "per-sample": [1]}.get(route)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "None of the inputs have requires_grad"
        with pytest.raises(ValueError, match=r"reentrant.*use_reentrant=False"):
            probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=sizes)


def test_a_monitor_refuses_reentrant_checkpointing_at_construction():
    torch.manual_seed(0)
    X, Y = _tensors(16, (5,), 3, 15)
    comps = Components.from_tensors(X, Y, 4)
    with pytest.raises(ValueError, match=r"reentrant.*use_reentrant=False"):
        Monitor(Checkpointed(reentrant=True).double(), F.cross_entropy, comps, eta=1.0, every=1)
    monitor = Monitor(Checkpointed(reentrant=False).double(), F.cross_entropy, comps, eta=1.0,
                      every=1)  # fmt: skip
    monitor.close()


def test_non_reentrant_checkpointing_is_exact():
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False).double()
    X, Y = _tensors(16, (5,), 3, 16)
    comps = Components.from_tensors(X, Y, 4)
    for route, sizes in [("two-pass", None), ("dyadic", [4, 8])]:
        res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=sizes)
        res = res[4] if sizes else res
        assert_same(res, reference_probe(model, F.cross_entropy, comps, ETAS))
    res = probe(model, F.cross_entropy, comps, ETAS, batch_sizes=[1])
    assert_same(res, reference_probe(model, F.cross_entropy, Components.from_tensors(X, Y, 1),
                                     ETAS))  # fmt: skip


# -- batch coupling on the per-sample route ---------------------------------------------------
class FunctionalBatchNorm(nn.Module):
    """Train-mode batch normalization through ``F.batch_norm``: no BatchNorm module to name."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True)


class InBatchInfoNCE(nn.Module):
    """An in-batch contrastive head: each sample's InfoNCE term against the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)

    def forward(self, x):
        z = F.normalize(self.enc(x), dim=-1)
        logits = z[:, 0] @ z[:, 1].T / 0.5
        return F.cross_entropy(logits, torch.arange(len(x)), reduction="none")[:, None]


def mean_of_output(out, y):
    return out.mean()


COUPLED = [
    ("functional-batchnorm", lambda: nn.Sequential(nn.Linear(5, 6), FunctionalBatchNorm(6),
                                                   nn.Tanh(), nn.Linear(6, 3)),
     (5,), F.cross_entropy, "alone cannot be evaluated"),
    ("batch-centring", lambda: nn.Sequential(nn.Linear(5, 6), Centre(), nn.Tanh(),
                                             nn.Linear(6, 3)),
     (5,), F.cross_entropy, "in a batch of 8 and"),
    ("in-batch-infonce", InBatchInfoNCE, (2, 6), mean_of_output, "in a batch of 8 and"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, model_fn, shape, loss_fn, words", COUPLED, ids=[c[0] for c in COUPLED]
)
def test_the_per_sample_route_refuses_a_model_that_couples_the_samples(
    name, model_fn, shape, loss_fn, words
):
    torch.manual_seed(0)
    model = model_fn().double()
    X, Y = _tensors(32, shape, 3, 17)
    comps = Components.from_tensors(X, Y, 16)
    for route in ("auto", "per-sample"):
        with pytest.raises(ValueError, match=r"do not interact") as info:
            probe(model, loss_fn, comps, ETAS, route=route, batch_sizes=[1])
        assert words in str(info.value) and "two-pass" in str(info.value)
    # the mini-batch routes serve it: each component a batch with its own statistics
    res = probe(model, loss_fn, comps, ETAS, route="two-pass")
    assert_same(res, reference_probe(model, loss_fn, comps, ETAS))


def test_the_coupling_check_leaves_fixed_dropout_and_independent_samples_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    X, Y = _tensors(24, (5,), 3, 18)
    res = probe(model, F.cross_entropy, Components.from_tensors(X, Y, 12), batch_sizes=[1],
                dropout="fixed")  # fmt: skip
    record = res.info["independent_samples"]
    assert record["checked"] and record["samples"] == 8 and record["max_error"] <= 1e-12


class _NanBackward(torch.autograd.Function):
    """Identity forward; a NaN gradient for sample 1 of each batch (the losses stay finite)."""

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[1] = float("nan")
        return g


class _NanModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_NanBackward.apply(self.a(x)))


@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
def test_a_non_finite_per_sample_gradient_names_the_chunk(route):
    torch.manual_seed(0)
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    comps = Components.from_tensors(X, Y, batch_size=4)
    with pytest.raises(NonFiniteError, match=r"^chunk 0\b.*nothing was changed"):
        probe(_NanModel().double(), F.cross_entropy, comps, [1.0], route=route, batch_sizes=[1])
