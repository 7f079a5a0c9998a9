"""The character-level corpus (clipscope.data.chars): split, vocabulary, unknowns, errors.

Checked on small texts the tests write, and on tinyshakespeare's ``input.txt`` when
``/work/shared/data/tinyshakespeare`` (or ``$CLIPSCOPE_SHAKESPEARE_DIR``) holds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipscope.config import parse_config
from clipscope.data import UNK, load_char_corpus, load_splits
from clipscope.data.chars import split_point
from clipscope.errors import ConfigError


def _shakespeare() -> Path:
    """$CLIPSCOPE_SHAKESPEARE_DIR, else the first ``shared/data/tinyshakespeare`` above here."""
    if os.environ.get("CLIPSCOPE_SHAKESPEARE_DIR"):
        return Path(os.environ["CLIPSCOPE_SHAKESPEARE_DIR"])
    here = Path(__file__).resolve()
    found = (p / "shared" / "data" / "tinyshakespeare" for p in here.parents)
    return next((p for p in found if p.is_dir()), here.parent / "no-tinyshakespeare-here")


SHAKESPEARE = _shakespeare()
needs_shakespeare = pytest.mark.skipif(
    not (SHAKESPEARE / "input.txt").is_file(),
    reason=f"tinyshakespeare's input.txt is not in {SHAKESPEARE} (set CLIPSCOPE_SHAKESPEARE_DIR)",
)


@given(st.integers(min_value=0, max_value=10**12))
def test_split_point_is_floor_of_nine_tenths(n):
    assert split_point(n) == int(Fraction(9, 10) * n)  # int() floors a non-negative Fraction


def test_split_vocabulary_and_ids_of_a_small_text(tmp_path):
    text = "hello world\nthe end.\n" * 5  # 105 characters, 94 trained on
    (tmp_path / "a.txt").write_text(text)
    c = load_char_corpus(tmp_path, "a.txt")
    cut = split_point(len(text))
    assert cut == 94
    chars = sorted(set(text[:cut]))
    assert c.vocab.tokens == tuple(chars)  # code-point order, training part only
    assert "".join(c.vocab.decode(c["train"])) == text[:cut]
    assert "".join(c.vocab.decode(c["valid"])) == text[cut:]
    assert c["train"].dtype == torch.int64 and len(c["valid"]) == len(text) - cut
    d = c.describe()
    assert d["n_unknown"] == 0 and d["vocab_size"] == len(chars) and UNK not in c.vocab
    assert d["n_tokens"] == {"train": 94, "valid": 11}
    s = load_splits("chars", tmp_path, train_file="a.txt")
    assert s.train.tolist() == c["train"].tolist() and s.vocab_size == len(chars)


def test_held_out_characters_outside_the_vocabulary_map_to_unk(tmp_path):
    (tmp_path / "a.txt").write_text("ab" * 45 + "abXYXaaaab")  # the last 10 hold X and Y
    c = load_char_corpus(tmp_path, "a.txt")
    assert c.vocab.tokens == ("a", "b", UNK)
    assert c["valid"].tolist() == [0, 1, 2, 2, 2, 0, 0, 0, 0, 1]
    d = c.describe()
    assert d["n_unknown"] == 3 and d["unk_rate"]["valid"] == 0.3 and d["unk_rate"]["train"] == 0


def test_a_second_file_is_held_out_whole(tmp_path):
    (tmp_path / "a.txt").write_text("abcab")
    (tmp_path / "b.txt").write_text("cbaz")
    c = load_char_corpus(tmp_path, "a.txt", "b.txt")
    assert c["train"].tolist() == [0, 1, 2, 0, 1] and c["valid"].tolist() == [2, 1, 0, 3]
    assert c.describe()["files"] == {"train": "a.txt", "heldout": "b.txt"}
    with pytest.raises(ValueError, match="same file"):
        load_char_corpus(tmp_path, "a.txt", "./a.txt")


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        load_char_corpus(tmp_path / "nope", "a.txt")
    with pytest.raises(FileNotFoundError, match=r"a\.txt.*does not exist"):
        load_char_corpus(tmp_path, "a.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_char_corpus(tmp_path, "empty.txt")
    (tmp_path / "short.txt").write_text("abcdefghijk")  # 11: 9 trained on, 2 held out: fine
    load_char_corpus(tmp_path, "short.txt")
    (tmp_path / "shorter.txt").write_text("abcdefghi")  # 9: 8 and 1 -> no held-out target
    with pytest.raises(ValueError, match=r"held-out text.*1 character"):
        load_char_corpus(tmp_path, "shorter.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_char_corpus(tmp_path, "bin.txt")
    with pytest.raises(ValueError, match="train_file"):
        load_char_corpus(tmp_path, "")
    with pytest.raises(ValueError, match="needs train_file"):
        load_splits("chars", tmp_path)


def test_config_keys_are_checked_at_parse(tmp_path):
    raw = {"task": "language_model", "model": "gpt", "data": "chars"}
    with pytest.raises(ConfigError, match="train_file"):
        parse_config(raw)
    cfg = parse_config({**raw, "train_file": "input.txt"})
    assert cfg.train_file == "input.txt"
    with pytest.raises(ConfigError, match="train_file"):
        parse_config({"task": "language_model", "data": "text", "train_file": "a.txt"})


def _cli(config: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "clipscope", "train", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "text,message",
    [
        (None, "does not exist"),
        ("abcdefghij" * 3, "batch_size"),  # 27 training characters: under 2 rows of 16 columns
    ],
)
def test_cli_refuses_bad_text_before_writing(tmp_path, text, message):
    if text is not None:
        (tmp_path / "t.txt").write_text(text)
    config = tmp_path / "c.toml"
    config.write_text(
        'task = "language_model"\nmodel = "gpt"\ndata = "chars"\n'
        f'data_dir = "{tmp_path.as_posix()}"\ntrain_file = "t.txt"\nn_samples = 0\n'
        "batch_size = 16\nbptt = 8\nmodel_kwargs = {context = 8, d_model = 8, n_head = 2}\n"
        'optimizer = "adamw"\nlr = 1e-3\nepochs = 1\nthreads = 1\n'
    )
    done = _cli(config, tmp_path / "run")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "run").exists()


@needs_shakespeare
def test_tinyshakespeare_sizes_and_vocabulary():
    c = load_char_corpus(SHAKESPEARE, "input.txt")
    d = c.describe()
    assert d["n_tokens"] == {"train": 1_003_854, "valid": 111_540}
    assert len(c.vocab) == 65 and d["n_unknown"] == 0  # the last 10 % has no new character
    assert c.vocab.token(0) == "\n" and c.vocab.token(1) == " "
    text = (SHAKESPEARE / "input.txt").read_text(encoding="utf-8")
    assert "".join(c.vocab.decode(c["valid"][:200])) == text[1_003_854 : 1_003_854 + 200]


@needs_shakespeare
def test_the_shipped_config_reads_tinyshakespeare():
    from clipscope.reproduce import TASKS, plan

    spec = TASKS["tinyshakespeare-gpt"]
    assert spec.needs_data_dir and spec.base["model"] == "gpt"
    grid = plan(["tinyshakespeare-gpt"], data_dir=str(SHAKESPEARE), progress=False)
    assert [b for _, _, b, _ in grid] == list(spec.batch_sizes)
    cfg = grid[0][3]
    assert cfg.optimizer == "adamw" and cfg.threads == 1 and cfg.data == "chars"


@pytest.mark.slow
@needs_shakespeare
def test_reproduce_runs_the_task_end_to_end(tmp_path):
    """One epoch at one batch size: the run, its rho_P columns, the per-sample section."""
    import csv
    import json

    from clipscope.reproduce import reproduce

    out = tmp_path / "study"
    report = reproduce(
        ["tinyshakespeare-gpt"], out, epochs=1, batch_sizes=[32], data_dir=str(SHAKESPEARE),
        progress=False, echo=lambda s: None,
    )  # fmt: skip
    assert report.is_file()
    with open(out / "runs" / "tinyshakespeare-gpt" / "igc-adamw-B32" / "epochs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(r["rho_p"] and r["c1_p"] for r in rows)
    assert float(rows[0]["p_unset_share"]) == 1.0  # x_0: AdamW has no state, P = 1
    assert float(rows[1]["p_unset_share"]) == 0.0
    section = out / "cross_section" / "tinyshakespeare-gpt-per-sample.json"
    section = json.loads(section.read_text())
    assert section["m"] == 65536 // 64 and len(section["dots"]) == section["m"]
