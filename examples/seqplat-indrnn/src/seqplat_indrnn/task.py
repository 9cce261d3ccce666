"""``indrnn_sine``: read a noisy sine wave, then say its frequency (regression at the last step).

Each sequence is ``x_t = sin(2 pi f t + phi) + noise * e_t`` for ``t = 0..T-1`` with ``f`` drawn
uniformly from ``[min_frequency, max_frequency]`` (cycles per step), a random phase ``phi`` and
Gaussian noise ``e_t``. The target is ``f`` rescaled to ``[0, 1]``. A model has to integrate the
signal over several periods; predicting the mean scores an RMSE of ``1 / sqrt(12) = 0.289`` (the
memoryless baseline shown beside results). The data are generated from seeds: no download.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from pydantic import Field, model_validator

from seqplat import Batch, Task, TaskConfig


class SineFrequencyConfig(TaskConfig):
    """Options of ``indrnn_sine``."""

    length: int = Field(50, ge=2, description="time steps T per sequence")
    min_frequency: float = Field(0.02, gt=0.0, lt=0.5, description="lowest frequency f, in cycles per step")
    max_frequency: float = Field(0.2, gt=0.0, le=0.5, description="highest frequency f, in cycles per step")
    noise: float = Field(0.1, ge=0.0, description="standard deviation of the Gaussian noise added to the wave")
    valid_size: int = Field(512, ge=1, description="sequences in the validation split")
    test_size: int = Field(512, ge=1, description="sequences in the test split")

    @model_validator(mode="after")
    def _check(self) -> SineFrequencyConfig:
        if self.min_frequency >= self.max_frequency:
            raise ValueError(f"min_frequency ({self.min_frequency}) must be below max_frequency "
                             f"({self.max_frequency})")
        return self


class SineFrequencyTask(Task):
    """Regress the frequency of a noisy sine wave from the whole sequence (no download)."""

    config_class = SineFrequencyConfig
    config: SineFrequencyConfig
    head_kind = "last_step"
    output_kind = "regression"
    primary_metric = "rmse"
    primary_mode = "min"
    #: RMSE of always predicting 0.5 for a target uniform on [0, 1]
    baseline = 1.0 / math.sqrt(12.0)

    @property
    def input_features(self) -> int:
        return 1

    @property
    def num_outputs(self) -> int:
        return 1

    def make_batch(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` sequences ``[n, T, 1]`` and their rescaled frequencies ``[n, 1]``."""
        cfg = self.config
        target = torch.rand(n, 1, generator=generator)
        freq = cfg.min_frequency + target * (cfg.max_frequency - cfg.min_frequency)  # [n, 1]
        phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
        t = torch.arange(cfg.length, dtype=torch.float32).unsqueeze(0)  # [1, T]
        wave = torch.sin(2 * math.pi * freq * t + phase)
        wave = wave + cfg.noise * torch.randn(n, cfg.length, generator=generator)
        return Batch(wave.unsqueeze(-1), target)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self.make_batch(batch_size, torch.Generator().manual_seed(seed * 1_000_003 + step))

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        size = self.config.valid_size if split == "valid" else self.config.test_size
        data = self.make_batch(size, torch.Generator().manual_seed(7_000_001 if split == "valid" else 7_000_002))
        for i in range(0, size, batch_size):
            yield Batch(data.inputs[i : i + batch_size], data.targets[i : i + batch_size])
