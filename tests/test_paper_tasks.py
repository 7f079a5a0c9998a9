"""The paper-scale tasks end to end on tiny files written in the official formats."""

import json

import numpy as np
import pytest

from clipscope.reproduce import reproduce
from test_data import _fake_cifar, _write_ptb


def quiet(_text: str) -> None:
    pass


def _completed(out, task):
    meta = json.loads((out / "study.json").read_text())
    runs = meta["tasks"][task]["runs"]
    assert runs
    for run in runs:
        summary = json.loads((out / run["dir"] / "summary.json").read_text())
        assert summary["status"] == "completed", summary
    return runs


# The two studies below build the full-size models (11M and 24M parameters): a minute or two
# each on 2 cores. The same pipeline is covered cheaply by tests/test_reproduce.py (a study on
# embedded data), tests/test_data.py (the CIFAR-10 and PTB readers), tests/test_models.py (both
# models) and test_missing_dataset_is_a_clear_error below; `pytest -m slow` runs them.
@pytest.mark.slow
def test_cifar10_resnet18_on_a_fake_pickle_directory(tmp_path):
    _fake_cifar(tmp_path / "data", per_batch=4)  # 20 training images, 4 held out
    out = tmp_path / "study"
    report = reproduce(
        ["cifar10-resnet18"],
        out,
        epochs=1,
        batch_sizes=[10],
        data_dir=str(tmp_path / "data"),
        progress=False,
        echo=quiet,
    )
    runs = _completed(out, "cifar10-resnet18")
    assert {r["method"] for r in runs} == {"igc", "sgd"}
    assert report.is_file()


@pytest.mark.slow
def test_ptb_awdlstm_on_written_files(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(30)]
    lines = [" " + " ".join(rng.choice(words, 12)) + " " for _ in range(25)]
    _write_ptb(tmp_path / "ptb", {"train": lines, "valid": lines[:3], "test": lines[:3]})
    out = tmp_path / "study"
    reproduce(
        ["ptb-awdlstm"],
        out,
        epochs=1,
        batch_sizes=[2],
        data_dir=str(tmp_path / "ptb"),
        progress=False,
        echo=quiet,
    )
    (run,) = _completed(out, "ptb-awdlstm")
    rows = (out / run["dir"] / "epochs.csv").read_text().splitlines()
    assert len(rows) == 3


@pytest.mark.parametrize("task", ["cifar10-resnet18", "ptb-awdlstm"])
def test_missing_dataset_is_a_clear_error(tmp_path, task):
    with pytest.raises(FileNotFoundError):
        reproduce([task], tmp_path / "o", epochs=1, data_dir=str(tmp_path / "none"), echo=quiet)
