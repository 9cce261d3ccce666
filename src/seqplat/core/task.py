"""The task contract: data splits, input encoder, head, loss and metrics.

A task hands the trainer :class:`Batch` objects. Training batches are addressed by step
(``train_batch(step, batch_size, seed)``), so a resumed run sees exactly the batches an
uninterrupted run would have seen, with no iterator state to save. Evaluation batches come from
``eval_batches(split, batch_size)``.

Metrics are computed from *sufficient statistics*: ``batch_stats`` returns sums (loss, counts,
confusion matrix...) that the trainer adds over batches and processes, and ``finalize`` turns them
into numbers. That makes multi-process evaluation exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


@dataclass
class Batch:
    """One batch. ``inputs`` is ``[b,t]`` token ids or ``[b,t,d]`` features; ``times`` is ``[b,t]``.

    ``targets`` is ``[b,t]`` for per-step heads and ``[b]`` (or ``[b,k]`` for regression) for
    last-step heads. ``mask`` (``[b,t]``, 1 = counts) restricts per-step losses (a last-step head reads
    its last column). ``reset`` marks the first chunk of a stream epoch: the trainer starts it from the
    initial state. A NaN in ``times`` marks a padded step: time-aware cells hold their state there.
    """

    inputs: Tensor
    targets: Tensor
    times: Tensor | None = None
    mask: Tensor | None = None
    reset: bool = False

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, Tensor):
                moved[k] = v.to(device)
        return Batch(**moved)

    def shard(self, rank: int, world: int, allow_uneven: bool = False) -> Batch:
        """Rows ``[rank*b/world, (rank+1)*b/world)`` for one of ``world`` processes. Evaluation allows an
        uneven split (statistics are sums); training needs equal shards for exact gradient averaging."""
        if world == 1:
            return self
        b = self.inputs.shape[0]
        if b % world and not allow_uneven:
            raise ValueError(f"batch size {b} is not divisible by the number of processes {world}")
        lo, hi = (rank * b) // world, ((rank + 1) * b) // world
        sl = slice(lo, hi)
        return replace(
            self,
            inputs=self.inputs[sl],
            targets=self.targets[sl],
            times=None if self.times is None else self.times[sl],
            mask=None if self.mask is None else self.mask[sl],
        )

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.shape[0] * self.inputs.shape[1])


class TaskConfig(BaseModel):
    """Base of every task's config: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task:
    """Base class of tasks. Subclasses set the class attributes and implement the data methods."""

    config_class: ClassVar[type[BaseModel]] = TaskConfig
    #: training batches are consecutive chunks of long streams: carry (detached) state across them
    stream: ClassVar[bool] = False
    #: batches carry ``times`` (event-based or irregularly sampled data)
    provides_times: ClassVar[bool] = False
    #: "per_step": a prediction at every step; "last_step": one prediction per sequence
    head_kind: ClassVar[Literal["per_step", "last_step"]] = "last_step"
    #: "classification" (cross-entropy) or "regression" (mean squared error)
    output_kind: ClassVar[Literal["classification", "regression"]] = "classification"
    #: the metric used for model selection and early stopping, and whether lower is better
    primary_metric: ClassVar[str] = "loss"
    primary_mode: ClassVar[Literal["min", "max"]] = "min"
    #: set when the task is a fixed-budget protocol's memoryless baseline, shown beside results
    baseline: float | None = None
    #: keep a confusion matrix (accuracy and macro-F1); off for large vocabularies (accuracy only)
    metric_confusion: ClassVar[bool] = True

    def __init__(self, config: BaseModel):
        self.config = config

    # -- shapes -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int | None:
        """Number of token ids for token inputs; None for feature inputs."""
        return None

    @property
    def input_features(self) -> int:
        """Width of feature inputs (ignored for token inputs)."""
        raise NotImplementedError(f"{type(self).__name__} must define input_features (or vocab_size for tokens)")

    @property
    def num_outputs(self) -> int:
        """Classes for classification, targets per prediction for regression."""
        raise NotImplementedError(f"{type(self).__name__} must define num_outputs")

    # -- data -----------------------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The training batch of global step ``step`` (deterministic in ``step`` and ``seed``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_batch")

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        """A fixed sequence of evaluation batches."""
        raise NotImplementedError(f"{type(self).__name__} must implement eval_batches")

    def steps_per_epoch(self, batch_size: int) -> int | None:
        """Training steps in one pass over the data; None for generated data."""
        return None

    def prepare(self) -> None:
        """Load or verify data before training starts (so missing files fail early)."""

    # -- model pieces ------------------------------------------------------------------------
    def build_encoder(self, embedding_size: int | None) -> tuple[nn.Module, int]:
        """The input encoder and its output width: an embedding for tokens, a linear map (or the
        identity when ``embedding_size`` is None) for features."""
        if self.vocab_size is not None:
            size = embedding_size or 128
            return nn.Embedding(self.vocab_size, size), size
        if embedding_size is None:
            return nn.Identity(), self.input_features
        return nn.Linear(self.input_features, embedding_size), embedding_size

    def build_head(self, hidden_size: int) -> nn.Module:
        return nn.Linear(hidden_size, self.num_outputs)

    # -- loss and metrics ----------------------------------------------------------------------
    def loss(self, out: Tensor, batch: Batch) -> Tensor:
        """Mean loss of the head's outputs over the counted predictions."""
        stats = self.batch_stats(out, batch, with_grad=True)
        return stats["loss_sum"] / stats["count"].clamp_min(1)

    def batch_stats(self, out: Tensor, batch: Batch, with_grad: bool = False) -> dict[str, Tensor]:
        """Summable statistics of one batch (``loss_sum`` and ``count`` at least)."""
        if self.output_kind == "regression":
            target = batch.targets.to(out.dtype).reshape(out.shape)
            se = (out - target).pow(2).reshape(out.shape[0], -1).mean(-1)
            stats = {"loss_sum": se.sum(), "count": torch.tensor(float(out.shape[0]), device=out.device)}
        else:
            logits = out.reshape(-1, out.shape[-1])
            target = batch.targets.reshape(-1)
            nll = F.cross_entropy(logits, target, reduction="none")
            mask = batch.mask
            if mask is not None and self.head_kind == "last_step" and mask.dim() == 2:
                mask = mask[:, -1]  # a [b,t] mask: the last step is what a last-step head predicts
            if mask is not None:
                m = mask.reshape(-1).to(nll.dtype)
                nll = nll * m
                count = m.sum()
            else:
                count = torch.tensor(float(nll.numel()), device=out.device)
            stats = {"loss_sum": nll.sum(), "count": count}
            if not with_grad and self.metric_confusion:
                pred = logits.argmax(-1)
                valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask.reshape(-1) > 0
                k = self.num_outputs
                conf = torch.bincount(target[valid] * k + pred[valid], minlength=k * k).reshape(k, k)
                stats["confusion"] = conf.to(torch.float64)
            elif not with_grad:  # large vocabularies: count correct predictions only
                ok = logits.argmax(-1) == target
                stats["correct"] = (ok.to(nll.dtype) * (m if mask is not None else 1.0)).sum()
        if not with_grad:
            stats = {k: v.detach().to(torch.float64) for k, v in stats.items()}
        return stats

    def finalize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """Metrics from summed statistics."""
        loss = float(stats["loss_sum"] / stats["count"].clamp_min(1))
        out = {"loss": loss}
        if self.output_kind == "regression":
            out["mse"] = loss
            out["rmse"] = math.sqrt(loss)
        if "confusion" in stats:
            out.update(classification_metrics(stats["confusion"]))
        elif "correct" in stats:
            out["accuracy"] = float(stats["correct"] / stats["count"].clamp_min(1))
        return out


