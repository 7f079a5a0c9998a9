"""The probe under torch.distributed: 2 gloo processes on CPU return one process's result.

Every test launches ``python -m torch.distributed.run`` on a free loopback port
with this file as the worker (``python test_distributed.py MODE OUT ...``); the
process group has a 60 s timeout and the launch a subprocess timeout, so a hung
rank fails the test. Each rank saves what it returned; the test compares both
ranks with each other and with the one-process result computed here, to 1e-12
relative in float64.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from clipscope.components import Components, SequentialComponents
from clipscope.engine import probe
from clipscope.engine.distributed import (
    RanksDisagree,
    Shard,
    components_fingerprint,
    model_fingerprint,
    split_batch,
)
from clipscope.engine.result import MultiProbeResult
from clipscope.errors import NonFiniteError
from clipscope.run.directory import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
TIMEOUT = 60  # seconds: the process group's timeout for one collective
LAUNCH_TIMEOUT = 240  # seconds: the whole launch (start-up of 3 processes included)
RTOL = 1e-12
ETAS = (0.05, 0.5, math.inf)


# -- launching -----------------------------------------------------------------------------
def free_port() -> int:
    """Return a port nobody listens on now (bound to 127.0.0.1:0, read, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT, module: str | None = None):
    """Run ``torch.distributed.run`` with ``nproc`` workers; retry on a port collision."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE.parent)]),
        "CLIPSCOPE_DIST_TIMEOUT": str(TIMEOUT),
        "PYTHONWARNINGS": "ignore",
    }
    target = ["-m", module] if module else [str(HERE)]
    for _ in range(3):
        port = free_port()
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--max-restarts=0",
            *target, *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 and "address already in use" in proc.stderr.lower():
            continue
        return proc
    return proc


def once(tmp_path_factory, name: str, compute):
    """Run ``compute(directory)`` once per test session, also across xdist workers.

    The launches are the expensive part of this file; every xdist worker that
    needs one waits for the first to finish it (a file lock in the session's
    shared temporary directory) and reads its results.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session only
    root = base / f"distributed-{name}"
    with FileLock(str(root) + ".lock"):
        done = root / "done.pt"
        if not done.is_file():
            root.mkdir(parents=True, exist_ok=True)
            torch.save(compute(root), done)
        return root, torch.load(done, weights_only=False)


def init_worker() -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    torch.set_num_threads(1)
    return dist.get_rank()


# -- problems as data ------------------------------------------------------------------------
def _classification(n=33, batch_size=5, seed=0, d=5, classes=3):
    gen = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, classes, (n,), generator=gen)
    return Components.from_tensors(X, Y, batch_size=batch_size, seed=seed)


def _mlp(dropout=0.0, bn=False):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).double()


class TinyLM(nn.Module):
    def __init__(self, vocab=11, hidden=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        h, state = self.rnn(self.emb(x), state)
        return self.out(h), state


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _lm():
    torch.manual_seed(0)
    model = TinyLM().double()
    tokens = torch.randint(0, 11, (3 * 27,), generator=torch.Generator().manual_seed(5))
    return model, SequentialComponents.from_tokens(tokens, batch_size=3, bptt=6)  # m = 5


class TinyTransformerLM(nn.Module):
    """A causal ``nn.TransformerEncoderLayer`` LM: position table, tied head (issue 21)."""

    def __init__(self, vocab=11, d=8, T=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x):
        h = self.block(self.emb(x) + self.pos, src_mask=self.mask, is_causal=True)
        return F.linear(self.norm(h), self.emb.weight)


def _transformer():
    gen = torch.Generator().manual_seed(6)
    X, Y = (
        torch.randint(0, 11, (10, 6), generator=gen),
        torch.randint(0, 11, (10, 6), generator=gen),
    )
    return TinyTransformerLM().double(), lm_loss, Components.from_tensors(X, Y, batch_size=3)


class _Head(torch.autograd.Function):
    """``F.linear`` behind a custom autograd.Function: a use the use recorder cannot follow."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return F.linear(h, w)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        return g @ w, g.t() @ h


class GPTTie(nn.Module):
    """A weight used outside its module where no recorder sees it: the structural check fails."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 3)

    def forward(self, x):
        return _Head.apply(self.emb(x).sum(1), self.emb.weight)


_CLASS_WEIGHT = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)


def weighted_ce(out, y):
    """Class-weighted cross-entropy: not additive in the sample counts (a merge fallback)."""
    return F.cross_entropy(out, y, weight=_CLASS_WEIGHT)


def weighted_ce_sum(out, y):
    """Return the same loss with its declared weights: merged by them."""
    return F.cross_entropy(out, y, weight=_CLASS_WEIGHT, reduction="sum"), _CLASS_WEIGHT[y].sum()


