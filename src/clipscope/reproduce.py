"""``clipscope reproduce``: the paper's Figure 1, extended, as one crash-safe study.

A *study* is a folder of ordinary run directories (one per task, method and
batch size, each written by :func:`clipscope.runner.train` and resumable on its
own), a batch-size cross-section per task at one fixed point, ``study.json``
naming them, and the HTML report built from those records.

Tasks:

* ``digits-cnn`` (embedded): a small CNN on scikit-learn's 8×8 digits,
  IGC-clip and SGD-clip at batch sizes 8, 16, 32, 64, and one AdamW-clip run.
* ``text-lstm`` (embedded): a small LSTM language model on Python's own
  language reference text (``pydoc_data.topics``), IGC-clip in corpus order at
  4, 8, 16, 32 columns, and one AdamW-clip run.
* ``cifar10-resnet18`` / ``ptb-awdlstm`` (paper scale, need ``--data-dir``):
  ResNet18 on CIFAR-10 and AWD-LSTM on PTB. A GPU is recommended.
* ``ptb-awdlstm-small`` (needs ``--data-dir``): AWD-LSTM at a quarter of its
  width on two word-level files named in its config (``ptb.valid.txt``
  trained on, ``ptb.test.txt`` held out), IGC-clip at 4 batch sizes: about
  half an hour on 2 CPU cores (``docs/results.md``).
* ``tinyshakespeare-gpt`` (needs ``--data-dir``, the folder of
  tinyshakespeare's ``input.txt``): a small GPT-2-style model
  (:class:`clipscope.models.GPTLM`, 108,352 parameters) on the
  character-level text (first 90 % trained on, last 10 % held out), IGC-clip
  under AdamW at 3 batch sizes, ρ_P recorded beside ρ at every probe.
* ``ptb-thresholds`` (needs ``--data-dir``; issue 23): *arms* instead of a
  grid -- unclipped, the config's fixed η, the advised η, AutoClip and
  descent-safe clipping, each at every seed of the task (``[study] arms`` and
  ``seeds``; the ``advised`` arm takes ``eta_max`` of
  :func:`clipscope.math.advice.advise` over the same seed's ``unclipped`` run,
  which must come before it). Any config with such a table is a task of this
  kind (another task name, another model).

Besides the runs: a dyadic cross-section and a batch-size-1 cross-section at
the final point of the smallest-batch IGC run where the task asks for them,
the theorem runs' smoothness records (the largest batch size), and
``findings.json`` with the report (:mod:`clipscope.report.findings`).

The tasks and their settings are read from the configs shipped in
``clipscope/configs/`` (``configs/`` in the repository): each file is the
config of one run of its task, and its ``[study]`` table says which grid of
runs the study makes of it. Nothing here repeats a setting.

Everything is checked before anything is written: every run's config, the
device, the threads, and each task's data (loaded once).

Under ``torchrun`` every rank runs the study: each run and the cross-section
split over the ranks, rank 0 alone writes (``--out`` must be one directory
that every rank reads, e.g. on one machine), ``docs/distributed.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from clipscope.atomic import atomic_write_text
from clipscope.config import TrainConfig, check_resources, dump_config, parse_config
from clipscope.engine.distributed import init_from_env, is_writer, on_writer
from clipscope.run.study import write_study

CONFIGS = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a study: a base config (a file in ``configs/``) and the grid of runs over it.

    Attributes
    ----------
    name, description : str
        From the file's ``[study]`` table.
    base : dict
        The file's training keys (a :class:`~clipscope.config.TrainConfig`).
    batch_sizes, methods : tuple
        The grid.
    cross_section : bool
        Whether a dyadic cross-section is taken at the last point of the
        smallest IGC run (needs per-sample losses, no batch coupling).
    per_sample : bool
        Whether a batch-size-1 cross-section is taken at the last point of the
        smallest IGC run (per-sample components: one image, or for a language
        model one column of ``bptt`` tokens): the positive-cosine share.
    theorem : dict
        ``{method: config keys}`` for the theorem runs: the run of that method
        at the grid's largest batch size (the fewest components) gets these
        keys (Lanczos ‖∇²f‖, per-component constants) so the report can check
        Theorem 3.1 / 3.2 on it.
    needs_data_dir : bool
        Whether its dataset is read from files (``--data-dir``).
    per_method : dict
        Extra config keys per method.
    notes : dict
        Conventions stated in the report.
    config_file : Path
        Where it comes from.
    extra : tuple of dict
        Runs besides the grid (``[[study.extra]]``), each the config keys it
        changes (e.g. ``optimizer = "adamw"``, ``lr``, ``eta``, ``batch_size``):
        the default study's AdamW-clip run. Named ``METHOD-OPTIMIZER-BB``; with
        ``--batch-sizes`` it runs at the smallest of them.
    """

    name: str
    description: str
    base: dict[str, Any]
    batch_sizes: tuple[int, ...]
    methods: tuple[str, ...]
    cross_section: bool
    per_sample: bool = False
    theorem: dict[str, dict[str, Any]] = field(default_factory=dict)
    needs_data_dir: bool = False
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    config_file: Path | None = None
    extra: tuple[dict[str, Any], ...] = ()
    arms: tuple[dict[str, Any], ...] = ()
    seeds: tuple[int, ...] = ()
    advise_target: float = 0.9


