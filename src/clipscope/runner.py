"""Experiments: a config becomes a crash-safe run directory with a probe every epoch.

Run directory layout (every file written atomically, :mod:`clipscope.atomic`)::

    config.toml                 the resolved config (every field)
    env.json                    versions, device, seed, threads, determinism flags
    epochs.csv                  one row per probe (columns below)
    components/epoch_XXXX.npz   per-component arrays at x_k: norms, dots, losses, grad_norm
    checkpoints/ckpt_N.pt       model, optimizer, schedule, order generator, torch RNG,
                                loop position (epoch, step), rows; + ckpt_N.pt.sha256
                                (N counts checkpoints; the newest ``keep_checkpoints`` kept)
    summary.json                status (running / completed / interrupted / nonfinite),
                                last row, component draw counts, messages
    train.log                   what was printed, resumes and forced overrides included
    averaged_model.pt           NT-ASGD only: state dict with the averaged iterate x̄

``epochs.csv`` columns (:data:`COLUMNS`, then ``rho@η`` for each grid η):
``epoch``, ``step`` (steps taken before x_k), ``loss`` f(x_k) = (1/m) Σ f_i,
``heldout`` (task metric: held-out loss, accuracy, or perplexity for language
models; NaN when none), ``grad_norm`` ‖∇f_k‖, ``c1`` (A3, 31),
``c2`` (A4, 32), ``min_cos``, ``neg_cos_share``, ``a3_holds`` (1/0), ``rho`` =
ρ_k(η) at the run's η, ``clipped_fraction`` (share of n_i > η), ``bound33_lhs`` =
D_k(η) and ``bound33_rhs`` = m·min{ηc1, c2‖∇f_k‖}‖∇f_k‖ (33), ``igc_drift``
(term (39), see :func:`clipscope.methods.fit`; NaN outside IGC), ``drift_bound``
(αηm²G‖∇f_k‖ of (42): needs G, left NaN here), ``b_noise`` (noise-scale
heuristic), ``train_loss`` / ``train_norm`` / ``train_clipped_share`` (means over
the epoch's steps, starting at x_k), ``lr``, ``wall_time`` (seconds since the
process started training; the only column that differs after a resume).

With ``optimizer_switch = "nt-asgd"`` two more columns follow: ``asgd_active``
(1/0) and ``heldout_avg`` (the held-out metric at the averaged iterate x̄; see
:func:`clipscope.methods.fit`).

With ``smoothness_every = k > 0`` (:class:`clipscope.smoothness.SmoothnessProbe`)
three more columns follow: ``hess_norm`` (Lanczos ‖∇²f(x_k)‖ at every k-th
probe and the last, NaN at the others), ``hess_converged`` (1/0) and
``traj_smoothness`` (Zhang et al.'s ‖∇f(x_{k'}) − ∇f(x_k)‖/‖x_{k'} − x_k‖ to the
next probe point x_{k'}, in the row of x_k; NaN in the last row); with
``smoothness_components = true`` the component files also hold ``hess_norms``
(‖∇²f_i(x_k)‖) and ``hess_converged``. The previous probe's x and ∇f (float64)
then travel in the checkpoints, which grow by 16 bytes per parameter.

Consistency under ``kill -9``: the rows live in the checkpoint; ``epochs.csv`` is
rewritten from them right *after* each checkpoint, and on resume it is
rewritten from the checkpoint that is loaded (rows the crashed process wrote
after it are dropped, the ``.npz`` files of dropped epochs deleted), so the
file never holds a row that a resumed run will write again. A resumed run
ends with parameters and rows bitwise equal to an uninterrupted one on CPU
(same torch build; a different build or device gets a warning).

Exit codes of ``clipscope train`` (:data:`EXIT_CODES`): 0 done, 2 bad config or
refused directory, 3 non-finite loss/gradient (last good checkpoint kept),
4 I/O error such as a full disk (existing files left intact), 130 SIGINT and
143 SIGTERM (checkpointed at the next component boundary, ``--resume`` continues).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipscope.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_path,
    clean_tmp,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)

__all__ = [
    "COLUMNS",
    "EXIT_CODES",
    "RunDirectory",
    "build_task",
    "environment",
    "eta_column",
    "probe_row",
    "train",
]

COLUMNS = (
    "epoch",
    "step",
    "loss",
    "heldout",
    "grad_norm",
    "c1",
    "c2",
    "min_cos",
    "neg_cos_share",
    "a3_holds",
    "rho",
    "clipped_fraction",
    "bound33_lhs",
    "bound33_rhs",
    "igc_drift",
    "drift_bound",
    "b_noise",
    "train_loss",
    "train_norm",
    "train_clipped_share",
    "lr",
    "wall_time",
)
EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_IO = 0, 2, 3, 4
EXIT_CODES = {
    "completed": EXIT_OK,
    "config": EXIT_CONFIG,
    "nonfinite": EXIT_NONFINITE,
    "io": EXIT_IO,
    "SIGINT": 130,
    "SIGTERM": 143,
}


def eta_column(eta: float) -> str:
    """Column name of ρ at threshold η: ``rho@0.1``, ``rho@inf``.

    >>> eta_column(0.1), eta_column(float("inf")), eta_column(2.0)
    ('rho@0.1', 'rho@inf', 'rho@2')
    """
    return "rho@inf" if math.isinf(eta) else f"rho@{eta:g}"


def probe_row(
    model: torch.nn.Module,
    loss_fn: Callable,
    components: Any,
    *,
    eta: float,
    etas: Sequence[float] = (),
    dropout: str = "off",
    route: str = "auto",
    seed: int = 0,
    heldout: Callable[[torch.nn.Module], float] | None = None,
    keep_full_grad: bool = False,
    progress: bool = False,
) -> tuple[Any, dict[str, float]]:
    """Probe at the current parameters; return ``(ProbeResult, row)``.

    The row holds plain Python floats (checkpoint-safe) for the :data:`COLUMNS`
    that a probe determines, ``rho@η`` for each η in ``etas``, and ``_descent`` =
    D(η) for the IGC drift. Call it inside :func:`~clipscope.engine.model_guard`.
    """
    from clipscope.engine import model_guard, probe
    from clipscope.methods import NonFiniteError

    try:
        result = probe(
            model,
            loss_fn,
            components,
            etas=(),
            route=route,
            dropout=dropout,
            seed=seed,
            keep_full_grad=keep_full_grad,
            progress=progress,
        )
    except ValueError as exc:
        if "finite" in str(exc):  # the engine's and the statistics' non-finite errors
            raise NonFiniteError(f"probe: {exc}") from exc
        raise
    stats = result.stats
    cos = stats.cos
    defined = cos[np.isfinite(cos)]
    descent = float(stats.descent(eta))
    row: dict[str, float] = {name: math.nan for name in COLUMNS}
    row.update(
        loss=float(np.mean(result.losses)),
        grad_norm=float(result.grad_norm),
        c1=float(stats.c1),
        c2=float(stats.c2),
        min_cos=float(defined.min()) if defined.size else math.nan,
        neg_cos_share=float(np.mean(defined < 0)) if defined.size else math.nan,
        a3_holds=float(bool(stats.a3_holds)),
        rho=float(stats.ratio(eta)),
        clipped_fraction=float(stats.clipped_fraction(eta)),
        bound33_lhs=descent,
        bound33_rhs=float(stats.bound33(eta)),
        b_noise=float(result.noise.get("B_noise", math.nan)),
        _descent=descent,
    )
    for e in etas:
        row[eta_column(e)] = float(stats.ratio(e))
    if heldout is not None:
        with model_guard(model), torch.no_grad():
            row["heldout"] = float(heldout(model))
    return result, row


def _csv_text(rows: Sequence[dict[str, float]]) -> str:
    names = list(COLUMNS)
    for row in rows:
        names += [k for k in row if k not in names and not k.startswith("_")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(row.get(name, math.nan)) for name in names])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class RunDirectory:
    """The files of one run; used by :func:`clipscope.methods.fit` when given ``run_dir``."""

    def __init__(self, path: str | Path, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.components = self.path / "components"
        self.log = log or (lambda text: None)

    def prepare(self, resume: bool) -> dict[str, Any] | None:
        """Create the folders; on resume return the newest valid checkpoint's state.

        Without ``resume`` a directory that already holds rows or checkpoints is
        refused (:class:`FileExistsError`). With ``resume``, corrupt checkpoints
        are reported and skipped; when checkpoints exist but none is valid the
        run is refused rather than silently started afresh.
        """
        has_run = (self.path / "epochs.csv").exists() or bool(list_checkpoints(self.checkpoints))
        if has_run and not resume:
            raise FileExistsError(
                f"{self.path} already holds a run; use --resume to continue it "
                "or choose another output directory"
            )
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.components.mkdir(parents=True, exist_ok=True)
        for item in clean_tmp(self.path):
            self.log(f"removed stray temporary file {item}")
        if not resume:
            return None
        found = latest_checkpoint(self.checkpoints, warn=self.log)
        if found is None:
            if list_checkpoints(self.checkpoints):
                raise ValueError(
                    f"no valid checkpoint in {self.checkpoints}: every one failed its checksum"
                )
            self.log(f"--resume: no checkpoint in {self.path} yet; starting from the beginning")
            return None
        path, state = found
        for newer in list_checkpoints(self.checkpoints):
            if newer.name > path.name:  # failed its checksum: keep it aside, out of the way
                newer.rename(newer.with_name(newer.name + ".corrupt"))
                self.log(f"moved invalid checkpoint aside: {newer.name}.corrupt")
        self.log(f"resuming from {path}")
        return state

    def check_setting(
        self, saved: dict[str, Any], current: dict[str, Any], force: bool = False
    ) -> None:
        """Refuse (ValueError showing the diff) a resume whose settings differ, unless ``force``."""
        keys = sorted(set(saved) | set(current))
        diff = [
            f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in keys
            if saved.get(k) != current.get(k)
        ]
        if not diff:
            return
        text = "; ".join(diff)
        if not force:
            raise ValueError(f"the run in {self.path} was started with other settings: {text}")
        self.log(f"--force: resuming despite changed settings: {text}")

    def save(self, state: dict[str, Any], *, seq: int, rows: Sequence[dict], keep: int = 3) -> None:
        """Checkpoint number ``seq``, then rewrite ``epochs.csv`` from its rows, then prune.

        Checkpoints are numbered by a counter kept in the loop state, so a new
        one never overwrites an existing file (a failed write cannot damage the
        previous checkpoint).
        """
        save_checkpoint(checkpoint_path(self.checkpoints, seq), state)
        self.write_rows(rows)
        prune_checkpoints(self.checkpoints, keep)

    def write_rows(self, rows: Sequence[dict]) -> None:
        """Write ``epochs.csv`` atomically from ``rows``."""
        atomic_write_text(self.path / "epochs.csv", _csv_text(rows))

    def restore_rows(self, rows: Sequence[dict]) -> None:
        """After loading a checkpoint: rows back to its content, later component files removed."""
        self.write_rows(rows)
        kept = {int(r["epoch"]) for r in rows}
        for item in self.components.glob("epoch_*.npz"):
            if int(item.stem.split("_")[1]) not in kept:
                item.unlink()

    def write_components(
        self, epoch: int, result: Any, extra: dict[str, np.ndarray] | None = None
    ) -> None:
        """``components/epoch_XXXX.npz``: norms, dots, losses, grad_norm, sizes, and ``extra``.

        ``extra`` holds further per-component arrays, e.g. ``hess_norms`` (‖∇²f_i‖).
        """
        buffer = io.BytesIO()
        np.savez(
            buffer,
            norms=result.norms,
            dots=result.dots,
            losses=result.losses,
            grad_norm=np.float64(result.grad_norm),
            sizes=result.sizes,
            **(extra or {}),
        )
        atomic_write_bytes(self.components / f"epoch_{epoch:04d}.npz", buffer.getvalue())

    def finish(
        self,
        status: str,
        loop: dict[str, Any],
        *,
        message: str | None = None,
        counts: Sequence[int] | None = None,
    ) -> None:
        """Write ``summary.json`` (status, position, last row, counts, message)."""
        rows = loop.get("rows", [])
        summary = {
            "status": status,
            "epoch": loop.get("epoch"),
            "step": loop.get("step"),
            "rows": len(rows),
            "last_row": {k: v for k, v in rows[-1].items() if not k.startswith("_")}
            if rows
            else None,
            "counts": list(counts) if counts is not None else None,
            "message": message,
        }
        atomic_write_text(
            self.path / "summary.json", json.dumps(summary, indent=2, default=str) + "\n"
        )


def environment(config: Any = None) -> dict[str, Any]:
    """Versions, device, threads and determinism flags (``env.json``)."""
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
    if config is not None:
        env.update(device=config.device, dtype=config.dtype, seed=config.seed)
    return env


# -- tasks --------------------------------------------------------------------


def gradient_conventions(cfg: Any, model: torch.nn.Module, comps: Any) -> dict[str, Any]:
    """Every convention that changes a component gradient, as recorded in ``env.json``."""
    from clipscope.engine import batch_coupled_modules, dropout_modules

    coupled = batch_coupled_modules(model)
    dropout = dropout_modules(model)
    return {
        "data": getattr(comps, "data_description", None) or cfg.data,
        "augmentation": "none (a component is the same function at every visit)",
        "batchnorm_in_probes": (
            f"train mode, each component's own batch statistics ({len(coupled)} layers); "
            "running statistics restored after every probe"
            if coupled
            else "no batch-coupled layers"
        ),
        "dropout_in_probes": (
            f"{cfg.dropout}: "
            + ("masks fixed per component" if cfg.dropout == "fixed" else "dropout modules off")
            + f" ({len(dropout)} modules)"
            if dropout
            else "no dropout modules"
        ),
        "hidden_state": (
            "carried from window i-1 into window i, detached; recomputed at the probe point"
            if comps.sequential
            else "not applicable"
        ),
        "last_batch": cfg.last_batch,
    }


def _least_squares(cfg: Any, dtype: torch.dtype):
    """Synthetic least squares: y = X w* + noise; f_i = ½·mean over the batch of (xᵀw − y)²."""
    gen = torch.Generator().manual_seed(cfg.data_seed)
    n = cfg.n_samples or 256
    X = torch.randn(2 * n, cfg.dim, generator=gen, dtype=dtype)
    w = torch.randn(cfg.dim, generator=gen, dtype=dtype)
    Y = X @ w + cfg.noise * torch.randn(2 * n, generator=gen, dtype=dtype)
    from clipscope.components import Components

    comps = Components.from_tensors(
        X[:n], Y[:n], cfg.batch_size, seed=cfg.data_seed, drop_last=cfg.last_batch == "drop"
    )
    torch.manual_seed(cfg.seed)
    model = torch.nn.Linear(cfg.dim, 1, bias=False).to(dtype)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()

    Xh, Yh = X[n:], Y[n:]

    def heldout(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        return float(loss_fn(model(Xh.to(device)), Yh.to(device)))

    return model, loss_fn, comps, heldout


def build_task(cfg: Any) -> tuple[torch.nn.Module, Callable, Any, Callable | None]:
    """``(model, loss_fn, components, heldout)`` for a config.

    ``least_squares`` is built in; ``classification`` and ``language_model``
    use :func:`clipscope.models.build_model` and :mod:`clipscope.data`.
    """
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if cfg.task == "least_squares":
        model, loss_fn, comps, heldout = _least_squares(cfg, dtype)
    else:
        model, loss_fn, comps, heldout = _library_task(cfg, dtype)
    model = model.to(cfg.device)
    comps.to(cfg.device)
    return model, loss_fn, comps, heldout if cfg.heldout else None


def _library_task(cfg: Any, dtype: torch.dtype):
    try:
        from clipscope import data as data_mod
        from clipscope.models import build_model
    except ImportError as exc:  # pragma: no cover - depends on the installed package
        msg = f"task {cfg.task!r} needs clipscope.models and clipscope.data: {exc}"
        raise ValueError(msg) from exc
    from clipscope.components import Components, SequentialComponents

    if cfg.data not in data_mod.DATASETS:
        raise ValueError(
            f"config: bad value for 'data': {cfg.data!r} (valid: {list(data_mod.DATASETS)})"
        )
    splits = data_mod.load_splits(cfg.data, cfg.data_dir)
    train, test = splits.train, splits.test
    description = {"name": cfg.data, **splits.describe}
    torch.manual_seed(cfg.seed)
    if cfg.task == "language_model":
        if cfg.n_samples:  # samples are tokens here
            train = train[: cfg.n_samples]
        comps = SequentialComponents.from_tokens(
            train, cfg.batch_size, cfg.bptt, drop_last=cfg.last_batch == "drop"
        )
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("vocab", splits.vocab_size or int(train.max()) + 1)
        model = build_model(cfg.model, **kwargs).to(dtype)

        loss_fn = _lm_loss(cfg, model)
        heldout = None
        if test is not None:
            tokens = test[: cfg.heldout_tokens] if cfg.heldout_tokens else test
            heldout = _lm_perplexity(tokens, cfg.batch_size, cfg.bptt, cfg.device)
        comps.data_description = description
        return model, loss_fn, comps, heldout
    X, Y = train
    if cfg.n_samples:
        X, Y = X[: cfg.n_samples], Y[: cfg.n_samples]
    X = X.to(dtype) if X.is_floating_point() else X
    comps = Components.from_tensors(
        X, Y, cfg.batch_size, seed=cfg.data_seed, drop_last=cfg.last_batch == "drop"
    )
    model = build_model(cfg.model, **dict(cfg.model_kwargs)).to(dtype)
    loss_fn = torch.nn.functional.cross_entropy
    heldout = None
    if test is not None:
        Xt, Yt = test
        Xt = Xt.to(dtype) if Xt.is_floating_point() else Xt

        def heldout(model: torch.nn.Module) -> float:
            model.eval()
            return float((model(Xt.to(cfg.device)).argmax(-1) == Yt.to(cfg.device)).double().mean())

    comps.data_description = description
    return model, loss_fn, comps, heldout


def _lm_loss(cfg: Any, model: torch.nn.Module) -> Callable:
    """Return the LM component loss: token-mean cross entropy, plus AR/TAR when configured.

    With ``ar_alpha = α`` or ``tar_beta = β`` nonzero every ``f_i`` (training
    steps and probes alike) is :func:`clipscope.models.awd_lstm_loss`'s
    ``CE + α·mean(d²) + β·mean((r[t+1] − r[t])²)``; the model must keep its
    last layer's activations (``last_activations``), otherwise ValueError
    naming the key.
    """
    if cfg.ar_alpha or cfg.tar_beta:
        if not hasattr(model, "last_activations"):
            key = "ar_alpha" if cfg.ar_alpha else "tar_beta"
            raise ValueError(
                f"config: bad value for '{key}': {getattr(cfg, key)!r} (model {cfg.model!r} "
                "does not record activations for AR/TAR; use model = 'awd-lstm' or set it to 0)"
            )
        from clipscope.models import awd_lstm_loss

        return awd_lstm_loss(model, cfg.ar_alpha, cfg.tar_beta)

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return loss_fn


def _lm_perplexity(
    tokens: torch.Tensor, batch_size: int, bptt: int, device: str
) -> Callable[[torch.nn.Module], float]:
    """Return ``heldout(model)`` = held-out perplexity ``exp(Σ_t CE_t / N_tokens)``.

    The held-out stream is batchified like the training stream (the run's
    ``batch_size`` columns, windows of ``bptt`` rows, the shorter last window
    kept, the ``len mod B`` tail dropped); the windows run in order with the
    recurrent state carried (detached), the model in eval mode (no dropout),
    and the cross entropy (without AR/TAR) is summed over every target token
    and divided by their number, so the result does not depend on ``bptt``.
    The caller (:func:`probe_row`) runs it under ``model_guard`` and
    ``no_grad``, which restore the model's mode.
    """
    from clipscope.components import SequentialComponents, detach_state

    try:
        windows = SequentialComponents.from_tokens(tokens, batch_size, bptt).to(device)
    except ValueError as exc:
        raise ValueError(
            f"held-out split ({len(tokens)} tokens, see 'heldout_tokens'): {exc}"
        ) from None

    def heldout(model: torch.nn.Module) -> float:
        model.eval()
        total, count, state = 0.0, 0, None
        for inp, target in windows:
            out, state = model(inp, state)
            state = detach_state(state)
            ce = torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(ce.double())
            count += target.numel()
        return math.exp(total / count)

    return heldout


# -- the run ------------------------------------------------------------------


def train(
    config_path: str | Path,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run ``clipscope train CONFIG [--out DIR] [--resume] [--force]``; return the exit code.

    ``out`` defaults to ``runs/<config stem>``. Config errors and refused
    directories raise ValueError / FileExistsError (exit 2 through the CLI).
    """
    from clipscope.config import config_diff, dump_config, load_config

    if echo is None:
        from tqdm.auto import tqdm

        echo = tqdm.write
    cfg = load_config(config_path)
    out = Path(out) if out is not None else Path("runs") / Path(config_path).stem
    resolved = dump_config(cfg)
    log_lines: list[str] = []

    def log(text: str) -> None:
        echo(text)
        log_lines.append(text)
        if out.is_dir():
            try:
                with open(out / "train.log", "a") as handle:
                    handle.write(text + "\n")
            except OSError:
                pass

    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(
            f"output directory {out} exists and is not empty; use --resume to continue "
            "the run in it, or choose another --out"
        )
    if resume and (out / "config.toml").is_file():
        old = load_config(out / "config.toml")
        diff = config_diff(old, cfg)
        if diff:
            shown = "\n  ".join(diff)
            if not force:
                raise ValueError(
                    f"--resume with a different config than the one in {out}:\n  {shown}\n"
                    "(use --force to resume anyway)"
                )
            out.mkdir(parents=True, exist_ok=True)
            log(f"--force: resuming {out} with a changed config:\n  {shown}")
        _check_env(out, log)
    # Global torch settings for this run, restored afterwards (train() may run in-process).
    saved_threads = torch.get_num_threads()
    saved_det = torch.are_deterministic_algorithms_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        return _train(cfg, out, resolved, resume, force, on_step, echo, log)
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det)


