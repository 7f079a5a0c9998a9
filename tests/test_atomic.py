"""Atomic writes and checksummed checkpoints (edge cases 29-31)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from clipscope import atomic
from clipscope.atomic import (
    CorruptCheckpointError,
    atomic_write_text,
    checkpoint_path,
    clean_tmp,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def test_write_replaces_and_leaves_no_tmp(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_text(target, json.dumps({"a": 1}))
    atomic_write_text(target, json.dumps({"a": 2}))
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failed_write_keeps_old_content(tmp_path, monkeypatch, where):
    target = tmp_path / "rows.csv"
    atomic_write_text(target, "a,b\n1,2\n")
    if where == "write":
        monkeypatch.setattr(atomic, "open", lambda *a, **k: _Failing(*a, **k), raising=False)
    else:
        monkeypatch.setattr(atomic.os, where, _enospc)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "a,b\n1,2\n3,4\n")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)  # the file meant, for the one-line message
    monkeypatch.undo()
    assert target.read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


class _Failing:
    """A file object whose write fails after the file was created (disk full)."""

    def __init__(self, path, mode):
        self._handle = open(path, mode)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_roundtrip_and_checksum(tmp_path):
    state = {"w": torch.arange(5.0), "epoch": 3, "rows": [{"loss": float("nan")}]}
    path = checkpoint_path(tmp_path, 7)
    digest = save_checkpoint(path, state)
    assert (tmp_path / "ckpt_0000000007.pt.sha256").read_text().startswith(digest)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["epoch"] == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-sidecar"])
def test_damaged_checkpoint_named_and_previous_used(tmp_path, damage):
    save_checkpoint(checkpoint_path(tmp_path, 1), {"step": 1})
    newest = checkpoint_path(tmp_path, 2)
    save_checkpoint(newest, {"step": 2})
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    else:
        newest.with_name(newest.name + ".sha256").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"ckpt_0000000002\.pt"):
        load_checkpoint(newest)
    messages = []
    path, state = latest_checkpoint(tmp_path, warn=messages.append)
    assert path.name == "ckpt_0000000001.pt" and state == {"step": 1}
    assert len(messages) == 1 and "ckpt_0000000002.pt" in messages[0]


def test_prune_and_clean(tmp_path):
    for step in range(5):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / ".ckpt_0000000009.pt.123.tmp").write_bytes(b"half")
    assert [p.name for p in clean_tmp(tmp_path)] == [".ckpt_0000000009.pt.123.tmp"]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_0000000003.pt",
        "ckpt_0000000004.pt",
    ]
    assert len(list(tmp_path.glob("*.sha256"))) == 2
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert os.listdir(tmp_path) == []


class _SpyHandle:
    """A real file handle that logs its write and flush calls into ``calls``."""

    def __init__(self, path, mode, calls):
        self._handle, self._calls, self.path = open(path, mode), calls, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def write(self, data):
        self._calls.append(("write", self.path, len(data)))
        return self._handle.write(data)

    def flush(self):
        self._calls.append(("flush", self.path))
        self._handle.flush()

    def fileno(self):
        return self._handle.fileno()


@pytest.mark.parametrize("size", [10, 100_000], ids=["smaller-than-a-buffer", "larger"])
def test_the_writer_flushes_then_fsyncs_complete_bytes_then_renames(tmp_path, monkeypatch, size):
    """The system calls of one atomic write, in order, with the bytes on disk at fsync time.

    write → flush → fsync(file) with every byte on disk → replace(tmp, target) →
    fsync(directory). Without the flush a small payload would still sit in Python's
    buffer when fsync runs (a power loss then leaves an empty file after the rename).
    """
    import stat

    calls, data = [], bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    real_fsync, real_replace = os.fsync, os.replace

    def spy_open(path, mode="r", *args, **kwargs):
        return _SpyHandle(path, mode, calls)

    def spy_fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            calls.append(("fsync-dir",))
        else:
            on_disk = None
            if os.path.exists("/proc/self"):  # what another process would read now
                with open(os.readlink(f"/proc/self/fd/{fd}"), "rb") as handle:
                    on_disk = handle.read()
            calls.append(("fsync", info.st_size, on_disk))
        real_fsync(fd)

    def spy_replace(src, dst):
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "open", spy_open, raising=False)
    monkeypatch.setattr(atomic.os, "fsync", spy_fsync)
    monkeypatch.setattr(atomic.os, "replace", spy_replace)
    target = tmp_path / "payload.bin"
    atomic.atomic_write_bytes(target, data)
    monkeypatch.undo()
    kinds = [c[0] for c in calls]
    assert kinds == ["write", "flush", "fsync", "replace", "fsync-dir"], kinds
    tmp = calls[0][1]
    assert calls[1][1] == tmp and os.path.dirname(tmp) == str(tmp_path)  # same file system
    _, size_at_fsync, on_disk = calls[2]
    assert size_at_fsync == len(data)
    assert on_disk is None or on_disk == data  # every byte, before the rename
    assert calls[3][1:] == (os.fspath(tmp), os.fspath(target))
    assert target.read_bytes() == data
