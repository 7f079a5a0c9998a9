"""A zoo of small architectures for the per-sample route, as data (STYLE §7).

Each :class:`Arch` builds a tiny model and a data set; the tests run
``probe(..., batch_sizes=[1])`` on it and compare every number with a float64
brute force (one autograd call per sample). ``fallback`` lists the parameters
that must reach the exact fallback (and nothing else may); ``dots_fallback``
whether the dots must come from per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from clipscope.models.awd_lstm import LockedDropout, WeightDropLSTM

# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def mlp_dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 3))


def cnn_groupnorm_reflect() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, padding=1, padding_mode="reflect"),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def conv2d_same_even() -> nn.Module:
    """padding="same" with an even kernel: torch pads asymmetrically."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 4, padding="same", dilation=1),
        nn.Tanh(),
        nn.Conv2d(3, 3, (2, 3), padding="same", padding_mode="replicate"),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 2),
    )


def conv2d_valid_circular() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="valid", dilation=2),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, padding=2, padding_mode="circular", stride=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


def conv1d_same_replicate() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 4, padding="same", padding_mode="replicate"),
        nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding="valid", groups=2),
        nn.Flatten(),
        nn.Linear(4 * 6, 2),
    )


def conv1d_wide_grouped() -> nn.Module:
    """Patch width 72 >= 64: per-sample weight gradients by one grouped convolution."""
    return nn.Sequential(nn.Conv1d(16, 4, 9, groups=2), nn.Flatten(), nn.Linear(4 * 4, 2))


def conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv3d(4, 2, 2, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2 * 2, 3),
    )


def conv_transpose1d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 10, 2),
    )


def conv_transpose2d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, dilation=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 7 * 7, 2),
    )


def conv_transpose3d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4 * 4, 2),
    )


class Bag(nn.Module):
    """Token ids (B, T) -> Embedding -> mean -> Linear; embedding options as arguments."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, **options)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


class Norms(nn.Module):
    """LayerNorm and RMSNorm on sequences (B, T, F)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.a = nn.Linear(6, 6)
        self.rms = nn.RMSNorm(6)
        self.ln2 = nn.LayerNorm((3, 6), bias=False)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(self.ln(x)))
        return self.out(self.ln2(self.rms(h)).mean(1))


def conv_norms() -> nn.Module:
    """GroupNorm, eval-mode BatchNorm and affine InstanceNorm."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.InstanceNorm2d(4, affine=True),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    with torch.no_grad():  # BatchNorm running statistics away from their start values
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


class Attention(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.out(h.mean(1))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.layer(x).mean(1))


class Recurrent(nn.Module):
    """Token ids (B, T) -> Embedding -> a recurrent module -> Linear on the last output."""

    def __init__(self, make: Callable[[], nn.RNNBase], out_dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.rnn = make()
        self.out = nn.Linear(out_dim, 3)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(h[:, -1])


class RNNState(nn.Module):
    """Sequence-first LSTM fed an initial state that is a bare parameter; reads h_n and c_n."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.h0 = nn.Parameter(torch.randn(2, 1, 3))
        self.rnn = nn.LSTM(4, 3, num_layers=2)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        h0 = self.h0.expand(2, x.shape[0], 3).contiguous()
        seq, (h, c) = self.rnn(self.emb(x).transpose(0, 1), (h0, torch.zeros_like(h0)))
        return self.out(h[-1] + c[-1] + seq[0])


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoGPT(nn.Module):
    """One nanoGPT block; the head is the token embedding written the GPT way."""

    def __init__(self, vocab: int = 11, d: int = 8, context: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, 2)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        x = x + self.attn(self.ln_1(x))
        x = x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V), tied head


class WeightDropLM(nn.Module):
    """Embedding -> locked dropout -> WeightDropLSTM (sequence-first) -> dropout -> decoder."""

    def __init__(self, vocab: int = 9, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lock = LockedDropout(0.3)
        self.rnn = WeightDropLSTM(d, d, weight_dropout=0.5)
        self.drop = nn.Dropout(0.2)
        self.dec = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.lock(self.emb(x).transpose(0, 1))  # (T, B, d)
        out, _ = self.rnn(h)
        return self.dec(self.drop(out.transpose(0, 1)))  # (B, T, V): samples on dim 0


class BareParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, -1.0]))
        self.shift = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return self.lin(x + self.shift) * self.scale


class TiedModules(nn.Module):
    """Embedding and decoder share one Parameter registered in both modules."""

    def __init__(self, vocab: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.mix = nn.Linear(4, 4)
        self.dec = nn.Linear(4, vocab)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mix(self.emb(x))))


