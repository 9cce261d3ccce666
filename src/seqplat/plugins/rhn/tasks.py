"""``ptb_char_last5``: Suarez's training and scoring protocol for PTB characters (NOT comparable).

Suarez's released code (spec §3, "Training" and "Evaluation protocol") does not report the usual
full-stream bits per character. It trains on windows of 100 characters that start at random
positions, each from a zero state, and scores a validation/test row only on its last predictions:

* valid/test text is cut into consecutive blocks of ``eval_stride`` (51) symbols; row ``i`` is
  block ``i`` followed by the first ``window + 1 - eval_stride`` (50) symbols of block ``i + 1``,
  i.e. ``window + 1`` (101) symbols = ``window`` inputs and targets; every row starts from zero
  state; rows that do not fill a whole evaluation batch are dropped (``drop_last``);
* validation scores the last ``valid_score_last`` (50) predictions of each row, the final test only
  the last ``test_score_last`` (5), each with at least 95 characters of context;
* training scores all ``window`` positions (mean cross-entropy).

So the test figure covers about 5 of every 51 test characters, all with long warm-up context, and is
lower than the standard figure. The metric is therefore called ``bpc_last_k`` (never ``bpc``) so
that it cannot be mixed up with the core's full-stream ``bpc`` of task ``ptb_char``.

The symbols come from the base character task (``ptb_char`` by default), reached through the
registry when the task is built, so this module depends on no other plugin's code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from seqplat import Batch, ConfigError, LanguageModelTask, Task, TaskConfig, UnknownNameError, build_task
from seqplat.core.task import bpc


class PTBCharLast5Config(TaskConfig):
    """Suarez's windows and last-k scoring over a registered character task's streams."""

    base_task: str = Field("ptb_char", description="registered language-model task supplying the symbols")
    window: int = Field(100, ge=2, description="inputs (and targets) per row: Suarez's context of 100")
    eval_stride: int = Field(51, ge=1, description="symbols between the starts of consecutive eval rows")
    valid_score_last: int = Field(50, ge=1, description="validation scores the last k predictions per row")
    test_score_last: int = Field(5, ge=1, description="test scores the last k predictions of each row")
    drop_last: bool = Field(True, description="drop eval rows that do not fill a whole batch (authors' code)")
    max_eval_rows: int | None = Field(None, ge=1, description="evaluate on the first N rows only (None: all)")

    @field_validator("base_task")
    @classmethod
    def _is_language_model_task(cls, name: str) -> str:
        from seqplat.registry import get_task  # the registry is complete by the time configs are validated

        try:
            task_cls = get_task(name)
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        if not (isinstance(task_cls, type) and issubclass(task_cls, LanguageModelTask)):
            raise ValueError(f"task '{name}' is not a language-model task (a token stream); use ptb_char or "
                             f"another character task")
        return name

    @model_validator(mode="after")
    def _fits(self) -> PTBCharLast5Config:
        if self.eval_stride > self.window + 1 or self.window + 1 - self.eval_stride > self.eval_stride:
            raise ValueError(
                f"eval_stride={self.eval_stride} must be between (window+1)/2 and window+1 "
                f"(window={self.window}): a row is one block plus part of the next"
            )
        for name in ("valid_score_last", "test_score_last"):
            if getattr(self, name) > self.window:
                raise ValueError(f"{name}={getattr(self, name)} exceeds window={self.window}")
        return self


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PTBCharLast5Task(Task):
    """PTB chars with Suarez's random windows and last-5 test scoring (not comparable; metric bpc_last_k)."""

    config_class = PTBCharLast5Config
    config: PTBCharLast5Config
    stream: ClassVar[bool] = False  # every row starts from a zero state, nothing is carried
    head_kind = "per_step"
    output_kind = "classification"
    primary_metric = "bpc_last_k"
    primary_mode = "min"

    def __init__(self, config: PTBCharLast5Config):
        super().__init__(config)
        base = build_task({"name": config.base_task})
        assert isinstance(base, LanguageModelTask), f"base task {config.base_task} passed validation"
        self.base = base

    # -- shapes --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def num_outputs(self) -> int:
        return self.base.num_outputs

    def prepare(self) -> None:
        self.base.prepare()

    # -- data ------------------------------------------------------------------------------------
    def steps_per_epoch(self, batch_size: int) -> int:
        """Suarez's "epoch": (train symbols / (window + 1)) / batch size minibatches."""
        return max(1, self.base.split("train").numel() // (self.config.window + 1) // batch_size)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """``batch_size`` windows of ``window + 1`` symbols at uniformly random starts (deterministic in
        ``step`` and ``seed``); all positions are scored."""
        data = self.base.split("train")
        span = self.config.window + 1
        g = torch.Generator().manual_seed(_seed("ptb_char_last5", seed, step))
        starts = torch.randint(0, data.numel() - span + 1, (batch_size, 1), generator=g)
        rows = data[starts + torch.arange(span)].long()  # streams may be stored compactly (uint8)
        return Batch(rows[:, :-1], rows[:, 1:])

    def eval_rows(self, split: Literal["valid", "test"]) -> Tensor:
        """All valid/test rows ``[rows, window + 1]`` (before ``drop_last`` and ``max_eval_rows``)."""
        cfg = self.config
        data = self.base.split(split)
        n_rows = data.numel() // cfg.eval_stride - 1  # the last block has no continuation
        if n_rows < 1:
            raise ConfigError(f"task.eval_stride: the {split} split has only {data.numel()} symbols")
        starts = torch.arange(n_rows).unsqueeze(1) * cfg.eval_stride
        return data[starts + torch.arange(cfg.window + 1)].long()

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        cfg = self.config
        rows = self.eval_rows(split)
        if cfg.max_eval_rows is not None:
            rows = rows[: cfg.max_eval_rows]
        n = rows.shape[0]
        if cfg.drop_last:
            n -= n % batch_size
            if n == 0:
                raise ConfigError(
                    f"train.eval_batch_size: {batch_size} is more than the {rows.shape[0]} {split} rows and "
                    f"task.drop_last is on; lower the batch size"
                )
        k = cfg.valid_score_last if split == "valid" else cfg.test_score_last
        mask = torch.zeros(cfg.window)
        mask[cfg.window - k :] = 1.0
        for i in range(0, n, batch_size):
            r = rows[i : min(n, i + batch_size)]
            yield Batch(r[:, :-1], r[:, 1:], mask=mask.expand(r.shape[0], -1))

    def finalize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = super().finalize(stats)
        out.pop("macro_f1", None)
        out["bpc_last_k"] = bpc(out["loss"])
        return out
