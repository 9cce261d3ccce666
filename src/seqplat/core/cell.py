"""The cell contract: a recurrent layer that maps a whole sequence to a sequence.

Shapes use the core legend: ``b`` batch, ``t`` time, ``d`` input features, ``h`` hidden.

* :class:`Cell` -- ``forward(x[b,t,d], state=None, *, times=None) -> (y[b,t,h], state)``. A cell
  implements ``reference_forward`` (plain PyTorch, the test oracle) and may implement
  ``fast_forward`` (hoisted projections, fused kernels, custom autograd). ``forward`` runs the fast
  path when the class sets ``has_fast_path = True`` and ``use_fast_path`` is on.
* :class:`StepCell` -- a cell written one step at a time: implement ``step(x_t, state, t=None)``;
  the core unrolls it (iterating over ``unbind`` so the backward stays linear in ``t``) and applies
  zoneout on the state for free.

A state is a tensor or a (nested) tuple of tensors, batch first. ``initial_state`` builds the
state a sequence starts from (zeros for most cells).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

State = Any  # Tensor | tuple[State, ...]


def map_state(fn: Callable[[Tensor], Tensor], state: State) -> State:
    """Apply ``fn`` to every tensor of a (nested tuple) state."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    return tuple(map_state(fn, s) for s in state)


def zip_state(fn: Callable[[Tensor, Tensor], Tensor], a: State, b: State) -> State:
    """Combine two states of the same structure tensor by tensor."""
    if isinstance(a, Tensor):
        return fn(a, b)
    return tuple(zip_state(fn, x, y) for x, y in zip(a, b, strict=True))


def flatten_state(state: State) -> list[Tensor]:
    """The tensors of a state in a fixed order (used by checkpoints)."""
    if state is None:
        return []
    if isinstance(state, Tensor):
        return [state]
    return [t for s in state for t in flatten_state(s)]


def unflatten_state(template: State, tensors: list[Tensor]) -> State:
    """Inverse of :func:`flatten_state` given a state of the same structure."""
    it = iter(tensors)

    def rebuild(s: State) -> State:
        if isinstance(s, Tensor):
            return next(it)
        return tuple(rebuild(x) for x in s)

    return rebuild(template)


def detach_state(state: State) -> State:
    """Cut the graph between consecutive chunks (truncated BPTT)."""
    return map_state(lambda t: t.detach(), state)


class CellConfig(BaseModel):
    """Base of every cell's config: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ZoneoutConfig(BaseModel):
    """Zoneout on a cell's state (Krueger et al. 2017), the option StepCells get for free."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prob: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a state unit keeps its previous value")


