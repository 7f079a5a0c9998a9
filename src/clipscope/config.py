"""Settings: the one place they are parsed and validated, and the one home of each choice list.

Two frozen dataclasses share one set of validators (:func:`check_setting`):

* :class:`FitConfig` -- the training loop's settings (:func:`clipscope.fit`);
* :class:`TrainConfig` -- one flat TOML file per run (``clipscope train``): the
  task (model, data, partition, runtime) plus every :class:`FitConfig` key under
  the same name (:meth:`TrainConfig.fit_config`).

Every field has a default and a comment saying what it means; a TOML file only
lists what it changes. :func:`load_config` validates the whole file before
anything runs: an unknown key, a wrong type or a bad value raises
:class:`~clipscope.errors.ConfigError` (a ``ValueError``) naming the key. η may
be written ``eta = inf`` (a TOML float) or ``eta = "inf"``; ``eta``, every entry
of ``etas`` and ``zhang_gamma`` go through
:func:`~clipscope.math.stats.check_eta`. A TOML file may carry a ``[study]``
table for ``clipscope reproduce`` (:mod:`clipscope.reproduce`); training ignores it.

:func:`check_resources` checks what depends on the machine (the device exists,
``threads`` at most the CPUs, the synthetic data fits in memory); ``clipscope
train``, ``reproduce`` and ``probe --config`` call it before anything is written.

:func:`dump_config` writes the *resolved* config (every field) that a run
directory keeps as ``config.toml``; :func:`config_diff` lists what changed.

>>> cfg = parse_config({"method": "rr", "eta": "inf", "epochs": 2})
>>> cfg.method, cfg.eta, cfg.batch_size
('rr', inf, 16)
>>> parse_config({"methd": "rr"})
Traceback (most recent call last):
...
clipscope.errors.ConfigError: config: unknown key 'methd' (did you mean 'method'?)
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import torch

from clipscope.data.splits import WORD_CORPORA
from clipscope.engine.guard import DROPOUT_POLICIES
from clipscope.errors import ConfigError
from clipscope.math.stats import check_eta
from clipscope.methods import METHODS, SCHEDULES
from clipscope.run.directory import setting_diff

__all__ = [
    "DTYPES",
    "LAST_BATCH",
    "MAX_SEED",
    "OPTIMIZER_SWITCHES",
    "RUN_ROUTES",
    "TASKS",
    "FitConfig",
    "TrainConfig",
    "check_device",
    "check_resources",
    "check_setting",
    "config_diff",
    "dump_config",
    "load_config",
    "parse_config",
]

# -- choice lists (each defined once; methods, schedules and dropout policies live with
# -- the code that implements them and are imported above) ------------------------------
TASKS = ("least_squares", "classification", "language_model")
LAST_BATCH = ("keep", "drop")
DTYPES = ("float32", "float64")
OPTIMIZER_SWITCHES = ("none", "nt-asgd")
#: Engine routes whose rows describe the run's own components (dyadic and per-sample
#: probe other batch sizes: no per-run rows).
RUN_ROUTES = ("auto", "two-pass", "keep")
#: Seeds are non-negative 64-bit signed integers (what torch and numpy both accept).
MAX_SEED = 2**63 - 1

_CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "method": METHODS,
    "schedule": SCHEDULES,
    "last_batch": LAST_BATCH,
    "route": RUN_ROUTES,
    "dropout": DROPOUT_POLICIES,
    "dtype": DTYPES,
    "optimizer_switch": OPTIMIZER_SWITCHES,
}
_INT_RANGE: dict[str, tuple[int, int | None]] = {
    "n_samples": (0, None),
    "dim": (1, None),
    "batch_size": (1, None),
    "bptt": (1, None),
    "heldout_tokens": (0, None),
    "data_seed": (0, MAX_SEED),
    "epochs": (0, None),
    "seed": (0, MAX_SEED),
    "nonmono": (1, None),
    "probe_every": (0, None),
    "smoothness_every": (0, None),
    "smoothness_max_iter": (1, None),
    "threads": (0, None),
    "checkpoint_every": (0, None),
    "keep_checkpoints": (1, None),
}
# (lowest, lowest allowed, highest, highest allowed)
_FLOAT_RANGE: dict[str, tuple[float, bool, float, bool]] = {
    "noise": (0.0, True, math.inf, False),
    "ar_alpha": (0.0, True, math.inf, False),
    "tar_beta": (0.0, True, math.inf, False),
    "lr": (0.0, False, math.inf, False),
    "momentum": (0.0, True, 1.0, False),
    "weight_decay": (0.0, True, math.inf, False),
    "schedule_gamma": (0.0, True, math.inf, False),
    "smoothness_tol": (0.0, False, 1.0, False),
}
_BOOL = {"heldout", "deterministic", "progress", "smoothness_components"}
_STRING = {"model", "data", "data_dir"}
#: Strings that may be empty ("" = the dataset's default).
_OPTIONAL_STRING = {"train_file", "heldout_file"}
#: Keys added after checkpoint format 2: left out of a resume's setting while at their
#: default, so runs started before they existed still resume.
_NEWER_KEYS = {"train_file": "", "heldout_file": ""}


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config: bad value for '{key}': {value!r} ({why})")


def _eta(key: str, value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        value = math.inf
    try:
        return check_eta(value)
    except (TypeError, ValueError) as exc:
        raise _bad(key, value, str(exc)) from None


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, "expected an integer")
    low, high = _INT_RANGE.get(key, (None, None))
    if low is not None and value < low:
        raise _bad(key, value, f"must be >= {low}")
    if high is not None and value > high:
        raise _bad(key, value, f"must be <= {high}")
    return value


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, "expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise _bad(key, value, "must be finite")
    low, low_ok, high, high_ok = _FLOAT_RANGE[key]
    if (
        value < low
        or (value == low and not low_ok)
        or value > high
        or (value == high and not high_ok)
    ):
        lo = "[" if low_ok else "("
        hi = "]" if high_ok else ")"
        raise _bad(key, value, f"must be in {lo}{low:g}, {high:g}{hi}")
    return value


def _device(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad("device", value, "expected a torch device such as 'cpu' or 'cuda:0'")
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise _bad("device", value, str(exc).strip().splitlines()[0]) from None
    return value


def check_setting(key: str, value: Any) -> Any:
    """Validate one setting and return it normalized (lists become tuples, ``"inf"`` a float).

    The one validator of every key of :class:`FitConfig` and :class:`TrainConfig`;
    the loop's units use it for their own arguments too.

    Raises
    ------
    ConfigError
        Naming the key, the value and why.

    >>> check_setting("etas", [0.5, "inf"])
    (0.5, inf)
    >>> check_setting("milestones", [3, 1])
    (1, 3)
    """
    if key in ("eta", "zhang_gamma"):
        return None if key == "zhang_gamma" and value is None else _eta(key, value)
    if key == "etas":
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, "expected a list of thresholds")
        return tuple(_eta(key, v) for v in value)
    if key == "milestones":
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, "expected a list of epochs")
        out = tuple(sorted(_int(key, v) for v in value))
        if any(v < 1 for v in out):
            raise _bad(key, list(value), "epochs where α is multiplied by gamma are >= 1")
        if len(set(out)) != len(out):
            raise _bad(key, list(value), "each epoch at most once")
        return out
    if key == "model_kwargs":
        if isinstance(value, tuple):  # already normalized
            value = dict(value)
        if not isinstance(value, dict):
            raise _bad(key, value, "expected an inline table such as {hidden = [32]}")
        return tuple(
            sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in value.items())
        )
    if key == "device":
        return _device(value)
    if key in _INT_RANGE:
        return _int(key, value)
    if key in _FLOAT_RANGE:
        return _float(key, value)
    if key in _BOOL:
        if not isinstance(value, bool):
            raise _bad(key, value, "expected true or false")
        return value
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise _bad(key, value, f"valid choices: {', '.join(_CHOICES[key])}")
        return value
    if key in _STRING:
        if not isinstance(value, str) or not value:
            raise _bad(key, value, "expected a non-empty string")
        return value
    if key in _OPTIONAL_STRING:
        if not isinstance(value, str):
            raise _bad(key, value, "expected a file name in data_dir (a string)")
        return value
    raise ConfigError(f"config: unknown key '{key}'")  # pragma: no cover - a field without a rule


def _validate_fields(obj: Any) -> None:
    """Validate and normalize every field of a frozen config dataclass in place."""
    for f in fields(obj):
        object.__setattr__(obj, f.name, check_setting(f.name, getattr(obj, f.name)))


_FIT_KEYS = (
    "method lr eta epochs seed momentum weight_decay schedule milestones schedule_gamma "
    "zhang_gamma optimizer_switch nonmono probe_every etas route dropout smoothness_every "
    "smoothness_components smoothness_tol smoothness_max_iter checkpoint_every "
    "keep_checkpoints progress"
).split()


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """The settings of :func:`clipscope.fit`'s loop (validated on construction).

    Raises :class:`~clipscope.errors.ConfigError` naming the first bad field.

    >>> FitConfig(lr=0.1, eta="inf").eta
    inf
    """

    # -- method ---------------------------------------------------------------
    method: str = "igc"  # sgd | igc | rr | shuffle_once | zhang (clipscope.methods)
    lr: float  # constant step α > 0 (the paper's methods)
    eta: float = math.inf  # clipping threshold η > 0; inf = no clipping
    epochs: int = 1  # epochs of m steps each; 0 = only the diagnostics at x_0
    seed: int = 0  # seed of the order's generator
    momentum: float = 0.0  # SGD momentum (not in the paper's methods)
    weight_decay: float = 0.0  # L2 decay added by the optimizer after clipping
    schedule: str = "constant"  # constant | step | cosine, stepped once per epoch
    milestones: tuple[int, ...] = ()  # step schedule: epochs (>= 1) where α is multiplied by gamma
    schedule_gamma: float = 0.1  # step schedule factor
    zhang_gamma: float | None = None  # method "zhang": the step-length cap γ (default η)
    optimizer_switch: str = "none"  # none | nt-asgd (average the iterates once heldout stalls)
    nonmono: int = 5  # NT-ASGD: compare with the best heldout of > nonmono checks ago
    # -- probes ---------------------------------------------------------------
    probe_every: int = 1  # probe at the start of every k-th epoch (and at the end); 0 = never
    etas: tuple[float, ...] = ()  # extra thresholds for the rho@η columns
    route: str = "auto"  # engine route for the run's own components: auto | two-pass | keep
    dropout: str = "off"  # dropout policy of the probes: off | fixed masks
    smoothness_every: int = 0  # Lanczos ‖∇²f(x_k)‖ at every k-th probe (and the last); 0 = off
    smoothness_components: bool = False  # also ‖∇²f_i(x_k)‖ per component (A5)
    smoothness_tol: float = 1e-4  # relative tolerance of the Lanczos stopping rule, in (0, 1)
    smoothness_max_iter: int = 30  # most Hessian-vector products per Lanczos solve
    # -- run directory and display --------------------------------------------
    checkpoint_every: int = 0  # also checkpoint every this many steps; 0 = epoch ends only
    keep_checkpoints: int = 3  # newest checkpoints kept (older ones pruned)
    progress: bool = True  # tqdm progress bars

    def __post_init__(self) -> None:
        _validate_fields(self)

    def setting(self) -> dict[str, Any]:
        """Every field but ``progress`` as plain values: what a resume must match."""
        return {k: v for k, v in _plain(self).items() if k != "progress"}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run. Flat on purpose: ``epochs.csv`` and reports read these keys by name."""

    # -- task ---------------------------------------------------------------
    task: str = "least_squares"  # least_squares (built in) | classification | language_model
    model: str = "linear"  # clipscope.models.build_model name (ignored by least_squares)
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # TOML inline table of build_model kwargs
    data: str = "synthetic"  # clipscope.data.load_splits name (ignored by least_squares)
    data_dir: str = "data"  # folder handed to loaders that read files (CIFAR-10, PTB)
    train_file: str = ""  # ptb / mikolov: the file in data_dir to train on ("" = ptb.train.txt)
    heldout_file: str = ""  # ptb / mikolov: the held-out file in data_dir ("" = ptb.valid.txt)
    n_samples: int = 256  # first N training samples (tokens for LMs); 0 = all
    dim: int = 8  # least_squares: number of features
    noise: float = 0.5  # least_squares: std of the label noise
    batch_size: int = 16  # component batch size B; m = ceil(N/B) components
    bptt: int = 35  # language_model: window length
    heldout_tokens: int = 0  # language_model: first N held-out tokens for perplexity; 0 = all
    ar_alpha: float = 0.0  # language_model: AR weight α in every f_i (awd_lstm_loss); 0 = off
    tar_beta: float = 0.0  # language_model: TAR weight β in every f_i (awd_lstm_loss); 0 = off
    last_batch: str = "keep"  # keep | drop the smaller last batch (recorded)
    data_seed: int = 0  # seed of the data and of the fixed partition, in [0, 2**63)
    # -- method (FitConfig) ---------------------------------------------------
    method: str = "igc"  # sgd | igc | rr | shuffle_once | zhang
    lr: float = 0.01  # constant step α (the paper's methods)
    eta: float = math.inf  # clipping threshold η > 0; inf = no clipping
    epochs: int = 10  # epochs of m steps each; 0 = only the diagnostics at x_0
    seed: int = 0  # seed of the model init and of the order's generator, in [0, 2**63)
    momentum: float = 0.0  # SGD momentum (not in the paper's methods)
    weight_decay: float = 0.0  # L2 decay added after clipping (not in the paper's methods)
    schedule: str = "constant"  # constant | step | cosine (per epoch)
    milestones: tuple[int, ...] = ()  # step schedule: epochs (>= 1) where α is multiplied by gamma
    schedule_gamma: float = 0.1  # step schedule factor
    optimizer_switch: str = "none"  # none | nt-asgd (average the iterates once heldout stalls)
    nonmono: int = 5  # NT-ASGD: compare with the best heldout of > nonmono epoch ends ago
    # -- probes (FitConfig) ---------------------------------------------------
    probe_every: int = 1  # probe at the start of every k-th epoch (and at the end); 0 = never
    etas: tuple[float, ...] = ()  # extra thresholds for the rho@η columns
    route: str = "auto"  # engine route for the run's own components: auto | two-pass | keep
    dropout: str = "off"  # dropout policy of the probes: off | fixed masks
    heldout: bool = True  # evaluate the held-out metric at each probe
    # -- smoothness (clipscope.loop.Smoothness; columns hess_norm, traj_smoothness) ---
    smoothness_every: int = 0  # Lanczos ‖∇²f(x_k)‖ at every k-th probe (and the last); 0 = never
    smoothness_components: bool = False  # also ‖∇²f_i(x_k)‖ per component (A5), in the .npz
    smoothness_tol: float = 1e-4  # relative tolerance of the Lanczos stopping rule, in (0, 1)
    smoothness_max_iter: int = 30  # most Hessian-vector products per Lanczos solve
    # -- runtime ------------------------------------------------------------
    device: str = "cpu"  # torch device (must exist here: check_resources)
    dtype: str = "float32"  # float32 | float64 parameters and data
    deterministic: bool = True  # torch.use_deterministic_algorithms
    threads: int = 0  # torch.set_num_threads, at most the CPUs here; 0 = torch's default
    checkpoint_every: int = 0  # also checkpoint every this many steps; 0 = epoch ends only
    keep_checkpoints: int = 3  # newest checkpoints kept (older ones pruned)
    progress: bool = True  # tqdm progress bars

    def __post_init__(self) -> None:
        _validate_fields(self)
        task = self.task
        for key in ("ar_alpha", "tar_beta"):
            if getattr(self, key) and task != "language_model":
                raise _bad(
                    key, getattr(self, key), f"AR/TAR need task = 'language_model', not {task!r}"
                )
        for key in ("train_file", "heldout_file"):
            if getattr(self, key) and self.data not in WORD_CORPORA:
                raise _bad(
                    key,
                    getattr(self, key),
                    f"names a file of a word-level corpus (data = {' or '.join(WORD_CORPORA)})",
                )
            if self.data == "mikolov" and not getattr(self, key):
                raise _bad(key, "", "data = 'mikolov' reads the two files the config names")
        if self.optimizer_switch == "nt-asgd":
            why = ""
            if task == "classification":
                why = "it triggers on a held-out metric where lower is better, not on accuracy"
            elif not self.heldout:
                why = "it triggers on the held-out metric: set heldout = true"
            if why:
                raise _bad("optimizer_switch", "nt-asgd", why)

    def fit_config(self) -> FitConfig:
        """Return the loop's settings: every :class:`FitConfig` field, by name."""
        return FitConfig(**{k: getattr(self, k) for k in _FIT_KEYS if hasattr(self, k)})

    def setting(self) -> dict[str, Any]:
        """Every field but ``progress`` as plain values: what a resume must match.

        Keys added after the checkpoint format (``train_file``, ``heldout_file``)
        are left out while at their defaults, so older runs resume unchanged.
        """
        return {
            k: v
            for k, v in self.to_dict().items()
            if k != "progress" and not (k in _NEWER_KEYS and v == _NEWER_KEYS[k])
        }

    def to_dict(self) -> dict[str, Any]:
        """Return all fields as plain values (tuples become lists, ``model_kwargs`` a dict)."""
        out = _plain(self)
        out["model_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs
        }
        return out


