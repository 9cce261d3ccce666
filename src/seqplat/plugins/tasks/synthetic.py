"""Generated long-time-lag tasks: copy memory, adding problem, temporal order.

Every training batch is drawn fresh from a generator seeded by ``(task, seed, step)``, so a run
is reproducible and a resumed run sees the batches an uninterrupted one would have seen. The
validation and test sets are fixed: they are drawn once from ``data_seed`` (not the training
seed), so every run of a protocol is scored on the same sequences.

* **copy_memory** (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016, arXiv:1511.06464): 10
  symbols from 8 categories, ``delay - 1`` blanks, the delimiter, 10 blanks; the targets are
  blanks except the last 10 steps, which repeat the symbols. Tokens: 0 blank, 1-8 symbols,
  9 delimiter. A model that only learns "blank, then uniform over the 8 symbols" scores
  ``10 ln 8 / (delay + 20)`` nats per step.
* **adding** (Hochreiter & Schmidhuber 1997; Le et al. 2015, arXiv:1504.00941): two features per
  step, a value in U[0, 1] and a marker that is 1 at one step of the first half and one step of
  the second half; the target is the sum of the two marked values. Always predicting 1 scores
  MSE ``Var(U1 + U2) = 1/6``.
* **temporal_order** (Hochreiter & Schmidhuber 1997, as in the GAM-RHN authors' repository): noise
  symbols a-d, and three key symbols X or Y, the k-th at a random place among the first ``window``
  steps of the k-th third; the class (8) is the X/Y pattern, read at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqplat import Batch, Task, TaskConfig

from .common import batched, generator, one_hot


class SyntheticConfig(TaskConfig):
    """Sizes and seed of the fixed evaluation sets of a generated task."""

    valid_size: int = Field(1000, ge=1, description="sequences in the fixed validation set")
    test_size: int = Field(1000, ge=1, description="sequences in the fixed test set")
    data_seed: int = Field(1234, ge=0, description="seed of the fixed validation/test sets (not the training seed)")


class SyntheticTask(Task):
    """A task whose data is generated: subclasses implement ``generate(n, g) -> (raw, targets)``
    and ``encode(raw) -> inputs``."""

    config: SyntheticConfig
    #: label mixed into every seed, so two tasks with the same seed draw unrelated data
    seed_tag: ClassVar[str] = "synthetic"

    def __init__(self, config: SyntheticConfig):
        super().__init__(config)
        self._eval: dict[str, tuple[Tensor, Tensor]] = {}

    def generate(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def encode(self, raw: Tensor) -> Tensor:
        return raw

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        raw, targets = self.generate(batch_size, generator(self.seed_tag, "train", seed, step))
        return Batch(self.encode(raw), targets)

    def eval_set(self, split: str) -> tuple[Tensor, Tensor]:
        """The fixed ``valid`` or ``test`` set as (raw inputs, targets)."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        if split not in self._eval:
            size = self.config.valid_size if split == "valid" else self.config.test_size
            self._eval[split] = self.generate(size, generator(self.seed_tag, split, self.config.data_seed))
        return self._eval[split]

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        raw, targets = self.eval_set(split)
        return batched(lambda s: Batch(self.encode(raw[s]), targets[s]), raw.shape[0], batch_size)

    def prepare(self) -> None:
        self.eval_set("valid")
        self.eval_set("test")


# -- copy memory ----------------------------------------------------------------------------------

class CopyMemoryConfig(SyntheticConfig):
    """Copy memory: remember 10 symbols over ``delay`` steps."""

    delay: int = Field(200, ge=1, description="T: steps from the last symbol to the delimiter (sequence length T+20)")
    encoding: Literal["one_hot", "tokens", "scalar"] = Field(
        "one_hot",
        description="input form: one_hot (10 features), tokens (ids 0-9, embedded by the model) or scalar "
        "(the id as one float feature, as in the SAB authors' script)",
    )