def _train(cfg, out, resolved, resume, force, on_step, echo, log) -> int:
    from clipscope.methods import Interrupted, NonFiniteError, fit

    model, loss_fn, comps, heldout = build_task(cfg)
    _check_batch_coupling(model, comps)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", resolved)
        if not (resume and (out / "env.json").is_file()):
            env = environment(cfg)
            env["components"] = comps.describe()
            env["conventions"] = gradient_conventions(cfg, model, comps)
            atomic_write_text(out / "env.json", json.dumps(env, indent=2, default=str) + "\n")
        history = fit(
            model,
            loss_fn,
            comps,
            cfg.method,
            lr=cfg.lr,
            eta=cfg.eta,
            epochs=cfg.epochs,
            seed=cfg.seed,
            probe_every=cfg.probe_every,
            etas=cfg.etas,
            heldout=heldout,
            run_dir=out,
            resume=resume,
            force=force,
            progress=cfg.progress,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            milestones=cfg.milestones,
            schedule_gamma=cfg.schedule_gamma,
            dropout=cfg.dropout,
            route=cfg.route,
            checkpoint_every=cfg.checkpoint_every,
            keep_checkpoints=cfg.keep_checkpoints,
            smoothness=_smoothness_probe(cfg),
            optimizer_switch=cfg.optimizer_switch,
            nonmono=cfg.nonmono,
            on_step=on_step,
            log=log,
        )
    except NonFiniteError as exc:
        log(f"error: {exc}")
        return EXIT_NONFINITE
    except Interrupted as exc:
        log(f"interrupted: {exc}; continue with --resume")
        return 128 + int(exc.signum)
    except OSError as exc:
        echo(f"error: I/O failure in {out}: {exc}; files already written are intact")
        return EXIT_IO
    last = history.rows[-1] if history.rows else {}
    log(
        f"done: {history.steps} steps, {len(history.rows)} probe rows in {out}"
        + (f"; f(x)={last['loss']:.6g}, ‖∇f‖={last['grad_norm']:.4g}" if last else "")
    )
    return EXIT_OK


