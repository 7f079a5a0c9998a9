"""clipscope: gradient clipping in incremental gradient methods.

The public names are imported lazily (PEP 562) so that ``import clipscope``
stays cheap and the pure statistics can be used without loading torch models.

>>> import clipscope
>>> sorted(clipscope.__all__)[:2]
['ComponentStats', 'Components']
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "clip": "clipscope.clipping",
    "clip_rows": "clipscope.clipping",
    "clip_grads_": "clipscope.clipping",
    "ComponentStats": "clipscope.math.stats",
    "DirectionStats": "clipscope.math.stats",
    "EtaProfile": "clipscope.math.stats",
    "Components": "clipscope.components",
    "SequentialComponents": "clipscope.components",
    "probe": "clipscope.engine",
    "ProbeResult": "clipscope.engine",
    "fit": "clipscope.loop",
    "Monitor": "clipscope.loop",
    "FitConfig": "clipscope.config",
}

__all__ = sorted([*_EXPORTS, "theory", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "theory":
        return importlib.import_module("clipscope.math.theory")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
