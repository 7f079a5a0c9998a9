"""The units' contract: needs drive the probe, hooks run in order, any loop can drive them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from clipscope.components import Components
from clipscope.loop import (
    IGCDrift,
    IntervalEnd,
    Needs,
    Point,
    ProbeStatistics,
    Step,
    StepStatistics,
    Unit,
    Units,
    fit,
)
from clipscope.methods import clipped_step, make_order
from clipscope.run.directory import TIMING_COLUMNS


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(
        24, generator=gen, dtype=torch.float64
    )
    torch.manual_seed(seed)
    model = nn.Linear(3, 1, bias=False).double()

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, Components.from_tensors(X, Y, batch_size=6, seed=seed)


class Recorder(Unit):
    """Writes down every hook call; asks for the probe at epoch 1 only, step gradients always."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def needs(self, point):
        wanted = Needs.STEP_GRADIENT | (Needs.PROBE if point.epoch == 1 else Needs.NOTHING)
        return Needs.NOTHING if point.last else wanted

    def start(self, loop):
        self.calls.append("start")

    def at_point(self, point):
        self.calls.append(f"point {point.epoch} row={point.row is not None}")

    def before_update(self, step):
        grads = [p.grad for p in step.params]
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        assert norm <= step.eta * (1 + 1e-12)  # the clipped gradient, before the update
        self.calls.append(f"before {step.number}")

    def after_update(self, step):
        self.calls.append(f"after {step.number}")

    def at_interval_end(self, end):
        self.calls.append(f"end {end.epoch}")

    def finish(self, end):
        self.calls.append(f"finish {end.status}")


def test_hooks_run_in_order_and_needs_decide_the_probe():
    model, loss_fn, comps = problem()
    rec = Recorder()
    history = fit(
        model, loss_fn, comps, "igc", lr=0.1, eta=0.5, epochs=2, probe_every=0,
        units=[rec], progress=False,
    )  # fmt: skip
    assert [r["epoch"] for r in history.rows] == [1]  # no unit but the recorder asked
    m = comps.m
    expected = ["start", "point 0 row=False"]
    expected += [f"{w} {n}" for n in range(1, m + 1) for w in ("before", "after")]
    expected += ["end 0", "point 1 row=True"]
    expected += [f"{w} {n}" for n in range(m + 1, 2 * m + 1) for w in ("before", "after")]
    expected += ["end 1", "point 2 row=False", "finish completed"]
    assert rec.calls == expected


def test_units_driven_from_a_hand_written_loop_give_fits_rows():
    """The same objects from the user's own loop (what a Monitor does): the same rows as fit."""
    model, loss_fn, comps = problem()
    reference = copy.deepcopy(model)
    history = fit(reference, loss_fn, comps, "igc", lr=0.1, eta=0.5, epochs=2, progress=False)

    units = Units([ProbeStatistics(0.5), IGCDrift(0.5), StepStatistics()])
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    order, rows, number = make_order("igc", comps.m), [], 0
    for k in range(3):
        point = Point(model, loss_fn, comps, params, k, number, k == 2, rows)
        units.visit(point, {"epoch": k, "step": number, "lr": 0.1, "wall_time": 0.0})
        if k == 2:
            break
        for pos, i in enumerate(order.next_epoch()):
            box = {}

            def closure(i=i, box=box):
                x, y = comps.batch(i)
                box["loss"] = loss_fn(model(x), y)
                return box["loss"]

            def make(norm, i=i, box=box, pos=pos, n=number + 1):
                args = (n, i, 0.5, norm, float(box["loss"].detach()), params)
                box["step"] = box.get("step") or Step(*args, closes_interval=pos + 1 == comps.m)
                return box["step"]

            def before(norm, make=make):
                units.before_update(make(norm))

            norm = clipped_step(opt, closure, 0.5, before_step=before)
            number += 1
            units.after_update(make(norm))
        units.at_interval_end(IntervalEnd(k, comps.m, rows[-1]))
    assert len(rows) == len(history.rows) == 3
    for mine, theirs in zip(rows, history.rows, strict=True):
        for key, value in mine.items():
            if key not in TIMING_COLUMNS:
                assert value == theirs[key] or (math.isnan(value) and math.isnan(theirs[key]))


@pytest.mark.parametrize("unit", [IGCDrift(0.5), StepStatistics()], ids=["drift", "steps"])
def test_unit_state_round_trips(unit):
    model, loss_fn, comps = problem()
    fit(model, loss_fn, comps, "igc", lr=0.1, eta=0.5, epochs=1, units=[], progress=False)
    unit.load_state_dict({"sum": 1.5, "descent": 0.25, "norms": 2.0, "losses": 3.0, "clipped": 4})
    fresh = type(unit)(*([0.5] if isinstance(unit, IGCDrift) else []))
    fresh.load_state_dict(unit.state_dict())
    assert fresh.state_dict() == unit.state_dict()


def test_two_units_of_one_name_are_refused():
    with pytest.raises(ValueError, match="share a name"):
        Units([StepStatistics(), StepStatistics()])


def test_a_gradient_of_norm_exactly_eta_is_not_clipped_nor_counted_as_clipped():
    """The boundary ‖g‖ = η: C(g; η) = g (bitwise), and no share counts it as clipped.

    f_i(w) = ⟨a_i, w⟩ has the gradient a_i exactly: norms 5 (= η), 10 and 1. The
    steps use C, the rows count ``n_i > η`` (the probe's ``clipped_fraction``, the
    steps' ``train_clipped_share``), the Step's indicator likewise.
    """
    a = torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.6, 0.8]], dtype=torch.float64)
    comps = Components.from_tensors(a, torch.zeros(3, dtype=torch.float64), batch_size=1)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    w0 = model.weight.detach().clone()
    eta, lr = 5.0, 0.5
    spy = _BeforeUpdate()
    hist = fit(model, lambda out, y: out.sum(), comps, "igc", lr=lr, eta=eta, epochs=1,
               units=[spy], progress=False)  # fmt: skip
    # C(a_1; 5) = a_1 (norm exactly η: untouched), C(a_2; 5) = a_2/2, C(a_3; 5) = a_3
    expected = [a[0], a[1] / 2, a[2]]
    assert all(torch.equal(g, e) for g, e in zip(spy.grads, expected, strict=True))
    assert torch.equal(model.weight.detach(), w0 - lr * (a[0] + a[1] / 2 + a[2]))
    assert hist.rows[0]["clipped_fraction"] == 1 / 3  # only the norm 10
    assert hist.rows[0]["train_clipped_share"] == 1 / 3
    assert spy.indicators == [0.0, 1.0, 0.0]
    on = Step(1, 0, eta, eta, 0.0, [])
    assert on.clip_indicator == 0.0
    assert Step(1, 0, eta, math.nextafter(eta, math.inf), 0.0, []).clip_indicator == 1.0


class _BeforeUpdate(Unit):
    """Keeps the gradient each update is handed and the step's clip indicator."""

    name = "before_update"

    def __init__(self):
        self.grads, self.indicators = [], []

    def needs(self, point):
        return Needs.STEP_GRADIENT

    def before_update(self, step):
        self.grads.append(step.params[0].grad.detach().reshape(-1).clone())
        self.indicators.append(step.clip_indicator)