def _probe_cases():
    """``(id, build, kwargs)``: ``build()`` -> (model, loss_fn, components), identical per rank."""
    from zoo import SampleAxisInside

    def mlp():
        return _mlp(), F.cross_entropy, _classification()

    def mlp_weighted():
        return _mlp(), weighted_ce, _classification()

    def mlp_declared():
        return _mlp(), weighted_ce_sum, _classification()

    def mlp_dropout():
        return _mlp(dropout=0.3), F.cross_entropy, _classification()

    def mlp_bn():
        return _mlp(bn=True), F.cross_entropy, _classification()

    def single():  # m = 1: rank 1 holds nothing
        return _mlp(), F.cross_entropy, _classification(n=4, batch_size=4)

    def lm():
        model, comps = _lm()
        return model, lm_loss, comps

    def tie():
        gen = torch.Generator().manual_seed(3)
        X, Y = torch.randint(0, 5, (8, 2), generator=gen), torch.randint(0, 5, (8,), generator=gen)
        return GPTTie().double(), F.cross_entropy, Components.from_tensors(X, Y, batch_size=2)

    def axis():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(4)
        X = torch.randn(9, 3, 3, dtype=torch.float64, generator=gen)
        Y = torch.randint(0, 2, (9,), generator=gen)
        return SampleAxisInside().double(), F.cross_entropy, Components.from_tensors(X, Y, 3)

    return [
        ("two-pass", mlp, {"route": "two-pass"}),
        ("keep", mlp, {"route": "keep"}),
        ("keep-full-grad", mlp, {"route": "keep", "keep_full_grad": True}),
        ("dyadic-2", mlp, {"levels": 2}),
        ("dyadic-3", mlp, {"levels": 3}),  # blocks of 4 components: 4 + 3
        # the merge check fails on a parent of each rank: every larger size by its own pass
        ("dyadic-merge-fallback", mlp_weighted, {"levels": 3}),
        ("dyadic-declared", mlp_declared, {"levels": 3}),
        ("per-sample", mlp, {"batch_sizes": [1]}),
        ("fixed-dropout", mlp_dropout, {"route": "two-pass", "dropout": "fixed", "seed": 7}),
        ("batchnorm-train", mlp_bn, {"route": "keep"}),
        ("one-component-two-pass", single, {"route": "two-pass"}),
        ("one-component-keep", single, {"route": "keep"}),
        ("lm-two-pass", lm, {"route": "two-pass"}),
        ("lm-keep", lm, {"route": "keep", "keep_full_grad": True}),
        ("per-sample-structural-fallback", tie, {"batch_sizes": [1]}),
        ("per-sample-spot-fallback", axis, {"batch_sizes": [1]}),
        # two passes with η: pass 2 forms each chunk's factors again
        ("per-sample-two-pass", mlp, {"route": "per-sample"}),
        ("per-sample-two-pass-spot-fallback", axis, {"route": "per-sample"}),
        # the preconditioned dots (issue 22): u = P⁻¹∇f from an AdamW's state, every route
        ("keep-adamw", mlp, {"route": "keep", "preconditioner": _adamw}),
        ("two-pass-adamw", mlp, {"route": "two-pass", "preconditioner": _adamw}),
        ("dyadic-3-adamw", mlp, {"levels": 3, "preconditioner": _adamw}),
        ("per-sample-adamw", mlp, {"batch_sizes": [1], "preconditioner": _adamw}),
        ("per-sample-two-pass-adamw", mlp, {"route": "per-sample", "preconditioner": _adamw}),
        ("lm-two-pass-adamw", lm, {"route": "two-pass", "preconditioner": _adamw}),
        ("transformer-per-sample-kept", _transformer, {"batch_sizes": [1]}),
        ("transformer-per-sample-two-pass", _transformer, {"route": "per-sample"}),
    ]


