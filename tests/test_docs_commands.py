"""Every shell command in the docs' code blocks is run here as a subprocess, or says why not.

:data:`COVERED` maps each command found in a code block of ``README.md`` or
``docs/*.md`` (``tests/docs_pages.py`` finds them) to the test that runs it, here or
in another test file, or to the reason it is not run. A command added to a page
without an entry here fails :func:`test_every_documented_command_is_covered`.
The commands run as written (``clipscope`` is ``python -m clipscope``; optional
``[--flag]`` groups dropped; only output paths swapped for temporary ones) in a
temporary working directory where ``configs/`` is the repository's.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest

from docs_pages import REPO, argv, documented_commands

NOT_RUN = "not run: "
COVERED = {
    # README
    "make demo": NOT_RUN + "minutes; = `clipscope reproduce --resume`, run here with the "
    "documented smaller arguments (test_reproduce_quick)",
    "make test": NOT_RUN + "it is this suite",
    "python3 -m venv .venv": NOT_RUN + "the install; `make test` runs the same install",
    ".venv/bin/pip install -c constraints.txt -e '.[dev]'": NOT_RUN + "the install (make setup)",
    ".venv/bin/pip install -c constraints.txt -e '.[lightning,hf,tensorboard]'": NOT_RUN
    + "the install (make setup installs these extras too)",
    ".venv/bin/python -m pytest -m slow": NOT_RUN + "it is this suite's slow part",
    # docs/training.md
    "clipscope train configs/least_squares_igc.toml --out runs/ls-igc": "test_train_and_report",
    "clipscope report runs/ls-igc": "test_train_and_report",
    "clipscope train configs/least_squares_adamw.toml --out runs/ls-adamw": "test_train_adamw",
    "clipscope train configs/tinyshakespeare_gpt_adamw.toml --out runs/shakespeare": NOT_RUN
    + "needs tinyshakespeare's input.txt in data_dir; tests/test_char_corpus.py plans the task "
    "on it and tests/test_gpt.py builds the same model and data on a text the test writes",
    # docs/engine.md
    "clipscope probe --config configs/least_squares_igc.toml --out x0.csv": "test_probe_commands",
    "clipscope probe --checkpoint runs/ls-igc/checkpoints/ckpt_0000000016.pt --out last.csv": (
        "test_probe_commands"
    ),
    "clipscope probe --task lstm --route two-pass --eta 0.5 --out lstm.csv": "test_probe_commands",
    # docs/distributed.md, README: several processes (tests/test_distributed.py launches
    # `python -m torch.distributed.run ... -m clipscope train|reproduce` on a free port)
    **{
        cmd: NOT_RUN
        + "several processes under torchrun on a fixed port; tests/test_distributed.py "
        "runs the same launches (train, kill -9 then --resume, reproduce) on a free port"
        for cmd in documented_commands()
        if cmd.startswith("torchrun ") and "cifar10" not in cmd
    },
    "torchrun --nproc_per_node=8 -m clipscope train configs/cifar10_resnet18_igc.toml "
    "--out runs/cifar-igc --dist-timeout 1800": NOT_RUN + "8 GPUs and CIFAR-10",
    # docs/reproduce.md, docs/results.md
    "clipscope reproduce": NOT_RUN + "minutes (= make demo); test_reproduce_quick runs the "
    "documented smaller arguments",
    "clipscope reproduce --task cifar10-resnet18 --data-dir ~/data/cifar10 --device cuda": NOT_RUN
    + "a GPU and CIFAR-10; on a CPU build it exits 2 before writing "
    "(tests/test_bad_input.py::test_reproduce_on_a_device_this_build_lacks_exits_2_writing_nothing)",
    "clipscope reproduce --task ptb-awdlstm --data-dir ~/data/ptb --device cuda": NOT_RUN
    + "a GPU and PTB (the same refusal on a CPU build)",
    "clipscope reproduce --task ptb-awdlstm-small --data-dir ~/data/ptb": NOT_RUN
    + "PTB and about 75 minutes (docs/results.md)",
    "clipscope reproduce --task ptb-awdlstm-small --data-dir DIR --out clipscope-out/ptb-small": (
        NOT_RUN + "PTB and about 75 minutes (docs/results.md)"
    ),
    "clipscope reproduce --task tinyshakespeare-gpt --data-dir DIR": NOT_RUN
    + "needs tinyshakespeare's input.txt (tests/test_char_corpus.py plans the task on it)",
    "clipscope advise OUT/runs/etainf-s0": NOT_RUN
    + "needs that study's run; the same command on a run: test_reproduce_quick's advise",
    **{
        cmd: NOT_RUN + "the AdamW study of docs/results.md: tinyshakespeare and about 20 minutes"
        for cmd in documented_commands()
        if cmd.startswith(".venv/bin/python docs/results/adamw_shakespeare.py")
    },
    "clipscope reproduce --task ptb-thresholds --data-dir DIR --out clipscope-out/ptb-thresholds": (
        NOT_RUN + "PTB and about an hour; the arms mechanism runs on least squares in "
        "tests/test_reproduce_arms.py"
    ),
    "clipscope advise clipscope-out/ptb-small": NOT_RUN
    + "needs that study; the same command on a study: test_reproduce_quick",
    "clipscope reproduce --task digits-cnn --epochs 1 --batch-sizes 64,128 --out /tmp/quick": (
        "test_reproduce_quick"
    ),
    "clipscope reproduce --threads 0 --out clipscope-out/all-cores": NOT_RUN
    + "minutes (= make demo on every core); --threads is checked by "
    "tests/test_threads.py::test_reproduce_records_and_sets_its_threads",
    "clipscope report clipscope-out/reproduce": "test_reproduce_quick",
    "clipscope advise clipscope-out/reproduce": "test_reproduce_quick",
    # docs/theory.md
    "clipscope bounds --method sgd --L0 3 --L1 0.5 --c1 0.5 --c2 0.25 --eta 2 --alpha 0.1 --gap 4 "
    "--grad-norms 4,1,0 [--json]": "test_bounds_commands",
    "clipscope bounds --method igc --L0 3 --L1 0.5 --c1 0.5 --c2 0.25 --eta 2 --alpha 0.001 "
    "--gap 4 --L0i 1,2 --L1i 0.25,0.125 --m 2 --grad-norms-file norms.txt [--T 2] [--json]": (
        "test_bounds_commands"
    ),
    "clipscope example1 [--alpha 0.01] [--eta 2] [--x0 1] [--x0-inside η/8] [--epochs 200] "
    "[--seeds 1000] [--seed 0] [--out clipscope-out/example1] [--json]": "test_example1_command",
    # docs/benchmarks.md: minutes each; their options are checked against the scripts' --help
    **{
        cmd: NOT_RUN + "a benchmark (minutes); options checked by test_benchmark_commands_parse"
        for cmd in documented_commands()
        if cmd.startswith(".venv/bin/python bench/")
    },
}


def test_every_documented_command_is_covered():
    found = documented_commands()
    missing = sorted(set(found) - set(COVERED))
    assert not missing, f"commands in the docs without a test or a reason in COVERED: {missing}"
    stale = sorted(set(COVERED) - set(found))
    assert not stale, f"COVERED names commands no page shows any more: {stale}"
    names = set(globals())
    for command, how in COVERED.items():
        if not how.startswith(NOT_RUN):
            assert how in names, (command, how)


def documented(command: str) -> str:
    assert command in documented_commands(), f"no longer in the docs: {command}"
    return command


def run(command: str, cwd: Path, *optional: str, timeout: float = 600, **replace: str):
    """Run a documented command in ``cwd``, with some of its ``[--optional]`` flags."""
    return subprocess.run(
        argv(documented(command), **replace) + list(optional),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def doc_table(page: str, first_header: str) -> list[str]:
    """First-column entries (backticked names) of the table whose header starts so."""
    lines = (REPO / "docs" / page).read_text().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"| {first_header} |"))
    names: list[str] = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("docs-commands")
    (cwd / "configs").symlink_to(REPO / "configs")
    return cwd


@pytest.fixture(scope="module")
def ls_run(workdir) -> Path:
    ok(run("clipscope train configs/least_squares_igc.toml --out runs/ls-igc", workdir))
    return workdir / "runs" / "ls-igc"


def test_train_and_report(ls_run, workdir):
    """docs/training.md: the run directory it lists, the columns of its table, the report."""
    files = {p.relative_to(ls_run).as_posix() for p in ls_run.rglob("*") if p.is_file()}
    for name in ("config.toml", "env.json", "epochs.csv", "summary.json", "train.log"):
        assert name in files
    assert {f"components/epoch_{k:04d}.npz" for k in range(6)} <= files  # epochs = 5
    assert any(re.fullmatch(r"checkpoints/ckpt_\d{10}\.pt", f) for f in files)
    assert all(f + ".sha256" in files for f in files if f.endswith(".pt"))
    with (ls_run / "epochs.csv").open() as fh:
        header = next(csv.reader(fh))
    documented_columns = [c for c in doc_table("training.md", "column") if c != "rho@η"]
    etas = ["0.1", "0.5", "1", "2", "inf"]  # the config's etas
    expected = [c for c in documented_columns if c not in ("asgd_active", "heldout_avg")]
    smoothness = {"hess_norm", "hess_converged", "hess_iterations", "traj_smoothness"}
    assert set(header) - {f"rho@{e}" for e in etas} == set(expected) - smoothness, header
    assert json.loads((ls_run / "summary.json").read_text())["status"] == "completed"
    ok(run("clipscope report runs/ls-igc", workdir))
    assert (ls_run / "report.html").is_file() and (ls_run / "findings.json").is_file()


def test_train_adamw(ls_run, workdir):
    """docs/training.md, "Optimizers": the AdamW example trains and records its optimizer.

    Its rows add exactly the documented Adam/AdamW columns to an SGD run's.
    """
    ok(run("clipscope train configs/least_squares_adamw.toml --out runs/ls-adamw", workdir))
    run_dir = workdir / "runs" / "ls-adamw"
    config = (run_dir / "config.toml").read_text()
    assert 'optimizer = "adamw"' in config and "weight_decay = 0.01" in config
    env = json.loads((run_dir / "env.json").read_text())
    assert env["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert env["optimizer"]["betas"] == [0.9, 0.99]
    with (ls_run / "epochs.csv").open() as fh, (run_dir / "epochs.csv").open() as fa:
        sgd_header, adamw_header = next(csv.reader(fh)), next(csv.reader(fa))
    adam_columns = [c for c in doc_table("training.md", "Adam/AdamW column") if c != "rho_p@η"]
    added = {c for c in adamw_header if c not in sgd_header and not c.startswith("rho_p@")}
    assert added == set(adam_columns), adamw_header
    assert {f"rho_p@{e}" for e in ("0.1", "0.5", "1", "2", "inf")} <= set(adamw_header)


def test_probe_commands(ls_run, workdir):
    """docs/engine.md: the three `clipscope probe` lines and the CSV columns it names."""
    columns = ["batch_size", "component", "size", "loss", "norm", "dot", "cos", "beta"]
    ok(run("clipscope probe --config configs/least_squares_igc.toml --out x0.csv", workdir))
    checkpoint = "clipscope probe --checkpoint runs/ls-igc/checkpoints/ckpt_0000000016.pt"
    ok(run(f"{checkpoint} --out last.csv", workdir))
    ok(run("clipscope probe --task lstm --route two-pass --eta 0.5 --out lstm.csv", workdir))
    for name, m in (("x0.csv", 16), ("last.csv", 16), ("lstm.csv", None)):
        with (workdir / name).open() as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == columns, (name, rows[0])
        assert m is None or len(rows) == 1 + m
    # the checkpoint's table is that point's component file (docs/engine.md)
    assert (workdir / "last.csv").read_text() != (workdir / "x0.csv").read_text()


@pytest.mark.slow  # minutes on a loaded 2-core machine; tests/test_reproduce.py runs the same
def test_reproduce_quick(workdir):  # study in process (digits-cnn, 1 epoch, 2 batch sizes)
    """docs/reproduce.md's seconds-long study, then `report` and `advise` on it."""
    study = "clipscope-out/reproduce"
    quick = "clipscope reproduce --task digits-cnn --epochs 1 --batch-sizes 64,128 --out /tmp/quick"
    ok(run(quick, workdir, **{"/tmp/quick": study}))
    out = workdir / study
    for name in ("study.json", "report.html", "findings.json", "cross_section/digits-cnn.json"):
        assert (out / name).is_file(), name
    runs = json.loads((out / "study.json").read_text())["tasks"]["digits-cnn"]["runs"]
    assert {(r["method"], r["batch_size"]) for r in runs} >= {
        (m, b) for m in ("igc", "sgd") for b in (64, 128)
    }
    (out / "report.html").unlink()
    ok(run("clipscope report clipscope-out/reproduce", workdir))
    assert (out / "report.html").is_file()
    advice = ok(run("clipscope advise clipscope-out/reproduce", workdir)).stdout
    assert "digits-cnn" in advice and list((out / "advice").glob("*.png"))


