"""``probe_seconds``, ``heldout_seconds``: the seconds of a row's probe and held-out metric.

The clocks of :mod:`clipscope.loop.units` and :mod:`clipscope.loop.measures` are replaced by a
counter that only the (wrapped) probe and the held-out metric advance, by known amounts: the
columns must hold exactly those amounts, so a column that timed more (the units after the
probe, the loop since its start) or less (nothing) fails. No wall-clock time is asserted.
"""

from __future__ import annotations

import csv
import math
import types
from itertools import pairwise

import numpy as np
import torch
from torch import nn

import clipscope.loop.measures as measures_module
import clipscope.loop.units as units_module
from clipscope import Components, fit
from clipscope.run.directory import COLUMNS, TIMING_COLUMNS

PROBE_S = 7.0  # what the fake clock advances per probe
HELDOUT_S = 3.0  # ... per held-out evaluation


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(3, 1, bias=False).double()

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, Components.from_tensors(X, Y, batch_size=6, seed=seed)


class Clock:
    """A perf_counter that moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


def fake_clocks(monkeypatch):
    clock = Clock()
    fake = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(units_module, "time", fake)
    monkeypatch.setattr(measures_module, "time", fake)
    real_probe = units_module.probe

    def slow_probe(*args, **kwargs):
        result = real_probe(*args, **kwargs)
        clock.now += PROBE_S
        return result

    monkeypatch.setattr(units_module, "probe", slow_probe)
    return clock


def test_each_probed_row_holds_its_probe_and_heldout_seconds(monkeypatch, tmp_path):
    clock = fake_clocks(monkeypatch)
    model, loss_fn, comps = problem()
    calls = []

    def heldout(m):
        calls.append(1)
        clock.now += HELDOUT_S
        return 0.5

    history = fit(
        model, loss_fn, comps, "igc", lr=0.1, eta=0.5, epochs=4, probe_every=2,
        heldout=heldout, progress=False, run_dir=tmp_path / "run",
    )  # fmt: skip
    assert [r["epoch"] for r in history.rows] == [0, 2, 4]
    assert len(calls) == 3  # the held-out metric runs at the probed points only
    for row in history.rows:
        assert row["probe_seconds"] == PROBE_S and row["heldout_seconds"] == HELDOUT_S
    # written to epochs.csv; the timing columns name every one of them
    with open(tmp_path / "run" / "epochs.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[: len(COLUMNS)] == list(COLUMNS) and header[len(COLUMNS)] == "probe_seconds"
    assert set(TIMING_COLUMNS) <= set(header)


def test_without_a_heldout_metric_there_is_no_heldout_seconds(monkeypatch):
    fake_clocks(monkeypatch)
    model, loss_fn, comps = problem()
    history = fit(model, loss_fn, comps, "sgd", lr=0.1, eta=0.5, epochs=2, progress=False)
    assert all(r["probe_seconds"] == PROBE_S for r in history.rows)
    assert all("heldout_seconds" not in r for r in history.rows)
    assert all(math.isnan(r["heldout"]) for r in history.rows)


def test_the_real_clock_gives_positive_seconds_inside_the_gap_between_rows(tmp_path):
    """Unpatched: each probe and held-out evaluation lies between its row and the next."""
    model, loss_fn, comps = problem()
    history = fit(
        model, loss_fn, comps, "rr", lr=0.1, eta=0.5, epochs=3,
        heldout=lambda m: float(m.weight.sum()), progress=False,
    )  # fmt: skip
    rows = history.rows
    for row, after in pairwise(rows):
        spent = row["probe_seconds"] + row["heldout_seconds"]
        assert row["probe_seconds"] > 0 and row["heldout_seconds"] > 0
        assert spent <= after["wall_time"] - row["wall_time"]
    assert np.isfinite([r["probe_seconds"] for r in rows]).all()
