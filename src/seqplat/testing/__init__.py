"""Conformance checks for cells, usable by any plugin's tests (and as a pytest plugin).

``check_cell(spec)`` builds a registered cell at tiny sizes (b=2, t=5, d=3 unless told otherwise)
and checks, on CPU: output and state shapes, that carrying the state across two chunks equals one
long run, that gradients reach the parameters and the inputs, seeded determinism, that the fast
path matches the reference path on outputs and gradients, and that the config round-trips through
JSON. ``gradcheck_cell(spec)`` runs ``torch.autograd.gradcheck`` in float64 on the reference path
(and on the fast path when there is one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from seqplat.core.cell import Cell, flatten_state
from seqplat.core.model import build_cell

__all__ = ["check_cell", "gradcheck_cell", "make_inputs", "run_cell"]


def make_inputs(cell: Cell, batch: int = 2, time: int = 5, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, time, cell.input_size, generator=g, dtype=dtype)
    times = None
    if cell.uses_time:
        times = torch.cumsum(torch.rand(batch, time, generator=g, dtype=dtype) + 0.5, dim=1)
    return x, times


def run_cell(cell: Cell, x: Tensor, state: Any = None, times: Tensor | None = None, fast: bool = True):
    cell.use_fast_path = fast
    try:
        return cell(x, state, times=times)
    finally:
        cell.use_fast_path = True


def _grads(cell: Cell, x: Tensor, times: Tensor | None, fast: bool) -> tuple[Tensor, list[Tensor | None], Tensor]:
    x = x.clone().requires_grad_(True)
    cell.zero_grad(set_to_none=True)
    y, state = run_cell(cell, x, None, times, fast)
    g = torch.Generator().manual_seed(123)
    w = torch.randn(y.shape, generator=g, dtype=y.dtype)
    loss = (y * w).sum() + sum((s.to(y.dtype) ** 2).sum() * 0.1 for s in flatten_state(state) if s.is_floating_point())
    loss.backward()
    return y.detach(), [None if p.grad is None else p.grad.clone() for p in cell.parameters()], x.grad.clone()


def check_cell(spec: dict[str, Any] | str, input_size: int = 3, batch: int = 2, time: int = 5,
               atol: float = 1e-5, rtol: float = 1e-4, registry: Any | None = None,
               dtype: torch.dtype = torch.float32) -> Cell:
    """Run the conformance checks on the cell ``spec`` builds; returns the cell. Raises AssertionError.

    ``dtype`` is that of the parameters and inputs: float64 where two paths may legitimately take different
    discrete decisions in float32 (e.g. a top-k selection between scores that tie to rounding).
    """
    torch.manual_seed(0)
    cell = build_cell(spec, input_size, registry).to(dtype)
    name = spec if isinstance(spec, str) else spec["name"]
    cell.eval()  # dropout off: outputs must be a function of inputs and state
    x, times = make_inputs(cell, batch, time, dtype=dtype)

    # shapes
    y, state = cell(x, None, times=times)
    want = (batch, time, cell.output_size)
    assert y.shape == want, f"{name}: y has shape {tuple(y.shape)}, expected {want}"
    for s in flatten_state(state):
        assert s.shape[0] == batch, f"{name}: state tensor {tuple(s.shape)} is not batch-first"
    init = cell.initial_state(batch, x.device)
    assert [s.shape for s in flatten_state(init)] == [s.shape for s in flatten_state(state)], (
        f"{name}: initial_state shapes {[tuple(s.shape) for s in flatten_state(init)]} differ from the "
        f"returned state's {[tuple(s.shape) for s in flatten_state(state)]}"
    )
    assert torch.isfinite(y).all(), f"{name}: non-finite outputs"

    # state carry: two chunks == one run
    if cell.supports_state_carry and time >= 2:
        k = time // 2
        t1 = None if times is None else times[:, :k]
        t2 = None if times is None else times[:, k:]
        y1, s1 = cell(x[:, :k], None, times=t1)
        y2, s2 = cell(x[:, k:], s1, times=t2)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: carrying state across chunks differs from one run: {m}")
        for a, b in zip(flatten_state(s2), flatten_state(state), strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)

    # determinism
    y_again, _ = cell(x, None, times=times)
    assert torch.equal(y, y_again), f"{name}: eval forward is not deterministic"

    # backward reaches parameters and inputs
    y_ref, g_ref, gx_ref = _grads(cell, x, times, fast=False)
    assert any(g is not None and g.abs().sum() > 0 for g in g_ref), f"{name}: no gradient reaches any parameter"
    assert gx_ref.abs().sum() > 0, f"{name}: no gradient reaches the inputs"
    for g in g_ref:
        assert g is None or torch.isfinite(g).all(), f"{name}: non-finite gradient"

    # fast path == reference path, outputs and gradients
    if cell.has_fast_path:
        y_fast, g_fast, gx_fast = _grads(cell, x, times, fast=True)
        torch.testing.assert_close(y_fast, y_ref, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: fast path output differs from reference: {m}")
        torch.testing.assert_close(gx_fast, gx_ref, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: fast path input gradient differs: {m}")
        for (pname, _), a, b in zip(cell.named_parameters(), g_fast, g_ref, strict=True):
            if a is None or b is None:
                assert a is None and b is None or (a if a is not None else b).abs().sum() == 0, (
                    f"{name}: gradient of {pname} exists on one path only"
                )
                continue
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol,
                                       msg=lambda m, p=pname: f"{name}: fast path gradient of {p} differs: {m}")

    # seeded construction is deterministic
    torch.manual_seed(0)
    twin = build_cell(spec, input_size, registry)
    for (pname, p), q in zip(cell.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: parameter {pname} differs between two builds with the same seed"

    # config round trip
    cfg = cell.config
    again = type(cfg).model_validate_json(cfg.model_dump_json())
    assert again == cfg, f"{name}: config does not round-trip through JSON"
    return cell


def gradcheck_cell(spec: dict[str, Any] | str, input_size: int = 2, batch: int = 2, time: int = 3,
                   registry: Any | None = None) -> None:
    """float64 ``gradcheck`` of the cell's reference path (and fast path) w.r.t. inputs and parameters."""
    torch.manual_seed(0)
    cell = build_cell(spec, input_size, registry).double().eval()
    x, times = make_inputs(cell, batch, time, dtype=torch.float64)
    x.requires_grad_(True)
    params = [p for p in cell.parameters() if p.requires_grad]
    names = [n for n, p in cell.named_parameters() if p.requires_grad]
    paths = [False, True] if cell.has_fast_path else [False]
    for fast in paths:
        def fn(x_, *ps, fast=fast):
            with torch.nn.utils.stateless._reparametrize_module(cell, dict(zip(names, ps, strict=True))):
                y, state = run_cell(cell, x_, None, times, fast)
            return (y, *[s for s in flatten_state(state) if s.is_floating_point()])

        assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-3), (
            f"gradcheck failed (fast={fast})"
        )
