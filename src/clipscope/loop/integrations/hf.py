r"""The Monitor in a Hugging Face ``Trainer``: :class:`MonitorCallback` (``clipscope[hf]``).

The Trainer's order in an optimizer step, and what the callback does:

* ``on_step_begin``: ``monitor.step(state.global_step)`` -- a probe when due;
* the Trainer runs forward/backward (every accumulated batch), then, with
  ``max_grad_norm > 0``, clips with ``accelerator.clip_grad_norm_`` (torch's
  ``clip_grad_norm_``: ``g·min(1, η/(‖g‖ + 1e-6))``, after unscaling fp16
  gradients) **before any callback sees the gradient**;
* ``on_pre_optimizer_step``: the callback records the step from the gradient
  the optimizer is about to apply. The cosine with ∇f_k is exact (a norm clip
  is a positive rescaling). The norm before clipping is exact where the
  Trainer did not clip (post-clip norm below ``max_grad_norm − 1e-6``: the
  coefficient was 1); where it clipped, the norm is not recoverable from the
  clipped gradient and is recorded as NaN with ``step_clipped = 1`` (the
  Trainer's operator scaled it: ‖g‖ > η − 1e-6; the paper's C clips for
  ‖g‖ > η -- they differ only for ‖g‖ in (η − 1e-6, η]). fp16 without
  clipping: the gradient is still loss-scaled here, so the norm is NaN and
  ``step_clipped`` NaN;
* ``on_log``: where the Trainer logged ``grad_norm`` (its pre-clip norm, at
  every ``logging_steps``-th step), the step gets that exact value and
  ``step_clipped = grad_norm > η``. With ``logging_steps=1`` every step is exact;
* ``on_train_end``: ``monitor.close()``; an exception of the Monitor in any
  hook (a probe that fails at step 2) first finishes the run directory as
  stopped (``summary.json``: ``"status": "failed"`` and the error; the Trainer
  has no exception hook) and then goes on to the caller;
* ``on_train_begin``: the Monitor's checks run again
  (:meth:`~clipscope.loop.monitor.Monitor.check_model`) with the model in
  train mode, the mode the Trainer trains it in (it calls ``model.train()``
  before every step, so a ``model.eval()`` before the Monitor is undone): a
  model the probes would refuse (attention dropout under ``dropout="off"``) is
  refused before the first step, with the Trainer's way out
  (``dropout="fixed"``, or the config's attention dropout 0);
* ``on_train_begin``: the Trainer's optimizer is handed to the Monitor
  (:meth:`~clipscope.loop.monitor.Monitor.use_optimizer`). With an Adam or AdamW
  (the Trainer's default ``adamw_torch``, inside accelerate's wrapper) every
  probe reads its preconditioner P and records ρ_P at ``max_grad_norm`` (the
  Monitor's η) beside ρ, and every step ``step_cos_p``. A component of the
  probe's partition plays the role of the Trainer's step mini-batch, which the
  Trainer clips by its **global** norm: the paper's clipped component
  gradient, then ``−lr·P⁻¹`` of it (through Adam's momentum);
* ``on_save`` / ``on_train_begin``: the Monitor's state is saved as
  ``clipscope_monitor.pt`` in each checkpoint folder (by the main process)
  and loaded back when training resumes from that checkpoint.

**Per-sample components** (``Monitor(..., per_sample=True)``): the per-sample
route needs ``loss(output, target)`` on ``(x, y)`` batches; :class:`PerSampleLM`
gives a causal LM that form on the same parameters (build the Monitor on
``PerSampleLM(model)``, its ``loss`` and its ``components``; the Trainer trains
``model``). Each sample is then a component with its own token-mean loss; the
steps are still the Trainer's mini-batch gradients (``docs/integrations.md``,
"Per-sample components").

The Monitor's η must equal the Trainer's ``max_grad_norm`` when the Trainer
clips (else the per-step ``clipped`` flags would describe two thresholds):
``on_train_begin`` refuses a mismatch.

**Descent-safe clipping** (``Monitor(..., eta="descent-safe")``, issue 23): the
Monitor sets η at every probe, and the callback sets the Trainer's threshold
to it: ``args.max_grad_norm = monitor.eta`` in ``on_step_begin``, right after
``monitor.step`` (the Trainer reads ``args.max_grad_norm`` at every step; η =
∞ is written 0, the Trainer's "no clipping"). The ``max_grad_norm`` given in
the ``TrainingArguments`` is replaced (a log line says so); every change of η
is a line of the Monitor's log and its ``eta`` column. The Trainer's clip is
torch's ``clip_grad_norm_`` (``+1e-6``), as above.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from clipscope.atomic import atomic_write_bytes
from clipscope.components import Components
from clipscope.errors import ConfigError
from clipscope.loop.integrations import check_in_train_mode
from clipscope.loop.measures import gradient_products
from clipscope.loop.monitor import Monitor

__all__ = ["IGNORE_INDEX", "STATE_FILE", "MonitorCallback", "PerSampleLM"]

#: The Monitor's state in each of the Trainer's checkpoint folders.
STATE_FILE = "clipscope_monitor.pt"

#: The label Hugging Face's losses ignore (padding, prompt tokens).
IGNORE_INDEX = -100

#: The keys of a causal LM's batch that :class:`PerSampleLM` passes on.
LM_KEYS = ("input_ids", "attention_mask", "labels")

_SLACK = 1e-5  # relative: float32 rounding of the Trainer's norm against ours


def _lr(kwargs: dict[str, Any]) -> float:
    optimizer = kwargs.get("optimizer")
    if optimizer is None or not getattr(optimizer, "param_groups", None):
        return math.nan
    return float(optimizer.param_groups[0]["lr"])


#: The config keys of Hugging Face attention dropout (GPT-2, BERT, Llama and most others).
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


def _attention_dropout(model: nn.Module) -> list[str]:
    """``key=value`` of each attention-dropout probability > 0 in the configs of ``model``."""
    found: list[str] = []
    for module in model.modules():
        config = getattr(module, "config", None)
        for key in ATTENTION_DROPOUT_KEYS:
            value = getattr(config, key, None)
            text = f"{key}={value}"
            if isinstance(value, (int, float)) and value > 0 and text not in found:
                found.append(text)
    return found


def _check_in_train_mode(monitor: Monitor) -> None:
    """:func:`~clipscope.loop.integrations.check_in_train_mode` with the Trainer's way out.

    The Trainer calls ``model.train()`` before every training step (after
    ``on_step_begin``): every probe after step 0 sees the model in train mode,
    whatever mode it was in when the Monitor was built. A refusal names the
    Trainer's way out (``dropout="fixed"`` or the config's attention dropout 0).
    """
    found = _attention_dropout(monitor.model)
    fix = (
        "where the loss changed between two evaluations (random draws in train mode), "
        "build the Monitor with dropout='fixed' (one fixed mask per component, the same at "
        "every evaluation), or set the config's attention dropout to 0 before building the "
        f"model ({', '.join(found) or 'none found > 0 in this model'} here; GPT-2: "
        "attn_pdrop, BERT: attention_probs_dropout_prob, Llama: attention_dropout); "
        "the model.eval() named above does not help here: the Trainer undoes it"
    )
    check_in_train_mode(
        monitor, "MonitorCallback.on_train_begin",
        "the Trainer (model.train() before every step)", fix,
    )  # fmt: skip


class MonitorCallback(TrainerCallback):
    """Drive ``monitor`` from a Hugging Face ``Trainer`` (see the module docstring).

    Parameters
    ----------
    monitor : Monitor
        Built on the model the Trainer trains; its η equal to
        ``TrainingArguments.max_grad_norm`` when that is > 0.
    """

    def __init__(self, monitor: Monitor) -> None:
        if not isinstance(monitor, Monitor):
            raise TypeError(f"monitor must be a clipscope.Monitor, got {type(monitor)!r}")
        self.monitor = monitor

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Check η and the model in train mode, take the optimizer, load the state on resume.

        Raises
        ------
        ConfigError
            ``max_grad_norm`` > 0 differs from the Monitor's η.
        ValueError
            The Monitor's checks (:meth:`~clipscope.loop.monitor.Monitor.check_model`)
            refuse the model in train mode, the mode the Trainer trains it in
            (e.g. attention dropout that ``dropout="off"`` cannot switch off):
            raised before any training step, nothing written.
        """
        clip_at = args.max_grad_norm or 0.0
        if self.monitor.sets_eta:  # descent-safe: the Monitor sets the Trainer's threshold
            if clip_at > 0:
                self.monitor.log(
                    f"descent-safe: the Trainer's max_grad_norm={clip_at} is replaced by the "
                    "Monitor's η at every probe"
                )
        elif clip_at > 0 and not math.isclose(clip_at, self.monitor.eta, rel_tol=1e-12):
            raise ConfigError(
                f"the Trainer clips at max_grad_norm={clip_at} but the Monitor's eta is "
                f"{self.monitor.eta}: give both the same threshold (or max_grad_norm=0 to let "
                "the Monitor only observe)"
            )
        _check_in_train_mode(self.monitor)
        with self._stopping():
            self.monitor.use_optimizer(kwargs.get("optimizer"))
            if state.global_step > 0:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
                if os.path.isfile(path):
                    self.monitor.load_state_dict(torch.load(path, weights_only=True))

    @contextlib.contextmanager
    def _stopping(self) -> Iterator[None]:
        """On an exception of the Monitor: finish its run directory as stopped, then re-raise.

        A Hugging Face ``Trainer`` has no exception hook: an exception raised in a
        callback ends ``trainer.train()`` without ``on_train_end``. The run
        directory's ``summary.json`` then says ``status`` ``"failed"`` (or
        ``"nonfinite"``, ``"interrupted"``) with the error as ``message``
        (:meth:`Monitor.__exit__ <clipscope.loop.monitor.Monitor.__exit__>`), and
        ``clipscope report`` shows the run as stopped. A Monitor that has written
        nothing yet is left as it is.
        """
        try:
            yield
        except BaseException as exc:
            if self.monitor._started:  # nothing written: nothing to finish
                self.monitor.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """``monitor.step(state.global_step)``; descent-safe: ``max_grad_norm`` = η."""
        with self._stopping():
            self.monitor.step(state.global_step, lr=_lr(kwargs))
        if self.monitor.sets_eta:
            eta = self.monitor.eta
            args.max_grad_norm = eta if math.isfinite(eta) else 0.0

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Record the update from the (possibly clipped) gradient the optimizer will apply."""
        monitor = self.monitor
        if monitor._open is None:  # before the first probe: nothing is recorded
            return
        clip_at = args.max_grad_norm or 0.0
        with self._stopping():
            now = math.sqrt(gradient_products(monitor.params)[0])
            if clip_at > 0 and not now < (clip_at - 1e-6) * (1 - _SLACK):
                monitor.gradient(math.nan, clipped=True)  # the Trainer clipped: ‖g‖ unknown
            elif args.fp16 and clip_at <= 0:
                monitor.gradient(math.nan)  # still loss-scaled: neither ‖g‖ nor ‖g‖ > η known
            else:
                monitor.gradient(now)  # not clipped: the gradient is the step's own

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """Give the step just taken the Trainer's own pre-clip ``grad_norm``, where logged."""
        value = (logs or {}).get("grad_norm")
        if value is not None and math.isfinite(float(value)):
            with self._stopping():
                self.monitor._amend_pending(state.global_step, float(value))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Save the Monitor's state into the checkpoint folder just written (main process)."""
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with self._stopping():
                buffer = io.BytesIO()
                torch.save(self.monitor.state_dict(), buffer)
                atomic_write_bytes(os.path.join(folder, STATE_FILE), buffer.getvalue())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """``monitor.close()``."""
        with self._stopping():
            self.monitor.close()