def _adamw(model, loss_fn, comps):
    """Two AdamW steps on components 0 and 1 (the same on every rank): a P with state."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(2):
        opt.zero_grad()
        x, y = comps.batch(i)
        out = model(x)
        loss_fn(out[0] if isinstance(out, tuple) else out, y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _run_case(build, kwargs, **extra):
    import warnings

    model, loss_fn, comps = build()
    kwargs = dict(kwargs)
    if callable(kwargs.get("preconditioner")):
        kwargs["preconditioner"] = kwargs["preconditioner"](model, loss_fn, comps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return probe(model, loss_fn, comps, ETAS, **kwargs, **extra)


def _levels(result):
    if isinstance(result, MultiProbeResult):
        return {b: result[b] for b in result.batch_sizes}
    return {result.batch_size: result}


def assert_same_result(got, want, rtol=RTOL):
    """Every number to ``rtol`` relative (dots: relative to n_i‖∇f‖); routes and records equal."""
    got, want = _levels(got), _levels(want)
    assert got.keys() == want.keys()
    for b in want:
        g, w = got[b], want[b]
        assert g.route == w.route
        np.testing.assert_array_equal(g.sizes, w.sizes)
        np.testing.assert_allclose(g.norms, w.norms, rtol=rtol, atol=0)
        np.testing.assert_allclose(g.losses, w.losses, rtol=rtol, atol=0)
        scale = np.maximum(w.norms * w.grad_norm, 1e-300)
        assert np.all(np.abs(g.dots - w.dots) <= rtol * scale)
        assert g.grad_norm == pytest.approx(w.grad_norm, rel=rtol, abs=0)
        assert g.clipped.keys() == w.clipped.keys()
        for eta in w.clipped:
            np.testing.assert_allclose(g.clipped[eta], w.clipped[eta], rtol=rtol, atol=rtol)
        if w.full_grad is not None:
            for a, c in zip(g.full_grad, w.full_grad, strict=True):
                torch.testing.assert_close(a, c, rtol=rtol, atol=rtol * w.grad_norm)
        for key in ("fallback", "dots_fallback", "events", "rules", "attempts", "spot_samples"):
            assert g.verification.get(key) == w.verification.get(key), key
        if "merge" in w.verification:  # (each rank checks parents of its own block)
            for key in ("passed", "weights", "own_pass"):
                assert g.verification["merge"][key] == w.verification["merge"][key], key
        assert (g.preconditioned is None) == (w.preconditioned is None)
        if w.preconditioned is not None:
            gp, wp = g.preconditioned, w.preconditioned
            scale = np.maximum(w.norms * wp.direction_norm, 1e-300)
            assert np.all(np.abs(gp.dots - wp.dots) <= rtol * scale)
            assert gp.inner == pytest.approx(wp.inner, rel=rtol, abs=0)
            assert gp.direction_norm == pytest.approx(wp.direction_norm, rel=rtol, abs=0)
            for eta in wp.clipped:
                np.testing.assert_allclose(gp.clipped[eta], wp.clipped[eta], rtol=rtol, atol=rtol)
            assert gp.info["without_state"] == wp.info["without_state"]


# -- workers (run by torch.distributed.run: python test_distributed.py MODE OUT) ---------------
def worker_probe(out: Path) -> None:
    rank = init_worker()
    results = {}
    for name, build, kwargs in _probe_cases():
        results[name] = _run_case(build, kwargs)
    # an exception on rank 1's block only reaches rank 0 at the next collective
    model, loss_fn, comps = _mlp(), F.cross_entropy, _classification()
    X, Y = comps._source
    X = X.clone()
    X[comps.indices[6]] = math.nan  # component 6: on rank 1
    try:
        probe(model, loss_fn, Components.from_tensors(X, Y, 5, seed=0), route="two-pass")
        results["nonfinite"] = "no error"
    except NonFiniteError as exc:
        results["nonfinite"] = f"NonFiniteError: {exc}"
    # ranks that disagree: the message names what differs
    for what in ("model", "data", "arguments", "preconditioner"):
        model, loss_fn, comps = _mlp(), F.cross_entropy, _classification()
        etas = ETAS
        given = [torch.ones_like(p) for p in model.parameters()]
        if rank == 1 and what == "preconditioner":
            given[0][0, 0] = 2.0
        if rank == 1 and what == "model":
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-9
        if rank == 1 and what == "data":
            comps = _classification(seed=1)
        if rank == 1 and what == "arguments":
            etas = (0.05, 0.6, math.inf)
        try:
            probe(model, loss_fn, comps, etas, preconditioner=given)
            results[f"disagree-{what}"] = "no error"
        except RanksDisagree as exc:
            results[f"disagree-{what}"] = str(exc)
    # DistributedDataParallel: probed through .module, its gradient all-reduce never runs
    from torch.nn.parallel import DistributedDataParallel

    model = _mlp()
    ddp = DistributedDataParallel(model)
    calls = []

    def hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    results["ddp"] = probe(ddp, F.cross_entropy, _classification(), ETAS, route="two-pass")
    results["ddp-hook-calls"] = len(calls)
    # FSDP shards the parameters: refused, on every rank, before any collective
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    def fsdp1(module):  # on CPU FSDP1 needs the device named
        return FullyShardedDataParallel(module, device_id=torch.device("cpu"))

    for name, wrap in (("fsdp1", fsdp1), ("fsdp2", fully_shard)):
        model = _mlp().float()
        model = wrap(model) or model
        try:
            probe(model, F.cross_entropy, _classification(), route="two-pass")
            results[name] = "no error"
        except TypeError as exc:
            results[name] = str(exc)
    torch.save(results, out / f"rank{rank}.pt")


# -- tests -------------------------------------------------------------------------------------
def _read(out: Path, proc) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    return once(tmp_path_factory, "probe", lambda out: _read(out, launch("probe", str(out))))[1]


@pytest.mark.parametrize("name,build,kwargs", _probe_cases(), ids=[c[0] for c in _probe_cases()])
def test_two_ranks_return_the_one_process_result(probed, name, build, kwargs):
    want = _run_case(build, kwargs)
    for rank in (0, 1):
        assert_same_result(probed[rank][name], want)
    assert all(r.info["processes"] == 2 for r in _levels(probed[0][name]).values())


def test_the_transformer_cases_ran_their_rules_without_a_fallback(probed):
    for name, route in (("transformer-per-sample-kept", "per-sample-kept"),
                        ("transformer-per-sample-two-pass", "per-sample")):  # fmt: skip
        result = _levels(probed[0][name])[1]
        assert result.route == route and not result.verification["fallback"], name
        assert result.verification["rules"], name


def test_the_per_sample_fallback_cases_did_fall_back(probed):
    tie = probed[0]["per-sample-structural-fallback"]
    # batch_sizes=[1] under route="auto" keeps the factors (issue 13): per-sample-kept
    assert tie.route == "per-sample-kept+fallback" and "emb.weight" in tie.verification["fallback"]
    assert any(e["stage"] == "structural" for e in tie.verification["events"])
    axis = probed[0]["per-sample-spot-fallback"]
    assert axis.verification["attempts"] == 2
    assert any(e["stage"] == "spot-norm" for e in axis.verification["events"])


def test_the_merge_check_decides_alike_on_every_rank(probed):
    for rank in (0, 1):
        fallback = probed[rank]["dyadic-merge-fallback"][5].verification["merge"]
        assert not fallback["passed"] and fallback["own_pass"] == [10, 20]
        declared = probed[rank]["dyadic-declared"][5].verification["merge"]
        assert declared["passed"] and declared["weights"] == "declared"


def test_a_failure_on_one_rank_is_raised_on_both(probed):
    for rank in (0, 1):
        assert probed[rank]["nonfinite"].startswith("NonFiniteError: component 6")


def test_ranks_that_disagree_are_refused_naming_what_differs(probed):
    for rank in (0, 1):
        assert "model differs on rank 1" in probed[rank]["disagree-model"]
        assert "data differs on rank 1" in probed[rank]["disagree-data"]
        text = probed[rank]["disagree-arguments"]
        assert "arguments differs on rank 1" in text and "etas" in text and "0.6" in text
        assert "preconditioner differs on rank 1" in probed[rank]["disagree-preconditioner"]


def test_a_ddp_model_is_probed_through_its_module_without_its_all_reduce(probed):
    want = probe(_mlp(), F.cross_entropy, _classification(), ETAS, route="two-pass")
    for rank in (0, 1):
        assert_same_result(probed[rank]["ddp"], want)
        assert probed[rank]["ddp-hook-calls"] == 0


def test_fsdp_is_refused_with_a_clear_message(probed):
    for rank in (0, 1):
        assert probed[rank]["fsdp1"].startswith("FSDP-wrapped models are not supported")
        assert "FSDP" in probed[rank]["fsdp2"] or "DTensor" in probed[rank]["fsdp2"]


# -- the pieces, in one process ----------------------------------------------------------------
class _FakeRanks:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world


@pytest.mark.parametrize("m,world,align", [(7, 2, 1), (5, 3, 1), (1, 2, 1), (7, 2, 4), (9, 4, 2)])
def test_shard_blocks_are_contiguous_balanced_and_cover_every_component(m, world, align):
    blocks = [Shard(m, _FakeRanks(r, world), align) for r in range(world)]
    assert [b.start for b in blocks] == [0] + [b.stop for b in blocks[:-1]]
    assert blocks[-1].stop == m and all(b.start % align == 0 for b in blocks if len(b))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= align


def test_split_batch_and_fingerprints():
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    assert torch.equal(split_batch((x, y), 5, (1, 3))[0], x[1:3])
    part = split_batch({"ids": x, "n": 3, "mask": torch.ones(2)}, 5, (4, 5))
    assert part["ids"].shape == (1, 2) and part["n"] == 3 and part["mask"].shape == (2,)
    cols = split_batch((torch.zeros(6, 4), torch.ones(6, 4)), 4, (0, 2), dim=1)
    assert cols[0].shape == (6, 2)
    with pytest.raises(ValueError, match="no tensor"):
        split_batch((x, y), 7, (0, 3))
    model = _mlp()
    a = model_fingerprint(model)
    model.eval()
    assert model_fingerprint(model) != a  # the modes count
    assert components_fingerprint(_classification()) == components_fingerprint(_classification())
    assert components_fingerprint(_classification(seed=1)) != components_fingerprint(
        _classification()
    )


def test_without_a_process_group_distributed_true_is_refused():
    with pytest.raises(RuntimeError, match="process group"):
        probe(_mlp(), F.cross_entropy, _classification(), distributed=True)


# -- training ---------------------------------------------------------------------------------
FIT_RTOL = 1e-10  # float64 rounding over a few dozen steps (sums in another order)


class WithUnused(nn.Module):
    """An MLP with a parameter no loss uses: its .grad stays None (weight decay skips it)."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


