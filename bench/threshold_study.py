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
held-out metric at each probe (mean and spread over seeds), the share of clipped steps
(over every step of the run: the probed epochs' ``train_clipped_share`` and the counts
that ``train.log`` gives for the epochs without a probe), the η in force from each probe
on, the wall time of each run and the share of it that the probes took, measured (the
``probe_seconds`` of its rows over the run's wall time): all of them, and the ones that a
threshold rule needs -- every probe but the last point's, which only records -- and the
held-out evaluation's share (``heldout_seconds``).

``--epochs`` and ``--probe-every`` override the config's ``epochs`` and ``probe_every``
for every arm (the probes' share falls as 1/``probe_every``). ``--merge OLD/study.json``
adds the runs of an earlier study of the same config for the seeds not run now (runs are
deterministic per seed with one torch thread; their wall times are of their own machine
and load, and runs written before ``probe_seconds`` existed have no measured probe share).
Any task config works (``--config``); arms run ``--jobs`` at a time, one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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
    """Train one arm (a fresh process: one torch thread); return its exit code and wall time.

    The wall time is of ``clipscope.train.train`` (building the task, training, probing,
    writing the run directory), after the imports.
    """
    import torch

    from clipscope.train import train

    torch.set_num_threads(1)
    start = time.perf_counter()
    code = train(config, run_dir, echo=lambda text: None)
    return {"code": code, "wall": time.perf_counter() - start}


COLUMNS = ("epoch", "heldout", "train_clipped_share", "eta", "rho", "rho_p", "train_loss",
           "probe_seconds", "heldout_seconds")  # fmt: skip
_NO_PROBE = re.compile(r"^epoch +(\d+)  \(no probe\).*clipped steps=(\S+) of (\d+)$")


def read_run(run_dir: Path) -> dict:
    """Return the rows of a run directory, as lists of floats per column.

    Adds ``"unprobed_clipped"``: ``{epoch: [clipped steps, steps]}`` of the epochs
    without a probe, from their ``train.log`` lines (the last line of an epoch wins).
    """
    from clipscope.run.directory import load_run

    record = load_run(run_dir)
    out: dict = {c: [float(v) for v in record.column(c)] for c in COLUMNS}
    unprobed = {}
    log = run_dir / "train.log"
    for line in log.read_text().splitlines() if log.is_file() else ():
        if match := _NO_PROBE.match(line):
            unprobed[int(match[1])] = [float(match[2]), int(match[3])]
    out["unprobed_clipped"] = unprobed
    return out


def clipped_share(rows: dict, m: int, epochs: int) -> float:
    """Share of the run's steps that were clipped: probed epochs' rows + unprobed epochs' logs.

    NaN unless every one of the ``epochs`` epochs is accounted for (a diverged run: the
    share over the epochs it finished).
    """
    counts = {int(e): [s * m, m] for e, s in zip(rows["epoch"], rows["train_clipped_share"],
                                                 strict=True) if math.isfinite(s)}  # fmt: skip
    counts |= {int(e): c for e, c in rows.get("unprobed_clipped", {}).items()}
    done = [counts[e] for e in range(epochs) if e in counts]
    if not done:
        return math.nan
    return sum(c for c, _ in done) / sum(n for _, n in done)


def time_shares(rows: dict, wall: float, epochs: int) -> dict:
    """Measured seconds and shares of the run's wall time: every probe, the needed ones, held-out.

    The needed probes: every probe before the last point (the last point's probe only
    records; a rule's η is set at the others). NaN for a run without ``probe_seconds``.
    """
    probe = np.asarray(rows.get("probe_seconds", []), dtype=np.float64)
    epoch = np.asarray(rows["epoch"][: probe.size], dtype=np.float64)
    heldout = np.asarray(rows.get("heldout_seconds", []), dtype=np.float64)
    if probe.size == 0 or not np.isfinite(probe).any():
        return {k: math.nan for k in ("probe_s", "needed_probe_s", "heldout_s", "probe_share",
                                      "needed_probe_share", "heldout_share")}  # fmt: skip
    total = float(np.nansum(probe))
    needed = float(np.nansum(probe[epoch < epochs]))
    held = float(np.nansum(heldout))
    return {"probe_s": total, "needed_probe_s": needed, "heldout_s": held,
            "probe_share": total / wall, "needed_probe_share": needed / wall,
            "heldout_share": held / wall}  # fmt: skip


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


def _spread_finite(values: list[float]) -> list[float]:
    """``[mean, half-range, n]`` over the finite values (NaN, NaN, 0 when none)."""
    finite = [v for v in values if math.isfinite(v)]
    return [*_spread(finite), len(finite)] if finite else [math.nan, math.nan, 0]


def probe_epochs(epochs: int, every: int) -> list[int]:
    """Return the probed points of a run: every ``every``-th epoch start and the last point."""
    return sorted(set(range(0, epochs, every)) | {epochs}) if every > 0 else [epochs]


TIMES = ("probe_share", "needed_probe_share", "heldout_share", "probe_s", "needed_probe_s")


def summarize(results: dict, seeds: list[int]) -> dict:
    """Per arm: held-out per probe (mean, half-range), clipped share, η per probe, times."""
    out = {}
    for arm, per_seed in results.items():
        runs = [per_seed[s] for s in seeds]
        rows = [r["rows"] for r in runs]
        epochs = [int(e) for e in rows[0]["epoch"]]
        heldout = [_spread([r["heldout"][k] for r in rows]) for k in range(len(epochs))]
        etas = [[r["eta"][k] for r in rows] for k in range(len(epochs))]
        walls = [r["wall"] for r in runs]
        settings = [r["eta_setting"] for r in runs]
        out[arm] = {
            "epochs": epochs,
            "heldout": heldout,
            "heldout_per_seed": {s: r["rows"]["heldout"] for s, r in zip(seeds, runs, strict=True)},
            "final_heldout": heldout[-1],
            "best_heldout": _spread([min(r["heldout"]) for r in rows]),
            "clipped_share": _spread([r["clipped_share"] for r in runs]),
            "eta": [
                [float(np.mean(e)), float(min(e)), float(max(e))] if np.isfinite(e).all() else None
                for e in etas
            ],
            "eta_setting": settings[0] if len(set(settings)) == 1 else ", ".join(
                f"seed {s}: {t}" for s, t in zip(seeds, settings, strict=True)),
            "wall": _spread(walls),
            "wall_per_seed": dict(zip(seeds, walls, strict=True)),
        } | {k: _spread_finite([r["times"][k] for r in runs]) for k in TIMES}  # fmt: skip
    return out


def _num(value: float) -> str:
    return "diverged" if math.isinf(value) else "–" if math.isnan(value) else f"{value:.5g}"


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
        cells = [_num(m) if not math.isfinite(m) else f"{m:.5g} ± {h:.2g}" for m, h in s["heldout"]]
        clip = s["clipped_share"]
        lines.append(f"| {arm} | {s['eta_setting']} | " + " | ".join(cells)
                     + f" | {clip[0]:.2f} ± {clip[1]:.2f} |")  # fmt: skip
    lines += ["", f"Per seed at x_{epochs[-1]} ({', '.join(map(str, meta['seeds']))}):", ""]
    for arm in arms:
        finals = [_num(v[-1]) for v in summary[arm]["heldout_per_seed"].values()]
        lines.append(f"- {arm}: " + " / ".join(finals))
    lines += ["", "η in force from each probe on (mean over seeds; min–max):", ""]
    lines.append("| arm | " + " | ".join(f"x_{k}" for k in epochs) + " |")
    lines.append("|---|" + "---|" * len(epochs))
    for arm in arms:
        cells = []
        for e in summary[arm]["eta"]:
            cells.append("–" if e is None else f"{e[0]:.3g} ({e[1]:.3g}–{e[2]:.3g})")
        if any(c != "–" for c in cells):
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per run (s); the probes' seconds and shares of it, measured "
              "(`probe_seconds`; needed: all but the last point's); the held-out "
              "evaluation's share (`heldout_seconds`):", ""]  # fmt: skip
    lines.append("| arm | wall (s) | probes (s) | probes' share | needed probes' share "
                 "| held-out share |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")

    def pct(v: list[float]) -> str:
        return "–" if v[2] == 0 else f"{v[0]:.1%} ± {v[1]:.1%}" + (
            f" (n = {v[2]})" if v[2] != len(meta["seeds"]) else "")  # fmt: skip

    for arm in arms:
        s = summary[arm]
        w, t = s["wall"], s["probe_s"]
        probes = "–" if t[2] == 0 else f"{t[0]:.1f} ± {t[1]:.1f}" + (
            f" (n = {t[2]})" if t[2] != len(meta["seeds"]) else "")  # fmt: skip
        lines.append(f"| {arm} | {w[0]:.0f} ± {w[1]:.0f} | {probes} | {pct(s['probe_share'])} | "
                     f"{pct(s['needed_probe_share'])} | {pct(s['heldout_share'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _setting(over: dict) -> str:
    eta = over["eta"]
    if eta == "autoclip":
        return f"p = {over['autoclip_percentile']:g}"
    if eta == "descent-safe":
        return f"ρ* = {over['rho_target']:g}"
    return f"{eta:.3g}"


def merge_old(path: Path, results: dict, advised: dict, seeds: list[int]) -> dict:
    """Add an earlier study's runs for the seeds not run now; return its meta."""
    old = json.loads(path.read_text())
    for arm, per in old["runs"].items():
        for seed_text, run in per.items():
            seed = int(seed_text)
            if seed in seeds:
                continue
            m, epochs = run.get("m"), run.get("epochs")
            if m is None or epochs is None:  # written before these were kept: every epoch probed
                epochs = max(int(e) for e in run["rows"]["epoch"])
                m = run.get("m", old["meta"].get("m"))
            run = {k: v for k, v in run.items() if k not in ("stamps", "steps_time", "probe_time")}
            run |= {"m": m, "epochs": epochs}
            run.setdefault("clipped_share", clipped_share(run["rows"], m or 1, epochs))
            run.setdefault("times", time_shares(run["rows"], run["wall"], epochs))
            results.setdefault(arm, {})[seed] = run
    for seed_text, eta in old["meta"].get("advised", {}).items():
        advised.setdefault(int(seed_text), eta)
    return old["meta"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--percentiles", type=float, nargs="+", default=[10, 25, 50])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--advise-target", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--probe-every", type=int, default=None,
                        help="override the config's probe_every (>= 1)")  # fmt: skip
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier study.json of this config: its seeds join",
    )
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    base = tomllib.loads(args.config.read_text())
    if args.probe_every is not None and args.probe_every < 1:
        parser.error("--probe-every must be >= 1 (descent-safe sets η at the probes)")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    n_epochs = args.epochs if args.epochs is not None else int(base.get("epochs", 1))
    every = args.probe_every if args.probe_every is not None else int(base.get("probe_every", 1))
    common = {"epochs": args.epochs, "probe_every": args.probe_every}
    common = {k: v for k, v in common.items() if v is not None}
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
                                       seed, args.data_dir, **over, **common)  # fmt: skip
                jobs.append((arm, seed, over, str(cfg), str(run_dir)))
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [(j, pool.submit(run_arm, j[3], j[4])) for j in jobs]
            for (arm, seed, over, _, run_dir), fut in futures:
                res = fut.result()
                if res["code"] not in (0, 3):  # 3: a non-finite loss: the arm diverged
                    print(f"{arm} seed {seed}: exit {res['code']}", file=sys.stderr)
                    return res["code"]
                rows = read_run(Path(run_dir))
                m = json.loads((Path(run_dir) / "env.json").read_text())["components"]["m"]
                run = {
                    "diverged": res["code"] == 3, "m": m, "epochs": n_epochs,
                    "clipped_share": clipped_share(rows, m, n_epochs),
                    "times": time_shares(rows, res["wall"], n_epochs),
                }  # fmt: skip
                if res["code"] == 3:
                    print(f"{arm} seed {seed}: diverged (non-finite loss)", flush=True)
                    want = probe_epochs(n_epochs, every)
                    for column in rows.values():  # the points it did not reach: inf/NaN
                        if isinstance(column, list):
                            column += [math.nan] * (len(want) - len(column))
                    rows["heldout"] = [math.inf if math.isnan(v) else v for v in rows["heldout"]]
                    rows["epoch"] = [float(e) for e in want]
                results.setdefault(arm, {})[seed] = run | {
                    "rows": rows, "wall": res["wall"], "eta_setting": _setting(over),
                }  # fmt: skip
                print(f"{arm} seed {seed}: {res['wall']:.0f} s, heldout {rows['heldout'][-1]:.5g}, "
                      f"probes {run['times']['probe_share']:.1%} of the run "
                      f"(needed {run['times']['needed_probe_share']:.1%})", flush=True)  # fmt: skip
                if phase == 0:
                    advised[seed] = advised_eta(Path(run_dir), args.advise_target)
                    print(f"advised η (seed {seed}, target {args.advise_target}): "
                          f"{advised[seed]:.4g}", flush=True)  # fmt: skip
    study_wall = time.perf_counter() - t0
    merged = None
    if args.merge is not None:
        merged = merge_old(args.merge, results, advised, args.seeds)
    seeds = sorted(next(iter(results.values())))
    summary = summarize(results, seeds)
    meta = {
        "config": str(args.config),
        "seeds": seeds,
        "seeds_run_now": args.seeds,
        "epochs": n_epochs,
        "probe_every": every,
        "metric": "perplexity" if base.get("task") == "language_model" else "held-out metric",
        "advised": advised,
        "advise_target": args.advise_target,
        "jobs": args.jobs,
        "study_wall_s": study_wall,
    }
    if merged is not None:
        meta["merged_from"] = {"path": str(args.merge), "meta": merged}
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
