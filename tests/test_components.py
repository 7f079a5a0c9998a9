import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope.components import Components, SequentialComponents, detach_state


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    b=st.integers(1, 17),
    seed=st.one_of(st.none(), st.integers(0, 5)),
    drop=st.booleans(),
)
def test_partition_covers_samples_once(n, b, seed, drop):
    X = torch.arange(n, dtype=torch.float64)
    if drop and n < b:
        with pytest.raises(ValueError, match="m = 0"):
            Components.from_tensors(X, X, batch_size=b, seed=seed, drop_last=drop)
        return
    comps = Components.from_tensors(X, X, batch_size=b, seed=seed, drop_last=drop)
    seen = torch.cat([comps.batch(i)[0] for i in range(comps.m)]).long()
    assert len(set(seen.tolist())) == len(seen) == sum(comps.sizes)
    expected_m = n // b if drop else -(-n // b)
    assert comps.m == len(comps) == expected_m
    assert all(s == b for s in comps.sizes[:-1])
    assert comps.n_dropped == n - sum(comps.sizes)
    if seed is None:
        assert seen.tolist() == list(range(len(seen)))
    json.dumps(comps.describe())


def test_seeded_partition_is_reproducible_and_nested():
    X = torch.randn(37, 3)
    Y = torch.arange(37)
    a = Components.from_tensors(X, Y, batch_size=4, seed=3)
    b = Components.from_tensors(X, Y, batch_size=4, seed=3)
    c = Components.from_tensors(X, Y, batch_size=8, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.indices, b.indices, strict=True))
    # a batch of size 2B is the union of two consecutive batches of size B
    for j in range(c.m):
        assert torch.equal(c.indices[j], torch.cat(a.indices[2 * j : 2 * j + 2]))
    assert not torch.equal(a.order, Components.from_tensors(X, Y, batch_size=4, seed=4).order)


def test_from_dataset_matches_from_tensors():
    X, Y = torch.randn(11, 2), torch.arange(11)
    ds = torch.utils.data.TensorDataset(X, Y)
    a = Components.from_dataset(ds, batch_size=3, seed=1)
    b = Components.from_tensors(X, Y, batch_size=3, seed=1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_bad_inputs():
    X = torch.zeros(5)
    with pytest.raises(ValueError, match="m = 0"):
        Components.from_tensors(X[:0], X[:0], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Components.from_tensors(X, X, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        Components.from_tensors(X, X, batch_size=2.0)
    with pytest.raises(ValueError, match="first dimension"):
        Components.from_tensors(X, X[:4], batch_size=2)
    with pytest.raises(TypeError, match="seed"):
        Components.from_tensors(X, X, batch_size=2, seed="1")
    with pytest.raises(IndexError):
        Components.from_tensors(X, X, batch_size=2).batch(3)


@pytest.mark.parametrize("drop", [False, True])
def test_sequential_windows(drop):
    tokens = torch.arange(103)
    comps = SequentialComponents.from_tokens(tokens, batch_size=4, bptt=6, drop_last=drop)
    assert comps.sequential and comps.n_dropped_tokens == 3
    rows = 103 // 4
    data = tokens[: rows * 4].view(4, rows).t()
    covered = []
    for i in range(comps.m):
        inp, tgt = comps.batch(i)
        assert inp.shape == tgt.shape == (comps.lengths[i], 4)
        assert torch.equal(tgt[:-1], inp[1:])
        covered.extend(range(comps.starts[i], comps.starts[i] + comps.lengths[i]))
        # columns are contiguous stretches of the corpus
        assert torch.equal(inp, data[comps.starts[i] : comps.starts[i] + comps.lengths[i]])
    full = list(range(rows - 1))
    if drop:
        assert all(t == 6 for t in comps.lengths)
        assert covered == full[: len(covered)]
    else:
        assert covered == full
    assert comps.sizes == [t * 4 for t in comps.lengths]
    json.dumps(comps.describe())


def test_sequential_bad_inputs():
    with pytest.raises(ValueError, match="m = 0"):
        SequentialComponents.from_tokens(torch.arange(3), batch_size=4, bptt=2)
    with pytest.raises(TypeError):
        SequentialComponents.from_tokens(torch.zeros(10), batch_size=2, bptt=2)


def test_detach_state_nesting():
    h = torch.ones(3, requires_grad=True) * 2
    state = ((h, h), [h], {"a": h})
    out = detach_state(state)
    assert not out[0][1].requires_grad and not out[1][0].requires_grad
    assert not out[2]["a"].requires_grad
    with pytest.raises(TypeError):
        detach_state(3)