def load_tasks(directory: str | Path = CONFIGS) -> dict[str, TaskSpec]:
    """Read the study tasks: every ``*.toml`` in ``directory`` with a ``[study]`` table.

    The file's other keys are the task's base config (validated when a study
    is planned); ``[study]`` holds ``name``, ``description``, ``batch_sizes``,
    ``methods``, ``cross_section``, and optionally ``per_sample``,
    ``per_method.<method>`` and ``theorem.<method>`` (config keys), ``notes``
    and ``extra`` (an array of tables: one run each, the config keys it changes).
    """
    from clipscope.data import FILE_DATASETS

    tasks: dict[str, TaskSpec] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        study = raw.pop("study", None)
        if study is None:
            continue
        base = dict(raw)
        tasks[study["name"]] = TaskSpec(
            name=study["name"],
            description=study["description"],
            base=base,
            batch_sizes=tuple(study["batch_sizes"]),
            methods=tuple(study["methods"]),
            cross_section=bool(study["cross_section"]),
            per_sample=bool(study.get("per_sample", False)),
            theorem={k: dict(v) for k, v in study.get("theorem", {}).items()},
            needs_data_dir=base.get("data") in FILE_DATASETS,
            per_method={k: dict(v) for k, v in study.get("per_method", {}).items()},
            notes={str(k): str(v) for k, v in study.get("notes", {}).items()},
            config_file=path,
            extra=tuple(dict(run) for run in study.get("extra", [])),
            arms=tuple(dict(a) for a in study.get("arms", ())),
            seeds=tuple(study.get("seeds", ())),
            advise_target=float(study.get("advise_target", 0.9)),
        )
    # the embedded tasks first (the default study), then the paper-scale ones
    return dict(sorted(tasks.items(), key=lambda kv: (kv[1].needs_data_dir, kv[0])))


TASKS: dict[str, TaskSpec] = load_tasks()
EMBEDDED = tuple(name for name, spec in TASKS.items() if not spec.needs_data_dir)


def _arm_of(spec: TaskSpec, label: str) -> dict[str, Any]:
    return next(a for a in spec.arms if label.startswith(f"{a['name']}-seed"))


def _run_name(method: str, batch_size: int, optimizer: str = "sgd") -> str:
    """``igc-B16``; another optimizer than SGD is named: ``igc-adamw-B16`` (as the report does)."""
    if optimizer != "sgd":
        return f"{method}-{optimizer}-B{batch_size}"
    return f"{method}-B{batch_size}"


