"""Every shipped config parses, and the embedded ones build their task."""

from pathlib import Path

import pytest

from clipscope.config import load_config
from clipscope.data import FILE_DATASETS
from clipscope.reproduce import TASKS, plan
from clipscope.tasks import build_task

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path):
    cfg = load_config(path)
    assert cfg.epochs >= 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).data not in FILE_DATASETS])
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


def test_each_loop_setting_is_declared_once_and_has_a_rule():
    """TrainConfig is FitConfig plus the task; every key has a rule in check_setting.

    Every loop field keeps its name and default, but the two a file gives its own.
    """
    import dataclasses

    from clipscope.config import FIT_KEYS, FitConfig, TrainConfig, check_setting

    fit_fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert issubclass(TrainConfig, FitConfig) and tuple(fit_fields) == FIT_KEYS
    assert set(fit_fields) <= set(train_fields)
    own_defaults = {"lr", "epochs"}
    for name, f in fit_fields.items():
        if name not in own_defaults:
            assert train_fields[name].default == f.default, name
    for name, f in train_fields.items():
        if f.default is not dataclasses.MISSING:
            check_setting(name, f.default)  # a key without a rule raises "unknown key"
    cfg = TrainConfig(method="rr", optimizer="adamw", betas=(0.8, 0.9), weight_decay=0.1)
    loop = cfg.fit_config()
    assert type(loop) is FitConfig and {k: getattr(loop, k) for k in FIT_KEYS} == {
        k: getattr(cfg, k) for k in FIT_KEYS
    }


def test_old_runs_read_as_sgd_and_new_keys_stay_out_of_the_resume_setting():
    """A config.toml written before `optimizer` existed loads as SGD.

    The new keys at their defaults stay out of what a resume compares, so those runs
    resume unchanged.
    """
    import tomllib

    from clipscope.config import TrainConfig, dump_config, parse_config

    legacy = Path(__file__).parent / "fixtures" / "legacy_runs"
    for path in sorted(legacy.glob("*/config.toml")):
        text = path.read_text()
        assert "optimizer =" not in text and "betas" not in text
        assert load_config(path).optimizer == "sgd"
    plain = TrainConfig().setting()
    assert not {"optimizer", "betas", "eps", "zhang_gamma"} & set(plain)
    adamw = TrainConfig(optimizer="adamw", eps=1e-6)
    assert adamw.setting()["optimizer"] == "adamw" and adamw.setting()["eps"] == 1e-6
    written = tomllib.loads(dump_config(TrainConfig()))
    assert written["optimizer"] == "sgd" and written["schedule"] == "constant"
    assert parse_config(tomllib.loads(dump_config(adamw))) == adamw
