"""The Monitor with per-sample components (``per_sample=True``): a plain loop, the HF Trainer.

Every sample of the Monitor's components is a component: at every probe the
recorded norms, dots, losses, ‖∇f‖, ρ(η), c1 (and with an Adam ρ_P) equal each
sample's own float64 gradient's (a brute force: one autograd call per sample on
a float64 copy), 1e-10 relative in float64 and 1e-6 in float32, with no
parameter on the fallback; the step cosines are the step gradient's with the
per-sample ∇f. Hugging Face causal LMs reach the per-sample route through
:class:`~clipscope.loop.integrations.hf.PerSampleLM`: its loss is each sample's
own token mean, independent of right padding under the attention mask, and a
real ``transformers.Trainer`` with the callback records the same exact numbers.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from clipscope import Components, Monitor
from clipscope.engine import probe, reference_probe
from clipscope.engine.verify import PerSampleFallbackWarning
from clipscope.errors import ConfigError
from clipscope.loop.units import Needs, Unit
from clipscope.run.directory import TIMING_COLUMNS, load_run

F64 = torch.float64
ETA = 0.5


def tol(dtype):
    return 1e-10 if dtype == F64 else 1e-6


def close(a, b, rtol, scale=None):
    """Return whether |a - b| <= rtol·max(|b|, scale) elementwise (scale: the quantity's size)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ref = np.maximum(np.abs(b), np.abs(b).max() if scale is None else scale)
    return bool(np.all(np.abs(a - b) <= rtol * np.maximum(ref, 1e-300)))


def brute_force(model, loss_fn, components):
    """Each sample's own float64 gradient: ``(G (N, n), losses (N,))``, in component order."""
    m64 = copy.deepcopy(model).double()
    params = [p for p in m64.parameters() if p.requires_grad]
    rows, losses = [], []
    for c in range(len(components)):
        x, y = components.batch(c)
        x = x.double() if x.is_floating_point() else x
        y = y.double() if y.is_floating_point() else y
        for j in range(x.shape[0]):
            loss = loss_fn(m64(x[j : j + 1]), y[j : j + 1])
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
            losses.append(float(loss.detach()))
    return torch.stack(rows), np.array(losses)


def expected(G, losses, eta):
    """Return the probe's statistics from the per-sample gradients, by their definitions."""
    full = G.mean(0)
    norms = G.norm(dim=1).numpy()
    dots = (G @ full).numpy()
    gn = float(full.norm())
    gam = np.minimum(1.0, eta / norms)
    return {
        "norms": norms,
        "dots": dots,
        "losses": losses,
        "grad_norm": gn,
        "loss": float(losses.mean()),
        "rho": float((gam * dots).sum() / dots.sum()),
        "c1": float(np.mean(dots / (norms * gn))),
        "clipped_fraction": float(np.mean(norms > eta)),
        "full": full,
    }


class Check(Unit):
    """At every probe: the float64 brute force of the per-sample statistics, kept for the test."""

    name = "check"

    def __init__(self, loss_fn, components, eta, *, preconditioned=None):
        self.loss_fn, self.components, self.eta = loss_fn, components, eta
        self.preconditioned = preconditioned  # batch-size-1 components: reference_probe with P
        self.seen: list[tuple] = []

    def needs(self, point):
        return Needs.NOTHING

    def at_point(self, point):
        if point.probe is None:
            return
        G, losses = brute_force(point.model, self.loss_fn, self.components)
        ref = expected(G, losses, self.eta)
        if self.preconditioned is not None:
            r = reference_probe(
                point.model, self.loss_fn, self.preconditioned, etas=(),
                preconditioner=point.loop.preconditioner,
            )  # fmt: skip
            ref["rho_p"] = float(r.preconditioned.stats.ratio(self.eta))
            ref["dots_p"] = r.preconditioned.dots
        self.seen.append((point.probe, dict(point.row), ref))


def assert_probes_match(check, dtype, n):
    rtol = tol(dtype)
    assert check.seen
    for result, row, ref in check.seen:
        assert result.route in ("per-sample", "per-sample-kept"), result.route
        assert result.verification["fallback"] == {}  # every parameter by a layer rule
        assert result.m == n and list(result.sizes) == [1] * n
        scale_d = ref["grad_norm"] * ref["norms"].max()  # |d_i| <= n_i‖∇f‖
        assert close(result.norms, ref["norms"], rtol)
        assert close(result.dots, ref["dots"], rtol, scale=scale_d)
        assert close(result.losses, ref["losses"], rtol)
        for key in ("grad_norm", "loss", "rho", "c1", "clipped_fraction"):
            assert close(row[key], ref[key], rtol), (key, row[key], ref[key])
        if "rho_p" in ref:
            assert close(row["rho_p"], ref["rho_p"], rtol)
            assert close(result.preconditioned.dots, ref["dots_p"], rtol, scale=None)


# ----------------------------------------------------------------------------- a plain loop


def regression(dtype=F64, n=18, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=dtype)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + torch.randn(n, generator=gen, dtype=dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)

    def loss_fn(out, y):
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    return model, loss_fn, X, Y, Components.from_tensors(X, Y, batch_size=batch, seed=seed)


def train(model, loss_fn, monitor, X, Y, steps, opt, *, batch=4, eta=ETA, grads=None):
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        monitor.step(step)
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), Y[idx]).backward()
        if grads is not None:
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), eta)
        monitor.gradient(norm)
        opt.step()
    monitor.close(probe=True)


