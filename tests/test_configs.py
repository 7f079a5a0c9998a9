"""Every shipped config parses, and the embedded ones build their task."""

from pathlib import Path

import pytest

from clipscope.config import load_config
from clipscope.reproduce import TASKS, plan
from clipscope.tasks import build_task

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path):
    cfg = load_config(path)
    assert cfg.epochs >= 1


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if "cifar" not in p.stem and "ptb" not in p.stem]
)
def test_embedded_config_builds_its_task(path):
    model, loss_fn, comps, _ = build_task(load_config(path))
    x, y = comps.batch(0)
    out = model(x) if not comps.sequential else model(x, None)[0]
    assert loss_fn(out, y).ndim == 0


def test_reproduce_plan_validates_everything_first():
    grid = plan(["digits-cnn", "text-lstm"])
    assert {(spec.name, method) for spec, method, _, _ in grid} == {
        ("digits-cnn", "igc"),
        ("digits-cnn", "sgd"),
        ("text-lstm", "igc"),
    }
    assert all(len(TASKS[name].batch_sizes) >= 4 for name in ("digits-cnn", "text-lstm"))
    with pytest.raises(ValueError, match="data-dir"):
        plan(["cifar10-resnet18"])
    with pytest.raises(ValueError, match="unknown task"):
        plan(["nope"])
    with pytest.raises(ValueError, match="batch sizes"):
        plan(["digits-cnn"], batch_sizes=[0])
