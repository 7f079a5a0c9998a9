"""Settings: the one place they are parsed and validated, and the one home of each choice list.

Two frozen dataclasses, each setting declared once, one validator per key
(:func:`check_setting`):

* :class:`FitConfig` -- the training loop's settings (:func:`clipscope.fit`);
* :class:`TrainConfig` -- one flat TOML file per run (``clipscope train``): a
  subclass of :class:`FitConfig` that adds the task (model, data, partition,
  runtime), so every loop key is a TOML key under the same name
  (:meth:`TrainConfig.fit_config` hands them to the loop).

A new setting is one commented field line plus its rule in :func:`check_setting`
(and, when only some values of another setting read it, one line in a scope
table). Every field has a default and a comment saying what it means; a TOML
file only lists what it changes. A key that the rest of the config ignores --
``bptt`` or ``model`` for ``task = "least_squares"``, ``betas`` for
``optimizer = "sgd"``, ``momentum`` for Adam -- is refused unless it holds its
default. :func:`load_config` validates the whole file before
anything runs: an unknown key, a wrong type or a bad value raises
:class:`~clipscope.errors.ConfigError` (a ``ValueError``) naming the key. η may
be written ``eta = inf`` (a TOML float) or ``eta = "inf"``; ``eta``, every entry
of ``etas``, ``zhang_gamma``, ``eta_min`` and ``eta_max`` go through
:func:`~clipscope.math.stats.check_eta`. ``eta`` may instead name a rule that
sets η while training (:data:`clipscope.math.thresholds.RULES`:
``"descent-safe"`` with ``rho_target``, ``eta_min``, ``eta_max``; ``"autoclip"``
with ``autoclip_percentile``; :mod:`clipscope.loop.thresholds`). A TOML file may carry a ``[study]``
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

from clipscope.data.splits import NAMED_FILE_DATASETS, WORD_CORPORA
from clipscope.engine.guard import DROPOUT_POLICIES
from clipscope.errors import ConfigError
from clipscope.math.stats import check_eta
from clipscope.math.thresholds import RULES, check_percentile
from clipscope.methods import ADAPTIVE_OPTIMIZERS, METHODS, OPTIMIZERS, SCHEDULES
from clipscope.run.directory import setting_diff

__all__ = [
    "DTYPES",
    "FIT_KEYS",
    "LAST_BATCH",
    "MAX_SEED",
    "OPTIMIZER_SWITCHES",
    "PER_SAMPLE_ROUTES",
    "RUN_ROUTES",
    "TASKS",
    "FitConfig",
    "TrainConfig",
    "available_memory",
    "check_device",
    "check_per_sample_settings",
    "check_resources",
    "check_route",
    "check_setting",
    "config_diff",
    "dump_config",
    "load_config",
    "parse_config",
    "resume_setting",
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
#: The probe routes of per-sample components (``per_sample``: :func:`clipscope.probe` with
#: ``batch_sizes=[1]``): ``"auto"`` keeps the per-sample factors while they fit.
PER_SAMPLE_ROUTES = ("auto", "per-sample", "per-sample-kept")
#: Seeds are non-negative 64-bit signed integers (what torch and numpy both accept).
MAX_SEED = 2**63 - 1

_CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "method": METHODS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "last_batch": LAST_BATCH,
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
    "eps": (0.0, False, math.inf, False),
}
_BOOL = {"heldout", "deterministic", "progress", "smoothness_components", "per_sample"}
_STRING = {"model", "data", "data_dir"}
#: Strings that may be empty ("" = the dataset's default).
_OPTIONAL_STRING = {"train_file", "heldout_file"}
#: Keys added after checkpoint format 2: left out of a resume's setting while at their
#: default, so runs started before they existed still resume.
_NEWER_KEYS: dict[str, Any] = {
    "train_file": "",
    "heldout_file": "",
    "optimizer": "sgd",
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "zhang_gamma": None,
    "rho_target": 0.9,
    "eta_min": None,
    "eta_max": None,
    "autoclip_percentile": 10.0,
    "per_sample": False,
}


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config: bad value for '{key}': {value!r} ({why})")


def _eta(key: str, value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        value = math.inf
    try:
        return check_eta(value)
    except (TypeError, ValueError) as exc:
        raise _bad(key, value, _eta_why(key, value, str(exc))) from None


def _eta_why(key: str, value: Any, why: str) -> str:
    """``check_eta``'s reason, about ``key`` and readable from TOML and from Python alike."""
    if not why.startswith("eta must be a positive number"):  # a tensor's shape, an overflow
        return f"{key}{why[3:]}" if why.startswith("eta ") else why
    number = "a number > 0 or inf (TOML: inf; Python: math.inf or 'inf')"
    if key != "eta":
        return f"{'each of ' if key == 'etas' else ''}{key} must be {number}"
    why = f"eta must be {number}, or a threshold rule: {' or '.join(map(repr, RULES))}"
    if isinstance(value, str):
        close = [r for r in RULES if r == value.strip().lower()]
        close = close or difflib.get_close_matches(value.strip().lower(), RULES, n=1)
        if close:
            why += f"; did you mean {close[0]!r}? (the rules are lower case)"
    return why


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
    if key == "eta" and isinstance(value, str) and value in RULES:
        return value  # a threshold rule (clipscope.math.thresholds)
    if key in ("eta", "zhang_gamma", "eta_min", "eta_max"):
        return None if key != "eta" and value is None else _eta(key, value)
    if key == "rho_target":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, value, "expected a number in (0, 1]")
        if not 0.0 < float(value) <= 1.0:  # also NaN
            raise _bad(key, value, "the share of the unclipped descent to keep, in (0, 1]")
        return float(value)
    if key == "autoclip_percentile":
        try:
            return check_percentile(value)
        except ValueError as exc:
            raise _bad(key, value, str(exc)) from None
    if key == "etas":
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, "expected a list of thresholds")
        return tuple(_eta(key, v) for v in value)
    if key == "betas":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _bad(key, value, "expected two numbers [beta1, beta2], each in [0, 1)")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise _bad(key, list(value), "expected two numbers [beta1, beta2], each in [0, 1)")
        return (float(value[0]), float(value[1]))
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
    if key == "route":  # which of them, by per_sample: check_route
        if value not in RUN_ROUTES + PER_SAMPLE_ROUTES[1:]:
            raise _bad(
                key,
                value,
                f"valid choices: {', '.join(RUN_ROUTES)}; with per_sample = true: "
                f"{', '.join(PER_SAMPLE_ROUTES)}",
            )
        return value
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