class Centred(nn.Module):
    """Couples the samples of a batch: ``lin(x - x.mean(0))`` (float64)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.lin(x - x.mean(0))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("route", ["auto", "per-sample"])
def test_a_plain_loop_records_each_samples_own_float64_gradient(tmp_path, dtype, route):
    model, loss_fn, X, Y, comps = regression(dtype)
    check = Check(loss_fn, comps, ETA)
    monitor = Monitor(
        model, loss_fn, comps, eta=ETA, every=3, route=route, per_sample=True,
        run_dir=tmp_path / "run", units=[check],
    )  # fmt: skip
    assert monitor.setting["m"] == len(X) and monitor.setting["batch_size"] == 1
    assert monitor.setting["chunk_size"] == 6 and monitor.setting["per_sample"] is True
    grads: list[torch.Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        train(model, loss_fn, monitor, X, Y, 6, torch.optim.SGD(model.parameters(), lr=0.1),
              grads=grads)  # fmt: skip
    assert [int(r["step"]) for r in monitor.rows] == [0, 3, 6]
    assert_probes_match(check, dtype, len(X))
    if route == "auto":
        assert check.seen[0][0].route == "per-sample-kept"

    # the run directory: m = N components of one sample; the step cosines are the
    # mini-batch step gradient's with the per-sample ∇f of the interval's probe
    run = load_run(tmp_path / "run")
    assert run.batch_size == 1
    for k, (_, _, ref) in enumerate(check.seen[:2]):
        arrays = np.load(tmp_path / "run" / "components" / f"epoch_{k:04d}.npz")
        assert len(arrays["norms"]) == len(X) and (arrays["sizes"] == 1).all()
        steps = np.load(tmp_path / "run" / "components" / f"epoch_{k:04d}_steps.npz")
        full = ref["full"]
        want = [float(g @ full / (g.norm() * full.norm())) for g in grads[3 * k : 3 * k + 3]]
        assert close(steps["step_cos"], want, tol(dtype) * 10, scale=1.0)
        want_norms = [float(g.norm()) for g in grads[3 * k : 3 * k + 3]]
        assert close(steps["step_grad_norm"], want_norms, tol(dtype) * 10)


@pytest.mark.slow
def test_the_report_reads_a_per_sample_monitor_run_as_batch_size_1(tmp_path):
    from clipscope.report import build_report

    model, loss_fn, X, Y, comps = regression(F64)
    check = Check(loss_fn, comps, ETA)
    monitor = Monitor(model, loss_fn, comps, eta=ETA, every=3, per_sample=True,
                      run_dir=tmp_path / "run", units=[check])  # fmt: skip
    train(model, loss_fn, monitor, X, Y, 6, torch.optim.SGD(model.parameters(), lr=0.1))
    build_report(tmp_path / "run")
    found = json.loads((tmp_path / "run" / "findings.json").read_text())["tasks"]["run"]
    assert found["runs"] == ["monitor-B1"]
    rhos = [row["rho"] for _, row, _ in check.seen]
    assert found["min_rho"]["value"] == pytest.approx(min(rhos), rel=1e-12)
    assert found["steps"]["monitor-B1"]["steps"] == 6
    # the figures and the advice name the components, not a loop of batch size 1
    text = (tmp_path / "run" / "report.html").read_text()
    assert "Monitor per-sample" in text and "Monitor B=1" not in text
    # the answers say they are about per-sample clipping, in the report, findings and advise
    assert "per-sample clipping" in text and "no threshold" in text
    assert found["per_sample_components"]["runs"] == ["monitor-B1"]
    from clipscope.commands.advise import advice_of

    advice = advice_of(tmp_path / "run")
    assert "no threshold" in advice["tasks"]["run"]["runs"]["monitor-B1"]["per_sample_components"]


def test_an_adam_monitor_records_rho_p_of_the_samples():
    model, loss_fn, X, Y, comps = regression(F64)
    singles = Components.from_tensors(X, Y, batch_size=6, seed=0).with_batch_size(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    check = Check(loss_fn, comps, ETA, preconditioned=singles)
    monitor = Monitor(model, loss_fn, comps, eta=ETA, every=3, per_sample=True, units=[check],
                      optimizer=opt)  # fmt: skip
    train(model, loss_fn, monitor, X, Y, 6, opt)
    assert_probes_match(check, F64, len(X))
    assert check.seen[1][1]["p_unset_share"] == 0.0  # P from Adam's state, not the identity


def test_per_sample_components_are_refused_before_anything_is_written(tmp_path):
    model, loss_fn, X, Y, comps = regression(F64)
    run = tmp_path / "run"
    kw = {"eta": ETA, "every": 2, "run_dir": run}
    with pytest.raises(ConfigError, match="per_sample=True"):
        Monitor(model, loss_fn, comps, route="per-sample-kept", **kw)
    with pytest.raises(ConfigError, match="per_sample=True runs one of"):
        Monitor(model, loss_fn, comps, route="two-pass", per_sample=True, **kw)
    with pytest.raises(ConfigError, match="per_sample must be"):
        Monitor(model, loss_fn, comps, per_sample=1, **kw)
    with pytest.raises(ConfigError, match="Hessian norm"):
        Monitor(model, loss_fn, comps, per_sample=True, smoothness_every=1, **kw)
    with pytest.raises(ConfigError, match="each sample's gradient"):
        Monitor(model, loss_fn, comps, per_sample=True, **{**kw, "eta": "descent-safe"})
    dict_comps = Components.from_dataset(
        [{"x": X[j], "y": Y[j]} for j in range(len(X))], batch_size=6
    )
    with pytest.raises(ValueError, match="PerSampleLM"):
        Monitor(model, lambda model, batch: loss_fn(model(batch["x"]), batch["y"]), dict_comps,
                per_sample=True, **kw)  # fmt: skip

    with pytest.raises(ValueError, match="do not interact"):
        Monitor(Centred(), loss_fn, comps, per_sample=True, **kw)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(ConfigError, match="BatchNorm"):
        Monitor(bn, loss_fn, comps, per_sample=True, **kw)
    assert not run.exists()


def test_a_per_sample_state_is_not_loaded_into_a_mini_batch_monitor():
    model, loss_fn, X, Y, comps = regression(F64)
    monitor = Monitor(model, loss_fn, comps, eta=ETA, every=2, per_sample=True)
    train(model, loss_fn, monitor, X, Y, 2, torch.optim.SGD(model.parameters(), lr=0.1))
    other = Monitor(model, loss_fn, comps, eta=ETA, every=2)
    with pytest.raises(ConfigError, match="per_sample"):
        other.load_state_dict(monitor.state_dict())
    again = Monitor(model, loss_fn, comps, eta=ETA, every=2, per_sample=True)
    again.load_state_dict(monitor.state_dict())  # the same setting: accepted


def test_the_lightning_callback_records_each_samples_own_float64_gradient():
    pl = pytest.importorskip("lightning.pytorch")
    from clipscope.loop.integrations.lightning import MonitorCallback

    model, loss_fn, X, Y, comps = regression(F64, n=16, batch=5)  # chunks 5, 5, 5, 1

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return loss_fn(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    check = Check(loss_fn, comps, ETA)
    monitor = Monitor(module, loss_fn, comps, eta=ETA, every=2, per_sample=True, units=[check])
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", gradient_clip_val=ETA, callbacks=[MonitorCallback(monitor)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    data = torch.utils.data.TensorDataset(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert [int(r["step"]) for r in monitor.rows] == [0, 2]
    assert_probes_match(check, F64, 16)


# ----------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("clipscope.loop.integrations.hf")

VOCAB = 13


def _gpt2(dtype):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=12, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager" if dtype == F64 else None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(dtype)


def _llama(dtype, attention=None):
    """Return a tiny Llama (its eager attention takes the softmax in float32, even in float64)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=12,
        attn_implementation=attention or ("eager" if dtype == F64 else None),
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype)


