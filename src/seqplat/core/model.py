"""SequenceModel = task encoder -> stack of cells (dropout between) -> task head, from config alone."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from seqplat.core.cell import Cell, State
from seqplat.core.config import ModelConfig, RunConfig, component_config
from seqplat.core.errors import ConfigError, SeqplatError
from seqplat.core.task import Task


def build_cell(spec: dict[str, Any] | str, input_size: int, registry: Any | None = None) -> Cell:
    """Build a registered cell from ``{name: ..., <options>}`` (or a bare name) for ``input_size`` inputs.

    Wrapper cells call this to build their inner cells, so they work with any registered cell.
    """
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    if isinstance(spec, str):
        spec = {"name": spec}
    cls = reg.get("cell", spec["name"]).obj
    cfg = component_config("cell", spec, reg)
    return cls(input_size, cfg)


def build_task(spec: dict[str, Any] | str, registry: Any | None = None) -> Task:
    """Build a registered task from ``{name: ..., <options>}``."""
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    if isinstance(spec, str):
        spec = {"name": spec}
    cls = reg.get("task", spec["name"]).obj
    task = cls(component_config("task", spec, reg))
    task.name = spec["name"]
    return task


class SequenceModel(nn.Module):
    """Encoder, ``num_layers`` cells and a head; ``forward`` returns head outputs and the new state.

    The state of the stack is a tuple with one entry per layer.
    """

    def __init__(self, task: Task, cell_spec: dict[str, Any], cfg: ModelConfig, registry: Any | None = None):
        super().__init__()
        self.task_head_kind = task.head_kind
        self.tokens = task.vocab_size is not None
        self.encoder, width = task.build_encoder(cfg.embedding_size)
        self.input_dropout = nn.Dropout(cfg.input_dropout)
        self.cells = nn.ModuleList()
        for _ in range(cfg.num_layers):
            cell = build_cell(cell_spec, width, registry)
            self.cells.append(cell)
            width = cell.output_size
        self.dropout = nn.Dropout(cfg.dropout)
        self.output_dropout = nn.Dropout(cfg.output_dropout)
        self.head = task.build_head(width)
        self.uses_time = any(c.uses_time for c in self.cells)
        if cfg.tie_weights:
            if not self.tokens or not isinstance(self.encoder, nn.Embedding) or not isinstance(self.head, nn.Linear):
                raise ConfigError("model.tie_weights: needs a token task (embedding input, linear output layer)")
            if self.encoder.embedding_dim != width:
                raise ConfigError(
                    f"model.tie_weights: embedding_size ({self.encoder.embedding_dim}) must equal the last cell's "
                    f"output size ({width})"
                )
            self.head.weight = self.encoder.weight

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> tuple[State, ...]:
        return tuple(c.initial_state(batch_size, device) for c in self.cells)

    def features(self, inputs: Tensor, state: tuple[State, ...] | None = None,
                 times: Tensor | None = None) -> tuple[Tensor, tuple[State, ...]]:
        """Outputs of the last cell ``[b,t,h]`` and the new state."""
        x = self.input_dropout(self.encoder(inputs))
        states = list(state) if state is not None else [None] * len(self.cells)
        for i, cell in enumerate(self.cells):
            if i > 0:
                x = self.dropout(x)
            x, states[i] = cell(x, states[i], times=times)
        return x, tuple(states)

    def forward(self, inputs: Tensor, state: tuple[State, ...] | None = None,
                times: Tensor | None = None, return_hidden: bool = False) -> Any:
        """Head outputs and the new state (and the last cell's outputs ``[b,t,h]`` if asked)."""
        hidden, state = self.features(inputs, state, times)
        y = hidden[:, -1] if self.task_head_kind == "last_step" else hidden
        out = self.head(self.output_dropout(y))
        return (out, state, hidden) if return_hidden else (out, state)


def build_model(run: RunConfig, task: Task | None = None, registry: Any | None = None) -> SequenceModel:
    """Build the model a run config describes (on CPU, seeded by the caller)."""
    task = task or build_task(run.task, registry)
    _check_parameters_fit(run, task, registry)
    model = SequenceModel(task, run.cell, run.model, registry)
    from seqplat.core.quantize import apply_quantizer
    from seqplat.core.regularize import apply_regularizers

    apply_regularizers(model, run.regularizers, registry)
    if run.quantizer is not None:
        apply_quantizer(model, run.quantizer, registry)
    return model


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (Linux ``MemAvailable``; total RAM elsewhere), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _check_parameters_fit(run: RunConfig, task: Task, registry: Any | None) -> None:
    """Refuse a model whose parameters alone exceed the free memory, before allocating anything.

    The model is first built on the ``meta`` device (shapes, no storage). Without this, a typo like
    ``cell.hidden_size=40000`` asks the allocator for tens of GB and the OS kills the process.
    """
    available = available_memory_bytes()
    if available is None:
        return
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            meta = SequenceModel(task, run.cell, run.model, registry)
    except SeqplatError:
        raise
    except Exception:  # a cell that cannot be built on the meta device is left to the real build
        return
    tensors = {id(t): t for t in [*meta.parameters(), *meta.buffers()]}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    if need > available:
        raise ConfigError(
            f"cell.hidden_size / model.num_layers / model.embedding_size: the model would have "
            f"{count_parameters(meta):,} parameters ({need / 2**30:.1f} GiB), more than the "
            f"{available / 2**30:.1f} GiB of memory free; use smaller sizes"
        )


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
