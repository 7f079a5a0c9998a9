"""A forward that draws random numbers the dropout policy does not control is refused.

Every probe route and the Monitor evaluate component 0 twice first
(:func:`clipscope.engine.losses.check_repeatable`): otherwise each statistic would
be a sample of dropout noise, not a property of f_i at x.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipscope import Components
from clipscope.engine import probe, reference_probe
from clipscope.engine.losses import REPEAT_TOLERANCE, check_repeatable


class AlwaysDropout(nn.Module):
    """Dropout written the functional way, on in every mode: no policy reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, training=True))


class TrainModeDropout(nn.Module):
    """Functional dropout keyed on the module's own train flag (as in attention code)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, training=self.training))


def components(m: int = 3, b: int = 4) -> Components:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(m * b, 4, generator=g), torch.randint(0, 3, (m * b,), generator=g)
    return Components.from_tensors(x, y, batch_size=b, seed=0)


@pytest.mark.parametrize("route", ["two-pass", "keep", "dyadic", "per-sample"])
def test_every_route_refuses_a_loss_that_changes_between_evaluations(route):
    torch.manual_seed(0)
    model = TrainModeDropout()
    kwargs = {"batch_sizes": [1]} if route == "per-sample" else {}
    if route == "dyadic":
        kwargs = {"levels": 2}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"changed between two evaluations.*dropout='fixed'"):
        probe(model, F.cross_entropy, components(4), route=route, dropout="off", **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG stream untouched
    assert model.training


def test_fixed_masks_make_the_same_model_repeatable_and_exact():
    torch.manual_seed(0)
    model, comps = TrainModeDropout(), components()
    result = probe(model, F.cross_entropy, comps, route="two-pass", dropout="fixed", seed=5)
    brute = reference_probe(model, F.cross_entropy, comps, dropout="fixed", seed=5)
    torch.testing.assert_close(
        torch.as_tensor(result.norms), torch.as_tensor(brute.norms), rtol=1e-5, atol=1e-7
    )


def test_a_dropout_no_policy_reaches_is_refused_under_both_policies():
    model, comps = AlwaysDropout(), components()
    with pytest.raises(ValueError, match="changed between two evaluations"):
        probe(model, F.cross_entropy, comps, route="keep", dropout="off")
    # "fixed" fixes component i's masks: F.dropout(training=True) draws from the
    # forked, seeded RNG, so the loss is repeatable and the probe is accepted.
    probe(model, F.cross_entropy, comps, route="keep", dropout="fixed")


def test_check_repeatable_returns_both_values_and_tolerates_rounding():
    model, comps = nn.Linear(4, 3), components()
    a, b = check_repeatable(
        model, F.cross_entropy, comps, form="output_target", dropout="off", seed=0,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert a == b
    assert 0 < REPEAT_TOLERANCE < 1e-3


def test_the_per_sample_route_checks_its_first_samples_not_a_whole_chunk():
    from clipscope.engine.probe import REPEAT_ROWS

    model, comps = nn.Linear(4, 3), components(m=2, b=16)
    model.rows = []
    model.register_forward_pre_hook(lambda mod, args: mod.rows.append(args[0].shape[0]))
    check_repeatable(
        model, F.cross_entropy, comps, form="output_target", dropout="off", seed=0,
        device=torch.device("cpu"), rows=3,
    )  # fmt: skip
    assert model.rows == [3, 3]
    model.rows.clear()
    probe(model, F.cross_entropy, comps, batch_sizes=[1], spot_checks=0)
    assert model.rows[:2] == [REPEAT_ROWS, REPEAT_ROWS]  # then pass 1 on whole chunks
    # the entry checks: repeatable (twice), autograd-compatible (once), independent samples
    # (the rows together, then each alone); none of them runs a whole chunk
    entry = model.rows[: model.rows.index(16)]
    assert entry == [REPEAT_ROWS] * 4 + [1] * REPEAT_ROWS
    model.rows.clear()
    probe(model, F.cross_entropy, comps, route="two-pass")
    assert model.rows[:2] == [16, 16]  # a mini-batch component: the whole batch


def test_the_per_sample_route_still_refuses_train_mode_dropout_on_its_first_samples():
    torch.manual_seed(1)
    model = TrainModeDropout()
    with pytest.raises(ValueError, match="changed between two evaluations"):
        probe(model, F.cross_entropy, components(m=2, b=32), batch_sizes=[1], dropout="off")
