"""The open registry of per-sample rules: order, a user's own rule, hooks, isolation.

A user registers a rule for their own module with the same decorator the
built-in rule files use; the rule is then held to the same contract (the
family tests of ``test_per_sample_families.py``) and the probe with it equals
the float64 brute force (``reference_probe`` on components of batch size 1).
A wrong rule is caught by the structural check (a wrong batch sum) or the spot
check (a right sum, wrongly split), and the numbers stay exact. Every test
registers inside ``registry.scoped()``; an autouse fixture checks that nothing
leaks into the other tests.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import test_per_sample_families as families
from clipscope.components import Components
from clipscope.engine import probe, reference_probe
from clipscope.engine.per_sample import (
    FAMILIES,
    LayerFamily,
    Plan,
    RuleRegistry,
    register_module_rule,
    registry,
)
from clipscope.engine.per_sample.factors import Rows, Zero
from clipscope.engine.per_sample.family import grads_of
from clipscope.engine.verify import PerSampleFallbackWarning, VerificationError

ETAS = (0.05, 0.5, math.inf)
BUILT_IN = (
    "conv", "embedding", "hf-conv1d", "linear", "multihead-attention", "norm", "lstm", "rnn-loop"
)  # fmt: skip


@pytest.fixture(autouse=True)
def no_leak():
    """Every test leaves the registry as it found it."""
    before = registry.module_rules()
    yield
    assert registry.module_rules() == before


# ----------------------------------------------------------------------------- a user's module


class Scale(nn.Module):
    """``y = x ⊙ weight`` over the last dim, any leading dims (LayerScale-like).

    Written with ``torch.addcmul``, which no use rule serves (``x * weight`` would be
    served by the broadcast use rule without any module rule): without a rule of
    its own the weight is on the fallback.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return torch.addcmul(torch.zeros_like(x), x, self.weight)


class ScaleRule(LayerFamily):
    """``g_j(weight) = Σ_t a_{jt} ⊙ b_{jt}``: small, kept as per-sample rows."""

    name = "scale"

    def factors(self, mod, calls, names, batch):
        used = grads_of(calls)
        if not used:
            return Zero({"weight": tuple(mod.weight.shape)}, batch, mod.weight.device)
        rows = sum((c.inputs[0] * g).reshape(batch, -1, g.shape[-1]).sum(1) for c, g in used)
        return Rows({"weight": self.wrong(rows)})

    def wrong(self, rows):
        return rows

    def batch_grad(self, mod, calls, names, batch):
        return {"weight": self.factors(mod, calls, names, batch).rows["weight"].sum(0)}


class DoubledRule(ScaleRule):
    """Wrong by a factor 2: the batch sum is wrong too (the structural check)."""

    name = "scale-doubled"

    def wrong(self, rows):
        return 2 * rows


class ShuffledRule(ScaleRule):
    """Each sample gets its neighbour's gradient: the batch sum is right (the spot check)."""

    name = "scale-shuffled"

    def wrong(self, rows):
        return rows.roll(1, 0)


