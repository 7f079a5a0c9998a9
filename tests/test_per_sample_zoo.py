"""The per-sample routes on a zoo of architectures against a float64 brute force.

Every architecture of ``zoo.ZOO`` is probed with ``batch_sizes=[1]`` through both
per-sample routes -- ``"auto"``, which keeps the factors (``"per-sample-kept"``:
dots and clipped sums from pass 1's factors), and the two-pass ``"per-sample"`` --
and every number compared with the brute force: each sample's gradient by its own float64
autograd call (through its chunk's batch forward where dropout draws masks),
explicit norms, dots and clipped sums. Tolerances: 1e-10 relative for float64
models, 1e-6 for float32 ones. The parameters that reach the exact fallback
must be exactly the expected ones, and the route must say so.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from clipscope.components import Components
from clipscope.engine import probe
from clipscope.engine.guard import component_seed, dropout_policy
from clipscope.engine.per_sample import per_sample_grads_reference
from clipscope.engine.verify import PerSampleFallbackWarning
from zoo import ETAS, ZOO, Arch


def brute_force(arch: Arch, model, X, Y) -> dict:
    """float64 per-sample gradients, then explicit sums, as the definitions say."""
    if arch.dropout == "fixed" and arch.train:
        rows = []
        for c, s in enumerate(range(0, arch.n, arch.chunk)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(component_seed(0, c))
                state = torch.random.get_rng_state()
            x, y = X[s : s + arch.chunk], Y[s : s + arch.chunk]
            rows.append(per_sample_grads_reference(model, arch.loss_fn, x, y, rng_state=state))
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
    dots_fallback = arch.dots_fallback and route == "per-sample"  # the JVP's dropout masks
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
    if stages <= {"plan", "jvp"}:
        with pytest.warns(PerSampleFallbackWarning):
            probe(model, arch.loss_fn, comps, strict=True, **kw)
    else:
        with pytest.raises(VerificationError, match="strict=True"):
            probe(model, arch.loss_fn, comps, strict=True, **kw)


def test_zoo_size():
    """The issue asks for at least 25 architectures, every layer option among them."""
    assert len({a.id.removesuffix("-float32") for a in ZOO}) >= 25
    assert any(a.dtype == torch.float32 for a in ZOO)