FAMILIES = {"gpt2": _gpt2, "llama": _llama}


def texts(n, seed=0, low=3, high=9):
    """``n`` token sequences of lengths in [low, high), labels = inputs, prompt ignored on some."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for j in range(n):
        length = int(torch.randint(low, high, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        if j % 3 == 0:
            labels[:2] = -100  # an ignored prompt
        items.append({"input_ids": ids, "labels": labels})
    return items


def pad_right(items):
    """Pad to the batch's longest sequence on the right: id 0, mask 0, label -100."""
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = it["input_ids"], 1, it["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_samples_loss_and_gradient_do_not_depend_on_right_padding(family):
    torch.manual_seed(0)
    # Llama's eager attention rounds its softmax to float32 (row sums over T differ in the last
    # bits with the padded length): its SDPA attention computes in float64
    model = _llama(F64, "sdpa") if family == "llama" else _gpt2(F64)
    lm = hf.PerSampleLM(model)
    params = list(lm.parameters())
    items = texts(6)
    x, y = lm.collate(pad_right)(items)
    assert (x[:, 1] == 0).any()  # some rows are padded
    for j, item in enumerate(items):
        alone_x, alone_y = lm.collate()([item])  # unpadded, no mask
        padded = lm.loss(lm(x[j : j + 1]), y[j : j + 1])
        alone = lm.loss(lm(alone_x), alone_y)
        assert abs(float(padded.detach()) - float(alone.detach())) <= 1e-10 * float(alone.detach())
        g_pad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(padded, params)])
        g_alone = torch.cat([g.reshape(-1) for g in torch.autograd.grad(alone, params)])
        assert float((g_pad - g_alone).norm()) <= 1e-10 * float(g_alone.norm())
        # Hugging Face's own loss of the sample alone (its causal shift, -100 ignored): it
        # casts the logits to float32 (logits.float()), so the two agree to float32 rounding
        own = lm.model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
        assert abs(float(own) - float(alone)) <= 1e-6 * abs(float(own))
    # in a batch, the mean of the samples' own means (not the token mean)
    per = torch.stack([lm.loss(lm(x[j : j + 1]), y[j : j + 1]) for j in range(len(items))])
    assert abs(float(lm.loss(lm(x), y)) - float(per.mean())) <= 1e-12 * float(per.mean())