def _quiet(text: str) -> None:
    pass


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


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
    check_data: bool = True,
    threads: int | None = None,
) -> list[tuple[TaskSpec, str, int, TrainConfig]]:
    """Resolve the grid of runs ``(task, method, batch size, config)``, checking everything first.

    Every run's config is validated (:func:`~clipscope.config.parse_config`), the
    machine checked (:func:`~clipscope.config.check_resources`: the device, the
    threads, memory) and, with ``check_data``, each task's data loaded once
    (:func:`clipscope.data.load_splits`: missing or malformed files), so a bad
    value stops the study before anything is written. ``threads`` (``--threads``)
    replaces every run's ``threads`` (0: torch's default, every core); None keeps
    the configs' value (1 in the shipped configs, ``docs/benchmarks.md``).

    Raises
    ------
    ConfigError
        A bad value (naming the key), a device this machine does not have.
    ValueError
        An unknown task, bad epochs or batch sizes, a task without ``--data-dir``,
        data that does not load.
    FileNotFoundError
        Data files that do not exist.
    """
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
        if spec.arms:  # issue 23: arms × seeds, η and its rule's keys per arm
            common = {"device": device, "progress": progress}
            common |= {} if threads is None else {"threads": threads}
            common |= {} if epochs is None else {"epochs": epochs}
            common |= {"data_dir": str(data_dir)} if data_dir else {}
            for arm, seed, raw in arm_configs(spec, common):
                cfg = parse_config(raw)
                check_resources(cfg)
                grid.append((spec, arm_label(arm, seed), cfg.batch_size, cfg))
            continue
        sizes = tuple(batch_sizes or spec.batch_sizes)
        runs = []
        for method in spec.methods:
            for b in sizes:
                raw = dict(spec.base, **spec.per_method.get(method, {}))
                if b == max(sizes):
                    raw.update(spec.theorem.get(method, {}))
                runs.append((method, b, raw))
        for extra in spec.extra:  # e.g. the AdamW-clip run: its own keys, one batch size
            b = min(batch_sizes) if batch_sizes else int(extra.get("batch_size", min(sizes)))
            raw = dict(spec.base, **extra)
            runs.append((str(raw.get("method", "igc")), b, raw))
        for method, b, raw in runs:
            raw.update(method=method, batch_size=b, device=device, progress=progress)
            if threads is not None:
                raw["threads"] = threads
            if epochs is not None:
                raw["epochs"] = epochs
            if data_dir:
                raw["data_dir"] = str(data_dir)
            cfg = parse_config(raw)
            check_resources(cfg)
            grid.append((spec, method, b, cfg))
    if check_data:
        from clipscope.data import load_splits

        wanted = [
            (c.data, c.data_dir, c.train_file, c.heldout_file)
            for *_, c in grid
            if c.task != "least_squares"
        ]
        for data, where, train, held in dict.fromkeys(wanted):  # each dataset once, in order
            load_splits(data, where, train_file=train, heldout_file=held)
    return grid


def arm_label(arm: str, seed: int) -> str:
    """Return the run name of one arm at one seed: ``autoclip-10-seed0``."""
    return f"{arm}-seed{seed}"


def arm_configs(spec: TaskSpec, common: dict[str, Any]):
    """Yield ``(arm name, seed, raw config)`` of an arms task, in order.

    Each arm is a table with ``name`` and the config keys it changes (``eta`` and
    its rule's keys); ``eta = "advised"`` stands for the advice over the same
    seed's ``unclipped`` arm, resolved when that run is done (here the base η
    stands in, so the rest of the config is validated now).

    Raises
    ------
    ValueError
        An arm without a name, two arms of one name, an ``advised`` arm without
        an earlier ``unclipped`` arm, an arms task without seeds.
    """
    if not spec.seeds:
        raise ValueError(f"task {spec.name!r}: an arms study needs [study] seeds")
    names = [a.get("name") for a in spec.arms]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"task {spec.name!r}: every arm needs a distinct name, got {names}")
    for k, arm in enumerate(spec.arms):
        if arm.get("eta") == "advised" and "unclipped" not in names[:k]:
            raise ValueError(
                f"task {spec.name!r}: arm {arm['name']!r} is advised from the 'unclipped' arm, "
                "which must come before it"
            )
    for arm in spec.arms:
        keys = {k: v for k, v in arm.items() if k != "name"}
        if keys.get("eta") == "advised":
            keys["eta"] = spec.base.get("eta", math.inf)
        for seed in spec.seeds:
            yield arm["name"], seed, {**spec.base, **keys, "seed": seed, **common}


def advised_eta(run_dir: Path, target: float) -> float:
    """``eta_max`` of :func:`~clipscope.math.advice.advise` over every probe of a run.

    The threshold from which on every η keeps ρ ≥ ``target`` at every probe of
    that run (exact, from its component files).

    Raises
    ------
    ValueError
        The run has no component files, or ρ is undefined at every probe.
    """
    from clipscope.math.advice import advise
    from clipscope.run.directory import load_run

    record = load_run(run_dir)
    points = []
    for k in sorted(record.component_files):
        a = record.components(k)
        points.append((a["norms"], a["dots"], float(a["grad_norm"])))
    value = float(advise(points, target).eta_max)
    if not value > 0:
        raise ValueError(f"no advice from {run_dir}: ρ is undefined at its probes")
    return value


