"""Recurrent Highway Hypernetwork cell (``hyper_rhn``).

J. Suarez, "Language Modeling with Recurrent Highway Hypernetworks", NIPS 2017, built on
D. Ha, A. M. Dai, Q. V. Le, "HyperNetworks", ICLR 2017 (https://arxiv.org/abs/1609.09106) and the
RHN of Zilly et al. (https://arxiv.org/abs/1607.03474). This follows the released code
(``jsuarez5341/Recurrent-Highway-Hypernetworks-NIPS``) as described in the project spec
(``papers/rhn_hyper.md`` §3), equations numbered there. A small hyper RHN (width ``n̂``) and the
main RHN (width ``n``) have the same depth ``d`` and both read the embedding ``e_t``. With
``ŝ^0 = ŝ^d_{t-1}``, ``s^0 = s^d_{t-1}`` and ``highway`` the coupled micro-layer R1-R4 of the
``rhn`` cell (``c = 1 - t``, gate dropout on ``t`` after ``c``), for ``l = 1..d``::

    H1  ŝ^l = highway( R̂_l ŝ^{l-1} + b̂_l + [l=1](Ŵ e_t + b̂_in),  ŝ^{l-1} )
    H2  z^l = P_l ŝ^l + p_l                                           (width n, one per depth)
    H3  s^l = highway( [z^l;z^l] * (R_l s^{l-1}) + b_l
                       + [l=1]([z^1;z^1] * (W e_t) + b_in),  s^{l-1} )

``z^l`` is Ha's memory-efficient weight scaling ``W(z) h = d(z) * (W h)`` with the upscale
projection ``P_l`` in the role of ``W_dz``: the same vector scales the H and the T half of a
micro-layer's weight block, the full weight tensor is never formed, and biases are *not* scaled.
Output ``y_t = s^d_t``; state ``(ŝ^d, s^d)``.

Parameters: hyper ``hyper_weight_ih [2n̂, d_in]`` (Ŵ), ``hyper_bias_ih [2n̂]`` (b̂_in),
``hyper_weight_hh [d, 2n̂, n̂]`` (R̂_l), ``hyper_bias_hh [d, 2n̂]`` (b̂_l); projections
``proj_weight [d, n, n̂]`` (P_l), ``proj_bias [d, n]`` (p_l); main ``weight_ih [2n, d_in]`` (W),
``bias_ih [2n]`` (b_in), ``weight_hh [d, 2n, n]`` (R_l), ``bias_hh [d, 2n]`` (b_l).

Reference path: ``step`` per time step. Fast path: the hyper RHN never reads the main state, so it
runs first over all steps; then every ``z^l`` of every step comes from one matmul per depth, the
input projections of both networks are hoisted, and the main loop iterates over ``unbind``. In
training both loops run through the hand-written backward of :mod:`seqplat.plugins.rhn.fused`: there
the main loop computes each ``z^l_t`` itself from the kept hyper states, just before the micro-layer
that reads it, and scales layer 1's input term ``W e_t`` together with ``R_1 s`` (same equations).
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
from .fused import RHNRecurrence, resolve_backend


class HyperRHNConfig(CellConfig):
    """Options of the ``hyper_rhn`` cell. Defaults follow Suarez's released code except sizes."""

    hidden_size: int = Field(128, ge=1, description="width n of the main RHN (the outputs y_t)")
    hyper_size: int = Field(32, ge=1, description="width n̂ of the hyper RHN (Suarez: 128 with n = 1000)")
    depth: int = Field(3, ge=1, description="recurrence depth d of the hyper and the main RHN (Suarez: 7)")
    gate_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="dropout on every transform gate t after c = 1 - t, in both networks, fresh each step "
        "and micro-layer (Suarez: 0.35, i.e. keep 0.65)",
    )
    transform_bias: float | None = Field(
        None, description="initial transform-gate bias of every micro-layer of both networks; None: no "
        "special value (Suarez's code has no negative transform bias); e.g. -2 for Zilly's carry-biased "
        "start",
    )
    init: Literal["orthogonal", "uniform"] = Field(
        "orthogonal", description="orthogonal: every matrix orthogonal, biases PyTorch's U(+-1/sqrt(fan_in)) "
        "(Suarez's utils.initWeights); uniform: U(-init_scale, init_scale) for all (Zilly's TF code)",
    )
    init_scale: float = Field(0.04, gt=0.0, description="half-width of the uniform init")
    projection_init: Literal["default", "identity"] = Field(
        "default", description="default: P_l, p_l get the init scheme like every other weight (Suarez); "
        "identity: P_l = 0, p_l = 1 so every scale starts at 1 and the cell starts as a plain RHN",
    )
    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="both RHN time loops in training: 'cpp' (C++ kernel built at first use), "
        "'python' (torch ops, any device), 'auto' (cpp on CPU when a compiler is present)"
    )

    @field_validator("transform_bias", mode="before")
    @classmethod
    def _none_text(cls, v: object) -> object:
        return none_from_text(v)


