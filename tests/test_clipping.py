"""Tests of the clipping operator against a float64 brute force and torch's clip_grad_norm_."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clipscope.clipping import (
    check_eta,
    clip,
    clip_factor,
    clip_grads_,
    clip_rows,
    grad_norm,
    row_norms,
)


def brute_clip(g: np.ndarray, eta: float) -> np.ndarray:
    """C(g; η) in float64 from the definition, the norm by Python's own ``math.hypot``."""
    g = np.asarray(g, dtype=np.float64)
    n = math.hypot(*g.ravel().tolist())
    return g if n <= eta else g * (eta / n)


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
vectors = arrays(np.float64, st.integers(1, 12), elements=finite)
etas = st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False)

BAD_ETAS = [
    0,
    0.0,
    -1.0,
    -math.inf,
    math.nan,
    True,
    False,
    "1.0",
    None,
    1 + 0j,
    [1.0],
    torch.tensor([1.0, 2.0]),
    np.array([1.0, 2.0]),
    np.float64(-2.0),
    torch.tensor(-1.0),
    torch.tensor(math.nan),
    10**400,
]


# --- check_eta -------------------------------------------------------------
@pytest.mark.parametrize(
    "eta, expected",
    [
        (2, 2.0),
        (0.5, 0.5),
        (math.inf, math.inf),
        (np.float32(0.25), 0.25),
        (np.int64(3), 3.0),
        (torch.tensor(1.5), 1.5),
        (np.array(4.0), 4.0),
    ],
    ids=repr,
)
def test_check_eta_accepts(eta, expected):
    assert check_eta(eta) == expected
    assert type(check_eta(eta)) is float


@pytest.mark.parametrize("eta", BAD_ETAS, ids=repr)
def test_check_eta_rejects(eta):
    with pytest.raises(ValueError, match="eta"):
        check_eta(eta)


@pytest.mark.parametrize("eta", BAD_ETAS, ids=repr)
def test_every_entry_point_rejects_bad_eta_before_changing(eta):
    g = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError):
        clip(g, eta)
    with pytest.raises(ValueError):
        clip_rows(g[None], eta)
    with pytest.raises(ValueError):
        clip_factor(5.0, eta)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = g.clone()
    with pytest.raises(ValueError):
        clip_grads_([p], eta)
    assert torch.equal(p.grad, g)


# --- clip against the brute force ------------------------------------------
@settings(deadline=None)
@given(g=vectors, eta=etas)
def test_clip_matches_brute_force(g, eta):
    out = clip(torch.from_numpy(g), eta).numpy()
    np.testing.assert_allclose(out, brute_clip(g, eta), rtol=1e-12, atol=1e-300)


@settings(deadline=None)
@given(g=vectors, eta=etas)
def test_clip_norm_at_most_eta(g, eta):
    out = clip(torch.from_numpy(g), eta)
    assert float(torch.linalg.vector_norm(out)) <= eta * (1 + 1e-12)


@settings(deadline=None)
@given(g=vectors, eta=etas)
def test_clip_idempotent(g, eta):
    once = clip(torch.from_numpy(g), eta)
    twice = clip(once, eta)
    torch.testing.assert_close(twice, once, rtol=1e-14, atol=0)


@settings(deadline=None)
@given(g=vectors)
def test_clip_infinite_eta_is_bitwise_identity(g):
    t = torch.from_numpy(g)
    out = clip(t, math.inf)
    assert torch.equal(out, t)
    assert out.data_ptr() != t.data_ptr()


@settings(deadline=None)
@given(g=vectors, eta=etas, a=st.floats(1e-3, 1e3))
def test_clip_positive_homogeneity(g, eta, a):
    t = torch.from_numpy(g)
    torch.testing.assert_close(clip(a * t, a * eta), a * clip(t, eta), rtol=1e-12, atol=1e-300)


@settings(deadline=None)
@given(g=vectors, eta=etas)
def test_clip_inside_ball_is_bitwise_unchanged(g, eta):
    t = torch.from_numpy(g)
    n = float(torch.linalg.vector_norm(t))
    if n <= eta:
        assert torch.equal(clip(t, eta), t)
    # a threshold exactly at the norm never clips (the operator's own norm: the unscaled
    # vector_norm above loses digits when the squares are subnormal, e.g. entries of 1e-159)
    exact = float(grad_norm(t))
    if exact > 0:
        assert torch.equal(clip(t, exact), t)


def test_clip_zero_is_zero_and_input_not_modified():
    z = torch.zeros(3, 2)
    assert torch.equal(clip(z, 1.0), z)
    g = torch.tensor([[3.0, 4.0]])
    before = g.clone()
    out = clip(g, 1.0)
    assert torch.equal(g, before)
    assert out.shape == g.shape and out.dtype == g.dtype
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8]]))