def _dict_components():
    comps = _classification()
    X, Y = comps._source
    items = [{"x": X[j], "y": Y[j]} for j in range(len(X))]
    return Components.from_dataset(items, batch_size=5, seed=0)


def dict_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def _fit_cases():
    """``(id, build, settings)``: build() -> (model, loss_fn, components), the same per rank."""

    def mlp():
        return _mlp(), F.cross_entropy, _classification()

    def unused():
        return WithUnused(), F.cross_entropy, _classification()

    def size_one():  # sizes 3, 3, 3, 1: rank 0's part of the last component is empty
        return _mlp(), F.cross_entropy, _classification(n=10, batch_size=3)

    def bn():
        return _mlp(bn=True), F.cross_entropy, _classification(n=30, batch_size=5)

    def lm():  # 3 columns: rank 0 carries 1, rank 1 carries 2
        model, comps = _lm()
        return model, lm_loss, comps

    def dicts():
        return _mlp(), dict_loss, _dict_components()

    def declared():  # class weights declared as (sum, count): combined by the counts
        return _mlp(), weighted_ce_sum, _classification()

    base = {"lr": 0.2, "eta": 0.3, "epochs": 2, "etas": (0.1, math.inf), "progress": False}
    return [
        ("igc", mlp, {**base, "method": "igc"}),
        ("sgd", mlp, {**base, "method": "sgd", "seed": 3}),
        ("rr", mlp, {**base, "method": "rr", "seed": 4}),
        ("shuffle-once", mlp, {**base, "method": "shuffle_once", "seed": 5}),
        ("zhang", mlp, {**base, "method": "zhang", "seed": 6}),
        ("momentum-decay-unused", unused, {**base, "momentum": 0.9, "weight_decay": 0.01}),
        ("size-one-component", size_one, {**base, "method": "rr"}),
        ("batchnorm-train", bn, {**base, "method": "igc"}),
        ("lm-igc-carried-state", lm, {**base, "method": "igc", "lr": 1.0}),
        ("lm-rr", lm, {**base, "method": "rr", "lr": 1.0}),
        ("dict-batches", dicts, {**base, "method": "igc"}),
        ("declared-weights", declared, {**base, "method": "rr", "seed": 7}),
        ("smoothness", mlp, {**base, "method": "igc", "smoothness_every": 1}),
        ("per-sample-probes", size_one, {**base, "method": "igc", "per_sample": True}),
    ]