class CopyMemoryTask(SyntheticTask):
    """Copy memory (T blanks between 10 symbols and their recall); per-step cross-entropy."""

    config_class = CopyMemoryConfig
    config: CopyMemoryConfig
    head_kind = "per_step"
    output_kind = "classification"
    primary_metric = "loss"
    primary_mode = "min"
    seed_tag = "copy_memory"

    SYMBOLS: ClassVar[int] = 10
    CATEGORIES: ClassVar[int] = 8
    BLANK: ClassVar[int] = 0
    DELIMITER: ClassVar[int] = 9

    def __init__(self, config: CopyMemoryConfig):
        super().__init__(config)
        #: the memoryless loss: blanks are certain, the 10 recalled symbols uniform over 8
        self.baseline = self.SYMBOLS * math.log(self.CATEGORIES) / (config.delay + 2 * self.SYMBOLS)

    @property
    def length(self) -> int:
        return self.config.delay + 2 * self.SYMBOLS

    @property
    def vocab_size(self) -> int | None:
        return 10 if self.config.encoding == "tokens" else None

    @property
    def input_features(self) -> int:
        return 10 if self.config.encoding == "one_hot" else 1

    @property
    def num_outputs(self) -> int:
        return self.CATEGORIES + 1  # blank and the 8 symbols; the delimiter is never a target

    def generate(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        k, T = self.SYMBOLS, self.config.delay
        symbols = torch.randint(1, self.CATEGORIES + 1, (n, k), generator=g)
        tokens = torch.full((n, T + 2 * k), self.BLANK, dtype=torch.long)
        tokens[:, :k] = symbols
        tokens[:, k + T - 1] = self.DELIMITER  # T-1 blanks, then the delimiter; recall in the last k steps
        targets = torch.full_like(tokens, self.BLANK)
        targets[:, -k:] = symbols
        return tokens, targets

    def encode(self, raw: Tensor) -> Tensor:
        if self.config.encoding == "one_hot":
            return one_hot(raw, 10)
        if self.config.encoding == "scalar":
            return raw.to(torch.float32).unsqueeze(-1)
        return raw

    def batch_stats(self, out: Tensor, batch: Batch, with_grad: bool = False) -> dict[str, Tensor]:
        stats = super().batch_stats(out, batch, with_grad)
        if not with_grad:
            k = self.SYMBOLS
            hit = out[:, -k:].argmax(-1) == batch.targets[:, -k:]
            stats["copy_correct"] = hit.sum().to(torch.float64).detach()
            stats["copy_count"] = torch.tensor(float(hit.numel()), dtype=torch.float64, device=out.device)
        return stats

    def finalize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        out = super().finalize(stats)
        if "copy_count" in stats:
            out["copy_accuracy"] = float(stats["copy_correct"] / stats["copy_count"].clamp_min(1))
        return out


# -- adding problem -------------------------------------------------------------------------------

class AddingConfig(SyntheticConfig):
    """Adding problem: sum the two marked values of a long sequence."""

    length: int = Field(400, ge=2, description="T: sequence length")


class AddingTask(SyntheticTask):
    """Adding problem (value, marker) -> sum of the two marked values; MSE at the last step."""

    config_class = AddingConfig
    config: AddingConfig
    head_kind = "last_step"
    output_kind = "regression"
    primary_metric = "mse"
    primary_mode = "min"
    seed_tag = "adding"
    #: MSE of always predicting 1 (the mean of the target): Var(U1 + U2) = 2/12
    baseline = 1.0 / 6.0

    @property
    def input_features(self) -> int:
        return 2

    @property
    def num_outputs(self) -> int:
        return 1

    def generate(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        T = self.config.length
        half = T // 2
        values = torch.rand(n, T, generator=g)
        first = torch.randint(0, half, (n,), generator=g)
        second = torch.randint(half, T, (n,), generator=g)
        rows = torch.arange(n)
        markers = torch.zeros(n, T)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        return torch.stack([values, markers], dim=-1), target.unsqueeze(-1)


# -- temporal order -------------------------------------------------------------------------------

class TemporalOrderConfig(SyntheticConfig):
    """Temporal order (GAM-RHN spec, section 4): classify the order of three X/Y key symbols."""

    length: int = Field(100, ge=3, description="T: sequence length")
    window: int = Field(
        10, ge=1, description="the k-th key symbol lies among the first `window` steps of the k-th third"
    )
    valid_size: int = Field(500, ge=1, description="sequences in the fixed validation set")
    test_size: int = Field(1000, ge=1, description="sequences in the fixed test set")

    @model_validator(mode="after")
    def _window_fits(self) -> TemporalOrderConfig:
        if self.window > self.length // 3:
            raise ValueError(f"window ({self.window}) must fit in a third of the sequence (length // 3 = "
                             f"{self.length // 3}); lower window or raise length")
        return self


class TemporalOrderTask(SyntheticTask):
    """Temporal order: 6 one-hot symbols (X, Y, a-d), 8 classes at the last step."""

    config_class = TemporalOrderConfig
    config: TemporalOrderConfig
    head_kind = "last_step"
    output_kind = "classification"
    primary_metric = "accuracy"
    primary_mode = "max"
    seed_tag = "temporal_order"
    baseline = 1.0 / 8.0

    #: symbol ids: 0 = X, 1 = Y (the keys), 2-5 = a, b, c, d (noise)
    SYMBOLS: ClassVar[tuple[str, ...]] = ("X", "Y", "a", "b", "c", "d")
    KEYS: ClassVar[int] = 3

    @property
    def input_features(self) -> int:
        return len(self.SYMBOLS)

    @property
    def num_outputs(self) -> int:
        return 2**self.KEYS

    def key_positions(self, n: int, g: torch.Generator) -> Tensor:
        third = self.config.length // 3
        offsets = torch.randint(0, self.config.window, (n, self.KEYS), generator=g)
        return offsets + third * torch.arange(self.KEYS)

    def generate(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        tokens = torch.randint(2, len(self.SYMBOLS), (n, self.config.length), generator=g)
        keys = torch.randint(0, 2, (n, self.KEYS), generator=g)  # 0 = X, 1 = Y
        tokens.scatter_(1, self.key_positions(n, g), keys)
        label = (keys * (2 ** torch.arange(self.KEYS - 1, -1, -1))).sum(-1)  # XXX=0, XXY=1, ..., YYY=7
        return tokens, label

    def encode(self, raw: Tensor) -> Tensor:
        return one_hot(raw, len(self.SYMBOLS))

