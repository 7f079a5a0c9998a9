"""The Monitor in real frameworks: a Lightning Trainer, a Hugging Face Trainer, TensorBoard.

Each framework is a real dependency (the extras ``[lightning]``, ``[hf]``,
``[tensorboard]``, installed by ``make test``); each test runs it for a few steps on
CPU and checks the Monitor's records against the framework's own numbers or a
brute force.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from clipscope import Components, Monitor
from clipscope.engine import probe, reference_probe
from clipscope.errors import ConfigError
from clipscope.loop.integrations.hf import STATE_FILE
from clipscope.loop.integrations.hf import MonitorCallback as HFCallback
from clipscope.loop.integrations.lightning import MonitorCallback as LightningCallback
from clipscope.loop.integrations.tensorboard import TensorBoardScalars
from clipscope.run.directory import read_rows


def steps_arrays(run: Path) -> dict[str, np.ndarray]:
    """Return the per-step arrays of every interval, concatenated in order."""
    files = sorted((run / "components").glob("epoch_*_steps.npz"))
    out: dict[str, list] = {}
    for path in files:
        with np.load(path) as z:
            for key in z.files:
                out.setdefault(key, []).append(z[key])
    return {k: np.concatenate(v) for k, v in out.items()}


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None]
    )


# -- Lightning ------------------------------------------------------------------------


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def mse(out, y):
    return ((out - y) ** 2).mean()


def regression_data(n=32):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=gen)
    return TensorDataset(X, X @ torch.tensor([2.0, -3.0, 1.0]) + torch.randn(n, generator=gen))


class PreClipNorms(pl.Callback):
    """The test's own record of the gradient norm Lightning is about to clip."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(flat_grad(pl_module).norm()))


def lightning_fit(module, callbacks, max_steps, ckpt_path=None, eta=1.0):
    torch.manual_seed(1)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=eta,
        callbacks=callbacks,
    )  # fmt: skip
    loader = DataLoader(regression_data(), batch_size=8, shuffle=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_trainer_with_the_monitor_callback(tmp_path):
    data, eta = regression_data(), 1.0
    torch.manual_seed(0)
    plain = Regression()
    watched = copy.deepcopy(plain)
    lightning_fit(plain, [], max_steps=6)
    comps = Components.from_dataset(data, batch_size=8, seed=0)
    monitor = Monitor(watched, mse, comps, eta=eta, every=2, run_dir=tmp_path / "run")
    norms = PreClipNorms()
    lightning_fit(watched, [LightningCallback(monitor), norms], max_steps=6)
    for p, q in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q)  # the probes leave Lightning's training bitwise unchanged
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    np.testing.assert_array_equal(rows["step"], [0, 2, 4])
    np.testing.assert_allclose(rows["lr"], 0.1)
    steps = steps_arrays(tmp_path / "run")
    np.testing.assert_array_equal(steps["step"], np.arange(1, 7))
    np.testing.assert_allclose(steps["step_grad_norm"], norms.norms, rtol=2e-6)
    np.testing.assert_array_equal(steps["step_clipped"], np.array(norms.norms) > eta)
    assert np.all(np.abs(steps["step_cos"]) <= 1)
    assert (tmp_path / "run" / "summary.json").is_file()


class AdamWRegression(Regression):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.01)


class PreconditionedCapture(pl.Callback):
    """The test's own ρ_P (float64 brute force, P from the trainer's optimizer) and cos(g, u)."""

    def __init__(self, comps, every, eta):
        self.comps, self.every, self.eta = comps, every, eta
        self.u, self.rho_p, self.cos_p = None, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.every == 0 and batch_idx == trainer.global_step:
            params = list(pl_module.parameters())
            ref = reference_probe(
                copy.deepcopy(pl_module).double(), mse, self.comps,
                preconditioner=adam_p(trainer.optimizers[0], params),
            )  # fmt: skip
            self.u = torch.cat([t.reshape(-1) for t in ref.preconditioned.direction])
            self.rho_p.append(ref.preconditioned.ratio(self.eta))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        g = flat_grad(pl_module)
        self.cos_p.append(float(g @ self.u / (g.norm() * self.u.norm())))


