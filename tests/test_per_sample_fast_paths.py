"""The per-sample route's fast paths (issue 21's speed and memory work) against float64.

Each fast path must give what the slow, obviously correct form gives:

* :func:`sum64` (a float64 copy, then the sum, in blocks) is the float64 sum of the
  same numbers, whatever the blocks;
* :meth:`Directions.of_rows` (the structural check's projection read from
  per-sample matrices in the work dtype) is :meth:`Directions.of_tensor` of their sum;
* a bias served alone keeps ``Σ_t b_t`` only, and a small view kept as rows does not
  keep its storage alive, with every quantity unchanged;
* the attempts of the per-sample route run the model's own attention kernel where no
  forward-mode AD runs and no random numbers are drawn, the math backend otherwise.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from clipscope.components import Components
from clipscope.engine import probe, reference_probe
from clipscope.engine.per_sample import _common
from clipscope.engine.per_sample._common import Directions, sum64
from clipscope.engine.per_sample.batch import draws_masks, kernels_for_derivatives
from clipscope.engine.per_sample.factors import Rows, Tokens, storage_bytes, tensors_of


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    block=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_sum64_is_the_float64_sum_in_any_blocks(shape, block, seed, data):
    """Blocks along dim 0 (summed over, or not) change nothing beyond float64 rounding."""
    dims = tuple(
        sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1), label="dims"))
    )
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen) * 10.0 ** torch.randint(-3, 4, shape, generator=gen)
    with mock.patch.object(_common, "SUM64_BLOCK", block):
        got = sum64(t, dims)
    want = t.double().sum(dims)
    assert got.dtype == torch.float64 and got.shape == want.shape
    scale = t.double().abs().sum(dims)  # float64 rounding is relative to Σ|t|
    assert bool(((got - want).abs() <= 1e-14 * scale + 1e-300).all())


def test_sum64_keeps_what_float32_accumulation_loses():
    """2^24 + 1 + ... + 1 in float32 stays 2^24; in float64 every 1 counts."""
    t = torch.ones(3, 1000)
    t[:, 0] = 2.0**24
    torch.testing.assert_close(sum64(t, (1,)), torch.full((3,), 2.0**24 + 999, dtype=torch.float64))
    exact = math.fsum(t.double().reshape(-1).tolist())
    assert float(sum64(t, (0, 1))) == exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 5, 3), (4, 1, 7), (4, 6, 1)])
def test_of_rows_is_of_tensor_of_the_sum(dtype, shape):
    """The projection of Σ_j G_j, read from the per-sample matrices, for all rows or a block."""
    gen = torch.Generator().manual_seed(0)
    B, Q, P = shape
    G = torch.randn(B, Q, P, generator=gen, dtype=torch.float64)
    dirs = Directions((Q, P), k=3, generator=gen)
    want = dirs.of_tensor(G.sum(0))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    scale = float(G.abs().sum()) * float(dirs.u.abs().max() * dirs.w.abs().max())
    got = dirs.of_rows(G.to(dtype))
    assert float((got - want).abs().max()) <= tol * scale
    got_flat = dirs.of_rows(G.to(dtype).reshape(B, -1))  # Rows keep (B, numel)
    assert float((got_flat - want).abs().max()) <= tol * scale
    rows = slice(1, Q) if Q > 1 else slice(0, 1)
    block = G[:, rows]
    want_block = dirs.of_tensor(
        torch.zeros(Q, P, dtype=torch.float64).index_copy(0, torch.arange(Q)[rows], block.sum(0))
    )
    got_block = dirs.of_rows(block.to(dtype), rows=rows)
    assert float((got_block - want_block).abs().max()) <= tol * scale


def test_a_bias_alone_keeps_its_per_sample_sums_only():
    """Tokens(None, b) keeps Σ_t b_t (B, Q), not b (B, T, Q); every quantity as before."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(4, 50, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(3, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    dirs = Directions((3,), k=2, generator=gen)
    kept = Tokens(None, b, bias="bias")
    per = b.sum(1)  # the per-sample bias gradients
    assert kept.b is None and kept.nbytes == per.numel() * per.element_size()
    torch.testing.assert_close(kept.sq("bias"), per.square().sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(kept.dots({"bias": v}), per @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kept.weighted("bias", w), w @ per, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        kept.proj("bias", dirs), dirs.of_tensor(per.sum(0)), rtol=1e-12, atol=1e-12
    )


def test_a_small_view_kept_as_rows_does_not_keep_its_storage():
    """A class token's slice (B, 1, D) of a (B, T, D) gradient: copied, the same numbers."""
    big = torch.randn(4, 100, 8, dtype=torch.float64)
    view = big[:, :1]
    rows = Rows({"cls": view})
    assert storage_bytes(tensors_of(rows)) == view.numel() * 8
    torch.testing.assert_close(rows.rows["cls"], view, rtol=0, atol=0)
    whole = Rows({"pos": big})  # the whole storage: kept as it is, no copy
    assert whole.rows["pos"].data_ptr() == big.data_ptr()


# ----------------------------------------------------------------------------- the kernel


class _Attend(nn.Module):
    """A causal self-attention block through F.scaled_dot_product_attention (as nanoGPT).

    Its attention dropout (``dropout_p`` in training mode) beside a dropout module on
    the residual, as Hugging Face and nanoGPT blocks have.
    """

    def __init__(self, d: int = 8, p: float = 0.0) -> None:
        super().__init__()
        self.qkv, self.out, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)
        self.drop = nn.Dropout(p)
        self.flash_enabled: list[bool] = []

    def forward(self, x):
        self.flash_enabled.append(torch.backends.cuda.flash_sdp_enabled())
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        p = self.drop.p if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.head(self.drop(self.out(h.transpose(1, 2).flatten(2))).mean(1))


