"""Read the documentation pages: their shell commands, command synopses and skipped blocks.

Shared by ``tests/test_docs_commands.py`` and ``tests/test_docs_pages.py``. The pages
are ``README.md`` and every ``docs/*.md`` (the same glob as the root ``conftest.py``,
which runs their Python blocks), so a new page is read the moment it exists.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Words that start a shell command in a code block.
COMMAND_WORDS = ("clipscope ", "make ", ".venv/bin/", "python ", "python3 ", "torchrun ")


def pages() -> list[Path]:
    """``README.md`` and every page directly in ``docs/``."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def code_lines(path: Path) -> list[str]:
    """Lines of the page's code: fenced blocks (any language) and 4-space indented blocks.

    Backslash continuations are joined into one line.
    """
    out: list[str] = []
    fence = None
    previous_blank = True
    in_indented = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            else:
                out.append(line)
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if line.startswith("    ") and (previous_blank or in_indented):
            in_indented = True
            out.append(line[4:])
        else:
            in_indented = False
        previous_blank = not stripped
    joined: list[str] = []
    for line in out:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1].rstrip() + " " + line.strip()
        elif joined and joined[-1] and line.strip().startswith("[--"):  # a wrapped synopsis
            joined[-1] += " " + line.strip()
        else:
            joined.append(line.strip())
    return joined


def strip_comment(line: str) -> str:
    """Return a shell line without its trailing ``# comment``."""
    return re.sub(r"\s+#\s.*$", "", line).strip()


def documented_commands() -> dict[str, list[str]]:
    """Every shell command in the pages' code blocks, comment stripped: command -> pages."""
    found: dict[str, list[str]] = {}
    for page in pages():
        for line in code_lines(page):
            if line.startswith(COMMAND_WORDS):
                found.setdefault(strip_comment(line), []).append(rel(page))
    return found


def argv(command: str, **replace: str) -> list[str]:
    """Return the documented command as arguments for ``subprocess``.

    ``clipscope`` becomes ``python -m clipscope`` of this interpreter, optional
    ``[--flag]`` groups are dropped, and ``replace`` swaps whole arguments
    (paths such as ``/tmp/quick``).
    """
    text = re.sub(r"\s*\[[^\]]*\]", "", command)
    words = [replace.get(w, w) for w in shlex.split(text)]
    if words[0] == "clipscope":
        return [sys.executable, "-m", "clipscope", *words[1:]]
    if words[0] == ".venv/bin/python":
        return [sys.executable, *words[1:]]
    return words


# -- command synopses: `clipscope CMD ARG [--opt VALUE] [--flag] ...` -------------------


@dataclass(frozen=True)
class Synopsis:
    page: str
    text: str
    command: str
    #: ``{option: value shown or None}``
    options: dict
    #: ``{option: (choice, ...)}`` for ``--opt a|b``
    choices: dict
    #: a table row summarises; a page's own synopsis (prose, heading or block) lists every option
    complete: bool
    #: a runnable example (``--opt VALUE`` outside brackets), not a synopsis: no defaults shown
    example: bool

    def __hash__(self):
        return hash((self.page, self.text))


_SYNOPSIS = re.compile(r"clipscope ([a-z0-9]+)( [^`]*--[^`]*)")


def synopses() -> list[Synopsis]:
    """Every ``clipscope CMD ... [--opt ...]`` in inline code, headings and code blocks."""
    found: list[Synopsis] = []
    for page in pages():
        text = page.read_text()
        candidates: list[tuple[str, bool]] = []
        for line in text.splitlines():
            table_row = line.lstrip().startswith("|")
            for span in re.findall(r"`([^`]+)`", line.replace("\\|", "\x00")):
                candidates.append((span.replace("\x00", "|"), not table_row))
        joined = "\n".join(code_lines(page))
        for line in joined.splitlines():
            if line.startswith("clipscope ") and "[--" in line:
                candidates.append((strip_comment(line), True))
        for raw, complete in candidates:
            match = _SYNOPSIS.fullmatch(raw.strip())
            if not match:
                continue
            options, choices = {}, {}
            words = raw.replace("[", " [ ").replace("]", " ] ").split()
            bracket, example = 0, False
            for i, word in enumerate(words):
                bracket += (word == "[") - (word == "]")
                if not word.startswith("--"):
                    continue
                value = words[i + 1] if i + 1 < len(words) else None
                if value is not None and (value.startswith("--") or value in "[]"):
                    value = None
                options[word] = value
                if value and "|" in value:
                    choices[word] = tuple(value.split("|"))
                example |= bool(bracket == 0 and value and not is_placeholder(value))
            found.append(
                Synopsis(
                    rel(page),
                    raw.strip(),
                    match.group(1),
                    options,
                    choices,
                    complete and "[--" in raw and not example,
                    example,
                )
            )
    return found


def is_placeholder(value: str) -> bool:
    """``DIR``, ``CONFIG.toml``, ``A``, ``B1,B2``: a name for the user's value, not a default."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_,]*(\.[a-z]+)?", value))
