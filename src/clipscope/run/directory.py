"""The run directory: one module writes it and reads it back.

Layout (every file written atomically, :mod:`clipscope.atomic`)::

    config.toml                 the resolved config (``clipscope train`` runs)
    env.json                    versions, device, seed, threads, determinism flags,
                                components, gradient conventions (:mod:`clipscope.run.env`)
    epochs.csv                  one row per probe (:data:`COLUMNS`, then more, below)
    components/epoch_XXXX.npz   per-component arrays at x_k: norms, dots, losses,
                                grad_norm, sizes (+ hess_norms, hess_converged;
                                + dots_p, u_norm, grad_u_inner with Adam/AdamW)
    checkpoints/ckpt_N.pt       the loop's whole state (model, optimizer, schedule,
                                order, RNG, position, rows, every unit's state)
                                + ckpt_N.pt.sha256 (N counts checkpoints; the newest
                                ``keep`` kept)
    summary.json                status (completed / interrupted / nonfinite / failed),
                                position, last row, component draw counts, message
    train.log                   what was printed (``clipscope train``)
    averaged_model.pt           NT-ASGD only: state dict with the averaged iterate x̄

``epochs.csv`` columns: :data:`COLUMNS`, ``probe_seconds``, then ``rho@η`` for each extra η
(:func:`eta_column`), with an adaptive optimizer :data:`PRECONDITIONED_COLUMNS` and
``rho_p@η``, then the columns of optional units in the order they ran
(``heldout_seconds`` of :class:`clipscope.loop.HeldOutMetric`;
``hess_norm``, ``hess_converged``, ``traj_smoothness`` of
:class:`clipscope.loop.Smoothness`; ``asgd_active``, ``heldout_avg`` of
:class:`clipscope.loop.NTASGD`). What each column means: ``docs/training.md``.

Consistency under ``kill -9``: the rows live in the checkpoint; ``epochs.csv`` is
rewritten from them right *after* each checkpoint (:meth:`RunDirectory.save`),
and on resume from the checkpoint that is loaded (:meth:`RunDirectory.restore_rows`:
rows the crashed process wrote after it are dropped, the ``.npz`` files of
dropped epochs deleted), so the file never holds a row that a resumed run will
write again.

The reader (:func:`load_run`, :class:`RunRecord`) is what the report and the
theorem check use: it never imports torch models or the engine, turns empty or
non-numeric cells into NaN, and reads run directories written by earlier
versions of clipscope unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from clipscope.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_path,
    clean_tmp,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from clipscope.errors import ConfigError, CorruptCheckpointError, UnloadableCheckpointError
from clipscope.math.thresholds import RULES as ETA_RULES
from clipscope.math.thresholds import replay_descent_safe
from clipscope.run.env import environment_changes

__all__ = [
    "CHECKPOINT_FORMAT",
    "COLUMNS",
    "ETA_RULES",
    "PRECONDITIONED_COLUMNS",
    "TIMING_COLUMNS",
    "RunDirectory",
    "RunRecord",
    "eta_column",
    "load_run",
    "read_rows",
    "setting_diff",
]

#: The standard columns of ``epochs.csv``, in order (``docs/training.md`` says what each means).
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

#: The columns that time the run (seconds, ``time.perf_counter``), measured anew by every
#: run: ``wall_time`` (since the loop started, at the point, before its probe),
#: ``probe_seconds`` (the engine's probe at the point) and ``heldout_seconds`` (the held-out
#: metric there). A resumed run repeats every other column bitwise, not these; runs written
#: before ``probe_seconds`` and ``heldout_seconds`` existed have neither.
TIMING_COLUMNS = ("wall_time", "probe_seconds", "heldout_seconds")

#: The columns of a probe with an adaptive optimizer's preconditioner P (Adam, AdamW), after
#: :data:`COLUMNS` in the rows that have them (runs without one, and older runs, have none):
#: ``rho_p`` = ρ_P(η) at the run's η, ``c1_p`` / ``min_cos_p`` / ``neg_cos_p_share`` the
#: cosines to u = P⁻¹∇f, ``a3_p_holds`` A3 under P, ``p_unset_share`` the share of the
#: coordinates without optimizer state (P = 1 there), ``decay_ratio`` the weight decay's
#: descent ⟨∇f, Δ⟩/⟨∇f, u⟩ (0 without decay); then ``rho_p@η`` for each extra η
#: (:func:`eta_column` with ``name="rho_p"``). Component files add ``dots_p`` (⟨g_i, u⟩),
#: ``u_norm`` (‖u‖) and ``grad_u_inner`` (⟨∇f, u⟩). ``docs/training.md`` says more.
PRECONDITIONED_COLUMNS = (
    "rho_p",
    "c1_p",
    "min_cos_p",
    "neg_cos_p_share",
    "a3_p_holds",
    "p_unset_share",
    "decay_ratio",
)

#: ETA_RULES: the values of ``eta`` that name a threshold rule rather than a number
#: (:data:`clipscope.math.thresholds.RULES`). Their runs have an ``eta`` column after
#: :data:`COLUMNS`: the η in force from each probe on (descent-safe: the η decided
#: there; AutoClip: the percentile of the norms seen before it, NaN at x_0).

#: ``format`` of the checkpoints written now. Checkpoints without it were written
#: before the loop's units existed; :func:`clipscope.loop.state.upgrade_checkpoint`
#: reads them.
CHECKPOINT_FORMAT = 2

_EPOCH_FILE = re.compile(r"epoch_(\d+)\.npz$")
_STEPS_FILE = re.compile(r"epoch_(\d+)_steps\.npz$")


def eta_column(eta: float, name: str = "rho") -> str:
    """Column name of ρ (``name="rho_p"``: of ρ_P) at threshold η: ``rho@0.1``, ``rho@inf``.

    >>> eta_column(0.1), eta_column(float("inf")), eta_column(2.0), eta_column(2.0, "rho_p")
    ('rho@0.1', 'rho@inf', 'rho@2', 'rho_p@2')
    """
    return f"{name}@inf" if math.isinf(eta) else f"{name}@{eta:g}"


# -- writing ---------------------------------------------------------------------------


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    names = list(COLUMNS)
    for row in rows:
        names += [k for k in row if k not in names and not k.startswith("_")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(row.get(name, math.nan), name) for name in names])
    return buffer.getvalue()


#: Columns that count (probe points, optimizer steps): written as integers, also when a
#: row came back from a state that stored every value as a float (a resumed Monitor).
INTEGER_COLUMNS = ("epoch", "step")


def _cell(value: Any, name: str = "") -> str:
    if name in INTEGER_COLUMNS and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def setting_diff(
    stored: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None
) -> list[str]:
    """Lines ``key: old -> new`` for the keys (default: of both) whose values differ, sorted.

    >>> setting_diff({"lr": 0.05, "eta": 1.0}, {"lr": 0.1, "eta": 1.0})
    ['lr: 0.05 -> 0.1']
    """
    keys = set(stored) | set(current) if keys is None else keys
    return [
        f"{k}: {stored.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(keys)
        if stored.get(k) != current.get(k)
    ]


def _legacy_setting(setting: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the setting of a checkpoint older than :data:`CHECKPOINT_FORMAT` in today's keys.

    Those stored the training keys only (``smoothness`` as one table); their run's
    ``config.toml``, when there is one, holds the rest.
    """
    out = {k: v for k, v in config.items() if k != "progress"}
    for key, value in setting.items():
        if key == "smoothness" and isinstance(value, Mapping):
            out.update({f"smoothness_{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


#: Settings a resume cannot change even with ``--force``: what the probes measure
#: (``per_sample``: each sample a component, or the loop's components).
UNCHANGEABLE = ("per_sample",)


class RunDirectory:
    """The files of one run: created and checked by :meth:`open`, then written piece by piece.

    Parameters
    ----------
    path : str or Path
        The directory.
    setting : mapping, optional
        What a resume must match (every entry; ``m`` is added by the loop). The
        loop uses its own settings when this is None; ``clipscope train`` passes
        the whole resolved config.
    files : mapping of str to str, optional
        Text files written right after the directory is opened and checked
        (``clipscope train``: ``{"config.toml": ...}``).
    log : callable, optional
        ``log(text)`` for messages (resumes, skipped checkpoints, forced overrides).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        setting: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.components = self.path / "components"
        self.setting = None if setting is None else dict(setting)
        self.files = dict(files or {})
        self.log = log or (lambda text: None)

    def open(
        self,
        *,
        resume: bool,
        force: bool = False,
        setting: Mapping[str, Any],
        fits: Callable[[Mapping[str, Any]], str | None] | None = None,
    ) -> dict[str, Any] | None:
        """Check the directory, create it, and on resume return the newest loadable checkpoint.

        Checks come first; nothing is written until they pass. Refused
        (:class:`FileExistsError`): ``path`` is a file; ``path`` holds files and
        ``resume`` is False. On resume: checkpoints exist but none loads
        (:class:`~clipscope.errors.CorruptCheckpointError` when every one fails
        its checksum, else :class:`~clipscope.errors.UnloadableCheckpointError`;
        each reason is listed, never a silent fresh start); the checkpoint's
        setting differs from ``setting`` (:class:`~clipscope.errors.ConfigError`
        listing ``key: old -> new``) unless ``force`` (then logged); even under
        ``force``, a checkpoint that ``fits(state)`` says does not fit the loop
        (a reason string: another model, other components) is refused with
        :class:`~clipscope.errors.ConfigError`. A resume
        on other torch/CUDA/numpy/Python versions is logged as a warning. Then
        the folders are created, stray temporary files removed, newer
        unloadable checkpoints renamed ``*.corrupt``, and :attr:`files` written.
        """
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(
                f"{self.path} is a file, not a directory: choose another output directory (--out)"
            )
        if self.path.is_dir() and any(self.path.iterdir()) and not resume:
            raise FileExistsError(
                f"{self.path} exists and is not empty; use --resume to continue the run in it, "
                "or choose another output directory"
            )
        found, failures = None, []
        for path in reversed(list_checkpoints(self.checkpoints) if resume else []):
            try:
                state = load_checkpoint(path)
                if not isinstance(state, dict) or "model" not in state or "loop" not in state:
                    raise UnloadableCheckpointError(
                        f"checkpoint {path} is not a clipscope checkpoint"
                    )
            except (CorruptCheckpointError, UnloadableCheckpointError) as exc:
                failures.append(exc)
                continue
            found = (path, state)
            break
        if found is None and failures:
            kind = (
                CorruptCheckpointError
                if all(isinstance(e, CorruptCheckpointError) for e in failures)
                else UnloadableCheckpointError
            )
            reasons = "; ".join(str(e) for e in failures)
            raise kind(f"no checkpoint in {self.checkpoints} can be resumed: {reasons}")
        if found is not None:
            forced = self._check_setting(found[1], setting, force)
            reason = None if fits is None else fits(found[1])
            if reason is not None:
                raise ConfigError(
                    f"the checkpoint {found[0]} cannot be resumed with this config, even with "
                    f"--force: {reason}. Resume with the config the run was started with, or "
                    "choose another output directory"
                )
            if forced:
                self.log(f"--force: resuming {self.path} with changed settings:\n  {forced}")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.components.mkdir(parents=True, exist_ok=True)
        for item in clean_tmp(self.path):
            self.log(f"removed stray temporary file {item}")
        for exc in failures:
            self.log(f"{exc}; falling back to the previous checkpoint")
        if found is not None:
            for newer in list_checkpoints(self.checkpoints):
                if newer.name > found[0].name:  # failed to load: keep it aside, out of the way
                    newer.rename(newer.with_name(newer.name + ".corrupt"))
                    self.log(f"moved unloadable checkpoint aside: {newer.name}.corrupt")
            self.log(f"resuming from {found[0]}")
            for text in environment_changes(self.path / "env.json"):
                self.log(f"warning: {text}")
        elif resume:
            self.log(f"--resume: no checkpoint in {self.path} yet; starting from the beginning")
        for name, text in self.files.items():
            atomic_write_text(self.path / name, text)
        return None if found is None else found[1]

    def _check_setting(
        self, state: Mapping[str, Any], current: Mapping[str, Any], force: bool
    ) -> str | None:
        """Refuse changed settings unless ``force``; return the changes ``force`` lets through."""
        stored = state.get("setting") or {}
        if "format" in state:
            keys = set(stored) | set(current)
        else:  # written before CHECKPOINT_FORMAT: compare what it recorded
            config = {}
            if (self.path / "config.toml").is_file():
                config = tomllib.loads((self.path / "config.toml").read_text())
            stored = _legacy_setting(stored, config)
            keys = set(stored)
        diff = setting_diff(stored, current, keys)
        if not diff:
            return None
        shown = "\n  ".join(diff)
        fixed = [k for k in UNCHANGEABLE if bool(stored.get(k)) != bool(current.get(k))]
        if fixed:
            changes = ", ".join(
                f"{k}: {bool(stored.get(k))} -> {bool(current.get(k))}" for k in fixed
            )
            raise ConfigError(
                f"--resume cannot change {changes}, even with --force: the run's probes would "
                "mix per-sample and mini-batch components in one epochs.csv, which its report "
                "reads as one kind. Start a new run directory"
            )
        if not force:
            raise ConfigError(
                f"--resume with other settings than the run in {self.path} was started with:\n"
                f"  {shown}\n(use --force to resume anyway)"
            )
        return shown

    def save(
        self, payload: Mapping[str, Any], *, seq: int, rows: Sequence[Mapping], keep: int = 3
    ) -> None:
        """Checkpoint number ``seq``, then rewrite ``epochs.csv`` from ``rows``, then prune.

        Checkpoints are numbered by a counter the caller keeps in its state, so a
        new one never overwrites an existing file (a failed write cannot damage
        the previous checkpoint).
        """
        save_checkpoint(checkpoint_path(self.checkpoints, seq), dict(payload))
        self.write_rows(rows)
        prune_checkpoints(self.checkpoints, keep)

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``epochs.csv`` atomically from ``rows`` (keys starting with ``_`` are left out)."""
        atomic_write_text(self.path / "epochs.csv", _csv_text(rows))

    def restore_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After loading a checkpoint: rows back to its content, later component files removed."""
        self.write_rows(rows)
        kept = {int(r["epoch"]) for r in rows}
        for item in self.components.glob("epoch_*.npz"):
            if int(item.stem.split("_")[1]) not in kept:
                item.unlink()

    def write_components(self, epoch: int, arrays: Mapping[str, Any]) -> None:
        """``components/epoch_XXXX.npz`` from ``arrays`` (one entry per name, in order)."""
        buffer = io.BytesIO()
        np.savez(buffer, **dict(arrays))
        atomic_write_bytes(self.components / f"epoch_{epoch:04d}.npz", buffer.getvalue())

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` in the directory atomically."""
        atomic_write_text(self.path / name, text)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` in the directory atomically."""
        atomic_write_bytes(self.path / name, data)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` (status, epoch, step, rows, last_row, counts, message).

        Strict JSON: a NaN is written as ``null``, ±∞ as ``"inf"`` / ``"-inf"``.
        """
        text = json.dumps(_strict(dict(summary)), indent=2, default=str, allow_nan=False)
        self.write_text("summary.json", text + "\n")


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced: NaN -> None, ±inf -> "inf" / "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


# -- reading ---------------------------------------------------------------------------


def _to_float(text: str) -> float:
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return 1.0 if lowered == "true" else 0.0
    try:
        return float(lowered)
    except ValueError:
        return math.nan


def read_rows(path: str | Path, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read a CSV of numbers (``epochs.csv``) into ``{column: float64 array}``.

    Booleans become 1/0; empty or non-numeric cells become NaN, so a record with
    gaps still plots (with gaps). The writer ends every row with a newline and
    writes the file atomically, so a last row without its newline or with
    fewer cells than the header was cut off (a copy, a disk that filled up):
    it is left out, and a sentence saying so is appended to ``notes``.

    Raises
    ------
    ValueError
        A row before the last with another number of cells than the header
        (naming the file and the line).
    """
    path = Path(path)
    text = path.read_text()
    table = list(csv.reader(io.StringIO(text, newline="")))
    while table and not table[-1]:  # blank lines at the end
        table.pop()
    if len(table) < 2:
        return {}
    header, rows = table[0], table[1:]
    unterminated = not text.endswith("\n")
    if unterminated or len(rows[-1]) != len(header):
        if notes is not None:
            notes.append(
                f"{path}: the last row (line {len(table)}) is incomplete ({len(rows[-1])} of "
                f"{len(header)} cells{', no final newline' if unterminated else ''}): "
                "a half-written row, left out"
            )
        rows = rows[:-1]
    for line, row in enumerate(rows, 2):
        if len(row) != len(header):
            raise ValueError(
                f"{path}: line {line} has {len(row)} cells, the header {len(header)}: "
                "not an epochs.csv that clipscope wrote"
            )
    if not rows:
        return {}
    return {key: np.array([_to_float(r[j]) for r in rows]) for j, key in enumerate(header)}


@dataclass
class RunRecord:
    """Everything a figure or the theorem check may read about one run, loaded from disk."""

    path: Path
    config: dict
    rows: dict[str, np.ndarray]
    component_files: dict[int, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    step_files: dict[int, Path] = field(default_factory=dict)

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
        """The run's clipping threshold (``inf`` for an unclipped run; NaN for a rule).

        A run whose η is set by a rule (``eta = "descent-safe"`` or ``"autoclip"``:
        :attr:`eta_rule`) has no single η: NaN here, the η in force per probe in
        the ``eta`` column.
        """
        value = self.setting("eta", "method.eta", "train.eta", default=math.inf)
        if isinstance(value, str) and value in ETA_RULES:
            return math.nan
        return float(value)

    @property
    def eta_rule(self) -> str | None:
        """``"descent-safe"`` or ``"autoclip"`` when a rule set the run's η, else None."""
        value = self.setting("eta", "method.eta", "train.eta")
        return value if isinstance(value, str) and value in ETA_RULES else None

    def eta_at(self, epoch: int) -> float:
        """Return the η in force at the probe of ``epoch``: :attr:`eta`, or the ``eta`` column.

        NaN where a rule had no η yet (AutoClip before its first step) or the row
        is missing.
        """
        if not self.eta_rule:
            return self.eta
        hit = np.flatnonzero(self.column("epoch") == epoch)
        return float(self.column("eta")[hit[0]]) if hit.size else math.nan

    def ratio_at(self, epoch: int, stats: Any) -> float:
        """``stats.ratio(η)`` at the η in force at ``epoch`` (:meth:`eta_at`); NaN without one."""
        eta = self.eta_at(epoch)
        return float(stats.ratio(eta)) if eta > 0 else math.nan

    def replay_etas(self) -> list | None:
        """Recompute a descent-safe run's η at every probe from its component files alone.

        One :class:`~clipscope.math.thresholds.EtaDecision` per row, in row order, from
        ``components/epoch_XXXX.npz`` and the stored ``rho_target``, ``eta_min``,
        ``eta_max`` (ρ_P where the files hold ``dots_p``: an Adam/AdamW run):
        :func:`~clipscope.math.thresholds.replay_descent_safe`, the function the run
        itself decided with, so the result equals the ``eta`` column. None for a run
        that is not descent-safe (AutoClip's η depends on every step's norm, which a
        ``fit`` run does not store); None also when a row's component file is missing.
        """
        if self.eta_rule != "descent-safe":
            return None
        files = [self.components(int(k)) for k in self.column("epoch")]
        if any(f is None for f in files):
            return None
        bounds = [self.setting(k) for k in ("eta_min", "eta_max")]
        return replay_descent_safe(
            files,
            float(self.setting("rho_target", default=0.9)),
            *(None if b is None else float(b) for b in bounds),
            preconditioned=all("dots_p" in f for f in files),
        )

    @property
    def lr(self) -> float:
        """The run's step size α (NaN when not recorded)."""
        return float(self.setting("lr", default=math.nan))

    @property
    def batch_size(self) -> int | None:
        """The run's component batch size, if recorded."""
        value = self.setting("batch_size", "data.batch_size", "components.batch_size")
        return int(value) if value is not None else None

    @property
    def method(self) -> str:
        """The run's method name (``igc``, ``sgd``, ...)."""
        return str(self.setting("method", "train.method", "method.name", default="?"))

    @property
    def kind(self) -> str:
        """``"monitor"`` for a :class:`clipscope.Monitor`'s run, else ``"train"``."""
        return "monitor" if self.setting("kind") == "monitor" else "train"

    @property
    def clock(self) -> str:
        """What names a probe: ``"step"`` for a Monitor's run, else ``"epoch"``."""
        return "step" if self.kind == "monitor" else "epoch"

    def point_name(self, epoch: int) -> str:
        """``"epoch 3"``, or for a Monitor's run the probe's step: ``"step 24"``."""
        if self.clock == "step":
            epochs, steps = self.column("epoch"), self.column("step")
            hit = np.flatnonzero(epochs == epoch)
            if hit.size and np.isfinite(steps[hit[0]]):
                return f"step {int(steps[hit[0]])}"
        return f"epoch {epoch}"

    def components(self, epoch: int | None = None) -> dict[str, np.ndarray] | None:
        """Per-component arrays of one epoch (the last stored one by default), or None.

        Raises
        ------
        ValueError
            The file is not a readable ``.npz`` of arrays (naming it).
        """
        if not self.component_files:
            return None
        key = max(self.component_files) if epoch is None else epoch
        path = self.component_files.get(key)
        if path is None:
            return None
        return _load_npz(path)

    def step_arrays(self) -> dict[str, np.ndarray]:
        """Return a Monitor's per-step records, every interval joined in step order.

        From ``components/epoch_XXXX_steps.npz`` (:class:`clipscope.loop.StepGradient`):
        ``step``, ``step_grad_norm``, ``step_clipped``, ``step_cos``, ``step_loss``
        (float64). Empty when the run recorded none.
        """
        parts = [_load_npz(self.step_files[k]) for k in sorted(self.step_files)]
        names = [n for n in ("step", "step_grad_norm", "step_clipped", "step_cos", "step_loss")
                 if parts and all(n in p for p in parts)]  # fmt: skip
        return {
            n: np.concatenate([np.asarray(p[n], dtype=np.float64).reshape(-1) for p in parts])
            for n in names
        }


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file; ValueError naming the file when it cannot be read."""
    import zipfile

    try:  # our own handle: np.load leaves its own open when the zip is truncated
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(
            f"{path}: not a readable component file ({type(exc).__name__}: {exc}); "
            "move it aside or delete it to build the report without it"
        ) from None


def _stopped_note(path: Path, notes: list[str]) -> None:
    """Append to ``notes`` the stop of a run whose ``summary.json`` status is not completed."""
    if not (path / "summary.json").exists() and (path / "checkpoints").is_dir():
        # a loop writes summary.json however it ends, unless killed: a run directory with
        # checkpoints and none was killed (kill -9, out of memory) or is still running
        notes.append(
            "no summary.json: the run did not finish (it was killed, or it is still "
            "running); its records end at the last row of epochs.csv"
        )
        return
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return  # unreadable: nothing recorded
    status = summary.get("status") if isinstance(summary, dict) else None
    if status is None or status == "completed":
        return
    message, step = summary.get("message"), summary.get("step")
    at = "" if step is None else f"; it stopped at step {step}"
    notes.append(
        f"stopped: {status}{f': {message}' if message else ''} (summary.json; the run did "
        f"not complete{at})"
    )


def load_run(path: str | Path) -> RunRecord:
    """Load a run directory's stored records (config, rows, component arrays, ``env.json``).

    A half-written last row of ``epochs.csv`` is left out with a note in
    :attr:`RunRecord.notes` (:func:`read_rows`); a run whose ``summary.json``
    says it stopped (status ``failed``, ``interrupted``, ``nonfinite``) gets a
    note ``"stopped: <status>: <message>"``.

    Raises
    ------
    FileNotFoundError
        When ``path`` has no ``epochs.csv``.
    ValueError
        ``config.toml`` is missing or not TOML; ``epochs.csv`` holds no rows or a
        malformed row before the last (each naming the file).
    """
    path = Path(path)
    rows_path = path / "epochs.csv"
    if not rows_path.is_file():
        raise FileNotFoundError(f"{path} is not a clipscope run directory (no epochs.csv)")
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise ValueError(
            f"{path} has epochs.csv but no config.toml: the run's method, η and batch size "
            "are unknown, so nothing can be labelled"
        )
    try:
        config = tomllib.loads(config_path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path}: not a TOML file ({exc})") from None
    notes: list[str] = []
    rows = read_rows(rows_path, notes)
    if not rows:
        raise ValueError(f"{rows_path} holds no probe rows (an empty or header-only file)")
    files: dict[int, Path] = {}
    steps: dict[int, Path] = {}
    comp_dir = path / "components"
    if comp_dir.is_dir():
        for item in comp_dir.iterdir():
            match = _EPOCH_FILE.search(item.name)
            if match:
                files[int(match.group(1))] = item
            match = _STEPS_FILE.search(item.name)
            if match:
                steps[int(match.group(1))] = item
    _stopped_note(path, notes)
    env: dict = {}
    try:
        env = json.loads((path / "env.json").read_text())
    except (OSError, ValueError):
        pass  # older or partial runs: nothing recorded
    return RunRecord(
        path=path, config=config, rows=rows, component_files=files, notes=notes,
        env=env if isinstance(env, dict) else {}, step_files=steps,
    )  # fmt: skip
