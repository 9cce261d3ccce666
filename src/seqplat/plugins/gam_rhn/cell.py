"""GAM-RHN: Recurrent Highway Networks with Grouped Auxiliary Memory.

Wei Luo and Feng Yu, "Recurrent Highway Networks With Grouped Auxiliary Memory", IEEE Access 7, 2019,
https://ieeexplore.ieee.org/document/8932404 (authors' code: github.com/WilliamRo/gam_rhn). The cell
follows the authors' code (tframe ``GamRHN`` with the ``'gru'`` hyper-kernel); the step numbers below
are those of the spec (``papers/gam_rhn.md`` section 1) and the comments in the code cite them.

Memory ``"SxN"``: N groups of S scalar slots, ``m`` is ``[b, S*N]`` and group i holds the contiguous
slots ``[i*S, (i+1)*S)``. ``SoG`` is a softmax inside every group; ``Dup`` repeats each of the N group
values S times; ``Sum`` adds the S slots of each group. One time step, with state ``(m_{t-1}, s_{t-1})``::

    (1) h_w   = W_hw [x_t ; s_{t-1}]                                  write head        [b, H]
    (2) a_w   = SoG(W_aw h_w)                                         write address     [b, S*N]
    (3) r     = sigmoid(W_r [x_t ; s_{t-1}] + b_r)                    reset gate        [b, D]
        m_bar = tanh(W_m [x_t ; r * s_{t-1}] + b_m)                   written value     [b, N]
    (4) m_t   = (1 - a_w) * m_{t-1} + a_w * Dup(m_bar)                write
    (5) for l = 1..L, s^0 = s_{t-1}:
          h^l        = h_w if l == 1 else W_h^l s^{l-1}               read head         [b, H]
          a^l        = SoG(W_a^l h^l + b_a^l)                         read address      [b, S*N]
          xr^l       = Sum(a^l * m_t)                                 read (after write)[b, N]
          [r^l; z^l] = sigmoid(W_g^l [xr^l ; s^{l-1}] + b_g^l)
          s_hat^l    = tanh(W_s^l [xr^l ; r^l * s^{l-1}] + b_s^l)
          s^l        = z^l * s^{l-1} + (1 - z^l) * s_hat^l            z is the carry gate
    (6) y_t = s^L;  state (m_t, s^L)

``x_t`` reaches the highway layers only through the write. Every matrix is Glorot-normal over its
concatenated inputs, every bias zero. Dropouts: ``gam_dropout`` on ``m_bar`` and ``rhn_dropout`` on
every ``s_hat^l`` (fresh masks every step); the model's ``input_dropout``/``output_dropout`` cover the
authors' input and output dropout.

Two paths: :meth:`GAMRHNCell.step` is the plain reference (one step, unrolled by the core), and
:meth:`GAMRHNCell.fast_forward` hoists the ``x_t`` parts of ``W_hw``, ``W_r`` and ``W_m`` for all steps
into one matmul, merges the matrices that read the same vector, holds the memory slot-major (``[b, S, N]``,
so the grouped softmax runs over a non-last dim, some 10x faster for small S) and, when training, runs
the loop through :class:`~seqplat.plugins.gam_rhn.fused.GAMRHNRecurrence`, whose hand-written backward
does one weight-gradient GEMM per matrix over all steps (``explicit_backward = False`` on the cell
falls back to autograd on the same loop). With ``backend`` ``cpp`` (the default ``auto`` on CPU float
tensors when the kernel builds) that Function's forward and reverse loops, and the loop without
gradients, run in ``gam_rhn_cpu.cpp``: one call per direction, the GEMMs as ATen calls and the
elementwise work between two GEMMs as one fused pass over the batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqplat import StepCell
from seqplat.core.cell import State
from seqplat.core.gemm import projection, time_major_rows
from seqplat.core.workspace import Workspace

from .config import GAMRHNConfig
from .fused import GAMRHNRecurrence, gam_rhn_loop_cpp, resolve_backend


def grouped_softmax(logits: Tensor, slots: int) -> Tensor:
    """``SoG``: softmax over each group of ``slots`` contiguous entries of the last axis.

    ``torch.softmax`` subtracts the group maximum first, so logits of any size are safe.
    """
    shape = logits.shape
    return torch.softmax(logits.reshape(*shape[:-1], shape[-1] // slots, slots), dim=-1).reshape(shape)


def duplicate(values: Tensor, slots: int) -> Tensor:
    """``Dup``: ``[..., N] -> [..., N*S]``, each group value repeated over its S slots."""
    return values.unsqueeze(-1).expand(*values.shape, slots).reshape(*values.shape[:-1], -1)


def summarize(slots_values: Tensor, slots: int) -> Tensor:
    """``Sum``: ``[..., N*S] -> [..., N]``, the sum over the S slots of each group."""
    shape = slots_values.shape
    return slots_values.reshape(*shape[:-1], shape[-1] // slots, slots).sum(-1)


def _dropout(value: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with a fresh mask, drawn only when it acts (both paths draw the same masks)."""
    return F.dropout(value, p, True) if training and p > 0 else value


