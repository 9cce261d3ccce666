"""SAB's C++ loop (``sab/fused.py``, ``sab_cpu.cpp``) against the reference path.

The loop runs for an ``lstm`` inner cell with the MLP scorer; these tests compare it with the plain
autograd path on outputs, carried state and memory, and the gradients of the inputs, the initial state,
the carried memory and every parameter, over the options the loop implements (both sparsifiers, both
small-memory rules, the threshold detach, ring wrap-around, chunks that start mid-stream, both outputs),
and gradcheck it in float64.
"""

from __future__ import annotations

import pytest
import torch

from seqplat import ConfigError, build_cell
from seqplat.core.config import validate_component
from seqplat.plugins.sab import fused
from seqplat.plugins.sab.cell import SABCell
from seqplat.registry import get_registry


@pytest.fixture(autouse=True)
def _kernel():
    """Skip where the kernel cannot be built (loaded at the first test, not at collection)."""
    if not fused.load_cpp_extension():
        pytest.skip(f"the sab C++ loop cannot be built here: {fused.cpp_error()}")


OPTIONS = {
    "paper": {"hidden_size": 5},
    "ring": {"hidden_size": 6, "k_att": 1, "k_top": 2, "k_trunc": 2, "memory_size": 12},
    "release_rules": {"hidden_size": 6, "k_att": 1, "k_top": 3, "k_trunc": 3, "memory_size": 5,
                      "sparsifier": "official", "small_memory": "raw", "zero_slot": True, "truncation": "official"},
    "state_output": {"hidden_size": 5, "k_att": 2, "k_top": 1, "output": "state", "memory_size": 4},
    "detached_threshold": {"hidden_size": 4, "k_att": 1, "k_top": 2, "detach_threshold": True, "memory_size": 20},
    "tbptt_only": {"hidden_size": 4, "k_att": 3, "k_top": 0, "k_trunc": 5},
    "softmax_no_truncation": {"hidden_size": 4, "k_att": 1, "k_top": 8, "k_trunc": 0, "memory_size": 30},
    "lstm_without_bias": {"hidden_size": 4, "inner": {"name": "lstm", "bias": False}, "k_att": 1, "k_top": 2,
                          "memory_size": 10},
    "narrow_scorer": {"hidden_size": 4, "k_att": 1, "k_top": 2, "k_trunc": None, "memory_size": 30,
                      "score_size": 3},
}


def _cell(options: dict, dtype: torch.dtype = torch.float64) -> SABCell:
    torch.manual_seed(0)
    cell = build_cell({"name": "sab", **options}, 4)
    assert isinstance(cell, SABCell)
    return cell.to(dtype)


def _run(cell: SABCell, x: torch.Tensor, start: int, fast: bool) -> list[torch.Tensor]:
    """Outputs, final state and memory, and the gradients of x, h_0, c_0, the memory and every parameter
    for a random loss over all of them, from a random state and memory at stream position ``start``."""
    cell.use_fast_path = fast
    cell.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    (h0, c0), memory, step = cell.initial_state(x.shape[0], dtype=x.dtype)
    leaves = [torch.randn(t.shape, generator=g, dtype=x.dtype).requires_grad_() for t in (h0, c0, memory)]
    xg = x.clone().requires_grad_()
    y, ((h_n, c_n), mem_n, step_n) = cell(xg, ((leaves[0], leaves[1]), leaves[2], step + start))
    assert torch.equal(step_n, step + start + x.shape[1])
    outs = [y, h_n, c_n, mem_n]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=x.dtype)).sum() for o in outs)
    loss.backward()
    params = [p.grad if p.grad is not None else torch.zeros_like(p) for p in cell.parameters()]
    return [o.detach() for o in outs] + [xg.grad] + [t.grad for t in leaves] + params


