"""Read stored run records: the only input of figures and reports.

A *run directory* (written by :mod:`clipscope.runner`) holds ``config.toml``,
``epochs.csv`` (one row per probe) and ``components/epoch_XXXX.npz`` (per-component
``norms``, ``dots``, ``losses``, ``grad_norm``). A *study directory* (written by
``clipscope reproduce``) holds ``study.json`` naming its runs and cross-sections.
Nothing here computes a gradient.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.npz$")


def _to_float(text: str) -> float:
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return 1.0 if lowered == "true" else 0.0
    try:
        return float(lowered)
    except ValueError:
        return math.nan


def read_rows(path: Path) -> dict[str, np.ndarray]:
    """Read a CSV of numbers into ``{column: float64 array}``.

    Booleans become 1/0; empty or non-numeric cells become NaN, so a record with
    gaps still plots (with gaps).
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    return {key: np.array([_to_float(r.get(key) or "") for r in rows]) for key in rows[0]}


@dataclass
class RunRecord:
    """Everything a figure may read about one run, loaded from disk."""

    path: Path
    config: dict
    rows: dict[str, np.ndarray]
    component_files: dict[int, Path] = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        """Return a column, or NaNs of the right length when the record lacks it."""
        if name in self.rows:
            return self.rows[name]
        return np.full(self.n_rows, math.nan)

    @property
    def n_rows(self) -> int:
        """Number of stored probe rows."""
        return len(next(iter(self.rows.values()))) if self.rows else 0

    def setting(self, *keys: str, default=None):
        """Look a value up in the resolved config, trying ``keys`` in order (dotted paths)."""
        for key in keys:
            node = self.config
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    node = None
                    break
                node = node[part]
            if node is not None:
                return node
        return default

    @property
    def eta(self) -> float:
        """The run's clipping threshold (``inf`` for an unclipped run)."""
        value = self.setting("eta", "method.eta", "train.eta", default=math.inf)
        return float(value)

    @property
    def batch_size(self) -> int | None:
        """The run's component batch size, if recorded."""
        value = self.setting("batch_size", "data.batch_size", "components.batch_size")
        return int(value) if value is not None else None

    @property
    def method(self) -> str:
        """The run's method name (``igc``, ``sgd``, ...)."""
        return str(self.setting("method", "train.method", "method.name", default="?"))

    def components(self, epoch: int | None = None) -> dict[str, np.ndarray] | None:
        """Per-component arrays of one epoch (the last stored one by default), or None."""
        if not self.component_files:
            return None
        key = max(self.component_files) if epoch is None else epoch
        path = self.component_files.get(key)
        if path is None:
            return None
        with np.load(path) as data:
            return {name: np.asarray(data[name]) for name in data.files}


def load_run(path: str | Path) -> RunRecord:
    """Load a run directory's stored records (config, rows, component arrays)."""
    path = Path(path)
    rows_path = path / "epochs.csv"
    if not rows_path.is_file():
        raise FileNotFoundError(f"{path} is not a clipscope run directory (no epochs.csv)")
    config: dict = {}
    if (path / "config.toml").is_file():
        with open(path / "config.toml", "rb") as handle:
            config = tomllib.load(handle)
    files: dict[int, Path] = {}
    comp_dir = path / "components"
    if comp_dir.is_dir():
        for item in comp_dir.iterdir():
            match = _EPOCH_FILE.search(item.name)
            if match:
                files[int(match.group(1))] = item
    return RunRecord(path=path, config=config, rows=read_rows(rows_path), component_files=files)


@dataclass
class TaskRecord:
    """The runs of one task in a study, and its cross-section over batch sizes."""

    name: str
    runs: list[tuple[dict, RunRecord]]
    cross_section: dict | None = None
    notes: dict = field(default_factory=dict)


def load_study(path: str | Path) -> list[TaskRecord]:
    """Load a study directory (``study.json``) or a single run directory as one task."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}")
    study_file = path / "study.json"
    if not study_file.is_file():
        run = load_run(path)
        entry = {"method": run.method, "batch_size": run.batch_size, "dir": "."}
        return [TaskRecord(name=path.name, runs=[(entry, run)])]
    with open(study_file) as handle:
        study = json.load(handle)
    tasks = []
    for name, task in study.get("tasks", {}).items():
        runs = [(entry, load_run(path / entry["dir"])) for entry in task.get("runs", [])]
        cross = None
        if task.get("cross_section") and (path / task["cross_section"]).is_file():
            with open(path / task["cross_section"]) as handle:
                cross = json.load(handle)
        tasks.append(
            TaskRecord(name=name, runs=runs, cross_section=cross, notes=task.get("notes", {}))
        )
    return tasks


def finite(values: Iterable[float]) -> np.ndarray:
    """Return the finite entries of ``values`` as a float64 array."""
    array = np.asarray(list(values), dtype=np.float64)
    return array[np.isfinite(array)]
