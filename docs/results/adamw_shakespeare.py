"""The AdamW study of docs/results.md: rho and rho_P on tinyshakespeare (issue 22, item 5).

Every run is the shipped config ``configs/tinyshakespeare_gpt_adamw.toml`` (the
``tinyshakespeare-gpt`` task) with only ``eta``, ``seed`` and ``data_dir`` replaced,
trained by ``clipscope.train`` into ``OUT/runs/eta<η>-s<seed>`` (resumable: a finished
run is kept). ``--table`` reads the run directories and prints the tables of the page;
nothing is recomputed but the exact eta-profiles of the stored per-component arrays.

    python docs/results/adamw_shakespeare.py run --data-dir DIR --out OUT --seeds 0 1 2
    python docs/results/adamw_shakespeare.py table --out OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

ETAS = (0.1, 0.3, 1.0, 1.33, 2.66, 5.32, math.inf)


def _name(eta: float, seed: int) -> str:
    return f"eta{'inf' if math.isinf(eta) else f'{eta:g}'}-s{seed}"


def run(data_dir: str, out: Path, seeds: list[int], etas: list[float]) -> None:
    """Train every (eta, seed) run of the study into ``out/runs`` (a completed one is kept)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from clipscope.config import dump_config, parse_config
    from clipscope.reproduce import CONFIGS
    from clipscope.train import train

    base = tomllib.loads((CONFIGS / "tinyshakespeare_gpt_adamw.toml").read_text())
    base.pop("study")
    for seed in seeds:
        for eta in etas:
            name = _name(eta, seed)
            cfg = parse_config({**base, "eta": eta, "seed": seed, "data_dir": data_dir})
            path = out / "configs" / f"{name}.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_config(cfg))
            run_dir = out / "runs" / name
            status = None
            if (run_dir / "summary.json").is_file():
                status = json.loads((run_dir / "summary.json").read_text()).get("status")
            if status == "completed":
                print(f"{name}: completed, kept")
                continue
            code = train(path, run_dir, resume=run_dir.exists(), echo=lambda s: None)
            print(f"{name}: exit {code}", flush=True)


def _rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "epochs.csv") as handle:
        return [
            {k: float(v) if v else math.nan for k, v in r.items()} for r in csv.DictReader(handle)
        ]