class Shared(nn.Module):
    """One Linear called twice, with an in-place ReLU after its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lin(self.relu(self.lin(x))))


class SampleAxisInside(nn.Module):
    """Moves the samples off dim 0 inside: the Linear sees (T, B, F) with T = B."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):  # (B, T, F) with T == B
        h = torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1)
        return self.out(h.mean(1))


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (its code, verbatim).

    ``y = x W + b`` with ``W`` ``(nx, nf)``. Its ``__module__`` names the transformers
    module, as the rule's detection (by name and module path) needs: the tests run the
    rule without importing transformers.
    """

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005 (transformers' code as it is)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


Conv1D.__module__ = "transformers.pytorch_utils"


class SelfAttend(nn.Module):
    """``inner(x, x, x)[0]``: an ``nn.MultiheadAttention`` as a one-input module."""

    def __init__(self, inner: nn.MultiheadAttention) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x, x, x)[0]


class GPT2Block(nn.Module):
    """A GPT-2 block written with the stand-in Conv1D (c_attn, c_proj, c_fc), tied head."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, d)
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.c_mlp = Conv1D(d, 4 * d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + self.c_mlp(F.gelu(self.c_fc(self.ln_2(x))))
        return self.head(self.ln_f(x))


def prelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.PReLU(), nn.Linear(6, 3))


# ----------------------------------------------------------------------------- data and losses


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def feats(*shape):
    def make(gen, n, dtype):
        return torch.randn(n, *shape, generator=gen, dtype=dtype)

    return make


def ints(high, *shape):
    def make(gen, n, dtype):
        return torch.randint(0, high, (n, *shape), generator=gen)

    return make


@dataclass(frozen=True)
class Arch:
    id: str
    model_fn: Callable[[], nn.Module]
    x_fn: Callable
    y_fn: Callable
    loss_fn: Callable = F.cross_entropy
    dtype: torch.dtype = torch.float64
    seed: int = 0
    n: int = 7  # samples
    chunk: int = 3  # the components' batch size (chunks of the per-sample route)
    dropout: str = "off"
    train: bool = False  # leave the model in training mode (dropout, WeightDrop)
    fallback: tuple[str, ...] = ()  # parameters that must reach the exact fallback
    dots_fallback: bool = False
    attempts: int = 1  # 2 where only the spot check can see the problem (a rerun)

    @property
    def rtol(self) -> float:
        return 1e-10 if self.dtype == torch.float64 else 1e-6

    def build(self):
        torch.manual_seed(self.seed)
        model = self.model_fn().to(self.dtype)
        model.train(self.train)
        gen = torch.Generator().manual_seed(100 + self.seed)
        return model, self.x_fn(gen, self.n, self.dtype), self.y_fn(gen, self.n, self.dtype)


def _f32(arch: Arch, **changes) -> Arch:
    return Arch(**{**arch.__dict__, "id": arch.id + "-float32", "dtype": torch.float32, **changes})


