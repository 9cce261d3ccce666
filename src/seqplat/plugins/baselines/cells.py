"""Baseline cells on torch's fused modules: ``lstm``, ``gru`` and ``rnn`` (tanh).

Each keeps the fused module (``nn.LSTM``/``nn.GRU``/``nn.RNN``, oneDNN/cuDNN kernels) as its fast
path and a hand-written step of the standard equations over the *same* parameters as its reference
path, so the two are tested against each other and quantizers can reach every gate.

LSTM (Hochreiter & Schmidhuber 1997, with forget gate; torch's gate order i, f, g, o)::

    (1) i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    (2) c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    (3) h_t = sigmoid(o) * tanh(c_t)

The ``lstm`` cell has a second fast path, ``impl="own"`` (``own_lstm.py``): seqplat's own LSTM over the
same parameters, with the input GEMM hoisted out of the loop, a custom autograd function and one
weight-gradient GEMM after the backward loop (a C++ loop when a compiler is present).

GRU (Cho et al. 2014; torch's order r, z, n)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr);  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn));  h_t = (1 - z) * n + z * h_{t-1}

The ``gru`` cell likewise has ``impl="own"`` (``own_gru.py``, a C++ loop; torch's fused kernel where no
compiler is present).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import State

from .own_gru import own_gru, usable
from .own_lstm import own_lstm


class RNNBaseConfig(CellConfig):
    hidden_size: int = Field(128, ge=1, description="hidden units h")
    bias: bool = Field(True, description="use input and recurrent biases")
    forget_bias: float = Field(0.0, description="LSTM only: added to the forget-gate bias at init (e.g. 1.0)")


class LSTMConfig(RNNBaseConfig):
    impl: Literal["fused", "own"] = Field(
        "fused", description="fast path: 'fused' (torch's nn.LSTM, oneDNN/cuDNN) or 'own' (seqplat's hoisted "
        "LSTM with a custom backward, a C++ loop on CPU when a compiler is present; same parameters)")


class GRUConfig(RNNBaseConfig):
    impl: Literal["fused", "own"] = Field(
        "fused", description="fast path: 'fused' (torch's nn.GRU, oneDNN/cuDNN) or 'own' (seqplat's hoisted GRU "
        "with a custom backward in a C++ loop; torch's fused kernel where no compiler is present; same parameters)")


class _FusedBase(StepCell):
    config_class = RNNBaseConfig
    has_fast_path = True
    fused_kernel = True  # train.compile=step keeps the fused kernel (or the own LSTM) rather than compiling `step`
    weight_roles = {"input": ("rnn.weight_ih_l0",), "recurrent": ("rnn.weight_hh_l0",)}
    module_cls: type[nn.RNNBase]

    def __init__(self, input_size: int, config: RNNBaseConfig):
        super().__init__(input_size, config)
        self.rnn = self.module_cls(input_size, config.hidden_size, batch_first=True, bias=config.bias)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        r = self.rnn
        return r.weight_ih_l0, r.weight_hh_l0, getattr(r, "bias_ih_l0", None), getattr(r, "bias_hh_l0", None)

    def _fused(self, x: Tensor, state: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | tuple]:
        return self.rnn(x, state)


class LSTMCell(_FusedBase):
    """LSTM on torch's fused kernel or seqplat's own (fast paths) with a hand-written reference step."""

    config_class = LSTMConfig
    module_cls = nn.LSTM
    activation_roles = ("gate_preact", "gate", "candidate_preact", "candidate", "cell", "hidden_preact", "hidden")

    def __init__(self, input_size: int, config: LSTMConfig):
        super().__init__(input_size, config)
        if config.forget_bias and config.bias:
            h = config.hidden_size
            with torch.no_grad():
                self.rnn.bias_ih_l0[h : 2 * h].add_(config.forget_bias)

    def initial_state(self, batch_size, device=None, dtype=None) -> State:
        z = torch.zeros(batch_size, self.output_size, device=device, dtype=dtype or torch.float32)
        return (z, z.clone())

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        h, c = state
        w_ih, w_hh, b_ih, b_hh = self._weights()
        gates = F.linear(x_t, w_ih, b_ih) + F.linear(h, w_hh, b_hh)  # eq. 1, [b, 4h]
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, o = (self.quantize_activation("gate", torch.sigmoid(self.quantize_activation("gate_preact", v)))
                   for v in (i, f, o))
        g = self.quantize_activation("candidate", torch.tanh(self.quantize_activation("candidate_preact", g)))
        c = self.quantize_activation("cell", f * c + i * g)  # eq. 2
        h = self.quantize_activation("hidden", o * torch.tanh(self.quantize_activation("hidden_preact", c)))  # eq. 3
        return h, (h, c)

    def fast_forward(self, x, state, *, times=None):
        h, c = state
        if getattr(self.config, "impl", "fused") == "own":
            return own_lstm(x, h, c, *self._weights())
        y, (h_n, c_n) = self.rnn(x, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        return y, (h_n.squeeze(0), c_n.squeeze(0))


class GRUCell(_FusedBase):
    """GRU on torch's fused kernel or seqplat's own (fast paths) with a hand-written reference step."""

    config_class = GRUConfig
    module_cls = nn.GRU
    activation_roles = ("gate_preact", "gate", "candidate_preact", "candidate", "hidden")

    def step(self, x_t, state, *, t=None):
        h = state
        w_ih, w_hh, b_ih, b_hh = self._weights()
        gi = F.linear(x_t, w_ih, b_ih)
        gh = F.linear(h, w_hh, b_hh)
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = self.quantize_activation("gate", torch.sigmoid(self.quantize_activation("gate_preact", ir + hr)))
        z = self.quantize_activation("gate", torch.sigmoid(self.quantize_activation("gate_preact", iz + hz)))
        n_pre = self.quantize_activation("candidate_preact", in_ + r * hn)
        n = self.quantize_activation("candidate", torch.tanh(n_pre))
        h = self.quantize_activation("hidden", (1 - z) * n + z * h)
        return h, h

    def fast_forward(self, x, state, *, times=None):
        if getattr(self.config, "impl", "fused") == "own" and usable(x):
            return own_gru(x, state, *self._weights())
        y, h_n = self.rnn(x, state.unsqueeze(0).contiguous())
        return y, h_n.squeeze(0)


class TanhRNNCell(_FusedBase):
    """Elman RNN ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` on torch's fused kernel."""

    module_cls = nn.RNN
    activation_roles = ("hidden_preact", "hidden")

    def step(self, x_t, state, *, t=None):
        w_ih, w_hh, b_ih, b_hh = self._weights()
        z = self.quantize_activation("hidden_preact", F.linear(x_t, w_ih, b_ih) + F.linear(state, w_hh, b_hh))
        h = self.quantize_activation("hidden", torch.tanh(z))
        return h, h

    def fast_forward(self, x, state, *, times=None):
        y, h_n = self.rnn(x, state.unsqueeze(0).contiguous())
        return y, h_n.squeeze(0)
