"""coRNN's C++ loop (``unicornn/cornn_fused.py``, ``cornn_cpu.cpp``) against the cell's plain PyTorch path.

The reference is ``CoRNNCell.reference_forward`` (the core's loop over ``step``, equations C1-C2 as the authors
code them): outputs, final states and every gradient, float64 and float32, both damping variants, on one and two
threads; the Function itself under float64 gradcheck; and the Python loop taking over where the kernel is missing.
"""

from __future__ import annotations

import pytest
import torch

from seqplat import build_cell
from seqplat.plugins.unicornn import cell as cell_module
from seqplat.plugins.unicornn import cornn_fused

pytestmark = pytest.mark.skipif(not cornn_fused.load_cpp_extension(),
                                reason=f"coRNN's C++ kernel unavailable: {cornn_fused.cpp_error()}")


def _grads(cell, x, fast: bool):
    cell.use_fast_path = fast
    cell.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y, (y_t, z_t) = cell(xg)
    torch.manual_seed(9)
    w_y = torch.randn_like(y)
    ((y * w_y).sum() + y_t.square().sum() + 2 * z_t.sum()).backward()
    return [y.detach(), y_t.detach(), z_t.detach(), xg.grad] + [p.grad for p in cell.parameters()]


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize(("batch", "hidden", "threads"), [(5, 37, 1), (70, 130, 2), (3, 64, 2)])
def test_cpp_loop_matches_the_reference_path(implicit, dtype, tol, batch, hidden, threads, monkeypatch):
    """(70, 130) runs the row passes on two threads and the products on the packed route (float32, AVX-512);
    every output and gradient within ``tol`` of its largest entry."""
    calls = []
    original = cornn_fused.CoRNNRecurrence.apply
    monkeypatch.setattr(cornn_fused.CoRNNRecurrence, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    cell = build_cell({"name": "cornn", "hidden_size": hidden, "implicit_damping": implicit,
                       "dt": 0.05, "gamma": 1.3, "epsilon": 4.0}, 11).to(dtype)
    x = torch.randn(batch, 29, 11, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = _grads(cell, x, True)
        ref = _grads(cell, x, False)
    finally:
        torch.set_num_threads(before)
    assert calls == [1]  # the fast path ran the C++ loop, the reference path did not
    for i, (a, b) in enumerate(zip(fast, ref, strict=True)):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err < tol, f"output/gradient {i} differs from the reference path by {err:.2e}"


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_recurrence_gradcheck_float64(implicit):
    torch.manual_seed(1)
    b, t, h = 3, 6, 4
    xp = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(h, 2 * h, dtype=torch.float64)).requires_grad_()
    y0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)

    def f(xp, w, y0, z0):
        return cornn_fused.cornn_loop(xp, w, y0, z0, 0.3, 0.7, 2.0, implicit)

    assert torch.autograd.gradcheck(f, (xp, w, y0, z0), eps=1e-6, atol=1e-8)


def test_unused_outputs_get_no_gradient_and_the_initial_state_is_used():
    """Only ``y`` feeds the loss: the final states' gradients arrive as None; a nonzero initial state (y0, z0)
    changes the outputs as on the reference path."""
    torch.manual_seed(2)
    cell = build_cell({"name": "cornn", "hidden_size": 8}, 3).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    state = (torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64))
    outs = []
    for fast in (True, False):
        cell.use_fast_path = fast
        cell.zero_grad(set_to_none=True)
        y, _ = cell(x, state)
        y.sum().backward()
        outs.append([y.detach()] + [p.grad for p in cell.parameters()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_without_the_kernel_the_python_loop_runs(monkeypatch):
    monkeypatch.setattr(cell_module.cornn_fused, "usable", lambda x: False)
    monkeypatch.setattr(cornn_fused.CoRNNRecurrence, "apply", lambda *a: pytest.fail("the C++ loop ran"))
    torch.manual_seed(3)
    cell = build_cell({"name": "cornn", "hidden_size": 6}, 3)
    y, _ = cell(torch.randn(2, 4, 3))
    assert y.shape == (2, 4, 6)
