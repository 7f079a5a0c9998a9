"""Run directories: config checks, CLI, crash safety (kill, corrupt checkpoint, ENOSPC)."""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

from clipscope import atomic
from clipscope.atomic import latest_checkpoint, list_checkpoints, load_checkpoint
from clipscope.config import TrainConfig, config_diff, dump_config, load_config, parse_config
from clipscope.run.directory import COLUMNS, TIMING_COLUMNS
from clipscope.train import train

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, M = 4, 8
CONFIG = f"""
task = "least_squares"
n_samples = 64
dim = 4
batch_size = 8
method = "{{method}}"
lr = 0.05
eta = 1.0
epochs = {EPOCHS}
seed = 3
etas = [0.5, inf]
dtype = "float64"
threads = 1
checkpoint_every = {{every}}
progress = false
"""
TOTAL_STEPS = EPOCHS * M
ADAMW = {"optimizer": '"adamw"', "betas": "[0.8, 0.95]", "eps": 1e-6, "weight_decay": 0.1}
# Runs of the crash-safety tests: config changes and the step of the SIGKILL (None: random).
# With lr = 3 the held-out loss at x_3 is worse than at x_1: NT-ASGD averages from step 25 on,
# and the kill at step 29 falls after the checkpoint at step 27 that holds x̄ of 3 iterates.
VARIANTS = {
    "sgd": ({"method": "sgd"}, None),
    "igc": ({"method": "igc"}, None),
    "nt-asgd": ({"method": "sgd", "lr": 3.0, "optimizer_switch": '"nt-asgd"', "nonmono": 1}, 29),
    # AdamW: its moments and step count are in the checkpoint (issue 22)
    "adamw-igc": ({"method": "igc", **ADAMW}, None),
    "adamw-rr": ({"method": "rr", **ADAMW}, None),
    # threshold rules (issue 23): η in force, AutoClip's history of norms in the checkpoint
    "descent-safe-igc": ({"method": "igc", "eta": '"descent-safe"', "rho_target": 0.8}, None),
    "descent-safe-adamw-rr": ({"method": "rr", "eta": '"descent-safe"', **ADAMW}, None),
    "autoclip-sgd": ({"method": "sgd", "eta": '"autoclip"', "autoclip_percentile": 25}, None),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_config(tmp_path: Path, method="sgd", every=3, name="run.toml", **extra) -> Path:
    text = CONFIG.format(method=method, every=every)
    for key, value in extra.items():
        text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(f"{key} ="))
        text += f"\n{key} = {value}\n"
    path = tmp_path / name
    path.write_text(text)
    return path


def quiet(text: str) -> None:
    pass


def read_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "epochs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def final_params(run: Path) -> dict[str, torch.Tensor]:
    _, state = latest_checkpoint(run / "checkpoints")
    return state["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise equal parameters and rows (wall time aside), no duplicated rows."""
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ra, rb = read_rows(a), read_rows(b)
    assert [r["epoch"] for r in rb] == [str(k) for k in range(EPOCHS + 1)]
    for x, y in zip(ra, rb, strict=True):
        for column in TIMING_COLUMNS:
            x.pop(column, None), y.pop(column, None)
        assert x == y
    for k in range(EPOCHS + 1):
        with (
            np.load(a / f"components/epoch_{k:04d}.npz") as za,
            np.load(b / f"components/epoch_{k:04d}.npz") as zb,
        ):
            assert all(np.array_equal(za[n], zb[n]) for n in za.files)
    assert json.loads((b / "summary.json").read_text())["status"] == "completed"
    if (a / "averaged_model.pt").exists():
        xa = torch.load(a / "averaged_model.pt", weights_only=True)
        xb = torch.load(b / "averaged_model.pt", weights_only=True)
        assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Uninterrupted runs, one per method used below."""
    runs = {}
    base = tmp_path_factory.mktemp("golden")
    for name, (extra, _) in VARIANTS.items():
        cfg = write_config(base, name=f"{name}.toml", **extra)
        assert train(cfg, base / name, echo=quiet) == 0
        runs[name] = (cfg, base / name)
    return runs


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from clipscope.train import train

    config, out, at, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    def on_step(step, i, norm):
        if step == at:
            os.kill(os.getpid(), getattr(signal, sig))

    sys.exit(train(config, out, on_step=on_step, echo=lambda t: None))
    """
)