def test_lightning_hands_its_adamw_to_the_monitor(tmp_path):
    data, eta = regression_data(), 1.0
    comps = Components.from_dataset(data, batch_size=8, seed=0)
    double = Components.from_dataset(
        TensorDataset(*(t.double() for t in data.tensors)), batch_size=8, seed=0
    )
    torch.manual_seed(0)
    module = AdamWRegression()
    monitor = Monitor(module, mse, comps, eta=eta, every=2, run_dir=tmp_path / "run")
    capture = PreconditionedCapture(double, 2, eta)
    lightning_fit(module, [LightningCallback(monitor), capture], max_steps=4)
    assert monitor.setting["optimizer"] == "AdamW"
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    np.testing.assert_allclose(rows["rho_p"], capture.rho_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows["p_unset_share"], [1.0, 0.0])
    steps = steps_arrays(tmp_path / "run")
    np.testing.assert_allclose(steps["step_cos_p"], capture.cos_p, rtol=1e-5, atol=1e-6)
    # the trainer clips at another threshold than the Monitor's η: refused
    other = Monitor(AdamWRegression(), mse, comps, eta=0.5, every=2, run_dir=tmp_path / "other")
    with pytest.raises(ConfigError, match=r"gradient_clip_val=1.0.*eta is 0.5"):
        lightning_fit(other.model, [LightningCallback(other)], max_steps=2)
    assert not (tmp_path / "other").exists()


def test_lightning_checkpoints_carry_the_monitor(tmp_path):
    comps = Components.from_dataset(regression_data(), batch_size=8, seed=0)
    torch.manual_seed(0)
    module = Regression()
    run = tmp_path / "run"
    first = Monitor(module, mse, comps, eta=1.0, every=2, run_dir=run)
    trainer = lightning_fit(module, [LightningCallback(first)], max_steps=4)
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # Lightning's own checkpoint
    second = Monitor(module, mse, comps, eta=1.0, every=2, run_dir=run)
    last = tmp_path / "last.ckpt"
    lightning_fit(module, [LightningCallback(second)], max_steps=8, ckpt_path=last)
    assert second.setting["run_id"] == first.setting["run_id"]
    np.testing.assert_array_equal(read_rows(run / "epochs.csv")["step"], [0, 2, 4, 6])
    assert [int(r["epoch"]) for r in second.rows] == [0, 1, 2, 3]


# -- Hugging Face ------------------------------------------------------------------------

VOCAB, LENGTH = 50, 8


def gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def token_items(n: int = 24) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": ids[j], "labels": ids[j]} for j in range(n)]


def lm_loss(model, batch):
    return model(**batch).loss


