"""Run the code blocks of the documentation pages as tests, with Sybil.

Every fenced ```` ```python ```` block of a page in :data:`PAGES` is one test; the
blocks of a page run in order, each in a fresh temporary working directory
(``doc_dir``), so what they write (run directories, event files) lands there.
A block is skipped only with an explicit ``<!-- skip: next -->`` comment in front
of it (Sybil's skip syntax), which a reader of the rendered page does not see:
use it for blocks that need what a test machine lacks (a GPU, a download),
and say so in the page.

``make test`` runs pytest with two xdist workers, which may run the blocks of one
page in different processes: keep every block self-contained (its own imports
and data), as a reader copying one block would need anyway.

To cover another page, add its file name to :data:`PAGES`.
"""

from __future__ import annotations

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

#: The pages whose Python blocks are tests (file names in this folder).
PAGES = ["integrations.md"]


@pytest.fixture
def doc_dir(tmp_path, monkeypatch):
    """Run a block in its own empty working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=PAGES,
    fixtures=["doc_dir"],
).pytest()
