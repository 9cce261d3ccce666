"""Configs of the ``unicornn`` and ``cornn`` cells (defaults: the paper's noise-padded CIFAR-10 run)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from seqplat import CellConfig


class UnICORNNConfig(CellConfig):
    """A deep UnICORNN: ``num_layers`` x (Linear map -> oscillator recurrence -> dropout over time)."""

    hidden_size: int = Field(128, ge=1, description="oscillators per layer H")
    num_layers: int = Field(3, ge=1, description="stacked UnICORNN layers L inside the cell (each with its own Linear)")
    dt: float | list[float] = Field(
        0.126, description="maximal time step dt (a float, or one positive float per layer); delta = dt*sigmoid(c)"
    )
    alpha: float = Field(13.0, ge=0.0, description="spring (restoring) coefficient alpha, not trained; not damping")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout over time: one mask per (batch, unit) shared by all steps, "
        "after every layer including the top one"
    )
    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="fast recurrence: 'cpp' (C++ CPU kernel compiled at first use), 'python' (the same "
        "reverse-recompute algorithm in PyTorch), 'auto' (cpp on CPU when it compiles, else python)"
    )
    w_init: tuple[float, float] = Field((0.0, 1.0), description="diagonal recurrent weight w ~ U(low, high)")
    c_init: float = Field(0.1, ge=0.0, description="time-step parameter c ~ U(-c_init, c_init)")
    linear_init_a: float = Field(
        8.0, ge=0.0, description="Linear maps: kaiming_uniform_(a=..., mode='fan_in'); biases 0 (authors' code)"
    )

    @model_validator(mode="after")
    def _check_dt(self) -> UnICORNNConfig:
        dts = self.dt if isinstance(self.dt, list) else [self.dt]
        if isinstance(self.dt, list) and len(self.dt) != self.num_layers:
            raise ValueError(
                f"dt has {len(self.dt)} entries but num_layers is {self.num_layers}; give one dt per layer or a float"
            )
        if any(not d > 0 for d in dts):
            raise ValueError(f"dt must be positive, got {self.dt}")
        if self.w_init[0] > self.w_init[1]:
            raise ValueError(f"w_init must be (low, high) with low <= high, got {self.w_init}")
        return self

    def layer_dt(self, layer: int) -> float:
        """The time step dt of layer ``layer`` (0-based)."""
        return float(self.dt[layer]) if isinstance(self.dt, list) else float(self.dt)


class CoRNNConfig(CellConfig):
    """coRNN (Rusch & Mishra, ICLR 2021); defaults: the authors' psMNIST run."""

    hidden_size: int = Field(256, ge=1, description="oscillators H")
    dt: float = Field(0.076, gt=0.0, description="time step Delta t")
    gamma: float = Field(0.4, description="spring coefficient gamma")
    epsilon: float = Field(8.0, description="damping coefficient epsilon")
    implicit_damping: bool = Field(
        False, description="treat the damping term implicitly (epsilon*z_n, the paper's IMEX variant); the "
        "authors' code is explicit (epsilon*z_{n-1}), the default"
    )
