"""Run directories written before the loop's units existed still read and resume.

``fixtures/legacy_runs`` holds runs written by clipscope at f1fd55b (one flat
20-key ``loop`` dict per checkpoint; see its README): an IGC run with smoothness
and an SGD run with NT-ASGD, each completed and killed mid-epoch. Today's code
must read their records, resume the killed ones to the end -- bitwise equal to
an uninterrupted run of today's code -- and reproduce the old completed runs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipscope.atomic import latest_checkpoint, list_checkpoints, load_checkpoint
from clipscope.cli import main
from clipscope.loop.state import upgrade_checkpoint
from clipscope.run.directory import COLUMNS, PRECONDITIONED_COLUMNS, load_run
from clipscope.train import train

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_runs"
RUNS = {"igc": "igc.toml", "ntasgd": "ntasgd.toml"}


def quiet(text: str) -> None:
    pass


#: Records added after the fixtures were written: absent from them, so not compared.
NEWER = {"hess_iterations", "probe_seconds", "heldout_seconds", "route", "fallback"}


def rows_of(run: Path) -> list[dict[str, str]]:
    with open(run / "epochs.csv", newline="") as handle:
        skip = NEWER | {"wall_time"}
        return [{k: v for k, v in r.items() if k not in skip} for r in csv.DictReader(handle)]


#: Rows written on the fixtures' machine against rows written on this one: float64 results of
#: the same code on CPUs of another kind differ in the last bits (their vectorised reductions
#: add in another order); four epochs of a float64 least-squares run stay within 1e-12.
CROSS_MACHINE_RTOL = 1e-12


def same_rows(old: list[dict[str, str]], new: list[dict[str, str]]) -> None:
    """Assert the same columns in order, non-numeric values equal, numbers to the rtol."""
    assert [list(r) for r in old] == [list(r) for r in new]
    for a, b in zip(old, new, strict=True):
        for key in a:
            try:
                x, y = float(a[key]), float(b[key])
            except ValueError:
                assert a[key] == b[key], key
                continue
            np.testing.assert_allclose(y, x, rtol=CROSS_MACHINE_RTOL, atol=1e-300, err_msg=key)


def params_of(run: Path) -> dict[str, torch.Tensor]:
    return latest_checkpoint(run / "checkpoints")[1]["model"]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Today's code, uninterrupted, on the fixtures' configs."""
    base = tmp_path_factory.mktemp("fresh")
    out = {}
    for name, config in RUNS.items():
        assert train(LEGACY / config, base / name, echo=quiet) == 0
        out[name] = base / name
    return out


@pytest.mark.parametrize("run", sorted(p.name for p in LEGACY.iterdir() if p.is_dir()))
def test_records_of_old_runs_read(run):
    record = load_run(LEGACY / run)
    assert record.n_rows >= 2 and list(record.rows)[: len(COLUMNS)] == list(COLUMNS)
    assert record.method in ("igc", "sgd") and record.eta == 1.0 and record.batch_size == 8
    arrays = record.components(0)
    assert arrays["norms"].shape == (8,) and float(arrays["grad_norm"]) > 0
    # written before the preconditioned records (issue 22): absent, read as NaN
    for column in PRECONDITIONED_COLUMNS:
        assert column not in record.rows and np.isnan(record.column(column)).all()
    assert "dots_p" not in arrays
    for path in list_checkpoints(LEGACY / run / "checkpoints"):
        payload = upgrade_checkpoint(load_checkpoint(path))
        assert {"loop", "units", "model", "optimizer", "order"} <= set(payload)
        assert "ckpt_seq" not in payload["loop"] and payload["units"]["checkpointing"]["seq"] > 0


def test_old_checkpoint_splits_into_loop_and_units():
    (path,) = list_checkpoints(LEGACY / "ntasgd-completed" / "checkpoints")
    old = load_checkpoint(path)
    new = upgrade_checkpoint(old)
    assert set(new["loop"]) == {"epoch", "pos", "step", "probed", "indices", "rows", "rnn_state"}
    nt = new["units"]["nt_asgd"]
    assert nt["count"] == old["loop"]["avg_n"] > 0 and nt["history"] == old["loop"]["nt_history"]
    assert torch.equal(nt["average"][0], old["loop"]["avg"][0])
    assert new["units"]["step_statistics"]["clipped"] == old["loop"]["step_clipped"]


@pytest.mark.parametrize("name", list(RUNS))
def test_killed_old_run_resumes_to_todays_uninterrupted_run(name, fresh, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(LEGACY / f"{name}-killed", run)
    messages = []
    assert train(LEGACY / RUNS[name], run, resume=True, echo=messages.append) == 0
    assert any("resumed at epoch" in m for m in messages)
    gold = fresh[name]
    # The killed run's rows before the kill, and the checkpoint it resumes from, were written
    # on the fixture's machine; ``gold`` runs wholly on this one. A CPU of another kind rounds
    # the same float64 reductions differently in the last one or two bits (vectorised sums),
    # so the comparison across machines allows float64 rounding, 1e-12 relative, as
    # test_todays_run_reproduces_the_old_completed_run does. Bitwise equality of a kill and
    # resume on one machine is tests/test_runner.py's (both sides run here).
    same_rows(rows_of(run), rows_of(gold))
    pa, pb = params_of(run), params_of(gold)
    assert pa.keys() == pb.keys()
    assert all(torch.allclose(pa[k], pb[k], rtol=CROSS_MACHINE_RTOL, atol=0) for k in pa)
    for item in sorted((gold / "components").glob("*.npz")):
        with np.load(item) as a, np.load(run / "components" / item.name) as b:
            for k in a.files:
                if k not in NEWER:
                    np.testing.assert_allclose(b[k], a[k], rtol=CROSS_MACHINE_RTOL, atol=1e-300)
    if name == "ntasgd":
        xa = torch.load(run / "averaged_model.pt", weights_only=True)
        xb = torch.load(gold / "averaged_model.pt", weights_only=True)
        assert all(torch.allclose(xa[k], xb[k], rtol=CROSS_MACHINE_RTOL, atol=0) for k in xa)


@pytest.mark.parametrize("name", list(RUNS))
def test_todays_run_reproduces_the_old_completed_run(name, fresh):
    """Same config, same numbers (to float64 rounding: the old run's CPU may differ)."""
    same_rows(rows_of(LEGACY / f"{name}-completed"), rows_of(fresh[name]))
    pa, pb = params_of(LEGACY / f"{name}-completed"), params_of(fresh[name])
    assert all(torch.allclose(pa[k], pb[k], rtol=CROSS_MACHINE_RTOL, atol=0) for k in pa)


def test_probe_and_theory_read_old_checkpoints(tmp_path, capsys):
    from clipscope.config import load_config
    from clipscope.theory_check import measure_points

    run = LEGACY / "igc-completed"
    (ckpt,) = list_checkpoints(run / "checkpoints")
    table = tmp_path / "t.csv"
    assert main(["probe", "--checkpoint", str(ckpt), "--out", str(table)]) == 0
    assert "epoch 4" in capsys.readouterr().out and table.is_file()
    points = measure_points(run, load_config(run / "config.toml"), False, 1e-6)["points"]
    assert [p["epoch"] for p in points] == [0, 4]