def _fit_case(build, settings, **extra):
    from clipscope import fit

    model, loss_fn, comps = build()
    steps = []
    history = fit(
        model, loss_fn, comps, on_step=lambda k, i, n: steps.append((k, i, n)), **settings, **extra
    )
    return {"rows": history.rows, "steps": steps, "model": model.state_dict()}


def assert_same_training(got, want, rtol=FIT_RTOL):
    assert [(k, i) for k, i, _ in got["steps"]] == [(k, i) for k, i, _ in want["steps"]]
    np.testing.assert_allclose(
        [n for *_, n in got["steps"]], [n for *_, n in want["steps"]], rtol=rtol, atol=0
    )
    assert len(got["rows"]) == len(want["rows"])
    for a, b in zip(got["rows"], want["rows"], strict=True):
        assert a.keys() == b.keys()
        for key in b:
            if key not in TIMING_COLUMNS:
                np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-13, err_msg=key)
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=rtol, atol=1e-13)


def worker_fit(out: Path) -> None:
    from clipscope import fit

    rank = init_worker()
    results = {name: _fit_case(build, settings) for name, build, settings in _fit_cases()}
    # the same run with dropout, resumed after a crash at step 9, equals the uninterrupted one
    model, _, comps = _mlp(dropout=0.3), None, _classification()
    settings = {"lr": 0.2, "eta": 0.3, "epochs": 2, "progress": False, "checkpoint_every": 2}
    run_a, run_b = out / "dropout-a", out / "dropout-b"
    results["dropout-uninterrupted"] = fit(model, F.cross_entropy, comps, run_dir=run_a, **settings)
    dist.barrier()

    def crash(step, i, norm):
        if step == 9:
            raise KeyboardInterrupt("crash")

    model = _mlp(dropout=0.3)
    try:
        fit(model, F.cross_entropy, comps, run_dir=run_b, on_step=crash, **settings)
    except KeyboardInterrupt:
        pass
    model = _mlp(dropout=0.3)
    results["dropout-resumed"] = fit(
        model, F.cross_entropy, comps, run_dir=run_b, resume=True, **settings
    )
    # ranks that disagree on the config or the data are refused before anything runs
    for what, change in (("config", {"lr": 0.25}), ("data", {})):
        model, comps = _mlp(), _classification(seed=1 if rank == 1 and what == "data" else 0)
        extra = change if rank == 1 else {}
        try:
            fit(model, F.cross_entropy, comps, **{**settings, "checkpoint_every": 0, **extra})
            results[f"disagree-{what}"] = "no error"
        except RanksDisagree as exc:
            results[f"disagree-{what}"] = str(exc)
    # a loss that is not the sample-weighted mean of its parts' is refused before a step
    try:
        fit(_mlp(), weighted_ce, _classification(), **{**settings, "checkpoint_every": 0})
        results["split-refused"] = "no error"
    except ValueError as exc:
        results["split-refused"] = str(exc)
    # the Monitor in a DistributedDataParallel loop
    from torch.nn.parallel import DistributedDataParallel

    model = _mlp()
    results["monitor"] = _monitor_loop(
        model, _classification(n=32, batch_size=8), out / "monitor", rank, 2,
        DistributedDataParallel(model),
    )  # fmt: skip
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return once(tmp_path_factory, "fit", lambda out: _read(out, launch("fit", str(out))))


@pytest.mark.parametrize("name,build,settings", _fit_cases(), ids=[c[0] for c in _fit_cases()])
def test_two_ranks_train_like_one_process_step_for_step(trained, name, build, settings):
    _, ranks = trained
    want = _fit_case(build, settings)
    for rank in (0, 1):
        assert_same_training(ranks[rank][name], want)


def test_ranks_hold_bitwise_the_same_model(trained):
    _, ranks = trained
    for name, *_ in _fit_cases():
        for key, value in ranks[0][name]["model"].items():
            assert torch.equal(ranks[1][name]["model"][key], value), (name, key)


