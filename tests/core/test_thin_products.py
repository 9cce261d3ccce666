"""The hand loops of ``core/include/seqplat_gemm.h``: for products whose right factor has at most 32 rows or
columns (GAM-RHN's memory reads and writes), and the packed-panel loops for the other float32 products on
CPUs with AVX-512. The same values as ``torch.mm`` for every shape class the loops split on (chunk and
panel remainders, row blocks and their remainders, rows and panels in parallel, strided rows of x and of
the output, accumulation, a bias), and out of the way when ``SEQPLAT_STEP_GEMM`` forces a library route."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqplat.core.cpp_ext import CppKernel, extension_cache_dir

EXT_CACHE = extension_cache_dir()  # the user's cache, read before conftest isolates SEQPLAT_CACHE
KERNEL = CppKernel(Path(__file__).with_name("thin_products.cpp"), "seqplat_test_gemm", "thin products test")
LIBRARY, INNER, OUTER, PACKED = 0, 1, 2, 3


@pytest.fixture(scope="module")
def step_product():
    if not KERNEL.load(cache_dir=EXT_CACHE):
        pytest.skip(f"no C++ build here: {KERNEL.error()}")
    return torch.ops.seqplat_test_gemm.step_product


# (rows, K, N, route): K <= 32 is the inner-dimension loop (64-column chunks in registers: N below, at and
# across a chunk), else N <= 32 the dot-product loop (16-lane chunks of K: K below, at and across); 96 rows of
# [10, 3072] are enough work for two parallel chunks
SHAPES = [
    (3, 10, 5, INNER), (7, 10, 64, INNER), (32, 10, 768, INNER), (5, 32, 130, INNER), (96, 10, 3072, INNER),
    (3, 40, 10, OUTER), (7, 16, 33, INNER), (6, 37, 1, OUTER), (32, 768, 10, OUTER), (96, 3072, 10, OUTER),
    (4, 33, 33, PACKED),
]


def _library_or_packed(route: int, dtype: torch.dtype) -> int:
    """Where a product that is not thin goes: the packed loops for float32 on builds with AVX-512."""
    if route != PACKED:
        return route
    return PACKED if dtype == torch.float32 and _packed_built() else LIBRARY


def _packed_built() -> bool:
    x, m = torch.randn(2, 40), torch.randn(40, 40)
    return torch.ops.seqplat_test_gemm.step_product(torch.empty(2, 40), x, m, False) == PACKED


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rows", "k", "n", "route"), SHAPES)
def test_thin_products_match_mm(step_product, rows, k, n, route, dtype, monkeypatch):
    monkeypatch.delenv("SEQPLAT_STEP_GEMM", raising=False)
    torch.manual_seed(0)
    x = torch.randn(rows, k, dtype=dtype)
    m = torch.randn(k, n, dtype=dtype)
    want = x @ m
    out = torch.full((rows, n), float("nan"), dtype=dtype)
    assert step_product(out, x, m, False) == _library_or_packed(route, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, want, rtol=tol, atol=tol * k)
    base = torch.randn(rows, n, dtype=dtype)
    acc = base.clone()
    step_product(acc, x, m, True)
    torch.testing.assert_close(acc, base + want, rtol=tol, atol=tol * k)


@pytest.mark.parametrize(("k", "n"), [(10, 120), (120, 10)], ids=["inner", "outer"])
def test_thin_products_read_and_write_strided_rows(step_product, k, n):
    """x a column block of a wider buffer, the product written into a column block of another, as the
    GAM-RHN loop does; the columns around the block are left alone."""
    torch.manual_seed(1)
    xbuf = torch.randn(9, k + 7, dtype=torch.float64)
    x = xbuf.narrow(1, 3, k)
    m = torch.randn(k, n, dtype=torch.float64)
    obuf = torch.zeros(9, n + 5, dtype=torch.float64)
    out = obuf.narrow(1, 2, n)
    step_product(out, x, m, False)
    torch.testing.assert_close(out, x @ m, rtol=1e-12, atol=1e-12)
    assert not obuf[:, :2].any() and not obuf[:, 2 + n:].any()
    m_t = torch.randn(n, k, dtype=torch.float64).t()  # a transposed view as the right factor
    step_product(out, x, m_t, True)
    torch.testing.assert_close(out, x @ m + x @ m_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ["mm", "onednn"])
@pytest.mark.parametrize("k", [10, 50], ids=["thin", "packed"])
def test_forcing_a_library_route_turns_the_hand_loops_off(step_product, route, k, monkeypatch):
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", route)
    x, m = torch.randn(4, k), torch.randn(k, 50)
    out = torch.empty(4, 50)
    assert step_product(out, x, m, False) == LIBRARY
    torch.testing.assert_close(out, x @ m)


@pytest.fixture()
def packed(step_product, monkeypatch):
    monkeypatch.delenv("SEQPLAT_STEP_GEMM", raising=False)
    if not _packed_built():
        pytest.skip("the packed loops need a build with AVX-512 (-march=native on a CPU that has it)")
    return step_product


# (rows, K, N): rows around the 6-row blocks (1, 5, 6, 7, 32) and enough for row chunks in parallel (130);
# N around the 64-column panels (33, 64, 65, 778: a 10-wide last panel) and panels enough for two per thread;
# last panels of 1 to 4 registers (65, 90, 100, 64); an odd number of panels, so that the threads' shares end inside
# one (778, 522); an odd K (K and N <= 32 go to the thin loops)
PACKED_SHAPES = [
    (1, 256, 1024), (5, 33, 64), (6, 40, 65), (7, 33, 100), (9, 50, 90), (32, 256, 256), (32, 256, 778),
    (32, 778, 256), (32, 256, 522), (130, 97, 200), (128, 256, 1024), (3, 300, 40),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "k", "n"), PACKED_SHAPES)
def test_packed_products_match_mm(packed, rows, k, n, threads):
    torch.manual_seed(2)
    x = torch.randn(rows, k)
    m = torch.randn(k, n)
    want = (x.double() @ m.double()).float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full((rows, n), float("nan"))
        assert packed(out, x, m, False) == PACKED
        tol = dict(rtol=1e-5, atol=1e-5 * k**0.5 * 4)
        torch.testing.assert_close(out, want, **tol)
        base = torch.randn(rows, n)
        acc = base.clone()
        packed(acc, x, m, True)
        torch.testing.assert_close(acc, base + want, **tol)
        bias = torch.randn(n)
        aff = torch.full((rows, n), float("nan"))
        torch.ops.seqplat_test_gemm.step_affine(aff, bias, x, m)
        torch.testing.assert_close(aff, bias + want, **tol)
        res = torch.ops.seqplat_test_gemm.step_result(torch.empty(rows, n), x, m)
        torch.testing.assert_close(res, want, **tol)
    finally:
        torch.set_num_threads(before)


def test_packed_products_read_and_write_strided_rows(packed):
    """x a column block of a wider buffer, m a transposed view, the product written into a column block of
    another buffer whose rows are not 64-byte aligned; the columns around the block are left alone."""
    torch.manual_seed(3)
    xbuf = torch.randn(13, 300 + 7)
    x = xbuf.narrow(1, 3, 300)
    m = torch.randn(130, 300).t()
    obuf = torch.zeros(13, 130 + 5)
    out = obuf.narrow(1, 1, 130)
    assert packed(out, x, m, False) == PACKED
    want = (x.double() @ m.double()).float()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    assert not obuf[:, :1].any() and not obuf[:, 1 + 130:].any()
    packed(out, x, m, True)
    torch.testing.assert_close(out, 2 * want, rtol=1e-5, atol=2e-4)


def test_forcing_the_packed_route_covers_thin_matrices(packed, monkeypatch):
    """``SEQPLAT_STEP_GEMM=packed`` sends every float32 product through the panels, the thin ones included."""
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", "packed")
    x, m = torch.randn(9, 10), torch.randn(10, 70)
    out = torch.empty(9, 70)
    assert packed(out, x, m, False) == PACKED
    torch.testing.assert_close(out, x @ m, rtol=1e-5, atol=1e-5)
    xd, md = x.double(), m.double()
    outd = torch.empty(9, 70, dtype=torch.float64)
    assert packed(outd, xd, md, False) == LIBRARY  # float64 stays on the library route
    torch.testing.assert_close(outd, xd @ md)


# (rows, m, n): rows across the 128-row chunks (1, 127, 300); m around the 6-row blocks; n around the 64-column
# panels, below one panel with m above it (the transposed product) and below it with m smaller, and more panels than
# one group of kOuterPanels (1100: 18)
OUTER_SHAPES = [
    (1, 6, 64), (127, 7, 65), (300, 256, 778), (300, 768, 10), (130, 5, 40), (257, 33, 200), (64, 1, 1),
    (130, 40, 1100),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("rows", "m", "n"), OUTER_SHAPES)
def test_packed_outer_products_match_mm(packed, rows, m, n, threads):
    torch.manual_seed(4)
    a, b = torch.randn(rows, m), torch.randn(rows, n)
    want = (a.double().t() @ b.double()).float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, _ = torch.ops.seqplat_test_gemm.step_outer(a, b, False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * rows**0.5 * 4)
        got, sums = torch.ops.seqplat_test_gemm.step_outer(a, b, True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * rows**0.5 * 4)
        torch.testing.assert_close(sums, a.sum(0), rtol=1e-5, atol=1e-5 * rows**0.5 * 4)
    finally:
        torch.set_num_threads(before)


def test_packed_outer_products_read_column_blocks(packed):
    """Both factors column blocks of wider buffers (GAM-RHN's gate gradients feeding W_s0's gradient)."""
    torch.manual_seed(5)
    abuf, bbuf = torch.randn(300, 270), torch.randn(300, 800)
    a, b = abuf[:, 7:263], bbuf[:, 3:781]
    want = (a.double().t() @ b.double()).float()
    torch.testing.assert_close(torch.ops.seqplat_test_gemm.step_outer(a, b, False)[0], want, rtol=1e-5, atol=1e-3)
