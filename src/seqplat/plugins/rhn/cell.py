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
input projection of all steps into one matmul (PERF_NOTES.md) and, in training, runs the loop through
the hand-written backward of :mod:`seqplat.plugins.rhn.fused` (one weight-gradient GEMM per
micro-layer over all steps).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import State
from seqplat.core.gemm import project_steps
from seqplat.core.workspace import Workspace

from .common import (
    dropout_mask,
    highway,
    highway_fast,
    init_bias_,
    init_weight_,
    none_from_text,
    set_transform_bias_,
    step_dropout_masks,
)
from .fused import RHNRecurrence, resolve_backend, rhn_loop, rhn_loop_cpp


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
    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="the fast path's time loop: 'cpp' (C++ kernel built at first use), 'python' "
        "(torch ops, any device), 'auto' (cpp on CPU when a compiler is present)"
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
        #: train through the hand-written backward of :mod:`.fused` (False: autograd on the fast loop)
        self.explicit_backward = True
        self._workspace = Workspace()  # saved buffers of the hand-written backward, reused across calls
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

    def train(self, mode: bool = True) -> RHNCell:
        """Switch mode; leaving training frees the buffers kept for the hand-written backward."""
        if not mode:
            self._workspace.clear()
        return super().train(mode)

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

    def step_compile_target(self) -> str | None:
        """``train.compile=step`` compiles ``_step``: the reference loop calls it once per time step."""
        return "_step"

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
        """The reference recurrence with the input projection of all steps in one matmul.

        When gradients are needed the loop runs through :class:`~.fused.RHNRecurrence`, whose
        hand-written backward computes each micro-layer's weight gradient as one GEMM over all steps
        (``explicit_backward = False``: autograd on the per-step loop instead). Without gradients it
        is :func:`~.fused.rhn_loop`. Every dropout mask is drawn in the reference path's order, so with
        the same seed both paths agree in training too.
        """
        masks = self.draw_masks(x.shape[0], x)  # same draws, same order as the reference path
        w_ih, b_ih, w_hh, b_hh = self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh  # read once
        x_in = x if masks.input is None else x * masks.input.unsqueeze(1)
        xp = project_steps(x_in, w_ih, b_ih)  # (W_H x_t ; W_T x_t) (+ b_in) of all steps, [t, b, 2n]
        mask_g = self._gate_masks(xp.shape[0], x.shape[0], x)
        needs_grad = torch.is_grad_enabled() and any(v.requires_grad for v in (xp, state, w_hh, b_hh))
        backend = resolve_backend(self.config.backend, xp)
        if not needs_grad:
            loop = rhn_loop_cpp if backend == "cpp" else rhn_loop
            ys, s, _ = loop(xp, state, w_hh, b_hh, masks.hidden, mask_g, keep=False)
        elif self.explicit_backward:
            ys, s = RHNRecurrence.apply(xp, state, w_hh, b_hh, masks.hidden, mask_g, self._workspace, None, None, None,
                                        False, backend)
        else:
            ys, s = self._autograd_loop(xp, state, w_hh, b_hh, masks.hidden, mask_g)
        y = ys.transpose(0, 1)  # [b, t, n]
        if masks.output is not None:
            y = y * masks.output.unsqueeze(1)
        return y, s

    def _gate_masks(self, steps: int, batch: int, like: Tensor) -> Tensor | None:
        """Gate-dropout masks ``[t, L, b, n]`` for a whole sequence, drawn in the order :meth:`_step`
        draws them, so both paths consume the random stream alike."""
        p = self.config.gate_dropout if self.training else 0.0
        return step_dropout_masks(steps, self.config.depth, batch, self.config.hidden_size, p, like)

    @staticmethod
    def _autograd_loop(xp: Tensor, s: Tensor, w_hh: Tensor, b_hh: Tensor, mask_h: Tensor | None,
                       mask_g: Tensor | None) -> tuple[Tensor, Tensor]:
        """The fast loop under autograd (one small weight-gradient GEMM per micro-layer and step)."""
        xp = xp + b_hh[0]
        r_t = [r.t() for r in w_hh.unbind(0)]
        ys = []
        for step, xp_t in enumerate(xp.unbind(0)):  # unbind keeps the backward linear in t
            for layer in range(len(r_t)):
                s_in = s if mask_h is None else s * mask_h
                u = torch.addmm(xp_t if layer == 0 else b_hh[layer], s_in, r_t[layer])
                s = highway_fast(u, s, None if mask_g is None else mask_g[step, layer])  # R1-R4
            ys.append(s)
        return torch.stack(ys), s

    def extra_repr(self) -> str:
        c = self.config
        return f"input_size={self.input_size}, hidden_size={c.hidden_size}, depth={c.depth}"