def test_clip_norm_is_over_the_whole_tensor():
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(clip(g, 1.0), g / 5)


def test_clip_numpy_in_numpy_out():
    g = np.array([3.0, 4.0], dtype=np.float32)
    out = clip(g, 1.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("bad", [[3.0, 4.0], 5.0, "g"], ids=repr)
def test_clip_rejects_non_arrays(bad):
    with pytest.raises(TypeError):
        clip(bad, 1.0)


def test_clip_rejects_integer_tensor():
    with pytest.raises(TypeError, match="floating"):
        clip(torch.tensor([3, 4]), 1.0)


# --- overflow: a finite gradient whose squared norm overflows -----------------
@pytest.mark.parametrize(
    "dtype, big", [(torch.float32, 2e22), (torch.float64, 1e200)], ids=["f32", "f64"]
)
def test_overflowing_finite_gradient_is_clipped(dtype, big):
    g = torch.tensor([big, big, 1.0], dtype=dtype)
    assert torch.isinf(torch.linalg.vector_norm(g))  # the naive norm overflows
    out = clip(g, 1.0)
    assert torch.isfinite(out).all()
    assert abs(float(torch.linalg.vector_norm(out.double())) - 1.0) < 1e-6
    torch.testing.assert_close(out[0], out[1])
    assert float(grad_norm(g)) == pytest.approx(big * math.sqrt(2), rel=1e-7)


def test_underflowing_tiny_gradient_norm_is_exact():
    g = torch.tensor([3e-200, 4e-200], dtype=torch.float64)
    assert float(grad_norm(g)) == pytest.approx(5e-200, rel=1e-15)


# --- non-finite gradients ----------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=repr)
def test_clip_nonfinite(bad):
    g = torch.tensor([1.0, bad])
    with pytest.raises(ValueError, match="norm"):
        clip(g, 1.0)
    out = clip(g, 1.0, error_if_nonfinite=False)
    assert torch.isnan(out).all()  # never silently zero
    assert torch.equal(clip(g, math.inf, error_if_nonfinite=False).isnan(), g.isnan())


# --- clip_factor ---------------------------------------------------------------
def test_clip_factor_kinds():
    n = np.array([0.0, 1.0, 2.0, 4.0, np.nan])
    np.testing.assert_array_equal(clip_factor(n, 2.0), [1.0, 1.0, 1.0, 0.5, np.nan])
    t = torch.tensor([0.0, 1.0, 4.0, math.nan])
    out = clip_factor(t, 2.0)
    assert out.dtype == t.dtype
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 0.5, math.nan]), equal_nan=True)
    assert clip_factor(0.0, 1.0) == 1.0 and isinstance(clip_factor(3.0, 1.0), float)
    assert clip_factor(np.float64(4.0), 2.0) == 0.5


# --- clip_rows -------------------------------------------------------------------
@settings(deadline=None)
@given(
    G=arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 5)),
        elements=finite,
    ),
    eta=etas,
)
def test_clip_rows_matches_row_by_row(G, eta):
    out = clip_rows(torch.from_numpy(G), eta).numpy()
    expected = np.stack([brute_clip(row, eta) for row in G])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(
        row_norms(torch.from_numpy(G)).numpy(),
        [math.hypot(*row) for row in G.tolist()],
        rtol=1e-12,
    )


def test_clip_rows_errors():
    with pytest.raises(ValueError, match="2-D"):
        clip_rows(torch.ones(3), 1.0)
    G = torch.tensor([[1.0, 0.0], [math.nan, 1.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="row 1"):
        clip_rows(G, 1.0)
    out = clip_rows(G, 1.0, error_if_nonfinite=False)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    assert clip_rows(torch.ones(2, 0), 1.0).shape == (2, 0)


# --- clip_grads_ -----------------------------------------------------------------
def make_params(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    ps = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * 3
    return ps


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("eta", [0.5, 2.0, 1e6, math.inf])
def test_clip_grads_matches_clip_of_concatenation(eta, foreach):
    ps = make_params(0)
    flat = torch.cat([p.grad.ravel() for p in ps])
    norm = clip_grads_(ps, eta, foreach=foreach)
    assert norm.dtype == torch.float64 and norm.dim() == 0
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-14)
    after = torch.cat([p.grad.ravel() for p in ps])
    np.testing.assert_allclose(after.numpy(), brute_clip(flat.numpy(), eta), rtol=1e-14)


def test_clip_grads_skips_none_and_counts_tied_once():
    ps = make_params(1)
    ps[1].grad = None
    flat = torch.cat([ps[0].grad.ravel(), ps[2].grad.ravel()])
    norm = clip_grads_([ps[0], ps[1], ps[2], ps[0]], 1.0)  # ps[0] listed twice: tied
    assert float(norm) == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-14)
    assert ps[1].grad is None
    after = torch.cat([ps[0].grad.ravel(), ps[2].grad.ravel()])
    assert float(torch.linalg.vector_norm(after)) == pytest.approx(1.0, rel=1e-14)


def test_clip_grads_accepts_single_tensor_and_generator():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert float(clip_grads_(p, 1.0)) == 5.0
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    clip_grads_(model.parameters(), 0.1)
    total = torch.cat([q.grad.ravel() for q in model.parameters()])
    assert float(torch.linalg.vector_norm(total)) <= 0.1 * (1 + 1e-6)


def test_clip_grads_no_gradients_is_an_error():
    with pytest.raises(ValueError, match="none of the 0"):
        clip_grads_([], 1.0)
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="gradient"):
        clip_grads_([p], 1.0)
    # torch silently returns 0 for the same input
    assert float(torch.nn.utils.clip_grad_norm_([p], 1.0)) == 0.0
    with pytest.raises(TypeError):
        clip_grads_([1.0], 1.0)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=repr)
