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

#: Versions that, when they differ on resume, void the promise of a bitwise-equal result.
VERSION_KEYS = ("torch", "cuda", "numpy", "python")


def environment(**extra: Any) -> dict[str, Any]:
    """Versions, device availability, threads and determinism flags, plus ``extra`` entries.

    >>> sorted(environment(seed=3))[:3]
    ['clipscope', 'cuda', 'cuda_available']
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
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env.update(extra)
    return env


def environment_changes(env_file: str | Path) -> list[str]:
    """Sentences naming the versions that differ from those recorded in ``env_file``.

    Empty when the file is missing or unreadable (nothing to compare with).
    """
    try:
        old = json.loads(Path(env_file).read_text())
    except (OSError, ValueError):
        return []
    now = environment()
    changed = [k for k in VERSION_KEYS if old.get(k) != now.get(k)]
    if not changed:
        return []
    return [
        "resuming with different "
        + ", ".join(f"{k} ({old.get(k)} -> {now.get(k)})" for k in changed)
        + "; bitwise equality with an uninterrupted run is not promised"
    ]