def _plain(config: Any) -> dict[str, Any]:
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in fields(config)
    }


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a dict (a parsed TOML file) into a :class:`TrainConfig`.

    A ``study`` table (read by ``clipscope reproduce``) is ignored.

    Raises
    ------
    ConfigError
        Naming the first unknown key or bad value.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a table of keys, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "study":
            continue
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(_FIELDS)})"
            raise ConfigError(f"config: unknown key '{key}'{hint}")
        values[key] = value
    return TrainConfig(**values)  # validates every value (check_setting)


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML config file (see :func:`parse_config`).

    Raises
    ------
    FileNotFoundError
        When there is no such file.
    ConfigError
        For invalid TOML or a bad key (the message starts with the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# -- what depends on the machine ------------------------------------------------------


def _available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platform specific
        return None


def check_device(device: str) -> None:
    """ConfigError naming ``device`` unless that torch device exists on this machine."""
    dev = torch.device(device)
    build = f"this torch build ({torch.__version__})"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _bad("device", device, f"{build} sees no CUDA device; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _bad("device", device, f"only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise _bad("device", device, f"{build} sees no MPS device; use 'cpu'")
    elif dev.type not in ("cpu", "meta"):
        raise _bad("device", device, "clipscope runs on cpu, cuda or mps")


def check_resources(config: TrainConfig) -> None:
    """Refuse what this machine cannot run, before anything is written.

    The device must exist; ``threads`` may not exceed the CPUs
    (``os.cpu_count()``: more only slows a run, and very many crash torch's
    thread pool at exit); the synthetic least-squares data must fit in the
    available memory (the message says how many bytes it would need).

    Raises
    ------
    ConfigError
        Naming the key.
    """
    check_device(config.device)
    cpus = os.cpu_count() or 1
    if config.threads > cpus:
        raise _bad("threads", config.threads, f"this machine has {cpus} CPUs; use at most that")
    if config.task == "least_squares":
        n = config.n_samples or 256
        itemsize = 8 if config.dtype == "float64" else 4
        need = (2 * n * (config.dim + 1) + config.dim) * itemsize
        have = _available_memory()
        if have is not None and need > have:
            key = "n_samples" if n / 256 >= config.dim / 8 else "dim"  # the further from default
            raise _bad(
                key,
                getattr(config, key),
                f"the least-squares data (2·n_samples × (dim + 1) {config.dtype} values) would "
                f"need {need:,} bytes; {have:,} bytes of memory are available",
            )


# -- writing and comparing -------------------------------------------------------------


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

    The comparison a resume makes (:func:`clipscope.run.directory.setting_diff`).

    >>> config_diff(TrainConfig(), TrainConfig(lr=0.1))
    ['lr: 0.01 -> 0.1']
    """
    return setting_diff(old.setting(), new.setting())
