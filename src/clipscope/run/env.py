"""``env.json``: what a run ran on (versions, device, threads, determinism), and resume warnings.

The conventions that change a component gradient (data, BatchNorm and dropout
handling, hidden state, last batch) come from the engine
(:func:`clipscope.engine.conventions.gradient_conventions`) and are added by the
loop when it writes ``env.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["VERSION_KEYS", "environment", "environment_changes"]

#: Versions and the intra-op thread count: when one differs on resume, a bitwise-equal
#: result is not promised (a float reduction may be summed in another order).
VERSION_KEYS = ("torch", "cuda", "numpy", "python", "threads")


def environment(**extra: Any) -> dict[str, Any]:
    """Versions, device availability, threads and determinism flags, plus ``extra`` entries.

    ``threads`` is :func:`torch.get_num_threads` (intra-op: a float reduction's
    order, and so every number of a run, can change with it), ``interop_threads``
    :func:`torch.get_num_interop_threads`, ``cpus`` :func:`os.cpu_count`,
    ``omp_num_threads`` the ``OMP_NUM_THREADS`` variable (None when unset).

    >>> env = environment(seed=3)
    >>> env["seed"], env["threads"] >= 1, env["interop_threads"] >= 1
    (3, True, True)
    """
    import clipscope

    env = {
        "clipscope": clipscope.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),  # intra-op: reductions, hence numbers, depend on it
        "interop_threads": torch.get_num_interop_threads(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env.update(extra)
    return env


def environment_changes(env_file: str | Path) -> list[str]:
    """Sentences naming the versions (and thread count) that differ from ``env_file``'s.

    Empty when the file is missing or unreadable (nothing to compare with), and
    for keys the file does not record.
    """
    try:
        old = json.loads(Path(env_file).read_text())
    except (OSError, ValueError):
        return []
    now = environment()
    changed = [k for k in VERSION_KEYS if k in old and old.get(k) != now.get(k)]
    if not changed:
        return []
    return [
        "resuming with different "
        + ", ".join(f"{k} ({old.get(k)} -> {now.get(k)})" for k in changed)
        + "; bitwise equality with an uninterrupted run is not promised"
    ]
