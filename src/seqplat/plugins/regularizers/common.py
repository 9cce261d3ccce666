"""Helpers shared by the regularizers: finding the model's cells and naming them in error messages."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from seqplat import Cell, ConfigError


def top_cells(model: nn.Module, regularizer: str) -> list[Cell]:
    """The stacked cells of a :class:`seqplat.SequenceModel` (or ``[model]`` for a bare cell)."""
    if isinstance(model, Cell):
        return [model]
    cells = list(getattr(model, "cells", []))
    if not cells:
        raise ConfigError(f"regularizers: '{regularizer}' found no cells in {type(model).__name__} "
                          "(it expects a seqplat.SequenceModel with model.cells)")
    return cells


def cell_name(cell: nn.Module) -> str:
    """The registered name of a cell's class (its class name when it is not registered)."""
    from seqplat.registry import get_registry

    for name, entry in get_registry().entries["cell"].items():
        if entry.obj is type(cell):
            return name
    return type(cell).__name__


def registered_cells(predicate: Callable[[type], bool]) -> str:
    """Comma-separated names of the registered cell classes for which ``predicate`` holds."""
    from seqplat.registry import get_registry

    names = sorted(n for n, e in get_registry().entries["cell"].items() if predicate(e.obj))
    return ", ".join(names) if names else "(none installed)"
