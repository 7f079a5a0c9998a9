"""Bad input tried as a new user would: exit 2 before anything is written, naming what is wrong.

Each config case runs the real CLI entry (``clipscope train CONFIG --out DIR``)
and checks the exit code, that the message names the key, and that ``DIR`` was
never created. Then the same for ``reproduce``, the output path, checkpoints
that cannot be loaded safely, and the two non-finite stops and the ``epochs = 0``
files that the docs describe.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from clipscope.cli import main
from clipscope.errors import ConfigError
from test_data import _fake_cifar

BASE = (
    'task = "least_squares"\nn_samples = 32\ndim = 3\nbatch_size = 8\nepochs = 1\n'
    "progress = false\n"
)
DIGITS = 'task = "classification"\ndata = "digits"\nmodel = "mlp"\nn_samples = 40\nepochs = 1\n'


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and everything printed (stderr, then stdout)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def train_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    return path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    "body,key,words",
    [
        (BASE + 'schedule = "step"\nmilestones = [-1, 0]\n', "milestones", ">= 1"),
        (BASE + "milestones = [2, 2]\n", "milestones", "at most once"),
        (BASE + "threads = 100000\n", "threads", "CPUs"),
        (BASE + 'device = "quantum"\n', "device", "quantum"),
        pytest.param(BASE + 'device = "cuda"\n', "device", "CUDA", marks=NO_CUDA),
        (DIGITS + "model_kwargs = {bogus = 3}\n", "model_kwargs", "bogus"),
        (DIGITS + 'model_kwargs = {hidden = "x"}\n', "model_kwargs", "hidden"),
        (BASE.replace("n_samples = 32", "n_samples = 10000000000000"), "n_samples", "bytes"),
        (BASE.replace("dim = 3", "dim = 1000000000000"), "dim", "bytes"),
        (BASE + "seed = 9223372036854775808\n", "seed", "<= 9223372036854775807"),
        (BASE + "data_seed = 9223372036854775808\n", "data_seed", "<="),
        (BASE + "seed = -1\n", "seed", ">= 0"),
    ],
    ids=[
        "milestones-negative",
        "milestones-twice",
        "threads-100000",
        "device-quantum",
        "device-cuda-on-cpu-build",
        "model_kwargs-unknown",
        "model_kwargs-wrong-type",
        "n_samples-too-large",
        "dim-too-large",
        "seed-2**63",
        "data_seed-2**63",
        "seed-negative",
    ],
)
def test_bad_config_exits_2_before_anything_is_written(tmp_path, capsys, body, key, words):
    cfg = train_config(tmp_path, body)
    out = tmp_path / "run"
    code, err = run_cli(["train", str(cfg), "--out", str(out)], capsys)
    assert code == 2, err
    assert f"'{key}'" in err and words in err, err
    assert "Traceback" not in err
    assert not out.exists()


LM = (
    'task = "language_model"\ndata = "text"\nmodel = "small-lstm-lm"\nn_samples = 400\nepochs = 1\n'
)
ADAMW = BASE + 'optimizer = "adamw"\n'

#: One bad value per setting (issue 24, item 8d), the optimizer's settings (issue 22), keys the
#: rest of the config ignores (another task's, another optimizer's: issue 24, item 7) and a
#: model too large for this machine: (body, key named, words of the reason).
BAD_SETTINGS = {
    "weight_decay-negative": (BASE + "weight_decay = -0.1\n", "weight_decay", "[0, inf)"),
    "weight_decay-nan": (BASE + "weight_decay = nan\n", "weight_decay", "finite"),
    "weight_decay-string": (BASE + 'weight_decay = "1e-2"\n', "weight_decay", "a number"),
    "noise-negative": (BASE + "noise = -1.0\n", "noise", "[0, inf)"),
    "noise-inf": (BASE + "noise = inf\n", "noise", "finite"),
    "schedule_gamma-negative": (
        BASE + 'schedule = "step"\nmilestones = [1]\nschedule_gamma = -0.5\n',
        "schedule_gamma",
        "[0, inf)",
    ),
    "smoothness_tol-zero": (BASE + "smoothness_tol = 0.0\n", "smoothness_tol", "(0, 1)"),
    "smoothness_tol-one": (BASE + "smoothness_tol = 1.0\n", "smoothness_tol", "(0, 1)"),
    "smoothness_every-negative": (BASE + "smoothness_every = -1\n", "smoothness_every", ">= 0"),
    "smoothness_every-float": (BASE + "smoothness_every = 1.5\n", "smoothness_every", "integer"),
    "smoothness_max_iter-zero": (BASE + "smoothness_max_iter = 0\n", "smoothness_max_iter", ">= 1"),
    "keep_checkpoints-zero": (BASE + "keep_checkpoints = 0\n", "keep_checkpoints", ">= 1"),
    "bptt-zero": (LM + "bptt = 0\n", "bptt", ">= 1"),
    "bptt-float": (LM + "bptt = 3.5\n", "bptt", "integer"),
    "optimizer-unknown": (BASE + 'optimizer = "lbfgs"\n', "optimizer", "sgd, adam, adamw"),
    "betas-one": (ADAMW + "betas = [0.9, 1.0]\n", "betas", "each in [0, 1)"),
    "betas-negative": (ADAMW + "betas = [-0.1, 0.9]\n", "betas", "each in [0, 1)"),
    "betas-one-entry": (ADAMW + "betas = [0.9]\n", "betas", "two numbers"),
    "betas-scalar": (ADAMW + "betas = 0.9\n", "betas", "two numbers"),
    "betas-string": (ADAMW + 'betas = ["0.9", 0.99]\n', "betas", "two numbers"),
    "eps-zero": (ADAMW + "eps = 0.0\n", "eps", "(0, inf)"),
    "eps-negative": (ADAMW + "eps = -1e-8\n", "eps", "(0, inf)"),
    "eps-inf": (ADAMW + "eps = inf\n", "eps", "finite"),
    "momentum-with-adam": (BASE + 'optimizer = "adam"\nmomentum = 0.9\n', "momentum", "betas[0]"),
    "betas-with-sgd": (BASE + "betas = [0.8, 0.9]\n", "betas", "optimizer = 'adam' or 'adamw'"),
    "eps-with-sgd": (BASE + "eps = 1e-6\n", "eps", "optimizer = 'adam' or 'adamw'"),
    "nt-asgd-with-adamw": (
        ADAMW.replace("least_squares", "language_model") + 'optimizer_switch = "nt-asgd"\n',
        "optimizer_switch",
        "not defined for optimizer = 'adamw'",
    ),
    "zhang-with-adam": (BASE + 'optimizer = "adam"\nmethod = "zhang"\n', "method", "SGD step"),
    "zhang_gamma-without-zhang": (BASE + "zhang_gamma = 0.5\n", "zhang_gamma", "method = 'zhang'"),
    "milestones-without-step": (BASE + "milestones = [2]\n", "milestones", "schedule = 'step'"),
    "bptt-for-least-squares": (BASE + "bptt = 70\n", "bptt", "task = 'language_model'"),
    "model-for-least-squares": (BASE + 'model = "mlp"\n', "model", "task = 'classification'"),
    "data-for-least-squares": (BASE + 'data = "digits"\n', "data", "task = 'least_squares'"),
    "dim-for-classification": (DIGITS + "dim = 4\n", "dim", "task = 'least_squares'"),
    "noise-for-language-model": (LM + "noise = 0.1\n", "noise", "task = 'least_squares'"),
    "data_seed-for-language-model": (LM + "data_seed = 3\n", "data_seed", "ignores it"),
    "n_samples-negative": (BASE.replace("n_samples = 32", "n_samples = -1"), "n_samples", ">= 0"),
    "train_file-number": (LM + "train_file = 3\n", "train_file", "a string"),
    "heldout_file-for-text": (LM + 'heldout_file = "x.txt"\n', "heldout_file", "word-level"),
    "data_dir-empty": (DIGITS + 'data_dir = ""\n', "data_dir", "non-empty"),
    "route-dyadic": (BASE + 'route = "dyadic"\n', "route", "auto, two-pass, keep"),
    "probe_every-negative": (BASE + "probe_every = -1\n", "probe_every", ">= 0"),
    "per_sample-int": (BASE + "per_sample = 1\n", "per_sample", "true or false"),
    "per_sample-route": (BASE + 'per_sample = true\nroute = "keep"\n', "route", "runs one of"),
    "checkpoint_every-float": (BASE + "checkpoint_every = 0.5\n", "checkpoint_every", "integer"),
    "deterministic-string": (BASE + 'deterministic = "yes"\n', "deterministic", "true or false"),
    "dtype-float16": (BASE + 'dtype = "float16"\n', "dtype", "float32, float64"),
    "smoothness_components-int": (
        BASE + "smoothness_components = 1\n",
        "smoothness_components",
        "true or false",
    ),
    "progress-string": (BASE.replace("progress = false", 'progress = "no"'), "progress", "true"),
    "schedule-linear": (BASE + 'schedule = "linear"\n', "schedule", "constant, step, cosine"),
    "model-too-large": (
        DIGITS + "model_kwargs = {hidden = [10000000000]}\n",
        "model_kwargs",
        "bytes of memory are available",
    ),
}


@pytest.mark.parametrize("body,key,words", BAD_SETTINGS.values(), ids=BAD_SETTINGS)
def test_a_bad_setting_exits_2_naming_it_before_anything_is_written(
    tmp_path, capsys, body, key, words
):
    test_bad_config_exits_2_before_anything_is_written(tmp_path, capsys, body, key, words)


def test_every_setting_has_a_bad_value_row():
    """Each key of the config has a row above or in the table of tests/test_runner.py."""
    from clipscope.config import TrainConfig
    from test_runner import BAD_CONFIGS

    covered = {key for _, key, _ in BAD_SETTINGS.values()} | {key for _, key in BAD_CONFIGS}
    covered |= {"threads", "device", "seed", "data_seed", "milestones"}  # the first table
    missing = set(TrainConfig.__dataclass_fields__) - covered
    assert not missing, f"add a bad-value row for {sorted(missing)}"


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "0"])
def test_a_bad_dist_timeout_exits_2_in_one_process_too(tmp_path, capsys, value):
    cfg = train_config(tmp_path, BASE)
    out = tmp_path / "run"
    code, err = run_cli(["train", str(cfg), "--out", str(out), "--dist-timeout", value], capsys)
    assert code == 2 and "--dist-timeout" in err and "positive" in err, err
    assert not out.exists()


def test_an_allocator_failure_while_building_the_model_is_a_config_error(tmp_path, monkeypatch):
    """What the meta-device estimate misses still ends as exit 2 with a memory message."""
    import clipscope.models
    from clipscope.config import parse_config
    from clipscope.tasks import build_task

    real = clipscope.models.build_model

    def build(name, **kwargs):
        model = real(name, **kwargs)
        if next(model.parameters()).device.type != "meta":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
        return model

    monkeypatch.setattr(clipscope.models, "build_model", build)
    cfg = parse_config({"task": "classification", "data": "digits", "model": "mlp"})
    with pytest.raises(ConfigError, match=r"'model_kwargs'.*does not fit in memory on cpu"):
        build_task(cfg)


def test_out_naming_an_existing_file_exits_2_and_leaves_it(tmp_path, capsys):
    cfg = train_config(tmp_path, BASE)
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, err = run_cli(["train", str(cfg), "--out", str(out)], capsys)
    assert code == 2 and "is a file" in err and "--out" in err, err
    assert out.read_text() == "mine"
    code, err = run_cli(["reproduce", "--task", "digits-cnn", "--out", str(out)], capsys)
    assert code == 2 and "is a file" in err, err
    assert out.read_text() == "mine"


@NO_CUDA
@pytest.mark.parametrize("task", ["cifar10-resnet18", "digits-cnn"])
def test_reproduce_on_a_device_this_build_lacks_exits_2_writing_nothing(tmp_path, capsys, task):
    out = tmp_path / "study"
    args = ["reproduce", "--task", task, "--device", "cuda", "--out", str(out)]
    code, err = run_cli([*args, "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "'device'" in err and "CUDA" in err, err
    assert not out.exists()


def test_reproduce_with_bad_pickles_writes_nothing(tmp_path, capsys):
    _fake_cifar(tmp_path / "data", per_batch=2)
    bad = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"\x80\x04this is not a pickle")
    out = tmp_path / "study"
    args = ["reproduce", "--task", "cifar10-resnet18", "--data-dir", str(tmp_path / "data")]
    code, err = run_cli([*args, "--out", str(out)], capsys)
    assert code == 2 and "data_batch_3" in err, err
    assert not out.exists()


# -- checkpoints that cannot be loaded safely -----------------------------------------


class _Boom:
    def __reduce__(self):
        return (print, ("UNPICKLED: this must never run",))


def _write_with_checksum(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(
        f"{hashlib.sha256(data).hexdigest()}  {path.name}\n"
    )


@pytest.fixture
def small_run(tmp_path, capsys):
    cfg = train_config(tmp_path, BASE + "keep_checkpoints = 1\n")
    out = tmp_path / "run"
    code, err = run_cli(["train", str(cfg), "--out", str(out)], capsys)
    assert code == 0, err
    return cfg, out


def test_probe_refuses_a_malicious_checkpoint_without_unpickling_it(small_run, capsys):
    _, out = small_run
    (newest,) = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    _write_with_checksum(newest, pickle.dumps({"model": _Boom()}, protocol=2))
    table = out.parent / "t.csv"
    code, err = run_cli(["probe", "--checkpoint", str(newest), "--out", str(table)], capsys)
    assert code == 2, err
    assert "could not be loaded safely" in err and newest.name in err
    assert "UNPICKLED" not in err and not table.exists()


@pytest.mark.parametrize("damage", ["malicious", "garbage"])
def test_resume_from_an_unloadable_checkpoint_says_so_not_checksum(small_run, capsys, damage):
    cfg, out = small_run
    (newest,) = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    data = pickle.dumps(_Boom(), protocol=2) if damage == "malicious" else b"not torch data"
    _write_with_checksum(newest, data)
    code, err = run_cli(["train", str(cfg), "--out", str(out), "--resume"], capsys)
    assert code == 2, err
    assert "could not be loaded safely" in err and newest.name in err
    assert "checksum" not in err and "corrupt" not in err
    assert "UNPICKLED" not in err


# -- the non-finite stops and epochs = 0 as the docs say -----------------------------


def test_a_step_size_too_large_for_float32_is_a_nonfinite_stop(tmp_path, capsys):
    """A float32 run with ``lr = 1e200``: exit 3, the message, summary.json; no RuntimeError."""
    cfg = train_config(tmp_path, BASE + "lr = 1e200\n")
    out = tmp_path / "run"
    code, err = run_cli(["train", str(cfg), "--out", str(out)], capsys)
    text = err + (out / "train.log").read_text()
    assert code == 3, text
    assert "non-finite value at epoch 0, step 1" in text and "last good checkpoint" in text
    assert "step size lr = 1e+200" in text and "RuntimeError" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and "lr = 1e+200" in summary["message"]
    assert list((out / "checkpoints").glob("ckpt_*.pt"))  # x_0, untouched


def test_epochs_zero_writes_what_the_docs_say(tmp_path, capsys):
    cfg = train_config(tmp_path, BASE.replace("epochs = 1", "epochs = 0"))
    out = tmp_path / "run"
    code, err = run_cli(["train", str(cfg), "--out", str(out)], capsys)
    assert code == 0, err
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "checkpoints/ckpt_0000000001.pt",
        "checkpoints/ckpt_0000000001.pt.sha256",
        "components/epoch_0000.npz",
        "config.toml",
        "env.json",
        "epochs.csv",
        "summary.json",
        "train.log",
    ]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# -- the library refuses what the CLI refuses ------------------------------------------


def test_fit_refuses_a_single_sample_component_under_train_batchnorm_before_any_step(tmp_path):
    """Edge case 9 in the library (issue 9's parity): refused at setup, nothing changed."""
    from clipscope import Components, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    X, Y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    comps = Components.from_tensors(X, Y, batch_size=2)  # sizes 2, 2, 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"component\(s\) \[2\] hold a single sample"):
        fit(model, torch.nn.functional.cross_entropy, comps, "igc", lr=0.1, epochs=3,
            progress=False, run_dir=tmp_path / "run")  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "run").exists()
    drop = Components.from_tensors(X, Y, batch_size=2, drop_last=True)
    history = fit(model, torch.nn.functional.cross_entropy, drop, "igc", lr=0.1, progress=False)
    assert history.status == "completed"
