"""IndRNN: Independently Recurrent Neural Network (Li, Li, Cook, Zhu & Gao, CVPR 2018).

Paper: https://arxiv.org/abs/1803.04831. Shapes: b batch, t time, d input, h hidden.

A traditional RNN mixes all units through a full recurrent matrix, ``h_t = s(W x_t + U h_{t-1} + b)``
(eq. 1). IndRNN replaces ``U`` by a vector ``u``, so every unit only sees its own past::

    h_t     = s(W x_t + u * h_{t-1} + b)                 (eq. 2, * the Hadamard product)
    h_{n,t} = s(w_n x_t + u_n h_{n,t-1} + b_n)           (eq. 3, unit n alone)

with ``s`` = ReLU in the paper. Units interact only across layers (stack cells with
``model.num_layers``). Section 3.1 shows that the gradient reaching step ``t`` from step ``T`` in
unit ``n`` scales like ``u_n ** (T - t)`` times the activation derivatives, so bounding ``|u_n|``
regulates exploding and vanishing gradients: with ReLU, ``|u_n| <= gamma ** (1 / T)`` keeps the
factor below ``gamma`` over ``T`` steps.

Config fields: ``W`` = ``input_weight`` [h, d], ``u`` = ``recurrent_weight`` [h], ``b`` = ``bias``;
``s`` = ``activation``; the bound is ``recurrent_max_abs``, or ``recurrent_max_magnitude ** (1 /
recurrent_max_from_length)``.

The reference path is :meth:`IndRNNCell.step` (eq. 2 per step, unrolled by the core). The fast path
hoists ``W x_t + b`` for all steps into one matrix product, then runs the element-wise recurrence.
:meth:`project_inputs` / :meth:`step_projected` expose the same split to wrapper cells (FS-RNN uses
them to hoist its first fast cell's input projection).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import State


class IndRNNConfig(CellConfig):
    """Options of ``indrnn``: width, activation, and the initialisation and bound of ``u``."""

    hidden_size: int = Field(128, ge=1, description="units h (the length of u and b, rows of W)")
    activation: Literal["relu", "tanh"] = Field(
        "relu", description="s in eq. 2: relu (the paper's choice, non-saturating) or tanh"
    )
    bias: bool = Field(True, description="learn the bias b of eq. 2")
    recurrent_init_min: float = Field(
        0.0, description="u_n is drawn from U(recurrent_init_min, recurrent_init_max) at construction "
        "(the authors use U(0, 1) so that units keep memories of different lengths)"
    )
    recurrent_init_max: float = Field(1.0, description="upper end of the uniform initialisation of u")
    recurrent_max_abs: float | None = Field(
        None, gt=0.0, description="bound |u_n| <= this (Section 3.1); None: no bound unless "
        "recurrent_max_from_length is set"
    )
    recurrent_max_from_length: int | None = Field(
        None, ge=1, description="T of the length-based bound |u_n| <= recurrent_max_magnitude ** (1 / T) "
        "(set it to the sequence length; None: off)"
    )
    recurrent_max_magnitude: float = Field(
        2.0, gt=0.0, description="gamma of the length-based bound: the largest growth of a unit's gradient "
        "over T steps (the authors suggest 2 or 10)"
    )

    @model_validator(mode="after")
    def _check(self) -> IndRNNConfig:
        if self.recurrent_max_abs is not None and self.recurrent_max_from_length is not None:
            raise ValueError(
                "recurrent_max_abs and recurrent_max_from_length both set a bound on |u|; give one of them"
            )
        if self.recurrent_init_min > self.recurrent_init_max:
            raise ValueError(
                f"recurrent_init_min ({self.recurrent_init_min}) must not exceed recurrent_init_max "
                f"({self.recurrent_init_max})"
            )
        return self

    @property
    def recurrent_bound(self) -> float | None:
        """The resolved bound on ``|u_n|`` (None: unbounded)."""
        if self.recurrent_max_abs is not None:
            return self.recurrent_max_abs
        if self.recurrent_max_from_length is not None:
            return self.recurrent_max_magnitude ** (1.0 / self.recurrent_max_from_length)
        return None


class IndRNNCell(StepCell):
    """IndRNN layer (eq. 2): element-wise recurrence, optional bound on the recurrent weights.

    The bound is applied where ``u`` is used (``clamp(u, -bound, bound)``), so outputs always obey
    it; in training mode :meth:`forward` also projects the stored ``u`` back into the bound before
    the sequence, as the authors' clipping after each optimizer step does.
    """

    config_class = IndRNNConfig
    has_fast_path = True
    weight_roles: ClassVar[dict[str, tuple[str, ...]]] = {"input": ("input_weight",)}
    activation_roles: ClassVar[tuple[str, ...]] = ("hidden",)

    def __init__(self, input_size: int, config: IndRNNConfig):
        super().__init__(input_size, config)
        h = config.hidden_size
        self.input_weight = nn.Parameter(torch.empty(h, input_size))  # W [h, d]
        self.recurrent_weight = nn.Parameter(torch.empty(h))  # u [h]
        self.bias = nn.Parameter(torch.zeros(h)) if config.bias else None  # b [h]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W as torch's Linear (Kaiming uniform), u ~ U(init_min, init_max) projected into the bound, b = 0."""
        cfg = self.config
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.input_weight, a=math.sqrt(5))
            self.recurrent_weight.uniform_(cfg.recurrent_init_min, cfg.recurrent_init_max)
            if self.bias is not None:
                self.bias.zero_()
        self.project_recurrent_weight()

    # -- the bound on u (Section 3.1) --------------------------------------------------------------
    def recurrent(self) -> Tensor:
        """``u`` as used in eq. 2: the stored vector clamped to ``[-bound, bound]`` when bounded."""
        bound = self.config.recurrent_bound
        u = self.recurrent_weight
        return u if bound is None else u.clamp(-bound, bound)

    @torch.no_grad()
    def project_recurrent_weight(self) -> None:
        """Clip the stored ``u`` into ``[-bound, bound]`` in place (no-op without a bound)."""
        bound = self.config.recurrent_bound
        u = self._parameters.get("recurrent_weight")
        if bound is not None and u is not None:
            u.clamp_(-bound, bound)

    def forward(self, x: Tensor, state: State = None, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        if self.training:
            self.project_recurrent_weight()  # before any use in this sequence's graph
        return super().forward(x, state, times=times)

    def _activate(self, a: Tensor) -> Tensor:
        return torch.relu(a) if self.config.activation == "relu" else torch.tanh(a)

    # -- reference path ----------------------------------------------------------------------------
    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        """Eq. 2 for one step: ``h_t = s(W x_t + u * h_{t-1} + b)``."""
        pre = F.linear(x_t, self.input_weight, self.bias) + self.recurrent() * state  # [b, h]
        h = self.quantize_activation("hidden", self._activate(pre))
        return h, h

    # -- input hoisting (fast path, and FS-RNN's fast path) ------------------------------------------
    def project_inputs(self, x: Tensor) -> Tensor:
        """``W x + b`` for every step at once (``x`` [..., d] -> [..., h])."""
        return F.linear(x, self.input_weight, self.bias)

    def step_projected(self, p_t: Tensor | None, state: State) -> tuple[Tensor, State]:
        """One step from a projected input ``p_t = W x_t + b`` (None: a zero input, bias only)."""
        u = self.recurrent()
        if p_t is None:
            pre = u * state if self.bias is None else torch.addcmul(self.bias, u, state)
        else:
            pre = torch.addcmul(p_t, u, state)
        h = self.quantize_activation("hidden", self._activate(pre))
        return h, h

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """One input matrix product for all steps, then ``t`` element-wise steps of eq. 2."""
        p = self.project_inputs(x)  # [b, t, h]
        u = self.recurrent()
        act = self._activate
        h = state
        ys = []
        for p_t in p.unbind(1):  # unbind keeps the backward linear in t
            h = act(torch.addcmul(p_t, u, h))
            ys.append(h)
        return torch.stack(ys, dim=1), h
