"""Run directories as the report and the theory check read them: damaged files (issue 24, item 7).

Every damage is a hand-made copy of a good run: the exact exit code, the one line
that names the file, and nothing written where the command refuses.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import clipscope
from clipscope.cli import main
from clipscope.report.findings import study_findings
from clipscope.run.directory import load_run, read_rows
from test_report import write_run


def _run(tmp_path: Path, epochs: int = 3) -> Path:
    write_run(tmp_path / "run", epochs=epochs, eta=0.5, batch=4, seed=5)
    return tmp_path / "run"


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


# -- epochs.csv ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut", ["mid-cell", "missing-cells"], ids=["no-final-newline", "fewer-cells"]
)
def test_a_half_written_last_row_is_left_out_visibly(tmp_path, capsys, cut):
    run = _run(tmp_path)
    text = (run / "epochs.csv").read_text()
    lines = text.splitlines()
    if cut == "mid-cell":  # the copy stopped inside the last cell: no newline at the end
        broken = text.rstrip("\n")[:-3]
    else:  # a row with its first cells only
        broken = "\n".join([*lines[:-1], ",".join(lines[-1].split(",")[:3])]) + "\n"
    (run / "epochs.csv").write_text(broken)

    notes: list[str] = []
    rows = read_rows(run / "epochs.csv", notes)
    assert rows["epoch"].tolist() == [0.0, 1.0]  # the intact rows, the cut one left out
    assert len(notes) == 1 and "line 4" in notes[0] and "left out" in notes[0]

    code, err = _cli(capsys, "report", str(run))
    assert code == 0, err
    found = json.loads((run / "findings.json").read_text())["tasks"]["run"]
    assert found["notes"] == notes
    assert "left out" in (run / "report.html").read_text()


def test_theory_prints_the_note_of_a_cut_row(tmp_path, capsys):
    run = _run(tmp_path)
    (run / "epochs.csv").write_text((run / "epochs.csv").read_text().rstrip("\n"))
    assert main(["theory", str(run), "--recorded-only"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("note: ") and "half-written row, left out" in out
    assert "rows=2" in out


def test_a_malformed_row_before_the_last_is_refused(tmp_path, capsys):
    run = _run(tmp_path)
    lines = (run / "epochs.csv").read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:2])
    (run / "epochs.csv").write_text("\n".join(lines) + "\n")
    code, err = _cli(capsys, "report", str(run))
    assert code == 2 and f"{run / 'epochs.csv'}: line 3 has 2 cells" in err
    assert not (run / "report.html").exists() and not (run / "findings.json").exists()


@pytest.mark.parametrize("content", ["", "epoch,step,loss\n"], ids=["empty", "header-only"])
def test_report_and_theory_refuse_an_epochs_csv_without_rows(tmp_path, capsys, content):
    run = _run(tmp_path)
    (run / "epochs.csv").write_text(content)
    for command in (["report", str(run)], ["theory", str(run), "--recorded-only"]):
        code, err = _cli(capsys, *command)
        assert code == 2 and "holds no probe rows" in err, (command, err)
        assert len(err.strip().splitlines()) == 1
    assert not (run / "report.html").exists()


def test_a_directory_without_config_toml_is_refused(tmp_path, capsys):
    run = _run(tmp_path)
    (run / "config.toml").unlink()
    code, err = _cli(capsys, "report", str(run))
    assert code == 2 and "no config.toml" in err
    assert not (run / "report.html").exists()
    assert "None" not in err and "?-B" not in err


@pytest.mark.parametrize(
    "damage",
    [b"not a zip file at all", b"PK\x03\x04truncated"],
    ids=["garbage", "truncated-zip"],
)
def test_a_corrupt_component_file_is_named(tmp_path, capsys, damage):
    run = _run(tmp_path)
    bad = run / "components" / "epoch_0001.npz"
    bad.write_bytes(damage)
    code, err = _cli(capsys, "report", str(run))
    assert code == 2 and str(bad) in err and "not a readable component file" in err
    assert "allow_pickle" not in err.split("(")[0]
    assert not (run / "report.html").exists()


def test_a_pickled_component_file_is_refused_not_unpickled(tmp_path):
    run = _run(tmp_path)
    bad = run / "components" / "epoch_0001.npz"
    np.savez(bad, norms=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match=r"epoch_0001\.npz: not a readable component file"):
        study_findings(run)


# -- I/O failures: exit 4, one line, the file meant ---------------------------------------------


def _full_disk(path, data=None):
    tmp = Path(path).with_name(f".{Path(path).name}.1234.tmp")
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))


@pytest.mark.parametrize("command", ["report", "advise", "probe"])
def test_a_full_disk_exits_4_with_one_line(tmp_path, capsys, monkeypatch, command):
    run = _run(tmp_path)
    import clipscope.atomic
    import clipscope.commands.probe
    import clipscope.report.html

    monkeypatch.setattr(clipscope.atomic, "atomic_write_bytes", _full_disk)
    monkeypatch.setattr(clipscope.report.html, "atomic_write_bytes", _full_disk)
    monkeypatch.setattr(clipscope.commands.probe, "atomic_write_text", _full_disk)
    args = {
        "report": ["report", str(run)],
        "advise": ["advise", str(run)],
        "probe": ["probe", "--task", "mlp", "--samples", "64", "--out", str(tmp_path / "p.csv")],
    }[command]
    code, err = _cli(capsys, *args)
    assert code == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "I/O failure: No space left on device" in lines[0]
    assert ".tmp" not in lines[0] and "Traceback" not in err


# -- a resumed Monitor writes counts as integers -------------------------------------------------


def test_a_resumed_monitor_writes_epoch_and_step_as_integers(tmp_path):
    torch.manual_seed(0)
    X, Y = torch.randn(32, 3), torch.randn(32)
    comps = clipscope.Components.from_tensors(X, Y, batch_size=8, seed=0)
    model = torch.nn.Linear(3, 1)

    def loss_fn(out, y):
        return ((out.squeeze(-1) - y) ** 2).mean()

    def train(monitor, steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in steps:
            monitor.step(step)
            x, y = comps.batch(step % comps.m)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            monitor.gradient()
            opt.step()

    run_dir = tmp_path / "mon"
    first = clipscope.Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=run_dir)
    train(first, range(4))
    state = first.state_dict()
    second = clipscope.Monitor(model, loss_fn, comps, eta=0.5, every=2, run_dir=run_dir)
    second.load_state_dict(state)
    train(second, range(4, 6))
    second.close()
    assert all(type(r["epoch"]) is int and type(r["step"]) is int for r in second.rows)
    lines = (run_dir / "epochs.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [(c["epoch"], c["step"]) for c in cells] == [("0", "0"), ("1", "2"), ("2", "4")]
    record = load_run(run_dir)
    assert record.column("step").tolist() == [0.0, 2.0, 4.0]
    assert math.isfinite(record.column("loss")[-1])


def test_the_writer_keeps_counts_integer_whatever_the_row_holds(tmp_path):
    """Rows restored from a state of floats still write `epoch`/`step` as integers."""
    from clipscope.run.directory import RunDirectory

    directory = RunDirectory(tmp_path / "run")
    directory.path.mkdir()
    directory.write_rows([{"epoch": 0.0, "step": 12.0, "loss": 1.0, "lr": 3.0}])
    header, row = (directory.path / "epochs.csv").read_text().splitlines()
    cells = dict(zip(header.split(","), row.split(","), strict=True))
    assert (cells["epoch"], cells["step"]) == ("0", "12")
    assert cells["loss"] == "1.0" and cells["lr"] == "3.0"  # other columns keep their floats


# -- a run written by clipscope.fit(run_dir=...) ------------------------------------------------


def test_a_fit_run_directory_is_read_reported_and_checked(tmp_path, capsys):
    """fit() writes config.toml (kind = "fit"), so the report and the theory check read it."""
    torch.manual_seed(0)
    X, Y = torch.randn(64, 5), torch.randint(0, 2, (64,))
    comps = clipscope.Components.from_tensors(X, Y, batch_size=16, seed=0)
    run = tmp_path / "fit"
    clipscope.fit(torch.nn.Linear(5, 2), torch.nn.functional.cross_entropy, comps, "igc",
                  lr=0.1, eta=0.3, epochs=1, run_dir=run, progress=False)  # fmt: skip
    record = load_run(run)
    assert record.setting("kind") == "fit" and record.method == "igc"
    assert record.batch_size == 16 and record.setting("eta") == 0.3
    assert main(["report", str(run)]) == 0 and (run / "findings.json").is_file()
    capsys.readouterr()
    assert main(["theory", str(run)]) == 0
    out = capsys.readouterr().out
    # no config to rebuild the caller's model from: nothing is measured, and it says how to record
    assert "call fit with smoothness_every > 0" in out and "'clipscope theory'" not in out
