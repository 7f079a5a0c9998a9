"""Per-sample components (batch size 1): norms by the ghost technique, dots by one JVP.

Route 4 of the engine (DESIGN §4). Inside a batch of B independent samples
(``model(x)`` with samples along dim 0, ``loss_fn(output, target)`` the batch's
**mean** loss), sample j's component is ``ℓ_j(θ) = loss_fn(model(x_j), y_j)``
and its gradient is ``g_j = ∇ℓ_j``. Two quantities per sample, without ever
holding the B gradients:

* ``‖g_j‖²`` -- :func:`per_sample_sq_norms` / :func:`ghost_pass`. One forward
  with hooks that keep every layer's input ``a``, and one backward of the
  **summed** loss ``Σ_j ℓ_j`` w.r.t. the layer outputs, giving
  ``b = ∂(Σ_k ℓ_k)/∂(output)``; since sample j's output depends on sample j
  only, ``b_j = ∂ℓ_j/∂(output_j)`` (the sum, not the mean: with the mean every
  ``b_j`` would carry a factor 1/B). Autograd never forms these layers' weight
  gradients; ``∇ Σ_j ℓ_j`` is assembled from the same ``(a, b)``. Per layer:

  - Linear, input ``(B, F)``: ``g_j(W) = b_j a_jᵀ`` has
    ``‖g_j(W)‖² = ‖a_j‖² ‖b_j‖²`` and ``‖g_j(bias)‖² = ‖b_j‖²``
    (Goodfellow 2015, "Efficient per-example gradient computations");
  - Linear on sequences ``(B, T, F)``: ``g_j(W) = Σ_t b_jt a_jtᵀ`` and
    ``‖g_j(W)‖² = Σ_{t,s} (a_jt·a_js)(b_jt·b_js)`` (Li et al. 2021, "Large
    language models can be strong differentially private learners", ghost
    clipping), or ``‖Σ_t b_jt a_jtᵀ‖²`` materialized, whichever costs less
    (``T(F_in + F_out)`` against ``F_in F_out``); ``‖g_j(bias)‖² = ‖Σ_t b_jt‖²``;
  - Conv1d/Conv2d: the same after ``unfold`` (im2col): a convolution is a
    Linear on the ``L`` patches, one group at a time; for wide inputs, when the
    gradients are materialized anyway, one grouped ``conv2d_weight`` over the
    batch (samples as groups) replaces im2col;
  - Embedding: ``g_j(E) = Σ_t e_{i_jt} b_jtᵀ``, so
    ``‖g_j(E)‖² = Σ_{t,s: i_jt = i_js} b_jt·b_js`` (padding tokens excluded);
  - LayerNorm, GroupNorm, eval-mode BatchNorm: the affine gradients
    ``Σ b_j ⊙ x̂_j`` and ``Σ b_j`` are small, so they are materialized;
  - nn.LSTM (unidirectional, no projection): the LSTM is unrolled again in
    Python at the captured input and initial state to get the gate gradients
    ``δ_t``; then ``W_ih`` is a sequence Linear with inputs ``x_t``, ``W_hh``
    one with inputs ``h_{t-1}``, and both biases get ``Σ_t δ_t``;
  - GRU / RNN / bidirectional LSTM: the recurrent module alone runs
    again on each sample j with its captured input, initial state and output
    gradients, ``g_j = ∂/∂θ Σ_k ⟨o^k_j(θ), b^k_j⟩`` (a loop: the fused kernels
    have no ``vmap`` rule), so the rest of the model (a 10k-way decoder) is
    not re-run per sample.

  A module called several times in one forward (a shared layer) contributes
  all its calls: their tokens are concatenated before the Gram sums. A
  parameter registered in two modules (tied weights) breaks the layer-wise sum
  (``‖g_1 + g_2‖² ≠ ‖g_1‖² + ‖g_2‖²``), so it goes, like every parameter of a
  module type not listed above, to the fallback:
  ``torch.func.vmap(grad)`` over single samples with
  ``torch.func.functional_call``, in chunks (a loop of batch-1 backward
  passes when the model holds a recurrent module, which ``vmap`` cannot batch;
  train-mode dropout is refused there, as the masks would differ from the
  batch forward's). Norms of disjoint parameter sets add up.

* ``⟨g_j, v⟩`` -- :func:`per_sample_dots`: one forward-mode JVP of the
  per-sample loss vector ``L(θ) = (ℓ_1, …, ℓ_B)`` along v, since
  ``∂L/∂θ · v = (⟨g_1, v⟩, …, ⟨g_B, v⟩)``; about the cost of one forward.

Sums of squares and sums of Gram products are accumulated in float64 (the
matrix products themselves run in the model's dtype).

Limits: samples must sit along dim 0 of the input, the output and every
hooked layer's input (a layer whose input does not start with the batch
dimension raises ``ValueError``); train-mode BatchNorm couples the samples of a
batch and raises ``ValueError``; a parameter of a supported module must be
used only through that module's ``forward`` (``F.linear(h, emb.weight)``
outside the module is not seen by the hooks; tie by assigning the Parameter to
both modules instead, which is detected). The loss must average equally
weighted samples (``reduction="mean"`` with no class weights), so that the
batch loss is the mean of the per-sample losses.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn import functional as F

from clipscope.engine.guard import batch_coupled_modules, dropout_modules
from clipscope.engine.losses import trainable_params

__all__ = [
    "GhostPass",
    "ghost_pass",
    "per_sample_dots",
    "per_sample_grads_reference",
    "per_sample_losses",
    "per_sample_sq_norms",
]

# Largest number of float elements one chunk of materialized per-sample
# gradients may hold (about 256 MiB in float32).
_CHUNK_ELEMENTS = 1 << 26

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class GhostPass(NamedTuple):
    """What one hooked forward + backward of the summed loss gives.

    Attributes
    ----------
    sq_norms : torch.Tensor
        ``(B,)`` float64, ``‖∇ℓ_j‖²`` over ``params``.
    losses : torch.Tensor
        ``(B,)`` detached per-sample losses ``ℓ_j`` (the model's dtype).
    grad_sum : list of torch.Tensor
        ``∇ Σ_j ℓ_j`` for each parameter (divide by B for the batch's mean-loss gradient).
    """

    sq_norms: torch.Tensor
    losses: torch.Tensor
    grad_sum: list[torch.Tensor]


def _check_inputs(model: Any, loss_fn: Any, x: Any) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn)!r}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(
            f"x must be a tensor with the samples along dim 0, got {getattr(x, 'shape', x)!r}"
        )
    if x.shape[0] == 0:
        raise ValueError("x holds no samples (batch size 0)")
    coupled = batch_coupled_modules(model)
    if coupled:
        raise ValueError(
            f"per-sample components need eval-mode BatchNorm or GroupNorm: modules {coupled} "
            "normalize with batch statistics (train mode or no running stats), which couples "
            "the samples of a batch"
        )
    return int(x.shape[0])


def _per_sample_from_output(loss_fn: Callable, out: torch.Tensor, y: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"model(x) must return a tensor for per-sample components, got {type(out)!r}"
        )

    def one(o: torch.Tensor, t: Any) -> torch.Tensor:
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    losses = vmap(one)(out, y)
    if losses.dim() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (the batch's mean loss), got shape "
            f"{tuple(losses.shape[1:])} per sample"
        )
    return losses


def per_sample_losses(
    model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], x: torch.Tensor, y: Any
) -> torch.Tensor:
    """Per-sample losses ``ℓ_j = loss_fn(model(x)[j:j+1], y[j:j+1])``, shape ``(B,)``.

    The model runs once on the whole batch; ``loss_fn`` (the mean loss of a
    batch) is applied to each sample's output by ``torch.func.vmap``. Valid
    only when the samples do not interact (no train-mode BatchNorm: that
    raises ``ValueError``). Differentiable.

    >>> import torch.nn.functional as F
    >>> m = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> L = per_sample_losses(m, F.cross_entropy, x, y)
    >>> L.shape, bool(torch.allclose(L.mean(), F.cross_entropy(m(x), y)))
    (torch.Size([4]), True)
    """
    _check_inputs(model, loss_fn, x)
    return _per_sample_from_output(loss_fn, model(x), y)


# ----------------------------------------------------------------------------- ghost norms


def _sq_sum(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``Σ t²`` over ``dims``, accumulated in float64 (the squares in the tensor's dtype)."""
    return (t * t).sum(dims, dtype=torch.float64)


def _gram_sq_norm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖Σ_t b_t a_tᵀ‖²`` per sample, and ``Σ_j Σ_t b_jt a_jtᵀ`` (the summed gradient).

    a ``(B, T, P)``, b ``(B, T, Q)`` -> ``(B,)`` float64 and ``(Q, P)``. ``a`` and
    ``b`` may be transposed views (conv patches); ``bmm`` reads them in place.
    """
    B, T, P = a.shape
    Q = b.shape[2]
    if T == 1 or T * (P + Q) <= P * Q:
        total = torch.mm(b.reshape(B * T, Q).t(), a.reshape(B * T, P))
        if T == 1:
            return _sq_sum(a, (1, 2)) * _sq_sum(b, (1, 2)), total
        # ghost: Σ_{t,s} (a_t·a_s)(b_t·b_s)
        ga = torch.bmm(a, a.transpose(1, 2))
        gb = torch.bmm(b, b.transpose(1, 2))
        return (ga * gb).sum((1, 2), dtype=torch.float64), total
    out = torch.empty(B, dtype=torch.float64, device=a.device)
    total = torch.zeros(Q, P, dtype=a.dtype, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, P * Q))
    for s in range(0, B, step):
        g = torch.bmm(b[s : s + step].transpose(1, 2), a[s : s + step])  # (chunk, Q, P)
        out[s : s + step] = _sq_sum(g, (1, 2))
        total += g.sum(0)
    return out, total


def _bias_sq_norm(b: torch.Tensor) -> torch.Tensor:
    """``‖Σ_t b_t‖²`` for every sample, b ``(B, T, Q)``."""
    return _sq_sum(b.sum(1, dtype=torch.float64), (1,))


def _linear_tokens(mod: nn.Linear, a: torch.Tensor, b: torch.Tensor):
    B = a.shape[0]
    return a.reshape(B, -1, a.shape[-1]), b.reshape(B, -1, b.shape[-1])


def _conv_tokens(mod: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """Patches ``(B, L, C_in k / groups)`` per group and output grads ``(B, L, C_out / groups)``."""
    a, b, ks, dil, padding, st = _conv_geometry(mod, a, b)
    B = a.shape[0]
    patches = F.unfold(a, ks, dilation=dil, padding=padding, stride=st)  # (B, C k, L)
    g = mod.groups
    patches = patches.reshape(B, g, -1, patches.shape[-1]).transpose(2, 3)  # (B, g, L, C k/g)
    bb = b.reshape(B, g, b.shape[1] // g, -1).transpose(2, 3)  # (B, g, L, C_out/g)
    return [(patches[:, k], bb[:, k]) for k in range(g)]


def _conv_geometry(mod: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """Pad (non-zero padding modes) and lift to 2-D; return the conv2d arguments too."""
    if mod.padding_mode != "zeros":
        a = F.pad(a, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
        padding = (0,) * len(mod.kernel_size)
    else:
        padding = mod.padding
    ks, dil, st = mod.kernel_size, mod.dilation, mod.stride
    if isinstance(mod, nn.Conv1d):
        a, b = a.unsqueeze(2), b.unsqueeze(2)
        ks, dil, padding, st = (1, *ks), (1, *dil), (0, *padding), (1, *st)
    return a, b, tuple(ks), tuple(dil), tuple(padding), tuple(st)


def _conv_grouped_ok(mod: nn.Module, calls: list) -> bool:
    """Per-sample weight gradients as one grouped conv beat im2col + bmm for wide inputs.

    Chosen when the Gram (ghost) branch would not be taken, ``L(P+Q) > P·Q``,
    and the patch width ``P = C_in k / groups ≥ 64`` (on CPU im2col of wide
    inputs costs more than a grouped weight-gradient convolution; narrow
    first layers are the other way round).
    """
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return False
    P = mod.in_channels // mod.groups * math.prod(mod.kernel_size)
    Q = mod.out_channels // mod.groups
    L = max(b[0, 0].numel() for _, b in calls)
    return P >= 64 and L * (P + Q) > P * Q


def _conv_grouped_grads(mod: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample conv weight gradients ``(n, weight.numel())`` by one grouped convolution.

    Sample j's gradient is the weight gradient of a conv on sample j alone;
    stacking the n samples as ``n·groups`` groups of one conv gives all of them
    from ``torch.nn.grad.conv2d_weight`` at once.
    """
    a, b, ks, dil, padding, st = _conv_geometry(mod, a, b)
    n, g = a.shape[0], mod.groups
    x = a.reshape(1, n * a.shape[1], *a.shape[2:])
    go = b.reshape(1, n * b.shape[1], *b.shape[2:])
    size = (n * mod.out_channels, mod.in_channels // g, *ks)
    G = torch.nn.grad.conv2d_weight(
        x, size, go, stride=st, padding=padding, dilation=dil, groups=n * g
    )
    return G.reshape(n, -1)


def _supported(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return not isinstance(mod.padding, str) or mod.padding == "valid"
    if isinstance(mod, nn.Embedding):
        return mod.max_norm is None and not mod.scale_grad_by_freq
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return not mod.training and mod.running_mean is not None
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm))


def _normalized(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``x̂``: the input normalized exactly as ``mod`` does before its affine map."""
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return F.group_norm(a, mod.num_groups, None, None, mod.eps)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    mean, var = mod.running_mean.view(shape), mod.running_var.view(shape)
    return (a - mean) / torch.sqrt(var + mod.eps)


def _norm_layer_grads(mod: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """Per-sample ``(∂/∂weight, ∂/∂bias)`` of a normalization layer, both ``(B, *affine)``."""
    B = a.shape[0]
    prod = b * _normalized(mod, a)
    if isinstance(mod, nn.LayerNorm):
        k = len(mod.normalized_shape)
        dims = tuple(range(1, a.dim() - k))
        return prod.sum(dims) if dims else prod, b.sum(dims) if dims else b
    prod, bb = prod.reshape(B, a.shape[1], -1), b.reshape(B, a.shape[1], -1)
    return prod.sum(2), bb.sum(2)


class _Recorder:
    """Forward hooks that keep ``(input, output grad)`` of every call of the hooked modules."""

    def __init__(self, modules: Sequence[nn.Module], batch: int) -> None:
        self.batch = batch
        self.calls: dict[int, list[list[torch.Tensor | None]]] = {id(m): [] for m in modules}
        self.names: dict[int, str] = {}
        self.outputs: list[tuple[torch.Tensor, int]] = []
        self.handles = [m.register_forward_hook(self._forward) for m in modules]

    def _forward(self, mod: nn.Module, inputs: tuple, output: Any) -> None:
        a = inputs[0]
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if a.dim() == 0 or a.shape[0] != self.batch or output.shape[0] != self.batch:
            raise ValueError(
                f"per-sample norms need the samples along dim 0 of every layer's input: "
                f"{type(mod).__name__} got input {tuple(a.shape)} for a batch of {self.batch}"
            )
        slot: list[Any] = [a.detach(), None]
        self.calls[id(mod)].append(slot)
        # kept apart from the slot: output -> its grad_fn -> hook -> slot -> output would
        # be a cycle through C++ that Python's garbage collector cannot free
        self.outputs.append((output, output._version))

        def keep(g: torch.Tensor) -> None:
            slot[1] = g.detach()

        output.register_hook(keep)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs = []


def _cat1(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def _module_sq_norms(
    mod: nn.Module, calls: list, wanted: set[int], batch: int, device: Any
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per-sample ``‖g_j‖²`` over the module's wanted parameters, and their summed gradients."""
    out = torch.zeros(batch, dtype=torch.float64, device=device)
    w = getattr(mod, "weight", None)
    bias = getattr(mod, "bias", None)
    use_w = isinstance(w, torch.Tensor) and id(w) in wanted
    use_b = isinstance(bias, torch.Tensor) and id(bias) in wanted
    sums: dict[int, torch.Tensor] = {}
    calls = [(a, b) for a, b in calls if b is not None]
    if not calls:
        return out, sums
    if isinstance(mod, _NORMS):
        gw = gb = None
        for a, b in calls:
            cw, cb = _norm_layer_grads(mod, a, b)
            gw = cw if gw is None else gw + cw
            gb = cb if gb is None else gb + cb
        if use_w:
            out += _sq_sum(gw.reshape(batch, -1), (1,))
            sums[id(w)] = gw.sum(0).reshape(w.shape)
        if use_b:
            out += _sq_sum(gb.reshape(batch, -1), (1,))
            sums[id(bias)] = gb.sum(0).reshape(bias.shape)
        return out, sums
    if isinstance(mod, nn.Embedding):
        idx = _cat1([a.reshape(batch, -1) for a, _ in calls])
        b = _cat1([b.reshape(batch, -1, b.shape[-1]) for _, b in calls])
        if mod.padding_idx is not None:
            b = b * (idx != mod.padding_idx).unsqueeze(-1).to(b.dtype)
        same = idx.unsqueeze(2) == idx.unsqueeze(1)
        gb_ = torch.bmm(b, b.transpose(1, 2))
        sums[id(w)] = torch.zeros_like(w).index_add_(0, idx.reshape(-1), b.reshape(-1, w.shape[1]))
        return out + (gb_ * same).sum((1, 2), dtype=torch.float64), sums
    if use_w and _conv_grouped_ok(mod, calls):
        step = max(1, _CHUNK_ELEMENTS // w.numel())
        w_sum = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        for s in range(0, batch, step):
            G = sum(_conv_grouped_grads(mod, a[s : s + step], b[s : s + step]) for a, b in calls)
            out[s : s + step] += _sq_sum(G, (1,))
            w_sum += G.sum(0)
        sums[id(w)] = w_sum.reshape(w.shape)
        if use_b:
            per = sum(b.reshape(batch, b.shape[1], -1).sum(2) for _, b in calls)
            out += _sq_sum(per, (1,))
            sums[id(bias)] = per.sum(0)
        return out, sums
    if isinstance(mod, nn.Linear):
        groups = [[_linear_tokens(mod, a, b)] for a, b in calls]
    else:
        groups = [_conv_tokens(mod, a, b) for a, b in calls]
    w_parts, b_parts = [], []
    for k in range(len(groups[0])):
        # a shared module's calls are more tokens of one sum (no copy for one call)
        a = _cat1([g[k][0] for g in groups])
        b = _cat1([g[k][1] for g in groups])
        if use_w:
            sq, total = _gram_sq_norm(a, b)
            out += sq
            w_parts.append(total)
        if use_b:
            out += _bias_sq_norm(b)
            b_parts.append(b.sum((0, 1)))
    if use_w:
        sums[id(w)] = torch.cat(w_parts).reshape(w.shape)
    if use_b:
        sums[id(bias)] = torch.cat(b_parts).reshape(bias.shape)
    return out, sums


def _tied(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _plan(model: nn.Module, params: list[torch.Tensor]) -> tuple[list, list, list]:
    """Split ``params``: ghost-norm modules, recurrent modules (local loop), the rest (vmap)."""
    wanted = {id(p) for p in params}
    tied = _tied(model)
    ghost_mods, rnn_mods, done = [], [], set()
    for mod in model.modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) in wanted and id(p) not in tied]
        if not own:
            continue
        if isinstance(mod, nn.RNNBase):
            rnn_mods.append((mod, own))
            done.update(id(p) for p in own)
            continue
        if not _supported(mod):
            continue
        names = {id(getattr(mod, n, None)) for n in ("weight", "bias")}
        own = [p for p in own if id(p) in names]
        if own:
            ghost_mods.append(mod)
            done.update(id(p) for p in own)
    rest = [p for p in params if id(p) not in done]
    return ghost_mods, rnn_mods, rest


class _RNNRecorder:
    """Keep each call's ``(input, hx)`` and the gradients of its outputs ``out, h_n(, c_n)``."""

    def __init__(self, modules: Sequence[nn.Module], batch: int) -> None:
        self.batch = batch
        self.calls: dict[int, list[dict[str, Any]]] = {id(m): [] for m in modules}
        self.outputs: list[tuple[torch.Tensor, int]] = []
        self.handles = [m.register_forward_hook(self._forward) for m in modules]

    def _forward(self, mod: nn.Module, inputs: tuple, output: Any) -> None:
        inp = inputs[0]
        bd = 0 if mod.batch_first else 1
        if not isinstance(inp, torch.Tensor) or inp.dim() != 3 or inp.shape[bd] != self.batch:
            raise ValueError(
                f"per-sample norms of {type(mod).__name__} need a batched (not packed) input "
                f"with the samples along dim {bd}, got {getattr(inp, 'shape', type(inp))}"
            )
        if mod.training and mod.dropout > 0:
            raise ValueError(
                f"per-sample norms of {type(mod).__name__} need its inter-layer dropout off "
                "(eval mode): a per-sample re-run would draw other masks"
            )
        hx = inputs[1] if len(inputs) > 1 else None
        hx = (hx,) if isinstance(hx, torch.Tensor) else hx
        out, state = output
        state = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        tensors = (out, *state)
        slot: dict[str, Any] = {
            "input": inp.detach(),
            "hx": None if hx is None else tuple(h.detach() for h in hx),
            "grads": [None] * len(tensors),
        }
        self.calls[id(mod)].append(slot)
        self.outputs += [(t, t._version) for t in tensors if t.requires_grad]
        for k, t in enumerate(tensors):
            if t.requires_grad:
                t.register_hook(functools.partial(_keep_grad, slot["grads"], k))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs = []


def _keep_grad(store: list, k: int, g: torch.Tensor) -> None:
    store[k] = g.detach()


def _lstm_ghost_ok(mod: nn.Module) -> bool:
    return type(mod) is nn.LSTM and not mod.bidirectional and mod.proj_size == 0


def _lstm_tokens(mod: nn.LSTM, call: dict[str, Any]) -> list[tuple]:
    """Per layer: inputs ``x_t``, previous states ``h_{t-1}`` and gate gradients ``δ_t``.

    The LSTM is unrolled again in Python at the captured input and initial
    state (gate order i, f, g, o as in ``nn.LSTM``), with the weights as
    constants, and ``Σ_k ⟨o^k, b^k⟩`` is differentiated w.r.t. the gate
    pre-activations; then ``∂/∂W_ih = Σ_t δ_t x_tᵀ``, ``∂/∂W_hh = Σ_t δ_t h_{t-1}ᵀ``
    and both biases get ``Σ_t δ_t``: the sequence-Linear ghost formula applies.
    Returns ``[(x (B,T,in), h_prev (B,T,H), δ (B,T,4H))]`` for each layer.
    """
    x = call["input"] if mod.batch_first else call["input"].transpose(0, 1)
    B, T = x.shape[0], x.shape[1]
    L, H = mod.num_layers, mod.hidden_size
    if call["hx"] is None:
        h0 = c0 = x.new_zeros(L, B, H)
    else:
        h0, c0 = call["hx"]
    per_layer, gates, finals_h, finals_c = [], [], [], []
    layer_in = x
    with torch.enable_grad():
        for layer in range(L):
            w_ih = getattr(mod, f"weight_ih_l{layer}").detach()
            w_hh = getattr(mod, f"weight_hh_l{layer}").detach()
            xw = layer_in @ w_ih.t()
            if mod.bias:
                xw = xw + getattr(mod, f"bias_ih_l{layer}").detach()
                xw = xw + getattr(mod, f"bias_hh_l{layer}").detach()
            if not xw.requires_grad:  # layer 0: all constants; the gates need a graph
                xw.requires_grad_()
            h, c = h0[layer], c0[layer]
            hs, prev, gl = [], [], []
            for t in range(T):
                prev.append(h)
                g = xw[:, t] + h @ w_hh.t()
                gl.append(g)
                i, f, gg, o = g.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                h = torch.sigmoid(o) * torch.tanh(c)
                hs.append(h)
            per_layer.append((layer_in, torch.stack(prev, 1).detach()))
            gates.append(gl)
            finals_h.append(h)
            finals_c.append(c)
            layer_in = torch.stack(hs, 1)
        out = layer_in if mod.batch_first else layer_in.transpose(0, 1)
        outs = (out, torch.stack(finals_h), torch.stack(finals_c))
        total = sum(
            (o * g).sum() for o, g in zip(outs, call["grads"], strict=True) if g is not None
        )
        flat = [g for gl in gates for g in gl]
        deltas = torch.autograd.grad(total, flat, allow_unused=True)
    deltas = [torch.zeros_like(g) if d is None else d for g, d in zip(flat, deltas, strict=True)]
    result = []
    for layer, (a_in, h_prev) in enumerate(per_layer):
        d = torch.stack(deltas[layer * T : (layer + 1) * T], 1)
        result.append((a_in.detach(), h_prev, d))
    return result


def _lstm_sq_norms(
    mod: nn.LSTM, own: list[torch.Tensor], calls: list[dict[str, Any]], batch: int, device: Any
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Ghost norms of ``nn.LSTM`` parameters from its gate gradients (see :func:`_lstm_tokens`)."""
    out = torch.zeros(batch, dtype=torch.float64, device=device)
    sums: dict[int, torch.Tensor] = {}
    wanted = {id(p) for p in own}
    calls = [c for c in calls if any(g is not None for g in c["grads"])]
    if not calls:
        return out, {id(p): torch.zeros_like(p) for p in own}
    tokens = [_lstm_tokens(mod, c) for c in calls]
    for layer in range(mod.num_layers):
        a_in = _cat1([tk[layer][0] for tk in tokens])
        h_prev = _cat1([tk[layer][1] for tk in tokens])
        d = _cat1([tk[layer][2] for tk in tokens])
        for name, a in (("weight_ih", a_in), ("weight_hh", h_prev)):
            w = getattr(mod, f"{name}_l{layer}")
            if id(w) in wanted:
                sq, total = _gram_sq_norm(a, d)
                out += sq
                sums[id(w)] = total
        for name in ("bias_ih", "bias_hh"):
            bias = getattr(mod, f"{name}_l{layer}", None)
            if bias is not None and id(bias) in wanted:
                out += _bias_sq_norm(d)
                sums[id(bias)] = d.sum((0, 1))
    return out, sums


def _rnn_sq_norms(
    mod: nn.RNNBase, own: list[torch.Tensor], calls: list[dict[str, Any]], batch: int, device: Any
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per-sample gradients of a recurrent module's own parameters, one sample at a time.

    ``g_j(θ_rnn) = ∂/∂θ Σ_k ⟨o^k(θ; a_j, h0_j), b^k_j⟩`` over the outputs ``o^k``
    (sequence, ``h_n``, ``c_n``) with their captured gradients ``b^k``: only
    the recurrent module runs again, on one sample, not the whole model. The
    fused LSTM/GRU kernels have no ``vmap`` rule, hence the loop.
    """
    bd = 0 if mod.batch_first else 1
    out = torch.zeros(batch, dtype=torch.float64, device=device)
    sums = [torch.zeros_like(p) for p in own]
    with torch.enable_grad():
        for j in range(batch):
            acc = [None] * len(own)
            for call in calls:
                if all(g is None for g in call["grads"]):
                    continue
                a = call["input"].narrow(bd, j, 1)
                hx = call["hx"]
                if hx is not None:
                    hx = tuple(h.narrow(1, j, 1) for h in hx)
                    hx = hx[0] if len(hx) == 1 else hx
                o, st = mod(a, hx)
                st = (st,) if isinstance(st, torch.Tensor) else tuple(st)
                total = sum(
                    (t * g.narrow(bd if k == 0 else 1, j, 1)).sum()
                    for k, (t, g) in enumerate(zip((o, *st), call["grads"], strict=True))
                    if g is not None
                )
                gs = torch.autograd.grad(total, own, allow_unused=True)
                acc = [
                    g if a_ is None else (a_ if g is None else a_ + g)
                    for a_, g in zip(acc, gs, strict=True)
                ]
            for k, g in enumerate(acc):
                if g is not None:
                    out[j] += _sq_sum(g.reshape(1, -1), (1,))[0]
                    sums[k] += g
    return out, {id(p): s for p, s in zip(own, sums, strict=True)}


@contextlib.contextmanager
def _forward_ad_ok(model: nn.Module) -> Iterator[None]:
    """CPU ``nn.LSTM`` under oneDNN has no forward-AD / vmap rule: turn oneDNN off locally."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        with warnings.catch_warnings():
            # torch 2.x warns about TF32 on Intel GPUs whenever the flags are set
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            ctx = torch.backends.mkldnn.flags(enabled=False)
            ctx.__enter__()
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
                ctx.__exit__(None, None, None)
    else:
        yield


def _names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    missing = [k for k, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the model")
    return [names[id(p)] for p in params]


def _vmap_sq_norms(
    model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: Any, params: list[torch.Tensor]
) -> torch.Tensor:
    """``‖∇ℓ_j‖²`` over ``params`` by ``vmap(grad)`` of single-sample losses, in chunks."""
    if any(m.training for m in dropout_modules(model)):
        raise ValueError(
            "per-sample gradients by vmap need dropout off (eval mode): the batch forward and "
            "the per-sample forwards would draw different masks"
        )
    names = _names(model, params)
    batch = x.shape[0]

    def loss_one(ps: dict, xj: torch.Tensor, yj: Any) -> torch.Tensor:
        out = functional_call(model, ps, (xj.unsqueeze(0),))
        return loss_fn(out, yj.unsqueeze(0))

    out = torch.zeros(batch, dtype=torch.float64, device=x.device)
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        # torch.func has no batching rule for the fused LSTM/GRU kernels; a loop of
        # batch-1 backward passes is also the fastest per-sample method there
        # (measured-facts.md: 2.8 E against 10.7 E for vmap on the LSTM LM)
        with torch.enable_grad():
            for j in range(batch):
                loss = loss_fn(model(x[j : j + 1]), y[j : j + 1])
                gs = torch.autograd.grad(loss, params, allow_unused=True)
                out[j] = sum(float(g.double().square().sum()) for g in gs if g is not None)
        return out
    per = vmap(grad(loss_one), in_dims=(None, 0, 0))
    primals = {n: p.detach() for n, p in zip(names, params, strict=True)}
    n_el = sum(p.numel() for p in params)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_el))
    for s in range(0, batch, step):
        g = per(primals, x[s : s + step], y[s : s + step])
        for t in g.values():
            out[s : s + step] += t.double().reshape(t.shape[0], -1).square().sum(1)
    return out


def ghost_pass(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor] | None = None,
) -> GhostPass:
    """One hooked forward + backward: per-sample ``‖∇ℓ_j‖²``, losses ``ℓ_j`` and ``∇Σ_j ℓ_j``.

    See the module docstring for the per-layer formulas; parameters of
    unsupported or tied modules get their share of the norm from
    ``vmap(grad)``. ``params`` defaults to every trainable parameter (a tied
    one counted once). Leaves the model's parameters, ``.grad``, buffers and
    flags unchanged (the backward uses ``torch.autograd.grad``).
    """
    batch = _check_inputs(model, loss_fn, x)
    params = trainable_params(model, params)
    ghost_mods, rnn_mods, rest = _plan(model, params)
    wanted = {id(p) for p in params} - {id(p) for p in rest}
    rec = _Recorder(ghost_mods, batch)
    rnn_rec = _RNNRecorder([m for m, _ in rnn_mods], batch)
    try:
        with torch.enable_grad():
            losses = per_sample_losses(model, loss_fn, x, y)
            outputs = rec.outputs + rnn_rec.outputs
            if all(o._version == v for o, v in outputs):
                # differentiate w.r.t. the layer outputs: the hooks get every b, and
                # the ghost layers' weight gradients are never formed by autograd
                inputs = [o for o, _ in outputs] + rest
            else:
                # an in-place op changed a layer output after its hook: the hooks still
                # see the gradient of the version they were registered on
                inputs = list(params)
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
    finally:
        rec.remove()
        rnn_rec.remove()
    found = dict(zip(map(id, inputs), grads, strict=True))
    sq = torch.zeros(batch, dtype=torch.float64, device=x.device)
    for mod in ghost_mods:
        mod_sq, sums = _module_sq_norms(mod, rec.calls[id(mod)], wanted, batch, x.device)
        sq += mod_sq
        found.update(sums)
    for mod, own in rnn_mods:
        ghost = _lstm_sq_norms if _lstm_ghost_ok(mod) else _rnn_sq_norms
        mod_sq, sums = ghost(mod, own, rnn_rec.calls[id(mod)], batch, x.device)
        sq += mod_sq
        found.update(sums)
    if rest:
        sq += _vmap_sq_norms(model, loss_fn, x, y, rest)
    grad_sum = [found.get(id(p)) for p in params]
    grad_sum = [
        torch.zeros_like(p) if g is None else g.detach()
        for p, g in zip(params, grad_sum, strict=True)
    ]
    return GhostPass(sq, losses.detach(), grad_sum)


def per_sample_sq_norms(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``‖∇ℓ_j‖²`` for every sample j of the batch, float64 ``(B,)``, by ghost norms.

    ``ℓ_j = loss_fn(model(x_j), y_j)``; the norm runs over ``params`` (default:
    every trainable parameter, tied ones once). Linear, Conv1d/2d, Embedding,
    LayerNorm, GroupNorm and eval-mode BatchNorm layers never materialize
    per-sample gradients (Goodfellow 2015; Li et al. 2021); other parameters
    fall back to ``torch.func.vmap(grad)`` in chunks. Train-mode BatchNorm
    raises ``ValueError``.

    >>> import torch.nn.functional as F
    >>> m = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> sq = per_sample_sq_norms(m, F.cross_entropy, x, y)
    >>> g1 = torch.autograd.grad(F.cross_entropy(m(x[1:2]), y[1:2]), list(m.parameters()))
    >>> bool(torch.isclose(sq[1], sum(g.double().square().sum() for g in g1)))
    True
    """
    return ghost_pass(model, loss_fn, x, y, params).sq_norms


# ----------------------------------------------------------------------------- JVP dots


def _split_vector(vector: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(vector, torch.Tensor):
        n = sum(p.numel() for p in params)
        if vector.dim() != 1 or vector.numel() != n:
            raise ValueError(
                f"vector must be flat with {n} entries (the params concatenated), got "
                f"shape {tuple(vector.shape)}"
            )
        parts = list(torch.split(vector, [p.numel() for p in params]))
        parts = [v.reshape(p.shape) for v, p in zip(parts, params, strict=True)]
    else:
        parts = list(vector)
        if len(parts) != len(params) or any(
            not isinstance(v, torch.Tensor) or v.shape != p.shape
            for v, p in zip(parts, params, strict=True)
        ):
            raise ValueError(
                "vector must be a flat tensor or one tensor per parameter with the "
                "parameter's shape"
            )
    return [
        v.detach().to(dtype=p.dtype, device=p.device) for v, p in zip(parts, params, strict=True)
    ]


def per_sample_dots(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    vector: torch.Tensor | Sequence[torch.Tensor],
    params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``⟨∇ℓ_j, v⟩`` for every sample j, float64 ``(B,)``, as one forward-mode JVP.

    With ``L(θ) = (ℓ_1(θ), …, ℓ_B(θ))`` the per-sample loss vector of one
    batch forward, ``J_L(θ) v = (⟨∇ℓ_1, v⟩, …, ⟨∇ℓ_B, v⟩)``: one
    ``torch.func.jvp`` of ``functional_call(model, θ)`` along v gives all B
    dots at about the cost of a forward. ``vector`` is a flat tensor (the
    ``params`` concatenated in order) or one tensor per parameter; an
    Embedding's ``padding_idx`` row of v is ignored, as its gradient is 0 by
    convention. CPU
    ``nn.LSTM`` runs with oneDNN off (it has no forward-AD rule).

    >>> import torch.nn.functional as F
    >>> m = nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> v = torch.randn(8)
    >>> d = per_sample_dots(m, F.cross_entropy, x, y, v)
    >>> g2 = torch.autograd.grad(F.cross_entropy(m(x[2:3]), y[2:3]), list(m.parameters()))
    >>> bool(torch.isclose(d[2], torch.cat([g.flatten() for g in g2]).double() @ v.double()))
    True
    """
    _check_inputs(model, loss_fn, x)
    params = trainable_params(model, params)
    tangents = _split_vector(vector, params)
    names = _names(model, params)
    # reverse mode defines the padding row's gradient as 0; forward mode sees the lookup
    position = {id(p): k for k, p in enumerate(params)}
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            k = position.get(id(mod.weight))
            if k is not None:
                tangents[k] = tangents[k].clone()
                tangents[k][mod.padding_idx] = 0

    def losses_of(*ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return _per_sample_from_output(loss_fn, out, y)

    primals = tuple(p.detach() for p in params)
    with _forward_ad_ok(model):
        _, dots = jvp(losses_of, primals, tuple(tangents))
    return dots.detach().double()


# ----------------------------------------------------------------------------- reference


def per_sample_grads_reference(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    x: torch.Tensor,
    y: Any,
    params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Brute-force twin: every ``∇ℓ_j`` by its own float64 autograd call, ``(B, n)``.

    The model is copied and cast to float64 (floating inputs too); row j is
    ``∇_θ loss_fn(model(x[j:j+1]), y[j:j+1])`` flattened over ``params`` in
    order. For tests only: B backward passes and B·n memory.
    """
    _check_inputs(model, loss_fn, x)
    params = trainable_params(model, params)
    index = {id(p): k for k, p in enumerate(model.parameters())}
    missing = [k for k, p in enumerate(params) if id(p) not in index]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the model")
    twin = copy.deepcopy(model).double()
    twin_params = list(twin.parameters())
    chosen = [twin_params[index[id(p)]] for p in params]
    x64 = x.double() if x.is_floating_point() else x
    y64 = y.double() if isinstance(y, torch.Tensor) and y.is_floating_point() else y
    rows = []
    with torch.enable_grad():
        for j in range(x.shape[0]):
            loss = loss_fn(twin(x64[j : j + 1]), y64[j : j + 1])
            gs = torch.autograd.grad(loss, chosen, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(chosen, gs, strict=True)
                    ]
                )
            )
    return torch.stack(rows)