def classification_metrics(confusion: Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction)."""
    conf = confusion.to(torch.float64)
    tp = conf.diag()
    total = conf.sum()
    acc = float(tp.sum() / total) if total > 0 else 0.0
    precision = tp / conf.sum(0).clamp_min(1e-12)
    recall = tp / conf.sum(1).clamp_min(1e-12)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall + 1e-12),
                     torch.zeros_like(tp))
    present = conf.sum(1) > 0
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    return {"accuracy": acc, "macro_f1": macro_f1}


def bpc(loss_nats: float) -> float:
    """Bits per character from a mean cross-entropy in nats."""
    return loss_nats / math.log(2)


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 50.0))


class StreamLMConfig(TaskConfig):
    bptt: int = Field(100, ge=1, description="truncated-BPTT window: time steps per training chunk")
    eval_bptt: int | None = Field(None, ge=1, description="window for evaluation chunks (default: bptt)")
    eval_batch_size: int | None = Field(
        None, ge=1, description="parallel rows at evaluation (default: train.eval_batch_size)"
    )
    max_eval_tokens: int | None = Field(
        None, ge=1, description="evaluate on the first N tokens of valid/test only (None: the whole split)"
    )


class LanguageModelTask(Task):
    """A token stream cut into ``b`` parallel rows and read in consecutive BPTT chunks.

    Subclasses implement ``load_split(split) -> LongTensor[n]`` and ``vocab``. Step ``s`` of training
    reads chunk ``s mod chunks_per_epoch`` of every row; the first chunk of each epoch resets the
    state, and the trainer carries the detached state across the others (truncated BPTT).
    """

    stream = True
    head_kind = "per_step"
    output_kind = "classification"
    primary_metric = "bpc"
    metric_confusion = False
    #: "bpc" for character models, "perplexity" for word models
    unit: ClassVar[Literal["bpc", "perplexity"]] = "bpc"

    def __init__(self, config: StreamLMConfig):
        super().__init__(config)
        self._splits: dict[str, Tensor] = {}
        self._rows: dict[tuple[str, int], Tensor] = {}

    @property
    def vocab(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must define vocab (the token strings)")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_outputs(self) -> int:
        return len(self.vocab)

    def load_split(self, split: str) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement load_split (token ids of one split)")

    def split(self, split: str) -> Tensor:
        if split not in self._splits:
            self._splits[split] = self.load_split(split)
        return self._splits[split]

    def prepare(self) -> None:
        for s in ("train", "valid", "test"):
            self.split(s)

    def rows(self, split: str, batch_size: int) -> Tensor:
        """The split as ``[batch_size, n]`` parallel rows (the tail that does not fit is dropped)."""
        key = (split, batch_size)
        if key not in self._rows:
            data = self.split(split)
            n = data.numel() // batch_size
            if n < 2:
                from seqplat.core.errors import DataError

                raise DataError(
                    f"The {split} split of task '{type(self).__name__}' has {data.numel()} tokens, too few for "
                    f"{batch_size} rows; lower the batch size."
                )
            self._rows[key] = data[: n * batch_size].reshape(batch_size, n)
        return self._rows[key]

    def steps_per_epoch(self, batch_size: int) -> int:
        n = self.rows("train", batch_size).shape[1] - 1
        return max(1, n // self.config.bptt)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        rows = self.rows("train", batch_size)
        bptt = self.config.bptt
        chunk = step % self.steps_per_epoch(batch_size)
        i = chunk * bptt
        seq = min(bptt, rows.shape[1] - 1 - i)
        return Batch(rows[:, i : i + seq].long(), rows[:, i + 1 : i + 1 + seq].long(), reset=chunk == 0)

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        cfg = self.config
        bs = cfg.eval_batch_size or batch_size
        rows = self.rows(split, bs)
        bptt = cfg.eval_bptt or cfg.bptt
        n = rows.shape[1] - 1
        if cfg.max_eval_tokens is not None:
            n = min(n, max(1, cfg.max_eval_tokens // bs))
        for i in range(0, n, bptt):
            seq = min(bptt, n - i)
            yield Batch(rows[:, i : i + seq].long(), rows[:, i + 1 : i + 1 + seq].long(), reset=i == 0)

    def finalize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = super().finalize(stats)
        out.pop("macro_f1", None)
        if self.unit == "bpc":
            out["bpc"] = bpc(out["loss"])
        else:
            out["perplexity"] = perplexity(out["loss"])
        return out
