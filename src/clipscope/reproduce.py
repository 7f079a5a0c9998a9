"""``clipscope reproduce``: the paper's Figure 1, extended, as one crash-safe study.

A *study* is a folder of ordinary run directories (one per task, method and
batch size, each written by :func:`clipscope.runner.train` and resumable on its
own), a batch-size cross-section per task at one fixed point, ``study.json``
naming them, and the HTML report built from those records.

Tasks:

* ``digits-cnn`` (embedded): a small CNN on scikit-learn's 8×8 digits,
  IGC-clip and SGD-clip at batch sizes 8, 16, 32, 64.
* ``text-lstm`` (embedded): a small LSTM language model on Python's own
  language reference text (``pydoc_data.topics``), IGC-clip in corpus order at
  4, 8, 16, 32 columns.
* ``cifar10-resnet18`` / ``ptb-awdlstm`` (paper scale, need ``--data-dir``):
  ResNet18 on CIFAR-10 and AWD-LSTM on PTB. A GPU is recommended.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipscope.atomic import atomic_write_text


@dataclass(frozen=True)
class TaskSpec:
    """One task of a study: a base config and the grid of runs over it."""

    name: str
    description: str
    base: dict[str, Any]
    batch_sizes: tuple[int, ...]
    methods: tuple[str, ...]
    cross_section: bool  # dyadic cross-section at the last point (needs per-sample losses)
    needs_data_dir: bool = False
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra config per method
    notes: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    "digits-cnn": TaskSpec(
        name="digits-cnn",
        description="small CNN on scikit-learn's 8x8 handwritten digits (embedded)",
        base=dict(
            task="classification",
            model="small-cnn",
            data="digits",
            n_samples=0,
            lr=0.2,
            eta=0.5,
            epochs=6,
            etas=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, math.inf),
        ),
        batch_sizes=(8, 16, 32, 64),
        methods=("igc", "sgd"),
        cross_section=True,
        # IGC runs also record ‖∇²f‖ and every ‖∇²f_i‖ (Lanczos) at epochs 0, 3, 6 for
        # `clipscope theory` and the report's smoothness figure.
        per_method={
            "igc": dict(
                smoothness_every=3,
                smoothness_components=False,
                smoothness_tol=1e-2,
                smoothness_max_iter=10,
            )
        },
        notes={
            "smoothness": "IGC runs: Lanczos ‖∇²f‖ at epochs 0, 3, 6 (tol 1e-2)",
            "data": "scikit-learn load_digits, first 1,536 images train, 261 held out",
            "augmentation": "none",
            "BatchNorm": "none in the model",
            "dropout": "none in the model",
        },
    ),
    "text-lstm": TaskSpec(
        name="text-lstm",
        description="small LSTM language model on Python's language reference text (embedded)",
        base=dict(
            task="language_model",
            model="small-lstm-lm",
            data="text",
            n_samples=30000,  # the first 30,000 training tokens keep the demo at minutes
            bptt=35,
            lr=20.0,
            eta=0.25,
            epochs=4,
            etas=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, math.inf),
        ),
        batch_sizes=(4, 8, 16, 32),
        methods=("igc",),
        cross_section=False,
        notes={
            "data": "pydoc_data.topics (ships with Python), word level, capped vocabulary",
            "hidden state": "carried across consecutive windows (detached); probes recompute it",
            "dropout": "off in probes",
            "cross-section": "not computed: column batchification differs per batch size",
        },
    ),
    "cifar10-resnet18": TaskSpec(
        name="cifar10-resnet18",
        description="ResNet18 (CIFAR variant) on CIFAR-10 (paper scale, needs --data-dir)",
        base=dict(
            task="classification",
            model="resnet18-cifar",
            data="cifar10",
            n_samples=0,
            lr=0.1,
            eta=1.0,
            epochs=30,
            momentum=0.0,
            etas=(0.1, 0.5, 1.0, 5.0, math.inf),
        ),
        batch_sizes=(64, 128, 256, 512),
        methods=("igc", "sgd"),
        cross_section=False,
        needs_data_dir=True,
        notes={
            "BatchNorm": "train mode in probes: each component uses its own batch statistics",
            "augmentation": "none (training and probes: a component is one fixed function)",
            "cross-section": "not computed: train-mode BatchNorm couples the samples of a batch",
        },
    ),
    "ptb-awdlstm": TaskSpec(
        name="ptb-awdlstm",
        description="AWD-LSTM on Penn Treebank (paper scale, needs --data-dir)",
        base=dict(
            task="language_model",
            model="awd-lstm",
            data="ptb",
            bptt=70,
            lr=30.0,
            eta=0.25,
            epochs=30,
            dropout="fixed",
            weight_decay=1.2e-6,
            ar_alpha=2.0,
            tar_beta=1.0,
            etas=(0.05, 0.1, 0.25, 0.5, 1.0, math.inf),
        ),
        batch_sizes=(20, 40, 80),
        methods=("igc",),
        cross_section=False,
        needs_data_dir=True,
        notes={
            "split": "fixed BPTT windows of 70 in corpus order (the paper's IGC setting)",
            "dropout": "fixed masks per component in probes",
            "regularization": (
                "AR/TAR as in the recipe (alpha = 2, beta = 1, weight decay 1.2e-6), part of "
                "every f_i in training and in the probes; held-out perplexity without them"
            ),
            "averaging": "NT-ASGD off: the study records the SGD iterates only",
        },
    ),
}

EMBEDDED = ("digits-cnn", "text-lstm")


def _run_name(method: str, batch_size: int) -> str:
    return f"{method}-B{batch_size}"


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def plan(
    tasks: Sequence[str],
    *,
    epochs: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> list[tuple[TaskSpec, str, int, dict[str, Any]]]:
    """Resolve the grid of runs ``(task, method, batch size, config dict)``, validating first.

    Every config is parsed by :func:`clipscope.config.parse_config` here, so a bad
    value stops the study before any run starts.
    """
    from clipscope.config import parse_config

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {sorted(TASKS)}")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0
    ):
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if batch_sizes is not None and (
        not batch_sizes
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes)
    ):
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    grid = []
    for name in tasks:
        spec = TASKS[name]
        if spec.needs_data_dir and not data_dir:
            raise ValueError(f"task {name!r} reads a dataset: pass --data-dir DIR")
        for method in spec.methods:
            for b in batch_sizes or spec.batch_sizes:
                raw = dict(spec.base, **spec.per_method.get(method, {}))
                raw.update(method=method, batch_size=b, device=device, progress=progress)
                if epochs is not None:
                    raw["epochs"] = epochs
                if data_dir:
                    raw["data_dir"] = str(data_dir)
                raw["etas"] = list(raw.get("etas", ()))
                parse_config(raw)
                grid.append((spec, method, b, raw))
    return grid


def _cross_section(spec: TaskSpec, run_dir: Path, config_path: Path) -> dict[str, Any]:
    """Dyadic probe at the final point of ``run_dir`` over batch sizes b, 2b, 4b, …."""
    from clipscope.atomic import latest_checkpoint
    from clipscope.config import load_config
    from clipscope.engine import probe
    from clipscope.runner import build_task

    cfg = load_config(config_path)
    model, loss_fn, comps, _ = build_task(cfg)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is not None:
        model.load_state_dict(found[1]["model"])
    n = sum(comps.sizes)
    sizes, b = [], cfg.batch_size
    while b <= n // 2:
        sizes.append(b)
        b *= 2
    result = probe(model, loss_fn, comps, route="dyadic", batch_sizes=sizes, etas=(cfg.eta,))
    table = result.noise_table()
    return {
        "point": str(run_dir.name),
        "eta": cfg.eta if math.isfinite(cfg.eta) else None,
        "batch_sizes": result.batch_sizes,
        "c1": [float(result[s].stats.c1) for s in result.batch_sizes],
        "c2": [float(result[s].stats.c2) for s in result.batch_sizes],
        "rho": [float(result[s].stats.ratio(cfg.eta)) for s in result.batch_sizes],
        "B_noise": table[0]["B_noise"],
        "predicted_cos": [row["predicted_cos"] for row in table],
        "heuristic": "(1 + B_noise/B)^(-1/2), B_noise of the smallest batch size",
    }


def reproduce(
    tasks: Sequence[str] = EMBEDDED,
    out: str | Path = "clipscope-out/reproduce",
    *,
    epochs: int | None = None,
    batch_sizes: Sequence[int] | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run the study and build its report; return the report's path.

    Each run is an ordinary resumable run directory; with ``resume`` finished runs
    are kept and unfinished ones continue from their last checkpoint. Without it an
    existing non-empty ``out`` is refused.
    """
    from clipscope.config import dump_config, parse_config
    from clipscope.report import build_report
    from clipscope.runner import train

    out = Path(out)
    grid = plan(
        tasks,
        epochs=epochs,
        batch_sizes=batch_sizes,
        data_dir=data_dir,
        device=device,
        progress=progress,
    )
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(
            f"output directory {out} exists and is not empty; use --resume or another --out"
        )
    study: dict[str, Any] = {"tasks": {}}
    for name in tasks:
        spec = TASKS[name]
        study["tasks"][name] = {
            "description": spec.description,
            "runs": [],
            "notes": dict(spec.notes),
        }

    def save_study() -> None:
        atomic_write_text(out / "study.json", json.dumps(study, indent=2) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    failures = []
    for k, (spec, method, b, raw) in enumerate(grid, 1):
        rel = Path("runs") / spec.name / _run_name(method, b)
        run_dir = out / rel
        config_path = out / "configs" / spec.name / f"{_run_name(method, b)}.toml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, dump_config(parse_config(raw)))
        entry = {
            "method": method,
            "batch_size": b,
            "dir": str(rel),
            "config": str(config_path.relative_to(out)),
        }
        echo(f"[{k}/{len(grid)}] {spec.name}: {method.upper()}-clip, batch size {b} -> {run_dir}")
        if _status(run_dir) == "completed":
            echo("  already completed; kept")
            code = 0
        else:
            code = train(config_path, run_dir, resume=run_dir.exists())
        if code != 0:
            failures.append(f"{spec.name} {_run_name(method, b)} (exit {code})")
            entry["exit_code"] = code
        if (run_dir / "epochs.csv").is_file():
            study["tasks"][spec.name]["runs"].append(entry)
        save_study()
    for name in tasks:
        spec = TASKS[name]
        runs = [
            e for e in study["tasks"][name]["runs"] if e["method"] == "igc" and "exit_code" not in e
        ]
        if spec.cross_section and runs:
            first = min(runs, key=lambda e: e["batch_size"])
            echo(f"{name}: batch-size cross-section at the final point of {first['dir']}")
            cross = _cross_section(spec, out / first["dir"], out / first["config"])
            rel = Path("cross_section") / f"{name}.json"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / rel, json.dumps(cross, indent=2) + "\n")
            study["tasks"][name]["cross_section"] = str(rel)
            save_study()
    report = build_report(out)
    if failures:
        echo("runs that stopped early: " + "; ".join(failures))
    return report