def test_kernels_math_only_where_forward_ad_runs_or_masks_are_drawn():
    model = _Attend().eval()
    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()
    with kernels_for_derivatives(model, onednn=True):  # an attempt, eval mode: the model's own
        assert torch.backends.cuda.flash_sdp_enabled() == before[0]
    with kernels_for_derivatives(model):  # forward-mode AD: the math backend
        assert not torch.backends.cuda.flash_sdp_enabled()
    model.train()
    assert draws_masks(model)
    with kernels_for_derivatives(model, onednn=True):  # masks may be drawn: one kernel
        assert not torch.backends.cuda.flash_sdp_enabled()
    mha = nn.MultiheadAttention(8, 2).eval()
    assert not draws_masks(mha)
    with kernels_for_derivatives(mha, onednn=True):  # the fast path bypasses the rules' hooks
        assert not torch.backends.mha.get_fastpath_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()) == (
        before
    )


@pytest.mark.parametrize("route", ["per-sample-kept", "per-sample"])
def test_eval_mode_attempts_run_the_models_own_kernel_exactly(route):
    """Eval mode: the model's own attention kernel, every quantity exact.

    Every forward of the probe (after the repeatability check's two) runs it, and the
    norms, dots, losses, ‖∇f‖ and clipped sums equal the float64 brute force.
    """
    torch.manual_seed(0)
    model = _Attend().double().eval()
    x = torch.randn(12, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    comps = Components.from_tensors(x, y, batch_size=4)
    res = probe(model, F.cross_entropy, comps, [0.5], route=route)
    assert res.route == route  # no fallback
    assert len(model.flash_enabled) > 2 and all(model.flash_enabled[2:])
    single = Components.from_tensors(x, y, batch_size=1)
    ref = reference_probe(model, F.cross_entropy, single, [0.5])
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-10)
    np.testing.assert_allclose(res.grad_norm, ref.grad_norm, rtol=1e-10)
    np.testing.assert_allclose(res.clipped[0.5][0], ref.clipped[0.5][0], rtol=1e-10)


def test_train_mode_attention_dropout_runs_one_kernel_throughout():
    """Attention dropout under fixed masks: the math backend throughout.

    Every forward of both routes runs it, so they see the same masks: the two-pass
    route's passes agree (no dots fallback) and both routes give the same numbers.
    """
    results = {}
    for route in ("per-sample-kept", "per-sample"):
        torch.manual_seed(0)
        model = _Attend(p=0.3).double().train()
        x = torch.randn(12, 5, 8, dtype=torch.float64)
        y = torch.randint(0, 3, (12,))
        comps = Components.from_tensors(x, y, batch_size=4)
        res = probe(model, F.cross_entropy, comps, [0.5], route=route, dropout="fixed", seed=3)
        assert res.route == route  # no fallback, no dots fallback
        # the checks at probe entry (repeatability, autograd, sample independence) run the
        # default kernel, each self-consistent; every forward of the attempt after them, math
        flags = model.flash_enabled
        first = flags.index(False)
        assert not any(flags[first:]) and len(flags) - first >= 2 * len(comps), flags
        results[route] = res
    kept, two = results["per-sample-kept"], results["per-sample"]
    np.testing.assert_allclose(two.norms, kept.norms, rtol=1e-10)
    np.testing.assert_allclose(two.dots, kept.dots, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.clipped[0.5][0], kept.clipped[0.5][0], rtol=1e-10)