def test_dropout_run_resumed_after_a_crash_equals_the_uninterrupted_run(trained):
    out, ranks = trained
    a, b = ranks[0]["dropout-uninterrupted"], ranks[0]["dropout-resumed"]
    assert a.steps == b.steps == 14 and len(a.rows) == len(b.rows) == 3
    for x, y in zip(a.rows, b.rows, strict=True):
        assert {k: v for k, v in x.items() if k not in TIMING_COLUMNS} == pytest.approx(
            {k: v for k, v in y.items() if k not in TIMING_COLUMNS}, rel=0, abs=0, nan_ok=True
        )
    assert (out / "dropout-b" / "epochs.csv").read_text().count("\n") == 4


def test_a_loss_that_does_not_split_is_refused_on_every_rank(trained):
    _, ranks = trained
    for rank in (0, 1):
        text = ranks[rank]["split-refused"]
        assert "weighted_ce" in text and "their sample shares" in text, text
        assert "return (sum, count)" in text, text


def test_the_split_check_in_one_process():
    """check_split_loss: sample-weighted means pass, class weights fail unless declared."""
    from clipscope.engine.distributed import check_split_loss
    from clipscope.engine.losses import loss_form

    model, comps = _mlp(), _classification(n=33, batch_size=5)
    for loss_fn, world in ((F.cross_entropy, 2), (F.cross_entropy, 3), (weighted_ce_sum, 2)):
        record = check_split_loss(model, loss_fn, comps, world, form=loss_form(loss_fn))
        assert record["max_error"] <= record["tolerance"] and record["components"] == [0, 6]
    assert check_split_loss(model, weighted_ce_sum, comps, 2, form="output_target")[
        "weights"] == "declared"  # fmt: skip
    with pytest.raises(ValueError, match=r"component 0 has f_i = .* from its 2 parts"):
        check_split_loss(model, weighted_ce, comps, 2, form="output_target")

    def token_mean(model, batch):  # a mean over the non-padding tokens of padded rows
        x, y = batch
        pad = (torch.arange(y.shape[0]) % 3 == 0).unsqueeze(1).expand(-1, 4)  # (B, 4)
        logits = model(x).unsqueeze(1).expand(-1, 4, -1)
        labels = torch.where(pad, -100, y.unsqueeze(1).expand(-1, 4))
        return F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)

    with pytest.raises(ValueError, match="non-padding tokens"):
        check_split_loss(model, token_mean, comps, 2, form="model_batch")


def test_declared_counts_combine_the_ranks_parts_exactly():
    """StepReducer with declared counts: Σ_r c_r g_r / Σ_r c_r, the whole batch's gradient.

    Two ranks simulated in one process: rank 1's message is captured, then added to
    rank 0's where the all-reduce would; the result is the whole batch's gradient,
    which sample shares (4/10, 6/10) would not give with class weights.
    """
    from clipscope.engine.distributed import StepReducer

    class FakeRank:
        def __init__(self, rank, other=None):
            self.rank, self.world, self.other, self.sent = rank, 2, other, None

        def _call(self, what, fn, vec, *args):
            self.sent = vec.clone()
            if self.other is not None:
                vec += self.other.sent

    torch.manual_seed(0)
    model = _mlp().double()
    params = list(model.parameters())
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 2, 1, 0, 2, 1, 2])
    total, count = weighted_ce_sum(model(x), y)
    want_loss = float(total / count)
    want = [g.clone() for g in torch.autograd.grad(total / count, params)]
    one = FakeRank(1)
    zero = FakeRank(0, other=one)
    for ranks in (one, zero):
        reducer = StepReducer(ranks, params, coupled=False)
        reducer.batch((x, y), 10)  # sets the sample share; the closure would set the count
        a, b = reducer.part(10)
        for p in params:
            p.grad = None
        part_sum, part_count = weighted_ce_sum(model(x[a:b]), y[a:b])
        (part_sum / part_count).backward()
        reducer.count = float(part_count)
        loss = reducer(params, (part_sum / part_count).detach())
    assert loss == pytest.approx(want_loss, rel=1e-14)
    for p, g in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-13, atol=1e-15)


def test_ranks_that_disagree_on_config_or_data_are_refused(trained):
    _, ranks = trained
    for rank in (0, 1):
        assert (
            "config differs on rank 1: lr: 0.2 on rank 0, 0.25 on rank 1"
            in (ranks[rank]["disagree-config"])
        )
        assert "data differs on rank 1" in ranks[rank]["disagree-data"]


# -- clipscope train under torchrun: 1 process = 2 processes; kill -9 any rank, --resume ----------
LM_CONFIG = """
task = "language_model"
model = "small-lstm-lm"
model_kwargs = {emb = 8, hidden = 8}
data = "text"
n_samples = 2000
batch_size = 4
bptt = 25
method = "igc"
lr = 2.0
eta = 0.25
epochs = 2
seed = 0
etas = [0.1, inf]
dtype = "float64"
threads = 1
checkpoint_every = 4
progress = false
"""
LM_STEPS = 40  # 20 windows of 25 rows, 2 epochs


HANG_TIMEOUT = 8.0  # seconds: the process group's timeout when a rank hangs
HANG_SLEEP = 180.0  # seconds the hung rank sleeps (the launcher kills it first)


