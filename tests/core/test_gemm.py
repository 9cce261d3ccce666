"""``seqplat.core.gemm.outer``: the weight-gradient product ``a^T @ b`` on MKL, oneDNN or the packed blocks."""

from __future__ import annotations

import pytest
import torch

from seqplat.core import gemm

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("route", ["mm", "onednn", "packed", "auto"])
@pytest.mark.parametrize("shape", [(37, 5, 9), (300, 600, 520), (64, 1024, 256)])
def test_outer_matches_the_float64_product_on_every_route(route, shape, monkeypatch):
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", route)
    rows, m, n = shape
    torch.manual_seed(0)
    a, b = torch.randn(rows, m), torch.randn(rows, n)
    got = gemm.outer(a, b)
    want = (a.double().t() @ b.double()).float()
    assert got.shape == (m, n)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * rows**0.5)


@needs_onednn
def test_outer_routes(monkeypatch):
    a, b = torch.randn(8, 1024), torch.randn(8, 256)
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", "mm")
    assert not gemm.outer_uses_onednn(a, b)
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", "onednn")
    assert gemm.outer_uses_onednn(a, b)
    assert not gemm.outer_uses_onednn(a.double(), b.double())  # float32 only
    assert not gemm.outer_uses_onednn(a.requires_grad_(), b)  # no autograd formula for the oneDNN op
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", "auto")
    small = torch.randn(8, 16)
    assert not gemm.outer_uses_onednn(small, small)  # below ONEDNN_MIN_OUTER
    assert gemm.outer_uses_onednn(a.detach(), b) == gemm.cpu_has_avx512()


def test_outer_takes_the_packed_kernel_where_it_is_built(monkeypatch):
    """On AVX-512 builds float32 products run the core kernel's packed blocks, reading column blocks of wider
    buffers in place; forced library routes, other dtypes and autograd inputs keep the library routes."""
    if not (gemm.cpu_has_avx512() and gemm.KERNEL.load() and torch.ops.seqplat_core_gemm.packed_outer()):
        pytest.skip("the packed route is not built here (no AVX-512, or no compiler)")
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", "auto")
    torch.manual_seed(0)
    wide, b = torch.randn(300, 1044), torch.randn(300, 128)
    a = wide[:, 768:]  # a column block, rows 1044 apart
    assert gemm.outer_uses_packed(a, b)
    got = gemm.outer(a, b)
    torch.testing.assert_close(got, (a.double().t() @ b.double()).float(), rtol=1e-4, atol=1e-3)
    assert not gemm.outer_uses_packed(a.double(), b.double())
    assert not gemm.outer_uses_packed(a.t(), b[:276])  # columns not contiguous
    assert not gemm.outer_uses_packed(b.clone().requires_grad_(), b)
    for route in ("mm", "onednn"):
        monkeypatch.setenv("SEQPLAT_STEP_GEMM", route)
        assert not gemm.outer_uses_packed(a, b)


def test_outer_runs_any_dtype_on_the_mm_route():
    a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert torch.equal(gemm.outer(a, b), a.t() @ b)


@needs_onednn
@pytest.mark.parametrize("route", ["mm", "onednn"])
@pytest.mark.parametrize("bias", [True, False])
def test_projection_gradients_match_addmm(route, bias, monkeypatch):
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", route)
    torch.manual_seed(0)
    x = torch.randn(50, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    g = torch.randn(50, 40)
    got = gemm.projection(x, w, b)
    (got * g).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b) if t is not None]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    want = x @ w.t() + (b if b is not None else 0)
    (want * g).sum().backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, t in zip(grads, [t for t in (x, w, b) if t is not None], strict=True):
        assert torch.allclose(a, t.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_projection_passes_float64_gradcheck_on_the_mm_route_and_routes_float32_only(monkeypatch):
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", "onednn")
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert not gemm.projection_uses_onednn(x, w)
    assert torch.autograd.gradcheck(gemm.projection, (x, w))
    assert gemm.projection_uses_onednn(x.float(), w.float())
