"""Run the Python blocks of ``README.md`` and every ``docs/*.md`` page as tests, with Sybil.

Every fenced ```` ```python ```` block of ``README.md`` and of every page in
``docs/`` (a glob: a new page is covered the moment it exists) is one test. The
blocks of a page run in order, each in a fresh temporary working directory
(``doc_dir``), so what they write (run directories, event files) lands there.

``make test`` runs pytest with two xdist workers, which may run the blocks of one
page in different processes: every block must be self-contained (its own imports
and data), as a reader pasting one block needs anyway, and small (a few seconds).

A block that cannot run on a CPU test machine (a GPU, the user's own data such as
CIFAR-10 or PTB folders, several processes under ``torchrun``) is the exception: it
gets Sybil's skip comment with the reason, ``<!-- skip: next "needs a GPU" -->``,
which a rendered page hides, **and** a visible sentence next to it saying why it is
not run by the tests. ``tests/test_docs_pages.py`` checks both.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

#: Pages whose Python blocks are tests: globs relative to the repository root.
PAGES = ("README.md", "docs/*.md")
ROOT = Path(__file__).resolve().parent


@functools.cache
def pages() -> frozenset[Path]:
    """The files :data:`PAGES` names (``docs/*.md``: the pages directly in ``docs/``)."""
    return frozenset(p.resolve() for pattern in PAGES for p in ROOT.glob(pattern))


@pytest.fixture
def doc_dir(tmp_path, monkeypatch):
    """Run a block in its own empty working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


_sybil = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["*.md"],
    fixtures=["doc_dir"],
).pytest()


def pytest_collect_file(file_path: Path, parent):
    """Hand the pages of :data:`PAGES` to Sybil (its own patterns match from the right)."""
    if file_path.resolve() in pages():
        return _sybil(file_path, parent)
    return None