def worker_train(
    out: Path, config: str, kill_rank: str, at: str, resume: str = "", how: str = "kill"
) -> int:
    """``clipscope.train.train`` on every rank (it initialises the group).

    At step ``at`` rank ``kill_rank`` SIGKILLs itself (``how="kill"``) or hangs
    (``how="hang"``: it sleeps, with SIGTERM's default action so that the
    launcher can end it); a rank that does not hang prints how long after
    that step ``train`` returned, and its exit code.
    """
    import signal
    import time

    from clipscope.train import train

    rank, hang = int(os.environ["RANK"]), how == "hang"
    reached: list[float] = []

    def on_step(step, i, norm):
        if step != int(at):
            return
        reached.append(time.monotonic())
        if rank == int(kill_rank) and hang:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(HANG_SLEEP)
        elif rank == int(kill_rank):
            os.kill(os.getpid(), signal.SIGKILL)

    timeout = HANG_TIMEOUT if hang else None
    code = train(
        config, out, on_step=on_step, resume=bool(resume), echo=print, dist_timeout=timeout
    )
    if hang and reached:
        print(f"rank {rank} returned {code} {time.monotonic() - reached[0]:.1f} s after the hang")
    return code


def _checkpoint_model(run: Path) -> dict:
    from clipscope.atomic import latest_checkpoint

    return latest_checkpoint(run / "checkpoints")[1]["model"]


def _rows(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for column in TIMING_COLUMNS:
            row.pop(column, None)
    return rows


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """One process in this process, and two under torchrun through the command line."""

    def compute(root: Path):
        from clipscope.train import train

        config = root / "lm.toml"
        config.write_text(LM_CONFIG)
        assert train(config, root / "one", echo=lambda text: None) == 0
        proc = launch("train", str(config), "--out", str(root / "two"), module="clipscope")
        return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    return once(tmp_path_factory, "cli", compute)


def test_clipscope_train_under_torchrun_equals_one_process(cli_runs):
    root, proc = cli_runs
    assert proc["returncode"] == 0, proc["stderr"][-4000:]
    one, two = root / "one", root / "two"
    a, b = _checkpoint_model(one), _checkpoint_model(two)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=FIT_RTOL, atol=1e-14)
    rows_a, rows_b = _rows(one), _rows(two)
    assert [r["epoch"] for r in rows_b] == ["0", "1", "2"]
    for x, y in zip(rows_a, rows_b, strict=True):
        for key in x:
            assert float(y[key]) == pytest.approx(float(x[key]), rel=FIT_RTOL, nan_ok=True), key
    log = (two / "train.log").read_text().splitlines()
    assert len(log) == len(set(log)) and any(line.startswith("done: 40 steps") for line in log)
    assert proc["stdout"].count("done: 40 steps") == 1  # rank 0 alone prints
    import json

    assert json.loads((two / "summary.json").read_text())["status"] == "completed"
    assert json.loads((two / "env.json").read_text())["distributed"]["world_size"] == 2


def _killed(run: Path, proc, rank: int, elapsed: float) -> None:
    """Check the job stopped: the survivor with a clear message, and no torn file."""
    from clipscope.atomic import list_checkpoints, load_checkpoint

    assert proc.returncode != 0 and elapsed < LAUNCH_TIMEOUT
    survivor = 1 - rank
    assert (
        f"clipscope train: error: rank {survivor} of 2" in proc.stdout + proc.stderr
        or "SIGTERM" in proc.stderr
    ), proc.stderr[-3000:]
    assert not (run / "summary.json").exists()
    assert not list(run.rglob("*.tmp"))  # no half-written file
    for path in list_checkpoints(run / "checkpoints"):
        load_checkpoint(path)  # each whole, its checksum right


