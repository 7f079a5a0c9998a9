"""bench/threshold_study.py's accounting: the clipped share of every step and the probes' share.

A small run probed every other epoch: the share of clipped steps that the script reads
(probed epochs' rows, unprobed epochs' log lines) equals a count of ``‖∇f_i‖ > η`` over every
step seen by ``on_step``; the probes' seconds are the sums of the rows' ``probe_seconds``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from clipscope import Components, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import threshold_study as study

ETA = 0.6


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(
        40, generator=gen, dtype=torch.float64
    )
    torch.manual_seed(seed)
    model = nn.Linear(3, 1, bias=False).double()

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, Components.from_tensors(X, Y, batch_size=4, seed=seed)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    model, loss_fn, comps = problem()
    norms: list[float] = []
    lines: list[str] = []
    fit(
        model, loss_fn, comps, "rr", lr=0.05, eta=ETA, epochs=5, probe_every=2,
        heldout=lambda m: float(m.weight.norm()), run_dir=out, log=lines.append,
        on_step=lambda s, i, n: norms.append(n), progress=False,
    )  # fmt: skip
    (out / "train.log").write_text("\n".join(lines) + "\n")
    return out, norms, comps.m


def test_probe_epochs():
    assert study.probe_epochs(5, 2) == [0, 2, 4, 5]
    assert study.probe_epochs(36, 12) == [0, 12, 24, 36]
    assert study.probe_epochs(3, 1) == [0, 1, 2, 3]


def test_clipped_share_counts_every_step_of_the_run(run):
    out, norms, m = run
    rows = study.read_run(out)
    assert [int(e) for e in rows["epoch"]] == [0, 2, 4, 5]
    assert sorted(rows["unprobed_clipped"]) == [1, 3]  # the epochs without a row
    assert len(norms) == 5 * m
    want = sum(n > ETA for n in norms) / len(norms)
    assert 0 < want < 1  # the run clips some steps and not others
    assert study.clipped_share(rows, m, 5) == pytest.approx(want, rel=0, abs=1e-12)
    # without the log lines the unprobed epochs are missing, and the share is another one
    partial = study.clipped_share({**rows, "unprobed_clipped": {}}, m, 5)
    probed = [n > ETA for k, n in enumerate(norms) if k // m in (0, 2, 4)]
    assert partial == pytest.approx(sum(probed) / len(probed), rel=0, abs=1e-12)


def test_time_shares_sum_the_rows(run):
    out, _, _ = run
    rows = study.read_run(out)
    wall = 10.0
    got = study.time_shares(rows, wall, 5)
    probe = rows["probe_seconds"]
    assert got["probe_s"] == pytest.approx(sum(probe), rel=1e-15)
    assert got["needed_probe_s"] == pytest.approx(sum(probe[:-1]), rel=1e-15)  # not x_5's
    assert got["probe_share"] == pytest.approx(sum(probe) / wall, rel=1e-15)
    assert got["needed_probe_share"] == pytest.approx(sum(probe[:-1]) / wall, rel=1e-15)
    assert got["heldout_share"] == pytest.approx(sum(rows["heldout_seconds"]) / wall, rel=1e-15)
    # a run written before probe_seconds existed: no measured share
    old = {k: v for k, v in rows.items() if k not in ("probe_seconds", "heldout_seconds")}
    assert all(math.isnan(v) for v in study.time_shares(old, wall, 5).values())