def _smoothness_probe(cfg: Any) -> Any:
    """Return the run's :class:`~clipscope.smoothness.SmoothnessProbe` (None when off)."""
    if not cfg.smoothness_every:
        return None
    from clipscope.smoothness import SmoothnessProbe

    return SmoothnessProbe(
        every=cfg.smoothness_every,
        components=cfg.smoothness_components,
        tol=cfg.smoothness_tol,
        max_iter=cfg.smoothness_max_iter,
    )


def _check_batch_coupling(model: torch.nn.Module, comps: Any) -> None:
    """Refuse a size-1 component under train-mode BatchNorm before anything is written.

    Its batch statistics would be those of one sample (torch fails mid-run, or
    the variance is 0); use batches of at least 2, ``last_batch = "drop"``, or a
    model without batch-coupled layers (eval-mode BatchNorm, GroupNorm).
    """
    from clipscope.engine import batch_coupled_modules

    coupled = batch_coupled_modules(model)
    sizes = [] if comps.sequential else comps.sizes
    small = [i for i, size in enumerate(sizes) if size < 2]
    if coupled and small:
        raise ValueError(
            f"component(s) {small[:5]} hold a single sample, but {coupled[:3]} normalize "
            'with batch statistics in train mode; use batch_size >= 2, last_batch = "drop" '
            "for a size-1 last batch, or a model without train-mode BatchNorm"
        )


def _check_env(out: Path, log: Callable[[str], None]) -> None:
    try:
        old = json.loads((out / "env.json").read_text())
    except (OSError, ValueError):
        return
    now = environment()
    changed = [k for k in ("torch", "cuda", "numpy", "python") if old.get(k) != now.get(k)]
    if changed:
        log(
            "warning: resuming with different "
            + ", ".join(f"{k} ({old.get(k)} -> {now.get(k)})" for k in changed)
            + "; bitwise equality with an uninterrupted run is not promised"
        )
