"""The documentation against the code: synopses and option tables against ``--help``.

Skipped code blocks must be marked visibly.

The Python blocks themselves run through Sybil (the root ``conftest.py``); the shell
commands in ``tests/test_docs_commands.py``.
"""

from __future__ import annotations

import argparse
import re

import pytest

from clipscope.cli import build_parser, command_names
from docs_pages import REPO, is_placeholder, pages, rel, synopses

SYNOPSES = synopses()


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def test_the_pages_hold_synopses_to_check():
    assert len(SYNOPSES) >= 10 and any(not s.complete for s in SYNOPSES)


@pytest.mark.parametrize("synopsis", SYNOPSES, ids=lambda s: f"{s.page}:{s.command}")
def test_synopsis_matches_the_parser(synopsis):
    """Every option shown exists in ``--help``; shown choices and defaults are the parser's.

    A page's own synopsis (not a summary row of a table) lists every option.
    """
    assert synopsis.command in command_names(), synopsis.text
    parser = subparser(synopsis.command)
    help_text = parser.format_help()
    actions = options_of(parser)
    for option, value in synopsis.options.items():
        assert option in actions and option in help_text, (synopsis.page, synopsis.text, option)
        action = actions[option]
        if option in synopsis.choices:
            assert set(synopsis.choices[option]) == set(action.choices or ()), synopsis.text
        elif value and not synopsis.example and not is_placeholder(value):
            # a concrete value in a synopsis states the default
            shown = str(action.default) if action.default is not None else None
            same = shown is not None and (shown == value or _number(shown) == _number(value))
            assert same or f"default {value}" in " ".join(help_text.split()), (
                synopsis.page, synopsis.text, option, action.default,
            )  # fmt: skip
    if synopsis.complete:
        assert set(synopsis.options) == set(actions), (synopsis.page, synopsis.text)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def test_the_readme_table_lists_every_command():
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `clipscope ([a-z0-9]+)", text, flags=re.M)
    assert sorted(rows) == command_names()
    for name in command_names():  # and each has its --help
        assert subparser(name).format_help()


# -- skipped blocks --------------------------------------------------------------------

SKIP = re.compile(r"<!--\s*skip:\s*(\w+)(.*?)-->")
VISIBLE = re.compile(r"\*Not run by the tests: ([^*]+)\.\*")


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_a_skipped_block_says_so_on_the_rendered_page(page):
    """A hidden skip comment comes right after a visible sentence with the same reason.

    ``<!-- skip: next "REASON" -->`` (hidden when rendered) follows a visible
    ``*Not run by the tests: REASON.*`` line, and no block is skipped another way.
    """
    lines = page.read_text().splitlines()
    for number, line in enumerate(lines):
        match = SKIP.search(line)
        if not match:
            continue
        where = f"{rel(page)}:{number + 1}"
        assert match.group(1) == "next", f"{where}: only 'skip: next' is allowed"
        reason = match.group(2).strip()
        assert re.fullmatch(r'"[^"]+"', reason), f'{where}: give a reason: skip: next "..."'
        above = [x for x in lines[:number] if x.strip()][-1]
        visible = VISIBLE.search(above)
        assert visible, f"{where}: the line above must say *Not run by the tests: REASON.*"
        assert visible.group(1) == reason.strip('"'), where
        assert lines[number + 1].startswith("```python"), f"{where}: a Python block follows"