def test_clip_grads_nonfinite_leaves_grads_untouched(bad):
    ps = make_params(2, torch.float32)
    ps[2].grad[1, 0, 1] = bad
    before = [p.grad.clone() for p in ps]
    with pytest.raises(ValueError, match=r"parameter 2 \(shape \(2, 2, 2\)\)"):
        clip_grads_(ps, 1.0)
    for p, b in zip(ps, before, strict=True):
        assert torch.equal(p.grad.isnan(), b.isnan())
        assert torch.equal(torch.nan_to_num(p.grad), torch.nan_to_num(b))
    norm = clip_grads_(ps, 1.0, error_if_nonfinite=False)
    assert not math.isfinite(float(norm))
    assert all(torch.isnan(p.grad).all() for p in ps)


def test_clip_grads_overflow_float32():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([2e22, 2e22])
    norm = clip_grads_([p], 1.0)
    assert float(norm) == pytest.approx(2e22 * math.sqrt(2), rel=1e-7)
    torch.testing.assert_close(p.grad, torch.full((2,), 1 / math.sqrt(2)))


# --- the differences from torch.nn.utils.clip_grad_norm_ ---------------------------
def _torch_and_ours(grad: torch.Tensor, eta: float):
    p, q = torch.nn.Parameter(torch.zeros_like(grad)), torch.nn.Parameter(torch.zeros_like(grad))
    p.grad, q.grad = grad.clone(), grad.clone()
    torch.nn.utils.clip_grad_norm_([p], eta)
    clip_grads_([q], eta)
    return p.grad, q.grad


def test_torch_clips_below_eta_we_clip_to_eta():
    eta = 1e-3
    theirs, ours = _torch_and_ours(torch.tensor([3.0, 4.0], dtype=torch.float64), eta)
    assert float(theirs.norm()) == pytest.approx(eta * 5 / (5 + 1e-6), rel=1e-12)
    assert float(theirs.norm()) < eta * (1 - 1e-7)
    assert float(ours.norm()) == pytest.approx(eta, rel=1e-15)


def test_torch_shrinks_a_gradient_already_at_eta():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    theirs, ours = _torch_and_ours(g, 5.0)
    assert not torch.equal(theirs, g) and float(theirs.norm()) < 5.0
    assert torch.equal(ours, g)


def test_torch_flips_for_negative_threshold_we_refuse():
    g = torch.tensor([3.0, 4.0])
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], -1.0)
    assert (p.grad * g < 0).all()  # torch reverses the gradient
    p.grad = g.clone()
    with pytest.raises(ValueError, match=r"-1\.0"):
        clip_grads_([p], -1.0)
    assert torch.equal(p.grad, g)


def test_torch_zeroes_an_overflowing_finite_gradient_we_clip_it():
    theirs, ours = _torch_and_ours(torch.tensor([2e22, 1.0]), 1.0)
    assert torch.equal(theirs, torch.zeros(2))
    torch.testing.assert_close(ours, torch.tensor([1.0, 5e-23]))


def test_torch_turns_inf_into_nan_we_raise():
    g = torch.tensor([math.inf, 1.0])
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert torch.isnan(p.grad[0]) and p.grad[1] == 0
    p.grad = g.clone()
    with pytest.raises(ValueError, match="parameter 0"):
        clip_grads_([p], 1.0)
    assert torch.equal(p.grad, g)