def test_per_sample_lm_runs_the_trainers_forward_with_the_mask():
    """``lm(x)`` is ``model(**batch).logits`` (mask included); left padding moves GPT-2's rows."""
    torch.manual_seed(0)
    model = _gpt2(F64)
    lm = hf.PerSampleLM(model)
    items = texts(4)
    left = pad_right(items)
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):  # to the left
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            row = left[key][i, :n].clone()
            left[key][i] = fill
            left[key][i, -n:] = row
    x, y = hf._pack(left)
    batch = {k: v for k, v in left.items() if k != "labels"}
    assert torch.equal(lm(x), model(**batch).logits)
    assert not torch.allclose(lm(x), model(left["input_ids"]).logits)  # the mask matters here
    # GPT-2 counts positions from 0 whatever the mask: a left-padded row is not the sample alone
    j = min(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    assert x[j, 1, 0] == 0  # padded on the left
    alone = lm.loss(lm(lm.collate()([items[j]])[0]), lm.collate()([items[j]])[1])
    padded = lm.loss(lm(x[j : j + 1]), y[j : j + 1])
    assert abs(float(padded.detach()) - float(alone.detach())) > 1e-6


def test_per_sample_lm_collate_refuses_what_it_cannot_pass_on():
    lm = hf.PerSampleLM(_gpt2(torch.float32))
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="token_type_ids"):
        lm.collate()([{"input_ids": ids, "labels": ids, "token_type_ids": ids}])
    with pytest.raises(ValueError, match="no label to predict"):
        lm.collate()([{"input_ids": ids, "labels": torch.tensor([5, -100, -100])}])
    with pytest.raises(ValueError, match=r"no \['labels'\]"):
        lm.collate()([{"input_ids": ids}])
    with pytest.raises(ValueError, match="0 and 1"):
        lm.collate()([{"input_ids": ids, "labels": ids, "attention_mask": torch.tensor([1, 2, 1])}])
    with pytest.raises(TypeError, match="not a dict"):
        lm.collate(lambda items: items)([{"input_ids": ids, "labels": ids}])
    with pytest.raises(ValueError, match=r"\(B, 2, T\)"):
        lm(ids[None])
    x, y = lm.collate()([{"input_ids": ids, "labels": ids}] * 2)
    comps = lm.components([{"input_ids": ids, "labels": ids}] * 4, batch_size=2)
    with pytest.raises(TypeError, match=r"on PerSampleLM\(model\)"):  # the model itself
        Monitor(lm.model, lm.loss, comps, eta=1.0, every=1, per_sample=True)
    with pytest.raises(ValueError, match=r"logits \(B, T, V\)"):
        lm.loss(lm(x)[0], y)


