"""Phased LSTM: an LSTM whose updates are gated by a learned oscillation in continuous time.

D. Neil, M. Pfeiffer, S.-C. Liu, "Phased LSTM: Accelerating Recurrent Network Training for Long or
Event-based Sequences", NeurIPS 2016, https://arxiv.org/abs/1610.09513. Spec: ``papers/phased_lstm.md``.

Each step ``j`` has an input ``x_j [b,d]`` and a timestamp ``t_j [b]``; every unit has a period
``tau``, a shift ``s`` and an open ratio ``r_on`` (all ``[h]``). Equations, labelled as the code cites
them (``sign`` is +1 for the authors' code, -1 for the paper's text, option ``shift_sign``)::

    (T1) phi_j = ((t_j + sign*s) mod tau) / tau                          phase in [0, 1)
    (T2) k_j   = 2 phi_j / r_on          if phi_j <= r_on/2                rising
               = 2 - 2 phi_j / r_on      if r_on/2 < phi_j <= r_on         falling
               = alpha * phi_j           otherwise                         closed (leak)
    (L1) z     = x_j W_x + h_{j-1} W_h + b                                 z = [z_i, z_f, z_g, z_o]
    (L2) i     = sigmoid(z_i + w_ci * c_{j-1});  f = sigmoid(z_f + w_cf * c_{j-1});  g = tanh(z_g)
    (L3) c~    = f * c_{j-1} + i * g
    (L4) o     = sigmoid(z_o + w_co * c~);  h~ = o * tanh(c~)               both read the UN-gated c~
    (P1) c_j   = k_j * c~ + (1 - k_j) * c_{j-1}
    (P2) h_j   = k_j * h~ + (1 - k_j) * h_{j-1}

``alpha`` is ``leak`` in training mode and ``eval_leak`` (0) in evaluation mode. A step whose
timestamp is NaN is padding: ``k_j = 0`` there, so both states are copied unchanged. ``tau`` and
``r_on`` enter as ``|tau|`` and ``|r_on|`` as in the authors' code; ``|r_on|`` is also clamped to
``[r_on_min, 1]`` (ours).

The gate ``k`` depends on time only, never on the state, so the fast path computes ``k`` for all
steps in one broadcast, hoists the input projection ``x W_x + b`` out of the time loop and runs the
loop with a hand-written backward (``scan.py``, in C++ where a compiler is present:
``phased_lstm_cpu.cpp``); the reference path is the per-step ``step``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import State
from seqplat.core.gemm import project_steps

from .scan import (
    phased_lstm_scan,
    projected_phased_applies,
    projected_phased_lstm_scan,
    resolve_backend,
    time_gate_cpp,
)


class PhasedLSTMConfig(CellConfig):
    """Options of the ``phased_lstm`` cell (defaults: the README's setting for ordinary tasks)."""

    hidden_size: int = Field(110, ge=1, description="hidden units h")
    log_period_init: tuple[float, float] = Field(
        (1.0, 6.0), description="tau is initialised as exp(U(a, b)) in the task's time unit; (1, 6) = README "
        "'standard tasks', (1, 3) = the authors' frequency task"
    )
    shift_init_max: float | None = Field(
        None, ge=0.0, description="s ~ U(0, shift_init_max); None: s ~ U(0, tau) per unit (covers every phase)"
    )
    r_on_init: float = Field(0.05, gt=0.0, le=1.0, description="initial open ratio r_on (fraction of a period open)")
    r_on_min: float = Field(1e-3, gt=0.0, le=1.0, description="|r_on| is clamped to [r_on_min, 1] in the gate")
    leak: float = Field(1e-3, ge=0.0, le=1.0, description="alpha: slope of the closed phase in training mode")
    eval_leak: float = Field(0.0, ge=0.0, le=1.0, description="alpha in evaluation mode (0: perfect hold)")
    learn_period: bool = Field(True, description="train tau")
    learn_shift: bool = Field(True, description="train s")
    learn_r_on: bool = Field(False, description="train r_on (the authors' frequency task does; README: keep it fixed)")
    shift_sign: Literal["code", "paper"] = Field(
        "code", description="phase of (t + s) as in the authors' code, or (t - s) as in the paper's text"
    )
    peepholes: bool = Field(True, description="peephole weights w_ci, w_cf, w_co (the paper's cell has them)")
    init_std: float = Field(0.1, gt=0.0, description="W_x, W_h and peepholes ~ N(0, init_std^2) (Lasagne default)")
    input_gate_bias: float = Field(-0.1, description="initial input-gate bias (authors' frequency task: -0.1)")
    forget_gate_bias: float = Field(0.0, description="initial forget-gate bias (authors' frequency task: 0)")
    gate_grad_clip: float | None = Field(
        None, gt=0.0, description="clip the backward signal at the gate pre-activations z to [-v, v] "
        "(Lasagne grad_clipping; the authors' frequency task uses 10). None: off"
    )
    time_gate: bool = Field(True, description="False: bypass the time gate (k = 1), i.e. a plain peephole LSTM")
    time_source: Literal["task", "step_index"] = Field(
        "task", description="'task': read the batch's timestamps; 'step_index': use 0, 1, 2, ... (counted "
        "across carried chunks) so the cell runs on tasks without timestamps"
    )
    phase_float64: bool = Field(
        True, description="compute the phase in float64 (large timestamps lose precision in float32)"
    )
    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="the fast path's time loop: 'cpp' (C++ kernel built at first use), 'python' "
        "(torch ops, any device), 'auto' (cpp on CPU when a compiler is present)"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> PhasedLSTMConfig:
        lo, hi = self.log_period_init
        if not lo <= hi:
            raise ValueError(f"log_period_init: need a <= b, got {self.log_period_init}")
        if self.r_on_init < self.r_on_min:
            raise ValueError(f"r_on_init ({self.r_on_init}) is below r_on_min ({self.r_on_min})")
        return self


def time_gate(t: Tensor, period: Tensor, shift: Tensor, r_on: Tensor, alpha: float) -> Tensor:
    """Openness ``k`` (T1-T2) of every unit at times ``t`` (``[..., 1]`` against ``[h]`` parameters).

    ``period`` and ``r_on`` must already be positive; ``shift`` carries the sign convention. The phase is
    ``u - floor(u)`` with ``u = (t + s) / tau``, which equals ``((t + s) mod tau) / tau`` and has the same
    gradient as Theano's and ``torch.remainder``'s mod (d/dtau includes ``-floor((t + s)/tau)``). Both
    open branches are ``1 - |2 phi / r_on - 1|`` (rising up to ``r_on/2``, falling after).
    """
    inv = 1.0 / period
    u = torch.addcmul(shift * inv, t, inv)  # (t + s) / tau
    phi = u - torch.floor(u)  # (T1)
    k_open = 1.0 - (phi * (2.0 / r_on) - 1.0).abs()
    return torch.where(phi <= r_on, k_open, phi * alpha)  # (T2)


class PhasedLSTMCell(StepCell):
    """Peephole LSTM with the Phased LSTM time gate; reads ``times[b,t]`` (see the module docstring)."""

    config_class = PhasedLSTMConfig
    uses_time: ClassVar[bool] = True
    has_fast_path = True
    weight_roles = {"input": ("weight_ih",), "recurrent": ("weight_hh",)}
    activation_roles = ("gate", "candidate", "cell", "hidden")

    def __init__(self, input_size: int, config: PhasedLSTMConfig):
        super().__init__(input_size, config)
        h = config.hidden_size
        if config.time_source == "step_index":
            self.uses_time = False  # instance override: timestamps come from the step counter
        self.weight_ih = nn.Parameter(torch.empty(input_size, 4 * h))  # W_x, gate order i, f, g, o
        self.weight_hh = nn.Parameter(torch.empty(h, 4 * h))  # W_h
        self.bias = nn.Parameter(torch.zeros(4 * h))
        if config.peepholes:
            self.peephole = nn.Parameter(torch.empty(3, h))  # rows: w_ci, w_cf, w_co
        else:
            self.register_parameter("peephole", None)
        self.period = nn.Parameter(torch.empty(h), requires_grad=config.learn_period)
        self.shift = nn.Parameter(torch.empty(h), requires_grad=config.learn_shift)
        self.r_on = nn.Parameter(torch.empty(h), requires_grad=config.learn_r_on)
        self.reset_parameters()
        self.reset_extra_stats()

    # -- parameters -------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise as the spec's section 2 (authors' code): N(0, 0.1^2) weights, log-uniform periods."""
        cfg = self.config
        h = cfg.hidden_size
        with torch.no_grad():
            nn.init.normal_(self.weight_ih, 0.0, cfg.init_std)
            nn.init.normal_(self.weight_hh, 0.0, cfg.init_std)
            self.bias.zero_()
            self.bias[:h].fill_(cfg.input_gate_bias)
            self.bias[h : 2 * h].fill_(cfg.forget_gate_bias)
            if self.peephole is not None:
                nn.init.normal_(self.peephole, 0.0, cfg.init_std)
            lo, hi = cfg.log_period_init
            self.period.copy_(torch.empty(h).uniform_(lo, hi).exp())
            if cfg.shift_init_max is None:
                self.shift.copy_(torch.rand(h) * self.period)
            else:
                self.shift.uniform_(0.0, cfg.shift_init_max)
            self.r_on.fill_(cfg.r_on_init)

    def gate_parameters(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(tau, signed shift, r_on)`` as the gate uses them: positive period and open ratio."""
        cfg = self.config
        period = self.period.abs().clamp_min(1e-6)
        shift = self.shift if cfg.shift_sign == "code" else -self.shift
        r_on = self.r_on.abs().clamp(cfg.r_on_min, 1.0)
        return period, shift, r_on

    @property
    def alpha(self) -> float:
        """The leak in the current mode (``leak`` when training, ``eval_leak`` when evaluating)."""
        return self.config.leak if self.training else self.config.eval_leak

    def openness(self, t: Tensor) -> Tensor:
        """``k`` for timestamps ``t`` of any shape ``[...]`` -> ``[..., h]`` (0 where ``t`` is NaN)."""
        valid = ~torch.isnan(t)
        tt = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(-1)
        period, shift, r_on = self.gate_parameters()
        if self.config.phase_float64 and tt.dtype != torch.float64:
            out_dtype = torch.promote_types(tt.dtype, period.dtype)
            k = time_gate(tt.double(), period.double(), shift.double(), r_on.double(), self.alpha).to(out_dtype)
        else:
            k = time_gate(tt, period, shift, r_on, self.alpha)
        if not self.config.time_gate:
            k = torch.ones_like(k)
        return torch.where(valid.unsqueeze(-1), k, torch.zeros_like(k))

    def _fast_openness(self, t: Tensor, x: Tensor) -> Tensor:
        """:meth:`openness` in one C++ pass (forward and backward) where the kernel runs and the phase is
        float64; otherwise :meth:`openness` itself."""
        cfg = self.config
        float64_phase = cfg.phase_float64 or t.dtype == torch.float64
        if not cfg.time_gate or not float64_phase or resolve_backend(cfg.backend, x) != "cpp":
            return self.openness(t)
        period, shift, r_on = self.gate_parameters()
        return time_gate_cpp(t, period, shift, r_on, self.alpha, torch.promote_types(t.dtype, period.dtype))

    # -- state ------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """``(h, c)``; with ``time_source='step_index'`` also the step counter ``n`` (int64, ``[b]``)."""
        z = torch.zeros(batch_size, self.output_size, device=device, dtype=dtype or torch.float32)
        if self.config.time_source == "step_index":
            return (z, z.clone(), torch.zeros(batch_size, device=device, dtype=torch.long))
        return (z, z.clone())

    def apply_zoneout(self, old: State, new: State) -> State:
        """Zoneout on ``(h, c)`` only; the step counter always advances."""
        if self.zoneout_prob <= 0.0:
            return new
        mixed = super().apply_zoneout(old[:2], new[:2])
        return (*mixed, *new[2:])

    # -- reference path -----------------------------------------------------------------------------
    def _lstm(self, z: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
        """(L2)-(L4): candidate cell ``c~`` and output ``h~`` from pre-activations ``z [b,4h]``."""
        if self.config.gate_grad_clip is not None and z.requires_grad:
            v = self.config.gate_grad_clip
            z.register_hook(lambda g: g.clamp(-v, v))
        zi, zf, zg, zo = z.chunk(4, dim=-1)
        if self.peephole is not None:
            w_ci, w_cf, w_co = self.peephole
            zi = zi + w_ci * c_prev
            zf = zf + w_cf * c_prev
        i = self.quantize_activation("gate", torch.sigmoid(zi))
        f = self.quantize_activation("gate", torch.sigmoid(zf))
        g = self.quantize_activation("candidate", torch.tanh(zg))
        c_tilde = self.quantize_activation("cell", f * c_prev + i * g)  # (L3)
        if self.peephole is not None:
            zo = zo + w_co * c_tilde  # (L4): output peephole reads c~
        o = self.quantize_activation("gate", torch.sigmoid(zo))
        h_tilde = self.quantize_activation("hidden", o * torch.tanh(c_tilde))  # (L4)
        return c_tilde, h_tilde

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        """One step of (T1)-(P2); ``t [b]`` is the timestamp (NaN: padding, state copied)."""
        h_prev, c_prev = state[0], state[1]
        counting = self.config.time_source == "step_index"
        if counting:
            t = state[2].to(x_t.dtype)
        elif t is None:
            raise ValueError("phased_lstm needs per-step timestamps (or time_source='step_index')")
        z = x_t @ self.weight_ih + self.bias + h_prev @ self.weight_hh  # (L1)
        c_tilde, h_tilde = self._lstm(z, c_prev)
        k = self.openness(t).to(x_t.dtype)  # (T1)-(T2)
        self._record(k, t)
        c = k * c_tilde + (1.0 - k) * c_prev  # (P1)
        h = k * h_tilde + (1.0 - k) * h_prev  # (P2)
        if counting:
            return h, (h, c, state[2] + 1)
        return h, (h, c)

    # -- fast path --------------------------------------------------------------------------------
    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """Same maths as ``step``: ``k`` for all steps in one broadcast, the input projection hoisted out
        of the loop, and the loop itself in :class:`~.scan.PhasedLSTMScan` (hand-written backward)."""
        n = x.shape[1]
        if n == 0:
            return self.reference_forward(x, state, times=times)
        h, c = state[0], state[1]
        counting = self.config.time_source == "step_index"
        if counting:
            times = (state[2].unsqueeze(1) + torch.arange(n, device=x.device)).to(x.dtype)
        elif times is None:
            raise ValueError("phased_lstm needs per-step timestamps (or time_source='step_index')")
        times_tb = times.t()
        ks = self._fast_openness(times_tb, x).to(x.dtype)  # (T1)-(T2), time-major [t,b,h] as the scan reads it
        self._record(ks, times_tb)
        if projected_phased_applies(x, self.weight_ih, self.config.backend):  # the projection inside the C++ op
            y, c = projected_phased_lstm_scan(x, self.weight_ih, self.bias, ks, h, c, self.weight_hh, self.peephole,
                                              self.config.gate_grad_clip)
        else:
            xp = project_steps(x, self.weight_ih.t(), self.bias)  # [t, b, 4h]
            y, c = phased_lstm_scan(xp, ks, h, c, self.weight_hh,
                                    self.peephole, self.config.gate_grad_clip, self.config.backend)
        y = y.transpose(0, 1)
        h = y[:, -1]
        if counting:
            return y, (h, c, state[2] + n)
        return y, (h, c)

    # -- update statistics (the "fraction of state updates" figure) ------------------------------------
    def reset_extra_stats(self) -> None:
        """Forget the accumulated update statistics (done on every switch to evaluation mode)."""
        self._stats: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> PhasedLSTMCell:
        """``model.eval()`` starts a fresh count, so each evaluation reports its own update fraction."""
        if not mode:
            self.reset_extra_stats()
        return super().train(mode)

    def _record(self, k: Tensor, t: Tensor) -> None:
        """Accumulate, in evaluation mode only, how many (unit, step) pairs had an open gate."""
        if self.training:
            return
        with torch.no_grad():
            valid = (~torch.isnan(t)).to(torch.float64)
            units = valid.sum() * k.shape[-1]
            kd = k.detach().to(torch.float64)
            add = {"open_updates": (kd > 0).to(torch.float64).sum(), "openness_sum": kd.sum(), "unit_steps": units}
            for key, v in add.items():
                self._stats[key] = self._stats[key] + v if key in self._stats else v

    def extra_stats(self) -> dict[str, Tensor]:
        """Summable statistics accumulated since the last reset (sum these across processes)."""
        return dict(self._stats)

    @staticmethod
    def finalize_extra_stats(stats: dict[str, Any]) -> dict[str, float]:
        """``update_fraction`` (share of unit-steps with ``k > 0``) and ``mean_openness`` (mean ``k``)."""
        total = float(stats.get("unit_steps", 0.0))
        if total <= 0:
            return {}
        return {
            "update_fraction": float(stats["open_updates"]) / total,
            "mean_openness": float(stats["openness_sum"]) / total,
        }

    def extra_metrics(self) -> dict[str, float]:
        """Metrics from this process's statistics; empty before any evaluation forward pass."""
        return self.finalize_extra_stats(self._stats)

    @classmethod
    def needs_times(cls, config: PhasedLSTMConfig) -> bool:
        """Whether a cell with ``config`` needs the task's timestamps (for the core's config-time check)."""
        return config.time_source == "task"

    def expected_update_fraction(self) -> float:
        """Fraction of unit-steps that update at eval for uniformly distributed phases: mean ``r_on``."""
        return float(self.gate_parameters()[2].mean())

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"{super().extra_repr()}, r_on={cfg.r_on_init}, leak={cfg.leak}, shift_sign={cfg.shift_sign}, "
                f"time_source={cfg.time_source}, log_tau~U{tuple(round(v, 3) for v in cfg.log_period_init)}")


def mean_openness_uniform(r_on: float, alpha: float) -> float:
    """``E[k]`` for a phase uniform on [0, 1): ``r_on/2 + alpha (1 - r_on^2)/2`` (spec test 2)."""
    return r_on / 2.0 + alpha * (1.0 - r_on**2) / 2.0


__all__ = ["PhasedLSTMCell", "PhasedLSTMConfig", "mean_openness_uniform", "time_gate"]