_LSTM_ARGS = {"batch_first": True}
ZOO: list[Arch] = [
    Arch("mlp", mlp, feats(5), ints(3)),
    Arch("mse-regression", lambda: nn.Linear(3, 2), feats(3), feats(2), F.mse_loss, seed=1),
    Arch("cnn-groupnorm-reflect", cnn_groupnorm_reflect, feats(2, 6, 6), ints(3), seed=2),
    Arch("conv2d-same-even-kernel", conv2d_same_even, feats(2, 5, 5), ints(2), seed=3),
    Arch("conv2d-valid-circular", conv2d_valid_circular, feats(2, 7, 7), ints(3), seed=4),
    Arch("conv1d-same-replicate", conv1d_same_replicate, feats(3, 8), ints(2), seed=5),
    Arch("conv1d-wide-grouped", conv1d_wide_grouped, feats(16, 12), ints(2), seed=6),
    Arch("conv3d-same-reflect", conv3d, feats(2, 4, 4, 4), ints(3), seed=7),
    Arch("conv-transpose1d", conv_transpose1d, feats(4, 5), ints(2), seed=8),
    Arch("conv-transpose2d", conv_transpose2d, feats(3, 3, 3), ints(2), seed=9),
    Arch("conv-transpose3d", conv_transpose3d, feats(2, 2, 2, 2), ints(2), seed=10),
    Arch(
        "embedding-padding-idx-max-norm",
        lambda: Bag(padding_idx=0, max_norm=0.8),
        ints(7, 6),
        ints(3),
        seed=11,
    ),
    Arch("embedding-sparse", lambda: Bag(sparse=True), ints(7, 6), ints(3), seed=12),
    Arch(
        "embedding-scale-grad-by-freq",
        lambda: Bag(scale_grad_by_freq=True),
        ints(4, 6),
        ints(3),
        seed=13,
        fallback=("emb.weight",),
    ),
    Arch("layernorm-rmsnorm", Norms, feats(3, 6), ints(3), seed=14),
    Arch("groupnorm-batchnorm-eval-instancenorm", conv_norms, feats(2, 4, 4), ints(3), seed=15),
    Arch(
        "multihead-attention",
        Attention,
        feats(5, 4),
        ints(3),
        seed=16,
    ),
    Arch(
        "transformer-encoder-layer",
        Encoder,
        feats(5, 4),
        ints(3),
        seed=17,
        train=True,  # dropout modules switched off by the "off" policy
    ),
    Arch(
        "multihead-attention-dropout-fixed",
        lambda: Attention(dropout=0.3),
        feats(5, 4),
        ints(3),
        seed=32,
        dropout="fixed",
        train=True,  # attention dropout inside the call: each sample's weights, the chunk's masks
    ),
    Arch(
        "gru-bidirectional-2-layers",
        lambda: Recurrent(lambda: nn.GRU(4, 3, num_layers=2, bidirectional=True, **_LSTM_ARGS), 6),
        ints(9, 4),
        ints(3),
        seed=18,
    ),
    Arch(
        "lstm-bidirectional-2-layers",
        lambda: Recurrent(lambda: nn.LSTM(4, 3, num_layers=2, bidirectional=True, **_LSTM_ARGS), 6),
        ints(9, 4),
        ints(3),
        seed=19,
    ),
    Arch(
        "lstm-proj-size",
        lambda: Recurrent(lambda: nn.LSTM(4, 5, proj_size=2, **_LSTM_ARGS), 2),
        ints(9, 4),
        ints(3),
        seed=20,
    ),
    Arch(
        "lstm-2-layers-dropout-train-off",
        lambda: Recurrent(lambda: nn.LSTM(4, 3, num_layers=2, dropout=0.5, **_LSTM_ARGS), 3),
        ints(9, 4),
        ints(3),
        seed=21,
        train=True,
    ),
    Arch(
        "rnn-tanh",
        lambda: Recurrent(lambda: nn.RNN(4, 3, **_LSTM_ARGS), 3),
        ints(9, 4),
        ints(3),
        seed=22,
    ),
    Arch(
        "lstm-seq-first-bare-initial-state",
        RNNState,
        ints(9, 4),
        ints(3),
        seed=23,
        fallback=("h0",),
    ),
    Arch(
        "nanogpt-tied-head",
        NanoGPT,
        ints(11, 6),
        ints(11, 6),
        lm_loss,
        seed=24,
        # wte: its embedding rule and the tied head's use (F.linear) summed with their cross
        # term; wpe: its output (T, d) has no sample axis, so the use recorder follows it to
        # the broadcast add and carries the add's per-sample gradient back through the lookup
    ),
    Arch(
        "weightdrop-lstm-lm-train-fixed",
        WeightDropLM,
        ints(9, 5),
        ints(9, 5),
        lm_loss,
        seed=25,
        dropout="fixed",
        train=True,
        # nn.Dropout on the transposed LSTM output: torch draws the mask of a non-contiguous
        # tensor in another order under forward-mode AD, so the JVP's losses differ from
        # pass 1's and the dots come from per-sample gradients through the batch forward
        dots_fallback=True,
    ),
    Arch(
        "mlp-dropout-train-fixed",
        mlp_dropout,
        feats(5),
        ints(3),
        seed=26,
        dropout="fixed",
        train=True,
    ),
    Arch("bare-parameter", BareParameter, feats(5), ints(3), seed=27),  # served by their uses
    Arch(
        "tied-modules",
        TiedModules,
        ints(6, 5),
        ints(6, 5),
        lm_loss,
        seed=28,  # the tied weight: both modules' rules, summed with their cross term
    ),
    Arch("shared-linear-inplace-relu", Shared, feats(4), ints(2), seed=29),
    Arch(
        "sample-axis-moved-inside",
        SampleAxisInside,
        feats(3, 3),
        ints(2),
        seed=30,
        n=6,
        chunk=3,
        fallback=("lin.weight", "lin.bias"),
        attempts=2,
    ),
    Arch("prelu", prelu_mlp, feats(5), ints(3), seed=31, fallback=("1.weight",)),
    Arch("gpt2-block-hf-conv1d", GPT2Block, ints(11, 6), ints(11, 6), lm_loss, seed=33),
]
# float32 twins of a selection (1e-6 against the float64 brute force)
ZOO += [
    _f32(a)
    for a in ZOO
    if a.id
    in (
        "mlp",
        "cnn-groupnorm-reflect",
        "conv2d-same-even-kernel",
        "conv1d-wide-grouped",
        "conv-transpose2d",
        "layernorm-rmsnorm",
        "lstm-2-layers-dropout-train-off",
        "nanogpt-tied-head",
        "embedding-padding-idx-max-norm",
        "multihead-attention",
        "transformer-encoder-layer",
        "gpt2-block-hf-conv1d",
    )
]

ETAS = (0.05, 0.5, math.inf)


def by_id(arch_id: str) -> Arch:
    return next(a for a in ZOO if a.id == arch_id)
