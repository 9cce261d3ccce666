"""Tests of the ``rhn`` cell's hand-written backward (:mod:`seqplat.plugins.rhn.fused`).

The fast path trains through :class:`RHNRecurrence`; these pin it to the reference path (``step``
unrolled under autograd) on outputs, final state and every gradient, with and without each dropout,
and ``gradcheck`` the Function itself in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seqplat
from seqplat import build_cell
from seqplat.plugins.rhn import fused
from seqplat.plugins.rhn.fused import RHNRecurrence, rhn_loop, rhn_loop_cpp

DROPOUTS = {
    "none": {},
    "variational": {"input_dropout": 0.3, "hidden_dropout": 0.3, "output_dropout": 0.3},
    "hidden": {"hidden_dropout": 0.4},
    "all": {"input_dropout": 0.3, "hidden_dropout": 0.3, "output_dropout": 0.3, "gate_dropout": 0.3},
    "gate": {"gate_dropout": 0.35},
}


BACKENDS = ["python", "cpp"]


def needs_kernel(backend: str) -> None:
    if backend == "cpp" and not fused.load_cpp_extension():
        pytest.skip(f"C++ kernel unavailable: {fused.cpp_error()}")


def rhn(depth: int, input_bias: bool, **opts) -> nn.Module:
    torch.manual_seed(0)
    return build_cell({"name": "rhn", "hidden_size": 5, "depth": depth, "input_bias": input_bias,
                       "transform_bias": -1.0, **opts}, 3)


def run(cell: nn.Module, x: torch.Tensor, s0: torch.Tensor, *, fast: bool, explicit: bool = True, seed: int = 7):
    """Outputs, final state and the gradients of a loss on both (params, x, s0), one path."""
    cell.use_fast_path = fast
    cell.explicit_backward = explicit
    cell.zero_grad()
    x = x.clone().requires_grad_(True)
    s0 = s0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, s = cell(x, s0)
    g = torch.Generator().manual_seed(1)
    wy, ws = torch.randn(y.shape, generator=g), torch.randn(s.shape, generator=g)
    ((y * wy).sum() + (s * ws).sum()).backward()
    grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    return y.detach(), s.detach(), grads, x.grad, s0.grad


def assert_same(a, b, atol=1e-5, rtol=1e-4):
    ya, sa, ga, gxa, gsa = a
    yb, sb, gb, gxb, gsb = b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=rtol)
    torch.testing.assert_close(sa, sb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(gxa, gxb, atol=atol, rtol=rtol)
    torch.testing.assert_close(gsa, gsb, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", list(DROPOUTS), ids=list(DROPOUTS))
@pytest.mark.parametrize("input_bias", [False, True], ids=["no_in_bias", "in_bias"])
@pytest.mark.parametrize("depth", [1, 3])
def test_explicit_backward_matches_reference_path(depth, input_bias, dropout, backend):
    """Training mode, the same seed: identical masks, so outputs and every gradient agree (both loops)."""
    needs_kernel(backend)
    cell = rhn(depth, input_bias, backend=backend, **DROPOUTS[dropout]).train()
    x, s0 = torch.randn(4, 6, 3), torch.randn(4, 5)
    ref = run(cell, x, s0, fast=False)
    fast = run(cell, x, s0, fast=True)
    if dropout != "none":
        assert not torch.equal(ref[0], run(cell, x, s0, fast=False, seed=8)[0]), "dropout should be on"
    assert_same(fast, ref)
    assert all(g.abs().sum() > 0 for g in fast[2].values())


@pytest.mark.parametrize("dropout", ["none", "all"])
def test_explicit_backward_matches_autograd_fast_loop(dropout):
    cell = rhn(3, True, **DROPOUTS[dropout]).train()
    x, s0 = torch.randn(3, 5, 3), torch.randn(3, 5)
    assert_same(run(cell, x, s0, fast=True), run(cell, x, s0, fast=True, explicit=False))


def test_fast_path_uses_the_function_only_when_gradients_are_needed(monkeypatch):
    calls = []
    apply = RHNRecurrence.apply
    monkeypatch.setattr(RHNRecurrence, "apply", lambda *a: calls.append(1) or apply(*a))
    cell = rhn(2, False).eval()
    x = torch.randn(2, 4, 3)
    with torch.no_grad():
        y0, s0 = cell(x)
    assert not calls
    y1, s1 = cell(x)
    assert calls and y1.requires_grad
    torch.testing.assert_close(y0, y1.detach())
    torch.testing.assert_close(s0, s1.detach())
    for p in cell.parameters():
        p.requires_grad_(False)
    calls.clear()
    y2, _ = cell(x)  # nothing requires grad: the plain loop
    assert not calls and not y2.requires_grad


@pytest.mark.parametrize("dropout", ["none", "all"])
def test_state_carry_across_chunks_with_gradients(dropout):
    """Two chunks with the state carried (not detached): the fast path equals the reference path on
    outputs and every gradient (training mode, same seed), the gradient reaches the initial state
    through both chunks, and without dropout two chunks equal one run."""
    cell = rhn(3, False, **DROPOUTS[dropout]).train()
    x, s0 = torch.randn(2, 6, 3), torch.randn(2, 5)

    def chunks(fast: bool):
        cell.use_fast_path = fast
        cell.zero_grad()
        xg, sg = x.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        torch.manual_seed(3)
        y1, s1 = cell(xg[:, :4], sg)
        y2, s2 = cell(xg[:, 4:], s1)
        y = torch.cat([y1, y2], 1)
        (y.square().sum() + s2.sum()).backward()
        return y.detach(), s2.detach(), {n: p.grad.clone() for n, p in cell.named_parameters()}, xg.grad, sg.grad

    two_fast, two_ref = chunks(True), chunks(False)
    assert_same(two_fast, two_ref)
    assert two_fast[4].abs().sum() > 0
    if dropout == "none":
        one = run(cell, x, s0, fast=True)
        torch.testing.assert_close(two_fast[0], one[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(two_fast[1], one[1], atol=1e-5, rtol=1e-4)


def test_hidden_mask_only_on_the_matmul_input_not_the_carry():
    """R4's carry term uses the unmasked state: with every R^l = 0 the mask must not matter."""
    cell = rhn(2, False, hidden_dropout=0.5).train()
    with torch.no_grad():
        cell.weight_hh.zero_()
    x, s0 = torch.randn(3, 4, 3), torch.randn(3, 5)
    masked = run(cell, x, s0, fast=True)
    cell.config = cell.config.model_copy(update={"hidden_dropout": 0.0})
    plain = run(cell, x, s0, fast=True)
    for a, b in zip(masked[:2] + masked[3:], plain[:2] + plain[3:], strict=True):  # y, s, dx, ds0
        torch.testing.assert_close(a, b)


