"""The small GPT (clipscope.models.gpt): shapes, causality, the tied head, exact probes on it.

The probes are compared with float64 brute forces: :func:`clipscope.engine.reference_probe`
(every g_i by its own autograd call) and, under AdamW, ``brute_preconditioned`` (P from the
optimizer's state by its formula, u = ∇f/P, d^P = G u). The per-sample route must serve the
batch-first transformer without a fallback (``verification["fallback"] == {}``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from clipscope.components import Components, SequentialComponents
from clipscope.config import parse_config
from clipscope.engine import probe, reference_probe
from clipscope.engine.verify import PerSampleFallbackWarning
from clipscope.errors import ConfigError
from clipscope.models import GPT, GPTLM, build_model
from clipscope.tasks import build_task, lm_loss
from test_preconditioned import ETAS as PRE_ETAS
from test_preconditioned import assert_preconditioned, brute_preconditioned

ETAS = PRE_ETAS  # the etas the brute force of test_preconditioned clips at
SMALL = {"n_layer": 2, "n_head": 2, "d_model": 8, "context": 6}


def small_lm(seed: int = 0, dtype=torch.float64, vocab: int = 7) -> GPTLM:
    torch.manual_seed(seed)
    return GPTLM(vocab, **SMALL).to(dtype)


def test_forward_shapes_and_state_passed_through():
    model = small_lm()
    inp = torch.randint(0, 7, (5, 3))
    logits, state = model(inp, None)
    assert logits.shape == (5, 3, 7) and state is None
    marker = ("any", "state")
    assert model(inp, marker)[1] is marker  # returned unchanged
    assert model.transformer(inp.t()).shape == (3, 5, 7)
    # the sequential output is the batch-first one transposed
    torch.testing.assert_close(logits, model.transformer(inp.t()).transpose(0, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="longer than the context 6"):
        model(torch.zeros(7, 2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(7, n_head=3, d_model=8)
    with pytest.raises(ValueError, match="does not take"):
        build_model("gpt", vocab=7, n_embd=8)


def test_causal_a_later_token_never_changes_an_earlier_logit():
    model = small_lm(seed=1)
    gen = torch.Generator().manual_seed(0)
    inp = torch.randint(0, 7, (6, 4), generator=gen)
    base = model(inp, None)[0]
    for t in range(6):
        changed = inp.clone()
        changed[t] = (changed[t] + 1) % 7
        out = model(changed, None)[0]
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=1e-12)
        assert (out[t:] - base[t:]).abs().amax(dim=-1).min() > 1e-8  # every later row moves


def test_head_is_tied_to_the_token_embedding():
    model = small_lm(seed=2)
    core = model.transformer
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and not any("head" in n for n in names)
    assert core.lm_head_weight is core.wte.weight
    # the logits are LN_f(h) Eᵀ with E the token embedding: scaling one row of E scales
    # that token's logit column wherever the final state is the same
    inp = torch.randint(0, 7, (4, 2))
    h = {}
    hook = core.ln_f.register_forward_hook(lambda m, a, out: h.update(x=out))  # returns None
    logits = model(inp, None)[0]
    hook.remove()
    torch.testing.assert_close(logits, (h["x"] @ core.wte.weight.T).transpose(0, 1))
    # the embedding's gradient carries the head's part: tokens never in the input still get one
    inp = torch.zeros(4, 2, dtype=torch.long)
    lm_loss(model(inp, None)[0], torch.ones(4, 2, dtype=torch.long)).backward()
    assert core.wte.weight.grad[1:].abs().sum() > 0
    n = sum(p.numel() for p in model.parameters())
    d, V, L, C = 8, 7, 2, 6
    assert n == V * d + C * d + L * (2 * 2 * d + 4 * d * d + 4 * d + 8 * d * d + 5 * d) + 2 * d


def _adamw_after_steps(model, comps, steps: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    state = None
    for i in range(steps):
        inp, tgt = comps.batch(i % comps.m)
        out, state = model(inp, state)
        opt.zero_grad()
        lm_loss(out, tgt).backward()
        opt.step()
    opt.zero_grad()
    return opt


@pytest.mark.parametrize("route", ["keep", "two-pass"])
def test_probe_on_windows_matches_float64_brute_force(route):
    model = small_lm(seed=3)
    gen = torch.Generator().manual_seed(3)
    comps = SequentialComponents.from_tokens(torch.randint(0, 7, (60,), generator=gen), 3, 6)
    opt = _adamw_after_steps(model, comps)
    ref = reference_probe(model, lm_loss, comps, ETAS)
    res = probe(model, lm_loss, comps, ETAS, route=route, preconditioner=opt)
    assert res.route == route and res.m == comps.m == 4
    np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
    np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10, atol=1e-14)
    assert res.grad_norm == pytest.approx(ref.grad_norm, rel=1e-10)
    for eta in ETAS:
        assert res.stats.ratio(eta) == pytest.approx(ref.stats.ratio(eta), rel=1e-10)
    assert_preconditioned(res, brute_preconditioned(model, lm_loss, comps, opt), 1e-10)
    assert res.preconditioned.info["without_state"] == []


def test_per_sample_route_serves_the_transformer_without_fallback():
    model = small_lm(seed=4)
    gen = torch.Generator().manual_seed(4)
    X = torch.randint(0, 7, (6, 5), generator=gen)
    Y = torch.randint(0, 7, (6, 5), generator=gen)
    comps = Components.from_tensors(X, Y, batch_size=3)
    core = model.transformer
    opt = torch.optim.AdamW(core.parameters(), lr=1e-2)
    inp, tgt = comps.batch(0)
    lm_loss(core(inp), tgt).backward()
    opt.step()
    opt.zero_grad()
    singles = Components.from_tensors(X, Y, batch_size=1)
    ref = reference_probe(core, lm_loss, singles, ETAS)
    for route in ("per-sample", "per-sample-kept"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PerSampleFallbackWarning)
            res = probe(
                core, lm_loss, comps, ETAS, route=route, batch_sizes=[1], strict=True,
                preconditioner=opt,
            )  # fmt: skip
        assert res.route == route and res.verification["fallback"] == {}
        assert res.verification["uses"]["wte.weight"] == ["embedding", "linear"]
        assert res.verification["rules"]["blocks.0.attn.qkv"] == "linear"
        np.testing.assert_allclose(res.norms, ref.norms, rtol=1e-10)
        np.testing.assert_allclose(res.dots, ref.dots, rtol=1e-10, atol=1e-14)
        assert_preconditioned(res, brute_preconditioned(core, lm_loss, singles, opt), 1e-10)


def _text_config(tmp_path, **over):
    text = "".join(chr(97 + (i * 7 + i // 5) % 11) for i in range(900))
    (tmp_path / "t.txt").write_text(text)
    raw = {
        "task": "language_model",
        "model": "gpt",
        "model_kwargs": {"n_layer": 1, "n_head": 2, "d_model": 8, "context": 8},
        "data": "chars",
        "data_dir": str(tmp_path),
        "train_file": "t.txt",
        "n_samples": 0,
        "batch_size": 4,
        "bptt": 8,
        "optimizer": "adamw",
        "lr": 1e-3,
        "eta": 1.0,
        "epochs": 1,
        "threads": 1,
    }
    raw.update(over)
    return parse_config(raw)


def test_the_task_builds_from_a_text_file_and_checks_the_context(tmp_path):
    cfg = _text_config(tmp_path)
    model, _, comps, heldout = build_task(cfg)
    assert isinstance(model, GPTLM) and model.transformer.wte.num_embeddings == 11
    assert comps.m == math.ceil((810 // 4 - 1) / 8)  # 810 = floor(0.9·900) training characters
    assert comps.data_description["name"] == "chars"
    with torch.no_grad():  # as the loop runs it
        assert 1.0 < heldout(model) < 30.0  # a perplexity over an 11-character vocabulary
    with pytest.raises(ConfigError, match=r"'bptt': 9 .*at most 8 tokens"):
        build_task(_text_config(tmp_path, bptt=9))
    with pytest.raises(ConfigError, match=r"'batch_size'.*no components"):
        build_task(_text_config(tmp_path, n_samples=20, batch_size=16))
