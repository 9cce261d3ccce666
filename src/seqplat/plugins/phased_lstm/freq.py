"""Frequency discrimination (Phased LSTM task 1): is the period of a sampled sine wave in [5, 6] ms?

As the authors' ``freq_task.py`` generates it (spec section 4.1): period ``P`` log-uniform in
[1, 100] ms, except that the first half of every batch draws ``P ~ U(5, 6)``; label 1 iff
``5 <= P <= 6``. Duration ``U(15, 125)`` ms, start ``U(0, 125 - duration)``, phase shift
``U(0, duration)``; value ``sin(2 pi t / P - shift)``. Three sampling conditions:

* ``regular``: one sample every ``interval`` ms (1 ms), 15-125 steps;
* ``high_res``: one sample every 0.1 ms, up to 1,250 steps;
* ``async``: ``n ~ U(15, 125)`` samples at sorted uniform random times inside the window.

Sequences are left-padded to the longest in the batch, so the last step is every sequence's last
sample; padded steps have input 0 and timestamp NaN (a time-aware cell holds its state there).
Timestamps are absolute, in ms. Data are generated from ``(seed, step)``: no download, and a
resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from seqplat import Batch, Task, TaskConfig

_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


class FreqDiscriminationConfig(TaskConfig):
    """Options of the ``freq_discrimination`` task (defaults: the authors' script)."""

    sampling: Literal["regular", "high_res", "async"] = Field(
        "async", description="regular (every `interval` ms, default 1), high_res (every 0.1 ms) or async "
        "(random sorted times)"
    )
    interval: float | None = Field(
        None, gt=0.0, description="sampling interval in ms for regular/high_res (None: 1.0 / 0.1)"
    )
    min_period: float = Field(1.0, gt=0.0, description="periods are log-uniform in [min_period, max_period] ms")
    max_period: float = Field(100.0, gt=0.0, description="upper end of the period range (ms)")
    target_min: float = Field(5.0, gt=0.0, description="class 1 iff target_min <= period <= target_max (ms)")
    target_max: float = Field(6.0, gt=0.0, description="upper end of the target band (ms)")
    balance_batches: bool = Field(
        True, description="draw the first half of every batch from the target band (authors' generator)"
    )
    min_duration: float = Field(15.0, gt=0.0, description="sequence duration ~ U(min_duration, max_duration) ms")
    max_duration: float = Field(125.0, gt=0.0, description="upper end of the duration; also the time window")
    min_points: int = Field(15, ge=1, description="async: number of samples ~ U(min_points, max_points)")
    max_points: int = Field(125, ge=1, description="async: upper end of the number of samples")
    train_size: int = Field(5000, ge=1, description="samples per training epoch (fresh samples every epoch)")
    valid_size: int = Field(500, ge=1, description="validation samples (fixed, from eval_seed)")
    test_size: int = Field(500, ge=1, description="test samples (fixed, from eval_seed)")
    eval_seed: int = Field(8, ge=0, description="seed of the fixed validation and test sets")
    times_as_feature: bool = Field(
        False, description="append the timestamp as a second input feature (for cells that ignore times, "
        "e.g. the LSTM baseline of the paper)"
    )
    time_feature_scale: float = Field(
        1.0, gt=0.0, description="the time feature is t * scale (1.0: raw ms as the authors fed it)"
    )
    head_activation: Literal["leaky_relu", "linear"] = Field(
        "leaky_relu", description="the authors' head is Dense(2) with a leaky ReLU before the softmax"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> FreqDiscriminationConfig:
        for lo, hi in (("min_period", "max_period"), ("target_min", "target_max"),
                       ("min_duration", "max_duration"), ("min_points", "max_points")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) must not exceed {hi} ({getattr(self, hi)})")
        return self


def sample_waves(rng: np.random.Generator, batch_size: int, cfg: FreqDiscriminationConfig
                 ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Times, values, periods and labels of ``batch_size`` waves (one list entry per sequence)."""
    log_lo, log_hi = math.log(cfg.min_period), math.log(cfg.max_period)
    n_points = rng.uniform(cfg.min_points, cfg.max_points, size=batch_size).astype(np.int64)
    duration = rng.uniform(cfg.min_duration, cfg.max_duration, size=batch_size)
    start = rng.uniform(0.0, cfg.max_duration - duration)
    periods = np.exp(rng.uniform(log_lo, log_hi, size=batch_size))
    shifts = rng.uniform(0.0, duration)
    if cfg.balance_batches:
        half = batch_size // 2
        periods[:half] = rng.uniform(cfg.target_min, cfg.target_max, size=half)
    step = cfg.interval or (1.0 if cfg.sampling == "regular" else 0.1)
    times, values = [], []
    for i in range(batch_size):
        if cfg.sampling == "async":
            t = np.sort(rng.random(int(n_points[i]))) * duration[i] + start[i]
        else:
            t = np.arange(start[i], start[i] + duration[i], step)
        times.append(t)
        values.append(np.sin(2.0 * np.pi / periods[i] * t - shifts[i]))
    labels = ((periods >= cfg.target_min) & (periods <= cfg.target_max)).astype(np.int64)
    return times, values, periods, labels


def left_pad(times: list[np.ndarray], values: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b,t]`` timestamps (NaN where padded) and ``[b,t]`` values (0 where padded), left-padded."""
    n = max(len(t) for t in times)
    tt = np.full((len(times), n), np.nan, dtype=np.float32)
    vv = np.zeros((len(times), n), dtype=np.float32)
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        if len(t):
            tt[i, n - len(t):] = t
            vv[i, n - len(t):] = v
    return torch.from_numpy(tt), torch.from_numpy(vv)


class FreqDiscriminationTask(Task):
    """Frequency discrimination of sampled sine waves (Neil et al. 2016, task 1), with timestamps."""

    config_class = FreqDiscriminationConfig
    provides_times = True
    head_kind = "last_step"
    output_kind = "classification"
    primary_metric = "accuracy"
    primary_mode = "max"
    baseline = 0.5

    config: FreqDiscriminationConfig

    @property
    def input_features(self) -> int:
        return 2 if self.config.times_as_feature else 1

    @property
    def num_outputs(self) -> int:
        return 2

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """One batch drawn from ``rng`` (left-padded, NaN timestamps on padding)."""
        cfg = self.config
        times, values, _, labels = sample_waves(rng, batch_size, cfg)
        t, v = left_pad(times, values)
        x = v.unsqueeze(-1)
        if cfg.times_as_feature:
            feature = torch.nan_to_num(t, nan=0.0) * cfg.time_feature_scale
            x = torch.cat([x, feature.unsqueeze(-1)], dim=-1)
        return Batch(inputs=x, targets=torch.from_numpy(labels), times=t)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return self.make_batch(np.random.default_rng([seed, step, _SPLIT_CODE["train"]]), batch_size)

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        cfg = self.config
        size = cfg.valid_size if split == "valid" else cfg.test_size
        for i, first in enumerate(range(0, size, batch_size)):
            rng = np.random.default_rng([cfg.eval_seed, i, _SPLIT_CODE[split]])
            yield self.make_batch(rng, min(batch_size, size - first))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch of ``train_size`` fresh samples (the paper trains 70 epochs)."""
        return max(1, math.ceil(self.config.train_size / batch_size))

    def build_head(self, hidden_size: int) -> nn.Module:
        linear = nn.Linear(hidden_size, self.num_outputs)
        if self.config.head_activation == "linear":
            return linear
        return nn.Sequential(linear, nn.LeakyReLU(0.01))  # Lasagne leaky_rectify, slope 0.01
