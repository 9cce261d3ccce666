"""Layer-normalised LSTM with zoneout, the cell inside every FS-RNN of Mujika et al. (2017).

Paper: "Fast-Slow Recurrent Neural Networks", NIPS 2017, https://arxiv.org/abs/1705.08639; the cell
follows the authors' ``LNLSTM.py`` (layer norm of Ba et al. 2016, zoneout of Krueger et al. 2017).
For an input ``u`` (width d) and state ``(h, c)`` (width n), numbered as in the spec
(``../shared/papers/fs_rnn.md`` section 1)::

    (1) [i; j; f; o] = LN4(W_x u + W_h h + b)           each n-wide block normalised on its own
    (2) c' = sigmoid(f + forget_bias) * c + sigmoid(i) * tanh(j)
    (3) h' = sigmoid(o) * tanh(LN_c(c'))                the stored c' itself is not normalised
    (4) zoneout: h_t = m_h h' + (1 - m_h) h,  c_t = m_c c' + (1 - m_c) c
        training m ~ Bernoulli(keep) per unit and step; evaluation m = keep (the expectation)

``LN(a) = (a - mean) / sqrt(var + eps) * gain + shift`` with mean and (biased) variance over the
block's n units. The output of the cell is the zoned-out ``h_t``, which is also the carried state.

Parameters: ``weight_x`` [4n, d] (W_x transposed), ``weight_h`` [4n, n],
``bias`` [4n] (redundant before LN, present in the authors' code), ``ln_gain``/``ln_shift`` [4n]
for LN4 and ``ln_c_gain``/``ln_c_shift`` [n] for LN_c: ``4n(d + n) + 14n`` in total.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import State

from .zoneout import combine_keep, zoneout


class LNLSTMConfig(CellConfig):
    """Options of ``ln_lstm``; defaults give the plain LN-LSTM (no zoneout)."""

    hidden_size: int = Field(128, ge=1, description="hidden units n (width of h and c)")
    forget_bias: float = Field(1.0, description="constant added to the forget-gate preactivation after LN4")
    zoneout_keep_h: float = Field(
        1.0, gt=0.0, le=1.0,
        description="authors' convention: probability that a unit of h takes its NEW value (1 = no zoneout; "
        "zoneout rate = 1 - this; FS-RNN PTB 0.9, enwik8 0.95)",
    )
    zoneout_keep_c: float = Field(
        1.0, gt=0.0, le=1.0,
        description="probability that a unit of c takes its NEW value (FS-RNN PTB 0.5, enwik8 0.7)",
    )
    ln_eps: float = Field(1e-3, gt=0.0, description="epsilon inside sqrt(var + eps) of every layer norm")
    pre_ln_bias: bool = Field(
        True, description="keep the redundant bias b before LN4 (the authors' code has it; 4n parameters)"
    )


class StepPlan(NamedTuple):
    """What :meth:`LNLSTMCell.plan_steps` prepares once per sequence."""

    shift: Tensor  #: LN4's shift with the forget bias added to the f block
    w_h_t: Tensor  #: W_h transposed, [n, 4n]
    w_x_t: Tensor | None  #: W_x transposed, [d, 4n] (None without an input matrix)


def block_layer_norm(a: Tensor, blocks: int, eps: float) -> Tensor:
    """Normalise each of ``blocks`` equal slices of the last dimension to mean 0, variance 1."""
    n = a.shape[-1] // blocks
    return F.layer_norm(a.unflatten(-1, (blocks, n)), (n,), eps=eps).flatten(-2)


class LNLSTMCell(StepCell):
    """Layer-normalised LSTM with per-tensor zoneout (eqs. 1-4 of the module docstring).

    ``input_size`` may be 0: the cell then owns no input matrix and ignores its (empty) input.
    Besides ``step`` it offers the protocol FS-RNN's fast path uses: ``plan_steps()`` once per
    sequence, ``project_inputs(x[..., d]) -> W_x x`` for all steps at once, and
    ``step_planned(u, state, plan, projected=...)`` (``u = None`` means a zero input).
    """

    config_class = LNLSTMConfig
    has_fast_path = True
    weight_roles: ClassVar[dict[str, tuple[str, ...]]] = {"input": ("weight_x",), "recurrent": ("weight_h",)}
    activation_roles: ClassVar[tuple[str, ...]] = ("gate", "candidate", "cell", "hidden")

    def __init__(self, input_size: int, config: LNLSTMConfig):
        super().__init__(input_size, config)
        n = config.hidden_size
        self.weight_x = nn.Parameter(torch.empty(4 * n, input_size)) if input_size > 0 else None
        self.weight_h = nn.Parameter(torch.empty(4 * n, n))
        self.bias = nn.Parameter(torch.zeros(4 * n)) if config.pre_ln_bias else None
        self.ln_gain = nn.Parameter(torch.ones(4 * n))
        self.ln_shift = nn.Parameter(torch.zeros(4 * n))
        self.ln_c_gain = nn.Parameter(torch.ones(n))
        self.ln_c_shift = nn.Parameter(torch.zeros(n))
        forget = torch.zeros(4 * n)
        forget[2 * n: 3 * n] = config.forget_bias  # the f block of the code's order i, j, f, o
        self.register_buffer("forget_bias_vector", forget, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal W_x and W_h (each as one matrix), zero bias, LN gains 1 and shifts 0."""
        with torch.no_grad():
            if self.weight_x is not None:
                nn.init.orthogonal_(self.weight_x)
            nn.init.orthogonal_(self.weight_h)
            for p in (self.bias, self.ln_shift, self.ln_c_shift):
                if p is not None:
                    p.zero_()
            self.ln_gain.fill_(1.0)
            self.ln_c_gain.fill_(1.0)

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        z = torch.zeros(batch_size, self.output_size, device=device, dtype=dtype or torch.float32)
        return (z, z.clone())

    # -- the equations ---------------------------------------------------------------------------
    def gate_preactivations(self, a: Tensor) -> Tensor:
        """Eq. 1 after the matrix products: LN4 of ``a = W_x u + W_h h + b`` then gain and shift."""
        return torch.addcmul(self.ln_shift, block_layer_norm(a, 4, self.config.ln_eps), self.ln_gain)

    def _shift_with_forget_bias(self) -> Tensor:
        """LN4's shift with the constant forget bias added to the f block (one add per step saved)."""
        return self.ln_shift + self.forget_bias_vector if self.config.forget_bias else self.ln_shift

    def _update(self, a: Tensor, state: State, shift: Tensor | None = None) -> tuple[Tensor, State]:
        """Eqs. 1-4 from the raw preactivation ``a`` [b, 4n] and the previous state.

        ``shift`` is :meth:`_shift_with_forget_bias` (passed in so a sequence computes it once).
        """
        h, c = state
        cfg = self.config
        q = self.quantize_activation
        n = h.shape[-1]
        shift = self._shift_with_forget_bias() if shift is None else shift
        pre = torch.addcmul(shift, block_layer_norm(a, 4, cfg.ln_eps), self.ln_gain)  # eq. 1 (+ forget bias)
        # the code's block order i, j, f, o; chunk (not slicing) keeps the backward to one concatenation
        i, _, f, o = q("gate", torch.sigmoid(pre)).chunk(4, dim=-1)
        j = q("candidate", torch.tanh(pre.chunk(4, dim=-1)[1]))
        c_new = q("cell", torch.addcmul(i * j, f, c))  # eq. 2
        c_norm = F.layer_norm(c_new, (n,), self.ln_c_gain, self.ln_c_shift, cfg.ln_eps)
        h_new = q("hidden", o * torch.tanh(c_norm))  # eq. 3
        h_out = zoneout(h, h_new, combine_keep(cfg.zoneout_keep_h, self.zoneout_prob), self.training)  # eq. 4
        c_out = zoneout(c, c_new, combine_keep(cfg.zoneout_keep_c, self.zoneout_prob), self.training)
        return h_out, (h_out, c_out)

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        """Reference step: ``a = W_x x_t + W_h h + b`` written out, then eqs. 1-4."""
        h = state[0]
        a = F.linear(h, self.weight_h)
        if self.weight_x is not None:
            a = a + F.linear(x_t, self.weight_x)
        if self.bias is not None:
            a = a + self.bias
        return self._update(a, state)

    def apply_zoneout(self, old: State, new: State) -> State:
        """Zoneout already happened inside ``step`` (with ``zoneout_prob`` folded in): no-op here."""
        return new

    # -- fast paths: weights prepared once per sequence, input products hoisted ------------------
    def plan_steps(self) -> StepPlan:
        """Per-sequence precomputation for :meth:`step_planned` (transposed and concatenated weights)."""
        w_x_t = None if self.weight_x is None else self.weight_x.t()
        return StepPlan(self._shift_with_forget_bias(), self.weight_h.t(), w_x_t)

    def project_inputs(self, x: Tensor) -> Tensor | None:
        """``W_x x`` for every step at once (``x`` [..., d]); None when there is no input matrix."""
        if self.weight_x is None:
            return None
        return F.linear(x, self.weight_x)

    def step_planned(self, u: Tensor | None, state: State, plan: StepPlan, *,
                     projected: bool = False) -> tuple[Tensor, State]:
        """:meth:`step` with prepared weights: ``u`` is a raw input (the same operations as
        ``step``), a projected one ``W_x u`` from :meth:`project_inputs` (``projected=True``),
        or None for a zero input (the product is skipped). Zoneout included, as in ``step``."""
        # the additions run in the order of ``step`` so both paths round alike
        a = state[0].mm(plan.w_h_t)
        if u is not None and plan.w_x_t is not None:
            a = a + (u if projected else u.mm(plan.w_x_t))
        if self.bias is not None:
            a = a + self.bias
        return self._update(a, state, plan.shift)

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """One input GEMM over all steps, then one recurrent ``addmm`` per step."""
        plan = self.plan_steps()
        p = self.project_inputs(x)
        steps = p.unbind(1) if p is not None else [None] * x.shape[1]
        ys = []
        for p_t in steps:  # unbind keeps the backward linear in T
            y, state = self.step_planned(p_t, state, plan, projected=True)
            ys.append(y)
        return torch.stack(ys, dim=1), state
