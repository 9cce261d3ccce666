"""Fast-Slow RNN (Mujika, Meier & Steger, NIPS 2017, https://arxiv.org/abs/1705.08639).

k >= 2 fast cells F1..Fk (same spec, separate weights) and one slow cell S, every one of them an
inner cell spec ``{name: ..., **options}`` built through the registry (default: ``ln_lstm``). One
time step, in the spec's order (``../shared/papers/fs_rnn.md`` section 1)::

    (1) h^F1_t = F1(h^Fk_{t-1}, x_t)         only F1 reads the input; its state is Fk's of step t-1
    (2) h^S_t  = S (h^S_{t-1},  h^F1_t)      S reads F1's new output of the same step
    (3) h^F2_t = F2(h^F1_t,     h^S_t)       F2 continues from F1's new state, reads the slow output
    (4) h^Fi_t = Fi(h^F(i-1)_t)  3 <= i <= k  no input (the authors feed a 1-wide zero vector)
    (5) y_t    = h^Fk_t                      the model's head reads Fk

The slow cell is updated every step (its slowness is learned, not clocked). Non-recurrent dropout
(rate ``dropout`` = 1 - the code's keep_prob, fresh mask every step) sits at four places: on x_t
before F1, on h^F1_t before S, on h^S_t before F2 and on h^Fk_t before the output; never on the
fast state handed from one fast cell to the next. The state is ``(fast_state, slow_state)``, e.g.
``((h_F, c_F), (h_S, c_S))`` with LSTM-like inner cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator
from torch import Tensor, nn

from seqplat import CellConfig, StepCell, build_cell
from seqplat.core.cell import Cell, State, flatten_state
from seqplat.core.config import format_validation_error
from seqplat.core.errors import SeqplatError
from seqplat.core.gemm import project_steps

from .fused import FSLNLSTMRecurrence, FusedPlan, cpp_loop, draw_masks, resolve_backend
from .ln_lstm import LNLSTMCell
from .zoneout import combine_keep


def _default_inner(hidden_size: int) -> dict[str, Any]:
    return {"name": "ln_lstm", "hidden_size": hidden_size, "zoneout_keep_h": 0.9, "zoneout_keep_c": 0.5}


def resolve_inner_spec(spec: Any, field: str) -> dict[str, Any]:
    """Validate an inner cell spec against the registry: the name exists, the cell can be stepped,
    and its options pass its config model. Returns the spec with defaults filled in."""
    from seqplat.registry import get_registry

    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{field}: needs an inner cell spec {{name: ..., <options>}}, e.g. {{name: ln_lstm}}")
    try:
        entry = get_registry().get("cell", spec["name"])
    except SeqplatError as exc:
        raise ValueError(f"{field}.name: {exc}") from exc
    cls = entry.obj
    if not getattr(cls, "supports_step", False):
        raise ValueError(
            f"{field}.name: cell '{spec['name']}' cannot be unrolled one step at a time (supports_step is "
            f"False), which FS-RNN needs to interleave its fast and slow cells; choose a cell that implements "
            f"step(), e.g. ln_lstm, lstm or gru"
        )
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        cfg = cls.config_class.model_validate(options)
    except ValidationError as exc:
        raise ValueError("; ".join(format_validation_error(exc, f"{field}."))) from None
    return {"name": spec["name"], **cfg.model_dump(mode="json")}


class FSRNNConfig(CellConfig):
    """Options of ``fs_rnn``: the inner cells, k, and the dropout of the four non-recurrent sites."""

    fast: dict[str, Any] = Field(
        default_factory=lambda: _default_inner(128),
        description="inner cell spec {name, options} of every fast cell F1..Fk (any registered cell that "
        "supports step(); default the paper's LN-LSTM with zoneout keep h 0.9 / c 0.5)",
    )
    slow: dict[str, Any] = Field(
        default_factory=lambda: _default_inner(128),
        description="inner cell spec {name, options} of the slow cell S",
    )
    num_fast: int = Field(2, ge=2, description="k, the number of fast cells (at least 2)")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="non-recurrent dropout rate (1 - the code's keep_prob) on x_t, h^F1 -> S, h^S -> F2 and "
        "h^Fk -> output",
    )
    inputless_width: int = Field(
        1, ge=0,
        description="input width of F3..Fk, fed zeros: 1 reproduces the authors' code (an unused 1 x 4n input "
        "matrix each, counted in the parameters); 0 builds them without input (the inner cell must accept "
        "input_size 0, as ln_lstm does)",
    )
    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="time loop with ln_lstm inner cells (the fused training path, and inference): 'cpp' "
        "(C++ kernel fs_rnn_cpu.cpp, built at first use), 'python' (torch ops, any device), 'auto' (cpp for "
        "float32/float64 CPU inputs when a compiler is present, else python)"
    )

    @field_validator("fast", "slow", mode="before")
    @classmethod
    def _inner(cls, v: Any, info: Any) -> dict[str, Any]:
        return resolve_inner_spec(v, info.field_name)


class FSRNNCell(StepCell):
    """Fast-Slow RNN around any steppable registered cell (eqs. 1-5 of the module docstring).

    ``step`` is the reference (all four dropout sites inside it). ``fast_forward`` does the same
    computation with the input and output dropout applied to whole sequences and, for inner cells
    that offer ``plan_steps``/``project_inputs``/``step_planned`` (``ln_lstm``), weights prepared
    once per sequence, F1's input product hoisted out of the time loop and the zero inputs of
    F3..Fk skipped. When every inner cell is an ``ln_lstm`` and gradients are on, ``fast_forward``
    runs the loop through :class:`~.fused.FSLNLSTMRecurrence` (hand-written backward, one
    weight-gradient GEMM per matrix), in C++ or in torch ops as ``config.backend`` says.
    """

    config_class = FSRNNConfig
    has_fast_path = True
    supports_step: ClassVar[bool] = True

    @classmethod
    def inner_cell_specs(cls, config: FSRNNConfig) -> list[dict[str, Any]]:  # type: ignore[override]
        """The fast and the slow cell specs (for the core's config-time checks)."""
        return [dict(config.fast), dict(config.slow)]

    def __init__(self, input_size: int, config: FSRNNConfig):
        super().__init__(input_size, config)
        k = config.num_fast
        f1 = self._build("fast", config.fast, input_size, "F1")
        slow = self._build("slow", config.slow, f1.output_size, "S")
        fast = [f1, self._build("fast", config.fast, slow.output_size, "F2")]
        hint = " (F3..Fk get inputless_width zero inputs; inputless_width=1 works with any cell)"
        fast += [self._build("fast", config.fast, config.inputless_width, f"F{i + 1}", hint) for i in range(2, k)]
        self.fast_cells = nn.ModuleList(fast)
        self.slow_cell = slow
        self._check_chain()
        # instance-level: a wrapper reads timestamps exactly when one of its inner cells does
        self.uses_time = any(c.uses_time for c in self.inner_cells())  # type: ignore[misc]
        #: train through the hand-written backward of :mod:`.fused` (False: autograd on the planned loop)
        self.explicit_backward = True

    @staticmethod
    def _build(field: str, spec: dict[str, Any], input_size: int, role: str, hint: str = "") -> Cell:
        try:
            return build_cell(spec, input_size)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(
                f"fs_rnn.{field}: cannot build {role} ('{spec['name']}') with input_size {input_size}{hint}: {exc}"
            ) from exc

    def _check_chain(self) -> None:
        """The fast state is handed F1 -> F2 -> ... -> Fk -> F1: every fast cell's state must match."""
        ref = [tuple(s.shape) for s in flatten_state(self.fast_cells[0].initial_state(1))]
        for i, cell in enumerate(self.fast_cells):
            shapes = [tuple(s.shape) for s in flatten_state(cell.initial_state(1))]
            if shapes != ref:
                raise ValueError(
                    f"fs_rnn.fast: F{i + 1} ('{self.config.fast['name']}', input_size {cell.input_size}) has "
                    f"state shapes {shapes} but F1 has {ref}; the fast state is passed from one fast cell to "
                    f"the next, so the fast cell's state must not depend on its input size"
                )

    def inner_cells(self) -> list[Cell]:
        """F1..Fk then S."""
        return [*self.fast_cells, self.slow_cell]

    @property
    def output_size(self) -> int:
        return int(self.fast_cells[-1].output_size)

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """``(fast_state, slow_state)``: zeros of F1's and S's own initial states."""
        return (self.fast_cells[0].initial_state(batch_size, device, dtype),
                self.slow_cell.initial_state(batch_size, device, dtype))

    # -- reference -------------------------------------------------------------------------------
    def _drop(self, x: Tensor) -> Tensor:
        p = self.config.dropout
        return F.dropout(x, p, True) if self.training and p > 0 else x

    @staticmethod
    def _advance(cell: Cell, x_t: Tensor, state: State, t: Tensor | None) -> tuple[Tensor, State]:
        """One step of an inner cell, with that cell's own (core) zoneout between steps."""
        y, new = cell.step(x_t, state, t=t)  # type: ignore[operator]
        zone = getattr(cell, "apply_zoneout", None)
        return y, (zone(state, new) if zone is not None else new)

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        """Reference step: F1 -> S -> F2 -> ... -> Fk with dropout at the four sites."""
        fast_state, slow_state = state
        f1, f2, *rest = self.fast_cells
        y, fast_state = self._advance(f1, self._drop(x_t), fast_state, t)  # eq. 1
        y_s, slow_state = self._advance(self.slow_cell, self._drop(y), slow_state, t)  # eq. 2
        y, fast_state = self._advance(f2, self._drop(y_s), fast_state, t)  # eq. 3
        if rest:
            zeros = x_t.new_zeros(x_t.shape[0], self.config.inputless_width)
            for cell in rest:  # eq. 4
                y, fast_state = self._advance(cell, zeros, fast_state, t)
        return self._drop(y), (fast_state, slow_state)  # eq. 5

    # -- fast path -------------------------------------------------------------------------------
    def _stepper(self, cell: Cell, zeros: Tensor, projected: bool = False) -> Callable[..., tuple[Tensor, State]]:
        """A per-sequence step function ``(u | None, state, t) -> (y, state)`` for one inner cell:
        the cell's ``step_planned`` with weights prepared once when it has one (``ln_lstm``),
        else its plain ``step`` (``u = None`` becomes the zero input)."""
        plan_steps = getattr(cell, "plan_steps", None)
        if callable(plan_steps):
            plan = plan_steps()
            step_planned = cell.step_planned  # type: ignore[operator]

            def planned(u: Tensor | None, state: State, t: Tensor | None) -> tuple[Tensor, State]:
                return step_planned(u, state, plan, projected=projected)

            return planned

        def plain(u: Tensor | None, state: State, t: Tensor | None) -> tuple[Tensor, State]:
            return self._advance(cell, zeros if u is None else u, state, t)

        return plain

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """Same equations with sequence-level dropout at the input and output, F1's input product
        hoisted out of the loop, LN4's shift and transposed weights prepared once, and the zero inputs of
        F3..Fk skipped, for inner cells that offer ``plan_steps`` (``ln_lstm``); others use ``step``.
        With every inner cell an ``ln_lstm``: with gradients the fused path (:meth:`_fused_forward`),
        without them the C++ forward loop alone when ``config.backend`` resolves to ``cpp``."""
        if self._fusable():
            if torch.is_grad_enabled():
                if self.explicit_backward:
                    return self._fused_forward(x, state)
            elif resolve_backend(self.config.backend, x) == "cpp":  # inference: the C++ loop, nothing kept
                return self._fused_forward(x, state, infer=True)
        fast_state, slow_state = state
        f1, f2, *rest = self.fast_cells
        zeros = x.new_zeros(x.shape[0], self.config.inputless_width)
        x = self._drop(x)  # site 1, all steps at once
        hoist = callable(getattr(f1, "plan_steps", None))
        p = f1.project_inputs(x) if hoist else None  # type: ignore[operator]
        inputs = (p if p is not None else x).unbind(1)
        step_f1 = self._stepper(f1, zeros, projected=p is not None)
        step_s = self._stepper(self.slow_cell, zeros)
        step_f2 = self._stepper(f2, zeros)
        step_rest = [self._stepper(c, zeros) for c in rest]
        steps_t = times.unbind(1) if times is not None else [None] * x.shape[1]
        ys = []
        for u, t in zip(inputs, steps_t, strict=True):
            y, fast_state = step_f1(u, fast_state, t)  # eq. 1
            y_s, slow_state = step_s(self._drop(y), slow_state, t)  # eq. 2
            y, fast_state = step_f2(self._drop(y_s), fast_state, t)  # eq. 3
            for step in step_rest:  # eq. 4
                y, fast_state = step(None, fast_state, t)
            ys.append(y)
        return self._drop(torch.stack(ys, dim=1)), (fast_state, slow_state)  # site 4, all steps at once

    # -- fused path: LN-LSTM inner cells, hand-written backward ----------------------------------
    def _fusable(self) -> bool:
        """Every inner cell a plain ``ln_lstm`` (no activation quantizers) and F1 with an input matrix."""
        cells = self.inner_cells()
        return (all(type(c) is LNLSTMCell and not c.activation_quantizers for c in cells)
                and self.fast_cells[0].weight_x is not None)  # type: ignore[union-attr]

    def _fused_forward(self, x: Tensor, state: State, infer: bool = False) -> tuple[Tensor, State]:
        """:meth:`fast_forward` through :class:`~.fused.FSLNLSTMRecurrence` (``infer``: through the C++
        forward loop alone, which keeps one step's buffers). Site 1 dropout first, then every zoneout and
        dropout mask drawn up front in the order the planned loop draws them."""
        (h_f, c_f), (h_s, c_s) = state
        f1, f2, *rest = self.fast_cells
        slow = self.slow_cell
        b, steps = x.shape[0], x.shape[1]
        x = self._drop(x)  # site 1, all steps at once
        cells: list[LNLSTMCell] = [f1, slow, f2, *rest]  # type: ignore[list-item]
        keeps = [(combine_keep(c.config.zoneout_keep_h, c.zoneout_prob),
                  combine_keep(c.config.zoneout_keep_c, c.zoneout_prob)) for c in cells]
        p = self.config.dropout if self.training else 0.0
        zone, drop2, drop3 = draw_masks(steps, b, [c.config.hidden_size for c in cells], keeps,
                                        [c.training for c in cells], p, x)
        # eq. 1's W_x x_t + b of all steps, [t, b, 4n]
        xp = project_steps(x, f1.weight_x, f1.bias)
        params: list[Tensor | None] = []
        for i, c in enumerate(cells):
            if i in (1, 2):  # S and F2: [W_x | W_h] against [u | h_prev]
                w, bias = torch.cat([c.weight_x, c.weight_h], dim=1), c.bias
            else:  # F1 (input product hoisted into xp) and the input-less F3..Fk
                w, bias = c.weight_h, (None if i == 0 else c.bias)
            params += [w, bias, c.ln_gain, c._shift_with_forget_bias(), c.ln_c_gain, c.ln_c_shift]
        plan = FusedPlan(self.config.num_fast, [c.config.ln_eps for c in cells], zone, drop2, drop3,
                         resolve_backend(self.config.backend, xp))
        if infer:
            ys, h_f, c_f, h_s, c_s = cpp_loop(xp, h_f, c_f, h_s, c_s, plan, params)[0]
        else:
            ys, h_f, c_f, h_s, c_s = FSLNLSTMRecurrence.apply(xp, h_f, c_f, h_s, c_s, plan, *params)
        y = ys.transpose(0, 1)
        if self.training and p > 0:  # batch-major like the planned path, so site 4 draws its mask alike
            y = y.contiguous()
        return self._drop(y), ((h_f, c_f), (h_s, c_s))  # site 4, all steps at once
