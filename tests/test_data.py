"""Data loaders: CIFAR-10 pickles, augmentation, PTB text files, embedded digits and text."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clipscope.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    EOS,
    UNK,
    Cifar10Transform,
    Vocabulary,
    augment,
    embedded_text_source,
    load_cifar10,
    load_digits_tensors,
    load_embedded_text,
    load_ptb,
    normalize,
    tokenize_file,
)

REAL_PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"

# ---------------------------------------------------------------- CIFAR-10 fake directory


def _write_batch(path: Path, images: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    """Official layout: dict with bytes keys, data (n, 3072) uint8 channel-major, labels list."""
    n = images.shape[0]
    flat = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):  # explicit R, G, B planes of 32×32, row-major
        for c in range(3):
            flat[i, c * 1024 : (c + 1) * 1024] = images[i, c].reshape(-1)
    obj = {
        b"batch_label": b"fake batch",
        b"labels": list(labels),
        b"data": flat,
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


def _fake_cifar(root: Path, per_batch: int = 3, protocol: int = 2) -> tuple[np.ndarray, list]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_images, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _write_batch(d / name, images, labels, protocol)
        all_images.append(images)
        all_labels.append(labels)
    return np.concatenate(all_images), [lab for part in all_labels for lab in part]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL], ids=["py2-protocol", "highest"])
def test_load_cifar10_reads_the_official_layout(tmp_path, protocol):
    images, labels = _fake_cifar(tmp_path, protocol=protocol)
    x, y = load_cifar10(tmp_path, train=True)
    assert x.dtype == torch.uint8 and x.shape == (15, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == labels[:15]
    assert np.array_equal(x.numpy(), images[:15])
    x_test, y_test = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)
    assert np.array_equal(x_test.numpy(), images[15:]) and y_test.tolist() == labels[15:]


def test_load_cifar10_reads_numpy_1_module_names(tmp_path):
    """The official files (Python 2 / numpy 1) name ``numpy.core.multiarray._reconstruct``."""
    images, labels = _fake_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    legacy = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in legacy
    path.write_bytes(legacy)
    x, y = load_cifar10(tmp_path, train=False)
    assert np.array_equal(x.numpy(), images[15:]) and y.tolist() == labels[15:]


def test_load_cifar10_names_missing_files(tmp_path):
    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3, data_batch_5"):
        load_cifar10(tmp_path)
    load_cifar10(tmp_path, train=False)  # the test batch is still there
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "empty")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing key"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\(n, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "integer labels"),
        ([1, 2], "expected a dict"),
        ({b"data": _Evil(), b"labels": []}, "refusing"),
    ],
    ids=["no-labels", "bad-shape", "bad-dtype", "label-10", "few-labels", "not-dict", "code"],
)
def test_load_cifar10_rejects_foreign_files(tmp_path, monkeypatch, obj, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match=match):
        load_cifar10(tmp_path, train=False)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- augmentation, normalization


def _augment_twin(x, generator, padding=4):
    """One image at a time: pad, slice, flip; the same draws in the same order."""
    n, _, h, w = x.shape
    rows = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    cols = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = []
    for i in range(n):
        img = F.pad(x[i : i + 1], (padding,) * 4)[0]
        img = img[:, rows[i] : rows[i] + h, cols[i] : cols[i] + w]
        out.append(img.flip(-1) if flip[i] else img)
    return torch.stack(out)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    padding=st.integers(0, 4),
    seed=st.integers(0, 2**31),
)
def test_augment_matches_a_per_image_loop(n, c, h, w, padding, seed):
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8)
    fast = augment(x, torch.Generator().manual_seed(seed), padding)
    slow = _augment_twin(x, torch.Generator().manual_seed(seed), padding)
    assert fast.dtype == x.dtype and torch.equal(fast, slow)


def test_augment_is_deterministic_per_generator_and_leaves_the_global_rng_alone():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    rng = torch.random.get_rng_state()
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    flipped_only = augment(x, torch.Generator().manual_seed(3), padding=0)
    for i in range(8):
        assert torch.equal(flipped_only[i], x[i]) or torch.equal(flipped_only[i], x[i].flip(-1))
    with pytest.raises(TypeError, match="Generator"):
        augment(x, None)
    with pytest.raises(ValueError, match="padding"):
        augment(x, torch.Generator(), padding=-1)


def test_normalize_against_the_formula():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32
    for ch in range(3):
        ref = (x[:, ch].double() / 255 - CIFAR10_MEAN[ch]) / CIFAR10_STD[ch]
        torch.testing.assert_close(out[:, ch].double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize(x.float() / 255), out)
    with pytest.raises(ValueError, match="std"):
        normalize(x, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        normalize(x[:, :2])


def test_cifar_transform_records_what_it_does():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    train, probe = Cifar10Transform(augment=True), Cifar10Transform(augment=False)
    assert train.describe()["augmentation"] == {"random_crop_padding": 4, "horizontal_flip_p": 0.5}
    assert probe.describe()["augmentation"] is None
    assert probe.describe()["normalization"]["std"] == list(CIFAR10_STD)
    assert torch.equal(probe(x), normalize(x))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(train(x, g), normalize(augment(x, torch.Generator().manual_seed(0))))
    with pytest.raises(TypeError, match="Generator"):
        train(x)


# ---------------------------------------------------------------- PTB and tokenization

PTB_FAKE = {
    "train": [" the cat sat on the mat ", " a dog <unk> N years ago ", ""],
    "valid": [" the dog sat ", " new words here "],
    "test": [" cat and dog "],
}


def _write_ptb(root: Path, files=PTB_FAKE) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in files.items():
        (root / f"ptb.{split}.txt").write_text("".join(line + "\n" for line in lines))


def test_load_ptb_on_written_files(tmp_path):
    _write_ptb(tmp_path)
    corpus = load_ptb(tmp_path)
    assert list(corpus) == ["train", "valid", "test"]
    order: list[str] = []
    for split in ("train", "valid", "test"):
        words = [w for line in PTB_FAKE[split] for w in [*line.split(), EOS]]
        assert corpus.vocab.decode(corpus[split]) == words
        assert corpus[split].dtype == torch.int64
        for w in words:
            if w not in order:
                order.append(w)
    assert corpus.vocab.tokens == tuple(order)  # ids by first appearance, train → valid → test
    desc = corpus.describe()
    assert desc["vocab_size"] == len(order) and desc["n_tokens"]["test"] == 4
    assert dict(corpus).keys() == {"train", "valid", "test"}


def test_load_ptb_errors(tmp_path):
    _write_ptb(tmp_path, {"valid": PTB_FAKE["valid"]})
    with pytest.raises(FileNotFoundError, match=r"ptb\.train\.txt, ptb\.test\.txt"):
        load_ptb(tmp_path)
    assert len(load_ptb(tmp_path, splits=["valid"]).vocab) == 7
    with pytest.raises(ValueError, match="subset"):
        load_ptb(tmp_path, splits=["dev"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ptb(tmp_path / "nowhere")
    (tmp_path / "ptb.test.txt").write_text("")
    with pytest.raises(ValueError, match="no tokens"):
        load_ptb(tmp_path, splits=["test"])


def test_tokenize_file_with_frozen_vocabularies(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a b\nb c\n")
    closed = Vocabulary(["a", "b", EOS]).freeze()
    with pytest.raises(ValueError, match=r"t\.txt:2: .*'c'"):
        tokenize_file(path, closed)
    with_unk = Vocabulary(["a", "b"], unk=UNK).freeze()
    ids = tokenize_file(path, with_unk, add_eos=False)
    assert with_unk.decode(ids) == ["a", "b", "b", UNK]
    assert len(with_unk) == 3
    with pytest.raises(FileNotFoundError):
        tokenize_file(tmp_path / "missing.txt", Vocabulary())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("abcxyz", min_size=1, max_size=3), max_size=30))
def test_vocabulary_round_trip(tokens):
    vocab = Vocabulary()
    ids = vocab.encode(tokens)
    assert vocab.decode(ids) == tokens
    assert len(vocab) == len(set(tokens))
    assert sorted(set(ids.tolist())) == list(range(len(vocab)))


@pytest.mark.skipif(not REAL_PTB.is_dir(), reason=f"real PTB files not found at {REAL_PTB}")
@pytest.mark.parametrize("split", ["valid", "test"])
def test_load_ptb_real_files(split):
    path = REAL_PTB / f"ptb.{split}.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    corpus = load_ptb(REAL_PTB, splits=[split])
    lines = path.read_text().splitlines()
    assert corpus[split].numel() == sum(len(line.split()) + 1 for line in lines)
    assert corpus[split].numel() == {"valid": 73_760, "test": 82_430}[split]
    assert len(corpus.vocab) <= 10_000 and UNK in corpus.vocab and EOS in corpus.vocab
    n_unk = sum(line.split().count(UNK) for line in lines)
    assert corpus.describe()["unk_rate"][split] == round(n_unk / corpus[split].numel(), 6)
    first = corpus.vocab.decode(corpus[split][: len(lines[0].split()) + 1])
    assert first == [*lines[0].split(), EOS]


# ---------------------------------------------------------------- embedded defaults


def test_digits_tensors_and_their_split():
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = load_digits_tensors()
    assert d.x_train.shape == (1536, 1, 8, 8) and d.x_valid.shape == (261, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    x = torch.cat([d.x_train, d.x_valid]).squeeze(1).double()
    assert torch.equal(x, torch.from_numpy(ref.images / 16.0))
    assert torch.cat([d.y_train, d.y_valid]).tolist() == ref.target.tolist()
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert set(d.y_train.tolist()) == set(range(10))
    desc = d.describe()
    assert desc["n_train"] == 1536 and desc["n_valid"] == 261 and desc["augmentation"] is None
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        assert 1536 % b == 0
    assert load_digits_tensors(n_train=100).x_valid.shape[0] == 1697
    with pytest.raises(ValueError, match="n_train"):
        load_digits_tensors(n_train=1797)


@pytest.fixture(scope="module")
def text_corpus():
    return load_embedded_text()


def test_embedded_text_corpus(text_corpus):
    c = text_corpus
    name, text = embedded_text_source()
    assert list(c) == ["train", "valid"]
    assert len(c.vocab) == 2000 and c.vocab.unk == UNK
    assert 50_000 < c["train"].numel() and 0 < c["valid"].numel() < c["train"].numel()
    for ids in c.values():
        assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 2000
    desc = c.describe()
    assert desc["source"] == name and "pydoc_data" in name
    assert desc["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert desc["unk_rate"]["train"] < 0.05
    n_lines = sum(1 for line in text.lower().splitlines() if any(ch.isalnum() for ch in line))
    n_eos = sum(int((ids == c.vocab.index(EOS)).sum()) for ids in c.values())
    assert n_eos <= n_lines and n_eos > 0.9 * n_lines  # lines of only '_' or non-ASCII drop out
    words = c.vocab.decode(c["train"][:200])
    special = (EOS, UNK, "N")
    assert all(w in special or (w.replace("'", "").isalpha() and w.islower()) for w in words)


def test_embedded_text_is_deterministic_and_truncates(text_corpus):
    small = load_embedded_text(max_chars=30_000, max_vocab=500)
    again = load_embedded_text(max_chars=30_000, max_vocab=500)
    assert torch.equal(small["train"], again["train"]) and small.vocab == again.vocab
    assert len(small.vocab) == 500
    total = sum(v.numel() for v in small.values())
    assert total < sum(v.numel() for v in text_corpus.values()) / 5


@pytest.mark.parametrize(
    "kwargs",
    [{"max_chars": 0}, {"max_vocab": 2}, {"valid_fraction": 1.0}, {"max_chars": 5}],
    ids=["chars-0", "vocab-2", "fraction-1", "too-short"],
)
def test_embedded_text_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_embedded_text(**kwargs)
