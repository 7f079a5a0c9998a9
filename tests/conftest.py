"""Suite-wide settings: one torch thread per test process.

``make test`` runs two xdist workers on two cores; letting each also spawn
intra-op threads makes small ops many times slower through contention.
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread; put the count back after (a run may set another)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