class Cell(nn.Module):
    """A recurrent layer over whole sequences. Subclass and set ``config_class``."""

    config_class: ClassVar[type[BaseModel]] = CellConfig
    #: reads per-step timestamps ``times[b,t]`` (Phased LSTM); the core refuses tasks without them
    uses_time: ClassVar[bool] = False
    #: the final state of one chunk may start the next (truncated BPTT on streams)
    supports_state_carry: ClassVar[bool] = True
    #: ``fast_forward`` exists and is tested against ``reference_forward``
    has_fast_path: ClassVar[bool] = False
    #: the cell can be unrolled one step at a time (wrapper cells such as SAB need this)
    supports_step: ClassVar[bool] = False
    #: a wrapper that advances its inner cells with their ``step`` (sab): ``compile=step`` compiles those
    #: steps even where the inner cell's own fast path is a fused kernel, since the wrapper never runs it
    drives_inner_steps: ClassVar[bool] = False
    #: quantization roles: weight parameter names and activation role names (see seqplat.Quantizer)
    weight_roles: ClassVar[dict[str, tuple[str, ...]]] = {}
    activation_roles: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def inner_cell_specs(cls, config: BaseModel) -> list[dict[str, Any]]:
        """The cell specs ``{name, ...options}`` a wrapper cell builds inside itself for ``config``.

        The core walks them at config time, so an incompatible inner cell (say, a time-aware cell on a
        task without timestamps) is refused before training starts. Plain cells have none.
        """
        return []

    def __init__(self, input_size: int, config: BaseModel):
        super().__init__()
        self.input_size = int(input_size)
        self.config = config
        self.use_fast_path = True
        self.zoneout_prob = 0.0
        #: activation quantizers installed by a Quantizer, keyed by role
        self.activation_quantizers: dict[str, Callable[[Tensor], Tensor]] = {}

    @property
    def output_size(self) -> int:
        """Width ``h`` of the outputs ``y``."""
        return int(self.config.hidden_size)  # type: ignore[attr-defined]

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """Zero state of the hidden size; override for tuples or other shapes."""
        return torch.zeros(batch_size, self.output_size, device=device, dtype=dtype or torch.float32)

    def forward(self, x: Tensor, state: State = None, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects x of shape [batch, time, {self.input_size}], got {tuple(x.shape)}"
            )
        if self.uses_time and times is None:
            raise ValueError(f"{type(self).__name__} needs per-step timestamps: pass times=[batch, time]")
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        if self.has_fast_path and self.use_fast_path and not self.activation_quantizers and self.zoneout_prob == 0:
            return self.fast_forward(x, state, times=times)
        return self.reference_forward(x, state, times=times)

    def reference_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """The plain PyTorch path, the oracle every fast path is tested against."""
        raise NotImplementedError(f"{type(self).__name__} must implement reference_forward")

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """An optional faster path with the same outputs and gradients as ``reference_forward``."""
        return self.reference_forward(x, state, times=times)

    def step_compile_target(self) -> str | None:
        """The method that ``train.compile=step`` compiles: the one the plain loop calls once per time step.

        Return its attribute name, or None (the default) when the cell has none to compile (a fused
        or custom sequence kernel). The compiled function is set as an instance attribute of that
        name and the fast path is switched off, so ``reference_forward`` must call ``self.<name>``
        once per step (see :mod:`seqplat.core.compiling`).
        """
        return None

    def quantize_activation(self, role: str, value: Tensor) -> Tensor:
        """Pass ``value`` through the quantizer installed for ``role``, if any."""
        q = self.activation_quantizers.get(role)
        return value if q is None else q(value)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, output_size={self.output_size}"


class StepCell(Cell):
    """A cell written one step at a time; the core unrolls it.

    Implement ``step(x_t[b,d], state, t=None) -> (y_t[b,h], state)``. Zoneout (``zoneout_prob``)
    is applied to the state between steps: in training each unit keeps its previous value with
    probability ``p``; in evaluation the state is the expected mix ``p*old + (1-p)*new``.
    """

    supports_step: ClassVar[bool] = True
    #: the fast path is one fused sequence kernel (torch's RNN modules): ``compile=step`` leaves it on
    fused_kernel: ClassVar[bool] = False

    def step_compile_target(self) -> str | None:
        """``"step"`` when the core's loop runs this cell (``reference_forward`` not overridden) and its
        fast path is not a fused kernel; a cell with its own loop names its per-step method itself."""
        if self.fused_kernel or type(self).reference_forward is not StepCell.reference_forward:
            return None
        return "step"

    def step(self, x_t: Tensor, state: State, *, t: Tensor | None = None) -> tuple[Tensor, State]:
        raise NotImplementedError(f"{type(self).__name__} must implement step")

    def apply_zoneout(self, old: State, new: State) -> State:
        p = self.zoneout_prob
        if p <= 0.0:
            return new
        if self.training:
            return zip_state(lambda o, n: torch.where(torch.rand_like(n) < p, o, n), old, new)
        return zip_state(lambda o, n: p * o + (1.0 - p) * n, old, new)

    def reference_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        steps_t = times.unbind(1) if times is not None else [None] * x.shape[1]
        ys = []
        for x_t, t in zip(x.unbind(1), steps_t, strict=True):  # unbind keeps the backward linear in T
            y_t, new_state = self.step(x_t, state, t=t)
            state = self.apply_zoneout(state, new_state)
            ys.append(y_t)
        return torch.stack(ys, dim=1), state