def study_threads(configs: Sequence[TrainConfig]) -> dict[str, Any]:
    """Return the torch thread counts a task's runs use, for ``study.json``.

    ``setting``: the configs' ``threads`` (one value, or the list when they
    differ; 0 = torch's default); ``intra_op``: what that gives here
    (:func:`torch.get_num_threads` under it); ``interop``:
    :func:`torch.get_num_interop_threads`; ``cpus``: :func:`os.cpu_count`.
    Training's float reductions, and so every recorded number, can change
    with ``intra_op`` (``docs/results.md``); each run's ``env.json`` records
    the count it ran with.
    """
    import os

    import torch

    settings = sorted({c.threads for c in configs})
    default = torch.get_num_threads()
    resolved = sorted({s or default for s in settings})
    return {
        "setting": settings[0] if len(settings) == 1 else settings,
        "intra_op": resolved[0] if len(resolved) == 1 else resolved,
        "interop": torch.get_num_interop_threads(),
        "cpus": os.cpu_count(),
    }


def _torch_settings(config_path: Path):
    """Set a run config's threads and determinism flag for a probe outside ``train``."""
    from clipscope.config import load_config
    from clipscope.train import torch_settings

    return torch_settings(load_config(config_path))


def _cross_section(spec: TaskSpec, run_dir: Path, config_path: Path) -> dict[str, Any]:
    """Dyadic probe at the final point of ``run_dir`` over batch sizes b, 2b, 4b, …."""
    from clipscope.atomic import latest_checkpoint
    from clipscope.config import load_config
    from clipscope.engine import probe
    from clipscope.tasks import build_task

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


