"""``clipscope probe --config`` / ``--checkpoint``: a user's task at x_0 or at a checkpoint.

The CLI's table is compared with the float64 brute force
(:func:`clipscope.engine.reference_probe`) on the same task, and with the
per-component arrays the training run itself recorded at the checkpoint's point.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipscope.cli import main as cli_main
from clipscope.config import load_config
from clipscope.engine import reference_probe
from clipscope.tasks import build_task

REPO = Path(__file__).resolve().parents[1]
LS_CONFIG = REPO / "configs" / "least_squares_igc.toml"


def read_table(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0]}


def small_config(tmp_path: Path, name: str = "ls.toml", **overrides: object) -> Path:
    """Write the least-squares example with 1 epoch (and any overrides) to tmp_path."""
    settings = {"epochs": 1, "progress": "false", **overrides}
    lines = [
        line
        for line in LS_CONFIG.read_text().splitlines()
        if line.split("=")[0].strip() not in settings
    ]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_config_subprocess_equals_reference(tmp_path):
    out = tmp_path / "probe.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "clipscope", "probe", "--config", str(LS_CONFIG), "--json",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["task"] == "least_squares" and summary["config"] == str(LS_CONFIG)
    assert summary["point"].startswith("x_0")
    cfg = load_config(LS_CONFIG)
    model, loss_fn, comps, _ = build_task(cfg)
    ref = reference_probe(model, loss_fn, comps, etas=[*cfg.etas, cfg.eta])
    table = read_table(out)
    np.testing.assert_allclose(table["norm"], ref.norms, rtol=1e-12)
    np.testing.assert_allclose(table["dot"], ref.dots, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(table["loss"], ref.losses, rtol=1e-12)
    (result,) = summary["results"].values()
    assert result["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-12)
    # the config's eta and etas are the default thresholds
    assert sorted(float(e) for e in result["clipped"]) == sorted({*cfg.etas, cfg.eta})
    for eta, (norm, cos) in ref.clipped.items():
        got = result["clipped"][str(eta)]
        assert got["norm"] == pytest.approx(norm, rel=1e-10)
        assert got["cos"] == pytest.approx(cos, rel=1e-10)


def test_checkpoint_equals_the_runs_own_record(tmp_path, capsys):
    config = small_config(tmp_path)
    run = tmp_path / "run"
    assert cli_main(["train", str(config), "--out", str(run)]) == 0
    newest = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    recorded = np.load(run / "components" / "epoch_0001.npz")  # x_1, the end point
    capsys.readouterr()
    # the task from the run's config.toml, then from an explicit --config
    for extra, name in (([], "a.csv"), (["--config", str(config)], "b.csv")):
        code = cli_main(["probe", "--checkpoint", str(newest), "--out", str(tmp_path / name),
                         "--json", *extra])  # fmt: skip
        assert code == 0
        summary = json.loads(capsys.readouterr().out)
        assert "epoch 1" in summary["point"]
        table = read_table(tmp_path / name)
        np.testing.assert_allclose(table["norm"], recorded["norms"], rtol=1e-12)
        np.testing.assert_allclose(table["dot"], recorded["dots"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(table["loss"], recorded["losses"], rtol=1e-12)
    # and the checkpoint's point is not x_0
    assert cli_main(["probe", "--config", str(config), "--out", str(tmp_path / "x0.csv")]) == 0
    assert not np.allclose(read_table(tmp_path / "x0.csv")["loss"], recorded["losses"])


def bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    nodata = tmp_path / "nodata.toml"
    nodata.write_text('task = "classification"\ndata = "nonexistent"\nmodel = "mlp"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_size = [\n")
    loose = tmp_path / "loose.pt"
    loose.write_bytes(b"not a checkpoint")
    return [
        (["--config", str(tmp_path / "missing.toml")], "no such config file"),
        (["--config", str(nodata)], "'data'"),
        (["--config", str(broken)], "not valid TOML"),
        (["--config", str(LS_CONFIG), "--task", "mlp"], "--task"),
        (["--config", str(LS_CONFIG), "--batch-size", "4"], "--batch-size"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "no such checkpoint"),
        (["--checkpoint", str(loose)], "run directory"),
        (["--config", str(LS_CONFIG), "--checkpoint", str(loose)], "checksum"),
        (["--per-sample", "--levels", "3"], "--per-sample and --levels exclude each other"),
        (["--per-sample", "--route", "keep"], "--per-sample needs --route per-sample or"),
        (
            ["--config", str(small_config(tmp_path, "ds.toml", eta='"descent-safe"', etas="[]"))],
            "sets η while training (no single threshold); give the thresholds to probe at with",
        ),
    ]


def test_a_rule_configs_etas_or_the_given_eta_are_probed(tmp_path, capsys):
    """A rule (eta = "descent-safe") has no single η: the config's etas, or --eta, are probed."""
    config = small_config(tmp_path, "ds.toml", eta='"descent-safe"', etas="[0.5, 2.0]")
    out = tmp_path / "p.csv"
    assert cli_main(["probe", "--config", str(config), "--out", str(out), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"].values()
    assert sorted(float(e) for e in result["clipped"]) == [0.5, 2.0]
    out.unlink()
    assert cli_main(["probe", "--config", str(config), "--eta", "1", "--out", str(out)]) == 0


def test_per_sample_json_says_what_was_checked_and_kept(tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert cli_main(["probe", "--per-sample", "--samples", "64", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]["1"]
    assert result["route"].startswith("per-sample-kept")
    assert result["verification"]["spot_checks"] > 0
    assert result["factors"] is not None


def test_bad_input_exit_2_and_no_table(tmp_path, capsys):
    out = tmp_path / "never.csv"
    for args, message in bad_cases(tmp_path):
        assert cli_main(["probe", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert "clipscope probe: error:" in err and message in err, (args, err)
        assert not out.exists()


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", str(small_config(tmp_path)), "--out", str(run)]) == 0
    newest = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    wider = small_config(tmp_path, "wide.toml", dim=5)
    capsys.readouterr()
    code = cli_main(["probe", "--config", str(wider), "--checkpoint", str(newest),
                     "--out", str(tmp_path / "x.csv")])  # fmt: skip
    assert code == 2
    assert "does not fit the model" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("name", ["digits_cnn_igc", "text_lstm_igc"])
def test_config_of_library_tasks_equals_reference(tmp_path, capsys, name):
    """Embedded digits (CNN) and text (LSTM LM, sequential components) at x_0."""
    lines = [
        line
        for line in (REPO / "configs" / f"{name}.toml").read_text().splitlines()
        if line.split("=")[0].strip() not in ("n_samples", "progress")
    ]
    config = tmp_path / f"{name}.toml"
    config.write_text("\n".join([*lines, "n_samples = 200", "progress = false"]) + "\n")
    out = tmp_path / "t.csv"
    assert cli_main(["probe", "--config", str(config), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cfg = load_config(config)
    model, loss_fn, comps, _ = build_task(cfg)
    assert summary["components"] == json.loads(json.dumps(comps.describe()))
    ref = reference_probe(model, loss_fn, comps, dropout=cfg.dropout, seed=cfg.seed)
    table = read_table(out)
    np.testing.assert_allclose(table["norm"], ref.norms, rtol=1e-6)
    np.testing.assert_allclose(table["dot"], ref.dots, rtol=1e-5, atol=1e-9 * ref.grad_norm**2)
    np.testing.assert_allclose(table["loss"], ref.losses, rtol=1e-6)


def test_engine_doc_example_runs(capsys):
    """The Python example of docs/engine.md runs and prints what its comments say."""
    text = (REPO / "docs" / "engine.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/engine.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = [
        line.split("#", 1)[1].split("(")[0].split(":")[0].strip()
        for line in code.splitlines()
        if line.startswith(("print(", "    print(")) and "#" in line
    ]
    assert len(printed) == len(expected)
    for got, want in zip(printed, expected, strict=True):
        assert got.startswith(want), (got, want)
