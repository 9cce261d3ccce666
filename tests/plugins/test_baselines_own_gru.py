"""The ``gru`` cell's ``impl="own"`` path (baselines/own_gru.py): parity with torch's fused kernel and the
reference step on outputs and every gradient, gradcheck of the custom backward, the fallback and the config."""

from __future__ import annotations

import pydantic
import pytest
import torch

from seqplat import build_cell
from seqplat.core.cpp_ext import extension_cache_dir
from seqplat.core.train import train
from seqplat.plugins.baselines import own_gru
from seqplat.plugins.baselines.cells import GRUCell, GRUConfig
from seqplat.testing import check_cell, gradcheck_cell

EXT_CACHE = extension_cache_dir()  # the user's cache, read before conftest isolates SEQPLAT_CACHE

pytestmark = pytest.mark.skipif(not own_gru.load_cpp_extension(cache_dir=EXT_CACHE),
                                reason=f"C++ loop unavailable: {own_gru.cpp_error()}")

CASES = {  # id: (config options, batch, time)
    "default": ({}, 3, 6),
    "no_bias": ({"bias": False}, 3, 6),
    "batch_1": ({}, 1, 5),
    "time_1": ({}, 3, 1),
}


def _cell(impl: str, **opts) -> GRUCell:
    torch.manual_seed(0)
    return GRUCell(4, GRUConfig(hidden_size=5, impl=impl, **opts)).double()


def _run(cell: GRUCell, x: torch.Tensor, h0: torch.Tensor, path: str) -> list[torch.Tensor]:
    """Outputs, final state and the gradients of input, initial state and parameters of a mixed loss."""
    for t in [x, h0, *cell.parameters()]:
        t.grad = None
    run = cell.reference_forward if path == "reference" else cell.fast_forward
    y, h = run(x, h0)
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    ((y * wy).sum() + (h * h).sum()).backward()
    return [y.detach(), h.detach(), *(t.grad.clone() for t in [x, h0, *cell.parameters()])]


@pytest.mark.parametrize("other", ["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_own_matches_fused_and_reference(case, other):
    opts, b, t = CASES[case]
    x = torch.randn(b, t, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(b, 5, dtype=torch.float64, requires_grad=True)
    want_cell, got_cell = _cell("fused", **opts), _cell("own", **opts)
    got_cell.load_state_dict(want_cell.state_dict())  # the same parameters, the same names
    want = _run(want_cell, x, h0, "fused" if other == "fused" else "reference")
    got = _run(got_cell, x, h0, "own")
    names = ["y", "h_T", "grad x", "grad h0", *(n for n, _ in got_cell.named_parameters())]
    assert len(got) == len(want) == len(names)
    for name, a, e in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_the_cell_runs_the_own_function():
    cell = _cell("own")
    calls = []
    orig = own_gru.GRURecurrence.apply
    own_gru.GRURecurrence.apply = lambda *a: calls.append(1) or orig(*a)  # type: ignore[method-assign]
    try:
        y, h = cell(torch.randn(2, 7, 4, dtype=torch.float64))
    finally:
        own_gru.GRURecurrence.apply = orig  # type: ignore[method-assign]
    assert calls and y.shape == (2, 7, 5) and torch.equal(y[:, -1], h)


def test_recurrence_function_passes_float64_gradcheck():
    torch.manual_seed(0)
    b, t, h = 2, 4, 3
    args = (torch.randn(t, b, 3 * h, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * h, h, dtype=torch.float64, requires_grad=True),
            torch.randn(3 * h, dtype=torch.float64, requires_grad=True),
            torch.randn(b, h, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(own_gru.GRURecurrence.apply, args)


def test_conformance_suite_with_impl_own():
    check_cell({"name": "gru", "hidden_size": 4, "impl": "own"})
    gradcheck_cell({"name": "gru", "hidden_size": 3, "impl": "own"})


def test_without_a_kernel_the_fused_gru_runs(monkeypatch):
    monkeypatch.setattr(own_gru.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    cell = _cell("own")
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert not own_gru.usable(x)
    torch.testing.assert_close(cell(x)[0], cell.rnn(x, torch.zeros(1, 2, 5, dtype=torch.float64))[0])


def test_config_field_default_and_validation():
    assert GRUConfig().impl == "fused" and GRUConfig.model_fields["impl"].description
    with pytest.raises(pydantic.ValidationError, match="impl"):
        GRUConfig(impl="cudnn")
    assert build_cell({"name": "gru", "hidden_size": 4, "impl": "own"}, 3).config.impl == "own"


def test_trains_inside_the_trainer(tiny_run):
    run = tiny_run({"name": "gru", "hidden_size": 8, "impl": "own"}, steps=6)
    res = train(run, progress=False)
    assert res.steps == 6 and all(torch.isfinite(torch.tensor(v)) for v in res.test_metrics.values())