class PerSampleLM(nn.Module):
    r"""A Hugging Face causal LM as ``model(x) -> logits``: per-sample components of its batches.

    The per-sample route (``Monitor(..., per_sample=True)``, ``clipscope.probe(...,
    batch_sizes=[1])``) needs ``loss(model(x), y)`` on ``(x, y)`` batches with the
    samples along dim 0; a Hugging Face batch is a dict and its loss is
    ``model(**batch).loss``, the token mean over the whole batch. This module
    gives the same model that form:

    * ``x`` is ``(B, 2, T)`` int64, ``input_ids`` and ``attention_mask`` stacked
      (:meth:`collate`; an absent mask is all ones), ``y`` the ``labels``
      ``(B, T)``; ``forward(x)`` is ``model(input_ids=x[:, 0],
      attention_mask=x[:, 1]).logits``, ``(B, T, V)`` -- the forward the
      Trainer runs on that batch (``model(**batch)``, less the loss);
    * :meth:`loss` is sample j's **own** mean loss over its non-ignored tokens
      with Hugging Face's causal shift (token t predicts label t + 1; labels
      ``-100`` ignored), ``ℓ_j = Σ_t ce(z_{j,t}, y_{j,t+1}) / n_j``, and on a batch
      the mean of the samples' ``ℓ_j``.

    The Monitor's f is then ``(1/N) Σ_j ℓ_j``, the mean of per-sample means. The
    Trainer's batch loss is the token mean ``Σ_j n_j ℓ_j / Σ_j n_j``: the two
    are equal where every sample has the same number of label tokens (no
    padding, no ignored prompt), else they weight the samples differently
    (the step gradient the Monitor reads is the Trainer's).

    ``ℓ_j`` is row j's loss as the model computes it in its padded batch. With
    right padding and the attention mask (Hugging Face's default for GPT-2 and
    Llama tokenizers) a causal model's row j does not depend on the padding:
    ``ℓ_j`` and its gradient equal those of sample j alone, unpadded (tested to
    1e-10 in float64 on GPT-2 and Llama). Left padding shifts the positions of
    models that count them from 0 (GPT-2 without ``position_ids``): ``ℓ_j`` is then
    the padded row's, as the Trainer computes it.

    Parameters
    ----------
    model : nn.Module
        A causal LM whose ``forward(input_ids=..., attention_mask=...)`` returns
        ``.logits`` ``(B, T, V)`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...),
        the one the Trainer trains: its parameters are this module's.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> lm = PerSampleLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2,
    ...                                             vocab_size=11, n_positions=8)))
    >>> x, y = lm.collate()([{"input_ids": torch.tensor([1, 2, 3]),
    ...                       "labels": torch.tensor([1, 2, 3])}] * 2)
    >>> x.shape, y.shape, lm(x).shape, lm.loss(lm(x), y).dim()
    (torch.Size([2, 2, 3]), torch.Size([2, 3]), torch.Size([2, 3, 11]), 0)
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model)!r}")
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(B, T, V)`` of ``x`` = ``(B, 2, T)`` (input ids, attention mask)."""
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(
                f"PerSampleLM takes x of shape (B, 2, T) (input_ids and attention_mask stacked "
                f"by PerSampleLM.collate), got {tuple(x.shape)}"
            )
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the mean over the samples of each sample's mean causal-LM loss.

        ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` (``-100``: ignored).
        Sample j's loss is the cross-entropy of ``logits[j, t]`` against
        ``labels[j, t + 1]`` averaged over its ``n_j`` non-ignored targets (float16
        and bfloat16 logits are upcast to float32, as Hugging Face's loss does).
        A sample without a target gives NaN (:meth:`collate` refuses it first).

        Raises
        ------
        TypeError
            ``logits`` is not a tensor (the model's output object: the Monitor was
            built on the Hugging Face model instead of ``PerSampleLM(model)``).
        ValueError
            ``logits`` is not ``(B, T, V)`` with ``labels`` ``(B, T)``.
        """
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"PerSampleLM.loss takes logits (B, T, V), got {type(logits).__name__}: build the "
                "Monitor (or the probe) on PerSampleLM(model), not on the model itself"
            )
        if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
            raise ValueError(
                f"PerSampleLM.loss takes logits (B, T, V) and labels (B, T), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}: build the Monitor (or the "
                "probe) on PerSampleLM(model), not on the model itself"
            )
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        targets = labels[:, 1:]
        tokens = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counts = (targets != IGNORE_INDEX).sum(1).to(tokens.dtype)
        return (tokens.sum(1) / counts).mean()

    @staticmethod
    def collate(
        collate_fn: Callable[[list], Any] | None = None,
    ) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
        """Return ``items -> (x, y)``: a Hugging Face batch in this module's ``(x, y)`` form.

        ``collate_fn(items)`` (default torch's ``default_collate``: equal lengths;
        give your padding collator, e.g. ``DataCollatorForLanguageModeling(tok,
        mlm=False)``) must give a dict with ``input_ids`` and ``labels`` ``(B, T)``
        and optionally ``attention_mask`` (0/1). The checks below run on every
        batch made (``Components.from_dataset`` makes the first one at once).

        Raises
        ------
        TypeError
            The batch is not a dict.
        ValueError
            A key other than ``input_ids``, ``attention_mask``, ``labels`` (the
            model would get it from the Trainer, not from this module); a missing
            ``input_ids`` or ``labels``; shapes that differ; an attention mask with
            values other than 0 and 1; a sample without a label to predict after
            the shift (its mean loss would be 0/0). Called directly, the message
            names the offending rows of the batch; through :meth:`components`, the
            dataset indices of the offending items.
        """
        inner = default_collate if collate_fn is None else collate_fn
        if not callable(inner):
            raise TypeError(f"collate_fn must be callable or None, got {collate_fn!r}")

        def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
            return _pack(inner(items))

        collate.__qualname__ = f"PerSampleLM.collate({getattr(inner, '__qualname__', inner)})"
        return collate

    def components(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int | None = None,
        drop_last: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> Components:
        """Return the components of ``dataset`` in this module's ``(x, y)`` form.

        ``Components.from_dataset(dataset, batch_size, seed=, drop_last=,
        collate_fn=self.collate(collate_fn))``. With ``Monitor(...,
        per_sample=True)`` each sample is a component and ``batch_size`` the size
        of the chunks the probe evaluates together.

        Raises
        ------
        ValueError
            :meth:`collate` refuses a batch (the first item's when the components
            are made, a component's when it is evaluated): the message names the
            dataset indices of the offending items (for a refusal of the whole
            batch, e.g. an extra key, the batch's items).
        TypeError
            As :meth:`Components.from_dataset
            <clipscope.components.Components.from_dataset>`.
        """
        collate = self.collate(collate_fn)
        try:
            return _LMComponents.from_dataset(
                dataset, batch_size, seed=seed, drop_last=drop_last, collate_fn=collate
            )
        except TypeError as exc:  # from_dataset's wrapping of the first item's refusal
            if not isinstance(exc.__cause__, _BatchRefused):
                raise
            # the same partition (no collate run): its first item is the one refused
            first = Components(
                dataset, len(dataset), batch_size=batch_size, seed=seed, drop_last=drop_last,
                kind="dataset", collate_fn=collate,
            ).indices[0][:1]  # fmt: skip
            raise exc.__cause__.at(first.tolist()) from None


class _BatchRefused(ValueError):
    """A batch :meth:`PerSampleLM.collate` refuses; ``rows`` the offending rows (None: all).

    The collate sees the items, not their dataset indices: :class:`_LMComponents`
    (which knows the component's indices) re-raises it as a ``ValueError`` that
    names the dataset items (:meth:`at`).
    """

    def __init__(self, template: str, rows: Sequence[int] | None = None) -> None:
        self.template, self.rows = template, None if rows is None else list(rows)
        super().__init__(self._text(None))

    def _text(self, indices: Sequence[int] | None) -> str:
        if indices is None:
            where = (
                "the batch"
                if self.rows is None
                else f"row(s) {_few(self.rows)} of the batch "
                "(positions in the list of items given to the collate)"
            )
        elif self.rows is None:
            where = f"the batch of dataset item(s) {_few(list(indices))}"
        else:
            where = f"dataset item(s) {_few([indices[r] for r in self.rows])}"
        return "PerSampleLM.collate: " + self.template.replace("{where}", where)

    def at(self, indices: Sequence[int]) -> ValueError:
        """Return the same refusal naming dataset items (``indices``: the batch's, in row order)."""
        return ValueError(self._text([int(j) for j in indices]))


def _few(values: list[int], shown: int = 8) -> str:
    """Return ``[a, b, c]``, or the first ``shown`` values and how many in all."""
    if len(values) <= shown:
        return str(values)
    return "[" + ", ".join(map(str, values[:shown])) + f", … ({len(values)} in all)]"


class _LMComponents(Components):
    """:class:`~clipscope.components.Components` whose collate refusals name dataset items."""

    def batch(self, i: int, device: torch.device | str | None = None) -> Any:
        """Component ``i``'s batch (:meth:`Components.batch`).

        Raises
        ------
        ValueError
            :meth:`PerSampleLM.collate` refuses the batch: the message names the
            dataset indices of the offending items.
        """
        try:
            return super().batch(i, device)
        except _BatchRefused as exc:
            raise exc.at(self.indices[i].tolist()) from None

    def with_batch_size(self, batch_size: int) -> _LMComponents:
        """Return the same samples at ``batch_size`` (:meth:`Components.with_batch_size`)."""
        out = super().with_batch_size(batch_size)
        out.__class__ = _LMComponents  # no state of its own: the same object, these messages
        return out


def _pack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a causal LM's dict batch (:meth:`PerSampleLM.collate`)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"PerSampleLM.collate: the collate function gave {type(batch).__name__}, not a dict "
            "of input_ids, labels (and attention_mask)"
        )
    extra = sorted(set(batch) - set(LM_KEYS))
    if extra:
        raise _BatchRefused(
            f"{{where}} holds {extra} beside {list(LM_KEYS)}; the model would "
            "get them from the Trainer but not from PerSampleLM, so its per-sample losses "
            "would not be the Trainer's: drop them from the data"
        )
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise _BatchRefused(f"{{where}} has no {missing}")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if not (ids.dim() == 2 and ids.shape == labels.shape == mask.shape):
        raise _BatchRefused(
            "input_ids, labels and attention_mask must share one shape (B, T), got "
            f"{tuple(ids.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)} in "
            "{where}"
        )
    bad = ((mask != 0) & (mask != 1)).any(1).nonzero().flatten().tolist()
    if bad:
        values = sorted({v for v in mask[bad].unique().tolist() if v not in (0, 1)})
        raise _BatchRefused(
            f"the attention_mask of {{where}} holds {_few(values)}: it must hold 0 and 1 only "
            "(1: a token to attend to, 0: padding)",
            bad,
        )
    empty = ((labels[:, 1:] != IGNORE_INDEX).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise _BatchRefused(
            "{where} have no label to predict after the causal shift (all -100): a per-sample "
            "mean loss needs one; leave them out of the data",
            empty,
        )
    return torch.stack([ids, mask.to(ids.dtype)], 1), labels