def _equal_items(n=8, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=gen)
    return [{"input_ids": ids[j], "labels": ids[j].clone()} for j in range(n)]


def _component_of(comps, j):
    """Return the component holding dataset item ``j`` (from the partition, not a message)."""
    return next(c for c, ix in enumerate(comps.indices) if j in ix.tolist())


def test_per_sample_lm_refusals_name_the_dataset_items():
    """A refused batch names the dataset indices of its culprits (ValueError, not TypeError)."""
    lm = hf.PerSampleLM(_gpt2(torch.float32))
    data = _equal_items()
    first = int(Components.from_dataset(data, batch_size=4, seed=0).indices[0][0])
    # a wrong value in every item: the first item collated is named, as a ValueError
    twos = [dict(it, attention_mask=torch.full((6,), 2)) for it in data]
    with pytest.raises(
        ValueError, match=rf"attention_mask of dataset item\(s\) \[{first}\] holds \[2\]"
    ):
        lm.components(twos, batch_size=4, seed=0)
    typed = [dict(it, token_type_ids=torch.zeros(6, dtype=torch.long)) for it in data]
    with pytest.raises(
        ValueError, match=rf"batch of dataset item\(s\) \[{first}\] holds \['token_type"
    ):
        lm.components(typed, batch_size=4, seed=0)
    # one item without a label (not the first): named by its dataset index, at any batch size
    for j in (k for k in range(len(data)) if k != first):
        bad = [dict(it) for it in data]
        bad[j] = dict(bad[j], labels=torch.full((6,), -100))
        comps = lm.components(bad, batch_size=4, seed=0)
        with pytest.raises(ValueError, match=rf"dataset item\(s\) \[{j}\] have no label"):
            comps.batch(_component_of(comps, j))
        with pytest.raises(ValueError, match=rf"dataset item\(s\) \[{j}\] have no label"):
            comps.with_batch_size(8).batch(0)  # the dyadic route's parents
        masked = [dict(it, attention_mask=torch.ones(6, dtype=torch.long)) for it in data]
        masked[j]["attention_mask"] = torch.tensor([1, 1, 3, 1, 0, 0])
        comps = lm.components(masked, batch_size=4, seed=0)
        with pytest.raises(
            ValueError, match=rf"attention_mask of dataset item\(s\) \[{j}\] holds \[3\]"
        ):
            comps.batch(_component_of(comps, j))
    # a 1-token sample (no label after the shift), padded by the user's collate, in a probe
    short = [dict(it) for it in data]
    short[1] = {"input_ids": data[1]["input_ids"][:1], "labels": data[1]["labels"][:1]}
    comps = lm.components(short, batch_size=4, seed=0, collate_fn=pad_right)
    assert first != 1
    with pytest.raises(ValueError, match=r"dataset item\(s\) \[1\] have no label"):
        probe(lm, lm.loss, comps, batch_sizes=[1])
    # the collate called directly knows rows only
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the batch.* have no label"):
        lm.collate(pad_right)(short[:2])


