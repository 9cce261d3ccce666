"""``torch.compile`` for seqplat models: the whole model, or each cell's one-step function.

``train.compile`` (and ``seqplat bench --compile``) take one of:

* ``off`` -- eager PyTorch (the default).
* ``model`` -- ``torch.compile(model)``. Dynamo traces the cell's Python loop over time steps, so
  it unrolls it: the graph, and the compile time, grow with the sequence length (minutes for a
  depth-5 RHN at T=100 on 2 cores). Cells whose fast path is one fused kernel (``lstm``, ``gru``,
  ``rnn``) compile in seconds.
* ``step`` -- compile only the function a cell calls once per time step, and run the cell's plain
  loop (its reference path) around the compiled step. The graph holds one step, so the compile
  time does not depend on T, and the step's small ops are fused. A cell opts in through
  :meth:`seqplat.Cell.step_compile_target`; a :class:`~seqplat.StepCell` that runs the core's
  loop over ``step`` is in by default. In a wrapper (``fs_rnn``, ``sab``) the outermost cell that
  can compile its step does so; its inner cells run inside that step, as in eager mode. A wrapper
  that advances its inner cells with ``step`` itself (``Cell.drives_inner_steps``: sab) gets its
  inner cells' steps compiled, fused-kernel cells included. Cells without a step to compile (fused
  kernels run through their fast path, custom sequence kernels) stay as they are.

  A sequence's first step differs from the others in which tensors require gradients (the initial
  state does not, every later state does), and Dynamo would compile a graph for it alone: a third
  of fs_rnn's compile time for one step in T. :class:`StepDispatch` therefore runs a call eagerly
  unless the call before it had the same signature (grad mode and the ``requires_grad`` of every
  tensor argument); a signature seen twice in a row is compiled and from then on always runs
  compiled. Training compiles one graph (forward and backward), evaluation one more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .cell import Cell, StepCell

log = logging.getLogger("seqplat.compile")

CompileMode = Literal["off", "model", "step"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def compile_mode(value: object) -> object:
    """Read the old boolean spelling: ``true`` is ``model`` (what it meant before ``step`` existed),
    ``false`` is ``off``; anything else is left for the field's own check."""
    if isinstance(value, bool):
        return "model" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return "model" if value.strip().lower() in ("true", "yes", "1") else "off"
    return value


class CompiledSteps:
    """The cells whose step function :func:`compile_steps` replaced, and how to put them back."""

    def __init__(self) -> None:
        #: ``(module path, cell, attribute, fast path setting before)`` of every compiled cell
        self.entries: list[tuple[str, Cell, str, bool]] = []

    @property
    def names(self) -> list[str]:
        """Module paths of the compiled cells (``""`` is the model itself)."""
        return [name for name, *_ in self.entries]

    def restore(self) -> None:
        """Drop the compiled functions: every cell calls its own method again, with its fast path as before."""
        for _, cell, attr, fast in self.entries:
            cell.__dict__.pop(attr, None)
            cell.use_fast_path = fast
        self.entries.clear()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the cells' own (eager) step methods for a while, e.g. under a FLOP counter."""
        held = [(cell, attr, cell.__dict__.pop(attr), cell.use_fast_path) for _, cell, attr, _ in self.entries]
        try:
            yield
        finally:
            for cell, attr, fn, fast in held:
                cell.__dict__[attr] = fn
                cell.use_fast_path = fast


class StepDispatch:
    """A cell's step that calls ``compiled`` for a signature seen on two calls in a row, else ``eager``.

    The signature of a call is the grad mode and the ``requires_grad`` flag of each tensor argument
    (what Dynamo guards on besides shapes). The first step of every sequence (an initial state that
    needs no gradient) runs eagerly instead of costing a compile of its own.
    """

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any]):
        self.eager, self.compiled = eager, compiled
        self.ready: set[tuple[bool, ...]] = set()  #: signatures that run compiled
        self.last: tuple[bool, ...] | None = None
        self.__wrapped__ = eager

    @staticmethod
    def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, ...]:
        flags = [t.requires_grad for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        return (torch.is_grad_enabled(), *flags)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.signature(args, kwargs)
        if key not in self.ready:
            if key != self.last:
                self.last = key
                return self.eager(*args, **kwargs)
            self.ready.add(key)
        self.last = key
        return self.compiled(*args, **kwargs)


def compile_steps(model: nn.Module, compiler: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None
                  ) -> CompiledSteps:
    """Compile the one-step function of the outermost cells of ``model`` that have one (``step`` mode).

    Each such cell gets an instance attribute that shadows its step method with the compiled function,
    and its fast path is switched off so its plain loop (which calls the step) runs. ``compiler``
    defaults to ``torch.compile``. :meth:`CompiledSteps.restore` undoes it.
    """
    if compiler is None:
        import torch

        compiler = torch.compile
    done = CompiledSteps()
    drivers: list[str] = []  # wrappers that call their inner cells' `step` directly
    for name, module in model.named_modules():
        if not isinstance(module, Cell) or any(_inside(name, outer) for outer in done.names):
            continue
        attr = module.step_compile_target()
        if attr is None and isinstance(module, StepCell) and any(_inside(name, d) for d in drivers):
            attr = "step"  # its wrapper runs `step`, never the cell's fused fast path
        if module.drives_inner_steps:
            drivers.append(name)
        if attr is None:
            continue
        done.entries.append((name, module, attr, module.use_fast_path))
        eager = getattr(module, attr)
        module.__dict__[attr] = StepDispatch(eager, compiler(eager))
        module.use_fast_path = False
    return done


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


def apply_compile(model: nn.Module, mode: str) -> nn.Module:
    """The model to train under ``mode`` (see the module docstring); logs what ``step`` compiled."""
    if mode == "off":
        return model
    if mode == "model":
        import torch

        return torch.compile(model)  # lazy: compiles in the first calls
    if mode == "step":
        compiled = compile_steps(model)
        if compiled.names:
            log.info("torch.compile (step): compiled the step of %s", ", ".join(
                f"{type(c).__name__} ({n or 'model'})" for n, c, *_ in compiled.entries))
        else:
            log.warning("torch.compile (step): no cell in this model has a step function to compile (fused "
                        "kernels and sequence kernels keep their fast path); nothing was compiled")
        return model
    raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