def run_and_signal(tmp_path: Path, config: Path, out: Path, at: int, sig: str):
    script = tmp_path / "victim.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(script), str(config), str(out), str(at), sig],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# -- config ---------------------------------------------------------------------


BAD_CONFIGS = [
    ({"epoch": 3}, "epoch"),
    ({"eta": 0}, "eta"),
    ({"eta": -1.0}, "eta"),
    ({"eta": math.nan}, "eta"),
    ({"eta": "big"}, "eta"),
    ({"etas": [0.1, 0.0]}, "etas"),
    ({"etas": 0.1}, "etas"),
    ({"lr": 0}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"method": "adam"}, "method"),
    ({"epochs": -1}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"momentum": 1.0}, "momentum"),
    ({"dropout": "random"}, "dropout"),
    ({"last_batch": "pad"}, "last_batch"),
    ({"milestones": [1, "x"]}, "milestones"),
    ({"heldout": 1}, "heldout"),
    ({"device": ""}, "device"),
    ({"task": "gan"}, "task"),
    ({"model_kwargs": [1, 2]}, "model_kwargs"),
    ({"task": "language_model", "ar_alpha": -1.0}, "ar_alpha"),
    ({"task": "language_model", "tar_beta": "1"}, "tar_beta"),
    ({"task": "language_model", "tar_beta": math.inf}, "tar_beta"),
    ({"ar_alpha": 2.0}, "ar_alpha"),  # AR/TAR only for language models
    ({"task": "classification", "tar_beta": 1.0}, "tar_beta"),
    ({"heldout_tokens": -1}, "heldout_tokens"),
    ({"heldout_tokens": 1.5}, "heldout_tokens"),
    ({"optimizer_switch": "asgd"}, "optimizer_switch"),
    ({"optimizer_switch": "nt-asgd", "nonmono": 0}, "nonmono"),
    ({"nonmono": True}, "nonmono"),
    ({"task": "classification", "optimizer_switch": "nt-asgd"}, "optimizer_switch"),
    ({"optimizer_switch": "nt-asgd", "heldout": False}, "optimizer_switch"),
    # threshold rules (issue 23); more in tests/test_thresholds.py
    ({"eta": "descent-safe", "rho_target": 0.0}, "rho_target"),
    ({"eta": "descent-safe", "eta_min": 0.0}, "eta_min"),
    ({"eta": "descent-safe", "eta_max": -1.0}, "eta_max"),
    ({"eta": "autoclip", "autoclip_percentile": 0}, "autoclip_percentile"),
]


@pytest.mark.parametrize(
    "raw,key",
    BAD_CONFIGS,
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.items())),
)
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        parse_config(raw)


def test_bad_config_file_refused_before_anything_runs(tmp_path):
    cfg = write_config(tmp_path, eta="0.0")
    with pytest.raises(ValueError, match="'eta'"):
        train(cfg, tmp_path / "out", echo=quiet)
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken.toml").write_text("eta = = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_eta_inf_spellings_and_roundtrip():
    assert parse_config({"eta": "inf"}).eta == math.inf
    assert parse_config({"eta": math.inf, "etas": [0.5, "inf"]}).etas == (0.5, math.inf)
    cfg = TrainConfig(
        eta=0.25, etas=(0.1, math.inf), schedule="step", milestones=(2, 5), method="rr"
    )
    assert parse_config(tomllib.loads(dump_config(cfg))) == cfg
    assert config_diff(cfg, cfg) == []


def test_example_config_is_valid():
    cfg = load_config(ROOT / "configs" / "least_squares_igc.toml")
    assert cfg.task == "least_squares" and cfg.epochs > 0


# -- run directory ------------------------------------------------------------------


def test_summary_is_strict_json(golden):
    """NaN / inf never appear as bare tokens (jq, JavaScript reject them): null and "inf"."""

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    for method in ("sgd", "igc"):
        _, run = golden[method]
        summary = json.loads((run / "summary.json").read_text(), parse_constant=refuse)
        assert summary["status"] == "completed"
    row = json.loads((golden["sgd"][1] / "summary.json").read_text())["last_row"]
    assert row["igc_drift"] is None  # no drift without the cyclic order: NaN in epochs.csv


