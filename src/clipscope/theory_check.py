r"""``clipscope theory``'s core: a run's theorem check, measuring what the run did not record.

:func:`theory_check` reads the run's records and checks them with
:func:`clipscope.report.theorem.check_theorem` (its docstring lists every
quantity). Where the run recorded no smoothness values it may measure them now
(:func:`measure_points`: Lanczos ``‖∇²f‖`` at ``x_0``, rebuilt from the seeded
config, and at every stored checkpoint); the report never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipscope.atomic import list_checkpoints, load_checkpoint
from clipscope.config import load_config
from clipscope.errors import CorruptCheckpointError, UnloadableCheckpointError
from clipscope.report.theorem import ESTIMATES, check_theorem
from clipscope.run.directory import load_run
from clipscope.smoothness import component_hessian_norms, hessian_norm
from clipscope.tasks import build_task

__all__ = ["ESTIMATES", "measure_points", "theory_check"]


def measure_points(run_dir: Path, cfg: Any, components: bool, tol: float) -> dict[str, Any]:
    """``(‖∇f‖, ‖∇²f‖)`` (and per component) at x_0 and at every valid stored checkpoint.

    Rebuilds the task from ``cfg`` (seeded, so ``x_0`` is the run's) and runs
    Lanczos (:func:`clipscope.smoothness.hessian_norm`, at most 100 products,
    relative tolerance ``tol``) at each point. Checkpoints that fail their
    checksum or cannot be loaded safely are skipped and listed.
    """
    model, loss_fn, comps, _ = build_task(cfg)
    states: list[tuple[str, Any]] = [("x0", None)]
    skipped = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        try:
            states.append((path.name, load_checkpoint(path)))
        except (CorruptCheckpointError, UnloadableCheckpointError, OSError) as exc:
            skipped.append(f"{path.name}: {exc}")
    points = []
    kw = {"tol": tol, "dropout": cfg.dropout, "seed": cfg.seed}
    for name, state in states:
        if state is not None:
            model.load_state_dict(state["model"])
        full = hessian_norm(model, loss_fn, comps, max_iter=100, **kw)
        loop = state.get("loop", {}) if state else {"epoch": 0, "step": 0}
        point = {"point": name, "epoch": loop.get("epoch"), "step": loop.get("step")}
        point |= full.to_dict()
        if components:
            per = component_hessian_norms(model, loss_fn, comps, max_iter=100, **kw)
            point["component_grad_norms"] = [r.grad_norm for r in per]
            point["component_hess_norms"] = [r.hess_norm for r in per]
            point["component_converged"] = all(r.converged for r in per)
        points.append(point)
    return {"points": points, "skipped_checkpoints": skipped, "m": len(comps)}


def theory_check(
    run_dir: str | Path,
    *,
    fit: str = "hull",
    measure: bool = True,
    tol: float = 1e-6,
    components: bool = False,
) -> dict[str, Any]:
    """Check one run against the paper's theorem for its method.

    Parameters
    ----------
    run_dir : str or Path
        A run directory (``config.toml`` and ``epochs.csv``).
    fit : {"hull", "quantile"}
        The (L0, L1) fit of :func:`clipscope.math.smoothness.fit_l0_l1`.
    measure : bool
        Whether missing smoothness values may be measured now from the
        checkpoints (Hessian-vector products); False never touches a model.
        A ``Monitor``'s run (``kind = "monitor"`` in ``config.toml``) is never
        measured: its model is the user's, not one a config rebuilds.
    tol : float
        Relative Lanczos tolerance of such measurements.
    components : bool
        Also the per-component constants for a method other than IGC-clip.

    Returns
    -------
    dict
        See :func:`clipscope.report.theorem.check_theorem`.

    Raises
    ------
    FileNotFoundError
        When ``run_dir`` is not a run directory.
    ValueError
        When ``epochs.csv`` has no rows, or ``fit`` is unknown.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file() or not (run_dir / "epochs.csv").is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a clipscope run directory (needs config.toml and epochs.csv)"
        )
    record = load_run(run_dir)
    if record.setting("kind") in ("monitor", "fit"):  # the caller's model: nothing to rebuild
        measure = False

    def measured(want_components: bool) -> dict[str, Any]:
        return measure_points(run_dir, load_config(run_dir / "config.toml"), want_components, tol)

    return check_theorem(
        record, fit=fit, components=components, measure=measured if measure else None
    )
