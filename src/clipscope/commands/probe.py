"""``clipscope probe``: measure per-component norms and angles to ∇f at one point.

Writes the per-component table as CSV (columns ``batch_size, component, size,
loss, norm, dot, cos, beta``) and prints a summary (``--json`` for the full
JSON summary). The point is one of:

* a ``clipscope train`` config (``--config CONFIG.toml``): the config's task,
  data, partition and model at its initial point x_0 (the same
  :func:`clipscope.runner.build_task` that training uses); the config's
  ``eta``/``etas``, ``dropout``, ``route``, ``per_sample`` and ``seed`` are the defaults;
* a checkpoint of a run (``--checkpoint RUN/checkpoints/ckpt_N.pt``): the model
  weights saved there, with the task of ``--config`` or, when that is not given,
  of the run's own ``RUN/config.toml``;
* a tiny built-in task (``--task``, :func:`clipscope.tasks.builtin_task`),
  synthetic so the command runs in seconds anywhere: ``mlp`` (Gaussian-blob
  classification, a 2-layer tanh MLP) or ``lstm`` (random tokens, an LSTM
  language model with a tied decoder, the state carried between windows).

A checkpoint is loaded only after its checksum passes and only with
``torch.load(weights_only=True)``: anything else is refused with a message
(exit 2), never unpickled.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from clipscope.atomic import atomic_write_text, load_checkpoint
from clipscope.commands._out import check_output_file, make_parent
from clipscope.config import check_resources, load_config
from clipscope.engine import DROPOUT_POLICIES, ROUTES, MultiProbeResult, probe
from clipscope.tasks import BUILTIN_TASKS, build_task, builtin_task

COLUMNS = ("batch_size", "component", "size", "loss", "norm", "dot", "cos", "beta")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``probe``."""
    parser = subparsers.add_parser(
        "probe",
        help="per-component gradient norms and angles to the full gradient",
        description=(
            "Run the gradient engine once, on a clipscope train config (at its initial "
            "point or at a checkpoint) or on a tiny built-in task, and write the "
            "per-component table (norm, dot with the full gradient, cosine, beta) as CSV."
        ),
    )
    parser.add_argument(
        "--config", default=None, help="a clipscope train TOML config: probe its task at x_0"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="load the model weights of a run's checkpoint (task from --config or the run's "
        "config.toml)",
    )
    parser.add_argument(
        "--task",
        choices=BUILTIN_TASKS,
        default=None,
        help="built-in task (default mlp; not with --config)",
    )
    parser.add_argument("--samples", type=int, default=None, help="built-in: samples (default 512)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="built-in: component batch size B (default 16)"
    )
    parser.add_argument("--bptt", type=int, default=None, help="built-in lstm: window (default 8)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed (built-in data/model; dropout masks)"
    )
    parser.add_argument(
        "--route", choices=ROUTES, default=None, help="engine route (default auto or the config's)"
    )
    parser.add_argument(
        "--levels", type=int, default=None, help="dyadic: batch sizes B, 2B, ..., 2^(L-1)B"
    )
    parser.add_argument(
        "--per-sample",
        action="store_true",
        help="components of batch size 1 (per-sample route; default the config's per_sample)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        action="append",
        default=None,
        help="clipping threshold (repeat; default the config's eta and etas)",
    )
    parser.add_argument(
        "--dropout", choices=DROPOUT_POLICIES, default=None, help="default off or the config's"
    )
    parser.add_argument(
        "--out", default="probe.csv", help="CSV of the per-component table (default probe.csv)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def _config_of_checkpoint(checkpoint: Path) -> Path:
    """``RUN/config.toml`` for ``RUN/checkpoints/ckpt_N.pt``; ValueError when there is none."""
    candidate = checkpoint.resolve().parent.parent / "config.toml"
    if checkpoint.resolve().parent.name != "checkpoints" or not candidate.is_file():
        raise ValueError(
            f"--checkpoint {checkpoint} is not inside a run directory with a config.toml; "
            "give the task with --config"
        )
    return candidate


def load_task(args: argparse.Namespace) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """``(model, loss_fn, components, settings)`` from the command line.

    ``settings`` holds the resolved ``etas``, ``dropout``, ``route``, ``seed`` and a
    description of where the point came from. The flags, the config and the
    checkpoint's checksum are checked before the task is built; nothing is written.
    """
    builtin = {"--samples": args.samples, "--batch-size": args.batch_size, "--bptt": args.bptt}
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else None
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {checkpoint}")
    config = args.config
    if config is None and checkpoint is not None:
        config = _config_of_checkpoint(checkpoint)
    if config is None:
        task = args.task or "mlp"
        seed = 0 if args.seed is None else args.seed
        model, loss_fn, comps, _ = builtin_task(
            task,
            512 if args.samples is None else args.samples,
            16 if args.batch_size is None else args.batch_size,
            seed,
            8 if args.bptt is None else args.bptt,
        )
        settings = {
            "task": task,
            "etas": args.eta or [],
            "dropout": args.dropout or "off",
            "route": args.route or "auto",
            "seed": seed,
        }
        return model, loss_fn, comps, settings
    if args.task is not None:
        raise ValueError(
            f"--task {args.task} and a config are exclusive: the config names the task"
        )
    given = [flag for flag, value in builtin.items() if value is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)}: for built-in tasks only; set batch_size / n_samples / "
            f"bptt in the config {config}"
        )
    cfg = load_config(config)
    check_resources(cfg)
    if args.eta:
        etas = args.eta
    elif isinstance(cfg.eta, str):  # a rule sets η while training: no single η to probe at
        if not cfg.etas:
            raise ValueError(
                f"config {config}: eta = {cfg.eta!r} sets η while training (no single "
                "threshold); give the thresholds to probe at with --eta E (repeatable) or "
                "etas in the config"
            )
        etas = list(cfg.etas)
    else:
        etas = [*cfg.etas, cfg.eta]
    state = None
    if checkpoint is not None:  # checksum and contents checked before the task is built
        state = load_checkpoint(checkpoint)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"checkpoint {checkpoint} has no 'model' entry (not a clipscope run?)")
    try:
        model, loss_fn, comps, _heldout = build_task(cfg)
    except ValueError as exc:  # ConfigError, a data error: same type, the config named
        raise type(exc)(f"{config}: {exc}") from None
    point = "x_0 (initial point of the config)"
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(
                f"checkpoint {checkpoint} does not fit the model of config {config}: {first}"
            ) from None
        loop = state.get("loop")
        where = ""
        if isinstance(loop, dict) and isinstance(loop.get("epoch"), int):
            where = f" (epoch {loop['epoch']}, step {loop.get('step')})"
        point = f"checkpoint {checkpoint}{where}"
    settings = {
        "task": cfg.task,
        "config": str(config),
        "point": point,
        "etas": etas,
        "dropout": args.dropout or cfg.dropout,
        "route": args.route or cfg.route,
        "per_sample": cfg.per_sample,
        "seed": cfg.seed if args.seed is None else args.seed,
    }
    return model, loss_fn, comps, settings


