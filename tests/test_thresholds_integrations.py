"""Descent-safe clipping through the Monitor's callbacks: the trainer clips at the Monitor's η.

Lightning's ``gradient_clip_val`` and the Hugging Face Trainer's ``max_grad_norm`` are
set by the callback at every step to ``monitor.eta``, the η decided at the last probe
(issue 23); the test's own callbacks read what the trainer used.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import torch
from tests.test_integrations import (
    Regression,
    flat_grad,
    gpt2,
    hf_train,
    lm_loss,
    mse,
    regression_data,
    steps_arrays,
    token_items,
)
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from clipscope import Components, Monitor
from clipscope.loop.integrations.hf import MonitorCallback as HFCallback
from clipscope.loop.integrations.lightning import MonitorCallback as LightningCallback
from clipscope.run.directory import load_run


class ClipValues(pl.Callback):
    """The threshold Lightning clips at, and the gradient norm before it, at every step."""

    def __init__(self):
        self.values, self.norms = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.values.append(trainer.gradient_clip_val)
        self.norms.append(float(flat_grad(pl_module).norm()))


def test_lightning_clips_at_the_monitors_descent_safe_eta(tmp_path):
    data = regression_data()
    torch.manual_seed(0)
    module = Regression()
    comps = Components.from_dataset(data, batch_size=8, seed=0)
    lines: list[str] = []
    monitor = Monitor(module, mse, comps, eta="descent-safe", rho_target=0.9, every=2,
                      run_dir=tmp_path / "run", log=lines.append)  # fmt: skip
    seen = ClipValues()
    torch.manual_seed(1)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=5.0,
        callbacks=[LightningCallback(monitor), seen],
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    rows = load_run(tmp_path / "run")
    etas = list(rows.column("eta"))
    assert len(etas) == 3 and all(math.isfinite(e) for e in etas)
    # each step clipped at the η decided at its interval's probe (steps 0, 2, 4)
    assert seen.values == [etas[s // 2] for s in range(6)]
    steps = steps_arrays(tmp_path / "run")
    np.testing.assert_array_equal(
        steps["step_clipped"], [n > etas[s // 2] for s, n in enumerate(seen.norms)]
    )
    assert [d.eta for d in rows.replay_etas()] == etas
    assert any("gradient_clip_val=5.0 is replaced" in t for t in lines)
    assert any("descent-safe: η" in t for t in lines)


class MaxGradNorm(TrainerCallback):
    """The Trainer's max_grad_norm and the gradient norm after its clip, at every step."""

    def __init__(self):
        self.values, self.after = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.values.append(args.max_grad_norm)
        self.after.append(float(flat_grad(model).norm()))


def test_hugging_face_clips_at_the_monitors_descent_safe_eta(tmp_path):
    comps = Components.from_dataset(token_items()[:16], batch_size=4, seed=0)
    model = gpt2()
    monitor = Monitor(model, lm_loss, comps, eta="descent-safe", rho_target=0.99, every=2,
                      run_dir=tmp_path / "run")  # fmt: skip
    seen = MaxGradNorm()
    trainer = hf_train(tmp_path, [HFCallback(monitor), seen], eta=1.0, logging_steps=1,
                       model=model)  # fmt: skip
    etas = list(load_run(tmp_path / "run").column("eta"))
    assert len(etas) == 3 and all(math.isfinite(e) for e in etas)
    assert seen.values == [etas[s // 2] for s in range(6)]
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    for s, (before, after) in enumerate(zip(logged, seen.after, strict=True)):
        eta = etas[s // 2]
        # torch's clip_grad_norm_: g·min(1, η/(‖g‖ + 1e-6))
        np.testing.assert_allclose(after, before * min(1.0, eta / (before + 1e-6)), rtol=1e-5)
    assert any(b > etas[s // 2] for s, b in enumerate(logged))  # it did clip
