"""Dilated RNN (Chang et al., NeurIPS 2017, https://arxiv.org/abs/1710.02224) around any registered cell.

Layer ``l`` (1..L) has dilation ``s_l`` and an inner cell ``f_l`` built through the registry::

    h[l]_t = f_l( x[l]_t , state[l]_{t - s_l} )        x[1]_t = u_t,  x[l]_t = h[l-1]_t      (eq. 1)
    state[l]_{t - s_l} = initial state  when t - s_l < 0                                       (eq. 2)

so a layer is ``s_l`` independent chains, one per phase ``t mod s_l``. With ``s_l = M ** (l-1+l0)``
and ``l0 > 0`` the first dilation ``d0 = M ** l0`` is above one and the top layer only links times
``d0`` apart; the paper then reads the last ``d0`` top outputs together (a final ``1 x d0``
convolution). Here that is ``concat_outputs``: the output at ``t`` is ``[h[L]_{t-d0+1}; ...; h[L]_t]``
and the task's linear head is the convolution's weights (eq. 3).

Two paths with the same outputs and gradients:

* ``fast_forward`` folds time into the batch (spec section 2). With ``T = q*s + r``, the ``q``
  complete rounds are reshaped ``x[b, q*s, d] -> x[s*b, q, d]`` (row block ``j`` = phase ``j``,
  times ``j, j+s, ...``; :func:`fold_time`, which pads at the end for any length) and the inner
  cell's whole-sequence forward (its fused kernel) runs once over them. When ``s`` does not divide
  ``T`` the ``r`` real steps of the partial round (phases ``0..r-1``) run as one extra one-step
  call instead of stepping end padding through the cell: same outputs, and the carried states are
  exact for any inner cell (not only those whose output is their state).
* ``reference_forward`` is the naive per-step loop with skip connections of eq. 1, calling the
  inner cell's reference path one step at a time; it is the test oracle.

State carry. A layer's state is the inner states of its last ``s`` time steps, oldest first, each
inner state tensor laid out ``[b, s, ...]`` (batch first). The next chunk's phase ``j`` starts from
entry ``j`` whatever the previous chunk's length was, so a chunk length that is not a multiple of
``s`` (which shifts the phases) still gives exactly one long run. With ``concat_outputs`` the last
``d0 - 1`` top outputs are carried too.

Shapes: b batch, t time, d input features, h hidden, s dilation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from seqplat import Cell, State, build_cell, map_state
from seqplat.core.cell import flatten_state, unflatten_state

from .config import DilatedRNNConfig

__all__ = ["DilatedRNNCell", "fold_time", "unfold_time"]


# -- fold time into the batch (phase-major layout) -------------------------------------------------

def fold_time(x: Tensor, dilation: int) -> Tensor:
    """``x[b, t, ...] -> [s*b, ceil(t/s), ...]``, padded with zeros at the end of time.

    Row ``j*b + i`` holds sample ``i``'s phase ``j``: times ``j, j+s, j+2s, ...`` (so block ``j``
    equals ``x[:, j::s]`` where that has ``ceil(t/s)`` steps).
    """
    s = dilation
    b, t = x.shape[:2]
    rest = x.shape[2:]
    n = -(-t // s)
    if n * s != t:
        pad = x.new_zeros(b, n * s - t, *rest)
        x = torch.cat([x, pad], dim=1)
    # one copy into time-major memory [n, s*b, ...], returned as its batch-first view: a fused RNN
    # (nn.GRU/nn.LSTM with batch_first) transposes its input to time-major, which is then free
    x = x.reshape(b, n, s, *rest).movedim(0, 2)  # [n, s, b, ...]
    return x.reshape(n, s * b, *rest).transpose(0, 1)


def unfold_time(y: Tensor, dilation: int, length: int) -> Tensor:
    """Inverse of :func:`fold_time`: ``y[s*b, n, ...] -> [b, length, ...]`` (padding dropped)."""
    s = dilation
    sb, n = y.shape[:2]
    rest = y.shape[2:]
    b = sb // s
    if y.dim() >= 2 and y.transpose(0, 1).is_contiguous():  # time-major memory (a fused RNN's output)
        y = y.transpose(0, 1).reshape(n, s, b, *rest).movedim(2, 0)  # [b, n, s, ...]
    else:
        y = y.reshape(s, b, n, *rest).movedim(0, 2)  # [b, n, s, ...]
    y = y.reshape(b, n * s, *rest)  # time index k*s + j
    return y if length == n * s else y[:, :length]


def _state_to_folded(state: State, dilation: int) -> State:
    """Carried layer state ``[b, s, ...]`` -> the inner cell's batch ``[s*b, ...]`` (phase-major)."""
    return map_state(lambda z: z.transpose(0, 1).reshape(dilation * z.shape[0], *z.shape[2:]), state)


