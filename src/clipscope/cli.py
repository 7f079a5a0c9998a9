"""The ``clipscope`` command line.

Each sub-command lives in its own module under :mod:`clipscope.commands` and
defines ``add_parser(subparsers)`` and ``run(args) -> int``. Modules are found
by name, so adding a command never touches this file, and only the chosen
command's module is imported (``clipscope bounds`` never loads torch).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from clipscope import __version__, commands


def command_names() -> list[str]:
    """Names of the available sub-commands (module names, nothing imported)."""
    return sorted(
        m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser; with ``only``, register just that sub-command."""
    parser = argparse.ArgumentParser(
        prog="clipscope",
        description="Gradient clipping in incremental gradient methods: train, probe, reproduce.",
    )
    parser.add_argument("--version", action="version", version=f"clipscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in [only] if only else command_names():
        importlib.import_module(f"clipscope.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:  # answered without importing any command (torch, matplotlib)
        print(f"clipscope {__version__}")
        return 0
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in command_names() else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"clipscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as exc:  # a full disk, a read-only folder: files already written are intact
        print(f"clipscope {args.command}: error: I/O failure: {io_message(exc)}", file=sys.stderr)
        return EXIT_IO


#: Exit code of an I/O failure (``train`` returns the same).
EXIT_IO = 4


def io_message(exc: OSError) -> str:
    """``exc`` in one line, naming the file meant rather than the atomic writer's temporary one.

    >>> io_message(OSError(28, "No space left on device", "out/.report.html.81.tmp"))
    'No space left on device: out/report.html'
    """
    import re
    from pathlib import Path

    from clipscope.atomic import TMP_SUFFIX

    if not exc.filename:
        return str(exc)
    path = Path(str(exc.filename))
    meant = re.fullmatch(r"\.(.+)\.\d+" + re.escape(TMP_SUFFIX), path.name)
    return f"{exc.strerror or exc}: {path.with_name(meant.group(1)) if meant else path}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
