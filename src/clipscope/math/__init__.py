"""The math layer: pure functions of small arrays, no ``torch.nn``, no autograd, no engine.

* :mod:`clipscope.math.stats` -- DESIGN §2 at one point from ``(n_i, d_i, ‖∇f‖)``:
  cosines, β, the descent product and ratio, A3/A4, bound (33), the η-profile, the
  noise-scale heuristic; ``check_eta``, the one validator of a clipping threshold;
* :mod:`clipscope.math.theory` -- DESIGN §3: conditions (37)/(44), bounds
  (38)/(45), the drift bound (42), Example 1 in closed form;
* :mod:`clipscope.math.smoothness` -- the (L0, L1) fits and Zhang et al.'s secant;
* :mod:`clipscope.math.eigen` -- power iteration and Lanczos on any ``matvec``.

Nothing is imported here, so ``import clipscope.math.stats`` loads numpy only.
"""