def test_run_directory_contents(golden):
    cfg_path, run = golden["igc"]
    resolved = load_config(run / "config.toml")
    assert resolved == load_config(cfg_path)
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 3
    assert env["deterministic_algorithms"] is True and env["components"]["m"] == M
    rows = read_rows(run)
    assert len(rows) == EPOCHS + 1
    header = list(rows[0])
    assert header[: len(COLUMNS)] == list(COLUMNS) and "rho@0.5" in header
    assert "rho@inf" in header
    assert all(float(r["rho@inf"]) == pytest.approx(1.0) for r in rows)
    drift = [float(r["igc_drift"]) for r in rows]
    assert all(math.isfinite(d) for d in drift[:-1]) and math.isnan(drift[-1])
    with np.load(run / "components/epoch_0002.npz") as z:
        assert z["norms"].shape == (M,) and z["dots"].shape == (M,)
        assert float(z["grad_norm"]) == pytest.approx(float(rows[2]["grad_norm"]), rel=1e-15)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == TOTAL_STEPS
    assert sum(summary["counts"]) == TOTAL_STEPS
    # the report module reads the same records
    from clipscope.run.directory import load_run

    record = load_run(run)
    assert record.eta == 1.0 and record.method == "igc" and record.batch_size == 8
    assert record.n_rows == EPOCHS + 1


def test_epochs_zero_writes_metadata_and_epoch0_only(tmp_path):
    cfg = write_config(tmp_path, epochs=0)
    assert train(cfg, tmp_path / "run", echo=quiet) == 0
    rows = read_rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == ["0"] and rows[0]["step"] == "0"
    assert sorted(p.name for p in (tmp_path / "run/components").iterdir()) == ["epoch_0000.npz"]
    assert (tmp_path / "run/config.toml").is_file() and (tmp_path / "run/env.json").is_file()


