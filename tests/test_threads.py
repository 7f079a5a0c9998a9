"""The torch thread count: fixed by the study's configs, recorded with every run and study.

Issue 20, items 2 and 3: the numbers of a run depend on the intra-op thread count
(training's float reductions), so the shipped configs fix it (``threads = 1``),
``--threads`` overrides it, and ``env.json`` / ``study.json`` record it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from clipscope.config import load_config
from clipscope.errors import ConfigError
from clipscope.reproduce import CONFIGS, TASKS, plan, reproduce
from clipscope.run.env import environment, environment_changes


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_fixes_one_thread(path):
    assert load_config(path).threads == 1


def test_the_study_plan_takes_the_configs_threads_or_the_override():
    grid = plan(["digits-cnn"], epochs=0, check_data=False)
    assert {cfg.threads for *_, cfg in grid} == {1}
    grid = plan(["digits-cnn"], epochs=0, check_data=False, threads=0)
    assert {cfg.threads for *_, cfg in grid} == {0}
    with pytest.raises(ConfigError, match="threads"):
        plan(["digits-cnn"], epochs=0, check_data=False, threads=(os.cpu_count() or 1) + 1)


def test_the_environment_records_both_thread_counts():
    env = environment()
    assert env["threads"] == torch.get_num_threads()
    assert env["interop_threads"] == torch.get_num_interop_threads()
    assert env["cpus"] == os.cpu_count()
    assert "omp_num_threads" in env


def test_a_resume_with_another_thread_count_is_warned(tmp_path):
    old = environment()
    path = tmp_path / "env.json"
    path.write_text(json.dumps(old | {"threads": old["threads"] + 1}))
    (line,) = environment_changes(path)
    assert f"threads ({old['threads'] + 1} -> {old['threads']})" in line
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "threads"}))
    assert environment_changes(path) == []  # older runs did not record it: nothing to compare


def test_reproduce_records_and_sets_its_threads(tmp_path):
    """A tiny study (no epochs): every run and study.json record the thread count used."""
    before = torch.get_num_threads()
    out = tmp_path / "study"
    reproduce(
        ["digits-cnn"], out, epochs=0, batch_sizes=[256], progress=False, echo=lambda s: None,
        threads=1,
    )  # fmt: skip
    assert torch.get_num_threads() == before  # restored for the caller
    study = json.loads((out / "study.json").read_text())
    threads = study["tasks"]["digits-cnn"]["threads"]
    assert threads == {
        "setting": 1,
        "intra_op": 1,
        "interop": torch.get_num_interop_threads(),
        "cpus": os.cpu_count(),
    }
    for entry in study["tasks"]["digits-cnn"]["runs"]:
        env = json.loads((out / entry["dir"] / "env.json").read_text())
        assert env["threads"] == 1 and env["interop_threads"] >= 1
        assert load_config(out / entry["config"]).threads == 1
    found = json.loads((out / "findings.json").read_text())["tasks"]["digits-cnn"]
    assert found["threads"] == threads
    assert "torch threads: 1 intra-op (setting 1" in (out / "report.html").read_text()
    assert "digits-cnn" in TASKS