def check_route(route: Any, per_sample: bool) -> str:
    """Return the probe's engine route; with ``per_sample`` one of :data:`PER_SAMPLE_ROUTES`.

    Without ``per_sample`` one of :data:`RUN_ROUTES` (the routes whose rows
    describe the run's own components). The one check of ``route`` against
    ``per_sample`` for :class:`FitConfig` and :class:`clipscope.Monitor`.

    Raises
    ------
    ConfigError
        A per-sample route without ``per_sample``, another route with it.

    >>> check_route("auto", True), check_route("keep", False)
    ('auto', 'keep')
    """
    if not per_sample:
        if route in PER_SAMPLE_ROUTES[1:]:
            raise _bad(
                "route", route, "it gives per-sample components: set per_sample=True as well"
            )
        if route not in RUN_ROUTES:
            raise _bad("route", route, f"valid choices: {', '.join(RUN_ROUTES)}")
        return route
    if route not in PER_SAMPLE_ROUTES:
        raise _bad("route", route, f"per_sample=True runs one of {', '.join(PER_SAMPLE_ROUTES)}")
    return route


def check_per_sample_settings(
    eta: Any, smoothness_every: int | None, *, loop: str, secants: bool = False
) -> None:
    """Refuse the settings that per-sample components (``per_sample=True``) cannot serve.

    ``eta = "descent-safe"`` would set ``loop``'s mini-batch clipping threshold
    from the ρ of clipping each sample's gradient; ``smoothness_every >= 1``
    asks for Lanczos ``‖∇²f‖``, which is measured over mini-batch components
    only. ``loop`` names the clip in the message (``"your loop's"``); ``secants``
    says that ``smoothness_every = 0`` still records the secants (the Monitor's).

    Raises
    ------
    ConfigError
        Naming the key.
    """
    if eta == "descent-safe":
        raise _bad(
            "eta",
            eta,
            f"with per_sample=True it would set the threshold of {loop} mini-batch clip from "
            "the ρ of clipping each sample's gradient; give a fixed eta (etas for more "
            "thresholds)",
        )
    if smoothness_every:
        raise _bad(
            "smoothness_every",
            smoothness_every,
            "the Hessian norm ‖∇²f‖ is measured over mini-batch components only, not with "
            "per_sample=True"
            + ("; smoothness_every=0 records the secants of the per-sample ∇f" if secants else ""),
        )