def test_cli_train_and_existing_directory_refused(tmp_path, capsys):
    cfg = write_config(tmp_path, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", str(cfg), "--out", str(tmp_path / "r")]
    first = subprocess.run(
        [sys.executable, "-m", "clipscope", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    assert "epoch    1" in first.stdout + first.stderr
    from clipscope.cli import main

    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--force"]) == 2


def test_resume_with_different_config_refused_with_diff(golden, tmp_path):
    _, run = golden["sgd"]
    changed = write_config(tmp_path, lr=0.1, eta="inf")
    with pytest.raises(ValueError) as info:
        train(changed, run, resume=True, echo=quiet)
    assert "lr: 0.05 -> 0.1" in str(info.value) and "eta: 1.0 -> inf" in str(info.value)
    assert "--force" in str(info.value)


def test_resume_with_force_is_logged(tmp_path):
    cfg = write_config(tmp_path, epochs=1)
    assert train(cfg, tmp_path / "r", echo=quiet) == 0
    longer = write_config(tmp_path, epochs=2, name="longer.toml")
    assert train(longer, tmp_path / "r", resume=True, force=True, echo=quiet) == 0
    assert "epochs: 1 -> 2" in (tmp_path / "r/train.log").read_text()
    assert len(read_rows(tmp_path / "r")) == 3


def test_force_cannot_resume_a_checkpoint_of_another_model(tmp_path, capsys):
    """--force overrides settings, not the model: refused (exit 2) before anything is written."""
    from clipscope.cli import main

    cfg = write_config(tmp_path, epochs=1)
    run = tmp_path / "r"
    assert train(cfg, run, echo=quiet) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    wider = write_config(tmp_path, epochs=1, dim=5, name="wider.toml")  # another weight shape
    assert main(["train", str(wider), "--out", str(run), "--resume", "--force"]) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed with this config, even with --force" in err
    assert "weights of other shapes" in err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_of_completed_run_changes_nothing(golden, tmp_path):
    cfg_path, run = golden["sgd"]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    env = json.loads((copy / "env.json").read_text())
    (copy / "env.json").write_text(json.dumps({**env, "torch": "0.0.1"}))
    messages = []
    assert train(cfg_path, copy, resume=True, echo=messages.append) == 0
    assert_same_run(run, copy)
    assert any("torch (0.0.1 ->" in m and "not promised" in m for m in messages)


# -- crash safety -------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed(golden, tmp_path_factory):
    """Per method: a run killed by SIGKILL at a random step (after the first checkpoints)."""
    out = {}
    base = tmp_path_factory.mktemp("killed")
    for method, (_, at) in VARIANTS.items():
        at = at or random.Random(f"kill-{method}").randrange(8, TOTAL_STEPS)
        run = base / method
        proc = run_and_signal(base, golden[method][0], run, at, "SIGKILL")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        out[method] = (run, at)
    return out


@pytest.mark.parametrize("method", list(VARIANTS))
def test_sigkill_at_random_step_then_resume_is_bitwise_equal(golden, killed, tmp_path, method):
    cfg_path, gold = golden[method]
    killed_run, at = killed[method]
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    rows_before = read_rows(run)
    assert 1 <= len(rows_before) <= at // M + 1  # nothing beyond the last checkpoint
    assert train(cfg_path, run, resume=True, echo=quiet) == 0
    assert_same_run(gold, run)
    if method == "nt-asgd":  # the case is meaningful: averaging ran across the kill
        _, state = latest_checkpoint(killed_run / "checkpoints")
        averaged = state["units"]["nt_asgd"]["count"]
        assert averaged > 0 and not (killed_run / "averaged_model.pt").exists()
        assert [r["asgd_active"] for r in read_rows(gold)] == ["0.0", "0.0", "0.0", "1.0", "1.0"]
    if method.startswith("adamw"):  # the case is meaningful: the moments crossed the kill
        _, state = latest_checkpoint(killed_run / "checkpoints")
        moments = state["optimizer"]["state"][0]
        assert float(moments["step"]) == state["loop"]["step"] > 0
        assert float(moments["exp_avg_sq"].abs().sum()) > 0
        config = tomllib.loads((gold / "config.toml").read_text())
        assert config["optimizer"] == "adamw" and config["betas"] == [0.8, 0.95]
        # ρ_P beside ρ at every probe (x_0: no optimizer state yet, P = 1), resumed alike
        rows = read_rows(gold)
        assert [r["p_unset_share"] for r in rows][:2] == ["1.0", "0.0"]
        assert all(r["rho_p"] not in ("", "nan") for r in rows)
    if "descent-safe" in method or "autoclip" in method:  # η moved, and crossed the kill
        etas = [float(r["eta"]) for r in read_rows(gold)]
        assert len(set(etas)) > 2
        _, state = latest_checkpoint(killed_run / "checkpoints")
        if "autoclip" in method:
            assert len(state["units"]["autoclip"]["history"]) == state["loop"]["step"] > 0
        else:
            assert math.isfinite(state["units"]["descent_safe"]["eta"])


def test_sigterm_checkpoints_at_component_boundary_and_exits_143(golden, tmp_path):
    cfg_path, gold = golden["sgd"]
    run = tmp_path / "run"
    at = 13  # not a multiple of checkpoint_every nor of m
    proc = run_and_signal(tmp_path, cfg_path, run, at, "SIGTERM")
    assert proc.returncode == 143, proc.stderr
    _, state = latest_checkpoint(run / "checkpoints")
    assert state["loop"]["step"] == at
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert train(cfg_path, run, resume=True, echo=quiet) == 0
    assert_same_run(gold, run)


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "stray-tmp"])
def test_damaged_newest_checkpoint_falls_back_and_still_matches(golden, killed, tmp_path, damage):
    cfg_path, gold = golden["igc"]
    run = tmp_path / "run"
    shutil.copytree(killed["igc"][0], run)
    assert len(list_checkpoints(run / "checkpoints")) >= 2
    newest = list_checkpoints(run / "checkpoints")[-1]
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 3])
    elif damage == "corrupt":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:  # the writer died mid-write: a half temporary file next to the real ones
        (run / "checkpoints" / ".ckpt_0000000099.pt.123.tmp").write_bytes(data[:50])
    messages = []
    assert train(cfg_path, run, resume=True, echo=messages.append) == 0
    if damage != "stray-tmp":
        assert any(newest.name in m and "previous" in m for m in messages)
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert_same_run(gold, run)


def test_nonfinite_loss_exits_3_and_keeps_last_good_checkpoint(tmp_path):
    cfg = write_config(tmp_path, lr=60.0, eta="inf", epochs=40, every=0)
    messages = []
    assert train(cfg, tmp_path / "run", echo=messages.append) == 3
    assert any("non-finite" in m and "last good checkpoint" in m for m in messages)
    _, state = latest_checkpoint(tmp_path / "run/checkpoints")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "nonfinite"


