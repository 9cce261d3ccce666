"""Tests of FS-RNN's C++ loop (``fs_rnn/fs_rnn_cpu.cpp``): :class:`FSLNLSTMRecurrence` with
``backend="cpp"`` against the python loop (the reference of the fused path) on every output and every
gradient, a float64 ``gradcheck`` of the C++ backward, the whole cell with ``backend=cpp`` against the
reference ``step``, and the backend resolution with its fallback."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import seqplat
from seqplat import build_cell
from seqplat.core.cell import flatten_state
from seqplat.plugins.fs_rnn import fused
from seqplat.plugins.fs_rnn.cell import FSRNNCell
from seqplat.plugins.fs_rnn.fused import FSLNLSTMRecurrence, FusedPlan, draw_masks

PTB = {"zoneout_keep_h": 0.9, "zoneout_keep_c": 0.5}


@pytest.fixture(autouse=True)
def kernel() -> None:
    if not fused.load_cpp_extension():
        pytest.skip(f"C++ kernel unavailable: {fused.cpp_error()}")


def ln(n: int, **options: Any) -> dict[str, Any]:
    return {"name": "ln_lstm", "hidden_size": n, **options}


def fs_cell(k: int = 2, zone: bool = True, dtype: torch.dtype = torch.float64, nf: int = 5, ns: int = 4,
            **options: Any) -> FSRNNCell:
    torch.manual_seed(0)
    z = PTB if zone else {}
    spec = {"name": "fs_rnn", "num_fast": k, "fast": ln(nf, **z), "slow": ln(ns, **z), **options}
    cell = build_cell(spec, 3).to(dtype)
    with torch.no_grad():  # off the initial values, so every gain, shift and bias matters
        for p in cell.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert isinstance(cell, FSRNNCell)
    return cell


def plan_and_params(cell: FSRNNCell, steps: int, b: int, train: bool, dropout: float, backend: str,
                    seed: int = 4) -> tuple[FusedPlan, list[Tensor | None]]:
    """Masks drawn once (the same for both backends) and leaf copies of the Function's parameters."""
    f1, f2, *rest = cell.fast_cells
    cells = [f1, cell.slow_cell, f2, *rest]
    keeps = [(c.config.zoneout_keep_h, c.config.zoneout_keep_c) for c in cells]
    like = torch.empty(0, dtype=f1.weight_h.dtype)
    torch.manual_seed(seed)
    zone, d2, d3 = draw_masks(steps, b, [c.config.hidden_size for c in cells], keeps, [train] * len(cells),
                              dropout, like)
    plan = FusedPlan(len(cell.fast_cells), [c.config.ln_eps for c in cells], zone, d2, d3, backend)
    params: list[Tensor | None] = []
    for i, c in enumerate(cells):
        w = torch.cat([c.weight_x, c.weight_h], 1) if i in (1, 2) else c.weight_h
        params += [w, None if i == 0 else c.bias, c.ln_gain, c._shift_with_forget_bias(), c.ln_c_gain, c.ln_c_shift]
    return plan, [p.detach().clone().requires_grad_(True) if p is not None else None for p in params]