def resume_setting(values: dict[str, Any]) -> dict[str, Any]:
    """Return what a resume compares of plain setting values: all but ``progress``.

    Keys added after the checkpoint format (:data:`_NEWER_KEYS`) are left out
    while at their defaults, so runs started before they existed resume unchanged.

    >>> resume_setting({"lr": 0.1, "optimizer": "sgd", "progress": False})
    {'lr': 0.1}
    """
    return {
        k: v
        for k, v in values.items()
        if k != "progress" and not (k in _NEWER_KEYS and v == _NEWER_KEYS[k])
    }


def _validate_fields(obj: Any) -> None:
    """Validate and normalize every field of a frozen config dataclass in place."""
    for f in fields(obj):
        object.__setattr__(obj, f.name, check_setting(f.name, getattr(obj, f.name)))


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """The settings of :func:`clipscope.fit`'s loop (validated on construction).

    The one declaration of every loop setting: :class:`TrainConfig` inherits
    these fields under the same names (a new setting is one line here plus its
    rule in :func:`check_setting`).

    Raises :class:`~clipscope.errors.ConfigError` naming the first bad field, or
    a setting that does not apply (``betas`` with ``optimizer = "sgd"``,
    ``momentum`` with Adam, ``zhang_gamma`` without ``method = "zhang"``, ...).

    >>> FitConfig(lr=0.1, eta="inf").eta
    inf
    >>> FitConfig(lr=0.1, optimizer="adamw", betas=[0.9, 0.95], weight_decay=0.1).betas
    (0.9, 0.95)
    """

    # -- method ---------------------------------------------------------------
    method: str = "igc"  # sgd | igc | rr | shuffle_once | zhang (clipscope.methods)
    lr: float  # step size α > 0 (constant unless a schedule is set)
    eta: float | str = math.inf  # threshold η > 0; inf = no clipping; "descent-safe" | "autoclip"
    rho_target: float = 0.9  # eta = "descent-safe": keep ρ(η) >= this share, in (0, 1]
    eta_min: float | None = None  # eta = "descent-safe": lower bound of η (default none)
    eta_max: float | None = None  # eta = "descent-safe": upper bound of η (default inf)
    autoclip_percentile: float = 10.0  # eta = "autoclip": the percentile p, in (0, 100]
    epochs: int = 1  # epochs of m steps each; 0 = only the diagnostics at x_0
    seed: int = 0  # seed of the order's generator (clipscope train: also of the model init)
    # -- optimizer: it steps on C(∇f_i; η); the paper's methods are sgd without options -----
    optimizer: str = "sgd"  # sgd | adam | adamw (torch.optim; clipscope.methods.make_optimizer)
    momentum: float = 0.0  # sgd only: heavy-ball momentum, in [0, 1) (averages clipped gradients)
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw only: moment decay rates, in [0, 1)
    eps: float = 1e-8  # adam / adamw only: added to √v̂ in the denominator, > 0
    weight_decay: float = 0.0  # sgd / adam: L2 term λx added to C(g; η); adamw: decoupled decay
    schedule: str = "constant"  # constant | step | cosine, stepped once per epoch
    milestones: tuple[
        int, ...
    ] = ()  # schedule = "step": epochs (>= 1) where α is multiplied by gamma
    schedule_gamma: float = 0.1  # schedule = "step": the factor
    zhang_gamma: float | None = None  # method = "zhang": the step-length cap γ (default η)
    optimizer_switch: str = "none"  # none | nt-asgd (average the iterates once heldout stalls)
    nonmono: int = 5  # NT-ASGD: compare with the best heldout of > nonmono checks ago
    # -- probes ---------------------------------------------------------------
    probe_every: int = 1  # probe at the start of every k-th epoch (and at the end); 0 = never
    etas: tuple[float, ...] = ()  # extra thresholds for the rho@η columns
    route: str = "auto"  # probes: auto | two-pass | keep; per_sample: auto | per-sample[-kept]
    per_sample: bool = False  # probes only: every sample a component (m = N); the steps unchanged
    dropout: str = "off"  # dropout policy of the probes: off | fixed masks
    smoothness_every: int = 0  # Lanczos ‖∇²f(x_k)‖ at every k-th probe (and the last); 0 = off
    smoothness_components: bool = False  # also ‖∇²f_i(x_k)‖ per component (A5), in the .npz
    smoothness_tol: float = 1e-4  # relative tolerance of the Lanczos stopping rule, in (0, 1)
    smoothness_max_iter: int = 30  # most Hessian-vector products per Lanczos solve
    # -- run directory and display --------------------------------------------
    checkpoint_every: int = 0  # also checkpoint every this many steps; 0 = epoch ends only
    keep_checkpoints: int = 3  # newest checkpoints kept (older ones pruned)
    progress: bool = True  # tqdm progress bars

    def __post_init__(self) -> None:
        _validate_fields(self)
        _check_scopes(self, _LOOP_SCOPE)
        _check_rule(self)
        check_route(self.route, self.per_sample)
        if self.per_sample:
            check_per_sample_settings(self.eta, self.smoothness_every, loop="the loop's")
        if self.optimizer in ADAPTIVE_OPTIMIZERS:
            if self.method == "zhang":
                raise _bad(
                    "method",
                    "zhang",
                    "Zhang et al.'s step caps the length of an SGD step at γ; with "
                    f"optimizer = {self.optimizer!r} the step is not α·g: use optimizer = 'sgd'",
                )
            if self.optimizer_switch == "nt-asgd":
                raise _bad(
                    "optimizer_switch",
                    "nt-asgd",
                    "NT-ASGD (Merity et al., 2018) switches SGD to averaged SGD; it is not "
                    f"defined for optimizer = {self.optimizer!r}: use optimizer = 'sgd' or "
                    "optimizer_switch = 'none'",
                )

    def setting(self) -> dict[str, Any]:
        """Every field but ``progress`` as plain values: what a resume must match.

        Keys added after the checkpoint format (:data:`_NEWER_KEYS`: the data
        files, the optimizer's name and Adam's settings, ``zhang_gamma``) are
        left out while at their defaults, so older runs resume unchanged.
        """
        return resume_setting(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Return all fields as plain values (tuples become lists)."""
        return _plain(self)


#: The loop's fields, in declaration order (what :meth:`TrainConfig.fit_config` hands over).
FIT_KEYS = tuple(f.name for f in fields(FitConfig))


@dataclass(frozen=True, kw_only=True)
class TrainConfig(FitConfig):
    """A training run: the task, then every :class:`FitConfig` field under the same name.

    Flat on purpose: ``epochs.csv``, ``config.toml`` and reports read these keys
    by name. Keys that only some tasks read (``model``, ``data``, ``bptt``,
    ``dim``, ...: :data:`_TASK_SCOPE`) are refused by another task unless at
    their default.
    """

    # -- task ---------------------------------------------------------------
    task: str = "least_squares"  # least_squares (built in) | classification | language_model
    model: str = "linear"  # classification / LM: clipscope.models.build_model name
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # classification / LM: build_model kwargs
    data: str = "synthetic"  # classification / LM: clipscope.data.load_splits name
    data_dir: str = "data"  # classification / LM: folder of loaders that read files
    train_file: str = (
        ""  # LM on ptb / mikolov / chars: the file in data_dir to train on ("" = ptb.train.txt)
    )
    heldout_file: str = (
        ""  # LM on ptb / mikolov: the held-out file ("" = ptb.valid.txt; chars: last 10 %)
    )
    n_samples: int = 256  # first N training samples (tokens for LMs); 0 = all
    dim: int = 8  # least_squares: number of features
    noise: float = 0.5  # least_squares: std of the label noise
    batch_size: int = 16  # component batch size B; m = ceil(N/B) components
    bptt: int = 35  # language_model: window length
    heldout_tokens: int = 0  # language_model: first N held-out tokens for perplexity; 0 = all
    ar_alpha: float = 0.0  # language_model: AR weight α in every f_i (awd_lstm_loss); 0 = off
    tar_beta: float = 0.0  # language_model: TAR weight β in every f_i (awd_lstm_loss); 0 = off
    last_batch: str = "keep"  # keep | drop the smaller last batch (recorded)
    data_seed: int = 0  # least_squares / classification: seed of the data and partition
    heldout: bool = True  # evaluate the held-out metric at each probe
    # -- runtime ------------------------------------------------------------
    device: str = "cpu"  # torch device (must exist here: check_resources)
    dtype: str = "float32"  # float32 | float64 parameters and data
    deterministic: bool = True  # torch.use_deterministic_algorithms
    threads: int = 0  # torch.set_num_threads, at most the CPUs here; 0 = torch's default
    # -- a file's defaults where the loop has none or another -----------------
    lr: float = 0.01  # FitConfig.lr (required there)
    epochs: int = 10  # FitConfig.epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        task = self.task
        _check_scopes(self, _TASK_SCOPE)
        for key in ("train_file", "heldout_file"):
            if getattr(self, key) and self.data not in NAMED_FILE_DATASETS:
                raise _bad(
                    key,
                    getattr(self, key),
                    f"names a file of a word-level corpus (data = {' or '.join(WORD_CORPORA)}) "
                    "or of a character-level one (data = 'chars')",
                )
            if self.data == "mikolov" and not getattr(self, key):
                raise _bad(key, "", "data = 'mikolov' reads the two files the config names")
        if self.data == "chars" and not self.train_file:
            raise _bad("train_file", "", "data = 'chars' reads the text file the config names")
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
        return FitConfig(**{k: getattr(self, k) for k in FIT_KEYS})

    def to_dict(self) -> dict[str, Any]:
        """Return all fields as plain values (tuples become lists, ``model_kwargs`` a dict)."""
        out = _plain(self)
        out["model_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in self.model_kwargs
        }
        return out


_LIBRARY_TASKS = ("classification", "language_model")
_LM = ("language_model",)
#: Settings only some values of another setting read: key -> (that setting, its values).
#: A config refuses such a key at another value unless it holds its default (a resolved
#: ``config.toml`` lists every key, at its default where unused). Checked by the dataclass
#: that owns the deciding key (:func:`_check_scopes`).
_LOOP_SCOPE: dict[str, tuple[str, tuple[Any, ...]]] = {
    "momentum": ("optimizer", ("sgd",)),
    "betas": ("optimizer", ("adam", "adamw")),
    "eps": ("optimizer", ("adam", "adamw")),
    "zhang_gamma": ("method", ("zhang",)),
    "rho_target": ("eta", ("descent-safe",)),
    "eta_min": ("eta", ("descent-safe",)),
    "eta_max": ("eta", ("descent-safe",)),
    "autoclip_percentile": ("eta", ("autoclip",)),
    "milestones": ("schedule", ("step",)),
    "schedule_gamma": ("schedule", ("step",)),
}
_TASK_SCOPE: dict[str, tuple[str, tuple[Any, ...]]] = {
    "model": ("task", _LIBRARY_TASKS),
    "model_kwargs": ("task", _LIBRARY_TASKS),
    "data": ("task", _LIBRARY_TASKS),
    "data_dir": ("task", _LIBRARY_TASKS),
    "train_file": ("task", _LM),
    "heldout_file": ("task", _LM),
    "dim": ("task", ("least_squares",)),
    "noise": ("task", ("least_squares",)),
    "bptt": ("task", _LM),
    "heldout_tokens": ("task", _LM),
    "ar_alpha": ("task", _LM),
    "tar_beta": ("task", _LM),
    "data_seed": ("task", ("least_squares", "classification")),
}
_HINTS = {
    ("momentum", "adam"): "; Adam's momentum is betas[0]",
    ("momentum", "adamw"): "; AdamW's momentum is betas[0]",
}


def _check_rule(config: FitConfig) -> None:
    """ConfigError for a threshold rule where it cannot work (or bounds in the wrong order)."""
    eta = config.eta
    if eta not in RULES:
        return
    if config.method == "zhang":
        raise _bad(
            "eta",
            eta,
            "method = 'zhang' caps the step length at γ (default η), a number: give a number",
        )
    if eta == "descent-safe":
        if config.probe_every == 0:
            raise _bad(
                "probe_every",
                0,
                "eta = 'descent-safe' sets η at each probe from its η-profile: probe_every >= 1",
            )
        lo, hi = config.eta_min, config.eta_max
        if lo is not None and hi is not None and lo > hi:
            raise _bad("eta_min", lo, f"must be <= eta_max = {hi!r}")


def _check_scopes(config: Any, scope: dict[str, tuple[str, tuple[Any, ...]]]) -> None:
    """ConfigError naming a key set away from its default where its owner setting ignores it."""
    defaults = {f.name: f.default for f in fields(config)}
    for key, (owner, values) in scope.items():
        value, where = getattr(config, key), getattr(config, owner)
        if where in values or value == check_setting(key, defaults[key]):
            continue
        shown = " or ".join(repr(v) for v in values)
        raise _bad(
            key,
            dict(value) if key == "model_kwargs" else _plain_value(value),
            f"read only with {owner} = {shown}; this config has {owner} = {where!r}, "
            f"which ignores it: remove the key{_HINTS.get((key, where), '')}",
        )


def _plain_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain_value(v) for v in value]
    return value


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


def available_memory(device: str = "cpu") -> int | None:
    """Bytes of memory available now on ``device``, or None when unknown.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (else ``sysconf``); CUDA: the free
    memory ``torch.cuda.mem_get_info`` reports; other devices: None.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA here
            return None
    if dev.type != "cpu":
        return None
    return _available_memory()


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
    available memory (the message says how many bytes it would need). A
    library model's memory is checked where it is built, before it is
    allocated (:func:`clipscope.tasks.check_model_memory`: the model on the
    ``meta`` device needs the data's vocabulary).

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

    >>> cfg = parse_config({"task": "classification", "eta": 0.5, "model_kwargs": {"hidden": [8]}})
    >>> parse_config(tomllib.loads(dump_config(cfg))) == cfg
    True
    """
    lines = ["# clipscope resolved training config (every field; see clipscope.config)"]
    values = config.to_dict()
    task = [f.name for f in fields(config) if f.name not in FIT_KEYS]
    for header, keys in (("the task", task), ("the loop (clipscope.FitConfig)", FIT_KEYS)):
        lines.append(f"# -- {header}")
        # None (zhang_gamma's "default: η") has no TOML spelling: left out, read back as None
        lines += [f"{k} = {_toml_value(values[k])}" for k in keys if values[k] is not None]
    return "\n".join(lines) + "\n"


def config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Lines ``key: old -> new`` for every field that differs (``progress`` is ignored).

    The comparison a resume makes (:func:`clipscope.run.directory.setting_diff`).

    >>> config_diff(TrainConfig(), TrainConfig(lr=0.1))
    ['lr: 0.01 -> 0.1']
    """
    return setting_diff(old.setting(), new.setting())
