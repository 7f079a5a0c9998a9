"""Experiment configuration: one flat TOML file per run, parsed into a frozen dataclass.

Every field of :class:`TrainConfig` has a default and a comment saying what it
means; a TOML file only lists what it changes. :func:`load_config` validates the
whole file before anything runs: an unknown key, a wrong type or a bad value
raises :class:`ValueError` naming the key. η may be written ``eta = inf`` (a
TOML float) or ``eta = "inf"``; ``eta`` and every entry of ``etas`` go through
:func:`~clipscope.clipping.check_eta` (η > 0, not NaN).

:func:`dump_config` writes the *resolved* config (every field) that a run
directory keeps as ``config.toml``; :func:`config_diff` lists what changed, for
the refusal of ``--resume`` with a different config.

>>> cfg = parse_config({"method": "rr", "eta": "inf", "epochs": 2})
>>> cfg.method, cfg.eta, cfg.batch_size
('rr', inf, 16)
>>> parse_config({"methd": "rr"})
Traceback (most recent call last):
...
ValueError: config: unknown key 'methd' (did you mean 'method'?)
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from clipscope.clipping import check_eta

__all__ = [
    "TASKS",
    "TrainConfig",
    "config_diff",
    "dump_config",
    "load_config",
    "parse_config",
]

TASKS = ("least_squares", "classification", "language_model")
_CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "method": ("sgd", "igc", "rr", "shuffle_once", "zhang"),
    "schedule": ("constant", "step", "cosine"),
    "last_batch": ("keep", "drop"),
    # dyadic / per-sample probe other batch sizes than the run's components: not per-run rows
    "route": ("auto", "two-pass", "keep"),
    "dropout": ("off", "fixed"),
    "dtype": ("float32", "float64"),
    "optimizer_switch": ("none", "nt-asgd"),
}


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Flat on purpose: ``epochs.csv`` and reports read these keys by name."""

    # -- task ---------------------------------------------------------------
    task: str = "least_squares"  # least_squares (built in) | classification | language_model
    model: str = "linear"  # clipscope.models.build_model name (ignored by least_squares)
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # TOML inline table of build_model kwargs
    data: str = "synthetic"  # clipscope.data.load_<data> (ignored by least_squares)
    data_dir: str = "data"  # folder handed to loaders that read files (CIFAR-10, PTB)
    n_samples: int = 256  # first N training samples (tokens for LMs); 0 = all
    dim: int = 8  # least_squares: number of features
    noise: float = 0.5  # least_squares: std of the label noise
    batch_size: int = 16  # component batch size B; m = ceil(N/B) components
    bptt: int = 35  # language_model: window length
    heldout_tokens: int = 0  # language_model: first N held-out tokens for perplexity; 0 = all
    ar_alpha: float = 0.0  # language_model: AR weight α in every f_i (awd_lstm_loss); 0 = off
    tar_beta: float = 0.0  # language_model: TAR weight β in every f_i (awd_lstm_loss); 0 = off
    last_batch: str = "keep"  # keep | drop the smaller last batch (recorded)
    data_seed: int = 0  # seed of the data and of the fixed partition
    # -- method -------------------------------------------------------------
    method: str = "igc"  # sgd | igc | rr | shuffle_once | zhang
    lr: float = 0.01  # constant step α (the paper's methods)
    eta: float = math.inf  # clipping threshold η > 0; inf = no clipping
    epochs: int = 10  # epochs of m steps each; 0 = only the diagnostics at x_0
    seed: int = 0  # seed of the model init and of the order's generator
    momentum: float = 0.0  # SGD momentum (not in the paper's methods)
    weight_decay: float = 0.0  # L2 decay added after clipping (not in the paper's methods)
    schedule: str = "constant"  # constant | step | cosine (per epoch)
    milestones: tuple[int, ...] = ()  # step schedule: epochs where α is multiplied by gamma
    schedule_gamma: float = 0.1  # step schedule factor
    optimizer_switch: str = "none"  # none | nt-asgd (average the iterates once heldout stalls)
    nonmono: int = 5  # NT-ASGD: compare with the best heldout of > nonmono epoch ends ago
    # -- probes -------------------------------------------------------------
    probe_every: int = 1  # probe at the start of every k-th epoch (and at the end); 0 = never
    etas: tuple[float, ...] = ()  # extra thresholds for the rho@η columns
    route: str = "auto"  # engine route for the run's own components: auto | two-pass | keep
    dropout: str = "off"  # dropout policy of the probes: off | fixed masks
    heldout: bool = True  # evaluate the held-out metric at each probe
    # -- smoothness (clipscope.smoothness; columns hess_norm, traj_smoothness) ------
    smoothness_every: int = 0  # Lanczos ‖∇²f(x_k)‖ at every k-th probe (and the last); 0 = never
    smoothness_components: bool = False  # also ‖∇²f_i(x_k)‖ per component (A5), in the .npz
    smoothness_tol: float = 1e-4  # relative tolerance of the Lanczos stopping rule, in (0, 1)
    smoothness_max_iter: int = 30  # most Hessian-vector products per Lanczos solve
    # -- runtime ------------------------------------------------------------
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # float32 | float64 parameters and data
    deterministic: bool = True  # torch.use_deterministic_algorithms
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    checkpoint_every: int = 0  # also checkpoint every this many steps; 0 = epoch ends only
    keep_checkpoints: int = 3  # newest checkpoints kept (older ones pruned)
    progress: bool = True  # tqdm progress bars

    def to_dict(self) -> dict[str, Any]:
        """Return all fields as plain values (tuples become lists, ``model_kwargs`` a dict)."""
        out = {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }
        out["model_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs
        }
        return out


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_INT = {"n_samples", "dim", "batch_size", "bptt", "data_seed", "epochs", "seed", "probe_every"}
_INT |= {"threads", "checkpoint_every", "keep_checkpoints", "smoothness_every"}
_INT |= {"smoothness_max_iter", "heldout_tokens", "nonmono"}
_FLOAT = {"noise", "lr", "momentum", "weight_decay", "schedule_gamma", "smoothness_tol"}
_FLOAT |= {"ar_alpha", "tar_beta"}
_BOOL = {"heldout", "deterministic", "progress", "smoothness_components"}
_MIN = {"n_samples": 0, "dim": 1, "batch_size": 1, "bptt": 1, "epochs": 0, "probe_every": 0}
_MIN |= {"threads": 0, "checkpoint_every": 0, "keep_checkpoints": 1, "data_seed": 0, "seed": 0}
_MIN |= {"smoothness_every": 0, "smoothness_max_iter": 1, "heldout_tokens": 0, "nonmono": 1}


