"""``clipscope reproduce`` with an arms task (issue 23): η differs per arm, every seed."""

from __future__ import annotations

import json

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

import clipscope.reproduce as rep

ARMS = """
task = "least_squares"
n_samples = 48
dim = 3
batch_size = 8
method = "rr"
lr = 0.2
eta = 0.5
epochs = 2
dtype = "float64"
threads = 1
progress = false

[study]
name = "ls-arms"
description = "arms on least squares"
batch_sizes = [8]
methods = ["rr"]
cross_section = false
seeds = [0, 1]
advise_target = 0.8
arms = [
    {name = "unclipped", eta = inf},
    {name = "fixed"},
    {name = "advised", eta = "advised"},
    {name = "autoclip-25", eta = "autoclip", autoclip_percentile = 25},
    {name = "descent-safe-0.9", eta = "descent-safe", rho_target = 0.9},
]
"""


@pytest.fixture
def arms_task(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "ls_arms.toml").write_text(ARMS)
    monkeypatch.setattr(rep, "TASKS", rep.load_tasks(folder))
    return folder


def test_an_arms_study_runs_every_arm_at_every_seed(arms_task, tmp_path):
    out = tmp_path / "study"
    report = rep.reproduce(["ls-arms"], out, progress=False, echo=lambda t: None)
    study = json.loads((out / "study.json").read_text())
    entries = study["tasks"]["ls-arms"]["runs"]
    labels = [e["arm"] for e in entries]
    assert labels == [f"{a}-seed{s}" for a in
                      ("unclipped", "fixed", "advised", "autoclip-25", "descent-safe-0.9")
                      for s in (0, 1)]  # fmt: skip
    for seed in (0, 1):
        config = tomllib.loads(
            (out / "configs" / "ls-arms" / f"advised-seed{seed}.toml").read_text()
        )
        want = rep.advised_eta(out / "runs" / "ls-arms" / f"unclipped-seed{seed}", 0.8)
        assert config["eta"] == want and config["seed"] == seed
        rule = tomllib.loads(
            (out / "configs" / "ls-arms" / f"descent-safe-0.9-seed{seed}.toml").read_text()
        )
        assert rule["eta"] == "descent-safe" and rule["rho_target"] == 0.9
    assert all("exit_code" not in e for e in entries)
    html = report.read_text()
    assert "eta_rule" in html and "descent-safe-0.9-seed1" in html


def test_an_advised_arm_needs_the_unclipped_arm_first(arms_task):
    text = (arms_task / "ls_arms.toml").read_text()
    text = text.replace('    {name = "unclipped", eta = inf},\n', "")
    (arms_task / "ls_arms.toml").write_text(text)
    rep.TASKS.update(rep.load_tasks(arms_task))
    with pytest.raises(ValueError, match="'unclipped' arm"):
        rep.plan(["ls-arms"], check_data=False)