BOUNDS_SGD = (
    "clipscope bounds --method sgd --L0 3 --L1 0.5 --c1 0.5 --c2 0.25 --eta 2 --alpha 0.1 --gap 4 "
    "--grad-norms 4,1,0 [--json]"
)
BOUNDS_IGC = (
    "clipscope bounds --method igc --L0 3 --L1 0.5 --c1 0.5 --c2 0.25 --eta 2 --alpha 0.001 "
    "--gap 4 --L0i 1,2 --L1i 0.25,0.125 --m 2 --grad-norms-file norms.txt [--T 2] [--json]"
)


def test_bounds_commands(tmp_path):
    """docs/theory.md: both lines, with and without the optional flags.

    The numbers are the ones its API example asserts.
    """
    text = ok(run(BOUNDS_SGD, tmp_path)).stdout
    assert "(38)" in text and "(37)" in text
    sgd = json.loads(ok(run(BOUNDS_SGD, tmp_path, "--json")).stdout)
    assert sgd["condition"]["alpha_max"] == 0.125 and sgd["holds"] is True
    assert abs(sgd["lhs"] - 4.25 / 3) < 1e-12
    (tmp_path / "norms.txt").write_text("4\n1\n0\n")
    ok(run(BOUNDS_IGC, tmp_path))
    igc = json.loads(ok(run(BOUNDS_IGC, tmp_path, "--T", "2", "--json")).stdout)
    assert igc["condition"]["alpha_max"] == 0.00625 and igc["T"] == 2


def test_example1_command(tmp_path):
    """docs/theory.md: the defaults it states, the JSON keys and the plot."""
    synopsis = (
        "clipscope example1 [--alpha 0.01] [--eta 2] [--x0 1] [--x0-inside η/8] [--epochs 200] "
        "[--seeds 1000] [--seed 0] [--out clipscope-out/example1] [--json]"
    )
    result = json.loads(ok(run(synopsis, tmp_path, "--json")).stdout)
    assert {"expected_x1", "alpha", "eta", "watershed", "simulations", "plot"} <= set(result)
    assert result["alpha"] == 0.01 and result["eta"] == 2 and result["watershed"] == 0.5
    assert (tmp_path / "clipscope-out" / "example1" / "example1.png").is_file()


@pytest.mark.parametrize(
    "command",
    sorted(c for c in documented_commands() if c.startswith(".venv/bin/python bench/")),
)
def test_benchmark_commands_parse(command):
    """docs/benchmarks.md: every option of a benchmark command exists in its script's --help."""
    words = argv(command)
    script = REPO / words[1]
    help_text = subprocess.run(
        [words[0], str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert help_text.returncode == 0, help_text.stderr
    for word in words[2:]:
        if word.startswith("--"):
            assert word in help_text.stdout, (command, word)
