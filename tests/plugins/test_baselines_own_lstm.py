"""The ``lstm`` cell's ``impl="own"`` path (baselines/own_lstm.py): parity with the fused kernel and the
reference step, the custom backward, the C++/PyTorch backends and the config field."""

from __future__ import annotations

import pydantic
import pytest
import torch

from seqplat import SeqplatError, build_cell
from seqplat.core import gemm
from seqplat.core.cpp_ext import extension_cache_dir
from seqplat.core.train import train
from seqplat.plugins.baselines import own_lstm as own
from seqplat.plugins.baselines.cells import LSTMCell, LSTMConfig, RNNBaseConfig
from seqplat.testing import check_cell, gradcheck_cell

EXT_CACHE = extension_cache_dir()  # the user's cache, read before conftest isolates SEQPLAT_CACHE


def _cpp_available() -> bool:
    """Build/load the C++ loop once per session in the persistent cache."""
    return own.load_cpp_extension(cache_dir=EXT_CACHE)


BACKENDS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    not _cpp_available(), reason=f"C++ loop unavailable: {own.cpp_error()}"))]

CASES = {  # id: (config options, batch, time)
    "default": ({}, 3, 6),
    "forget_bias": ({"forget_bias": 1.0}, 3, 6),
    "no_bias": ({"bias": False}, 3, 6),
    "batch_1": ({}, 1, 5),
    "time_1": ({}, 3, 1),
}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force the own path onto one backend (``auto`` would pick cpp whenever it builds)."""
    monkeypatch.setattr(own, "resolve_backend", lambda _backend, _x, forced=request.param: forced)
    return request.param


def _cell(impl: str, hidden: int = 5, input_size: int = 4, **opts) -> LSTMCell:
    torch.manual_seed(0)
    return LSTMCell(input_size, LSTMConfig(hidden_size=hidden, impl=impl, **opts))


def _run(cell: LSTMCell, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, path: str) -> list[torch.Tensor]:
    """Outputs, final state and the gradients of parameters, input and initial state of a mixed loss."""
    leaves = [x, h0, c0]
    for t in [*leaves, *cell.parameters()]:
        t.grad = None
    run = cell.reference_forward if path == "reference" else cell.fast_forward
    y, (h, c) = run(x, (h0, c0))
    wy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    ((y * wy).sum() + (1.5 * h).sum() + (c * c).sum()).backward()
    grads = [t.grad.clone() for t in [*leaves, *cell.parameters()]]
    return [y.detach(), h.detach(), c.detach(), *grads]


@pytest.mark.parametrize("other", ["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_own_matches_fused_and_reference(case, other, backend):
    opts, b, t = CASES[case]
    x = torch.randn(b, t, 4, requires_grad=True)
    h0 = torch.randn(b, 5, requires_grad=True)
    c0 = torch.randn(b, 5, requires_grad=True)
    want_cell = _cell("fused", **opts)
    got_cell = _cell("own", **opts)
    got_cell.load_state_dict(want_cell.state_dict())  # the same parameters, the same names
    want = _run(want_cell, x, h0, c0, "fused" if other == "fused" else "reference")
    got = _run(got_cell, x, h0, c0, "own")
    names = ["y", "h_T", "c_T", "grad x", "grad h0", "grad c0", *(n for n, _ in got_cell.named_parameters())]
    assert len(got) == len(want) == len(names)
    for name, a, e in zip(names, got, want, strict=True):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_forward_of_cell_uses_the_own_path_and_keeps_checkpoint_names(monkeypatch):
    fused, mine = _cell("fused"), _cell("own")
    assert fused.state_dict().keys() == mine.state_dict().keys()
    x = torch.randn(2, 7, 4)
    calls = []
    for fn in (own.LSTMRecurrence, own.LSTMLayer):  # the latter where the C++ loop runs the projection too
        orig = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, orig=orig: calls.append(1) or orig(*a))
    y, _ = mine(x)
    assert calls and y.shape == (2, 7, 5)
    torch.testing.assert_close(y, fused(x)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_recurrence_function_passes_float64_gradcheck(backend, bias):
    torch.manual_seed(0)
    b, t, h = 2, 4, 3
    xp = torch.randn(t, b, 4 * h, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(4 * h, h, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(b, h, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: own.LSTMRecurrence.apply(*a, backend), (xp, w_hh, h0, c0))
    w_ih = torch.randn(4 * h, 3, dtype=torch.float64, requires_grad=True)
    b_ih, b_hh = (torch.randn(4 * h, dtype=torch.float64, requires_grad=True) if bias else None for _ in range(2))
    x = torch.randn(b, t, 3, dtype=torch.float64, requires_grad=True)
    inputs = tuple(v for v in (x, h0, c0, w_ih, w_hh, b_ih, b_hh) if v is not None)

    def layer(x, h0, c0, w_ih, w_hh, *biases):
        bi, bh = biases if biases else (None, None)
        y, (hn, cn) = own.own_lstm(x, h0, c0, w_ih, w_hh, bi, bh, backend)
        return y, hn, cn

    assert torch.autograd.gradcheck(layer, inputs)


def test_conformance_suite_with_impl_own():
    check_cell({"name": "lstm", "hidden_size": 4, "impl": "own"})
    gradcheck_cell({"name": "lstm", "hidden_size": 3, "impl": "own"})


def test_cpp_and_python_backends_agree_float32():
    if not _cpp_available():
        pytest.skip(f"C++ loop unavailable: {own.cpp_error()}")
    torch.manual_seed(0)
    xp, w_hh = torch.randn(7, 3, 4 * 6), torch.randn(4 * 6, 6) * 0.5
    h0, c0 = torch.randn(3, 6), torch.randn(3, 6)
    g_y, g_h, g_c = torch.randn(7, 3, 6), torch.randn(3, 6), torch.randn(3, 6)
    fwd_py, fwd_cpp = own.python_forward(xp, w_hh, h0, c0), own.cpp_ops().forward(xp, w_hh, h0, c0)
    for a, e in zip(fwd_cpp, fwd_py, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
    bwd_py = own.python_backward(*fwd_py, w_hh, g_y, g_h, g_c)
    *bwd_cpp, no_w_ih, no_b = own.cpp_ops().backward(*fwd_py, w_hh, g_y, g_h, g_c)
    for a, e in zip(bwd_cpp, bwd_py, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    assert no_w_ih is None and no_b is None
    # given the projection's input, the backward also returns grad W_ih = sum_t da_t^T x_t and grad b = sum_t da_t
    x = torch.randn(7 * 3, 5)
    *again, g_w_ih, g_b = own.cpp_ops().backward(*fwd_py, w_hh, g_y, g_h, g_c, x)
    for a, e in zip(again, bwd_py, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    da = bwd_py[0].reshape(7 * 3, -1)
    torch.testing.assert_close(g_w_ih, da.t() @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_b, da.sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not gemm.projection_uses_onednn(torch.ones(1), torch.ones(1)),
                    reason="the projection runs inside the C++ loop's function only where it takes oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_layer_with_the_projection_inside_matches_the_reference(bias):
    """float32 at a size where every product and weight gradient takes oneDNN: own_lstm.LSTMLayer's outputs and
    the gradients of x, the state and the parameters equal the reference path's."""
    if not _cpp_available():
        pytest.skip(f"C++ loop unavailable: {own.cpp_error()}")
    cell = _cell("own", hidden=64, input_size=40, bias=bias)
    x = torch.randn(5, 9, 40, requires_grad=True)
    h0, c0 = torch.randn(5, 64, requires_grad=True), torch.randn(5, 64, requires_grad=True)
    got, want = _run(cell, x, h0, c0, "own"), _run(cell, x, h0, c0, "reference")
    assert len(got) == 6 + (4 if bias else 2)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


