"""The per-sample routes on a zoo of architectures against a float64 brute force.

Every architecture of ``zoo.ZOO`` is probed with ``batch_sizes=[1]`` through both
per-sample routes -- ``"auto"``, which keeps the factors (``"per-sample-kept"``:
dots and clipped sums from pass 1's factors), and the two-pass ``"per-sample"`` --
and every number compared with the brute force: each sample's gradient by its own float64
autograd call (through its chunk's batch forward where dropout draws masks),
explicit norms, dots and clipped sums, and each sample's loss in float64.
Tolerances: 1e-10 relative for float64 models, 1e-6 for float32 ones. The
parameters that reach the exact fallback must be exactly the expected ones, and
the route must say so.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import pytest
import torch

from clipscope.components import Components
from clipscope.engine import probe
from clipscope.engine.guard import component_seed, dropout_policy
from clipscope.engine.per_sample import per_sample_grads_reference
from clipscope.engine.per_sample.batch import per_sample_from_output
from clipscope.engine.verify import PerSampleFallbackWarning
from zoo import ETAS, ZOO, Arch


def _losses64(arch: Arch, model, X, Y, states) -> np.ndarray:
    """Each sample's loss in float64: alone, or in its chunk's batch forward with its masks."""
    twin = copy.deepcopy(model).double()
    X = X.double() if X.is_floating_point() else X
    Y = Y.double() if Y.is_floating_point() else Y
    with torch.no_grad():
        if states is None:
            with dropout_policy(twin, "off"):
                out = [arch.loss_fn(twin(X[j : j + 1]), Y[j : j + 1]) for j in range(arch.n)]
            return torch.stack(out).numpy()
        out = []
        for state, s in zip(states, range(0, arch.n, arch.chunk), strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.random.set_rng_state(state)
                x, y = X[s : s + arch.chunk], Y[s : s + arch.chunk]
                out.append(per_sample_from_output(arch.loss_fn, twin(x), y, x.shape[0]))
        return torch.cat(out).numpy()


def brute_force(arch: Arch, model, X, Y) -> dict:
    """float64 per-sample gradients and losses, then explicit sums, as the definitions say."""
    states = None
    if arch.dropout == "fixed" and arch.train:
        rows, states = [], []
        for c, s in enumerate(range(0, arch.n, arch.chunk)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(component_seed(0, c))
                state = torch.random.get_rng_state()
            x, y = X[s : s + arch.chunk], Y[s : s + arch.chunk]
            rows.append(per_sample_grads_reference(model, arch.loss_fn, x, y, rng_state=state))
            states.append(state)
        G = torch.cat(rows)
    else:
        with dropout_policy(model, "off"):
            G = per_sample_grads_reference(model, arch.loss_fn, X, Y)
    full = G.mean(0)
    norms = G.norm(dim=1)
    clipped = {}
    for eta in ETAS:
        total = sum(min(1.0, eta / float(n)) * g for g, n in zip(G, norms, strict=True))
        clipped[eta] = (float(total.norm()), float(total @ full / (total.norm() * full.norm())))
    return {
        "losses": _losses64(arch, model, X, Y, states),
        "norms": norms.numpy(),
        "dots": (G @ full).numpy(),
        "grad_norm": float(full.norm()),
        "clipped": clipped,
    }


ROUTES = {"auto": "per-sample-kept", "per-sample": "per-sample"}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("arch", ZOO, ids=[a.id for a in ZOO])
def test_zoo_matches_float64_brute_force(arch: Arch, route: str):
    model, X, Y = arch.build()
    comps = Components.from_tensors(X, Y, batch_size=arch.chunk)
    # the JVP's dropout masks; models with recurrent modules take their dots by the ghost
    # product (a plain forward, the masks of pass 1), and the kept route runs no model
    recurrent = any(isinstance(m, torch.nn.RNNBase) for m in model.modules())
    dots_fallback = arch.dots_fallback and route == "per-sample" and not recurrent
    expect_warning = bool(arch.fallback) or dots_fallback
    ctx = pytest.warns(PerSampleFallbackWarning) if expect_warning else contextlib.nullcontext()
    with ctx:
        result = probe(
            model,
            arch.loss_fn,
            comps,
            ETAS,
            route=route,
            batch_sizes=[1],
            dropout=arch.dropout,
            seed=0,
        )
    ref = brute_force(arch, model, X, Y)
    rtol = arch.rtol
    scale = float(np.max(np.abs(ref["losses"])))
    np.testing.assert_allclose(result.losses, ref["losses"], rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(result.norms, ref["norms"], rtol=rtol, atol=0)
    atol = rtol * float(np.max(ref["norms"])) * ref["grad_norm"]
    np.testing.assert_allclose(result.dots, ref["dots"], rtol=0, atol=atol)
    assert result.grad_norm == pytest.approx(ref["grad_norm"], rel=rtol)
    for eta, (norm, cos) in ref["clipped"].items():
        assert result.clipped[eta][0] == pytest.approx(norm, rel=rtol)
        assert result.clipped[eta][1] == pytest.approx(cos, rel=rtol, abs=rtol)
    v = result.verification
    assert set(v["fallback"]) == set(arch.fallback)
    assert (v["dots_fallback"] is not None) == dots_fallback
    assert result.route == ROUTES[route] + ("+fallback" if expect_warning else "")
    assert result.info["factors"]["kept"] == (route == "auto")
    assert v["spot_checks"] == min(4, arch.n) and v["consistency"]["flags"] == []
    assert v["attempts"] == arch.attempts
    assert v["structural_checks"] > 0 or not v["rules"]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("arch", [a for a in ZOO if a.fallback], ids=lambda a: a.id)
def test_zoo_strict_raises_only_on_failed_checks(arch: Arch, route: str):
    """strict=True refuses a failed check; a parameter merely without a rule is fine."""
    from clipscope.engine.verify import VerificationError

    model, X, Y = arch.build()
    comps = Components.from_tensors(X, Y, batch_size=arch.chunk)
    kw = {"route": route, "batch_sizes": [1], "dropout": arch.dropout}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = probe(model, arch.loss_fn, comps, **kw)
    stages = {e["stage"] for e in result.verification["events"]}
    assert caught
    if stages <= {"plan", "use", "jvp"}:  # planned: no rule (module or use), no JVP
        with pytest.warns(PerSampleFallbackWarning):
            probe(model, arch.loss_fn, comps, strict=True, **kw)
    else:
        with pytest.raises(VerificationError, match="strict=True"):
            probe(model, arch.loss_fn, comps, strict=True, **kw)


def test_zoo_size():
    """The issue asks for at least 25 architectures, every layer option among them."""
    assert len({a.id.removesuffix("-float32") for a in ZOO}) >= 25
    assert any(a.dtype == torch.float32 for a in ZOO)


@contextlib.contextmanager
def _chunk_rng(state):
    """Run the block from the chunk's RNG state (dropout masks), the caller's stream untouched."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(state)
        yield