@settings(max_examples=50, deadline=None)
@given(g=arrays(np.float64, st.integers(1, 8), elements=finite), eta=etas)
def test_agrees_with_torch_up_to_its_epsilon(g, eta):
    theirs, ours = _torch_and_ours(torch.from_numpy(g), eta)
    n = float(np.linalg.norm(g))
    # torch's factor min(1, η/(n+1e-6)) differs from ours by at most a factor 1e-6/η·...
    tol = 1e-6 / max(n, 1e-300) + 1e-14
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=tol, atol=1e-300)


def test_torch_double_counts_a_tied_parameter_we_count_it_once():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = g.clone()
    theirs = torch.nn.utils.clip_grad_norm_([p, p], 1.0)
    assert float(theirs) == pytest.approx(5 * math.sqrt(2))
    assert float(p.grad.norm()) < 0.2  # scaled twice
    p.grad = g.clone()
    assert float(clip_grads_([p, p], 1.0)) == 5.0
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    ps = make_params(3)
    cpu = [p.grad.clone() for p in ps]
    flat = torch.cat([g.ravel() for g in cpu])
    qs = [torch.nn.Parameter(p.detach().cuda()) for p in ps]
    for q, g in zip(qs, cpu, strict=True):
        q.grad = g.cuda()
    norm = clip_grads_(qs, 1.0)
    assert norm.device.type == "cuda" and norm.dtype == torch.float64
    assert float(norm) == pytest.approx(float(flat.norm()), rel=1e-14)
    after = torch.cat([q.grad.cpu().ravel() for q in qs])
    np.testing.assert_allclose(after.numpy(), brute_clip(flat.numpy(), 1.0), rtol=1e-14)
    big = torch.tensor([2e22, 2e22], device="cuda")
    assert torch.isfinite(clip(big, 1.0)).all()
    assert clip(big, 1.0).device.type == "cuda"


# --- sparse gradients (nn.Embedding(sparse=True)) ------------------------------
def _sparse(indices, values, size):
    return torch.sparse_coo_tensor(
        torch.tensor([indices]), torch.tensor(values), size, check_invariants=True
    )


def test_sparse_norm_coalesces_duplicates():
    g = _sparse([1, 1, 3], [[3.0, 0.0], [1.0, 0.0], [0.0, 3.0]], (4, 2))  # row 1 = [4, 0]
    assert not g.is_coalesced()
    assert float(grad_norm(g)) == 5.0
    assert float(grad_norm([g, torch.tensor([12.0])])) == 13.0


@settings(deadline=None, max_examples=30)
@given(
    rows=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    eta=etas,
    seed=st.integers(0, 2**16),
)
def test_sparse_clip_equals_dense_clip(rows, eta, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(len(rows), 3, generator=gen, dtype=torch.float64) * 10
    g = torch.sparse_coo_tensor(torch.tensor([rows]), values, (5, 3), check_invariants=True)
    out = clip(g, eta)
    assert out.layout == torch.sparse_coo and out.dtype == g.dtype
    torch.testing.assert_close(out.to_dense(), clip(g.to_dense(), eta), rtol=1e-15, atol=0)
    assert float(grad_norm(out)) <= eta * (1 + 1e-12)
    torch.testing.assert_close(g._values(), values)  # input untouched


def test_clip_grads_sparse_in_place_and_mixed_with_dense():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    lin = torch.nn.Linear(2, 1)
    loss = lin(emb(torch.tensor([1, 1, 2]))).sum()
    loss.backward()
    dense = torch.cat(
        [emb.weight.grad.to_dense().reshape(-1), lin.weight.grad.reshape(-1), lin.bias.grad]
    )
    expected = float(torch.linalg.vector_norm(dense.double()))
    total = clip_grads_(list(emb.parameters()) + list(lin.parameters()), 0.5)
    assert float(total) == pytest.approx(expected, rel=1e-12)
    after = torch.cat(
        [emb.weight.grad.to_dense().reshape(-1), lin.weight.grad.reshape(-1), lin.bias.grad]
    )
    torch.testing.assert_close(after.double(), dense.double() * (0.5 / expected), rtol=1e-6, atol=0)
    assert emb.weight.grad.layout == torch.sparse_coo


def test_clip_grads_sparse_nonfinite():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = _sparse([0, 2], [[1.0, float("inf")], [1.0, 2.0]], (3, 2))
    before = p.grad.clone()
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3, 2\)\)"):
        clip_grads_([p], 1.0)
    torch.testing.assert_close(p.grad.to_dense(), before.to_dense())
    clip_grads_([p], 1.0, error_if_nonfinite=False)
    assert torch.isnan(p.grad.coalesce().values()).all()


def test_clip_rows_refuses_sparse():
    with pytest.raises(TypeError, match="dense"):
        clip_rows(_sparse([0], [[1.0, 2.0]], (2, 2)), 1.0)