def model_with_scale(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(
        dtype
    )


def data(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(7, 3, 5, generator=gen, dtype=dtype)
    Y = torch.randint(0, 3, (7,), generator=gen)
    return X, Y


def singles(X, Y):
    return Components.from_tensors(X, Y, batch_size=1)


def scale_problem():
    """Return the float64 model, its components of 3 samples, the brute force at batch 1."""
    model = model_with_scale()
    X, Y = data()
    ref = reference_probe(model, F.cross_entropy, singles(X, Y), ETAS)
    return model, Components.from_tensors(X, Y, batch_size=3), ref


def assert_per_sample_exact(res, ref, rtol):
    np.testing.assert_allclose(res.norms, ref.norms, rtol=rtol, atol=0)
    atol = rtol * float(np.max(ref.norms)) * ref.grad_norm
    np.testing.assert_allclose(res.dots, ref.dots, rtol=0, atol=atol)
    assert res.grad_norm == pytest.approx(ref.grad_norm, rel=rtol)
    for eta, (norm, cos) in ref.clipped.items():
        assert res.clipped[eta][0] == pytest.approx(norm, rel=rtol)
        assert res.clipped[eta][1] == pytest.approx(cos, rel=rtol, abs=rtol)


# ----------------------------------------------------------------------------- the built-ins


def test_built_in_rules_are_registered_in_their_order():
    names = [rule.name for rule in registry.module_rules()]
    assert sorted(names) == sorted(BUILT_IN)
    assert names.index("lstm") < names.index("rnn-loop")  # order=100: the loop comes last
    assert list(FAMILIES) == list(registry.module_rules())  # the old name, a live view
    plan = Plan(nn.ModuleDict({"a": nn.LSTM(3, 2), "b": nn.LSTM(3, 2, bidirectional=True)}))
    assert {n: f.name for n, _, f, _ in plan.modules} == {"a": "lstm", "b": "rnn-loop"}


def test_use_rules_are_a_read_only_lookup_a_user_can_extend():
    from clipscope.engine.per_sample.uses import UseRule, register_use_rule

    uses = registry.use_rules()
    assert uses[F.linear].name == "linear" and uses[torch.add].name == "broadcast"
    assert uses[torch.cat].name == "concatenate" and uses[F.layer_norm].name == "norm"
    with pytest.raises(TypeError):
        uses[F.linear] = object()  # type: ignore[index]
    assert torch.einsum not in uses
    with registry.scoped():

        @register_use_rule
        class Mine(UseRule):
            name = "mine"
            functions = (torch.einsum,)

        assert registry.use_rules()[torch.einsum].name == "mine"
    assert torch.einsum not in registry.use_rules()


# ----------------------------------------------------------------------------- a user's rule


def test_a_user_rule_holds_to_the_family_contract():
    """The family tests of the built-in rules, run on the user's rule."""
    layer = families.Layer("user-scale", "scale", lambda: Scale(4), families._f(3, 4), 12)
    with registry.scoped():
        register_module_rule(Scale)(ScaleRule)
        families.test_family_rules_match_brute_force(layer)
        families.test_family_factors_match_brute_force(layer)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("route", ["auto", "per-sample"])
def test_a_user_rule_serves_the_probe_exactly(route, dtype):
    model = model_with_scale(dtype)
    X, Y = data(dtype)
    comps = Components.from_tensors(X, Y, batch_size=3)
    twin = copy.deepcopy(model).double()  # the float64 brute force of the same weights
    ref = reference_probe(twin, F.cross_entropy, singles(X.double(), Y), ETAS)
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    with pytest.warns(PerSampleFallbackWarning, match="no per-sample rule for Scale; used by"):
        without = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1])
    assert without.route.endswith("+fallback") and "1.weight" in without.verification["fallback"]
    with registry.scoped():
        register_module_rule(Scale)(ScaleRule)
        res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1])
    assert res.route == ("per-sample-kept" if route == "auto" else "per-sample")
    assert res.verification["rules"]["1"] == "scale"
    assert res.verification["fallback"] == {}
    assert res.verification["structural_checks"] > 0
    assert_per_sample_exact(res, ref, rtol)
    assert_per_sample_exact(without, ref, rtol)


@pytest.mark.parametrize("route", ["auto", "per-sample"])
@pytest.mark.parametrize(
    "rule, stage, attempts",
    [(DoubledRule, "structural", 1), (ShuffledRule, "spot-norm", 2)],
    ids=["wrong-sum-structural", "wrong-split-spot"],
)
def test_a_wrong_user_rule_is_caught_and_the_numbers_stay_exact(rule, stage, attempts, route):
    model, comps, ref = scale_problem()
    with registry.scoped():
        register_module_rule(Scale)(rule)
        with pytest.warns(
            PerSampleFallbackWarning, match=rf"1\.weight -> exact fallback \[{stage}\]"
        ):
            res = probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1])
        with pytest.raises(VerificationError, match=stage):
            probe(model, F.cross_entropy, comps, ETAS, route=route, batch_sizes=[1], strict=True)
    assert res.route.endswith("+fallback")
    assert list(res.verification["fallback"]) == ["1.weight"]
    assert [e["stage"] for e in res.verification["events"]] == [stage]
    assert res.verification["attempts"] == attempts
    assert_per_sample_exact(res, ref, 1e-10)


# ----------------------------------------------------------------------------- order, precondition


def named(base: type, name: str, **attrs) -> type:
    return type(base.__name__ + name.title().replace("-", ""), (base,), {"name": name, **attrs})


def test_order_then_registration_decides_between_two_claims():
    model = nn.Sequential(Scale(3))
    with registry.scoped():
        register_module_rule(Scale)(named(ScaleRule, "scale-a"))
        assert Plan(model).modules[0][2].name == "scale-a"
        register_module_rule(Scale, order=-1)(named(ScaleRule, "scale-b"))
        register_module_rule(Scale, order=-1)(named(ScaleRule, "scale-c"))  # a tie: later
        assert Plan(model).modules[0][2].name == "scale-b"
        names = [r.name for r in registry.module_rules()]
        assert names[:2] == ["scale-b", "scale-c"] and names.index("scale-a") > 1
        # a negative order takes a module type over from a built-in rule
        register_module_rule(nn.Linear, order=-1)(named(ScaleRule, "my-linear"))
        assert Plan(nn.Linear(2, 2)).modules[0][2].name == "my-linear"
    assert Plan(nn.Linear(2, 2)).modules[0][2].name == "linear"


