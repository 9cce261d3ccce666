"""Tiny seeded tasks for tests: a token stream with structure, and a last-step classification task.

``toy_stream`` repeats a random de Bruijn-like cycle over a small vocabulary with a little noise, so a
recurrent model can drive its loss well below the unigram entropy in a few dozen steps.
``toy_parity`` asks for the parity of the number of ones in a short binary sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field

from seqplat.core.task import Batch, LanguageModelTask, StreamLMConfig, Task, TaskConfig


class ToyStreamConfig(StreamLMConfig):
    vocab: int = Field(8, ge=2, description="vocabulary size")
    length: int = Field(20_000, ge=100, description="tokens in the training stream")
    period: int = Field(7, ge=2, description="length of the repeating pattern")
    noise: float = Field(0.05, ge=0.0, le=1.0, description="probability of a random token")


class ToyStreamTask(LanguageModelTask):
    """A noisy periodic token stream (for trainer tests)."""

    config_class = ToyStreamConfig

    @property
    def vocab(self) -> list[str]:
        return [str(i) for i in range(self.config.vocab)]

    def load_split(self, split: str) -> torch.Tensor:
        cfg = self.config
        g = torch.Generator().manual_seed({"train": 0, "valid": 1, "test": 2}[split])
        pattern = torch.randint(0, cfg.vocab, (cfg.period,), generator=torch.Generator().manual_seed(99))
        n = cfg.length if split == "train" else max(cfg.length // 10, 200)
        data = pattern.repeat(n // cfg.period + 1)[:n]
        noise = torch.rand(n, generator=g) < cfg.noise
        return torch.where(noise, torch.randint(0, cfg.vocab, (n,), generator=g), data)


class ToyParityConfig(TaskConfig):
    length: int = Field(6, ge=1, description="bits per sequence")
    eval_size: int = Field(256, ge=1, description="sequences in valid and test")


class ToyParityTask(Task):
    """Parity of a short bit string, predicted at the last step (for trainer tests)."""

    config_class = ToyParityConfig
    head_kind = "last_step"
    primary_metric = "accuracy"
    primary_mode = "max"

    @property
    def input_features(self) -> int:
        return 1

    @property
    def num_outputs(self) -> int:
        return 2

    def _make(self, n: int, g: torch.Generator) -> Batch:
        bits = torch.randint(0, 2, (n, self.config.length), generator=g)
        return Batch(bits.float().unsqueeze(-1), bits.sum(1) % 2)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self._make(batch_size, torch.Generator().manual_seed(seed * 1_000_003 + step))

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(10_000 + (split == "test"))
        data = self._make(self.config.eval_size, g)
        for i in range(0, self.config.eval_size, batch_size):
            yield Batch(data.inputs[i : i + batch_size], data.targets[i : i + batch_size])


class ToyTasksPlugin:
    """Registers ``toy_stream`` and ``toy_parity``."""

    from seqplat.core.hookspecs import hookimpl as _hookimpl

    @staticmethod
    @_hookimpl
    def register_tasks(register) -> None:
        register("toy_stream", ToyStreamTask)
        register("toy_parity", ToyParityTask)
