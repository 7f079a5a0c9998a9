"""A word-level corpus in Mikolov's format from two named files (train_file, heldout_file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipscope.config import TrainConfig, parse_config
from clipscope.data import EOS, load_splits, load_word_corpus
from clipscope.errors import ConfigError
from clipscope.tasks import build_task
from test_data import PTB_FAKE, _write_ptb


def _real_ptb() -> Path:
    """$CLIPSCOPE_PTB_DIR, else the first ``shared/data/ptb`` beside a folder above this file."""
    if os.environ.get("CLIPSCOPE_PTB_DIR"):
        return Path(os.environ["CLIPSCOPE_PTB_DIR"])
    here = Path(__file__).resolve()
    found = (p / "shared" / "data" / "ptb" for p in here.parents)
    return next((p for p in found if p.is_dir()), here.parent / "no-ptb-here")


PTB = _real_ptb()


def test_two_named_files_train_and_held_out(tmp_path):
    _write_ptb(tmp_path)
    corpus = load_word_corpus(tmp_path, "ptb.valid.txt", "ptb.test.txt")
    assert list(corpus) == ["train", "valid"]
    for split, name in (("train", "valid"), ("valid", "test")):
        words = [w for line in PTB_FAKE[name] for w in [*line.split(), EOS]]
        assert corpus.vocab.decode(corpus[split]) == words
    first = [w for line in PTB_FAKE["valid"] + PTB_FAKE["test"] for w in [*line.split(), EOS]]
    assert corpus.vocab.tokens == tuple(dict.fromkeys(first))  # train file first
    desc = corpus.describe()
    assert desc["files"] == {"train": "ptb.valid.txt", "heldout": "ptb.test.txt"}


def test_ptb_default_files_are_the_standard_split(tmp_path):
    _write_ptb(tmp_path)
    default = load_splits("ptb", tmp_path)
    named = load_splits("ptb", tmp_path, train_file="ptb.train.txt", heldout_file="ptb.valid.txt")
    assert default.train.tolist() == named.train.tolist()
    assert default.test.tolist() == named.test.tolist()
    assert default.vocab_size == named.vocab_size


def test_bad_file_names_are_named(tmp_path):
    _write_ptb(tmp_path, {"valid": PTB_FAKE["valid"]})
    with pytest.raises(FileNotFoundError, match=r"lacks ptb\.test\.txt"):
        load_word_corpus(tmp_path, "ptb.valid.txt", "ptb.test.txt")
    with pytest.raises(ValueError, match="same file"):
        load_word_corpus(tmp_path, "ptb.valid.txt", "./ptb.valid.txt")
    with pytest.raises(ValueError, match="train_file"):
        load_word_corpus(tmp_path, "", "ptb.valid.txt")
    with pytest.raises(ValueError, match="heldout_file"):
        load_splits("mikolov", tmp_path, train_file="ptb.valid.txt")
    with pytest.raises(ValueError, match="word-level corpus"):
        load_splits("digits", train_file="x.txt")


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"data": "digits", "train_file": "a.txt"}, "train_file"),
        ({"data": "cifar10", "heldout_file": "b.txt"}, "heldout_file"),
        ({"data": "mikolov", "train_file": "a.txt"}, "heldout_file"),
        ({"data": "mikolov", "heldout_file": "b.txt"}, "train_file"),
        ({"data": "ptb", "train_file": 3}, "train_file"),
    ],
)
def test_config_keys_are_checked_at_parse(raw, key):
    raw = {"task": "language_model", "model": "small-lstm-lm", **raw}
    with pytest.raises(ConfigError, match=key):
        parse_config(raw)


def test_default_file_names_stay_out_of_the_resume_setting():
    """Runs started before train_file / heldout_file existed still resume."""
    assert "train_file" not in TrainConfig().setting()
    named = TrainConfig(
        task="language_model", data="ptb", train_file="ptb.valid.txt", heldout_file="ptb.test.txt"
    )
    assert named.setting()["train_file"] == "ptb.valid.txt"


def test_a_config_trains_on_the_first_file_and_holds_out_the_second(tmp_path):
    _write_ptb(tmp_path)
    cfg = parse_config(
        {
            "task": "language_model",
            "model": "small-lstm-lm",
            "model_kwargs": {"emb": 8, "hidden": 8},
            "data": "ptb",
            "data_dir": str(tmp_path),
            "train_file": "ptb.valid.txt",
            "heldout_file": "ptb.test.txt",
            "batch_size": 2,
            "bptt": 3,
            "lr": 0.1,
        }
    )
    model, _, comps, heldout = build_task(cfg)
    valid_tokens = sum(len(line.split()) + 1 for line in PTB_FAKE["valid"])
    assert sum(comps.sizes) <= valid_tokens  # components come from ptb.valid.txt
    assert comps.data_description["files"]["heldout"] == "ptb.test.txt"
    with torch.no_grad():
        assert heldout(model) > 1.0  # a perplexity over ptb.test.txt


def test_clipscope_train_refuses_a_missing_named_file_before_writing(tmp_path):
    _write_ptb(tmp_path / "data", {"valid": PTB_FAKE["valid"]})
    config = tmp_path / "c.toml"
    config.write_text(
        'task = "language_model"\nmodel = "small-lstm-lm"\ndata = "ptb"\n'
        f'data_dir = "{tmp_path / "data"}"\ntrain_file = "ptb.valid.txt"\n'
        'heldout_file = "ptb.test.txt"\nlr = 0.1\nepochs = 1\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "clipscope", "train", str(config), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "ptb.test.txt" in done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    not (PTB / "ptb.valid.txt").is_file() or not (PTB / "ptb.test.txt").is_file(),
    reason=f"the real PTB files are not on this machine ({PTB})",
)
def test_the_real_ptb_validation_and_test_files():
    splits = load_splits("ptb", PTB, train_file="ptb.valid.txt", heldout_file="ptb.test.txt")
    assert splits.train.numel() == 73_760 and splits.test.numel() == 82_430
    assert splits.vocab_size <= 10_000