def _per_sample(run_dir: Path, config_path: Path) -> dict[str, Any]:
    """Batch-size-1 components at the final point of ``run_dir``: their norms and dots with ∇f.

    Classification: every training sample is a component (the probe's
    per-sample route). Language models: one column of ``bptt`` tokens per
    component, in corpus order, the recurrent state carried from window to
    window (detached), as for any other batch size. The arrays are stored so
    the report re-derives every statistic (the share of positive cosines).
    """
    from dataclasses import replace

    from clipscope.atomic import latest_checkpoint
    from clipscope.config import load_config
    from clipscope.engine import probe
    from clipscope.tasks import build_task

    cfg = load_config(config_path)
    language = cfg.task == "language_model"
    if language:
        cfg = replace(cfg, batch_size=1, heldout=False)
    model, loss_fn, comps, _ = build_task(cfg)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to take the final point from")
    model.load_state_dict(found[1]["model"])
    epoch = (found[1].get("loop") or {}).get("epoch")
    kw = {"dropout": cfg.dropout, "seed": cfg.seed}
    if language:
        result = probe(model, loss_fn, comps, **kw)
        sample = f"one column of {cfg.bptt} consecutive tokens (a window of batch size 1)"
    else:
        result = probe(model, loss_fn, comps, batch_sizes=[1], **kw)
        sample = "one training sample"
    return {
        "point": str(run_dir.name),
        "checkpoint": found[0].name,
        "epoch": epoch,
        "batch_size": 1,
        "sample": sample,
        "route": result.route,
        "m": len(result.norms),
        "grad_norm": float(result.grad_norm),
        "norms": [float(v) for v in result.norms],
        "dots": [float(v) for v in result.dots],
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
    threads: int | None = None,
) -> Path:
    """Run the study and build its report; return the report's path.

    Each run is an ordinary resumable run directory; with ``resume`` finished runs
    are kept and unfinished ones continue from their last checkpoint. Without it an
    existing non-empty ``out`` is refused; ``out`` naming a file is refused. Every
    check (:func:`plan`) comes before anything is written. ``threads`` replaces
    the configs' torch thread count (0: every core); the runs and the
    cross-sections run with it, and ``study.json`` records it
    (:func:`study_threads`).
    """
    from clipscope.report import build_report
    from clipscope.train import train

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a study directory; choose another")
    grid = plan(
        tasks,
        epochs=epochs,
        batch_sizes=batch_sizes,
        data_dir=data_dir,
        device=device,
        progress=progress,
        threads=threads,
    )
    init_from_env(device)  # under torchrun: every rank runs, rank 0 writes
    echo = echo if is_writer() else _quiet

    def make_out() -> None:
        if out.exists() and any(out.iterdir()) and not resume:
            raise FileExistsError(
                f"output directory {out} exists and is not empty; use --resume or another --out"
            )
        out.mkdir(parents=True, exist_ok=True)

    on_writer(make_out)
    study: dict[str, Any] = {"tasks": {}}
    for name in tasks:
        spec = TASKS[name]
        study["tasks"][name] = {
            "description": spec.description,
            "runs": [],
            "notes": dict(spec.notes),
            "threads": study_threads([c for s, *_, c in grid if s.name == name]),
        }

    def save_study() -> None:
        on_writer(partial(write_study, out, study))

    failures = []
    for k, (spec, method, b, cfg) in enumerate(grid, 1):
        run_name = method if spec.arms else _run_name(method, b, cfg.optimizer)
        rel = Path("runs") / spec.name / run_name
        run_dir = out / rel
        config_path = out / "configs" / spec.name / f"{run_name}.toml"
        if spec.arms and _arm_of(spec, method).get("eta") == "advised":
            source = out / "runs" / spec.name / arm_label("unclipped", cfg.seed)
            eta = on_writer(partial(advised_eta, source, spec.advise_target))
            echo(f"  advised η from {source.name} (target {spec.advise_target:g}): {eta:.6g}")
            cfg = replace(cfg, eta=eta)
        on_writer(partial(_write_text, config_path, dump_config(cfg)))
        entry = {
            "method": method,
            "batch_size": b,
            "dir": str(rel),
            "config": str(config_path.relative_to(out)),
        }
        if cfg.smoothness_every:
            entry["theorem"] = True  # records what Theorem 3.1 / 3.2 needs
        how = f"{method.upper()}-clip"
        if cfg.optimizer != "sgd":
            entry["optimizer"] = cfg.optimizer
            how += f" with {dict(adam='Adam', adamw='AdamW').get(cfg.optimizer, cfg.optimizer)}"
        if spec.arms:
            entry.update(method=cfg.method, arm=method, seed=cfg.seed)
        echo(f"[{k}/{len(grid)}] {spec.name}: {how}, batch size {b} -> {run_dir}")
        if on_writer(partial(_status, run_dir)) == "completed":
            echo("  already completed; kept")
            code = 0
        else:
            code = train(config_path, run_dir, resume=run_dir.exists())
        if code != 0:
            failures.append(f"{spec.name} {run_name} (exit {code})")
            entry["exit_code"] = code
        if on_writer((run_dir / "epochs.csv").is_file):
            study["tasks"][spec.name]["runs"].append(entry)
        save_study()
    for name in tasks:
        spec = TASKS[name]
        igc = [
            e for e in study["tasks"][name]["runs"] if e["method"] == "igc" and "exit_code" not in e
        ]
        # the plain IGC runs (not an AdamW one beside them); a task whose runs all use
        # AdamW (tinyshakespeare-gpt) takes its sections at its own runs' points
        runs = [e for e in igc if "optimizer" not in e] or igc
        if spec.cross_section and runs:
            first = min(runs, key=lambda e: e["batch_size"])
            echo(f"{name}: batch-size cross-section at the final point of {first['dir']}")
            with _torch_settings(out / first["config"]):
                cross = _cross_section(spec, out / first["dir"], out / first["config"])
            rel = Path("cross_section") / f"{name}.json"
            on_writer(partial(_write_text, out / rel, json.dumps(cross, indent=2) + "\n"))
            study["tasks"][name]["cross_section"] = str(rel)
            save_study()
        if spec.per_sample and runs:
            first = min(runs, key=lambda e: e["batch_size"])
            rel = Path("cross_section") / f"{name}-per-sample.json"
            if not (resume and on_writer((out / rel).is_file)):
                echo(f"{name}: batch-size-1 components at the final point of {first['dir']}")
                try:  # under torchrun: the probe is split, and raises on every rank alike
                    with _torch_settings(out / first["config"]):
                        section = _per_sample(out / first["dir"], out / first["config"])
                except ValueError as exc:  # e.g. the per-sample route refuses train-mode BatchNorm
                    echo(f"  not computed: {exc}")
                    section = {"point": first["dir"], "reason": str(exc)}
                on_writer(partial(_write_text, out / rel, json.dumps(section) + "\n"))
            study["tasks"][name]["per_sample"] = str(rel)
            save_study()
    report = on_writer(partial(build_report, out))
    if failures:
        echo("runs that stopped early: " + "; ".join(failures))
    return report