def _glorot(rows: int, cols: int) -> nn.Parameter:
    w = torch.empty(rows, cols)
    nn.init.xavier_normal_(w)
    return nn.Parameter(w)


def _zeros(n: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(n))


@dataclass
class StepTrace:
    """Intermediate values of one reference step (for tests and inspection)."""

    write_head: Tensor
    write_address: Tensor
    reset: Tensor
    value: Tensor
    memory: Tensor
    read_heads: list[Tensor] = field(default_factory=list)
    read_addresses: list[Tensor] = field(default_factory=list)
    reads: list[Tensor] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)


class HighwayLayer(nn.Module):
    """One highway layer ``l`` of step (5): its read (head for ``l >= 2``, own address) and a GRU-type
    update of ``s`` from the read ``xr^l``."""

    def __init__(self, config: GAMRHNConfig, first: bool):
        super().__init__()
        d, h, n, sn = config.hidden_size, config.head_size, config.groups, config.memory_size
        # layer 1 reuses the write head h_w, so it has no read head of its own
        self.read_head = None if first else _glorot(h, d)  # W_h^l
        self.read_address = _glorot(sn, h)  # W_a^l
        self.read_address_bias = _zeros(sn) if config.read_address_bias else None  # b_a^l
        self.gate_weight = _glorot(2 * d, n + d)  # W_g^l over [xr ; s], rows: r then z
        self.gate_bias = _zeros(2 * d)
        self.candidate_weight = _glorot(d, n + d)  # W_s^l over [xr ; r * s]
        self.candidate_bias = _zeros(d)