@pytest.mark.parametrize("method", ["jvp", "ghost"])
@pytest.mark.parametrize("arch", ZOO, ids=[a.id for a in ZOO])
def test_zoo_dot_methods_match_float64_brute_force(arch: Arch, method: str):
    """Pass 2 of the two-pass route both ways: forward mode and the reverse-mode ghost product.

    Each method runs on a plan that pass 1 (``ghost_pass``) has just checked, on the first
    chunk, and its dots must equal the brute force's ``⟨g_j, v⟩`` for a random ``v``,
    fallbacks included (a recurrent module re-run per sample, the tied head, the JVP whose
    dropout masks differ).
    """
    from clipscope.engine.per_sample import Plan, ghost_pass, per_sample_dots
    from clipscope.engine.per_sample.batch import kernels_for_derivatives

    model, X, Y = arch.build()
    x, y = X[: arch.chunk], Y[: arch.chunk]
    state = None
    if arch.dropout == "fixed" and arch.train:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(component_seed(0, 0))
            state = torch.random.get_rng_state()
        G = per_sample_grads_reference(model, arch.loss_fn, x, y, rng_state=state)
    else:
        with dropout_policy(model, "off"):
            G = per_sample_grads_reference(model, arch.loss_fn, x, y)
    gen = torch.Generator().manual_seed(arch.seed)
    v = torch.randn(G.shape[1], dtype=torch.float64, generator=gen)
    ref = G @ v
    with (
        dropout_policy(model, arch.dropout),
        kernels_for_derivatives(model),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", PerSampleFallbackWarning)
        plan = Plan(model, seed=0)
        with _chunk_rng(state):
            losses = ghost_pass(model, arch.loss_fn, x, y, plan=plan).losses
        # what only the probe's spot check can find (samples on another axis, T = B) moves
        # to the fallback as it does in the probe: the ghost product trusts the rules
        plan.demote([plan.names.index(n) for n in arch.fallback], "spot-norm", "spot check")
        with _chunk_rng(state):
            dots = per_sample_dots(
                model,
                arch.loss_fn,
                x,
                y,
                v.to(arch.dtype),
                plan=plan,
                expect_losses=losses,
                method=method,
            )
    atol = arch.rtol * float(G.norm(dim=1).max()) * float(v.norm())
    np.testing.assert_allclose(dots.numpy(), ref.numpy(), rtol=0, atol=atol)
    if method == "ghost":  # a plain forward: the same masks as pass 1, no dots fallback
        assert plan.dots_fallback is None
    else:
        assert (plan.dots_fallback is not None) == arch.dots_fallback


def test_ghost_dots_need_a_checked_plan():
    """The ghost product trusts the rules: only a plan checked by pass 1 vouches for them."""
    from clipscope.engine.per_sample import Plan, ghost_pass, per_sample_dots
    from clipscope.engine.per_sample.dots import dot_method

    arch = next(a for a in ZOO if a.id == "nanogpt-tied-head")
    model, X, Y = arch.build()
    x, y = X[: arch.chunk], Y[: arch.chunk]
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    v = torch.ones(n, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"method='ghost'.*checked"):
        per_sample_dots(model, arch.loss_fn, x, y, v, method="ghost")
    with pytest.raises(ValueError, match="method must be one of"):
        per_sample_dots(model, arch.loss_fn, x, y, v, method="reverse")
    lstm = next(a for a in ZOO if a.id == "weightdrop-lstm-lm-train-fixed").build()[0]
    assert dot_method(lstm) == "jvp"  # no plan: forward mode, which needs no rule
    plan = Plan(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerSampleFallbackWarning)
        ghost_pass(model, arch.loss_fn, x, y, plan=plan)
    assert plan.structural_checks > 0
    assert dot_method(model, "auto", plan) == "jvp"  # no recurrent module
    assert dot_method(model, "ghost", plan) == "ghost"
