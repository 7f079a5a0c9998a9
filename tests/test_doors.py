"""Small doors (issue 20, item 6): output paths, documented files, help texts, the examples.

Each test is one door that stuck for a new user; the commands run as subprocesses.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs_pages import REPO, argv, documented_commands
from test_report import write_run

LINUX_PROC = Path("/proc/self").exists()


def clipscope(*args: str, cwd: Path | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "clipscope", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


# -- output paths ---------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux's /proc")
@pytest.mark.parametrize("out", ["/proc/clipscope-run", "/proc/self/status/run"])
def test_train_out_that_cannot_be_created_is_bad_input(out):
    done = clipscope("train", str(REPO / "configs/least_squares_igc.toml"), "--out", out)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and f"--out {out}" in line and ".tmp" not in line
    assert not Path(out).exists()


def test_train_out_with_a_file_in_its_path_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    done = clipscope(
        "train", str(REPO / "configs/least_squares_igc.toml"), "--out", str(tmp_path / "file/run")
    )
    assert done.returncode == 2 and "has a file in its path" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_report_out_into_a_missing_folder_creates_it(tmp_path):
    write_run(tmp_path / "run", epochs=2, eta=0.5, batch=4, seed=1)
    out = tmp_path / "no" / "such" / "dir" / "r.html"
    done = clipscope("report", str(tmp_path / "run"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.is_file() and (out.parent / "findings.json").is_file()


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux's /proc")
@pytest.mark.parametrize("command,out", [("report", "r.html"), ("advise", "figures")])
def test_an_out_whose_folder_cannot_be_made_is_bad_input(tmp_path, command, out):
    write_run(tmp_path / "run", epochs=2, eta=0.5, batch=4, seed=1)
    done = clipscope(command, str(tmp_path / "run"), "--out", f"/proc/no-such-dir/{out}")
    assert done.returncode == 2, done.stderr
    assert "--out /proc/no-such-dir" in done.stderr and ".tmp" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "components", "config.toml", "epochs.csv",
    ]  # fmt: skip


def test_probe_out_into_a_missing_folder_creates_it(tmp_path):
    out = tmp_path / "missing" / "p.csv"
    done = clipscope("probe", "--task", "mlp", "--samples", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text().startswith("batch_size,component,size,loss,norm,dot,cos,beta")


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux's /proc")
def test_probe_out_whose_folder_cannot_be_made_names_it():
    done = clipscope("probe", "--task", "mlp", "--samples", "64", "--out", "/proc/nope/p.csv")
    assert done.returncode == 2, done.stderr
    assert "cannot create its folder /proc/nope" in done.stderr and ".tmp" not in done.stderr


def _probe_outputs() -> list[str]:
    """Return the CSVs the documented probe commands write (relative paths), and the default."""
    outs = ["probe.csv"]  # clipscope probe --out's default
    for command in documented_commands():
        if command.startswith("clipscope probe"):
            words = argv(command)
            outs.append(words[words.index("--out") + 1] if "--out" in words else "probe.csv")
    return sorted(set(outs))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("path", _probe_outputs())
def test_documented_probe_tables_are_ignored_by_git(path):
    done = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, capture_output=True
    )
    if done.returncode == 128:
        pytest.skip(f"not a git checkout: {done.stderr!r}")
    assert done.returncode == 0, f"{path} (a documented probe table) is not in .gitignore"


# -- docs ---------------------------------------------------------------------------------------


def test_the_distributed_study_command_is_make_demos_with_resume():
    makefile = (REPO / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t\$\(BIN\)/clipscope (.+)$", makefile, re.M).group(1).split()
    launches = [
        argv(c) for c in documented_commands() if c.startswith("torchrun") and "reproduce" in c
    ]
    assert launches
    for words in launches:
        tail = words[words.index("reproduce") :]
        assert set(demo) <= set(tail), (demo, tail)  # reproduce --resume
        assert tail[tail.index("--out") + 1] == "clipscope-out/reproduce"  # make demo's folder


def test_grad_norms_file_format_is_documented_and_read_as_documented(tmp_path):
    text = (REPO / "docs/theory.md").read_text()
    assert "`--grad-norms-file` is a UTF-8 text file" in text
    (tmp_path / "norms.txt").write_text("4\n1.0, 0\n")  # newline, comma, space: as documented
    args = "--method sgd --L0 3 --L1 0.5 --c1 0.5 --c2 0.25 --eta 2 --alpha 0.1 --gap 4 --json"
    from_file = clipscope("bounds", *args.split(), "--grad-norms-file", str(tmp_path / "norms.txt"))
    inline = clipscope("bounds", *args.split(), "--grad-norms", "4,1,0")
    assert from_file.returncode == 0 and from_file.stdout == inline.stdout


@pytest.mark.parametrize(
    "command,options",
    [("bounds", ["--method", "--gap", "--grad-norms-file"]), ("theory", ["--fit", "--tol"])],
)
def test_help_texts(command, options):
    from clipscope.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    actions = {s: a for a in sub._actions for s in a.option_strings}
    for option in options:
        assert actions[option].help, f"{command} {option} has no --help text"
    if command == "theory":
        shown = " ".join(sub.format_help().split())
        for option in options:
            assert f"(default: {actions[option].default}" in shown, option


def test_results_page_is_in_the_readmes_list():
    readme = (REPO / "README.md").read_text()
    listed = re.findall(r"^- `(docs/[a-z-]+\.md)`", readme, re.M)
    assert "docs/results.md" in listed
    missing = sorted({p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md")} - set(listed))
    assert not missing, f"pages missing from the README's list: {missing}"


def test_readme_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```", lines.index("```bash"))]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    assert lines.index("```bash") < 5


# -- an example that clips ----------------------------------------------------------------------


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/integrations.md"])
def test_a_documented_monitor_example_clips(page, tmp_path, monkeypatch):
    """The page's first Monitor example, run here: ρ(η) < 1 at every probe (η clips)."""
    block = next(b for b in _python_blocks(page) if "clipscope.Monitor(" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, page, "exec"), scope)
    rows = scope["monitor"].rows
    assert len(rows) >= 2
    assert all(0 < r["rho"] < 1 for r in rows), [r["rho"] for r in rows]
    assert any(r["clipped_fraction"] > 0 for r in rows)
    assert all(math.isfinite(r["rho"]) for r in rows)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