class GAMRHNCell(StepCell):
    """GAM-RHN-L cell: a grouped auxiliary memory written once per step, read by each of L GRU-type
    highway layers; state ``(m [b, S*N], s [b, D])``."""

    config_class = GAMRHNConfig
    has_fast_path = True
    activation_roles: ClassVar[tuple[str, ...]] = ("gate", "candidate", "memory", "hidden")

    def __init__(self, input_size: int, config: GAMRHNConfig):
        super().__init__(input_size, config)
        self.config: GAMRHNConfig = config
        #: train through the hand-written backward of :mod:`.fused` (False: autograd on the fast loop)
        self.explicit_backward = True
        #: buffers the hand-written backward's saved activations reuse from one training call to the next
        self.workspace = Workspace()
        d_in, d, h = input_size, config.hidden_size, config.head_size
        n, sn = config.groups, config.memory_size
        self.slots = config.slots
        self.write_head = _glorot(h, d_in + d)  # W_hw, no bias (step 1)
        self.write_address = _glorot(sn, h)  # W_aw (step 2)
        self.write_address_bias = _zeros(sn) if config.write_address_bias else None
        self.reset_weight = _glorot(d, d_in + d)  # W_r (step 3)
        self.reset_bias = _zeros(d)
        self.value_weight = _glorot(n, d_in + d)  # W_m (step 3)
        self.value_bias = _zeros(n)
        self.layers = nn.ModuleList(HighwayLayer(config, first=i == 0) for i in range(config.depth))
        layer_names = [f"layers.{i}" for i in range(config.depth)]
        self.weight_roles = {  # type: ignore[misc]  # per instance: the names depend on depth
            "memory": ("write_head", "write_address", "reset_weight", "value_weight"),
            "read": tuple(f"{p}.read_address" for p in layer_names)
            + tuple(f"{p}.read_head" for p in layer_names[1:]),
            "highway": tuple(f"{p}.{w}" for p in layer_names for w in ("gate_weight", "candidate_weight")),
        }

    # -- state ----------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """Zero memory ``[b, S*N]`` and zero highway state ``[b, D]``."""
        dtype = dtype or torch.float32
        return (
            torch.zeros(batch_size, self.config.memory_size, device=device, dtype=dtype),
            torch.zeros(batch_size, self.config.hidden_size, device=device, dtype=dtype),
        )

    # -- reference path -------------------------------------------------------------------------
    def trace_step(self, x_t: Tensor, state: State) -> StepTrace:
        """One reference step, keeping every intermediate value."""
        m, s = state
        cfg, S = self.config, self.slots
        xs = torch.cat([x_t, s], dim=-1)
        h_w = F.linear(xs, self.write_head)  # (1)
        a_w = grouped_softmax(F.linear(h_w, self.write_address, self.write_address_bias), S)  # (2)
        r = self.quantize_activation("gate", torch.sigmoid(F.linear(xs, self.reset_weight, self.reset_bias)))  # (3)
        m_bar = torch.tanh(F.linear(torch.cat([x_t, r * s], dim=-1), self.value_weight, self.value_bias))
        m_bar = _dropout(self.quantize_activation("candidate", m_bar), cfg.gam_dropout, self.training)
        m = self.quantize_activation("memory", (1.0 - a_w) * m + a_w * duplicate(m_bar, S))  # (4)
        trace = StepTrace(h_w, a_w, r, m_bar, m)
        for i, layer in enumerate(self.layers):  # (5)
            h_l = h_w if i == 0 else F.linear(s, layer.read_head)
            a_l = grouped_softmax(F.linear(h_l, layer.read_address, layer.read_address_bias), S)
            xr = summarize(a_l * m, S)  # reads m_t, the memory after this step's write
            gates = torch.sigmoid(F.linear(torch.cat([xr, s], dim=-1), layer.gate_weight, layer.gate_bias))
            r_l, z_l = self.quantize_activation("gate", gates).chunk(2, dim=-1)
            s_hat = torch.tanh(F.linear(torch.cat([xr, r_l * s], dim=-1), layer.candidate_weight,
                                        layer.candidate_bias))
            s_hat = _dropout(self.quantize_activation("candidate", s_hat), cfg.rhn_dropout, self.training)
            s = self.quantize_activation("hidden", z_l * s + (1.0 - z_l) * s_hat)
            trace.read_heads.append(h_l)
            trace.read_addresses.append(a_l)
            trace.reads.append(xr)
            trace.states.append(s)
        return trace

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        """Steps (1)-(6) for one time step: ``y_t = s^L``, state ``(m_t, s^L)``."""
        trace = self.trace_step(x_t, state)
        s = trace.states[-1]
        return s, (trace.memory, s)  # (6)

    # -- fast path --------------------------------------------------------------------------------
    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """The reference recurrence with the ``x_t`` projections of all steps in one matmul.

        Per step, matrices that multiply the same vector are merged: ``s_{t-1}`` feeds the write head,
        the reset gate and layer 1's gates in one ``addmm``; each ``s^{l-1}`` (l >= 2) feeds its read
        head and its gates in one. Dropout masks are drawn in the reference order, so with the same
        seed both paths give the same result in training too.
        """
        m, s = state
        cfg, S = self.config, self.slots
        d_in, d, h, n = self.input_size, cfg.hidden_size, cfg.head_size, cfg.groups
        b, steps = x.shape[0], x.shape[1]
        layers = list(self.layers)
        first = layers[0]

        # x_t parts of W_hw, W_r, W_m for every step in one matmul: columns [h_w | r | m_bar], [t, b, H+D+N]
        w_x = torch.cat([self.write_head[:, :d_in], self.reset_weight[:, :d_in], self.value_weight[:, :d_in]])
        b_x = torch.cat([self.reset_bias.new_zeros(h), self.reset_bias, self.value_bias])
        x_rows = time_major_rows(x)
        backend = resolve_backend(cfg.backend, x)

        def dense(w: Tensor) -> Tensor:  # the C++ loop takes the [out, in] views as they are (MKL is faster so)
            return w if backend == "cpp" else w.contiguous()

        # s_{t-1} feeds layer 1's gates, W_hw and W_r: one [D, 2D+H+D] matrix (layer 1's gate bias beside it)
        w_s0 = torch.cat([first.gate_weight[:, n:], self.write_head[:, d_in:], self.reset_weight[:, d_in:]]).t()
        w_s0 = dense(w_s0)
        w_ms = self.value_weight[:, d_in:]  # [N, D]: applied as u @ w_ms.t()
        # addresses slot-major (column k*N + g is slot k of group g), so the grouped softmax runs over
        # dim 1 of [b, S, N]: torch's softmax over a last dim of size S is some 10x slower. h_w feeds the
        # write address and layer 1's read address: one [H, 2SN] matrix
        perm = torch.arange(n * S, device=x.device).view(n, S).t().reshape(-1)

        def address_bias(bias: Tensor | None) -> Tensor:
            return x.new_zeros(n * S) if bias is None else bias[perm]

        w_ad0 = dense(torch.cat([self.write_address[perm], first.read_address[perm]]).t())
        b_ad0 = torch.cat([address_bias(self.write_address_bias), address_bias(first.read_address_bias)])
        weights: list[Tensor] = [w_s0, first.gate_bias, w_ms, w_ad0, b_ad0]
        for i, lay in enumerate(layers):
            # xr^l feeds W_s^l and W_g^l: [N, D+2D], columns [candidate | r^l | z^l]
            w_xr = dense(torch.cat([lay.candidate_weight[:, :n], lay.gate_weight[:, :n]]).t())
            weights += [w_xr, lay.candidate_bias, dense(lay.candidate_weight[:, n:].t())]
            if i >= 1:  # s^{l-1} feeds W_g^l and W_h^l: [D, 2D+H]
                w_hs = dense(torch.cat([lay.gate_weight[:, n:], lay.read_head]).t())
                weights += [w_hs, lay.gate_bias, dense(lay.read_address[perm].t()),
                            address_bias(lay.read_address_bias)]

        m = m.reshape(b, n, S).transpose(1, 2).contiguous()  # inside the loop: [b, S slots, N groups]
        if self.explicit_backward and torch.is_grad_enabled():  # the Function projects x itself
            return self._explicit_backward_forward(x_rows, w_x, b_x, m, s, weights, backend)
        xp = projection(x_rows, w_x, b_x).view(steps, b, -1)
        if backend == "cpp" and not torch.is_grad_enabled():  # the C++ loop, nothing kept for a backward
            mask_g, mask_r = self._draw_masks(steps, b, xp)
            ys, m, s, _, _ = gam_rhn_loop_cpp(xp, m, s, mask_g, mask_r, (h, d, n, S, cfg.depth), weights)
            return ys.transpose(0, 1), (m.transpose(1, 2).reshape(b, n * S), s)
        w_s0, b_g0, w_ms, w_ad0, b_ad0 = weights[:5]
        b_s0 = torch.cat([b_g0, b_g0.new_zeros(h + d)])
        layer_w, k = [], 5
        for i in range(cfg.depth):
            layer_w.append(weights[k : k + (3 if i == 0 else 7)])
            k += len(layer_w[-1])
        ys = []
        for xp_t in xp.unbind(0):  # unbind keeps the backward linear in t
            pre = torch.addmm(b_s0, s, w_s0)
            hr = pre[:, 2 * d :] + xp_t[:, : h + d]
            h_w = hr[:, :h]  # (1)
            a0 = torch.softmax(torch.addmm(b_ad0, h_w, w_ad0).view(b, 2, S, n), dim=2)  # (2), layer 1's read
            r = torch.sigmoid(hr[:, h:])  # (3)
            m_bar = torch.tanh(torch.addmm(xp_t[:, h + d :], r * s, w_ms.t()))
            m_bar = _dropout(m_bar, cfg.gam_dropout, self.training)
            m = torch.lerp(m, m_bar.unsqueeze(1), a0[:, 0])  # (4): m + a (Dup(m_bar) - m)
            for i, lw in enumerate(layer_w):  # (5)
                if i == 0:
                    a, gate_s = a0[:, 1], pre[:, : 2 * d]
                else:
                    w_xr, b_c, w_cs, w_hs, b_hs, w_a, b_a = lw
                    hs = torch.addmm(torch.cat([b_hs, b_hs.new_zeros(h)]), s, w_hs)
                    gate_s = hs[:, : 2 * d]
                    a = torch.softmax(torch.addmm(b_a, hs[:, 2 * d :], w_a).view(b, S, n), dim=1)
                w_xr, b_c, w_cs = lw[:3]
                xr = (a * m).sum(1)
                xg = xr @ w_xr
                r_l, z_l = torch.sigmoid(gate_s + xg[:, d:]).chunk(2, dim=-1)
                s_hat = torch.tanh(torch.addmm(xg[:, :d] + b_c, r_l * s, w_cs))
                s_hat = _dropout(s_hat, cfg.rhn_dropout, self.training)
                s = torch.lerp(s_hat, s, z_l)  # z s + (1 - z) s_hat
            ys.append(s)  # (6)
        return torch.stack(ys, dim=1), (m.transpose(1, 2).reshape(b, n * S), s)

    def _draw_masks(self, steps: int, b: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The (scaled) dropout masks of a whole sequence, ``mask_g [T, b, N]`` and ``mask_r [T, L, b, D]``
        (None when off), drawn in the reference path's order."""
        cfg = self.config
        d, n = cfg.hidden_size, cfg.groups
        draw_g = self.training and cfg.gam_dropout > 0
        draw_r = self.training and cfg.rhn_dropout > 0
        mask_g = like.new_empty(steps, b, n) if draw_g else None
        mask_r = like.new_empty(steps, cfg.depth, b, d) if draw_r else None
        if draw_g or draw_r:
            ones_g, ones_r = like.new_ones(b, n), like.new_ones(b, d)
            for t in range(steps):
                if mask_g is not None:
                    mask_g[t] = F.dropout(ones_g, cfg.gam_dropout, True)
                if mask_r is not None:
                    for i in range(cfg.depth):
                        mask_r[t, i] = F.dropout(ones_r, cfg.rhn_dropout, True)
        return mask_g, mask_r

    def _explicit_backward_forward(self, x_rows: Tensor, w_x: Tensor, b_x: Tensor, m: Tensor, s: Tensor,
                                   weights: list[Tensor], backend: str = "python") -> tuple[Tensor, State]:
        """The same recurrence through :class:`~.fused.GAMRHNRecurrence` (hand-written backward, one
        weight-gradient GEMM per matrix; its loops in C++ with ``backend == "cpp"``), which also makes the
        ``x_t`` projections from the time-major rows ``x_rows``. Dropout masks are drawn up front in the
        reference order."""
        cfg, S = self.config, self.slots
        b = s.shape[0]
        steps = x_rows.shape[0] // b
        d, n = cfg.hidden_size, cfg.groups
        mask_g, mask_r = self._draw_masks(steps, b, x_rows)
        dims = (cfg.head_size, d, n, S, cfg.depth, backend)
        ys, m, s = GAMRHNRecurrence.apply(x_rows, w_x, b_x, m, s, mask_g, mask_r, dims, self.workspace, *weights)
        return ys.transpose(0, 1), (m.transpose(1, 2).reshape(b, n * S), s)

    def train(self, mode: bool = True) -> GAMRHNCell:
        """Switching to evaluation mode drops the training buffers the workspace holds."""
        if not mode:
            self.workspace.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        c = self.config
        return (f"input_size={self.input_size}, memory={c.memory} (S={c.slots} slots x N={c.groups} groups), "
                f"head_size={c.head_size}, hidden_size={c.hidden_size}, depth={c.depth}")
