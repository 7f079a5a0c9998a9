"""AWD-LSTM language model (Merity, Keskar & Socher, ICLR 2018) for current PyTorch.

The model of salesforce/awd-lstm-lm, PTB setting::

    ids (T, B) ─ Embedding(V, 400) ─ embedding dropout (whole word rows, p_e = 0.1)
      ─ locked dropout (p_i = 0.4)
      ─ LSTM 400→1150 (DropConnect p_w = 0.5 on W_hh) ─ locked dropout (p_h = 0.25)
      ─ LSTM 1150→1150 (DropConnect)                 ─ locked dropout (p_h = 0.25)
      ─ LSTM 1150→400 (DropConnect)                  ─ locked dropout (p_o = 0.4)
      ─ Linear(400, V), weight tied to the embedding → logits (T, B, V)

``p_h = 0.25`` is the README's PTB command (``main.py``'s default is 0.3).
Parameter count for V = 10,000 (tested)::

    embedding / tied decoder weight   10,000 × 400                   4,000,000
    decoder bias                      10,000                            10,000
    LSTM 400→1150     4·1150·(400+1150)  + 2·4·1150                   7,139,200
    LSTM 1150→1150    4·1150·(1150+1150) + 2·4·1150                  10,589,200
    LSTM 1150→400     4·400·(1150+400)   + 2·4·400                    2,483,200
    total                                                            24,221,600

(the reference reports "24M"; each torch LSTM keeps two bias vectors).

**Dropout contract** (see :mod:`clipscope.engine.guard`): every custom dropout
module here has ``clipscope_dropout = True``, draws its masks from torch's
global RNG inside ``forward`` and only in training mode, and is the identity
(no RNG draw) in ``eval()`` mode. So the engine can fix masks per component
with ``torch.random.fork_rng`` (policy ``"fixed"``) or switch them off
(``"off"``).

**AR/TAR** (activation and temporal activation regularization, paper eqs. in
§4.6): ``α · mean(dropped_out²) + β · mean((raw_out[t+1] − raw_out[t])²)``
over the last LSTM layer, ``dropped_out`` after the output dropout and
``raw_out`` before it. The model keeps these two tensors of its latest
forward; :func:`awd_lstm_loss` adds the terms to the cross entropy. With
``α, β > 0`` a component loss ``f_i`` depends on the model's activations,
not only on its logits, so it cannot be computed from ``output`` alone.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipscope.models._checks import check_positive_int, check_probability

__all__ = [
    "AWDLSTM",
    "EmbeddingDropout",
    "LockedDropout",
    "WeightDropLSTM",
    "awd_lstm_loss",
]


class LockedDropout(nn.Module):
    """Variational ("locked") dropout on ``(T, B, H)``: one mask per sequence, shared over time.

    ``y[t, b, h] = x[t, b, h] · z[b, h] / (1 − p)``, ``z ~ Bernoulli(1 − p)``
    drawn once per forward from the global RNG. Identity in eval mode or at
    ``p = 0``.

    >>> drop = LockedDropout(0.5)
    >>> y = drop(torch.ones(3, 2, 4))
    >>> bool((y[0] == y[1]).all() and (y[1] == y[2]).all())
    True
    >>> torch.equal(drop.eval()(torch.ones(3, 2, 4)), torch.ones(3, 2, 4))
    True
    """

    clipscope_dropout = True

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = check_probability(p, "p")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x · z / (1 − p)`` with one mask ``z`` per (batch, feature); ``x`` in eval."""
        if not self.training or self.p == 0.0:
            return x
        if x.dim() != 3:
            raise ValueError(f"LockedDropout expects (T, B, H), got shape {tuple(x.shape)}")
        mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1.0 - self.p)
        return x * (mask / (1.0 - self.p))

    def extra_repr(self) -> str:  # noqa: D102
        return f"p={self.p}"


class EmbeddingDropout(nn.Module):
    """Embedding dropout: drop whole rows (words) of the embedding matrix.

    The reference masks the weight, ``E' = diag(z) E / (1 − p)`` with
    ``z ~ Bernoulli(1 − p)^V`` (one draw per vocabulary row), then embeds with
    ``E'``. Here the same mask multiplies the embedded tokens,
    ``E'[ids] = E[ids] · z[ids] / (1 − p)``: the same values, the same gradient
    for ``E``, and the same RNG draws (``V`` Bernoulli numbers), but the
    embedding stays an ``nn.Embedding`` call. Identity in eval mode.

    >>> drop = EmbeddingDropout(0.5)
    >>> ids = torch.tensor([[3, 3], [3, 1]])
    >>> y = drop(torch.ones(2, 2, 4), ids, num_embeddings=5)
    >>> bool((y[0, 0] == y[1, 0]).all() and (y[0, 0] == y[0, 1]).all())  # word 3: one mask
    True
    """

    clipscope_dropout = True

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = check_probability(p, "p")

    def forward(
        self, embedded: torch.Tensor, ids: torch.Tensor, num_embeddings: int
    ) -> torch.Tensor:
        """Return ``embedded · z[ids] / (1 − p)``, ``z`` one Bernoulli per vocabulary row."""
        if not self.training or self.p == 0.0:
            return embedded
        rows = embedded.new_empty(num_embeddings, 1).bernoulli_(1.0 - self.p)
        return embedded * (rows[ids] / (1.0 - self.p))

    def extra_repr(self) -> str:  # noqa: D102
        return f"p={self.p}"