def test_an_out_that_is_not_a_plain_file_is_refused_even_with_force(tmp_path, kind):
    """An atomic write would replace a FIFO, a link or a device by a plain file: exit 2."""
    import os

    if kind == "fifo":
        out = tmp_path / "fifo"
        os.mkfifo(out)
    elif kind == "symlink":
        (tmp_path / "target.csv").write_text("kept\n")
        out = tmp_path / "link.csv"
        out.symlink_to(tmp_path / "target.csv")
    else:
        out = Path("/dev/null")
        if not out.exists():
            pytest.skip("no /dev/null")
    before = out.lstat()
    done = clipscope("probe", "--task", "mlp", "--samples", "64", "--out", str(out), "--force")
    assert done.returncode == 2, done.stderr
    assert f"--out {out} is " in done.stderr and "name a plain file" in done.stderr
    after = out.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    if kind == "symlink":
        assert (tmp_path / "target.csv").read_text() == "kept\n"
    write_run(tmp_path / "run", epochs=2, eta=0.5, batch=4, seed=1)
    done = clipscope("report", str(tmp_path / "run"), "--out", str(out))
    assert done.returncode == 2 and "name a plain file" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "findings.json").exists()


def test_report_and_advise_out_with_a_file_in_its_path_are_named(tmp_path):
    write_run(tmp_path / "run", epochs=2, eta=0.5, batch=4, seed=1)
    (tmp_path / "afile").write_text("x")
    done = clipscope("report", str(tmp_path / "run"), "--out", str(tmp_path / "afile/r.html"))
    assert done.returncode == 2 and "has a file in its path" in done.stderr, done.stderr
    done = clipscope("advise", str(tmp_path / "run"), "--out", str(tmp_path / "afile"))
    assert done.returncode == 2 and "is a file, not a folder" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["reproduce", "--epochs", "1"], ["example1"]])
@pytest.mark.parametrize("where", ["afile/x", "afile"])
def test_reproduce_and_example1_refuse_a_file_for_their_folder(tmp_path, command, where):
    """A file at --out or in its path: exit 2 with the path named, before any work."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / where
    done = clipscope(*command, "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert f"--out {out}" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "afile").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_report_out_never_overwrites_a_file_it_did_not_write(tmp_path):
    """An existing --out that is no clipscope report: exit 2, untouched; --force overwrites."""
    write_run(tmp_path / "run", epochs=2, eta=0.5, batch=4, seed=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    done = clipscope("report", str(tmp_path / "run"), "--out", str(notes))
    assert done.returncode == 2 and "is not a clipscope report" in done.stderr, done.stderr
    assert notes.read_text() == "my notes\n" and not (tmp_path / "findings.json").exists()
    out = tmp_path / "r.html"
    for extra in ([], []):  # the second rebuilds its own report in place, without --force
        done = clipscope("report", str(tmp_path / "run"), "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr
    done = clipscope("report", str(tmp_path / "run"), "--out", str(notes), "--force")
    assert done.returncode == 0 and notes.read_text().startswith("<!DOCTYPE html>")
