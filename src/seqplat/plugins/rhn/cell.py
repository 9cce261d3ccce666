"""Recurrent Highway Network cell (``rhn``).

J. G. Zilly, R. K. Srivastava, J. Koutník, J. Schmidhuber, "Recurrent Highway Networks",
ICML 2017, https://arxiv.org/abs/1607.03474. Equations as numbered in the project spec
(``papers/rhn_hyper.md`` §1). With ``s^0_t = s^L_{t-1}``, for micro-layers ``l = 1..L``::

    R1  h^l = tanh   ( [l=1] W_H x_t + R_H^l s^{l-1} + b_H^l )
    R2  t^l = sigmoid( [l=1] W_T x_t + R_T^l s^{l-1} + b_T^l )
    R3  c^l = 1 - t^l                                    (coupled carry gate)
    R4  s^l = h^l * t^l + s^{l-1} * c^l

Output ``y_t = s^L_t``; the state is ``s^L`` alone. Only micro-layer 1 sees ``x_t``.

Parameters (``n`` = ``hidden_size``, ``L`` = ``depth``): ``weight_ih [2n, d]`` = ``[W_H; W_T]``,
``weight_hh [L, 2n, n]`` = ``[R_H^l; R_T^l]``, ``bias_hh [L, 2n]`` = ``[b_H^l; b_T^l]``, and with
``input_bias`` (the layout of Suarez's ``nn.Linear`` input layer) a separate ``bias_ih [2n]``.

Variational dropout as in Zilly's TF code (masks drawn once per ``forward`` call, i.e. per
sequence / BPTT segment, inside the cell, and reused at every time step): ``input_dropout``
(``noise_i``) per unit of ``x`` entering R1/R2, ``hidden_dropout`` (``noise_h``) per unit of
``s^{l-1}`` entering *every* micro-layer (one mask for all depths and for both H and T; the carry
term of R4 uses the unmasked state), ``output_dropout`` (``noise_o``) per unit of ``y``. Inverted
scaling; all masks are ones in eval mode. ``gate_dropout`` is Suarez's ordinary (per-step) dropout
on ``t`` after R3.

The reference path is ``step`` unrolled by :class:`~seqplat.StepCell`; the fast path hoists the
input projection of all steps into one matmul and iterates over ``unbind`` (PERF_NOTES.md).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import State

from .common import (
    dropout_mask,
    highway,
    highway_fast,
    init_bias_,
    init_weight_,
    none_from_text,
    set_transform_bias_,
)


class RHNConfig(CellConfig):
    """Options of the ``rhn`` cell; the symbol each maps to is in the module docstring."""

    hidden_size: int = Field(128, ge=1, description="width n of every micro-layer and of the state s_t")
    depth: int = Field(5, ge=1, description="recurrence depth L: highway micro-layers per time step")
    transform_bias: float | None = Field(
        -2.0, description="initial transform-gate bias b_T^l of every micro-layer (Zilly: -2 PTB, -4 "
        "enwik8/text8; a carry-biased start). None: no special value, the bias gets the scheme's init "
        "(Suarez's code)",
    )
    init: Literal["uniform", "orthogonal"] = Field(
        "uniform", description="uniform: every weight and bias U(-init_scale, init_scale) (Zilly's TF code); "
        "orthogonal: every matrix orthogonal, biases PyTorch's U(+-1/sqrt(fan_in)) (Suarez's code)",
    )
    init_scale: float = Field(0.04, gt=0.0, description="half-width of the uniform init")
    input_bias: bool = Field(
        False, description="give the input projection of micro-layer 1 its own bias b_in (Suarez's layout, "
        "2n extra parameters); Zilly's layer 1 has one bias per gate",
    )
    input_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="variational dropout on x_t entering micro-layer 1 (Zilly's noise_i; one mask per "
        "sequence)",
    )
    hidden_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="variational dropout on s^{l-1} entering every micro-layer (noise_h; one mask per "
        "sequence, shared by all depths and by H and T)",
    )
    output_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="variational dropout on the outputs y_t (noise_o; one mask per sequence)",
    )
    gate_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="ordinary dropout on the transform gate t after c = 1 - t, fresh each step and "
        "micro-layer (Suarez's code: 0.35)",
    )

    @field_validator("transform_bias", mode="before")
    @classmethod
    def _none_text(cls, v: object) -> object:
        return none_from_text(v)


class RHNMasks(NamedTuple):
    """The variational masks of one sequence (None: no dropout at that place)."""

    input: Tensor | None
    hidden: Tensor | None
    output: Tensor | None


class RHNWeights(NamedTuple):
    """The parameters read once per forward (so a parametrization runs once, not per step)."""

    weight_ih: Tensor
    bias_ih: Tensor | None
    weight_hh: tuple[Tensor, ...]
    bias_hh: tuple[Tensor, ...]


class RHNCell(StepCell):
    """Recurrent Highway Network layer: depth-L coupled highway transition per step (Zilly et al.)."""

    config_class = RHNConfig
    has_fast_path = True
    weight_roles = {"input": ("weight_ih",), "recurrent": ("weight_hh",)}
    activation_roles = ("candidate", "gate", "hidden")

    def __init__(self, input_size: int, config: RHNConfig):
        super().__init__(input_size, config)
        n, depth = config.hidden_size, config.depth
        self.weight_ih = nn.Parameter(torch.empty(2 * n, input_size))
        self.bias_ih = nn.Parameter(torch.empty(2 * n)) if config.input_bias else None
        self.weight_hh = nn.Parameter(torch.empty(depth, 2 * n, n))
        self.bias_hh = nn.Parameter(torch.empty(depth, 2 * n))
        self._step_masks: RHNMasks | None = None
        self._step_masks_batch = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the config says (spec §1 "Init" / §3 "Init")."""
        cfg = self.config
        init_weight_(self.weight_ih, cfg.init, cfg.init_scale)
        init_weight_(self.weight_hh, cfg.init, cfg.init_scale)
        init_bias_(self.bias_hh, cfg.init, cfg.init_scale, cfg.hidden_size)
        if self.bias_ih is not None:
            init_bias_(self.bias_ih, cfg.init, cfg.init_scale, self.input_size)
        set_transform_bias_(self.bias_hh, self.bias_ih, cfg.transform_bias)

    # -- helpers --------------------------------------------------------------------------------
    def weights(self) -> RHNWeights:
        """The parameters, read once (a quantizer's parametrization then runs once per forward)."""
        return RHNWeights(self.weight_ih, self.bias_ih, tuple(self.weight_hh.unbind(0)),
                          tuple(self.bias_hh.unbind(0)))

    def draw_masks(self, batch_size: int, like: Tensor) -> RHNMasks:
        """Variational masks for one sequence; all None in eval mode."""
        cfg = self.config
        if not self.training:
            return RHNMasks(None, None, None)
        n = cfg.hidden_size
        return RHNMasks(
            dropout_mask((batch_size, self.input_size), cfg.input_dropout, like),
            dropout_mask((batch_size, n), cfg.hidden_dropout, like),
            dropout_mask((batch_size, n), cfg.output_dropout, like),
        )

    def reset_masks(self) -> None:
        """Forget the masks kept for :meth:`step` (call at the start of each sequence when a wrapper
        drives ``step`` directly; ``forward`` draws its own masks every call)."""
        self._step_masks = None

    def _gate_mask(self, s: Tensor) -> Tensor | None:
        p = self.config.gate_dropout
        return dropout_mask(tuple(s.shape), p, s) if self.training and p > 0 else None

    # -- reference path ---------------------------------------------------------------------------
    def _step(self, x_t: Tensor, s: Tensor, masks: RHNMasks, w: RHNWeights) -> tuple[Tensor, Tensor]:
        """One time step: L micro-layers R1-R4. Returns ``(y_t, s^L)``."""
        x_in = x_t if masks.input is None else x_t * masks.input
        u_x = F.linear(x_in, w.weight_ih, w.bias_ih)  # [l=1] (W_H x_t ; W_T x_t) (+ b_in)
        for layer, (r, b) in enumerate(zip(w.weight_hh, w.bias_hh, strict=True)):
            s_in = s if masks.hidden is None else s * masks.hidden
            u = F.linear(s_in, r, b)  # R_H^l s^{l-1} + b_H^l ; R_T^l s^{l-1} + b_T^l
            if layer == 0:
                u = u + u_x
            s = highway(u, s, self._gate_mask(s), self.quantize_activation)  # R1-R4
        y = s if masks.output is None else s * masks.output
        return y, s

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        """One step for callers that drive the cell themselves (wrappers). The variational masks are
        drawn at the first call and kept until :meth:`reset_masks` or a new batch size."""
        masks = RHNMasks(None, None, None)
        if self.training:
            if self._step_masks is None or self._step_masks_batch != x_t.shape[0]:
                self._step_masks = self.draw_masks(x_t.shape[0], x_t)
                self._step_masks_batch = x_t.shape[0]
            masks = self._step_masks
        return self._step(x_t, state, masks, self.weights())

    def reference_forward(self, x: Tensor, state: State, *,
                          times: Tensor | None = None) -> tuple[Tensor, State]:
        masks = self.draw_masks(x.shape[0], x)  # one set per sequence (variational)
        w = self.weights()
        ys = []
        for x_t in x.unbind(1):  # unbind keeps the backward linear in T
            y_t, new_state = self._step(x_t, state, masks, w)
            state = self.apply_zoneout(state, new_state)
            ys.append(y_t)
        return torch.stack(ys, dim=1), state

    # -- fast path: hoisted input projection --------------------------------------------------------
    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        masks = self.draw_masks(x.shape[0], x)  # same draws, same order as the reference path
        w = self.weights()
        x_in = x if masks.input is None else x * masks.input.unsqueeze(1)
        xp = F.linear(x_in, w.weight_ih, w.bias_ih) + w.bias_hh[0]  # [b, t, 2n]: all steps at once
        r_t = [r.t() for r in w.weight_hh]
        p_gate = self.config.gate_dropout if self.training else 0.0
        mh = masks.hidden
        s = state
        ys = []
        for xp_t in xp.unbind(1):
            for layer in range(len(r_t)):
                s_in = s if mh is None else s * mh
                if layer == 0:
                    u = torch.addmm(xp_t, s_in, r_t[0])
                else:
                    u = torch.addmm(w.bias_hh[layer], s_in, r_t[layer])
                s = highway_fast(u, s, dropout_mask(tuple(s.shape), p_gate, s))
            ys.append(s)
        y = torch.stack(ys, dim=1)
        if masks.output is not None:
            y = y * masks.output.unsqueeze(1)
        return y, s

    def extra_repr(self) -> str:
        c = self.config
        return f"input_size={self.input_size}, hidden_size={c.hidden_size}, depth={c.depth}"
