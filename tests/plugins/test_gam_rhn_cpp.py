"""The C++ loops of gam_rhn's training fast path (``gam_rhn_cpu.cpp``, ``backend = "cpp"``).

They are pinned to the python loops of :class:`GAMRHNRecurrence` on outputs and every gradient (float64,
tight), ``gradcheck``-ed in float64, and the whole cell with ``backend = "cpp"`` is compared with the
reference step path.
"""

from __future__ import annotations

import pytest
import torch

import seqplat
from seqplat.core.model import build_cell
from seqplat.plugins.gam_rhn import fused
from seqplat.plugins.gam_rhn.cell import GAMRHNCell
from seqplat.plugins.gam_rhn.fused import GAMRHNRecurrence

SMALL = {"name": "gam_rhn", "memory": "3x4", "hidden_size": 5, "head_size": 3}
BACKENDS = ["python", "cpp"]
MASKS = ["none", "gam", "rhn", "both"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 kernels run far faster on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def needs_kernel(backend: str = "cpp") -> None:
    if backend == "cpp" and not fused.load_cpp_extension():
        pytest.skip(f"C++ kernel unavailable: {fused.cpp_error()}")


def function_inputs(depth: int, masks: str, *, h: int = 2, d: int = 3, n: int = 2, slots: int = 2, b: int = 2,
                    steps: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0, scale: float = 0.7):
    """Random inputs of :class:`GAMRHNRecurrence`: ``(xp, m0, s0)``, the weights, the masks and ``dims``."""
    g = torch.Generator().manual_seed(seed)
    sn = n * slots

    def t(*shape):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(True)

    weights = [t(d, 2 * d + h + d), t(2 * d), t(n, d), t(h, 2 * sn), t(2 * sn)]
    for i in range(depth):
        weights += [t(n, 3 * d), t(d), t(d, d)]
        if i >= 1:
            weights += [t(d, 2 * d + h), t(2 * d), t(h, sn), t(sn)]
    inputs = [t(steps, b, h + d + n), t(b, slots, n), t(b, d)]
    mask_g = mask_r = None
    if masks in ("gam", "both"):
        mask_g = (torch.rand(steps, b, n, generator=g, dtype=dtype) > 0.3).to(dtype) / 0.7
    if masks in ("rhn", "both"):
        mask_r = (torch.rand(steps, depth, b, d, generator=g, dtype=dtype) > 0.3).to(dtype) / 0.7
    return inputs, weights, (mask_g, mask_r), (h, d, n, slots, depth)


def run_function(backend: str, inputs, weights, masks, dims, workspace=None, seed: int = 1):
    """Outputs of the Function and the gradients of a random linear loss on all three, for every input."""
    leaves = [v.detach().clone().requires_grad_(True) for v in (*inputs, *weights)]
    ys, m, s = GAMRHNRecurrence.apply(leaves[0], None, None, *leaves[1:3], *masks, (*dims, backend), workspace,
                                      *leaves[3:])
    g = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=g).to(v.dtype)).sum() for v in (ys, m, s))
    loss.backward()
    return [ys.detach(), m.detach(), s.detach()], [v.grad for v in leaves]


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("depth", [1, 3])
def test_cpp_recurrence_equals_python_float64(depth, masks):
    needs_kernel()
    args = function_inputs(depth, masks, h=3, d=4, n=3, slots=3, b=3, steps=5)
    out_p, grads_p = run_function("python", *args)
    out_c, grads_c = run_function("cpp", *args)
    for a, b in zip(out_c, out_p, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    names = ["xp", "m0", "s0"] + [f"weight {i}" for i in range(len(grads_p) - 3)]
    for name, a, b in zip(names, grads_c, grads_p, strict=True):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
        assert a.abs().sum() > 0, name


@pytest.mark.parametrize("depth", [1, 2])
def test_cpp_float32_agrees_with_python(depth):
    """float32: both loops within a few 1e-5 of the float64 result, relative to each tensor's scale."""
    needs_kernel()
    args = function_inputs(depth, "both", h=6, d=16, n=5, slots=3, b=8, steps=12, dtype=torch.float32, seed=3,
                           scale=0.4)
    inputs, weights, masks, dims = args

    def f64(v):
        return None if v is None else v.detach().double()

    truth = run_function("python", [f64(v) for v in inputs], [f64(v) for v in weights], tuple(map(f64, masks)), dims)
    for backend in BACKENDS:
        out, grads = run_function(backend, *args)
        for got, want in zip(out + grads, truth[0] + truth[1], strict=True):
            assert got.dtype == torch.float32
            err = (got.double() - want).abs().max().item()
            assert err <= 5e-5 * want.abs().max().item() + 1e-6, (backend, err)


@pytest.mark.parametrize("masks", ["none", "both"])
@pytest.mark.parametrize("depth", [1, 2])
def test_cpp_recurrence_gradcheck_float64(depth, masks):
    needs_kernel()
    inputs, weights, (mask_g, mask_r), dims = function_inputs(depth, masks)

    def fn(*args):
        return GAMRHNRecurrence.apply(args[0], None, None, *args[1:3], mask_g, mask_r, (*dims, "cpp"), None, *args[3:])

    assert torch.autograd.gradcheck(fn, (*inputs, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth", [1, 2])
def test_recurrence_projecting_its_inputs_gradcheck_float64(depth, backend):
    """With ``w_x`` and ``b_x`` the Function makes ``xp = x w_x^T + b_x`` itself and its backward reads dL/dxp in
    place: the gradients of the input rows, ``w_x`` and ``b_x`` against finite differences."""
    needs_kernel(backend)
    inputs, weights, (mask_g, mask_r), dims = function_inputs(depth, "both")
    h, d, n, slots, _ = dims
    g = torch.Generator().manual_seed(5)
    steps, b, d_in = 3, 2, 4
    x_rows = torch.randn(steps * b, d_in, generator=g, dtype=torch.float64).requires_grad_(True)
    w_x = (0.5 * torch.randn(h + d + n, d_in, generator=g, dtype=torch.float64)).requires_grad_(True)
    b_x = torch.randn(h + d + n, generator=g, dtype=torch.float64).requires_grad_(True)

    def fn(x_, w_, b_, *args):
        return GAMRHNRecurrence.apply(x_, w_, b_, *args[:2], mask_g, mask_r, (*dims, backend), None, *args[2:])

    assert torch.autograd.gradcheck(fn, (x_rows, w_x, b_x, *inputs[1:], *weights), eps=1e-6, atol=1e-6, rtol=1e-4)


def make(backend: str, **options) -> GAMRHNCell:
    torch.manual_seed(0)
    cell = build_cell({**SMALL, "backend": backend, **options}, 3)
    assert isinstance(cell, GAMRHNCell)
    return cell.train()


def run_cell(cell: GAMRHNCell, x: torch.Tensor, state, *, fast: bool, seed: int = 7):
    cell.use_fast_path = fast
    cell.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    state = tuple(v.clone().requires_grad_(True) for v in state)
    torch.manual_seed(seed)
    y, (m, s) = cell(x, state)
    g = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in (y, m, s))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    return [y.detach(), m.detach(), s.detach(), x.grad, *(v.grad for v in state)], grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", [
    {"depth": 1},
    {"depth": 3, "gam_dropout": 0.3, "rhn_dropout": 0.4},
    {"depth": 2, "memory": "1x4", "read_address_bias": False, "write_address_bias": True, "rhn_dropout": 0.2},
], ids=["depth1", "depth3-dropouts", "depth2-S1-biases"])
def test_cell_with_cpp_backend_equals_reference_path(options, dtype):
    needs_kernel()
    cell = make("cpp", **options).to(dtype)
    x = torch.randn(4, 7, 3, dtype=dtype)
    state = (torch.randn(4, cell.config.memory_size, dtype=dtype), torch.randn(4, 5, dtype=dtype))
    ref_out, ref_grads = run_cell(cell, x, state, fast=False)
    for _ in range(2):  # the second time on the workspace's buffers
        out, grads = run_cell(cell, x, state, fast=True)
        tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-8}
        for a, b in zip(out, ref_out, strict=True):
            torch.testing.assert_close(a, b, **tol)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    if options.get("rhn_dropout"):
        assert not torch.allclose(run_cell(cell, x, state, fast=True, seed=8)[0][0], out[0])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_cpp_loop_without_gradients_equals_python(training):
    needs_kernel()
    outs = []
    for backend in BACKENDS:
        cell = make(backend, depth=2, gam_dropout=0.3, rhn_dropout=0.3).train(training)
        torch.manual_seed(5)
        with torch.no_grad():
            y, (m, s) = cell(torch.randn(3, 6, 3), (torch.randn(3, 12), torch.randn(3, 5)))
        outs.append((y, m, s))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_workspace_reuse_and_retain_graph(backend):
    needs_kernel(backend)
    cell = make(backend, depth=2)
    x = torch.randn(4, 7, 3)

    def grads_of() -> dict[str, torch.Tensor]:
        cell.zero_grad(set_to_none=True)
        y, (m, s) = cell(x)
        (y.sin().sum() + m.sum() + s.sum()).backward()
        return {n: p.grad.clone() for n, p in cell.named_parameters()}

    first = grads_of()
    assert len(cell.workspace) == 2  # the saved activations and the backward's scratch came back
    held = {id(bufs[0]) for bufs in cell.workspace.held()}
    second = grads_of()  # on the same buffers
    assert {id(bufs[0]) for bufs in cell.workspace.held()} == held
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=1e-6, rtol=1e-5)
    cell.zero_grad(set_to_none=True)
    y = cell(x)[0].sin().sum()
    y.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in cell.named_parameters()}
    y.backward(retain_graph=True)  # nothing took the buffers in between
    for n, p in cell.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], msg=n)
    grads_of()  # a later forward takes the buffers back
    with pytest.raises(RuntimeError, match="explicit_backward = False"):
        y.backward()
    cell.eval()
    assert len(cell.workspace) == 0


def test_backend_resolution_and_fallback(monkeypatch):
    x = torch.randn(2, 3, 4)
    monkeypatch.setattr(fused.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    assert fused.resolve_backend("auto", x) == "python"
    assert fused.resolve_backend("python", x) == "python"
    with pytest.raises(seqplat.SeqplatError, match=r"gam_rhn: the C\+\+ kernel cannot be built \(simulated: no "
                       r"compiler\); cell.backend='cpp' needs it"):
        fused.resolve_backend("cpp", x)
    with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
        fused.resolve_backend("cpp", x.half())
    calls = []
    apply = GAMRHNRecurrence.apply
    monkeypatch.setattr(GAMRHNRecurrence, "apply", lambda *a: calls.append(a[7]) or apply(*a))
    cell = make("auto", depth=2)
    y, (m, s) = cell(torch.randn(2, 4, 3))  # auto -> the python loop, same Function
    (y.sum() + m.sum() + s.sum()).backward()
    assert calls and len(calls[0]) == 6 and calls[0][5] == "python"
    assert y.requires_grad and s.shape == (2, 5)


def test_backend_option_is_validated():
    with pytest.raises(Exception, match="backend"):
        build_cell({**SMALL, "backend": "fortran"}, 3)