def _profiles(run_dir: Path):
    """Per probe: (epoch, rho profile, rho_P profile) from the stored component arrays."""
    from clipscope.math.stats import ComponentStats, DirectionStats

    for path in sorted((run_dir / "components").glob("epoch_*.npz")):
        z = np.load(path)
        yield (
            int(path.stem.split("_")[1]),
            ComponentStats(z["norms"], z["dots"], float(z["grad_norm"])),
            DirectionStats(z["norms"], z["dots_p"], float(z["u_norm"]), float(z["grad_u_inner"])),
        )


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def table(out: Path) -> None:
    """Print the page's tables from the completed runs in ``out/runs``."""
    runs = sorted(r for r in (out / "runs").glob("eta*-s*") if _completed(r))
    by_eta: dict[str, list[Path]] = {}
    for r in runs:
        by_eta.setdefault(r.name.split("-s")[0][3:], []).append(r)
    order = sorted(by_eta, key=lambda e: float(e))
    print("\n### Held-out perplexity and clipping, per eta (mean ± std over seeds; min-max)\n")
    print(
        "| η | seeds | held-out ppl, last epoch | min-max | best epoch ppl (mean) | "
        "clipped steps (all epochs) | wall s (mean) |"
    )
    print("|---|---|---|---|---|---|---|")
    for eta in order:
        last, best, clipped, wall = [], [], [], []
        for r in by_eta[eta]:
            rows = _rows(r)
            last.append(rows[-1]["heldout"])
            best.append(min(x["heldout"] for x in rows))
            shares = [
                x["train_clipped_share"] for x in rows if not math.isnan(x["train_clipped_share"])
            ]
            clipped.append(float(np.mean(shares)) if shares else math.nan)
            wall.append(rows[-1]["wall_time"])
        n = len(last)
        sd = float(np.std(last, ddof=1)) if n > 1 else math.nan
        print(
            f"| {eta} | {n} | {np.mean(last):.3f} ± {sd:.3f} | {min(last):.3f}-{max(last):.3f} | "
            f"{np.mean(best):.3f} | {np.mean(clipped):.3f} | {np.mean(wall):.0f} |"
        )
    print("\n### rho and rho_P at the run's own eta, per probe (mean over seeds)\n")
    epochs = None
    lines = []
    for eta in order:
        if eta == "inf":
            continue
        per = [_rows(r) for r in by_eta[eta]]
        epochs = [int(x["epoch"]) for x in per[0]]
        rho = np.array([[x["rho"] for x in rows] for rows in per])  # at the run's own eta
        rhop = np.array([[x["rho_p"] for x in rows] for rows in per])
        lines.append((eta, rho.mean(0), rhop.mean(0)))
    if epochs is not None:
        print("| η | " + " | ".join(f"epoch {e} ρ / ρ_P" for e in epochs) + " |")
        print("|---|" + "---|" * len(epochs))
        for eta, rho, rhop in lines:
            cells = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(rho, rhop, strict=True))
            print(f"| {eta} | {cells} |")
    print("\n### Cosines after x_0 (every probe from epoch 1 on, all seeds: min-max)\n")
    print(
        "| η | c1 = mean cos(∇f_i, ∇f) | c1_P = mean cos(∇f_i, u) | "
        "share of cos(∇f_i, u) < 0 (max) | c2 = min n_i / max n_i |"
    )
    print("|---|---|---|---|---|")
    for eta in order:
        rows = [x for r in by_eta[eta] for x in _rows(r)[1:]]

        def span(key: str, rows=rows) -> str:
            values = [x[key] for x in rows]
            return f"{min(values):.3f}-{max(values):.3f}"

        neg = max(x["neg_cos_p_share"] for x in rows)
        print(f"| {eta} | {span('c1')} | {span('c1_p')} | {neg:.3f} | {span('c2')} |")
    print("\n### Over every probe of every run: rho versus rho_P, and reversal\n")
    grid = np.geomspace(1e-3, 1e2, 2001)
    worst_gap, where_gap, min_rhop, where_min, n_probes, n_neg, unset = (
        0.0,
        None,
        math.inf,
        None,
        0,
        0,
        0,
    )
    gap_after, n_neg_plain = [], 0
    for r in runs:
        rows = {int(x["epoch"]): x for x in _rows(r)}
        for epoch, plain, pre in _profiles(r):
            n_probes += 1
            if pre.profile().negative_intervals():
                n_neg += 1
            if plain.profile().negative_intervals():
                n_neg_plain += 1
            # both ratios are piecewise linear in η with breakpoints at the same norms n_i
            # (and tend to 0 and 1 at both ends): their largest gap is at a breakpoint
            points = np.concatenate([grid, plain.norms])
            rp = pre.profile().ratio(points)
            rs = plain.profile().ratio(points)
            gap = float(np.max(np.abs(rp - rs)))
            if rows[epoch].get("p_unset_share", 0.0) == 1.0:
                unset += 1
            else:
                gap_after.append(gap)
            if gap > worst_gap:
                worst_gap, where_gap = gap, (r.name, epoch)
            low = float(np.min(rp))
            if low < min_rhop:
                min_rhop, where_min = low, (r.name, epoch)
    print(
        f"- probes: {n_probes} ({unset} at x_0, where AdamW has no state yet and P = 1, so ρ_P = ρ)"
    )
    print(f"- probes whose exact ρ_P(η) is ≤ 0 for some η > 0 (negative intervals): {n_neg}")
    print(f"- probes whose exact ρ(η) is ≤ 0 for some η > 0: {n_neg_plain}")
    print(
        f"- smallest ρ_P(η) over η in [1e-3, 1e2] (2001 log-spaced) and every probe: "
        f"{min_rhop:.4f} at {where_min}"
    )
    print(
        f"- largest |ρ_P(η) − ρ(η)| over every η > 0 (exact: at the norms): {worst_gap:.4f} "
        f"at {where_gap}"
    )
    if gap_after:
        print(
            f"- after x_0: median {np.median(gap_after):.4f}, max {np.max(gap_after):.4f} "
            "of the per-probe largest gap"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run ``run`` or ``table``."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--etas", type=float, nargs="+", default=list(ETAS))
    t = sub.add_parser("table")
    t.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "run":
        run(a.data_dir, a.out, a.seeds, a.etas)
    else:
        table(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