def _parse_everything(run: Path) -> None:
    tomllib.loads((run / "config.toml").read_text())
    json.loads((run / "env.json").read_text())
    if (run / "summary.json").exists():
        json.loads((run / "summary.json").read_text())
    if (run / "epochs.csv").exists():
        rows = read_rows(run)
        assert all(len(r) == len(rows[0]) and None not in r.values() for r in rows)
    for item in (run / "components").glob("*.npz"):
        with np.load(item) as z:
            [z[n] for n in z.files]
    for item in list_checkpoints(run / "checkpoints"):
        load_checkpoint(item)


@pytest.mark.parametrize("fail_after", [3, 9, 17])
def test_disk_full_exits_nonzero_and_leaves_files_parseable(tmp_path, monkeypatch, fail_after):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    calls = {"n": 0}
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            calls["n"] += 1
            if calls["n"] > fail_after:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", full_disk_open, raising=False)
    messages = []
    assert train(cfg, run, echo=messages.append) == 4
    assert any("No space left" in m for m in messages)
    monkeypatch.undo()
    _parse_everything(run)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize(
    "body",
    [
        'task = "classification"\ndata = "digits"\nmodel = "mlp"\nn_samples = 60\n'
        'batch_size = 20\nmethod = "rr"\nlr = 0.1\neta = 0.5\n',
        'task = "language_model"\ndata = "text"\nmodel = "small-lstm-lm"\nn_samples = 600\n'
        'model_kwargs = {emb = 8, hidden = 8}\nbatch_size = 4\nbptt = 10\nmethod = "igc"\n'
        "lr = 0.5\neta = 0.25\n",
    ],
    ids=["digits-mlp", "text-lstm"],
)
def test_library_tasks_on_embedded_data(tmp_path, body):
    """Embedded data through clipscope.data.load_splits and build_model(model, **model_kwargs)."""
    cfg = tmp_path / "task.toml"
    cfg.write_text(body + "epochs = 2\nprogress = false\n")
    assert train(cfg, tmp_path / "run", echo=quiet) == 0
    rows = read_rows(tmp_path / "run")
    assert len(rows) == 3
    assert all(math.isfinite(float(r["c1"])) for r in rows)
    conventions = json.loads((tmp_path / "run" / "env.json").read_text())["conventions"]
    assert conventions["batchnorm_in_probes"] == "no batch-coupled layers"
    if "digits" in body:
        assert all(0.0 <= float(r["heldout"]) <= 1.0 for r in rows)  # held-out accuracy
        assert conventions["data"]["dataset"] == "sklearn.datasets.load_digits"
        assert conventions["hidden_state"] == "not applicable"
    else:
        assert conventions["data"]["name"] == "text"
        assert conventions["hidden_state"].startswith("carried from window i-1")


@pytest.mark.parametrize("extra", ["batch_size = 1\n", "batch_size = 3\n"], ids=["B1", "last1"])
def test_single_sample_component_with_train_batchnorm_refused_at_setup(tmp_path, extra):
    """Edge case 9: a size-1 component under train-mode BatchNorm is an error before any write."""
    cfg = tmp_path / "bn.toml"
    cfg.write_text(
        'task = "classification"\ndata = "digits"\nmodel = "small-cnn"\nn_samples = 7\n'
        "model_kwargs = {batchnorm = true}\nprogress = false\n" + extra
    )
    with pytest.raises(ValueError, match="single sample"):
        train(cfg, tmp_path / "run", echo=quiet)
    assert not (tmp_path / "run").exists()
    cfg.write_text(cfg.read_text() + 'last_batch = "drop"\nepochs = 1\n')
    if "3" in extra:  # dropping the size-1 last batch is the documented way out
        assert train(cfg, tmp_path / "run", echo=quiet) == 0


def test_unknown_dataset_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "classification"\ndata = "nope"\nmodel = "mlp"\n')
    with pytest.raises(ValueError, match="'data'"):
        train(bad, tmp_path / "run2", echo=quiet)


# -- language models: held-out perplexity, AR/TAR -----------------------------------

LM_CONFIG = """
task = "language_model"
model = "awd-lstm"
model_kwargs = {ninp = 4, nhid = 6}
data = "text"
n_samples = 300
batch_size = 4
bptt = 10
method = "igc"
lr = 1.0
eta = 0.25
epochs = 1
dropout = "fixed"
dtype = "float64"
heldout_tokens = 203
progress = false
"""


def lm_config(**extra) -> TrainConfig:
    raw = tomllib.loads(LM_CONFIG)
    return parse_config({**raw, **extra})


