"""Output paths of the commands: checked or created before the work, named in every error."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

__all__ = ["check_creatable", "check_output_dir", "check_output_file", "make_parent"]


def check_creatable(path: str | Path, flag: str = "--out") -> None:
    """Refuse a directory that cannot be created or written here, leaving nothing behind.

    The nearest existing folder of ``path`` (``path`` itself when it exists) must
    be a directory in which a new folder can be made: a uniquely named one is
    made and removed at once (safe when several ``torchrun`` processes check
    the same path). ``/proc/...``, a read-only file system and a file standing
    in the path are refused.

    Raises
    ------
    ValueError
        Naming ``flag``, the path and the reason.
    """
    path = Path(path)
    base = _existing_base(path)
    if base.exists() and not base.is_dir():
        what = "is a file" if base == path else f"has a file in its path: {base}"
        if base == path:
            return  # the command's own check says it better (an existing file is refused)
        raise ValueError(f"{flag} {path} {what}")
    try:
        made = tempfile.mkdtemp(prefix=".clipscope-check-", dir=base)
    except OSError as exc:
        raise ValueError(
            f"{flag} {path}: cannot create a directory in {base} ({exc.strerror or exc})"
        ) from None
    shutil.rmtree(made, ignore_errors=True)


def check_output_dir(path: str | Path, what: str, flag: str = "--out") -> Path:
    """Refuse an output folder that is a file or cannot be created; return it as a Path.

    A file at ``path`` is named with ``what`` the folder is for; the rest is
    :func:`check_creatable`'s (a file in the path, a read-only place).

    Raises
    ------
    ValueError
        Naming ``flag``, the path and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not {what}")
    check_creatable(path, flag)
    return path


def make_parent(path: str | Path, flag: str = "--out") -> Path:
    """Create the folder of the output file ``path`` when missing; return ``path``.

    Raises
    ------
    ValueError
        The folder cannot be created (naming ``flag``, the folder and the reason).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"{flag} {path}: cannot create its folder {path.parent} ({exc.strerror or exc})"
        ) from None
    return path


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an output file that is not a plain file, or with a file in its path.

    Outputs are written atomically: a new file replaces ``path`` by a rename, so
    a device, a FIFO, a symbolic link or a folder standing at ``path`` would be
    replaced by a plain file (``--force`` included). Nothing is created here.

    Raises
    ------
    ValueError
        Naming ``flag``, the path and what stands there (or in its path).
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        what = (
            "a symbolic link" if path.is_symlink()
            else "a folder" if path.is_dir()
            else "not a regular file (a device, a FIFO or a socket)"
        )  # fmt: skip
        raise ValueError(
            f"{flag} {path} is {what}: the output is written as a new file that replaces "
            "it, so name a plain file"
        )
    base = _existing_base(path.parent)
    if base.exists() and not base.is_dir():
        raise ValueError(f"{flag} {path} has a file in its path: {base}")
    return path


def _existing_base(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the root when none does)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
