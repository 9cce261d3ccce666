"""The hand loops of ``core/include/seqplat_gemm.h`` for products whose right factor has at most 32 rows or
columns (GAM-RHN's memory reads and writes): the same values as ``torch.mm`` for every shape class the
loops split on (chunk remainders, rows in parallel, strided rows of x and of the output, accumulation),
and out of the way when ``SEQPLAT_STEP_GEMM`` forces a library route."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seqplat.core.cpp_ext import CppKernel, extension_cache_dir

EXT_CACHE = extension_cache_dir()  # the user's cache, read before conftest isolates SEQPLAT_CACHE
KERNEL = CppKernel(Path(__file__).with_name("thin_products.cpp"), "seqplat_test_gemm", "thin products test")
LIBRARY, INNER, OUTER = 0, 1, 2


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
    (4, 33, 33, LIBRARY),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rows", "k", "n", "route"), SHAPES)
def test_thin_products_match_mm(step_product, rows, k, n, route, dtype, monkeypatch):
    monkeypatch.delenv("SEQPLAT_STEP_GEMM", raising=False)
    torch.manual_seed(0)
    x = torch.randn(rows, k, dtype=dtype)
    m = torch.randn(k, n, dtype=dtype)
    want = x @ m
    out = torch.full((rows, n), float("nan"), dtype=dtype)
    assert step_product(out, x, m, False) == route
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
def test_forcing_a_library_route_turns_the_thin_loops_off(step_product, route, monkeypatch):
    monkeypatch.setenv("SEQPLAT_STEP_GEMM", route)
    x, m = torch.randn(4, 10), torch.randn(10, 50)
    out = torch.empty(4, 50)
    assert step_product(out, x, m, False) == LIBRARY
    torch.testing.assert_close(out, x @ m)
