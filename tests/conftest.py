"""Suite-wide settings: one torch thread per test process.

``make test`` runs two xdist workers on two cores; letting each also spawn
intra-op threads makes small ops many times slower through contention.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
