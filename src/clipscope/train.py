"""``clipscope train``'s entry: a TOML config becomes a crash-safe run directory.

:func:`train` reads and validates the config (:mod:`clipscope.config`), checks
what depends on this machine, builds the task (:mod:`clipscope.tasks`) and runs
:func:`clipscope.loop.fit_loop` into a :class:`~clipscope.run.directory.RunDirectory`
whose resume check compares every key of the resolved config. Every refusal
comes before anything is written.

Exit codes (:data:`EXIT_CODES`): 0 done, 2 bad config or refused directory
(raised as :class:`~clipscope.errors.ConfigError` / :class:`FileExistsError`;
the CLI turns them into 2), 3 non-finite loss, gradient or step (the last good
checkpoint kept, ``summary.json`` says ``nonfinite``), 4 I/O error such as a
full disk (existing files left intact), 5 another process of a
``torchrun`` job died or timed out (the last checkpoint intact), 130 SIGINT
and 143 SIGTERM (checkpointed at the next component boundary, ``--resume``
continues).

Under ``torchrun`` (``WORLD_SIZE`` > 1) it initialises the process group
itself (gloo on CPU, NCCL for ``device = "cuda"``, each rank on
``cuda:LOCAL_RANK``); every rank trains (each component's batch split over
them), rank 0 alone prints and writes (``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from clipscope.config import TrainConfig, check_resources, dump_config, load_config
from clipscope.engine import distributed as _dist
from clipscope.errors import Interrupted, NonFiniteError
from clipscope.loop import fit_loop
from clipscope.run.directory import RunDirectory
from clipscope.tasks import build_task

__all__ = ["EXIT_CODES", "train"]

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_IO, EXIT_DISTRIBUTED = 0, 2, 3, 4, 5
EXIT_CODES = {
    "completed": EXIT_OK,
    "config": EXIT_CONFIG,
    "nonfinite": EXIT_NONFINITE,
    "io": EXIT_IO,
    "distributed": EXIT_DISTRIBUTED,
    "SIGINT": 130,
    "SIGTERM": 143,
}


@contextlib.contextmanager
def torch_settings(cfg: TrainConfig) -> Iterator[None]:
    """Set the run's threads and determinism flag; restore them afterwards (in-process runs)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(
    config_path: str | Path,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    echo: Callable[[str], None] | None = None,
    dist_timeout: float | None = None,
) -> int:
    """Run ``clipscope train CONFIG [--out DIR] [--resume] [--force]``; return the exit code.

    ``out`` defaults to ``runs/<config stem>``. Messages go to ``echo`` (default:
    ``tqdm.write``) and to ``train.log`` in the run directory (rank 0 only under
    ``torchrun``; ``dist_timeout`` seconds bound each collective, default
    ``CLIPSCOPE_DIST_TIMEOUT`` or 600).

    Raises
    ------
    FileNotFoundError
        No such config file.
    ConfigError
        A bad key or value, a device or thread count this machine does not
        have, data too large for its memory, a resume with other settings
        (without ``force``); nothing has been written.
    FileExistsError
        ``out`` is a file, or holds files and ``resume`` is False.
    RanksDisagree
        Under ``torchrun``: the ranks were given different configs, data or models.
    """
    if echo is None:
        from tqdm.auto import tqdm

        echo = tqdm.write
    cfg = load_config(config_path)
    check_resources(cfg)
    out = Path(out) if out is not None else Path("runs") / Path(config_path).stem
    owned = _dist.init_from_env(cfg.device, dist_timeout)  # under torchrun
    try:
        return _train(cfg, out, resume, force, on_step, echo)
    finally:
        if owned:
            _dist.shutdown()


def _train(cfg, out, resume, force, on_step, echo) -> int:
    writer = _dist.is_writer()
    if not writer:
        echo = _silent

    def log(text: str) -> None:
        echo(text)
        if writer and out.is_dir():
            try:
                with open(out / "train.log", "a") as handle:
                    handle.write(text + "\n")
            except OSError:
                pass

    directory = RunDirectory(
        out, setting=cfg.setting(), files={"config.toml": dump_config(cfg)}, log=log
    )
    with torch_settings(cfg):
        model, loss_fn, components, heldout = build_task(cfg)
        try:
            history = fit_loop(
                model, loss_fn, components, cfg.fit_config(), heldout=heldout,
                run_dir=directory, resume=resume, force=force, on_step=on_step, log=log,
            )  # fmt: skip
        except NonFiniteError as exc:
            log(f"error: {exc}")
            return EXIT_NONFINITE
        except Interrupted as exc:
            log(f"interrupted: {exc}; continue with --resume")
            return 128 + int(exc.signum)
        except FileExistsError:
            raise  # a refused directory: exit 2, nothing written
        except OSError as exc:
            echo(f"error: I/O failure in {out}: {exc}; files already written are intact")
            return EXIT_IO
        except _dist.DistributedError as exc:
            import sys

            print(f"clipscope train: error: {exc}", file=sys.stderr)  # every rank says it
            return EXIT_DISTRIBUTED
    last = history.rows[-1] if history.rows else {}
    log(
        f"done: {history.steps} steps, {len(history.rows)} probe rows in {out}"
        + (f"; f(x)={last['loss']:.6g}, ‖∇f‖={last['grad_norm']:.4g}" if last else "")
    )
    return EXIT_OK


def _silent(text: str) -> None:
    pass
