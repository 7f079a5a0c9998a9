r"""The per-sample routes of the probe: every sample of the given components is a component.

``"per-sample"`` and ``"per-sample-kept"`` (:func:`run_per_sample`) treat the
given components as chunks of samples; each sample ``j`` is a component of
batch size 1 with loss ``ℓ_j``, and ``∇f = (1/N) Σ_j ∇ℓ_j``. One attempt
(:meth:`_Attempt.run`) runs in named steps:

1. **pass 1, per chunk** (:meth:`_Attempt.pass1_chunk`): the chunk's losses and
   ``Σ_j ∇ℓ_j`` for ∇f -- a plain backward (two passes, :func:`_chunk_gradient`),
   or :func:`~clipscope.engine.per_sample.ghost_pass` with its per-sample norms
   (and, on ``"per-sample-kept"``, the chunk's factors while they fit
   ``memory_budget``: :meth:`_Attempt.keep_or_drop`);
2. **between the passes** (:meth:`_Attempt.between`): ∇f, every rank's plan
   merged (:func:`_merge_plan`), what pass 2 takes its dots from;
3. **pass 2, per chunk** (:meth:`_Attempt.pass2_chunk`): the chunk's factors
   (kept, formed again, or by ``ghost_pass(keep=True, actual=...)``), then the
   **dot step** (:meth:`_Attempt.dots_step`), the **spot step**
   (:meth:`_Attempt.spot_step`: the spot samples' own backward against the
   route's norms and dot) and the **clipped-sum step**
   (:meth:`_Attempt.clipped_step`: ``Σ_j γ_j(η) g_j`` from the factors, or one
   backward of ``Σ_j γ_j(η) ℓ_j`` per η);
4. the **result** (:meth:`_Attempt.result`): every rank's pieces completed.

:func:`run_per_sample` repeats the attempt after a failed spot check with the
parameters concerned (or the dots) on the exact fallback (:func:`_demote_after`).
The layer rules, the ghost pass and the fallbacks are in
:mod:`clipscope.engine.per_sample`; this module never names a layer.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from clipscope.engine import per_sample, verify
from clipscope.engine.common import (
    gammas,
    norm64,
    norm_and_cos,
    preconditioned_clipped,
    progress_bar,
)
from clipscope.engine.guard import dropout_policy, rng_for_component
from clipscope.engine.per_sample._common import dense_grad
from clipscope.engine.per_sample.batch import kernels_for_derivatives, randomness_active
from clipscope.engine.per_sample.fallback import fallback_stats, per_sample_grads
from clipscope.engine.per_sample.plan import Event, Plan
from clipscope.errors import NonFiniteError

__all__ = ["run_per_sample"]

# two-pass per-sample route (and the rebuild after kept factors were dropped): a chunk whose
# fallback parameters' per-sample gradients would exceed this many elements keeps no factors
# in pass 2 (its dots and clipped sums then come from the dot pass and one backward per η,
# in bounded memory)
_LIGHT_ROWS = 1 << 24


def run_per_sample(
    model,
    loss_fn,
    components,
    flat,
    etas,
    dropout,
    seed,
    progress,
    strict,
    spot_checks,
    shard,
    *,
    keep_factors,
    memory_budget,
    precond=None,
):
    """Batch-size-1 components; the given components are processed as chunks.

    Kept factors (``keep_factors``): pass 1 per chunk is
    :func:`~clipscope.engine.per_sample.ghost_pass` with ``keep=True`` (per-sample
    ``‖∇ℓ_j‖²`` by the layer rules, each checked structurally, ``ℓ_j``,
    ``∇Σ_j ℓ_j`` and the chunk's factors), so ``∇f = (1/N) Σ_j ∇ℓ_j``; pass 2
    takes the dots and the γ-weighted sums from the kept factors.

    Two passes: pass 1 per chunk is one plain backward of ``Σ_j ℓ_j``
    (:func:`_chunk_gradient`), whose gradient is kept only as its norm and its
    projections on the structural check's directions; pass 2 per chunk is
    ``ghost_pass(keep=True, actual=...)`` (a backward w.r.t. the layer outputs
    only), and the chunk's norms, dots and γ-weighted sums come from its
    factors. After a dot fallback, the classic order: ``ghost_pass`` norms in
    pass 1; in pass 2 :func:`~clipscope.engine.per_sample.per_sample_dots` and
    ``∇ Σ_j γ_j(η) ℓ_j`` by one backward per η. Factors dropped over the budget
    in pass 1 of an ``auto`` attempt: pass 2 forms each chunk's factors again
    when η are given, else takes the dot pass. Then the spot check of the
    chunk's spot samples. Chunk ``c`` runs under the ``"fixed"`` dropout seed
    ``(seed, c)`` in both passes.

    A failed spot check moves the parameters concerned (or the dots) to the
    exact fallback and runs the probe again; after two such rounds everything
    is on the fallback, and a third failure raises: the components are then not
    reproducible (unseeded randomness) and nothing can be trusted.

    ``shard``: this rank's chunks; the plan's fallbacks and the spot checks'
    failures are merged over the ranks (:func:`_merge_plan`), so every rank
    takes the same decisions and returns the same record.

    ``keep_factors`` (``"auto"``, ``"required"`` or False): pass 1 also keeps each
    chunk's per-sample gradients in factored form
    (:class:`~clipscope.engine.per_sample.kept.KeptChunk`) while their estimated
    total fits ``memory_budget`` (per process: this rank's chunks); pass 2 then
    takes the chunk's dots and γ-weighted sums from them instead of running the
    model. ``"auto"`` drops them when they do not fit (on every rank when on
    one); ``"required"`` raises ``ValueError``.

    ``precond`` (a :class:`~clipscope.engine.preconditioner.Preconditioner`): the
    dot step also takes ``⟨g_j, u⟩`` with ``u = P⁻¹∇f`` from the same factors (or a
    second dot pass), and the spot step checks it against the spot samples' own
    gradients.

    Returns ``([result], record)``: the route's sums for
    :func:`~clipscope.engine.common.package` and the verification record.
    """
    n_samples = int(sum(components.sizes))
    spot = verify.spot_samples(n_samples, spot_checks, seed)
    # every forward of one attempt with the same kernels: a dropout mask is drawn in memory
    # order, and oneDNN's LSTM lays its output out differently. oneDNN is only ever turned
    # off for models with recurrent modules (kernels_for_derivatives), and their pass 2 is
    # the reverse-mode ghost product (dot_method), not forward-mode AD, which oneDNN's LSTM
    # lacks: so every attempt keeps the model's own kernels, kept factors or not, and an
    # auto attempt whose factors are dropped over the budget goes on as two passes. Only
    # a dot fallback after a failed spot check runs with oneDNN off.
    with dropout_policy(model, dropout):
        plan = Plan(model, flat.params, seed=seed, strict=strict)
        for attempt in range(3):
            with kernels_for_derivatives(model, onednn=plan.dots_fallback is None):
                result, failures = _Attempt(
                    model, loss_fn, components, flat, etas, dropout, seed, plan, spot, shard,
                    keep_factors, memory_budget, precond,
                ).run(progress)  # fmt: skip
            from_factors = result.pop("dots_from_factors")
            if not result["factors"]["kept"]:
                keep_factors = False  # a rerun does not try again what did not fit
            if not failures["params"] and failures["dots"] is None:
                break
            _demote_after(plan, failures, from_factors, attempt)
    record = plan.record()
    record.update(result.pop("spot"))
    record["factors"] = result.pop("factors")
    record["attempts"] = attempt + 1
    return [result], record


def _demote_after(plan, failures, from_factors, attempt) -> None:
    """Move what a failed attempt (0, 1, 2) blames to the fallback; raise after the third."""
    if attempt == 2:
        raise verify.VerificationError(
            "per-sample spot check failed even with every quantity from exact per-sample "
            f"gradients ({failures}): the components are not reproducible (randomness "
            "that the dropout policy does not control?)"
        )
    # passes that saw other random numbers say nothing about the rules: the dots go
    # to per-sample gradients (the classic order), the parameters stay
    differ = failures.get("passes_differ", False)
    if failures["params"] and not differ:  # one event; each parameter keeps its own reason
        failed = failures["params"]
        first = next(iter(failed.values()))
        reason = first if len(failed) == 1 else f"{len(failed)} parameters, the first: {first}"
        plan.demote(list(failed), "spot-norm", reason, own=failed)
    # dots from factors (kept or rebuilt): a parameter's wrong split makes its dots
    # wrong too; rerun with it on the fallback before blaming the dots (a second dot
    # failure demotes them)
    blame_params = from_factors and failures["params"] and attempt == 0 and not differ
    if failures["dots"] is not None and not blame_params:
        plan.demote_dots("spot-dot", failures["dots"])
    if attempt == 1:  # the second failure: nothing from the rules any more
        plan.demote(range(len(plan.params)), "spot-norm", "a second spot-check failure")
        plan.demote_dots("spot-dot", "a second spot-check failure")


class _Attempt:
    """The state of one attempt of the per-sample route, and its steps (module docstring).

    Two passes (no factors kept, ``light``): pass 1 only sums the chunks' gradients
    for ∇f, and pass 2 forms each chunk's factors (pass 1 of the kept route, one
    chunk at a time) and takes the norms, the dots and the clipped sums from them.
    After a dot fallback: the classic order (norms in pass 1, dots by the dot pass).
    """

    def __init__(
        self, model, loss_fn, components, flat, etas, dropout, seed, plan, spot, shard,
        keep_factors, memory_budget, precond=None,
    ) -> None:  # fmt: skip
        self.model, self.loss_fn, self.components, self.flat = model, loss_fn, components, flat
        self.precond = precond
        self.etas, self.dropout, self.seed = etas, dropout, seed
        self.plan, self.spot, self.shard = plan, spot, shard
        self.keep_factors, self.memory_budget = keep_factors, memory_budget
        self.n_samples = n_samples = int(sum(components.sizes))
        self.sq_norms, self.losses = np.zeros(n_samples), np.zeros(n_samples)
        self.sum_grad = torch.zeros(flat.n, dtype=torch.float64, device=flat.device)
        self.offsets = offsets = np.concatenate([[0], np.cumsum(components.sizes)]).astype(int)
        self.spot_sq: dict[int, dict[int, float]] = {}
        self.ghost_losses: list[torch.Tensor] = []
        self.kept: list = []  # each chunk's KeptChunk while the factors fit the budget
        self.factors = {
            "kept": bool(keep_factors), "bytes": 0, "budget": memory_budget, "reason": None
        }  # fmt: skip
        # this rank's samples, and those seen so far (the budget's estimate)
        self.mine = int(sum(offsets[c + 1] - offsets[c] for c in shard.indices))
        self.seen = 0
        self.required, self.requested = keep_factors == "required", bool(keep_factors)
        self.light = not keep_factors and plan.dots_fallback is None
        self.reduced = flat.dtype not in (torch.float32, torch.float64)
        # light, float32/64: each chunk's ∇Σ_j ℓ_j as its norms and projections
        self.actual: list = []

    def run(self, progress: bool):
        """Pass 1, between the passes, pass 2: ``(result, failures)``."""
        shard = self.shard
        for c in progress_bar(shard.indices, len(shard), progress, "per-sample pass 1"):
            self.pass1_chunk(c)
        self.agree_on_factors()
        self.between()
        for c in progress_bar(shard.indices, len(shard), progress, "per-sample pass 2"):
            self.pass2_chunk(c)
        return self.result()

    def _chunk(self, c: int):
        """Chunk ``c``'s batch on the parameters' device and its samples ``[a, b)``."""
        x, y = self.components.batch(c, self.flat.device)
        return x, y, self.offsets[c], self.offsets[c + 1]

    def _rng(self, c: int):
        return rng_for_component(self.dropout, self.seed, c)

    def _note_spot(self, ghost, a: int, b: int) -> None:
        """Keep the per-parameter norms of the spot samples among ``[a, b)``."""
        spot = self.spot
        for j in spot[(spot >= a) & (spot < b)]:
            self.spot_sq[int(j)] = {k: float(v[j - a]) for k, v in ghost.per_param.items()}

    # -- pass 1 ----------------------------------------------------------------
    def pass1_chunk(self, c: int) -> None:
        """Chunk ``c``'s losses and ``Σ_j ∇ℓ_j``; its norms and factors unless ``light``."""
        flat, plan = self.flat, self.plan
        x, y, a, b = self._chunk(c)
        with self._rng(c):
            if self.light:
                ghost = None
                ell, grad_sum = _chunk_gradient(
                    self.model, self.loss_fn, x, y, flat, plan, self.reduced
                )
            else:
                try:
                    ghost = per_sample.ghost_pass(
                        self.model, self.loss_fn, x, y, plan=plan, keep=bool(self.keep_factors)
                    )
                except NonFiniteError as exc:  # name the chunk and its samples, as below
                    raise NonFiniteError(f"chunk {c} (samples {a}..{b - 1}): {exc}") from exc
                ell, grad_sum = ghost.losses, ghost.grad_sum
                self.sq_norms[a:b] = ghost.sq_norms.detach().double().cpu().numpy()
        self.losses[a:b] = ell.detach().double().cpu().numpy()
        finite = np.isfinite(self.sq_norms[a:b]).all() and np.isfinite(self.losses[a:b]).all()
        if not finite or not _finite_parts(grad_sum):
            raise NonFiniteError(f"chunk {c}: non-finite per-sample gradient; nothing was changed")
        for part, g in zip(flat.unflatten(self.sum_grad), grad_sum, strict=True):
            part += g  # float64 views of sum_grad, one per parameter
        self.ghost_losses.append(ell)
        if ghost is None:
            if not self.reduced:  # what pass 2's structural check compares with
                self.actual.append(
                    [(float(torch.linalg.vector_norm(g)), d.of_tensor(g))
                     for g, d in zip(grad_sum, plan.directions, strict=True)]
                )  # fmt: skip
            return
        self._note_spot(ghost, a, b)
        if self.keep_factors:
            self.keep_or_drop(ghost.kept, b - a)

    def keep_or_drop(self, chunk, samples: int) -> None:
        """Keep a chunk's factors while the estimate for all of them fits the budget."""
        factors, budget = self.factors, self.memory_budget
        self.kept.append(chunk)
        factors["bytes"] += chunk.nbytes
        self.seen += samples
        estimate = int(factors["bytes"] * self.mine // self.seen)  # all chunks, from those seen
        if estimate <= budget:
            return
        reason = (
            f"the per-sample factors need about {estimate} bytes (from {self.seen} of "
            f"{self.mine} samples), more than memory_budget={budget}"
        )
        if self.required and self.shard.ranks is None:
            raise ValueError(
                f"route='per-sample-kept': {reason}; use route='per-sample' (two "
                "passes, bounded memory) or a larger memory_budget"
            )
        self.keep_factors, self.kept = False, []
        factors.update(kept=False, bytes=estimate, reason=reason)

    def agree_on_factors(self) -> None:
        """Under torch.distributed every rank keeps its factors, or none does."""
        shard, factors = self.shard, self.factors
        if not self.requested or shard.ranks is None:
            return
        states = shard.objects((factors["kept"], factors["bytes"], factors["reason"]))
        failed = next((s for s in states if not s[0]), None)
        if failed is None:
            factors["bytes"] = max(s[1] for s in states)  # the largest rank's, as the budget
            return
        if self.required:
            raise ValueError(
                f"route='per-sample-kept': {failed[2]} (on one rank); use "
                "route='per-sample' (two passes, bounded memory) or a larger memory_budget"
            )
        self.kept = []
        factors.update(kept=False, bytes=failed[1], reason=failed[2])

    # -- between the passes ----------------------------------------------------
    def between(self) -> None:
        """∇f, every rank's plan, and where pass 2 takes its dots and clipped sums from."""
        flat, plan, shard, etas = self.flat, self.plan, self.shard, self.etas
        self.gam = None
        if not self.light:  # (the light attempt's norms come in pass 2)
            self.sq_norms, self.losses = shard.complete(
                self.sq_norms, self.losses, offsets=self.offsets
            )
            self.gam = torch.from_numpy(gammas(np.sqrt(self.sq_norms), etas)).to(flat.device)
        self.full = shard.sum_(self.sum_grad) / self.n_samples
        _merge_plan(plan, shard)  # pass 2 runs with every rank's fallbacks, as one process would
        self.vector = list(flat.unflatten(self.full))
        self.gnorm = norm64(self.full)
        # the preconditioned direction u = P⁻¹∇f, and each sample's dot with it
        self.u = None if self.precond is None else self.precond.direction(self.full)
        self.u_vector = None if self.u is None else list(flat.unflatten(self.u))
        self.unorm = None if self.u is None else norm64(self.u)
        self.pdots = np.zeros(self.n_samples)
        self.clip_acc = torch.zeros(len(etas), flat.n, dtype=torch.float64, device=flat.device)
        self.dots = np.zeros(self.n_samples)
        self.tol = verify.tolerance(flat.dtype)
        self.failures: dict[str, Any] = {"params": {}, "dots": None}
        self.spot_record = {
            "spot_checks": len(self.spot),
            "spot_samples": self.spot.tolist(),
            "spot_seed": int(self.seed),
            "spot_max_norm_error": 0.0,
            "spot_max_dot_error": 0.0,
            "tolerance": self.tol,
        }
        if self.u is not None:
            self.spot_record["spot_max_pdot_error"] = 0.0
        self.batch1 = sorted(plan.batch1)
        # a dot that failed its spot check is not taken from the same factors again
        self.use_kept = bool(self.kept) and plan.dots_fallback is None
        # Factors dropped over the budget in pass 1, η given: pass 2 forms each chunk's factors
        # again, and its dots and every clipped sum follow from them: one forward and backward
        # instead of the dot pass, a forward and a backward per η
        self.rebuild = (
            not (self.use_kept or self.light) and bool(etas) and plan.dots_fallback is None
        )
        # (the same on every rank: a failed dot blames the parameters first)
        self.from_factors = self.use_kept or self.rebuild or self.light

    # -- pass 2 ----------------------------------------------------------------
    def pass2_chunk(self, c: int) -> None:
        """Chunk ``c``'s factors, then its dot step, spot step and clipped-sum step."""
        x, y, a, b = self._chunk(c)
        if self.light:
            formed = self.light_factors(c, x, y, a, b)
            if formed is None:  # other random numbers than pass 1: nothing of the chunk
                return
            chunk, gam_c = formed
        else:
            chunk = self.kept[c - self.shard.start] if self.use_kept else None
            gam_c = self.gam[:, a:b]
        if self.rebuild:
            chunk = self.factors_again(c, x, y)
        self.dots_step(c, x, y, a, b, chunk)
        self.spot_step(c, x, y, a, b)
        if self.etas:
            self.clipped_step(c, x, y, b - a, chunk, gam_c)

    def light_factors(self, c, x, y, a, b):
        """Two passes: ``ghost_pass(keep=True, actual=...)`` gives the chunk's norms and factors.

        Returns ``(factors or None, γ of the chunk)``, or None when the chunk's
        losses differ from pass 1's: ∇f, the rules' check and the dots would then
        mix two sets of components, so the attempt is redone in the classic order
        with the dots from per-sample gradients (this chunk's numbers stay 0).
        """
        start = self.shard.start
        given = self.actual[c - start] if self.actual else None
        with self._rng(c):
            ghost = per_sample.ghost_pass(
                self.model, self.loss_fn, x, y, plan=self.plan, keep=True, actual=given,
                expect_losses=self.ghost_losses[c - start], keep_limit=_LIGHT_ROWS,
            )  # fmt: skip
        if ghost.mismatch is not None:
            self.failures["passes_differ"] = True
            if self.failures["dots"] is None:
                self.failures["dots"] = (
                    f"chunk {c}: pass 2 does not reproduce pass 1's losses ({ghost.mismatch})"
                )
            return None
        self.sq_norms[a:b] = ghost.sq_norms.detach().double().cpu().numpy()
        if not np.isfinite(self.sq_norms[a:b]).all():
            raise NonFiniteError(f"chunk {c}: non-finite per-sample gradient; nothing was changed")
        self._note_spot(ghost, a, b)
        gam_c = torch.from_numpy(gammas(np.sqrt(self.sq_norms[a:b]), self.etas))
        # ghost.kept is None: the fallback's rows over _LIGHT_ROWS (the dot pass instead)
        return ghost.kept, gam_c.to(self.flat.device)

    def factors_again(self, c, x, y):
        """Factors dropped over the budget: the chunk's factors formed again, or None.

        None when the chunk's losses differ from pass 1's (other masks): it then
        takes the dot pass and the backwards.
        """
        with self._rng(c):
            again = per_sample.ghost_pass(
                self.model, self.loss_fn, x, y, plan=self.plan, keep=True, keep_limit=_LIGHT_ROWS
            )
        expected = self.ghost_losses[c - self.shard.start]
        differ = verify.losses_differ(again.losses, expected, self.flat.dtype)
        return again.kept if differ is None else None

    def dots_step(self, c, x, y, a, b, chunk) -> None:
        """``⟨g_j, ∇f⟩`` (and ``⟨g_j, u⟩``) of the chunk's samples: factors, else the dot pass.

        The dot pass (after a dot fallback, or where no factors were formed) runs
        once per direction.
        """
        vectors = [self.vector] if self.u_vector is None else [self.vector, self.u_vector]
        out = []
        for vector in vectors:
            if chunk is not None:
                d = chunk.dots(vector)
            else:
                with self._rng(c):
                    d = per_sample.per_sample_dots(
                        self.model, self.loss_fn, x, y, vector, plan=self.plan,
                        expect_losses=self.ghost_losses[c - self.shard.start],
                    )  # fmt: skip
            out.append(d.detach().double().cpu().numpy())
        self.dots[a:b] = out[0]
        if len(out) > 1:
            self.pdots[a:b] = out[1]

    def spot_step(self, c, x, y, a, b) -> None:
        """Compare the chunk's spot samples' own backward with the route's norms and dots."""
        spot = self.spot
        local = [int(j) - a for j in spot[(spot >= a) & (spot < b)]]
        if not local:
            return
        with self._rng(c):
            own = _spot_gradients(
                self.model, self.loss_fn, x, y, self.flat.params, local, self.plan
            )
        for i, j in enumerate(local):
            _spot_compare(
                a + j,
                [g[i] for g in own],
                self.spot_sq[a + j],
                self.dots[a + j],
                self.full,
                self.flat,
                self.gnorm,
                self.tol,
                self.plan,
                self.failures,
                self.spot_record,
                None if self.u is None else (self.pdots[a + j], self.u, self.unorm),
            )

    def clipped_step(self, c, x, y, size, chunk, gam_c) -> None:
        """Add the chunk's ``Σ_j γ_j(η) g_j`` for every η: from its factors, no backward."""
        flat = self.flat
        if chunk is None:
            self.clipped_by_backward(c, x, y, size, gam_c)
            return
        for k, w in chunk.weighted(gam_c).items():
            start = sum(flat.numels[:k])
            self.clip_acc[:, start : start + flat.numels[k]] += w.reshape(len(self.etas), -1)

    def clipped_by_backward(self, c, x, y, size, gam_c) -> None:
        """γ-weighted sums by one backward of ``Σ_j γ_j ℓ_j`` per η.

        Exact for every parameter whose batch gradient is the sum of its
        per-sample gradients; the rest (``plan.batch1``) from batch-1 passes.
        float16/bfloat16 scale the seed so that the batch sum cannot overflow.
        """
        flat, params, batch1, etas = self.flat, self.flat.params, self.batch1, self.etas
        scale = 2.0 ** -math.ceil(math.log2(max(2, size))) if self.reduced else 1.0
        fs = None
        if batch1:
            fs = fallback_stats(
                self.model, self.loss_fn, x, y, [params[k] for k in batch1], "loop",
                weights=gam_c,
            )  # fmt: skip
        with self._rng(c):
            ell = per_sample.per_sample_losses(self.model, self.loss_fn, x, y)
            for e in range(len(etas)):
                weights = (gam_c[e] * scale).to(ell.dtype)
                g = flat.grad((weights * ell).sum(), c, retain_graph=e + 1 < len(etas))
                g = g.double() / scale
                if fs is not None:
                    parts = flat.unflatten(g)
                    for i, k in enumerate(batch1):
                        parts[k].copy_(fs.weighted[e][i])
                self.clip_acc[e] += g

    # -- the result ------------------------------------------------------------
    def result(self):
        """Every rank's pieces completed: ``(result, failures)``."""
        shard, offsets = self.shard, self.offsets
        shard.sum_(self.clip_acc)
        dots, pdots = shard.complete(self.dots, self.pdots, offsets=offsets)
        sq_norms, losses = self.sq_norms, self.losses
        if self.light:
            sq_norms, losses = shard.complete(sq_norms, losses, offsets=offsets)
        norms = np.sqrt(sq_norms)
        failures, spot_record = _merge_checks(self.failures, self.spot_record, shard)
        _merge_plan(self.plan, shard)
        clipped = {
            eta: norm_and_cos(self.clip_acc[k], self.full) for k, eta in enumerate(self.etas)
        }
        return {
            "norms": norms,
            "dots": dots,
            "losses": losses,
            "sizes": np.ones(self.n_samples, dtype=np.int64),
            "full": self.full,
            "clipped": clipped,
            "batch_size": 1,
            "mismatch": 0.0,
            "spot": spot_record,
            "factors": self.factors,
            "dots_from_factors": self.from_factors,
            **self._preconditioned(pdots),
        }, failures

    def _preconditioned(self, pdots) -> dict:
        """Return the result's ``u``, ``pdots`` and ``clipped_p`` (none without P)."""
        if self.u is None:
            return {}
        clipped = preconditioned_clipped(
            self.clip_acc, self.etas, self.full, self.u, self.precond.inverse
        )
        return {"u": self.u, "pdots": pdots, "clipped_p": clipped}


def _finite_parts(parts) -> bool:
    """Whether every entry of the float64 tensors is finite.

    A finite float64 sum means finite entries; the elementwise test runs only when it is not.
    """
    total = sum(float(g.sum()) for g in parts)
    return math.isfinite(total) or all(bool(torch.isfinite(g).all()) for g in parts)


def _chunk_gradient(model, loss_fn, x, y, flat, plan, reduced):
    """Pass 1 of the two-pass per-sample route for one chunk: ``(ℓ, Σ_j ∇ℓ_j)``.

    The per-sample losses ``(B,)`` and, per parameter, the float64 sum of the
    chunk's per-sample gradients: one backward of ``Σ_j ℓ_j`` (its batch gradient
    is that sum for every parameter whose gradient is the derivative), the
    parameters that need batch-1 passes (``plan.batch1``) from them.
    float16/bfloat16 scale the seed so that the batch sum cannot overflow.
    """
    params = flat.params
    batch1 = sorted(plan.batch1)
    rest = [k for k in range(len(params)) if k not in plan.batch1]
    scale = 2.0 ** -math.ceil(math.log2(max(2, x.shape[0]))) if reduced else 1.0
    ell = per_sample.per_sample_losses(model, loss_fn, x, y)
    out: list[torch.Tensor | None] = [None] * len(params)
    if rest:
        seed = ell.sum() if scale == 1.0 else (ell * scale).sum()
        grads = torch.autograd.grad(seed, [params[k] for k in rest], allow_unused=True)
        for k, g in zip(rest, grads, strict=True):
            g = dense_grad(g, params[k]).double()
            out[k] = g if scale == 1.0 else g / scale
    if batch1:
        fs = fallback_stats(model, loss_fn, x, y, [params[k] for k in batch1], "loop")
        for i, k in enumerate(batch1):
            out[k] = fs.sums[i].double().reshape(params[k].shape)
    return ell.detach(), out


def _merge_plan(plan, shard) -> None:
    """Give every rank's plan the fallbacks of all ranks, as one process over the chunks would.

    Rank order is chunk order: each parameter keeps the reason of the first
    rank that moved it, an event of a later rank keeps only the parameters no
    earlier one moved, the dots keep the first reason. Events this rank had
    not seen are warned about here. Structural checks add up; their largest
    error is the largest of all.
    """
    if shard.ranks is None:
        return
    states = shard.objects(
        (plan.events, plan.fallback, plan.dots_fallback, plan.structural_checks,
         plan.structural_max_error, plan.vmap_failed, plan.served_by)
    )  # fmt: skip
    mine = {(e.stage, e.params, e.reason) for e in plan.events}
    events: list = []
    moved: set[str] = set()
    fallback: dict[int, str] = {}
    dots = None
    for rank_events, rank_fallback, rank_dots, *_ in states:
        for e in rank_events:
            if not e.params:
                if dots is None:
                    dots = rank_dots if rank_dots is not None else e.reason
                    events.append(e)
                continue
            new = tuple(name for name in e.params if name not in moved)
            if new:
                moved.update(new)
                events.append(Event(e.stage, new, e.reason))
        for k, reason in rank_fallback.items():
            fallback.setdefault(k, reason)
    for e in events:
        if (e.stage, e.params, e.reason) not in mine and not any(
            set(e.params) <= set(p) and e.reason == r for _, p, r in mine
        ):
            warnings.warn(e.message(), verify.PerSampleFallbackWarning, stacklevel=6)  # probe()
    plan.events = events
    plan.fallback = dict(sorted(fallback.items()))
    plan.dots_fallback = dots if dots is not None else next((s[2] for s in states if s[2]), None)
    plan.structural_checks = sum(s[3] for s in states)
    plan.structural_max_error = max(s[4] for s in states)
    plan.vmap_failed = any(s[5] for s in states)
    served: dict[int, list[str]] = {}
    for s in states:  # the rules that summed a parameter's uses, on any rank
        for k, rules in s[6].items():
            served[k] = sorted(set(served.get(k, [])) | set(rules))
    plan.served_by = served


def _merge_checks(failures, record, shard):
    """Merge every rank's spot checks: the first failure in sample order, the largest errors."""
    if shard.ranks is None:
        return failures, record
    merged: dict[str, Any] = {"params": {}, "dots": None}
    worst = {key: 0.0 for key in record if key.startswith("spot_max_")}
    for rank_failures, rank_record in shard.objects((failures, record)):
        if rank_failures.get("passes_differ"):
            merged["passes_differ"] = True
        for k, message in rank_failures["params"].items():
            merged["params"].setdefault(k, message)
        if merged["dots"] is None:
            merged["dots"] = rank_failures["dots"]
        for key in worst:
            worst[key] = max(worst[key], rank_record[key])
    return merged, {**record, **worst}


def _spot_gradients(model, loss_fn, x, y, params, local, plan):
    """Return the spot samples' gradients by their own backward, per parameter ``(r, *shape)``.

    Under active dropout: a backward of ``ℓ_j`` through the chunk's batch forward
    (its masks). Otherwise each sample through its own batch-1 forward and
    backward, the paper's component itself (for r = 4 as fast as ``vmap(grad)``
    on the bench's CNN, and it runs any model).
    """
    if randomness_active(model):
        chunks = list(per_sample_grads(model, loss_fn, x, y, params, "graph", only=local))
    else:
        chunks = list(per_sample_grads(model, loss_fn, x[local], y[local], params, "loop"))
    return [torch.cat([gs[k] for _, gs in chunks]) for k in range(len(params))]


def _spot_compare(
    j, own, route_sq, route_dot, full, flat, gnorm, tol, plan, failures, record, pdot=None
):
    """Compare sample j's own gradient with the route's per-parameter norms and its dot.

    ``pdot``: ``(the route's ⟨g_j, u⟩, u, ‖u‖)`` with a preconditioner, compared the same way
    (a mismatch fails the dots: both come from the same factors or dot pass).
    """
    g = torch.cat([t.reshape(-1) for t in own]).double()
    own_sq = [float(v) for v in torch.stack([t.square().sum() for t in flat.unflatten(g)])]
    own_dot = float(g @ full)
    total = sum(own_sq)
    for k, s_own in enumerate(own_sq):
        s_route = route_sq.get(k, math.nan)
        err = abs(s_route - s_own)
        rel = err / total if total > 0 else (0.0 if err == 0 else math.inf)
        record["spot_max_norm_error"] = max(record["spot_max_norm_error"], rel)
        if not err <= 2 * tol * total + 1e-300:
            failures["params"].setdefault(
                k,
                f"sample {j}: ‖g_j({plan.names[k]})‖² = {s_route:.9g} on the route, "
                f"{s_own:.9g} by its own backward",
            )
    scale = math.sqrt(total) * gnorm
    err = abs(route_dot - own_dot)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    record["spot_max_dot_error"] = max(record["spot_max_dot_error"], rel)
    if not err <= tol * scale + 1e-300 and failures["dots"] is None:
        failures["dots"] = (
            f"sample {j}: ⟨g_j, ∇f⟩ = {route_dot:.9g} on the route, {own_dot:.9g} by its own "
            "backward"
        )
    if pdot is None:
        return
    route_pdot, u, unorm = pdot
    own_pdot = float(g @ u)
    scale = math.sqrt(total) * unorm
    err = abs(route_pdot - own_pdot)
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    record["spot_max_pdot_error"] = max(record["spot_max_pdot_error"], rel)
    if not err <= tol * scale + 1e-300 and failures["dots"] is None:
        failures["dots"] = (
            f"sample {j}: ⟨g_j, u⟩ = {route_pdot:.9g} on the route, {own_pdot:.9g} by its own "
            "backward (u = P⁻¹∇f)"
        )