#: The routes that give batch-size-1 components (``--per-sample``).
PER_SAMPLE_ROUTES = ("per-sample", "per-sample-kept")


def _check_per_sample(args: argparse.Namespace, who: str) -> None:
    """ValueError for flags that contradict per-sample components (``who`` asked for them)."""
    if args.levels is not None:
        raise ValueError(f"{who} and --levels exclude each other (one batch size: 1)")
    if args.route not in (None, "auto", *PER_SAMPLE_ROUTES):
        raise ValueError(
            f"{who} needs --route {' or '.join(PER_SAMPLE_ROUTES)} (or auto), "
            f"got --route {args.route}"
        )


def run(args: argparse.Namespace) -> int:
    """Probe the task, write the CSV, print the summary."""
    if args.per_sample:
        _check_per_sample(args, "--per-sample")
    out = Path(args.out)
    if out.is_dir() and not out.is_symlink():
        raise ValueError(f"--out {out} is a directory; name the CSV file to write")
    check_output_file(out)  # a device, FIFO or link would be replaced: refused, --force or not
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    model, loss_fn, comps, settings = load_task(args)
    per_sample = args.per_sample or settings.get("per_sample", False)
    if per_sample and not args.per_sample:
        _check_per_sample(args, "the config's per_sample = true")
    make_parent(out)  # before the probe: a folder that cannot be made is named, not a .tmp file
    result = probe(
        model,
        loss_fn,
        comps,
        etas=settings["etas"],
        route=settings["route"],
        dropout=settings["dropout"],
        seed=settings["seed"],
        levels=args.levels,
        batch_sizes=[1] if per_sample else None,
    )
    results = dict(result) if isinstance(result, MultiProbeResult) else {result.batch_size: result}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for b, res in results.items():
        for row in res.table():
            writer.writerow({"batch_size": b, **row})
    atomic_write_text(out, buffer.getvalue())
    summary = {
        "task": settings["task"],
        "config": settings.get("config"),
        "point": settings.get("point", "built-in task at its seeded initialization"),
        "components": comps.describe(),
        "csv": str(out),
        "results": {
            str(b): {
                **r.summary(),
                "verification": r.verification or None,  # per-sample: checks and fallbacks
                "factors": r.info.get("factors"),  # per-sample-kept: what was kept
            }
            for b, r in results.items()
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    if "config" in settings:
        print(f"{settings['config']}: task {settings['task']} at {settings['point']}")
    for b, res in results.items():
        s = res.summary()
        print(
            f"B={b} m={s['m']} route={s['route']} f={s['loss']:.6g} ‖∇f‖={s['grad_norm']:.6g} "
            f"cos min/mean={s['cos_min']:.4g}/{s['cos_mean']:.4g} c1={_fmt(s.get('c1'))} "
            f"c2={_fmt(s.get('c2'))} Σβ={s['sum_beta']:.6g}"
        )
        for eta, clip in s["clipped"].items():
            print(f"  η={eta}: ‖Σ C(g_i; η)‖={_fmt(clip['norm'])} cos to ∇f={_fmt(clip['cos'])}")
        noise = s["noise"]
        predicted, measured = noise.get("predicted_cos_fpc"), noise.get("measured_mean_cos")
        print(
            f"  noise scale (heuristic): B_noise={_fmt(noise.get('B_noise'))} "
            f"predicted mean cos={_fmt(predicted)} measured={_fmt(measured)}"
        )
    print(f"table: {out}")
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
