"""Sparse Attentive Backtracking (Ke et al., NeurIPS 2018, https://arxiv.org/abs/1809.03702).

SAB wraps a step-capable recurrent cell (``inner``, default the baselines' ``lstm``) with a memory
of macro-states and a sparse read of it. One step ``t`` (0-based, counted over the whole stream)::

    (1) cut     before step t: (h_{t-1}, c_{t-1}) <- detached copies   when t starts a k_trunc window
    (2) cell    (h^_t, c_t) = inner.step(x_t, (h_{t-1}, c_{t-1}))
    (3) score   a_{t,i} = score(h^_t, m_i)  for every memory slot i          (scorer)
    (4) sparse  delta = (k_top+1)-th largest a_{t,i};  w_i = relu(a_i - delta) / sum_j relu(a_j - delta)
    (5) read    s_t = sum_i w_{t,i} m_i
    (6) join    h_t = h^_t + s_t   (the recurrent state; c_t is left as it is)
    (7) write   M <- M + [h_t]   when (t+1) mod k_att == 0   (h_t not detached)
    (8) output  y_t = [h_t; s_t]  (``output = "state_and_summary"``) or h_t

Scorers (3): ``mlp`` is ``v^T tanh(W_q h^_t + W_m m_i + b)`` (state-dependent, the paper's MLP);
``official`` is the release's ``w^T tanh([h^_t; m_i])``, which separates into a term of h^_t that
every slot shares plus a per-slot salience, so once ``|M| > k_top`` its weights ignore h^_t.

Sparsifiers (4): ``paper`` as written above (exactly ``k_top`` weights, summing to one);
``official`` uses ``delta = k_top-th largest + eps`` and ``w = relu(a - delta) / (sum + eps)``, which
keeps only ``k_top - 1`` weights (none for ``k_top = 1``). When ``|M| <= k_top`` there is no
threshold: ``small_memory = "softmax"`` normalises all scores densely, ``"raw"`` uses the raw
scores unnormalised as the release does.

Backward. Autograd sees the detaches of (1) and nothing else: the local path ends at the window
start, while a read (5) links h_t to every selected slot m_i, i.e. to the step that wrote it, whose
own local window and reads continue the chain. Unselected slots get no gradient (zero weight,
inactive rectifier); the threshold slot gets gradient through delta unless ``detach_threshold``.

With ``k_top = 0`` there is no read and nothing is written: the cell is its inner cell trained with
truncated BPTT in ``k_trunc`` windows (the paper's TBPTT baseline).

State and memory. The carried state is ``(inner_state, memory[b, S, h], step[b])``: the memory is a
ring of ``S = memory_size`` slots (the oldest is overwritten when full) and ``step`` counts the steps
already run, which fixes the windows of (1), the writes of (7) and the ring position. So a stream
cut into chunks gives exactly the outputs of one long run (a trainer that detaches the carried
state between chunks stops gradients into earlier chunks, memories included).

Paths. ``reference_forward`` is plain autograd (memory and keys as single tensors, see
``memory.DenseMemory`` and ``attention.DenseKeys``); ``fast_forward`` routes memory gradients to the
few selected slots only (``memory.ChainMemory``) and, with the MLP scorer, recomputes the score
activations in the backward (``attention.BlockedKeys``). With the baselines' ``lstm`` as inner cell and
the MLP scorer on CPU, ``fast_forward`` runs the whole loop in C++ instead (``fused.py``, ``sab_cpu.cpp``).
All give the same values and gradients.

Shapes: b batch, t time, d input, h hidden, n memories in use, k k_top, S memory capacity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from seqplat import Cell, State, StepCell, build_cell, detach_state
from seqplat.core.cell import flatten_state, unflatten_state

from .attention import BlockedKeys, DenseKeys, MLPScorer, OfficialScorer, sparse_weights
from .config import SABConfig
from .fused import applies as sab_loop_applies
from .fused import sab_loop
from .memory import ChainMemory, DenseMemory

__all__ = ["SABCell"]


# -- the cell ------------------------------------------------------------------------------------------

class SABCell(Cell):
    """Sparse Attentive Backtracking around any registered step cell (see the module docstring)."""

    config_class = SABConfig
    supports_state_carry = True
    supports_step = False
    drives_inner_steps = True  # the loop below calls inner.step: compile=step compiles that
    #: the fast path routes memory gradients sparsely (memory.ChainMemory) and scores with the MLP scorer
    #: without saving tanh activations (attention.BlockedKeys)
    has_fast_path = True

    @classmethod
    def inner_cell_specs(cls, config: SABConfig) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner cell's spec (for the core's config-time checks)."""
        return [config.inner_spec()]

    def __init__(self, input_size: int, config: SABConfig):
        super().__init__(input_size, config)
        self.inner = build_cell(config.inner_spec(), input_size)
        if not self.inner.supports_step:
            raise ValueError(f"sab: inner cell '{config.inner['name']}' cannot be unrolled one step at a time")
        self.uses_time = self.inner.uses_time  # type: ignore[misc]  # a time-aware inner cell needs times
        self.hidden = int(self.inner.output_size)
        if config.scorer == "official":
            self.scorer: OfficialScorer | MLPScorer = OfficialScorer(self.hidden)
        else:
            self.scorer = MLPScorer(self.hidden, config.score_size or self.hidden)
        #: when True, ``forward`` appends one record per step to ``trace`` (tests and plots)
        self.record_trace = False
        self.trace: list[dict[str, Any]] = []

    @property
    def output_size(self) -> int:
        return 2 * self.hidden if self.config.output == "state_and_summary" else self.hidden

    def initial_state(self, batch_size: int, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> State:
        """``(inner initial state, memory zeros[b, S, h], step zeros[b])``."""
        dtype = dtype or torch.float32
        memory = torch.zeros(batch_size, self.config.memory_size, self.hidden, device=device, dtype=dtype)
        step = torch.zeros(batch_size, dtype=torch.long, device=device)
        return (self.inner.initial_state(batch_size, device, dtype), memory, step)

    # -- schedule: all decided by the global step index t ----------------------------------------
    def cuts_before(self, t: int) -> bool:
        """Whether the local path is cut (the inner state detached) before step ``t``."""
        k = self.config.k_trunc
        if not k:  # 0 or None: full BPTT
            return False
        if self.config.truncation == "official":
            return (t + 1) % k == 0
        return t > 0 and t % k == 0

    def writes_after(self, t: int) -> bool:
        """Whether ``h_t`` is written into memory (eq. 7)."""
        return (t + 1) % self.config.k_att == 0

    def writes_before(self, t: int) -> int:
        """Slots written before step ``t`` (the ``h_0`` slot counts as one)."""
        return int(bool(self.config.zero_slot)) + t // self.config.k_att

    # -- forward ------------------------------------------------------------------------------------
    def reference_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """Plain autograd over the unrolled loop (memory and keys as single tensors)."""
        return self._unroll(x, state, times, fast=False)

    def fast_forward(self, x: Tensor, state: State, *, times: Tensor | None = None) -> tuple[Tensor, State]:
        """The same loop with sparse memory gradients and (MLP scorer) blocked, recomputed scores."""
        return self._unroll(x, state, times, fast=True)

    def _unroll(self, x: Tensor, state: State, times: Tensor | None, fast: bool) -> tuple[Tensor, State]:
        cfg = self.config
        inner_state, memory, step = state
        t0 = int(step[0])
        if bool((step != t0).any()):
            raise ValueError(f"sab: every batch row must be at the same step of its stream, got steps {step.tolist()}")
        if fast and sab_loop_applies(self, x, times):  # the whole loop in C++ (fused.py)
            y, inner_state, memory = sab_loop(self, x, inner_state, memory, t0)
            return y, (inner_state, memory, step + x.shape[1])
        size = memory.shape[1]
        written = self.writes_before(t0)
        keys: DenseKeys | BlockedKeys | None = None
        store: DenseMemory | ChainMemory | None = None
        if cfg.k_top > 0:
            blocked = fast and isinstance(self.scorer, MLPScorer)
            keys = BlockedKeys(self.scorer, memory) if blocked else DenseKeys(self.scorer, memory)  # type: ignore[arg-type]
            store = ChainMemory(memory) if fast else DenseMemory(memory)
        steps_t = times.unbind(1) if times is not None else [None] * x.shape[1]
        hidden_index = cfg.hidden_state_index
        ys = []
        for i, (x_t, time_t) in enumerate(zip(x.unbind(1), steps_t, strict=True)):
            t = t0 + i
            if self.cuts_before(t):  # (1)
                inner_state = detach_state(inner_state)
            y_hat, new_state = self.inner.step(x_t, inner_state, t=time_t)  # (2)
            flat = flatten_state(new_state)
            if hidden_index is None:
                hidden_index = self._find_hidden(y_hat, flat)
            elif hidden_index >= len(flat) or flat[hidden_index].shape != y_hat.shape:
                raise ValueError(
                    f"sab: hidden_state_index={hidden_index} does not name a state tensor shaped like the inner "
                    f"output {tuple(y_hat.shape)} (state shapes {[tuple(s.shape) for s in flat]})"
                )
            s = self._read(y_hat, store, keys, min(written, size), t)  # (3)-(5)
            h = y_hat + s  # (6), out of place
            flat[hidden_index] = h
            new_state = unflatten_state(new_state, flat)
            if isinstance(self.inner, StepCell):
                new_state = self.inner.apply_zoneout(inner_state, new_state)
            if store is not None and keys is not None and self.writes_after(t):  # (7); k_top = 0: no memory
                pos = written % size  # the ring overwrites the oldest slot when full
                store.write(pos, h)
                keys.write(pos, h)
                if self.record_trace:
                    self.trace[-1]["write_slot"] = written % size
                written += 1
            ys.append(torch.cat([h, s], -1) if cfg.output == "state_and_summary" else h)  # (8)
            inner_state = new_state
        memory = store.final() if store is not None else memory
        return torch.stack(ys, 1), (inner_state, memory, step + x.shape[1])

    def _find_hidden(self, y_hat: Tensor, flat: list[Tensor]) -> int:
        """The inner state tensor that is the step's output (it receives the summary)."""
        for j, s in enumerate(flat):
            if s is y_hat:
                return j
        equal = [j for j, s in enumerate(flat) if s.shape == y_hat.shape and torch.equal(s, y_hat)]
        if len(equal) == 1:
            return equal[0]
        raise ValueError(
            f"sab: cannot tell which state tensor of inner cell '{self.config.inner['name']}' is its output "
            f"({len(equal)} state tensors equal it; state shapes {[tuple(s.shape) for s in flat]}); set sab's "
            "hidden_state_index"
        )

    def _read(self, y_hat: Tensor, store: DenseMemory | ChainMemory | None, keys: DenseKeys | BlockedKeys | None,
              n: int, t: int) -> Tensor:
        """Summary ``s_t[b, h]`` of the first ``n`` memory slots (eqs. 3-5)."""
        cfg = self.config
        if store is None or keys is None or n == 0:
            if self.record_trace:
                self.trace.append({"t": t, "slots": None, "weights": None, "n": n})
            return torch.zeros_like(y_hat)
        a = keys.scores(self.scorer.query(y_hat), n)  # (3) [b, n]
        w, idx = sparse_weights(a, cfg.k_top, cfg.sparsifier, cfg.small_memory,  # (4)
                                cfg.detach_threshold, cfg.epsilon)
        if idx is None:
            idx = torch.arange(n, device=a.device).expand(a.shape[0], n)
        if self.record_trace:
            self.trace.append({"t": t, "slots": idx.detach().clone(), "weights": w.detach().clone(), "n": n,
                               "scores": a.detach().clone()})
        return store.read(w, idx)  # (5)

    def extra_repr(self) -> str:
        c = self.config
        return (f"k_att={c.k_att}, k_top={c.k_top}, k_trunc={c.k_trunc}, memory_size={c.memory_size}, "
                f"scorer={c.scorer}, sparsifier={c.sparsifier}")