def test_lm_heldout_is_perplexity_of_the_batchified_heldout_stream():
    """exp(token-mean CE) over the held-out stream in B columns, eval mode, state carried."""
    from clipscope.data import load_splits
    from clipscope.tasks import build_task

    cfg = lm_config(ar_alpha=2.0, tar_beta=1.0)  # AR/TAR are not part of the perplexity
    model, _, _, heldout = build_task(cfg)
    tokens = load_splits("text").test[: cfg.heldout_tokens]
    rows = len(tokens) // cfg.batch_size  # 203 tokens, 4 columns: 50 rows, 3 tokens dropped
    data = tokens[: rows * cfg.batch_size].view(cfg.batch_size, rows).t()
    model.train()
    with torch.no_grad():
        got = heldout(model)
        model.eval()  # one forward over all 49 input rows = the windows with the state carried
        logits, _ = model(data[:-1], None)
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), data[1:].reshape(-1)
        )
    assert got == pytest.approx(math.exp(float(ce)), rel=1e-12)
    assert 1.0 < got < 2 * model.ntoken  # a near-uniform untrained model


def test_lm_run_records_heldout_perplexity(tmp_path):
    cfg = tmp_path / "lm.toml"
    cfg.write_text(LM_CONFIG)
    assert train(cfg, tmp_path / "run", echo=quiet) == 0
    rows = read_rows(tmp_path / "run")
    assert len(rows) == 2 and all(1.0 < float(r["heldout"]) < math.inf for r in rows)


def test_ar_tar_are_part_of_every_component_loss(tmp_path):
    """Training steps and probes use awd_lstm_loss(model, α, β): a replica of the run matches."""
    from clipscope.engine import trainable_params
    from clipscope.methods import clipped_step, make_optimizer
    from clipscope.models import awd_lstm_loss
    from clipscope.tasks import build_task

    cfg = lm_config(ar_alpha=2.0, tar_beta=1.0)
    path = tmp_path / "lm.toml"
    path.write_text(dump_config(cfg))
    assert train(path, tmp_path / "run", echo=quiet) == 0
    rows = read_rows(tmp_path / "run")

    model, loss_fn, comps, _ = build_task(cfg)
    reference = awd_lstm_loss(model, 2.0, 1.0)
    plain = awd_lstm_loss(model, 0.0, 0.0)
    with torch.random.fork_rng():  # the replica below needs the run's RNG stream
        x, y = comps.batch(0)
        with torch.no_grad():
            out, _ = model(x, None)
        assert float(loss_fn(out, y)) == float(reference(out, y)) > float(plain(out, y))
    # probe at x_0 (dropout policy "fixed"): f = (1/m) Σ f_i with the windows' state carried
    from clipscope.engine.guard import rng_for_component

    with torch.no_grad():
        state, losses, steps = None, [], []
        for i in range(len(comps)):
            with rng_for_component("fixed", cfg.seed, i):
                x, y = comps.batch(i)
                out, state = model(x, state)
                losses.append(float(reference(out, y)))
    assert float(rows[0]["loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    # training: one IGC epoch of clipped steps on the AR/TAR loss, state carried
    opt = make_optimizer(trainable_params(model), cfg.lr)
    state = None
    for i in range(len(comps)):
        box = {}

        def closure(i=i, box=box, state=state):
            x, y = comps.batch(i)
            out, box["state"] = model(x, state)
            loss = reference(out, y)
            steps.append(float(loss.detach()))
            return loss

        clipped_step(opt, closure, cfg.eta)
        state = [(h.detach(), c.detach()) for h, c in box["state"]]
    assert float(rows[0]["train_loss"]) == pytest.approx(sum(steps) / len(steps), rel=1e-12)
    trained = final_params(tmp_path / "run")
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())


def test_ar_tar_with_a_model_without_activations_is_refused(tmp_path):
    cfg = tmp_path / "lm.toml"
    cfg.write_text(
        LM_CONFIG.replace('"awd-lstm"', '"small-lstm-lm"').replace(
            "ninp = 4, nhid = 6", "emb = 4, hidden = 6"
        )
        + "tar_beta = 1.0\n"
    )
    with pytest.raises(ValueError, match="'tar_beta'"):
        train(cfg, tmp_path / "run", echo=quiet)
    assert not (tmp_path / "run").exists()