class WeightDropLSTM(nn.LSTM):
    """One-layer ``nn.LSTM`` with DropConnect on the hidden-to-hidden weights (Wan et al., 2013).

    In training mode each forward uses ``W̃_hh = W_hh ⊙ M / (1 − p)`` with an
    elementwise ``M ~ Bernoulli(1 − p)`` drawn from the global RNG, the same
    mask at every time step of the call; ``W_ih`` and the biases are used as
    they are. Eval mode uses ``W_hh``. The parameters are ``nn.LSTM``'s own
    (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, same
    initialization); the masked weight goes to the same kernel ``nn.LSTM``
    calls (``torch.lstm``), so no parameter is deleted or re-registered and
    ``flatten_parameters`` is never needed.

    ``forward(input (T, B, H_in), hx=None) -> (output (T, B, H), (h, c))``
    with ``h, c`` of shape ``(1, B, H)``; ``hx=None`` means zeros.
    """

    clipscope_dropout = True

    def __init__(self, input_size: int, hidden_size: int, weight_dropout: float = 0.5) -> None:
        check_positive_int(input_size, "input_size")
        check_positive_int(hidden_size, "hidden_size")
        super().__init__(input_size, hidden_size, num_layers=1)
        self.weight_dropout = check_probability(weight_dropout, "weight_dropout")

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the LSTM over ``input`` with ``W_hh`` masked (training) or as is (eval)."""
        if input.dim() != 3:
            raise ValueError(f"WeightDropLSTM expects (T, B, H_in), got shape {tuple(input.shape)}")
        if hx is None:
            zeros = input.new_zeros(1, input.shape[1], self.hidden_size)
            hx = (zeros, zeros)
        w_ih, w_hh, b_ih, b_hh = (getattr(self, n) for n in self._flat_weights_names)
        if self.training and self.weight_dropout > 0.0:
            w_hh = F.dropout(w_hh, p=self.weight_dropout, training=True)
        with warnings.catch_warnings():
            # cuDNN warns that the (freshly masked) weights are not one contiguous
            # chunk; it copies them into one, which is what DropConnect needs anyway.
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            output, h, c = torch.lstm(
                input, hx, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, self.training, False, False
            )
        return output, (h, c)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, weight_dropout={self.weight_dropout}"


class AWDLSTM(nn.Module):
    """AWD-LSTM language model; sequential interface ``model(inp, state) -> (logits, state)``.

    Parameters
    ----------
    ntoken : int
        Vocabulary size V.
    ninp : int
        Embedding width (400); also the last LSTM's width when ``tie_weights``.
    nhid : int
        Width of the inner LSTMs (1150).
    nlayers : int
        Number of LSTM layers (3).
    dropout, dropouth, dropouti, dropoute, wdrop : float
        Output (0.4), between-layer (0.25), input (0.4) locked dropout,
        embedding row dropout (0.1), DropConnect on ``W_hh`` (0.5).
    tie_weights : bool
        Decoder weight is the embedding weight (one ``Parameter``).

    Notes
    -----
    ``inp`` is a ``(T, B)`` integer tensor, ``state`` a list of ``nlayers``
    ``(h, c)`` pairs of shape ``(1, B, H_l)`` or ``None`` (zeros). The logits
    have shape ``(T, B, V)``. After each forward the model keeps the last
    layer's activations for AR/TAR (:func:`awd_lstm_loss`); they are dropped
    when the model is pickled or deep-copied.

    >>> m = AWDLSTM(ntoken=50, ninp=8, nhid=12)
    >>> logits, state = m(torch.zeros(5, 2, dtype=torch.long), None)
    >>> tuple(logits.shape), len(state), tuple(state[1][0].shape)
    ((5, 2, 50), 3, (1, 2, 12))
    """

    def __init__(
        self,
        ntoken: int = 10000,
        ninp: int = 400,
        nhid: int = 1150,
        nlayers: int = 3,
        dropout: float = 0.4,
        dropouth: float = 0.25,
        dropouti: float = 0.4,
        dropoute: float = 0.1,
        wdrop: float = 0.5,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.ntoken = check_positive_int(ntoken, "ntoken")
        self.ninp = check_positive_int(ninp, "ninp")
        self.nhid = check_positive_int(nhid, "nhid")
        self.nlayers = check_positive_int(nlayers, "nlayers")
        self.tie_weights = bool(tie_weights)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.embedding_dropout = EmbeddingDropout(dropoute)
        self.input_dropout = LockedDropout(dropouti)
        sizes = [ninp] + [nhid] * (nlayers - 1) + [ninp if tie_weights else nhid]
        self.rnns = nn.ModuleList(
            WeightDropLSTM(sizes[i], sizes[i + 1], wdrop) for i in range(nlayers)
        )
        self.hidden_dropouts = nn.ModuleList(LockedDropout(dropouth) for _ in range(nlayers - 1))
        self.output_dropout = LockedDropout(dropout)
        self.decoder = nn.Linear(sizes[-1], ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if self.tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        self._activations: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, inp: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Return logits ``(T, B, V)`` and the new state; keep activations for AR/TAR."""
        _check_tokens(inp)
        state = self._check_state(state, inp.shape[1])
        x = self.encoder(inp)
        x = self.input_dropout(self.embedding_dropout(x, inp, self.ntoken))
        new_state = []
        for layer, rnn in enumerate(self.rnns):
            x, hc = rnn(x, None if state is None else state[layer])
            new_state.append(hc)
            if layer < self.nlayers - 1:
                x = self.hidden_dropouts[layer](x)
        raw = x
        dropped = self.output_dropout(raw)
        logits = self.decoder(dropped)
        # A weak reference to the logits: the (T, B, V) tensor is not kept alive by the model.
        self._activations = (weakref.ref(logits), raw, dropped)
        return logits, new_state

    def last_activations(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, raw_last_layer_output, dropped_last_layer_output)`` of the latest forward."""
        if self._activations is None:
            raise RuntimeError("no forward has run since construction or copy")
        ref, raw, dropped = self._activations
        logits = ref()
        if logits is None:
            raise RuntimeError("the logits of the latest forward no longer exist")
        return logits, raw, dropped

    def _check_state(self, state: Any, batch: int) -> Any:
        if state is None:
            return None
        if not isinstance(state, (list, tuple)) or len(state) != self.nlayers:
            raise ValueError(
                f"state must be None or {self.nlayers} (h, c) pairs, got {type(state).__name__}"
                f" of length {len(state) if isinstance(state, (list, tuple)) else '?'}"
            )
        for layer, (hc, rnn) in enumerate(zip(state, self.rnns, strict=True)):
            want = (1, batch, rnn.hidden_size)
            if len(hc) != 2 or any(tuple(t.shape) != want for t in hc):
                got = [tuple(t.shape) for t in hc]
                raise ValueError(f"state[{layer}] must be (h, c) of shape {want}, got {got}")
        return state

    def __getstate__(self) -> dict[str, Any]:
        # Activations are non-leaf tensors of one forward: not part of the model.
        out = dict(self.__dict__)
        out["_activations"] = None
        return out


def awd_lstm_loss(model: AWDLSTM, alpha: float = 2.0, beta: float = 1.0) -> Callable[..., Any]:
    """Return ``loss_fn(output, target)``: token-mean cross entropy plus AR and TAR.

    ``loss = CE + α · mean(d²) + β · mean((r[t+1] − r[t])²)`` where ``d`` is
    the last LSTM layer's output after output dropout and ``r`` the same
    before it (both ``(T, B, H)``), taken from ``model``'s latest forward;
    ``CE`` is the mean over the ``T·B`` tokens. TAR is 0 when ``T = 1``. The
    reference adds AR/TAR in training only; here they are part of ``f_i`` in
    both modes (set ``alpha = beta = 0`` for the plain cross entropy).

    ``output`` must be the logits returned by the model's latest forward,
    otherwise ``RuntimeError``.
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not hasattr(model, "last_activations"):
        raise TypeError(f"model must keep its activations (AWDLSTM), got {type(model).__name__}")

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, raw, dropped = model.last_activations()
        if output is not logits:
            raise RuntimeError(
                "awd_lstm_loss: output is not the logits of the model's latest forward"
            )
        loss = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        if alpha:
            loss = loss + alpha * dropped.pow(2).mean()
        if beta and raw.shape[0] > 1:
            loss = loss + beta * (raw[1:] - raw[:-1]).pow(2).mean()
        return loss

    return loss_fn


def _check_tokens(inp: Any) -> None:
    if not isinstance(inp, torch.Tensor) or inp.dtype not in (torch.int64, torch.int32):
        got = getattr(inp, "dtype", inp)
        raise TypeError(f"inp must be an int64 tensor of token ids, got {got!r}")
    if inp.dim() != 2:
        raise ValueError(f"inp must have shape (T, B), got {tuple(inp.shape)}")
