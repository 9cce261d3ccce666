"""UnICORNN and coRNN: oscillator RNNs from a discretised second-order ODE.

**UnICORNN** -- T. K. Rusch, S. Mishra, "UnICORNN: A recurrent model for learning very long time
dependencies", ICML 2021, https://arxiv.org/abs/2103.05487. Spec: shared/papers/unicornn.md.

Per layer, H independent undamped oscillators (spec eq. 1.1)::

    y'' = -[ tanh(w * y + V u(t) + b) + alpha * y ]

discretised with symplectic Euler and a trainable per-neuron step ``delta = dt * sigmoid(c)``
(spec section 2; numbered here as in the docs page)::

    (U1) x_t = V u_t + b                                   one Linear over all t (hoisted)
    (U2) z_t = z_{t-1} - delta * (tanh(w * y_{t-1} + x_t) + alpha * y_{t-1})
    (U3) y_t = y_{t-1} + delta * z_t

Deep UnICORNN (spec section 3): layer l reads layer l-1's outputs through its own Linear map (U1),
runs the recurrence (U2-U3), then dropout over time (one mask per (batch, unit), shared by all
steps). The task head reads the top layer's last output.

**coRNN** -- T. K. Rusch, S. Mishra, "Coupled Oscillatory Recurrent Neural Network (coRNN)", ICLR
2021, https://arxiv.org/abs/2010.00951 (spec section 6)::

    (C1) z_n = z_{n-1} + dt * [ tanh(W y_{n-1} + Wz z_{n-1} + V u_n + b) - gamma * y_{n-1} - eps * z_{n-1} ]
    (C2) y_n = y_{n-1} + dt * z_n

with one ``Linear(d + 2h -> h)`` on ``concat(u, z, y)`` as in the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqplat import Cell, StepCell
from seqplat.core.cell import State
from seqplat.core.gemm import projection

from . import cornn_fused
from .config import CoRNNConfig, UnICORNNConfig
from .recurrence import fused_scan, projected_scan, projected_scan_applies, reference_scan


class UnICORNNLayer(nn.Module):
    """One UnICORNN layer: its input Linear map (U1) and the oscillator parameters ``w`` and ``c``."""

    def __init__(self, input_size: int, hidden_size: int, dt: float, cfg: UnICORNNConfig):
        super().__init__()
        self.dt = float(dt)
        self.linear = nn.Linear(input_size, hidden_size)  # V, b of (U1)
        self.w = nn.Parameter(torch.empty(hidden_size))   # diagonal recurrent weight
        self.c = nn.Parameter(torch.empty(hidden_size))   # delta = dt * sigmoid(c)
        nn.init.kaiming_uniform_(self.linear.weight, a=cfg.linear_init_a, mode="fan_in")
        nn.init.zeros_(self.linear.bias)
        nn.init.uniform_(self.w, *cfg.w_init)
        nn.init.uniform_(self.c, -cfg.c_init, cfg.c_init)

    def delta(self) -> Tensor:
        """The per-neuron time step ``dt * sigmoid(c)`` in ``(0, dt)``."""
        return self.dt * torch.sigmoid(self.c)


class UnICORNNCell(Cell):
    """Deep UnICORNN: ``num_layers`` x (Linear, oscillator recurrence, dropout over time).

    The state is one ``(y, z)`` pair per layer. ``reference_forward`` runs the recurrence as a
    naive autograd loop; ``fast_forward`` uses :class:`~.recurrence.ReverseRecomputeScan`, which
    stores no per-step state and rebuilds the states backwards in its backward pass.
    """

    config_class = UnICORNNConfig
    has_fast_path = True
    supports_state_carry = True

    def __init__(self, input_size: int, config: UnICORNNConfig):
        super().__init__(input_size, config)
        h = config.hidden_size
        self.layers = nn.ModuleList(
            UnICORNNLayer(input_size if i == 0 else h, h, config.layer_dt(i), config) for i in range(config.num_layers)
        )

    @property
    def alpha(self) -> float:
        return float(self.config.alpha)

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        h = self.config.hidden_size
        zeros = [torch.zeros(batch_size, h, device=device, dtype=dtype or torch.float32) for _ in range(2)]
        return tuple((zeros[0].clone(), zeros[1].clone()) for _ in self.layers)

    def dropout_mask(self, ref: Tensor) -> Tensor | None:
        """One Bernoulli mask ``[b, 1, h]`` scaled by ``1/(1-p)``, shared over time; None in eval or at p=0."""
        p = self.config.dropout
        if not self.training or p == 0.0:
            return None
        keep = torch.empty(ref.shape[0], 1, ref.shape[2], device=ref.device, dtype=ref.dtype).bernoulli_(1.0 - p)
        return keep.div_(1.0 - p)

    def _run(self, x: Tensor, state: State, fast: bool) -> tuple[Tensor, State]:
        new_state = []
        for layer, (y0, z0) in zip(self.layers, state, strict=True):
            lin = layer.linear
            if fast and projected_scan_applies(x, lin.weight, lin.bias, self.config.backend):
                # (U1)-(U3) in one function: the projection's gradients from the C++ backward
                y0, z0 = y0.to(x.dtype), z0.to(x.dtype)
                mask = self.dropout_mask(x.new_empty(x.shape[0], 1, lin.weight.shape[0]))  # [b, 1, h]
                x, yT, zT = projected_scan(x.reshape(-1, x.shape[-1]), lin.weight, lin.bias, layer.w, layer.delta(),
                                           y0, z0, self.alpha, x.shape[0], mask)
                new_state.append((yT, zT))
                continue
            if fast:  # (U1), all t at once (oneDNN both ways on AVX-512 CPUs, see seqplat.core.gemm)
                pre = projection(x.reshape(-1, x.shape[-1]), lin.weight, lin.bias).view(*x.shape[:-1], -1)
            else:
                pre = layer.linear(x)                              # (U1), all t at once
            y0, z0 = y0.to(pre.dtype), z0.to(pre.dtype)
            if fast:  # the kernel applies the dropout mask as it writes the outputs (one mask per layer)
                mask = self.dropout_mask(pre)
                x, yT, zT = fused_scan(pre, layer.w, layer.delta(), y0, z0, self.alpha, self.config.backend, mask)
            else:
                x, yT, zT = reference_scan(pre, layer.w, layer.delta(), y0, z0, self.alpha)  # (U2)-(U3)
                mask = self.dropout_mask(x)
                if mask is not None:
                    x = x * mask                                   # dropout over time
            new_state.append((yT, zT))
        return x, tuple(new_state)

    def reference_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        return self._run(x, state, fast=False)

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        return self._run(x, state, fast=True)


class CoRNNCell(StepCell):
    """coRNN: coupled oscillators with damping, one dense ``Linear(d+2h -> h)`` per step (C1)-(C2).

    The fast path hoists ``V u + b`` for all steps out of the loop into one product and runs the recurrence
    in C++ (:mod:`.cornn_fused`: one product of ``[W_z, W_y]`` with ``[z, y]`` and one fused pass per step, an
    explicit backward); without the kernel, a Python loop with one ``addmm`` per step. The parameters are the
    same tensors.
    """

    config_class = CoRNNConfig
    has_fast_path = True
    activation_roles = ("candidate",)
    weight_roles = {"input": ("i2h.weight",)}

    def __init__(self, input_size: int, config: CoRNNConfig):
        super().__init__(input_size, config)
        self.i2h = nn.Linear(input_size + 2 * config.hidden_size, config.hidden_size)  # PyTorch default init

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        z = torch.zeros(batch_size, self.config.hidden_size, device=device, dtype=dtype or torch.float32)
        return (z, z.clone())  # (y, z)

    def _update(self, pre: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        drive = self.quantize_activation("candidate", torch.tanh(pre)) - cfg.gamma * y
        if cfg.implicit_damping:  # z_n (1 + dt*eps) = z_{n-1} + dt*(tanh(.) - gamma*y_{n-1})
            z = (z + cfg.dt * drive) / (1.0 + cfg.dt * cfg.epsilon)
        else:                     # (C1) as coded by the authors
            z = z + cfg.dt * (drive - cfg.epsilon * z)
        y = y + cfg.dt * z        # (C2)
        return y, z

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        y, z = state
        pre = self.i2h(torch.cat((x_t, z, y), dim=1))  # concat(u, z, y), the authors' order
        y, z = self._update(pre, y, z)
        return y, (y, z)

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        y, z = state
        d = self.input_size
        w_u, w_zy = self.i2h.weight[:, :d], self.i2h.weight[:, d:]
        xp = F.linear(x, w_u, self.i2h.bias)  # V u_n + b for all n
        if cornn_fused.usable(xp) and xp.shape[1] > 0:
            cfg = self.config
            ys, y, z = cornn_fused.cornn_loop(xp, w_zy, y, z, cfg.dt, cfg.gamma, cfg.epsilon, cfg.implicit_damping)
            return ys, (y, z)
        w_zy_t = w_zy.t()
        ys = []
        for xp_t in xp.unbind(1):
            pre = torch.addmm(xp_t, torch.cat((z, y), dim=1), w_zy_t)
            y, z = self._update(pre, y, z)
            ys.append(y)
        return torch.stack(ys, dim=1), (y, z)


def stability_margin(cfg: UnICORNNConfig, w_max: float = 1.0) -> float:
    """Largest ``delta^2 (alpha + w)`` over layers at the initial ``w <= w_max``; < 4 is linearly stable.

    (Spec section 2: the linearised step is stable when ``delta^2 (alpha + w sech^2 a) < 4``.)
    """
    return max(cfg.layer_dt(i) ** 2 * (cfg.alpha + w_max) for i in range(cfg.num_layers))


__all__ = ["CoRNNCell", "UnICORNNCell", "UnICORNNLayer", "stability_margin"]