def test_a_rule_refuses_a_module_by_its_precondition():
    def train_mode(self, mod):
        return "train mode" if mod.training else None

    model = nn.Sequential(Scale(3))
    with registry.scoped():
        register_module_rule(Scale, order=-1)(
            named(ScaleRule, "scale-eval-only", precondition=train_mode)
        )
        plan = Plan(model.train())  # left to its uses: addcmul, which no use rule serves
        assert plan.fallback == {} and plan.by_use == {
            0: "no per-sample rule for Scale (train mode)"
        }
        assert Plan(model.eval()).modules[0][2].name == "scale-eval-only"
        # a later rule that claims the module serves it when the first refuses
        register_module_rule(Scale)(ScaleRule)
        assert Plan(model.train()).modules[0][2].name == "scale"


# ----------------------------------------------------------------------------- hooks


class Pair(nn.Module):
    """Uses its child's weight without calling the child (as nn.MultiheadAttention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return F.linear(x, self.inner.weight)


class PairGuard(LayerFamily):
    """Claims nothing; keeps every rule away from Pair's children."""

    name = "pair-guard"

    def excludes(self, mod):
        if not isinstance(mod, Pair):
            return {}
        return {mod.inner: "Pair reads inner.weight without calling inner"}


def test_excludes_hook_keeps_every_rule_away():
    model = nn.Sequential(Pair(), nn.Linear(3, 2))
    assert Plan(model).modules[0][0] == "0.inner"  # the linear rule would serve it
    with registry.scoped():
        registry.register(PairGuard())
        with pytest.warns(PerSampleFallbackWarning, match="without calling inner"):
            plan = Plan(model)
    assert [n for n, *_ in plan.modules] == ["1"]
    assert plan.fallback == {
        0: "Pair reads inner.weight without calling inner",
        1: "Pair reads inner.weight without calling inner",
    }


def test_batch1_hook_sends_a_parameter_to_batch_one_passes_exactly():
    class PerBatch(ScaleRule):
        name = "scale-per-batch"

        def batch1(self, mod):
            return "a test's per-batch gradient" if isinstance(mod, Scale) else None

    model, comps, ref = scale_problem()
    with registry.scoped():
        register_module_rule(Scale)(PerBatch)
        with pytest.warns(PerSampleFallbackWarning, match=r"Scale\(a test's per-batch gradient\)"):
            assert Plan(model).batch1 == {2}
            res = probe(model, F.cross_entropy, comps, ETAS, route="per-sample", batch_sizes=[1])
    assert res.verification["fallback"] == {"1.weight": "Scale(a test's per-batch gradient)"}
    assert_per_sample_exact(res, ref, 1e-10)


def test_the_built_in_exclusions_come_from_the_rule_files():
    """Unregister the rule file that provides a hook, and the planner no longer applies it."""
    emb = nn.Embedding(4, 2, scale_grad_by_freq=True)
    attention = nn.MultiheadAttention(4, 2)
    with pytest.warns(PerSampleFallbackWarning):
        assert Plan(emb).batch1 == {0}
    assert Plan(attention).fallback == {}  # its rule serves out_proj.weight too
    with registry.scoped():
        registry.unregister("embedding")
        registry.unregister("multihead-attention")  # the rule and its exclusion hook
        # without a rule, the parameters are left to their uses (no fallback at plan time)
        assert Plan(emb).batch1 == set()
        assert Plan(emb).by_use == {0: "no per-sample rule for Embedding"}
        plan = Plan(attention)
        assert plan.fallback == {}
        assert plan.by_use == {k: "no per-sample rule for MultiheadAttention" for k in (0, 1)}
        assert [n for n, *_ in plan.modules] == ["out_proj"]  # the linear rule's now


# ----------------------------------------------------------------------------- isolation


def test_unregister_and_scoped_restore_the_registry():
    before = registry.module_rules()
    with registry.scoped():
        rule = registry.register(ScaleRule())
        assert registry.module_rules()[-2:] == (rule, FAMILIES[-1])  # before the order-100 loop
        with pytest.raises(ValueError, match="registered already"):
            registry.register(ScaleRule())
        registry.unregister(ScaleRule)
        registry.register(rule)
        registry.unregister(rule)
        registry.register(rule)
        registry.unregister("scale")
        with pytest.raises(KeyError):
            registry.unregister("scale")
        registry.unregister("linear")  # built-ins too, inside the block
        assert "linear" not in [r.name for r in FAMILIES]
    assert registry.module_rules() == before


def test_registering_checks_what_it_gets():
    fresh = RuleRegistry()
    with pytest.raises(TypeError, match="LayerFamily"):
        fresh.register(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):
        fresh.module_rule(int)
    with pytest.raises(TypeError, match="decorates LayerFamily subclasses"):
        fresh.module_rule(Scale)(object)
    with pytest.raises(TypeError, match="order"):
        fresh.register(ScaleRule(), order=1.5)  # type: ignore[arg-type]
    fresh.module_rule(Scale)(ScaleRule)
    assert [r.name for r in fresh.module_rules()] == ["scale"]
    assert registry.rule_for(Scale(2)) == (None, None)  # another registry: nothing leaked