def _state_from_folded(state: State, dilation: int) -> State:
    """Inner states ``[s*b, ...]`` (phase-major) -> carried layer state ``[b, s, ...]``."""
    return map_state(
        lambda z: z.reshape(dilation, z.shape[0] // dilation, *z.shape[1:]).transpose(0, 1).contiguous(), state
    )


def _rows(state: State, start: int, stop: int | None = None) -> State:
    return map_state(lambda z: z[start:stop], state)


def _cat_rows(a: State, b: State) -> State:
    parts_a, parts_b = flatten_state(a), flatten_state(b)
    return unflatten_state(a, [torch.cat([x, y], dim=0) for x, y in zip(parts_a, parts_b, strict=True)])


def _stack_phases(states: list[State]) -> State:
    """Per-time inner states ``[b, ...]`` (oldest first) -> carried layer state ``[b, s, ...]``."""
    columns = zip(*(flatten_state(s) for s in states), strict=True)
    return unflatten_state(states[0], [torch.stack(list(c), dim=1) for c in columns])


def _run_inner(cell: Cell, x: Tensor, state: State, times: Tensor | None, fast: bool) -> tuple[Tensor, State]:
    """Call ``cell`` on ``x[b, t, d]``, on its fast path or forcing its reference path."""
    times = times if cell.uses_time else None
    if fast:
        return cell(x, state, times=times)
    previous = cell.use_fast_path
    cell.use_fast_path = False
    try:
        return cell(x, state, times=times)
    finally:
        cell.use_fast_path = previous


# -- the cell -----------------------------------------------------------------------------------------

class DilatedRNNCell(Cell):
    """A stack of dilated layers (dilations 1, 2, 4, ... or any list) around any registered cell."""

    config_class = DilatedRNNConfig
    has_fast_path = True
    supports_state_carry = True

    @classmethod
    def inner_cell_specs(cls, config: DilatedRNNConfig) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner cell spec of every layer (for the core's config-time checks)."""
        return [config.layer_spec(i) for i in range(len(config.layer_dilations))]

    def __init__(self, input_size: int, config: DilatedRNNConfig):
        super().__init__(input_size, config)
        self.dilations: tuple[int, ...] = tuple(config.layer_dilations)
        self.layers = nn.ModuleList()
        width = self.input_size
        for layer in range(len(self.dilations)):
            inner = build_cell(config.layer_spec(layer), width)
            self.layers.append(inner)
            width = inner.output_size
        self.top_size = width
        #: how many top outputs the output at t concatenates (eq. 3): d0 when concat_outputs, else 1
        self.head_window = self.dilations[0] if config.concat_outputs else 1
        # an inner cell that reads timestamps makes the wrapper read them (times are folded like x)
        self.uses_time = any(c.uses_time for c in self.layers)  # type: ignore[misc]

    @property
    def output_size(self) -> int:
        return self.head_window * self.top_size

    # zoneout (a documented cell option set by regularizers) is handed to the inner cells, which
    # apply it to their own state, i.e. between step t - s_l and step t of each chain
    @property
    def zoneout_prob(self) -> float:  # type: ignore[override]
        return 0.0 if self.__dict__.get("_in_forward") else float(self.__dict__.get("_zoneout", 0.0))

    @zoneout_prob.setter
    def zoneout_prob(self, p: float) -> None:
        self.__dict__["_zoneout"] = float(p)
        for cell in self.__dict__.get("_modules", {}).get("layers", []):
            cell.zoneout_prob = float(p)

    def forward(self, x: Tensor, state: State = None, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """As :meth:`Cell.forward`; zoneout on the wrapper does not force the naive loop since the
        inner cells apply it."""
        self.__dict__["_in_forward"] = True
        try:
            return super().forward(x, state, times=times)
        finally:
            self.__dict__["_in_forward"] = False

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """Per layer the inner initial state of every phase ``[b, s, ...]``; then, with a head
        window ``d0 > 1``, ``d0 - 1`` zero top outputs ``[b, d0-1, h]``."""
        states: list[State] = []
        for cell, s in zip(self.layers, self.dilations, strict=True):
            states.append(_state_from_folded(cell.initial_state(s * batch_size, device, dtype), s))
        if self.head_window > 1:
            states.append(torch.zeros(batch_size, self.head_window - 1, self.top_size,
                                      device=device, dtype=dtype or torch.float32))
        return tuple(states)

    # -- paths -------------------------------------------------------------------------------------
    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        return self._forward(x, state, times, self._folded_layer)

    def reference_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        return self._forward(x, state, times, self._naive_layer)

    def _forward(self, x: Tensor, state: State, times: Tensor | None, layer_fn: Any) -> tuple[Tensor, State]:
        new_states: list[State] = []
        for i, (cell, s) in enumerate(zip(self.layers, self.dilations, strict=True)):
            x, layer_state = layer_fn(cell, s, x, state[i], times)
            new_states.append(layer_state)
        if self.head_window > 1:
            x, buffer = self._concat_head(x, state[len(self.layers)])
            new_states.append(buffer)
        return x, tuple(new_states)

    def _folded_layer(self, cell: Cell, s: int, x: Tensor, state: State,
                      times: Tensor | None) -> tuple[Tensor, State]:
        """One layer by folding time into the batch: one inner call over the ``q`` complete rounds
        (batch ``s*b``, ``q`` steps) and, when ``s`` does not divide ``t``, one one-step call over the
        ``r`` real steps of the partial round (the end padding of :func:`fold_time` is never run)."""
        b, t = x.shape[:2]
        q, r = divmod(t, s)
        times = times if cell.uses_time else None
        x_main, x_tail = x.split([q * s, r], dim=1)
        t_main, t_tail = times.split([q * s, r], dim=1) if times is not None else (None, None)
        init = _state_to_folded(state, s)  # row block j starts phase j
        pieces: list[Tensor] = []
        if q > 0:
            y_main, s_main = _run_inner(cell, fold_time(x_main, s), init,
                                        None if t_main is None else fold_time(t_main, s), fast=True)
            pieces.append(unfold_time(y_main, s, q * s))  # s_main block j: the state after time (q-1)*s + j
        else:
            s_main = init
        if r == 0:  # s divides t (t == 0 gives an empty output)
            y = pieces[0] if pieces else x.new_zeros(b, 0, cell.output_size)
            return y, _state_from_folded(s_main, s)
        # the partial round: phases 0..r-1 take one more step, rows j*b + i = x[i, q*s + j]
        d = x.shape[2]
        y_tail, s_tail = _run_inner(cell, x_tail.transpose(0, 1).reshape(r * b, 1, d), _rows(s_main, 0, r * b),
                                    None if t_tail is None else t_tail.transpose(0, 1).reshape(r * b, 1), fast=True)
        pieces.append(y_tail.reshape(r, b, -1).transpose(0, 1))  # [b, r, h]
        y = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        # the last s states, oldest first: times t-s..t-r-1 are phases r..s-1 of the complete rounds,
        # times t-r..t-1 the partial round's phases 0..r-1
        carried = _cat_rows(_rows(s_main, r * b), s_tail)
        return y, _state_from_folded(carried, s)

    def _naive_layer(self, cell: Cell, s: int, x: Tensor, state: State,
                     times: Tensor | None) -> tuple[Tensor, State]:
        """One layer as the per-step loop of eq. 1: step t starts from the state of step t - s."""
        history: list[State] = [map_state(lambda z, k=k: z[:, k], state) for k in range(s)]  # times -s..-1
        ys = []
        for step, x_t in enumerate(x.split(1, dim=1)):
            t_t = None if times is None else times[:, step : step + 1]
            y_t, new = _run_inner(cell, x_t, history[step], t_t, fast=False)
            ys.append(y_t)
            history.append(new)
        return torch.cat(ys, dim=1), _stack_phases(history[-s:])

    def _concat_head(self, y: Tensor, buffer: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 3: the output at t is the top outputs at t-d0+1..t concatenated, oldest first."""
        w = self.head_window
        b, t, h = y.shape
        ext = torch.cat([buffer.to(y.dtype), y], dim=1)  # [b, w-1+t, h]
        windows = ext.unfold(1, w, 1)  # [b, t, h, w]: window k holds times t-w+1+k (faster than w slices)
        out = windows.permute(0, 1, 3, 2).reshape(b, t, w * h)
        return out, ext[:, t:]

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, dilations={list(self.dilations)}, output_size={self.output_size}"