def _bad(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config: bad value for '{key}': {value!r} ({why})")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, "expected an integer")
    if key in _MIN and value < _MIN[key]:
        raise _bad(key, value, f"must be >= {_MIN[key]}")
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, "expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise _bad(key, value, "must be finite")
    if key == "lr" and value <= 0:
        raise _bad(key, value, "must be > 0")
    if key in ("noise", "weight_decay", "schedule_gamma", "ar_alpha", "tar_beta") and value < 0:
        raise _bad(key, value, "must be >= 0")
    if key == "momentum" and not 0 <= value < 1:
        raise _bad(key, value, "must be in [0, 1)")
    if key == "smoothness_tol" and not 0 < value < 1:
        raise _bad(key, value, "must be in (0, 1)")
    return value


def _eta(key: str, value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        value = math.inf
    try:
        return check_eta(value)
    except (TypeError, ValueError) as exc:
        raise _bad(key, value, str(exc)) from None


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a dict (a parsed TOML file) into a :class:`TrainConfig`.

    Raises
    ------
    ValueError
        Naming the first unknown key or bad value.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a table of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(_FIELDS)})"
            raise ValueError(f"config: unknown key '{key}'{hint}")
        if key in _INT:
            values[key] = _int(key, value)
        elif key in _FLOAT:
            values[key] = _float(key, value)
        elif key in _BOOL:
            if not isinstance(value, bool):
                raise _bad(key, value, "expected true or false")
            values[key] = value
        elif key == "eta":
            values[key] = _eta(key, value)
        elif key == "etas":
            if not isinstance(value, list):
                raise _bad(key, value, "expected a list of thresholds")
            values[key] = tuple(_eta(key, v) for v in value)
        elif key == "model_kwargs":
            if not isinstance(value, dict):
                raise _bad(key, value, "expected an inline table such as {hidden = [32]}")
            values[key] = tuple(
                sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in value.items())
            )
        elif key == "milestones":
            if not isinstance(value, list):
                raise _bad(key, value, "expected a list of epochs")
            values[key] = tuple(sorted(_int(key, v) for v in value))
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise _bad(key, value, f"valid choices: {', '.join(_CHOICES[key])}")
            values[key] = value
        else:  # free strings: model, data, device
            if not isinstance(value, str) or not value:
                raise _bad(key, value, "expected a non-empty string")
            values[key] = value
    task = values.get("task", TrainConfig.task)
    for key in ("ar_alpha", "tar_beta"):
        if values.get(key, 0.0) and task != "language_model":
            raise _bad(key, values[key], f"AR/TAR need task = 'language_model', not {task!r}")
    if values.get("optimizer_switch", "none") == "nt-asgd":
        why = ""
        if task == "classification":
            why = "it triggers on a held-out metric where lower is better, not on accuracy"
        elif not values.get("heldout", True):
            why = "it triggers on the held-out metric: set heldout = true"
        if why:
            raise _bad("optimizer_switch", "nt-asgd", why)
    return TrainConfig(**values)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML config file (see :func:`parse_config`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config {path}: not valid TOML: {exc}") from None
    try:
        return parse_config(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")  # pragma: no cover


def dump_config(config: TrainConfig) -> str:
    """Return the resolved config as TOML (every field), readable back by :func:`load_config`.

    >>> cfg = parse_config({"eta": 0.5, "model_kwargs": {"hidden": [8, 4]}})
    >>> parse_config(tomllib.loads(dump_config(cfg))) == cfg
    True
    """
    lines = ["# clipscope resolved training config (every field; see clipscope.config)"]
    values = config.to_dict()
    lines += [f"{f.name} = {_toml_value(values[f.name])}" for f in fields(config)]
    return "\n".join(lines) + "\n"


def config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Lines ``key: old -> new`` for every field that differs (``progress`` is ignored).

    >>> config_diff(TrainConfig(), TrainConfig(lr=0.1))
    ['lr: 0.01 -> 0.1']
    """
    out = []
    for f in fields(old):
        if f.name == "progress":
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            out.append(f"{f.name}: {_toml_value(a)} -> {_toml_value(b)}")
    return out