def _gradcheck_inputs(depth: int, seed: int, steps: int = 3, b: int = 2, n: int = 3):
    """Tiny float64 inputs of the Function: ``xp [T, b, 2n]``, ``s0``, ``w [L, 2n, n]``, ``bias [L, 2n]``."""
    torch.manual_seed(seed)
    dt = torch.float64
    xp = torch.randn(steps, b, 2 * n, dtype=dt, requires_grad=True)
    s0 = torch.randn(b, n, dtype=dt, requires_grad=True)
    w = (0.5 * torch.randn(depth, 2 * n, n, dtype=dt)).requires_grad_(True)
    bias = torch.randn(depth, 2 * n, dtype=dt, requires_grad=True)
    return xp, s0, w, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masks", ["none", "hidden", "gate", "both"])
@pytest.mark.parametrize("depth", [1, 3])
def test_recurrence_gradcheck_float64(depth, masks, backend):
    needs_kernel(backend)
    steps, b, n = 3, 2, 3
    dt = torch.float64
    xp, s0, w, bias = _gradcheck_inputs(depth, seed=0)
    mask_h = torch.bernoulli(torch.full((b, n), 0.6, dtype=dt)) / 0.6 if masks in ("hidden", "both") else None
    mask_g = (torch.bernoulli(torch.full((steps, depth, b, n), 0.6, dtype=dt)) / 0.6
              if masks in ("gate", "both") else None)

    def fn(xp_, s0_, w_, b_):
        return RHNRecurrence.apply(xp_, s0_, w_, b_, mask_h, mask_g, None, None, None, None, False, backend)

    assert torch.autograd.gradcheck(fn, (xp, s0, w, bias), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_inference_loop_equals_training_loop():
    torch.manual_seed(0)
    xp, s0 = torch.randn(4, 2, 6), torch.randn(2, 3)
    w, bias = torch.randn(2, 6, 3), torch.randn(2, 6)
    mask_h = torch.bernoulli(torch.full((2, 3), 0.5)) * 2
    for mh in (None, mask_h):
        ys_a, s_a, saved = rhn_loop(xp, s0, w, bias, mh, None, keep=True)
        ys_b, s_b, none = rhn_loop(xp, s0, w, bias, mh, None, keep=False)
        assert none is None and saved[0].shape == (2, 4, 2, 3)  # [L, T, b, n]: linear in T
        torch.testing.assert_close(ys_a, ys_b, rtol=0, atol=0)
        torch.testing.assert_close(s_a, s_b, rtol=0, atol=0)
        torch.testing.assert_close(ys_a[-1], s_a, rtol=0, atol=0)


@pytest.mark.parametrize("gate", [False, True])
def test_cpp_loop_equals_the_python_loop(gate):
    """Inference (one step's buffers) and training (every step's) give the python loop's states, and the
    kept s_in (the masked state entering each micro-layer) is the same buffer content."""
    needs_kernel("cpp")
    torch.manual_seed(0)
    xp, s0 = torch.randn(5, 2, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    w, bias = torch.randn(3, 6, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    mask_h = torch.bernoulli(torch.full((2, 3), 0.5, dtype=torch.float64)) * 2
    mask_g = torch.bernoulli(torch.full((5, 3, 2, 3), 0.5, dtype=torch.float64)) * 2 if gate else None
    for mh in (None, mask_h):
        ys, s, saved = rhn_loop(xp, s0, w, bias, mh, mask_g, keep=True)
        for keep in (True, False):
            ys_c, s_c, saved_c = rhn_loop_cpp(xp, s0, w, bias, mh, mask_g, keep=keep)
            torch.testing.assert_close(ys_c, ys, atol=1e-12, rtol=0)
            torch.testing.assert_close(s_c, s, atol=1e-12, rtol=0)
            if keep:
                torch.testing.assert_close(saved_c[0], saved[0], atol=1e-12, rtol=0)
            else:
                assert saved_c is None


def test_backend_resolution_and_fallback(monkeypatch):
    x = torch.randn(2, 3, 4)
    monkeypatch.setattr(fused.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    assert fused.resolve_backend("auto", x) == "python"
    with pytest.raises(seqplat.SeqplatError, match=r"rhn: the C\+\+ kernel cannot be built \(simulated: no "
                       r"compiler\); cell.backend='cpp' needs it"):
        fused.resolve_backend("cpp", x)
    with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
        fused.resolve_backend("cpp", x.half())
    y, s = rhn(2, False).train()(torch.randn(2, 4, 3))  # auto -> the python loop, same Function
    assert y.requires_grad and s.shape == (2, 5)


def test_workspace_buffers_are_reused_and_freed_in_eval():
    import copy

    cell = rhn(3, False).train()
    x = torch.randn(2, 4, 3)
    for _ in range(3):
        y, s = cell(x)
        (y.sum() + s.sum()).backward()
    ws = cell._workspace
    held = [bufs[0].data_ptr() for _, bufs, _ in ws._free]
    assert held, "the backward gives its buffers back"
    y, s = cell(x)  # takes them again: no new allocation
    assert len(ws._free) < len(held)
    (y.sum() + s.sum()).backward()
    assert sorted(bufs[0].data_ptr() for _, bufs, _ in ws._free) == sorted(held)
    assert copy.deepcopy(cell)._workspace._free == []
    cell.eval()
    assert ws._free == []


def test_two_graphs_alive_and_retain_graph():
    """Two forwards before one backward take separate buffers; a second backward through a retained
    graph gives the same gradients, and raises once a later forward has reused the buffers."""
    cell = rhn(2, False).train()
    x1, x2 = torch.randn(2, 4, 3), torch.randn(2, 4, 3)

    def grads(fast: bool) -> list[torch.Tensor]:
        cell.use_fast_path = fast
        cell.zero_grad()
        (y1, _), (y2, _) = cell(x1), cell(x2)
        (y1.square().sum() + y2.sum()).backward()
        return [p.grad.clone() for p in cell.parameters()]

    for _ in range(2):  # the second round runs with the workspace filled
        for a, b in zip(grads(True), grads(False), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    cell.use_fast_path = True
    cell.zero_grad()
    cell._workspace.clear()  # one set of buffers in play
    y, _ = cell(x1)
    y.sum().backward(retain_graph=True)
    first = cell.weight_hh.grad.clone()
    y.sum().backward(retain_graph=True)
    torch.testing.assert_close(cell.weight_hh.grad, 2 * first)
    y_other, _ = cell(x2)  # takes the buffers the first graph gave back
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.sum().backward()
    y_other.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["scales", "scales_gate", "all_layers", "all_layers_gate"])
@pytest.mark.parametrize("depth", [1, 3])
def test_recurrence_gradcheck_float64_hyper_variants(depth, variant, backend):
    """The two uses by ``hyper_rhn``: recurrent products scaled by z = P s_hyper + p (eqs. H2, H3), whose
    gradients reach the hyper states and P, p; and every layer's output (eq. H2's input)."""
    steps, b, n, m = 3, 2, 3, 2
    dt = torch.float64
    xp, s0, w, bias = _gradcheck_inputs(depth, seed=1)
    hyper = (torch.randn(depth, steps, b, m, dtype=dt, requires_grad=True),
             torch.randn(depth, n, m, dtype=dt, requires_grad=True),
             torch.randn(depth, n, dtype=dt, requires_grad=True))
    mask_g = torch.bernoulli(torch.full((steps, depth, b, n), 0.6, dtype=dt)) / 0.6 if "gate" in variant else None
    scaled = variant.startswith("scales")
    inputs = (xp, s0, w, bias, *hyper) if scaled else (xp, s0, w, bias)

    needs_kernel(backend)

    def fn(xp_, s0_, w_, b_, *h):
        h = h if scaled else (None, None, None)
        return RHNRecurrence.apply(xp_, s0_, w_, b_, None, mask_g, None, *h, not scaled, backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_all_layers_outputs_are_the_micro_layer_states():
    torch.manual_seed(0)
    xp, s0 = torch.randn(4, 2, 6), torch.randn(2, 3)
    w, bias = torch.randn(3, 6, 3), torch.randn(3, 6)
    every, s_t = RHNRecurrence.apply(xp, s0, w, bias, None, None, None, None, None, None, True)
    ys, s_t2 = RHNRecurrence.apply(xp, s0, w, bias, None, None)
    assert every.shape == (3, 4, 2, 3)
    torch.testing.assert_close(every[-1], ys)
    torch.testing.assert_close(s_t, s_t2)
    s = s0  # micro-layer 2 of step 1 by hand (R1-R4)
    for layer in range(2):
        u = s @ w[layer].T + bias[layer] + (xp[0] if layer == 0 else 0)
        s = s + torch.sigmoid(u[:, 3:]) * (torch.tanh(u[:, :3]) - s)
    torch.testing.assert_close(every[1, 0], s)


# -- hyper_rhn ------------------------------------------------------------------------------------

def hyper(depth: int, **opts) -> nn.Module:
    torch.manual_seed(0)
    return build_cell({"name": "hyper_rhn", "hidden_size": 5, "hyper_size": 3, "depth": depth, **opts}, 3)


def run_hyper(cell: nn.Module, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], *, fast: bool,
              explicit: bool = True, seed: int = 7):
    """Outputs, both final states and the gradients of a loss on all of them (params, x, both s0)."""
    cell.use_fast_path = fast
    cell.explicit_backward = explicit
    cell.zero_grad()
    x = x.clone().requires_grad_(True)
    state = tuple(v.clone().requires_grad_(True) for v in state)
    torch.manual_seed(seed)
    y, (sh, s) = cell(x, state)
    g = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in (y, sh, s))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    return y.detach(), torch.cat([sh, s], 1).detach(), grads, x.grad, torch.cat([v.grad for v in state], 1)


@pytest.mark.parametrize("opts", [{}, {"gate_dropout": 0.35}, {"projection_init": "identity", "init": "uniform",
                                                               "transform_bias": -2.0}],
                         ids=["plain", "gate_dropout", "identity"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("depth", [1, 3])
def test_hyper_explicit_backward_matches_reference_path(depth, opts, backend):
    needs_kernel(backend)
    cell = hyper(depth, backend=backend, **opts).train()
    x, state = torch.randn(4, 6, 3), (torch.randn(4, 3), torch.randn(4, 5))
    ref = run_hyper(cell, x, state, fast=False)
    for _ in range(2):  # the second time with the workspace filled
        assert_same(run_hyper(cell, x, state, fast=True), ref)
    assert_same(run_hyper(cell, x, state, fast=True, explicit=False), ref)
    assert all(g.abs().sum() > 0 for g in ref[2].values())


def test_hyper_cpp_loop_with_rows_on_two_threads_matches_reference_path():
    """Rows split over two threads: the C++ reverse pass sums the bias gradients per thread, then adds the rows.
    A hyper width above the thin products' 32 sends eq. H2's products and their backward through the packed
    route where the build has it."""
    needs_kernel("cpp")
    torch.manual_seed(0)
    cell = build_cell({"name": "hyper_rhn", "hidden_size": 64, "hyper_size": 40, "depth": 2, "gate_dropout": 0.2,
                       "backend": "cpp"}, 3).train()
    x, state = torch.randn(160, 4, 3), (torch.randn(160, 40), torch.randn(160, 64))  # 160 rows: two chunks of 64+
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = run_hyper(cell, x, state, fast=True)
    finally:
        torch.set_num_threads(threads)
    assert_same(fast, run_hyper(cell, x, state, fast=False), atol=1e-4)


def test_hyper_state_carry_across_chunks_with_gradients():
    cell = hyper(2, gate_dropout=0.3).train()
    x, state = torch.randn(2, 6, 3), (torch.randn(2, 3), torch.randn(2, 5))

    def chunks(fast: bool):
        cell.use_fast_path = fast
        cell.zero_grad()
        xg = x.clone().requires_grad_(True)
        s0 = tuple(v.clone().requires_grad_(True) for v in state)
        torch.manual_seed(3)
        y1, s1 = cell(xg[:, :4], s0)
        y2, (sh, s) = cell(xg[:, 4:], s1)
        (torch.cat([y1, y2], 1).square().sum() + sh.sum() + s.sum()).backward()
        return ([p.grad.clone() for p in cell.parameters()], xg.grad, [v.grad for v in s0],
                torch.cat([y1, y2], 1).detach())

    fast, ref = chunks(True), chunks(False)
    for a, b in zip([*fast[0], fast[1], *fast[2], fast[3]], [*ref[0], ref[1], *ref[2], ref[3]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(v.abs().sum() > 0 for v in fast[2])


def test_hyper_no_grad_path_equals_training_path():
    cell = hyper(2).eval()
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        y0, (sh0, s0) = cell(x)
    y1, (sh1, s1) = cell(x)
    assert y1.requires_grad
    for a, b in ((y0, y1), (sh0, sh1), (s0, s1)):
        torch.testing.assert_close(a, b.detach())