def test_kill_9_of_either_rank_then_resume_equals_the_uninterrupted_run(cli_runs, tmp_path):
    """Kill -9 rank 1 at step 13, resume; kill -9 rank 0 (the writer) at step 30, resume."""
    import time

    root, golden = cli_runs
    assert golden["returncode"] == 0
    config, run = root / "lm.toml", tmp_path / "run"
    for rank, at, resume in ((1, 13, ""), (0, 30, "resume")):
        t0 = time.perf_counter()
        killed = launch("train", str(run), str(config), str(rank), str(at), resume)
        _killed(run, killed, rank, time.perf_counter() - t0)
    resumed = launch("train", str(run), str(config), "-1", "-1", "resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout
    a, b = _checkpoint_model(root / "two"), _checkpoint_model(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert _rows(root / "two") == _rows(run)


def test_a_hung_rank_makes_the_others_exit_5_within_the_timeout(cli_runs, tmp_path):
    """Rank 1 stops responding at step 5: rank 0 gives up after the 8 s timeout, exit 5."""
    import re
    import time

    root, _ = cli_runs
    run = tmp_path / "run"
    t0 = time.perf_counter()
    proc = launch("train", str(run), str(root / "lm.toml"), "1", "5", "", "hang")
    _killed(run, proc, 1, time.perf_counter() - t0)
    assert time.perf_counter() - t0 < HANG_SLEEP  # the job did not wait for the hung rank
    found = re.search(r"rank 0 returned (\d+) ([0-9.]+) s after the hang", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert int(found[1]) == 5  # EXIT_DISTRIBUTED
    assert HANG_TIMEOUT * 0.9 <= float(found[2]) < HANG_TIMEOUT + 30
    assert "clipscope train: error: rank 0 of 2" in proc.stderr


def test_clipscope_reproduce_under_torchrun(tmp_path):
    """A tiny study with 2 processes: the files once, the cross-section as one process's."""
    import json

    from clipscope.reproduce import TASKS, _cross_section

    out = tmp_path / "study"
    args = ["reproduce", "--task", "digits-cnn", "--epochs", "0", "--batch-sizes", "256"]
    proc = launch(*args, "--out", str(out), "--no-progress", module="clipscope")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # IGC, SGD and the AdamW-clip run ([[study.extra]] of the config)
    assert proc.stdout.count("report: ") == 1 and proc.stdout.count("[3/3]") == 1
    assert (out / "report.html").is_file()
    meta = json.loads((out / "study.json").read_text())
    task = meta["tasks"]["digits-cnn"]
    assert len(task["runs"]) == 3
    for entry in task["runs"]:
        summary = json.loads((out / entry["dir"] / "summary.json").read_text())
        assert summary["status"] == "completed"
        env = json.loads((out / entry["dir"] / "env.json").read_text())
        assert env["distributed"]["world_size"] == 2
    igc = next(e for e in task["runs"] if e["method"] == "igc")
    want = _cross_section(TASKS["digits-cnn"], out / igc["dir"], out / igc["config"])
    got = json.loads((out / task["cross_section"]).read_text())
    assert got["batch_sizes"] == want["batch_sizes"]
    for key in ("c1", "c2", "rho"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)  # float32 model


# -- the Monitor in a DistributedDataParallel loop -----------------------------------------------
def _monitor_loop(model, comps, run_dir, rank=0, world=1, ddp=None):
    from clipscope import Monitor

    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    net = ddp or model
    monitor = Monitor(net, F.cross_entropy, comps, eta=0.5, every=2, etas=(0.1,), run_dir=run_dir)
    with monitor as mon:
        for step in range(6):
            mon.step(step, lr=0.3)
            x, y = comps.batch(step % comps.m)
            part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            opt.zero_grad()
            F.cross_entropy(net(x[part]), y[part]).backward()  # DDP averages the equal halves
            mon.gradient()
            opt.step()
    return {"rows": mon.rows, "run_id": mon.setting["run_id"], "model": model.state_dict()}


def test_the_monitor_under_torchrun_with_ddp(trained, tmp_path):
    root, ranks = trained
    ranks = [r["monitor"] for r in ranks]
    want = _monitor_loop(_mlp(), _classification(n=32, batch_size=8), tmp_path / "one")
    assert ranks[0]["run_id"] == ranks[1]["run_id"]
    stored = (root / "monitor" / "config.toml").read_text()
    assert f'run_id = "{ranks[0]["run_id"]}"' in stored
    for rank in (0, 1):
        got = ranks[rank]
        assert len(got["rows"]) == len(want["rows"]) == 3
        for a, b in zip(got["rows"], want["rows"], strict=True):
            for key in b:
                if key not in TIMING_COLUMNS:
                    assert a[key] == pytest.approx(b[key], rel=FIT_RTOL, abs=1e-13, nan_ok=True)
        for key, value in want["model"].items():
            torch.testing.assert_close(got["model"][key], value, rtol=FIT_RTOL, atol=1e-13)
    written = _rows(root / "monitor")
    assert [r["step"] for r in written] == ["0", "2", "4"]


def worker_shutdown(out: Path) -> None:
    """``init_from_env``, a late import of ``torch.distributed.nn``, a broadcast, ``shutdown``.

    torch imports ``torch.distributed.nn.functional`` lazily (e.g.
    ``torch.use_deterministic_algorithms`` -> inductor -> FSDP); imported after
    the group exists, its default arguments held the group, so ``shutdown``
    left it and gloo's threads alive into interpreter exit (an intermittent SIGABRT).
    Reports whether the group object was freed and how many gloo threads remain.
    """
    import gc
    import importlib
    import weakref

    from clipscope.engine.distributed import init_from_env, on_writer, shutdown

    assert init_from_env(timeout=TIMEOUT)
    rank = dist.get_rank()
    importlib.import_module("torch.distributed.nn.functional")  # torch may import it any time

    group = weakref.ref(dist.group.WORLD)
    on_writer(lambda: "written")  # a broadcast: tensors the gloo worker threads held
    shutdown()
    gc.collect()
    threads = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    result = {"freed": group() is None, "gloo": sum(t.startswith("gloo") for t in threads)}
    torch.save(result, out / f"rank{rank}.pt")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_shutdown_frees_the_group_and_its_gloo_threads(tmp_path):
    """The group dies at ``shutdown``, not at interpreter exit (where it could SIGABRT)."""
    ranks = _read(tmp_path, launch("shutdown", str(tmp_path)))
    assert ranks == [{"freed": True, "gloo": 0}] * 2


WORKERS = {
    "probe": worker_probe,
    "fit": worker_fit,
    "train": worker_train,
    "shutdown": worker_shutdown,
}

if __name__ == "__main__":
    code = WORKERS[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code or 0)