def test_auto_falls_back_to_python_without_a_compiler(monkeypatch):
    monkeypatch.setattr(own.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    x = torch.randn(2, 3, 4)
    assert own.resolve_backend("auto", x) == "python"
    with pytest.raises(SeqplatError, match=r"lstm \(impl='own'\): the C\+\+ kernel cannot be built"):
        own.resolve_backend("cpp", x)
    cell = _cell("own")
    y, _ = cell(x)
    torch.testing.assert_close(y, cell.reference_forward(x, cell.initial_state(2))[0], atol=1e-5, rtol=1e-4)


def test_auto_uses_cpp_on_cpu_and_python_elsewhere():
    if not _cpp_available():
        pytest.skip(f"C++ loop unavailable: {own.cpp_error()}")
    assert own.resolve_backend("auto", torch.randn(2, 3, 4)) == "cpp"
    assert own.resolve_backend("auto", torch.randn(2, 3, 4, dtype=torch.float64)) == "cpp"
    assert own.resolve_backend("auto", torch.randn(2, 3, 4).half()) == "python"
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        own.resolve_backend("cpp", torch.randn(2, 3, 4).bfloat16())


def test_config_field_default_and_validation():
    assert LSTMConfig().impl == "fused"
    assert LSTMConfig.model_fields["impl"].description
    with pytest.raises(pydantic.ValidationError, match="impl"):
        LSTMConfig(impl="cudnn")
    with pytest.raises(pydantic.ValidationError, match="impl"):
        RNNBaseConfig(impl="own")  # rnn has no such option
    assert build_cell({"name": "lstm", "hidden_size": 4, "impl": "own"}, 3).config.impl == "own"
    with pytest.raises(pydantic.ValidationError):
        build_cell({"name": "rnn", "hidden_size": 4, "impl": "own"}, 3)


def test_train_mode_forward_backward_and_quantizer_falls_back_to_reference():
    cell = _cell("own").train()
    x = torch.randn(2, 6, 4)
    y, (h, c) = cell(x)
    (y.sum() + c.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    cell.activation_quantizers["gate"] = lambda v: v  # any activation quantizer: the core runs the reference
    calls = []
    cell.step = lambda *a, **k: calls.append(1) or LSTMCell.step(cell, *a, **k)  # type: ignore[method-assign]
    cell(x)
    assert len(calls) == 6


def test_trains_inside_the_trainer(tiny_run):
    _cpp_available()
    run = tiny_run({"name": "lstm", "hidden_size": 8, "impl": "own"}, steps=6)
    assert run.cell["impl"] == "own"
    res = train(run, progress=False)
    assert res.steps == 6 and all(torch.isfinite(torch.tensor(v)) for v in res.test_metrics.values())
