"""Issue 23's study: unclipped, fixed η, AutoClip and descent-safe clipping on one task.

    python bench/threshold_study.py --config configs/ptb_thresholds_study.toml \
        --data-dir ../shared/data/ptb --out runs/threshold-study --seeds 0 1 --jobs 2

Every arm trains the config as it is except ``eta`` (and the rule's settings):

* ``unclipped`` (η = ∞), ``fixed`` (the config's η), ``advised`` (the ``eta_max`` that
  :func:`clipscope.math.advice.advise` gives at ``--target`` from the same seed's
  unclipped run: the threshold that keeps ρ ≥ target at every probe of that run);
* ``autoclip-p`` for each ``--percentiles`` p; ``descent-safe-ρ*`` for each ``--targets``.

Each run is a ``clipscope train`` run directory under ``--out/<arm>/seed<k>``; the study
writes ``study.json`` (every number) and ``study.md`` (the tables of docs/results.md):
held-out metric per epoch (mean and spread over seeds), the share of clipped steps, the η
in force per epoch, wall time and the share of it outside the steps (probes, held-out
evaluation, checkpoints, start-up), estimated from the time between steps
(``on_step``): the steps' time is the median gap between two steps of one epoch times the
number of steps. Any task config works (``--config``); arms run ``--jobs`` at a time, one
torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return repr(value)


def write_arm_config(base: Path, out: Path, seed: int, data_dir: str | None, **over) -> Path:
    """Copy the base config with ``seed``, ``data_dir`` and the arm's keys replaced."""
    keys = {"seed": seed, "progress": False, **over}
    if data_dir is not None:
        keys["data_dir"] = data_dir
    lines = [
        ln
        for ln in base.read_text().splitlines()
        if not any(ln.startswith(f"{k} =") or ln.startswith(f"{k}=") for k in keys)
    ]
    cut = next((i for i, ln in enumerate(lines) if ln.startswith("[")), len(lines))
    lines[cut:cut] = [f"{k} = {_toml(v)}" for k, v in keys.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def run_arm(config: str, run_dir: str) -> dict:
    """Train one arm (a fresh process: one torch thread); return its times."""
    import torch

    from clipscope.train import train

    torch.set_num_threads(1)
    stamps: list[float] = []
    start = time.perf_counter()
    code = train(config, run_dir, on_step=lambda s, i, n: stamps.append(time.perf_counter()),
                 echo=lambda text: None)  # fmt: skip
    total = time.perf_counter() - start
    return {"code": code, "wall": total, "stamps": stamps, "start": start}


def step_time(stamps: list[float], start: float, m: int) -> float:
    """Return the steps' time: median gap between steps of one epoch, times the number of steps."""
    gaps = [b - a for k, (a, b) in enumerate(pairwise(stamps)) if (k + 1) % m]
    return statistics.median(gaps) * len(stamps) if gaps else math.nan


def probe_time(stamps: list[float], m: int, points: int) -> float:
    """Return the time at the points (probe, held-out evaluation, checkpoints), estimated.

    Between the last step of an epoch and the first of the next lie the point's work
    and one step: each interior gap minus the median in-epoch gap, averaged, times the
    number of points (x_0 and the last point cost about the same, start-up aside).
    """
    gaps = [b - a for a, b in pairwise(stamps)]
    inner = [g for k, g in enumerate(gaps) if (k + 1) % m]
    boundary = [g for k, g in enumerate(gaps) if (k + 1) % m == 0]
    if not inner or not boundary:
        return math.nan
    step = statistics.median(inner)
    return statistics.mean(g - step for g in boundary) * points


def read_run(run_dir: Path) -> dict:
    """Return the rows of a run directory, as lists of floats per column."""
    from clipscope.run.directory import load_run

    record = load_run(run_dir)
    cols = ("epoch", "heldout", "train_clipped_share", "eta", "rho", "rho_p", "train_loss")
    return {c: [float(v) for v in record.column(c)] for c in cols}


def advised_eta(run_dir: Path, target: float) -> float:
    """``eta_max`` of the advice at ``target`` over every probe of a run (exact profiles)."""
    from clipscope.math.advice import advise
    from clipscope.run.directory import load_run

    record = load_run(run_dir)
    points = []
    for k in sorted(record.component_files):
        a = record.components(k)
        points.append((a["norms"], a["dots"], float(a["grad_norm"])))
    return float(advise(points, target).eta_max)


def _spread(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float((arr.max() - arr.min()) / 2) if arr.size > 1 else 0.0


def summarize(results: dict, seeds: list[int]) -> dict:
    """Per arm: held-out per epoch (mean, half-range), clipped share, η per epoch, times."""
    out = {}
    for arm, per_seed in results.items():
        rows = [per_seed[s]["rows"] for s in seeds]
        epochs = [int(e) for e in rows[0]["epoch"]]
        heldout = [_spread([r["heldout"][k] for r in rows]) for k in range(len(epochs))]
        shares = [np.asarray(r["train_clipped_share"]) for r in rows]
        clip = [float(np.nanmean(c)) if np.isfinite(c).any() else math.nan for c in shares]
        etas = [[r["eta"][k] for r in rows] for k in range(len(epochs))]
        walls = [per_seed[s]["wall"] for s in seeds]
        steps = [per_seed[s]["steps_time"] for s in seeds]
        probes = [per_seed[s]["probe_time"] for s in seeds]
        out[arm] = {
            "epochs": epochs,
            "heldout": heldout,
            "final_heldout": heldout[-1],
            "best_heldout": _spread([min(r["heldout"]) for r in rows]),
            "clipped_share": _spread(clip),
            "eta": [
                [float(np.mean(e)), float(min(e)), float(max(e))] if np.isfinite(e).all() else None
                for e in etas
            ],
            "eta_setting": per_seed[seeds[0]]["eta_setting"],
            "wall": _spread(walls),
            "outside_steps_share": _spread([1 - s / w for s, w in zip(steps, walls, strict=True)]),
            "probe_share": _spread([p / (p + s) for p, s in zip(probes, steps, strict=True)]),
        }
    return out


def markdown(summary: dict, meta: dict) -> str:
    """Return the study's tables (docs/results.md)."""
    arms = list(summary)
    epochs = summary[arms[0]]["epochs"]
    lines = [
        f"Metric: {meta['metric']} (held-out; mean ± half-range over seeds {meta['seeds']})",
        "",
    ]
    lines.append("| arm | η | " + " | ".join(f"x_{k}" for k in epochs) + " | clipped steps |")
    lines.append("|---|---|" + "---|" * len(epochs) + "---|")
    for arm in arms:
        s = summary[arm]
        cells = [f"{m:.1f} ± {h:.1f}" for m, h in s["heldout"]]
        clip = s["clipped_share"]
        lines.append(f"| {arm} | {s['eta_setting']} | " + " | ".join(cells)
                     + f" | {clip[0]:.2f} ± {clip[1]:.2f} |")  # fmt: skip
    lines += ["", "η in force from each probe on (mean over seeds; min–max):", ""]
    lines.append("| arm | " + " | ".join(f"x_{k}" for k in epochs) + " |")
    lines.append("|---|" + "---|" * len(epochs))
    for arm in arms:
        cells = []
        for e in summary[arm]["eta"]:
            cells.append("–" if e is None else f"{e[0]:.3g} ({e[1]:.3g}–{e[2]:.3g})")
        if any(c != "–" for c in cells):
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per run (s) and the share outside the steps (probes, held-out "
              "evaluation, checkpoints, start-up):", ""]  # fmt: skip
    lines.append("| arm | wall (s) | outside the steps | points' share of points + steps |")
    lines.append("|---|---|---|---|")
    for arm in arms:
        w, o = summary[arm]["wall"], summary[arm]["outside_steps_share"]
        p = summary[arm]["probe_share"]
        lines.append(f"| {arm} | {w[0]:.0f} ± {w[1]:.0f} | {o[0]:.0%} ± {o[1]:.0%} | "
                     f"{p[0]:.0%} ± {p[1]:.0%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--percentiles", type=float, nargs="+", default=[10, 25, 50])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--advise-target", type=float, default=0.9)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    base = tomllib.loads(args.config.read_text())
    t0 = time.perf_counter()

    def arms_of(phase: int, seed: int, advised: float | None) -> dict[str, dict]:
        if phase == 0:
            return {"unclipped": {"eta": math.inf}}
        arms = {"fixed": {"eta": base.get("eta", math.inf)}, "advised": {"eta": advised}}
        arms |= {f"autoclip-{p:g}": {"eta": "autoclip", "autoclip_percentile": p}
                 for p in args.percentiles}  # fmt: skip
        arms |= {f"descent-safe-{t:g}": {"eta": "descent-safe", "rho_target": t}
                 for t in args.targets}  # fmt: skip
        return arms

    results: dict[str, dict[int, dict]] = {}
    advised: dict[int, float] = {}
    for phase in (0, 1):
        jobs = []
        for seed in args.seeds:
            for arm, over in arms_of(phase, seed, advised.get(seed)).items():
                run_dir = args.out / arm / f"seed{seed}"
                cfg = write_arm_config(args.config, args.out / "configs" / f"{arm}-seed{seed}.toml",
                                       seed, args.data_dir, **over)  # fmt: skip
                jobs.append((arm, seed, over, str(cfg), str(run_dir)))
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [(j, pool.submit(run_arm, j[3], j[4])) for j in jobs]
            for (arm, seed, over, _, run_dir), fut in futures:
                res = fut.result()
                if res["code"] not in (0, 3):  # 3: a non-finite loss: the arm diverged
                    print(f"{arm} seed {seed}: exit {res['code']}", file=sys.stderr)
                    return res["code"]
                rows = read_run(Path(run_dir))
                if res["code"] == 3:
                    print(f"{arm} seed {seed}: diverged (non-finite loss)", flush=True)
                    want = base.get("epochs", 1) + 1
                    for column in rows.values():  # the epochs it did not reach: inf/NaN
                        column += [math.nan] * (want - len(column))
                    rows["heldout"] = [math.inf if math.isnan(v) else v for v in rows["heldout"]]
                    rows["epoch"] = list(range(want))
                m_hint = json.loads((Path(run_dir) / "env.json").read_text())["components"]["m"]
                eta = over["eta"]
                setting = (
                    f"p = {over['autoclip_percentile']:g}" if eta == "autoclip"
                    else f"ρ* = {over['rho_target']:g}" if eta == "descent-safe"
                    else f"{eta:.3g}"
                )  # fmt: skip
                results.setdefault(arm, {})[seed] = {
                    "diverged": res["code"] == 3,
                    "rows": rows, "wall": res["wall"], "eta_setting": setting,
                    "steps_time": step_time(res["stamps"], res["start"], m_hint),
                    "probe_time": probe_time(res["stamps"], m_hint, len(rows["epoch"])),
                    "stamps": [t - res["start"] for t in res["stamps"]],
                }  # fmt: skip
                print(f"{arm} seed {seed}: {res['wall']:.0f} s, heldout {rows['heldout'][-1]:.2f}",
                      flush=True)  # fmt: skip
                if phase == 0:
                    advised[seed] = advised_eta(Path(run_dir), args.advise_target)
                    print(f"advised η (seed {seed}, target {args.advise_target}): "
                          f"{advised[seed]:.4g}", flush=True)  # fmt: skip
    summary = summarize(results, args.seeds)
    meta = {
        "config": str(args.config),
        "seeds": args.seeds,
        "metric": "perplexity" if base.get("task") == "language_model" else "held-out metric",
        "advised": advised,
        "advise_target": args.advise_target,
        "jobs": args.jobs,
        "study_wall_s": time.perf_counter() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {arm: {s: {k: v for k, v in r.items() if k != "rows"} | {"rows": r["rows"]}
                 for s, r in per.items()} for arm, per in results.items()}  # fmt: skip
    (args.out / "study.json").write_text(
        json.dumps({"meta": meta, "arms": summary, "runs": raw}, indent=1)
    )
    (args.out / "study.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    print(f"study wall time: {meta['study_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
