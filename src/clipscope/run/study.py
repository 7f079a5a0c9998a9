"""A study folder: run directories named by ``study.json``, plus cross-sections.

Written by ``clipscope reproduce`` (:func:`write_study`), read by the report
(:func:`load_study`)::

    study.json                  {"tasks": {name: {"description", "notes", "runs": [...],
                                    "cross_section": "cross_section/NAME.json",
                                    "per_sample": "cross_section/NAME-per-sample.json"}}}
    runs/TASK/METHOD-BB/        ordinary run directories (:mod:`clipscope.run.directory`)
    configs/TASK/METHOD-BB.toml the config of each run
    cross_section/TASK.json     the batch-size cross-section at one point
    cross_section/TASK-per-sample.json
                                batch-size-1 components at one point: ``norms``,
                                ``dots``, ``grad_norm`` (and ``point``, ``epoch``,
                                ``sample``, ``route``, ``m``)
    findings.json               the answers, per task (:mod:`clipscope.report.findings`)

Each run entry is ``{"method", "batch_size", "dir", "config"}`` (relative
paths), plus ``"exit_code"`` when the run stopped early, ``"theorem": true``
for a run that records what Theorem 3.1 / 3.2 needs and ``"optimizer"`` for a
run with another optimizer than SGD (the AdamW-clip run). Each task also records
``"threads"``: the torch thread counts its runs and cross-sections used
(:func:`clipscope.reproduce.study_threads`; each run's ``env.json`` has its own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipscope.atomic import atomic_write_text
from clipscope.run.directory import RunRecord, load_run

__all__ = ["STUDY_FILE", "TaskRecord", "load_study", "write_study"]

STUDY_FILE = "study.json"


def write_study(path: str | Path, study: dict[str, Any]) -> None:
    """Write ``path/study.json`` atomically."""
    atomic_write_text(Path(path) / STUDY_FILE, json.dumps(study, indent=2) + "\n")


@dataclass
class TaskRecord:
    """The runs of one task in a study, its cross-section over batch sizes, its per-sample one."""

    name: str
    runs: list[tuple[dict, RunRecord]]
    cross_section: dict | None = None
    notes: dict = field(default_factory=dict)
    per_sample: dict | None = None
    kind: str = "study"  # "study": a task of study.json; "run": one run directory alone
    threads: dict | None = None  # study.json's torch thread counts of the task


def load_study(path: str | Path) -> list[TaskRecord]:
    """Load a study directory (``study.json``) or a single run directory as one task.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist or is neither a study nor a run directory.
    ValueError
        A run directory without ``config.toml`` or rows, a ``study.json`` that is
        not JSON (:func:`clipscope.run.directory.load_run`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}")
    study_file = path / STUDY_FILE
    if not study_file.is_file():
        run = load_run(path)
        entry = {"method": run.method, "batch_size": run.batch_size, "dir": "."}
        return [TaskRecord(name=path.name, runs=[(entry, run)], kind="run")]
    try:
        study = json.loads(study_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{study_file}: not a JSON file ({exc})") from None
    tasks = []
    for name, task in study.get("tasks", {}).items():
        runs = [(entry, load_run(path / entry["dir"])) for entry in task.get("runs", [])]
        tasks.append(
            TaskRecord(
                name=name,
                runs=runs,
                cross_section=_section(path, task.get("cross_section")),
                notes=task.get("notes", {}),
                per_sample=_section(path, task.get("per_sample")),
                threads=task.get("threads"),
            )
        )
    return tasks


def _section(path: Path, rel: str | None) -> dict | None:
    """Return the JSON file ``path/rel`` when the study names one and it exists, else None."""
    if not rel or not (path / rel).is_file():
        return None
    try:
        return json.loads((path / rel).read_text())
    except ValueError as exc:
        raise ValueError(f"{path / rel}: not a JSON file ({exc})") from None