def adam_p(optimizer, params) -> list[torch.Tensor]:
    """P = √(v/(1 − β₂^t)) + ε from an Adam/AdamW state by its formula, float64 (1: no state)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    out = []
    for p in params:
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        state = optimizer.state.get(p)
        if not state:
            out.append(torch.ones_like(p, dtype=torch.float64))
            continue
        bias = 1 - group["betas"][1] ** float(state["step"])
        out.append(torch.sqrt(state["exp_avg_sq"].double() / bias) + group["eps"])
    return out


class Capture(TrainerCallback):
    """The test's own record at each probe point (float64 brute force): ∇f, u = P⁻¹∇f, ρ_P.

    And for each applied g its cosines with ∇f and with u.
    """

    def __init__(self, comps, every, eta):
        self.comps, self.every, self.eta = comps, every, eta
        self.full, self.u, self.cos, self.cos_p, self.rho_p = None, None, [], [], []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self.every == 0:
            twin = copy.deepcopy(model).double()
            P = adam_p(optimizer, [p for p in model.parameters() if p.requires_grad])
            ref = reference_probe(twin, lm_loss, self.comps, preconditioner=P)
            self.full = torch.cat([g.reshape(-1) for g in ref.full_grad])
            self.u = torch.cat([t.reshape(-1) for t in ref.preconditioned.direction])
            self.rho_p.append(ref.preconditioned.ratio(self.eta))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        g = flat_grad(model)
        self.cos.append(float(g @ self.full / (g.norm() * self.full.norm())))
        self.cos_p.append(float(g @ self.u / (g.norm() * self.u.norm())))


def hf_train(tmp_path, callbacks, *, eta, logging_steps, max_steps=6, save_steps=None,
             resume=None, model=None):  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), use_cpu=True, report_to=[], max_grad_norm=eta,
        max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=logging_steps, disable_tqdm=True, seed=7,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )  # fmt: skip
    trainer = Trainer(
        model=model or gpt2(), args=args, train_dataset=token_items(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hugging_face_trainer_with_the_monitor_callback(tmp_path):
    """Trainer clips at the same η; every step logged: norms are the Trainer's own."""
    comps = Components.from_dataset(token_items()[:16], batch_size=4, seed=0)
    eta, every = 1.1, 2
    model = gpt2()
    monitor = Monitor(model, lm_loss, comps, eta=eta, every=every, run_dir=tmp_path / "run")
    capture = Capture(comps, every, eta)
    trainer = hf_train(tmp_path, [HFCallback(monitor), capture], eta=eta, logging_steps=1,
                       model=model)  # fmt: skip
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    steps = steps_arrays(tmp_path / "run")
    np.testing.assert_array_equal(steps["step"], np.arange(1, 7))
    np.testing.assert_allclose(steps["step_grad_norm"], logged, rtol=1e-6)
    np.testing.assert_array_equal(steps["step_clipped"], np.array(logged) > eta)
    assert 0 < steps["step_clipped"].sum() < 6  # both cases occur
    np.testing.assert_allclose(steps["step_cos"], capture.cos, rtol=1e-4, atol=1e-5)
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    np.testing.assert_array_equal(rows["step"], [0, 2, 4])
    # the Trainer's AdamW is the Monitor's: ρ_P at max_grad_norm, each step's cosine with u
    assert monitor.setting["optimizer"] == "AdamW"
    np.testing.assert_allclose(rows["rho_p"], capture.rho_p, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(rows["p_unset_share"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(steps["step_cos_p"], capture.cos_p, rtol=1e-4, atol=1e-5)

    # the same run, logging rarely: where the Trainer clipped, the norm is not knowable
    model = gpt2()
    quiet = Monitor(model, lm_loss, comps, eta=eta, every=every, run_dir=tmp_path / "quiet")
    hf_train(tmp_path, [HFCallback(quiet)], eta=eta, logging_steps=100, model=model)
    rare = steps_arrays(tmp_path / "quiet")
    clipped = np.array(logged) > eta
    assert np.isnan(rare["step_grad_norm"][clipped]).all()
    np.testing.assert_allclose(rare["step_grad_norm"][~clipped], np.array(logged)[~clipped],
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(rare["step_clipped"], clipped)
    np.testing.assert_allclose(rare["step_cos"], steps["step_cos"], rtol=1e-6)


def test_hugging_face_resume_restores_the_monitor_from_the_checkpoint(tmp_path):
    comps = Components.from_dataset(token_items()[:8], batch_size=4, seed=0)
    model = gpt2()
    whole = Monitor(model, lm_loss, comps, eta=1.1, every=2, run_dir=tmp_path / "whole")
    hf_train(tmp_path / "a", [HFCallback(whole)], eta=1.1, logging_steps=1, max_steps=4,
             model=model)  # fmt: skip
    model = gpt2()
    first = Monitor(model, lm_loss, comps, eta=1.1, every=2, run_dir=tmp_path / "run")
    hf_train(tmp_path / "b", [HFCallback(first)], eta=1.1, logging_steps=1, max_steps=4,
             save_steps=3, model=model)  # fmt: skip
    checkpoint = tmp_path / "b" / "hf" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).is_file()
    model = gpt2()
    second = Monitor(model, lm_loss, comps, eta=1.1, every=2, run_dir=tmp_path / "run")
    hf_train(tmp_path / "b", [HFCallback(second)], eta=1.1, logging_steps=1, max_steps=4,
             resume=str(checkpoint), model=model)  # fmt: skip
    assert second.resumed and second.setting["run_id"] == first.setting["run_id"]
    a, b = read_rows(tmp_path / "whole" / "epochs.csv"), read_rows(tmp_path / "run" / "epochs.csv")
    np.testing.assert_array_equal(b["step"], [0, 2])
    for key in ("loss", "grad_norm", "c1", "train_norm", "train_cos"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)


def test_hugging_face_models_with_attention_dropout_need_fixed_masks():
    comps = Components.from_dataset(token_items()[:8], batch_size=4)
    model = gpt2(dropout=0.1)
    with pytest.raises(ValueError, match=r"changed between two evaluations.*dropout='fixed'"):
        Monitor(model, lm_loss, comps, eta=1.0, every=2, dropout="off")
    Monitor(model, lm_loss, comps, eta=1.0, every=2, dropout="fixed")  # repeatable: accepted
    with pytest.raises(ValueError, match=r"changed between two evaluations"):
        probe(model, lm_loss, comps, dropout="off")  # the probe alone refuses too
    probe(model, lm_loss, comps, dropout="fixed")


def test_hugging_face_clipping_threshold_must_be_the_monitors(tmp_path):
    comps = Components.from_dataset(token_items()[:8], batch_size=4)
    model = gpt2()
    monitor = Monitor(model, lm_loss, comps, eta=0.5, every=2, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"max_grad_norm=1.0.*eta is 0.5"):
        hf_train(tmp_path, [HFCallback(monitor)], eta=1.0, logging_steps=1, model=model)
    assert not (tmp_path / "run").exists()


# -- TensorBoard ---------------------------------------------------------------------------


def test_tensorboard_scalars_read_back_from_the_event_file(tmp_path):
    data = regression_data()
    comps = Components.from_dataset(data, batch_size=8, seed=0)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)

    def loss(out, y):
        return ((out.squeeze(-1) - y) ** 2).mean()

    tb = tmp_path / "tb"
    monitor = Monitor(model, loss, comps, eta=2.0, every=3, run_dir=tmp_path / "run",
                      units=[TensorBoardScalars(tb)])  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    monitor.use_optimizer(opt)  # the preconditioned columns and step cosines too
    with monitor:
        for step in range(7):
            monitor.step(step)
            x, y = comps.batch(step % comps.m)
            opt.zero_grad()
            loss(model(x), y).backward()
            monitor.gradient()
            opt.step()
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"clipscope/loss", "clipscope/rho", "clipscope/c1", "clipscope/train_cos",
            "clipscope/step/cos", "clipscope/step/grad_norm", "clipscope/rho_p",
            "clipscope/train_cos_p", "clipscope/step/cos_p"} <= tags  # fmt: skip
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    for column in ("loss", "grad_norm", "c1", "rho", "train_norm", "train_cos", "rho_p"):
        scalars = events.Scalars(f"clipscope/{column}")
        assert [s.step for s in scalars] == [0, 3, 6][: len(scalars)]
        finite = rows[column][np.isfinite(rows[column])]
        np.testing.assert_allclose([s.value for s in scalars], finite, rtol=1e-6)
    steps = steps_arrays(tmp_path / "run")
    scalars = events.Scalars("clipscope/step/cos")
    assert [s.step for s in scalars] == steps["step"].astype(int).tolist()
    np.testing.assert_allclose([s.value for s in scalars], steps["step_cos"], rtol=1e-6)
    scalars = events.Scalars("clipscope/step/cos_p")
    np.testing.assert_allclose([s.value for s in scalars], steps["step_cos_p"], rtol=1e-6)
    assert not any(math.isnan(s.value) for s in events.Scalars("clipscope/train_norm"))


class FunctionalDropoutRegression(Regression):
    """Dropout applied functionally in train mode (no nn.Dropout the policy could turn off)."""

    def forward(self, x):
        return self.net(F.dropout(x, 0.5, training=self.training)).squeeze(-1)


def test_lightning_refuses_train_mode_randomness_before_any_step(tmp_path):
    """Built on an eval-mode module the Monitor's checks pass; Lightning trains in train mode.

    The callback runs them again in train mode at on_train_start: the refusal comes before
    any step, says why, and leaves the module's modes and weights as they were; with
    dropout="fixed" the same fit runs.
    """
    torch.manual_seed(0)
    module = FunctionalDropoutRegression().eval()
    before = copy.deepcopy(module.state_dict())
    comps = Components.from_dataset(regression_data(), batch_size=8, seed=0)
    monitor = Monitor(module, mse, comps, eta=1.0, every=2, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"on_train_start: Lightning trains the model in train "):
        lightning_fit(module, [LightningCallback(monitor)], max_steps=4)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    fixed = Monitor(module, mse, comps, eta=1.0, every=2, run_dir=tmp_path / "fixed",
                    dropout="fixed")  # fmt: skip
    lightning_fit(module, [LightningCallback(fixed)], max_steps=4)
    np.testing.assert_array_equal(read_rows(tmp_path / "fixed" / "epochs.csv")["step"], [0, 2])