class HyperWeights(NamedTuple):
    """Parameters read once per forward (a parametrization runs once, not per step)."""

    h_ih: Tensor
    h_b_ih: Tensor
    h_hh: tuple[Tensor, ...]
    h_b_hh: tuple[Tensor, ...]
    proj: tuple[Tensor, ...]
    proj_b: tuple[Tensor, ...]
    ih: Tensor
    b_ih: Tensor
    hh: tuple[Tensor, ...]
    b_hh: tuple[Tensor, ...]


class HyperRHNCell(StepCell):
    """Recurrent Highway Hypernetwork: a hyper RHN rescales the main RHN's weights per step and depth."""

    config_class = HyperRHNConfig
    has_fast_path = True
    weight_roles = {
        "input": ("weight_ih", "hyper_weight_ih"),
        "recurrent": ("weight_hh", "hyper_weight_hh"),
        "projection": ("proj_weight",),
    }
    activation_roles = ("candidate", "gate", "hidden")

    def __init__(self, input_size: int, config: HyperRHNConfig):
        super().__init__(input_size, config)
        n, m, d = config.hidden_size, config.hyper_size, config.depth
        self.hyper_weight_ih = nn.Parameter(torch.empty(2 * m, input_size))
        self.hyper_bias_ih = nn.Parameter(torch.empty(2 * m))
        self.hyper_weight_hh = nn.Parameter(torch.empty(d, 2 * m, m))
        self.hyper_bias_hh = nn.Parameter(torch.empty(d, 2 * m))
        self.proj_weight = nn.Parameter(torch.empty(d, n, m))
        self.proj_bias = nn.Parameter(torch.empty(d, n))
        self.weight_ih = nn.Parameter(torch.empty(2 * n, input_size))
        self.bias_ih = nn.Parameter(torch.empty(2 * n))
        self.weight_hh = nn.Parameter(torch.empty(d, 2 * n, n))
        self.bias_hh = nn.Parameter(torch.empty(d, 2 * n))
        #: train through the hand-written backward of :mod:`.fused` (False: autograd on the fast loops)
        self.explicit_backward = True
        self._workspace = Workspace()  # saved buffers of the hand-written backward, reused across calls
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Suarez's init by default: orthogonal matrices, PyTorch-default biases, no transform bias."""
        c = self.config
        scheme, scale = c.init, c.init_scale
        for w in (self.hyper_weight_ih, self.hyper_weight_hh, self.weight_ih, self.weight_hh):
            init_weight_(w, scheme, scale)
        init_bias_(self.hyper_bias_ih, scheme, scale, self.input_size)
        init_bias_(self.hyper_bias_hh, scheme, scale, c.hyper_size)
        init_bias_(self.bias_ih, scheme, scale, self.input_size)
        init_bias_(self.bias_hh, scheme, scale, c.hidden_size)
        if c.projection_init == "identity":
            with torch.no_grad():
                self.proj_weight.zero_()
                self.proj_bias.fill_(1.0)
        else:
            init_weight_(self.proj_weight, scheme, scale)
            init_bias_(self.proj_bias, scheme, scale, c.hyper_size)
        set_transform_bias_(self.hyper_bias_hh, self.hyper_bias_ih, c.transform_bias)
        set_transform_bias_(self.bias_hh, self.bias_ih, c.transform_bias)

    def train(self, mode: bool = True) -> HyperRHNCell:
        """Switch mode; leaving training frees the buffers kept for the hand-written backward."""
        if not mode:
            self._workspace.clear()
        return super().train(mode)

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        dt = dtype or torch.float32
        return (torch.zeros(batch_size, self.config.hyper_size, device=device, dtype=dt),
                torch.zeros(batch_size, self.config.hidden_size, device=device, dtype=dt))

    # -- helpers --------------------------------------------------------------------------------
    def weights(self) -> HyperWeights:
        """The parameters, read once per forward (a quantizer's parametrization then runs once)."""
        return HyperWeights(
            self.hyper_weight_ih, self.hyper_bias_ih, tuple(self.hyper_weight_hh.unbind(0)),
            tuple(self.hyper_bias_hh.unbind(0)), tuple(self.proj_weight.unbind(0)),
            tuple(self.proj_bias.unbind(0)),
            self.weight_ih, self.bias_ih, tuple(self.weight_hh.unbind(0)), tuple(self.bias_hh.unbind(0)),
        )

    def _gate_p(self) -> float:
        return self.config.gate_dropout if self.training else 0.0

    def _hyper_masks(self, time: int, batch: int, like: Tensor) -> Tensor | None:
        """Gate-dropout masks of the hyper RHN for a whole sequence ``[t, d, b, n̂]``, drawn up front
        by both paths so that they consume the random stream in the same order."""
        return dropout_mask((time, self.config.depth, batch, self.config.hyper_size), self._gate_p(), like)

    # -- reference path ---------------------------------------------------------------------------
    def _step(self, x_t: Tensor, state: State, hyper_mask: Tensor | None,
              w: HyperWeights) -> tuple[Tensor, State]:
        sh, s = state
        uh_x = F.linear(x_t, w.h_ih, w.h_b_ih)  # Ŵ e_t + b̂_in
        zs = []
        for layer in range(self.config.depth):
            u = F.linear(sh, w.h_hh[layer], w.h_b_hh[layer])
            if layer == 0:
                u = u + uh_x
            sh = highway(u, sh, None if hyper_mask is None else hyper_mask[layer])  # eq. H1
            zs.append(F.linear(sh, w.proj[layer], w.proj_b[layer]))  # eq. H2
        u_x = F.linear(x_t, w.ih)  # W e_t (the bias b_in is not scaled)
        p = self._gate_p()
        for layer, z in enumerate(zs):
            zz = torch.cat([z, z], dim=-1)  # the same z scales the H and the T half
            u = zz * F.linear(s, w.hh[layer]) + w.b_hh[layer]  # eq. H3
            if layer == 0:
                u = u + zz * u_x + w.b_ih
            s = highway(u, s, dropout_mask(tuple(s.shape), p, s), self.quantize_activation)
        return s, (sh, s)

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        hm = dropout_mask((self.config.depth, x_t.shape[0], self.config.hyper_size), self._gate_p(), x_t)
        return self._step(x_t, state, hm, self.weights())

    def step_compile_target(self) -> str | None:
        """``train.compile=step`` compiles ``_step``: the reference loop calls it once per time step."""
        return "_step"

    def reference_forward(self, x: Tensor, state: State, *,
                          times: Tensor | None = None) -> tuple[Tensor, State]:
        b, time = x.shape[0], x.shape[1]
        hyper_masks = self._hyper_masks(time, b, x)
        w = self.weights()
        ys = []
        for i, x_t in enumerate(x.unbind(1)):
            y_t, new_state = self._step(x_t, state, None if hyper_masks is None else hyper_masks[i], w)
            state = self.apply_zoneout(state, new_state)
            ys.append(y_t)
        return torch.stack(ys, dim=1), state

    # -- fast path --------------------------------------------------------------------------------
    def _hyper_pass(self, x: Tensor, sh: Tensor, w: HyperWeights,
                    hyper_masks: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Run the hyper RHN over all steps (eq. H1) and project (eq. H2): ``z^l`` as ``[b, t, n]``
        per depth, and the final hyper state."""
        depth = self.config.depth
        uh = F.linear(x, w.h_ih, w.h_b_ih) + w.h_b_hh[0]  # [b, t, 2n̂]
        rh_t = [r.t() for r in w.h_hh]
        per_layer: list[list[Tensor]] = [[] for _ in range(depth)]
        masks = [None] * x.shape[1] if hyper_masks is None else hyper_masks.unbind(0)
        for uh_t, m in zip(uh.unbind(1), masks, strict=True):
            for layer in range(depth):
                u = torch.addmm(uh_t if layer == 0 else w.h_b_hh[layer], sh, rh_t[layer])
                sh = highway_fast(u, sh, None if m is None else m[layer])
                per_layer[layer].append(sh)
        zs = [F.linear(torch.stack(hs, dim=1), w.proj[layer], w.proj_b[layer])
              for layer, hs in enumerate(per_layer)]
        return zs, sh

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """The reference recurrence with both input projections and every ``z^l_t`` hoisted.

        When gradients are needed both loops run through :class:`~.fused.RHNRecurrence` (hand-written
        backward, one weight-gradient GEMM per matrix over all steps; ``explicit_backward = False``:
        autograd on the loops below instead). Gate-dropout masks are drawn in the reference order.
        """
        hyper_masks = self._hyper_masks(x.shape[1], x.shape[0], x)
        needs_grad = torch.is_grad_enabled() and any(v.requires_grad for v in (x, *state, *self.parameters()))
        if needs_grad and self.explicit_backward:
            return self._explicit_backward_forward(x, state, hyper_masks)
        sh, s = state
        w = self.weights()
        zs, sh = self._hyper_pass(x, sh, w, hyper_masks)
        zz = [torch.cat([z, z], dim=-1) for z in zs]  # [b, t, 2n] per depth
        a0 = torch.addcmul(w.b_ih + w.b_hh[0], zz[0], F.linear(x, w.ih))  # layer-1 input term, all steps
        steps = [a0.unbind(1)] + [z.unbind(1) for z in zz]
        r_t = [r.t() for r in w.hh]
        p = self._gate_p()
        ys = []
        for i in range(x.shape[1]):
            for layer in range(len(r_t)):
                rs = torch.mm(s, r_t[layer])
                if layer == 0:
                    u = torch.addcmul(steps[0][i], steps[1][i], rs)
                else:
                    u = torch.addcmul(w.b_hh[layer], steps[layer + 1][i], rs)
                s = highway_fast(u, s, dropout_mask(tuple(s.shape), p, s))
            ys.append(s)
        return torch.stack(ys, dim=1), (sh, s)

    def _explicit_backward_forward(self, x: Tensor, state: State, hyper_masks: Tensor | None) -> tuple[Tensor, State]:
        """:meth:`fast_forward` through :class:`~.fused.RHNRecurrence`: the hyper RHN keeping every
        micro-layer's output (eq. H1), then the main RHN computing each ``z^l_t`` from them (eq. H2) and
        scaling its recurrent products and layer 1's input term by it (eq. H3)."""
        sh, s = state
        c = self.config
        n, depth = c.hidden_size, c.depth
        steps, b = x.shape[1], x.shape[0]
        # eq. H1, all steps: Ŵ e_t + b̂_in hoisted (b̂_1 is added inside), time major
        xp_hyper = project_steps(x, self.hyper_weight_ih, self.hyper_bias_ih)
        sh_all, sh = RHNRecurrence.apply(xp_hyper, sh, self.hyper_weight_hh, self.hyper_bias_hh, None, hyper_masks,
                                         self._workspace, None, None, None, True,
                                         resolve_backend(c.backend, xp_hyper))  # [d, t, b, n̂]
        # eq. H3, layer 1: [z^1; z^1] * (R_1 s + W e_t) + b_1 + b_in. W e_t is hoisted unscaled; the loop scales it
        # with R_1 s, and b_in joins b_1. The loop computes every z^l_t (eq. H2) from ŝ^l_t itself
        wx = project_steps(x, self.weight_ih)
        bias = torch.cat([(self.bias_hh[0] + self.bias_ih).unsqueeze(0), self.bias_hh[1:]])
        mask_g = step_dropout_masks(steps, depth, b, n, self._gate_p(), x)  # after the hyper masks, as in _step
        ys, s = RHNRecurrence.apply(wx, s, self.weight_hh, bias, None, mask_g, self._workspace, sh_all,
                                    self.proj_weight, self.proj_bias, False, resolve_backend(c.backend, wx))
        return ys.transpose(0, 1), (sh, s)

    @torch.no_grad()
    def scales(self, x: Tensor, state: State = None) -> Tensor:
        """The scaling vectors ``z^l_t`` the hyper RHN emits for ``x``: ``[b, t, depth, n]`` (no dropout)."""
        sh = self.initial_state(x.shape[0], x.device, x.dtype)[0] if state is None else state[0]
        zs, _ = self._hyper_pass(x, sh, self.weights(), None)
        return torch.stack(zs, dim=2)

    def extra_repr(self) -> str:
        c = self.config
        return (f"input_size={self.input_size}, hidden_size={c.hidden_size}, hyper_size={c.hyper_size}, "
                f"depth={c.depth}")