class Grads(transformers.TrainerCallback):
    """Keep the gradient the optimizer is about to apply (before the Monitor's callback)."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append(
            torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]).double().clone()
        )


@pytest.mark.parametrize(
    "family,dtype", [("gpt2", F64), ("gpt2", torch.float32), ("llama", F64)], ids=str
)
def test_the_trainer_callback_records_each_samples_own_float64_gradient(tmp_path, family, dtype):
    torch.manual_seed(0)
    model = FAMILIES[family](dtype)
    lm = hf.PerSampleLM(model)
    data = texts(24, seed=1)
    comps = lm.components(data[:10], batch_size=4, collate_fn=pad_right)  # chunks 4, 4, 2
    eta = 5.0  # above most per-sample norms: some clipped, some not
    check = Check(lm.loss, comps, eta)
    monitor = Monitor(lm, lm.loss, comps, eta=eta, every=2, per_sample=True, units=[check],
                      run_dir=tmp_path / "run")  # fmt: skip
    grads = Grads(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        max_grad_norm=0.0, logging_steps=1, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=pad_right,
        callbacks=[grads, hf.MonitorCallback(monitor)],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSampleFallbackWarning)
        trainer.train()
    assert [int(r["step"]) for r in monitor.rows] == [0, 2]
    assert_probes_match(check, dtype, 10)
    assert all(not r.info["buffers_held"] for r, _, _ in check.seen)
    # AdamW (the Trainer's): ρ_P recorded at every probe
    assert all(math.isfinite(row["rho_p"]) for _, row, _ in check.seen)
    # the steps: the Trainer's mini-batch gradient against the per-sample ∇f of the probe
    for k, (_, _, ref) in enumerate(check.seen):
        steps = np.load(tmp_path / "run" / "components" / f"epoch_{k:04d}_steps.npz")
        full = ref["full"]
        want = [float(g @ full / (g.norm() * full.norm())) for g in grads.seen[2 * k : 2 * k + 2]]
        assert close(steps["step_cos"], want, tol(dtype) * 10, scale=1.0)


def _trainer(tmp_path, model, monitor, data, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        max_grad_norm=0.0, logging_steps=1, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    return transformers.Trainer(
        model=model, args=args, train_dataset=data,
        callbacks=[*callbacks, hf.MonitorCallback(monitor)],
    )  # fmt: skip


def test_the_trainer_callback_refuses_attention_dropout_before_any_step(tmp_path):
    """model.eval() passes the Monitor's checks; the Trainer trains in train mode: refused first."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=12, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.1,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    lm = hf.PerSampleLM(model)
    data = _equal_items(16)
    comps = lm.components(data[:8], batch_size=4, seed=0)
    # in eval mode the Monitor's checks accept it
    monitor = Monitor(
        lm, lm.loss, comps, eta=1.0, every=2, per_sample=True, run_dir=tmp_path / "run"
    )
    before = copy.deepcopy(model.state_dict())
    trainer = _trainer(tmp_path, model, monitor, data)
    with pytest.raises(ValueError, match=r"trains the model in train mode.*changed between two "
                       r"evaluations.*dropout='fixed'.*attn_pdrop=0\.1") as caught:  # fmt: skip
        trainer.train()
    assert "GPT-2: attn_pdrop, BERT: attention_probs_dropout_prob, Llama: attention_dropout" in str(
        caught.value
    )
    assert trainer.state.global_step == 0  # no optimizer step
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert monitor.rows == [] and not (tmp_path / "run").exists()  # nothing written
    assert not model.training  # the modes it was given back
    # the fix the message names: dropout="fixed" trains
    fixed = Monitor(lm, lm.loss, comps, eta=1.0, every=2, per_sample=True, dropout="fixed")
    _trainer(tmp_path, model, fixed, data).train()
    assert [int(r["step"]) for r in fixed.rows] == [0, 2]