def inputs(cell: FSRNNCell, steps: int, b: int, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    g = torch.Generator().manual_seed(5)
    nf, ns = cell.fast_cells[0].output_size, cell.slow_cell.output_size
    shapes = [(steps, b, 4 * nf), (b, nf), (b, nf), (b, ns), (b, ns)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]


def run_function(cell: FSRNNCell, backend: str, *, train: bool, dropout: float = 0.0, steps: int = 5, b: int = 3,
                 dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """Every output of the Function and every gradient (xp, initial state, all parameters)."""
    plan, params = plan_and_params(cell, steps, b, train, dropout, backend)
    xs = inputs(cell, steps, b, dtype)
    outs = FSLNLSTMRecurrence.apply(*xs, plan, *params)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    leaves = [*xs, *(p for p in params if p is not None)]
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + list(grads)


def assert_all_close(a: list[Tensor], b: list[Tensor], **tol: float) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(u, v, **tol, msg=lambda m, i=i: f"item {i}: {m}")


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize(("zone", "train", "dropout"),
                         [(True, True, 0.0), (True, False, 0.0), (False, True, 0.0), (True, True, 0.3),
                          (False, True, 0.4)],
                         ids=["zoneout_train", "zoneout_eval_keep", "no_zoneout", "zoneout_dropout", "dropout"])
def test_cpp_matches_python_loop(k, zone, train, dropout):
    """float64: the five outputs and the gradients of xp, the initial state and all parameters."""
    cell = fs_cell(k, zone)
    py = run_function(cell, "python", train=train, dropout=dropout)
    cpp = run_function(cell, "cpp", train=train, dropout=dropout)
    assert_all_close(cpp, py, atol=1e-10, rtol=1e-8)
    assert all(g.abs().sum() > 0 for g in cpp[5:])


def test_cpp_matches_python_loop_wider_and_unequal_widths():
    """Slow wider than fast, no pre-LN bias, and a batch of 192 rows: every cell's row passes split into
    parallel chunks (at least 8192 elements of 4n each) when two threads run."""
    torch.manual_seed(0)
    spec = {"name": "fs_rnn", "num_fast": 3, "fast": ln(24, pre_ln_bias=False, **PTB), "slow": ln(40, **PTB)}
    cell = build_cell(spec, 3).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.1 * torch.randn_like(p))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        py = run_function(cell, "python", train=True, dropout=0.2, steps=3, b=192)
        cpp = run_function(cell, "cpp", train=True, dropout=0.2, steps=3, b=192)
    finally:
        torch.set_num_threads(threads)
    assert_all_close(cpp, py, atol=1e-10, rtol=1e-8)


def test_cpp_float32_close_to_python_loop():
    cell = fs_cell(3, True, dtype=torch.float32, nf=16, ns=12)
    py = run_function(cell, "python", train=True, dropout=0.2, dtype=torch.float32)
    cpp = run_function(cell, "cpp", train=True, dropout=0.2, dtype=torch.float32)
    assert_all_close(cpp, py, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(("k", "train", "dropout"), [(2, True, 0.0), (3, True, 0.3), (3, False, 0.0)],
                         ids=["k2_train_zoneout", "k3_train_zoneout_dropout", "k3_eval"])
def test_gradcheck_cpp(k, train, dropout):
    """float64 gradcheck of the C++ backward w.r.t. xp, the initial state and all parameters (masks fixed)."""
    cell = fs_cell(k, True, nf=3, ns=2)
    steps, b = 3, 2
    plan, params = plan_and_params(cell, steps, b, train, dropout, "cpp")
    xs = inputs(cell, steps, b)
    idx = [i for i, p in enumerate(params) if p is not None]

    def fn(*args: Tensor) -> tuple[Tensor, ...]:
        ps = list(params)
        for i, p in zip(idx, args[5:], strict=True):
            ps[i] = p
        return FSLNLSTMRecurrence.apply(*args[:5], plan, *ps)

    assert torch.autograd.gradcheck(fn, (*xs, *(params[i] for i in idx)), eps=1e-6, atol=1e-6, rtol=1e-4)


def run_cell(cell: FSRNNCell, x: Tensor, state: list[Tensor], path: str, seed: int = 11) -> list[Tensor]:
    """Outputs, final state and every gradient (input, initial state, parameters) of the whole cell."""
    cell.use_fast_path = path != "reference"
    x = x.clone().requires_grad_(True)
    st = [s.clone().requires_grad_(True) for s in state]
    cell.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y, final = cell(x, ((st[0], st[1]), (st[2], st[3])))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    ((y * w).sum() + sum((s**2 * (i + 1)).sum() for i, s in enumerate(flatten_state(final)))).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in cell.parameters()]
    return [y.detach(), *(s.detach() for s in flatten_state(final)), x.grad, *(s.grad for s in st), *grads]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cell_with_cpp_backend_matches_reference_step(k, train, monkeypatch):
    cell = fs_cell(k, True, backend="cpp").train(train)
    assert cell.config.backend == "cpp"
    backends = []
    apply = FSLNLSTMRecurrence.apply
    monkeypatch.setattr(FSLNLSTMRecurrence, "apply", lambda *a: backends.append(a[5].backend) or apply(*a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 3, generator=g, dtype=torch.float64)
    state = [torch.randn(3, n, generator=g, dtype=torch.float64) for n in (5, 5, 4, 4)]
    ref = run_cell(cell, x, state, "reference")
    fast = run_cell(cell, x, state, "fused")
    assert backends == ["cpp"]
    assert_all_close(fast, ref, atol=1e-10, rtol=1e-8)


def test_cell_with_cpp_backend_and_dropout_matches_python_backend():
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    state = [torch.zeros(3, n, dtype=torch.float64) for n in (5, 5, 4, 4)]
    py = run_cell(fs_cell(3, True, dropout=0.3, backend="python").train(), x, state, "fused")
    cpp = run_cell(fs_cell(3, True, dropout=0.3, backend="cpp").train(), x, state, "fused")
    assert_all_close(cpp, py, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize(("train", "dropout"), [(False, 0.0), (True, 0.3)], ids=["eval", "train_dropout"])
def test_inference_runs_the_cpp_loop_and_matches_the_planned_loop(k, train, dropout):
    """Without gradients the C++ forward loop runs alone (one step's buffers); it equals the planned loop of
    the python backend (same seed: the same masks in training mode)."""
    cells = {b: fs_cell(k, True, dropout=dropout, backend=b).train(train) for b in ("cpp", "python")}
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    out = {}
    for b, cell in cells.items():
        torch.manual_seed(3)
        with torch.no_grad():
            y, st = cell(x)
        out[b] = [y, *flatten_state(st)]
    assert_all_close(out["cpp"], out["python"], atol=1e-10, rtol=1e-8)
    plan, params = plan_and_params(cells["cpp"], 5, 2, train, dropout, "cpp")
    xs = [v.detach() for v in inputs(cells["cpp"], 5, 2)]
    kept = fused.cpp_loop(*xs, plan, params, keep=True)
    once = fused.cpp_loop(*xs, plan, params, keep=False)
    assert_all_close(list(once[0]), list(kept[0]), atol=0.0, rtol=0.0)
    assert once[1][6].shape[0] == 1 and kept[1][6].shape[0] == 5  # a per-cell buffer: one step, every step


def test_cpp_backward_refuses_create_graph():
    cell = fs_cell(2, True)
    plan, params = plan_and_params(cell, 3, 2, True, 0.0, "cpp")
    xs = inputs(cell, 3, 2)
    ys = FSLNLSTMRecurrence.apply(*xs, plan, *params)[0]
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(ys.sum(), xs[0], create_graph=True)


def test_backend_resolution_and_fallback(monkeypatch):
    x = torch.randn(2, 3, 4)
    assert fused.resolve_backend("auto", x) == "cpp"
    assert fused.resolve_backend("python", x) == "python"
    monkeypatch.setattr(fused.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    assert fused.resolve_backend("auto", x) == "python"
    with pytest.raises(seqplat.SeqplatError, match=r"fs_rnn: the C\+\+ kernel cannot be built \(simulated: no "
                       r"compiler\); cell.backend='cpp' needs it"):
        fused.resolve_backend("cpp", x)
    with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
        fused.resolve_backend("cpp", x.half())
    assert fused.resolve_backend("auto", x.half()) == "python"
    cell = fs_cell(2, True, dtype=torch.float32).train()  # auto -> the python loop, same Function
    y, _ = cell(torch.randn(2, 4, 3))
    assert y.requires_grad
    y.sum().backward()
    with pytest.raises(ValueError, match="backend"):
        build_cell({"name": "fs_rnn", "fast": ln(4), "slow": ln(3), "backend": "fortran"}, 3)