@pytest.mark.parametrize("start", [0, 9], ids=["stream_start", "mid_stream"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_cpp_loop_equals_the_reference_path(name, start):
    cell = _cell(OPTIONS[name])
    x = torch.randn(3, 24, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert fused.applies(cell, x, None)
    ref = _run(cell, x, start, fast=False)
    got = _run(cell, x, start, fast=True)
    labels = ["y", "h_T", "c_T", "memory_T", "grad x", "grad h_0", "grad c_0", "grad memory"]
    labels += [f"grad {n}" for n, _ in cell.named_parameters()]
    for label, a, b in zip(labels, got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m, n=label: f"{name}: {n}: {m}")


def test_cpp_loop_in_float32_at_a_larger_size():
    """Default options, H=32, 40 steps, float32: within float32 rounding of the reference path."""
    cell = _cell({"hidden_size": 32, "memory_size": 16}, torch.float32)
    x = torch.randn(4, 40, 4, generator=torch.Generator().manual_seed(3))
    ref = _run(cell, x, 0, fast=False)
    got = _run(cell, x, 0, fast=True)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"output/gradient {i} differs from the reference path by {err:.2e}"


def test_cpp_loop_gradcheck():
    """float64 gradcheck of the autograd Function itself (no truncation: a cut is a deliberate detach)."""
    cell = _cell({"hidden_size": 3, "k_att": 1, "k_top": 2, "k_trunc": None, "memory_size": 3,
                  "sparsifier": "official", "score_size": 2})
    x = torch.randn(2, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (h0, c0), memory, _ = cell.initial_state(2, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    h0, c0, memory = (torch.randn(t.shape, generator=g, dtype=torch.float64).requires_grad_() for t in (h0, c0, memory))
    sched = fused.schedule(cell, 0, x.shape[1], memory.shape[1])
    opts = (2, True, False, 1e-7, True, False)
    s = cell.scorer
    xp = torch.randn(6, 2, 12, dtype=torch.float64, generator=g, requires_grad=True)
    inputs = (xp, cell.inner.rnn.weight_hh_l0, h0, c0, memory, s.query_proj.weight, s.query_proj.bias,
              s.key_proj.weight, s.out.weight)
    # xp given as it is (no projection inside: W_ih and b None)
    assert torch.autograd.gradcheck(lambda xp, *a: fused.SABLoop.apply(sched, opts, xp, None, None, *a), inputs)


@pytest.mark.parametrize("options, reason", [
    ({"inner": {"name": "gru"}}, "another inner cell"),
    ({"scorer": "official"}, "the release's scorer"),
    ({"hidden_state_index": 1}, "the summary joins c"),
    ({"inner": {"name": "lstm", "impl": "own"}}, None),
])
def test_cpp_loop_applies_to_an_lstm_with_the_mlp_scorer_only(options, reason):
    cell = _cell({"hidden_size": 4, **options}, torch.float32)
    x = torch.randn(2, 5, 4)
    assert fused.applies(cell, x, None) is (reason is None), reason
    cell.inner.zoneout_prob = 0.5
    assert not fused.applies(cell, x, None)
    cell.inner.zoneout_prob = 0.0
    cell.record_trace = True
    assert not fused.applies(cell, x, None)
    cell.record_trace = False
    assert not fused.applies(cell, x.to(torch.bfloat16), None)


def test_backend_option_picks_or_insists_on_the_loop():
    x = torch.randn(2, 5, 4)
    assert not fused.applies(_cell({"hidden_size": 4, "backend": "python"}, torch.float32), x, None)
    cell = _cell({"hidden_size": 4, "backend": "cpp"}, torch.float32)
    assert fused.applies(cell, x, None)
    cell.inner.zoneout_prob = 0.5
    with pytest.raises(ValueError, match="backend 'cpp' cannot run this call: the inner cell has zoneout"):
        fused.applies(cell, x, None)
    cell.inner.zoneout_prob = 0.0
    with pytest.raises(ValueError, match="backend 'cpp' runs float32/float64 CPU tensors"):
        fused.applies(cell, x.to(torch.bfloat16), None)
    with pytest.raises(ConfigError, match="backend: 'cpp' runs an lstm inner cell with the mlp scorer"):
        validate_component("cell", {"name": "sab", "inner": {"name": "gru"}, "backend": "cpp"}, "cell", get_registry())


def test_python_backend_gives_the_same_result_as_the_cpp_loop():
    x = torch.randn(3, 24, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    options = OPTIONS["ring"]
    got = {backend: _run(_cell({**options, "backend": backend}), x, 3, fast=True) for backend in ("cpp", "python")}
    for a, b in zip(got["cpp"], got["python"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("memory_grad", [False, True], ids=["memory_constant", "memory_needs_grad"])
def test_outputs_left_unused_get_no_gradient_work(memory_grad):
    """A loss of y alone (state and memory outputs unused): the same gradients as the reference path."""
    cell = _cell(OPTIONS["ring"])
    x = torch.randn(2, 20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = []
    for fast in (False, True):
        cell.use_fast_path = fast
        cell.zero_grad(set_to_none=True)
        inner, memory, step = cell.initial_state(2, dtype=torch.float64)
        memory = torch.randn(memory.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
        memory.requires_grad_(memory_grad)
        y, _ = cell(x, (inner, memory, step + 5))
        y.square().sum().backward()
        got.append([p.grad for p in cell.parameters()] + ([memory.grad] if memory_grad else []))
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