class Grow(transformers.TrainerCallback):
    """Append an item to ``pool`` after step ``at``: the next probe finds its dataset changed."""

    def __init__(self, pool, at):
        self.pool, self.at = pool, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.pool.append(self.pool[0])


def test_a_probe_error_inside_the_trainer_leaves_the_run_stopped(tmp_path, capsys):
    """The Trainer has no exception hook: the callback finishes the run directory as failed."""
    from clipscope.cli import main

    torch.manual_seed(0)
    model = _gpt2(torch.float32)
    lm = hf.PerSampleLM(model)
    data = _equal_items(16)
    pool = data[:8]
    comps = lm.components(pool, batch_size=4, seed=0)
    run = tmp_path / "run"
    monitor = Monitor(lm, lm.loss, comps, eta=1.0, every=2, per_sample=True, run_dir=run)
    trainer = _trainer(tmp_path, model, monitor, data, callbacks=[Grow(pool, 1)])
    with pytest.raises(ValueError, match="the dataset has 9 items now"):
        trainer.train()
    assert trainer.state.global_step == 2  # the probe at step 2 raised
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["step"] == 1  # the last step recorded
    assert summary["message"].startswith("ValueError: the dataset has 9 items now")
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    notes = json.loads((run / "findings.json").read_text())["tasks"]["run"]["notes"]
    assert len(notes) == 1 and notes[0].startswith("stopped: failed: ValueError: the dataset has 9")
    assert "stopped: failed: ValueError" in (run / "report.html").read_text()


# ----------------------------------------------------------------------------- torchrun


def _ddp_loop(run_dir, rank=0, world=1):
    """Run a per-sample Monitor in a (DistributedDataParallel) loop; return its rows, last probe."""
    from torch.nn.parallel import DistributedDataParallel

    model, loss_fn, X, Y, comps = regression(F64, n=20, batch=6)  # chunks 6, 6, 6, 2
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    monitor = Monitor(net, loss_fn, comps, eta=ETA, every=2, per_sample=True, run_dir=run_dir)
    with monitor:
        for step in range(4):
            monitor.step(step)
            idx = torch.randint(0, len(X), (8,), generator=gen)
            part = idx[rank * 8 // world : (rank + 1) * 8 // world]
            opt.zero_grad()
            loss_fn(net(X[part]), Y[part]).backward()  # DDP averages the equal halves
            monitor.gradient()
            opt.step()
    last = monitor.last_probe
    return {"rows": monitor.rows, "route": last.route, "norms": last.norms, "dots": last.dots}


@pytest.mark.slow
def test_the_per_sample_monitor_under_torchrun_equals_one_process(tmp_path):
    from test_distributed import launch

    proc = launch(str(tmp_path), module="test_monitor_per_sample")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _ddp_loop(tmp_path / "one")
    assert want["route"] == "per-sample-kept" and len(want["norms"]) == 20
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["route"] == want["route"]
        np.testing.assert_allclose(got["norms"], want["norms"], rtol=1e-12)
        np.testing.assert_allclose(got["dots"], want["dots"], rtol=1e-12, atol=1e-15)
        assert len(got["rows"]) == len(want["rows"]) == 2
        for a, b in zip(got["rows"], want["rows"], strict=True):
            for key in b:
                if key not in TIMING_COLUMNS:
                    assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-14, nan_ok=True), key


if __name__ == "__main__":  # the torchrun worker of the test above
    import datetime
    import sys
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    result = _ddp_loop(out / "run", dist.get_rank(), dist.get_world_size())
    torch.save(result, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
