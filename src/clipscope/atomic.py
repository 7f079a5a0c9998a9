"""Crash-safe files: atomic writes and checksummed checkpoints.

Every file a run writes goes through :func:`atomic_write_bytes`: the bytes go to
a temporary file *in the same directory* (so the rename stays on one file
system), which is flushed and ``fsync``-ed, then ``os.replace``-d over the target,
and finally the directory itself is ``fsync``-ed so the rename survives a power
loss. A reader therefore sees either the old file or the new one, never a half
of each; a ``kill -9`` at any instant leaves at most a stray ``*.tmp`` file,
which :func:`clean_tmp` removes and every reader ignores. When a write fails
(for example ``ENOSPC``, disk full) the temporary file is removed and the error
propagates; the previous version of the target is untouched.

Checkpoints (:func:`save_checkpoint`) are a ``torch.save`` payload plus a sidecar
``NAME.sha256`` holding the payload's SHA-256 digest, written after the payload.
:func:`load_checkpoint` refuses a payload whose digest does not match (truncated,
corrupt) or has no sidecar (the writer died between the two files), raising
:class:`~clipscope.errors.CorruptCheckpointError` naming the file, and one that
``torch.load(weights_only=True)`` cannot unpickle safely (a foreign or malicious
pickle), raising :class:`~clipscope.errors.UnloadableCheckpointError`; it never
falls back to full unpickling. :func:`latest_checkpoint` walks back to the newest
loadable one and reports the ones it skipped, each with its own reason.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "a.txt", "hello")
>>> (d / "a.txt").read_text()
'hello'
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipscope.errors import CorruptCheckpointError, UnloadableCheckpointError

__all__ = [
    "TMP_SUFFIX",
    "CorruptCheckpointError",
    "UnloadableCheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_path",
    "clean_tmp",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "sha256_bytes",
]

TMP_SUFFIX = ".tmp"
_CKPT = re.compile(r"^ckpt_(\d{10})\.pt$")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems refuse O_RDONLY on dirs.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform specific
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform specific
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp in the same dir, fsync, rename, fsync dir).

    On any error the temporary file is removed, the previous content of ``path``
    (if any) is left intact, and the error is re-raised; an ``OSError`` that names
    no file (a write or fsync on a full disk) is re-raised naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and not exc.filename and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove stray temporary files left in ``directory`` (recursively) by a killed writer."""
    removed = []
    for item in Path(directory).rglob(f"*{TMP_SUFFIX}"):
        if item.is_file() and item.name.startswith("."):
            item.unlink()
            removed.append(item)
    return removed


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 digest of ``data``.

    >>> sha256_bytes(b"")[:8]
    'e3b0c442'
    """
    return hashlib.sha256(data).hexdigest()


def checkpoint_path(directory: str | os.PathLike, seq: int) -> Path:
    """Return ``directory/ckpt_{seq:010d}.pt``: names sort in the order they were written."""
    return Path(directory) / f"ckpt_{int(seq):010d}.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """``torch.save`` ``state`` to ``path`` atomically, then its digest to ``path.sha256``.

    Returns the hex digest. The sidecar is written last: a payload without one
    is an unfinished checkpoint (removed here when the sidecar write fails, and
    refused by :func:`load_checkpoint` when a kill left it behind).
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    atomic_write_bytes(path, data)
    try:
        atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    except BaseException:
        path.unlink(missing_ok=True)  # a payload without its checksum is no checkpoint
        raise
    return digest


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint after checking its SHA-256 sidecar.

    Raises
    ------
    CorruptCheckpointError
        When the sidecar is missing or unreadable, or the digest does not match
        (the message names the file).
    UnloadableCheckpointError
        When the bytes pass the checksum but ``torch.load(weights_only=True)``
        refuses them (objects other than tensors and plain containers, or not a
        torch file); the message names the file.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    try:
        expected = sidecar.read_text().split()[0]
    except (OSError, IndexError) as exc:
        raise CorruptCheckpointError(
            f"checkpoint {path} has no readable checksum file {sidecar.name} (interrupted write?)"
        ) from exc
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated: sha256 {actual[:12]}… "
            f"!= recorded {expected[:12]}… ({len(data)} bytes)"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnloadableCheckpointError(
            f"checkpoint {path} could not be loaded safely (torch.load with weights_only=True "
            f"refused it: {first}); it was not unpickled"
        ) from exc


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint payloads in ``directory``, oldest first (temporary files ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _CKPT.match(p.name))


def latest_checkpoint(
    directory: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Return ``(path, state)`` of the newest checkpoint that loads, or None.

    Each newer checkpoint that fails (checksum, or unsafe to unpickle) is
    reported through ``warn`` (a message naming it and its reason) and skipped;
    the run never silently starts afresh when a checkpoint exists but none is
    valid -- the caller sees ``None`` only after the warnings, and
    :func:`list_checkpoints` tells it that some existed.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except (CorruptCheckpointError, UnloadableCheckpointError) as exc:
            if warn is not None:
                warn(f"{exc}; falling back to the previous checkpoint")
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their sidecars)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for path in list_checkpoints(directory)[:-keep]:
        for item in (path, path.with_name(path.name + ".sha256")):
            try:
                item.unlink()
            except FileNotFoundError:
                pass
