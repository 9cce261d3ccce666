"""The per-step products of the C++ loops (``core/include/seqplat_gemm.h``): large float32 recurrent
matrices go through oneDNN's inner product, the rest through ``at::mm``. Both routes, forced with
``SEQPLAT_STEP_GEMM``, give the reference path's outputs and gradients at a size where auto picks oneDNN."""

from __future__ import annotations

import pytest
import torch

from seqplat import build_cell
from seqplat.core.cpp_ext import extension_cache_dir
from seqplat.plugins.baselines import own_gru, own_lstm
from seqplat.plugins.phased_lstm import scan as phased_scan
from seqplat.plugins.rhn import fused as rhn_fused

EXT_CACHE = extension_cache_dir()  # the user's cache, read before conftest isolates SEQPLAT_CACHE

# recurrent matrices of at least 2^20 elements (the oneDNN threshold): 4*512*512, 3*600*600, 2*725*725
CASES = {
    "lstm_own": ({"name": "lstm", "impl": "own", "hidden_size": 512}, own_lstm),
    "gru_own": ({"name": "gru", "impl": "own", "hidden_size": 600}, own_gru),
    "rhn": ({"name": "rhn", "hidden_size": 725, "depth": 2}, rhn_fused),
    "phased_lstm": ({"name": "phased_lstm", "hidden_size": 512}, phased_scan),
}


def _outputs_and_grads(cell, x, times, fast: bool) -> list[torch.Tensor]:
    cell.use_fast_path = fast
    cell.zero_grad()
    xg = x.clone().requires_grad_()
    y, _ = cell(xg, times=times) if times is not None else cell(xg)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach(), xg.grad, *(p.grad for p in cell.parameters())]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("case", list(CASES))
def test_both_routes_of_the_step_product_give_the_reference_outputs_and_gradients(case, monkeypatch):
    spec, kernel = CASES[case]
    if not kernel.load_cpp_extension(cache_dir=EXT_CACHE):
        pytest.skip(f"C++ loop unavailable: {kernel.cpp_error()}")
    torch.manual_seed(0)
    cell = build_cell(spec, 8)
    x = torch.randn(2, 3, 8)
    times = torch.cumsum(torch.rand(2, 3) + 0.5, 1) if case == "phased_lstm" else None
    ref = _outputs_and_grads(cell, x, times, fast=False)
    got = {}
    for route in ("mm", "onednn", "auto"):
        monkeypatch.setenv("SEQPLAT_STEP_GEMM", route)  # read by the kernel once per call
        got[route] = _outputs_and_grads(cell, x, times, fast=True)
    for route, values in got.items():
        for a, b in zip(values, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m, r=route: f"{case} {r}: {m}")
