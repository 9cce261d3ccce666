"""Tests of the phased_lstm plugin: the time gate, the cell against an independent peephole LSTM,
the hold properties, the update statistics, the frequency and N-MNIST tasks, the recipes and the CLI.
Comments "spec N" refer to the numbered list in section 5 of papers/phased_lstm.md."""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import seqplat
import seqplat.plugins.phased_lstm as plugin_module
from seqplat import (
    ConfigError,
    DataError,
    Task,
    TaskConfig,
    build_cell,
    build_model,
    build_run_config,
    count_parameters,
)
from seqplat.core import gemm
from seqplat.core.model import build_task
from seqplat.core.train import train
from seqplat.plugins.phased_lstm import scan
from seqplat.plugins.phased_lstm.cell import PhasedLSTMCell, mean_openness_uniform, time_gate
from seqplat.plugins.phased_lstm.freq import FreqDiscriminationTask
from seqplat.plugins.phased_lstm.nmnist import NUM_ADDRESSES, decode_events, encode_events, read_archive
from seqplat.registry import Registry, get_registry
from seqplat.testing import check_cell, gradcheck_cell

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins" / "phased_lstm.md"
SPECS = {
    "default": {"name": "phased_lstm", "hidden_size": 4},
    "open_all_learned": {"name": "phased_lstm", "hidden_size": 4, "r_on_init": 0.9, "log_period_init": [0.0, 1.0],
                         "learn_r_on": True},
    "paper_sign_no_peep": {"name": "phased_lstm", "hidden_size": 4, "peepholes": False, "shift_sign": "paper",
                           "shift_init_max": 3.0, "r_on_init": 0.5},
    "step_index": {"name": "phased_lstm", "hidden_size": 4, "time_source": "step_index", "r_on_init": 0.5},
    "bypass": {"name": "phased_lstm", "hidden_size": 4, "time_gate": False},
}


def plstm(input_size: int = 3, double: bool = True, **options) -> PhasedLSTMCell:
    torch.manual_seed(0)
    cell = build_cell({"name": "phased_lstm", "hidden_size": 5, **options}, input_size)
    assert isinstance(cell, PhasedLSTMCell)
    return cell.double() if double else cell


def set_gate(cell: PhasedLSTMCell, period: float, shift: float, r_on: float) -> None:
    with torch.no_grad():
        cell.period.fill_(period)
        cell.shift.fill_(shift)
        cell.r_on.fill_(r_on)


def run(cell, x, times, fast: bool, state=None):
    cell.use_fast_path = fast
    try:
        return cell(x, state, times=times)
    finally:
        cell.use_fast_path = True


def outputs_and_grads(cell, x, times, fast: bool):
    x = x.clone().requires_grad_(True)
    cell.zero_grad(set_to_none=True)
    y, (h, c) = run(cell, x, times, fast)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    ((y * w).sum() + (c**2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in cell.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def peephole_lstm(cell: PhasedLSTMCell, x: torch.Tensor) -> torch.Tensor:
    """An independent peephole LSTM (no time gate) on the cell's weights, written from the equations."""
    b, n, _ = x.shape
    hid = cell.config.hidden_size
    h = x.new_zeros(b, hid)
    c = x.new_zeros(b, hid)
    w_x, w_h, bias, peep = cell.weight_ih, cell.weight_hh, cell.bias, cell.peephole
    ys = []
    for j in range(n):
        z = x[:, j] @ w_x + bias + h @ w_h
        zi, zf, zg, zo = z.split(hid, dim=1)
        i = torch.sigmoid(zi + peep[0] * c)
        f = torch.sigmoid(zf + peep[1] * c)
        c = f * c + i * torch.tanh(zg)
        o = torch.sigmoid(zo + peep[2] * c)
        h = o * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys, 1)


# -- registry and conformance -----------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    info = reg.get_plugin("phased_lstm")
    assert not info.broken, info.error
    assert reg.plugin_of("cell", "phased_lstm") == "phased_lstm"
    assert {"freq_discrimination", "nmnist"} <= set(info.registered["task"])
    assert {f"phased_lstm/{r}" for r in ("default", "freq_regular", "freq_highres", "freq_async",
                                         "freq_async_lstm", "nmnist")} <= set(reg.names("recipe"))


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_conformance_and_gradcheck(spec):
    check_cell(spec)
    gradcheck_cell(spec)


def test_gradcheck_in_training_mode_reaches_time_parameters():
    """The leak is on in training, so gradients reach tau, s and r_on through every branch."""
    cell = plstm(input_size=2, learn_r_on=True, r_on_init=0.3, log_period_init=[0.5, 1.5]).train()
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    times = torch.cumsum(torch.rand(2, 6, dtype=torch.float64) + 0.3, 1)
    names = [n for n, p in cell.named_parameters()]
    params = list(cell.parameters())
    for fast in (False, True):
        def fn(*ps, fast=fast):
            with torch.nn.utils.stateless._reparametrize_module(cell, dict(zip(names, ps, strict=True))):
                return run(cell, x, times, fast)[0]

        assert torch.autograd.gradcheck(fn, tuple(params), eps=1e-6, atol=1e-6, rtol=1e-4)
    y = run(cell, x, times, True)[0]
    y.sum().backward()
    for p in (cell.period, cell.shift, cell.r_on):
        assert p.grad is not None and p.grad.abs().sum() > 0


def needs_kernel():
    if not scan.load_cpp_extension():
        pytest.skip(f"C++ kernel unavailable: {scan.cpp_error()}")


@pytest.mark.parametrize("backend", ["python", "cpp"])
@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no_clip", "gate_clip"])
def test_fast_path_matches_reference_in_training_mode(clip, backend):
    if backend == "cpp":
        needs_kernel()
    cell = plstm(r_on_init=0.4, log_period_init=[0.0, 1.5], learn_r_on=True, gate_grad_clip=clip,
                 backend=backend).train()
    x = torch.randn(3, 9, 3, dtype=torch.float64)
    times = torch.cumsum(torch.rand(3, 9, dtype=torch.float64), 1)
    times[0, :3] = float("nan")  # left padding of one row
    y_r, gx_r, g_r = outputs_and_grads(cell, x, times, fast=False)
    y_f, gx_f, g_f = outputs_and_grads(cell, x, times, fast=True)
    torch.testing.assert_close(y_f, y_r)
    torch.testing.assert_close(gx_f, gx_r)
    assert g_f.keys() == g_r.keys()
    for k in g_r:
        torch.testing.assert_close(g_f[k], g_r[k], msg=k)


@pytest.mark.skipif(not gemm.projection_uses_onednn(torch.ones(1), torch.ones(1)),
                    reason="the projection runs inside the C++ op's function only where it takes oneDNN")
@pytest.mark.parametrize("peepholes", [True, False])
@pytest.mark.parametrize("clip", [None, 1e-3], ids=["no_clip", "gate_clip"])
def test_projection_inside_the_cpp_function_matches_the_reference(clip, peepholes, monkeypatch):
    """float32 at H=64, where the fast path runs the input projection inside scan.PhasedLayerCpp and takes dW_x,
    db and dW_h from the C++ backward: outputs and all gradients match the reference path."""
    needs_kernel()
    calls = []
    original = scan.PhasedLayerCpp.apply
    monkeypatch.setattr(scan.PhasedLayerCpp, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    cell = build_cell({"name": "phased_lstm", "hidden_size": 64, "peepholes": peepholes, "learn_r_on": True,
                       "gate_grad_clip": clip}, 20).train()
    x = torch.randn(4, 12, 20)
    times = torch.cumsum(torch.rand(4, 12), 1)
    times[0, :3] = float("nan")  # left padding of one row
    y_r, gx_r, g_r = outputs_and_grads(cell, x, times, fast=False)
    assert not calls
    y_f, gx_f, g_f = outputs_and_grads(cell, x, times, fast=True)
    assert calls
    torch.testing.assert_close(y_f, y_r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=1e-4)
    assert g_f.keys() == g_r.keys()
    for k in g_r:
        err = ((g_f[k] - g_r[k]).norm() / g_r[k].norm().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{k}: {err:.2e}"


def test_gate_gradient_clip_changes_the_backward_only():
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    times = torch.cumsum(torch.rand(2, 6, dtype=torch.float64), 1)
    free = plstm(r_on_init=0.6, log_period_init=[0.0, 1.0])
    clipped = plstm(r_on_init=0.6, log_period_init=[0.0, 1.0], gate_grad_clip=1e-4)
    y1, gx1, _ = outputs_and_grads(free, x, times, fast=True)
    y2, gx2, _ = outputs_and_grads(clipped, x, times, fast=True)
    assert torch.equal(y1, y2)
    assert gx2.abs().max() < gx1.abs().max()


# -- the C++ backend -----------------------------------------------------------------------------

@pytest.mark.parametrize("peephole", [True, False])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_cpp_scan_equals_the_python_scan_and_passes_gradcheck(peephole, clip):
    """The kernel's loops give the python loops' outputs and every gradient (float64, with clipping)."""
    needs_kernel()
    g = torch.Generator().manual_seed(0)
    n, b, h = 7, 3, 5

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    args = [rand(n, b, 4 * h), torch.rand(n, b, h, generator=g, dtype=torch.float64).requires_grad_(), rand(b, h),
            rand(b, h), rand(h, 4 * h, scale=0.3), rand(3, h) if peephole else None]
    inputs = [a for a in args if a is not None]
    results = []
    for fn in (scan.PhasedLSTMScan, scan.PhasedLSTMScanCpp):
        y, c = fn.apply(*args, clip)
        w = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=w, dtype=y.dtype)).sum() + (c * c).sum()
        results.append([y.detach(), c.detach(), *torch.autograd.grad(loss, inputs)])
    for a, b_ in zip(*results, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-13, rtol=1e-11)
    if clip is None:  # clipping makes the backward differ from the forward's derivative on purpose
        assert torch.autograd.gradcheck(lambda *a: scan.PhasedLSTMScanCpp.apply(*a, None), tuple(args))


def test_cpp_time_gate_equals_the_formula_with_padding_and_passes_gradcheck():
    """One C++ pass gives (T1)-(T2) with NaN timestamps as 0 (no gradient), in float64 or written as float32."""
    needs_kernel()
    g = torch.Generator().manual_seed(0)
    t = torch.rand(6, 3, generator=g, dtype=torch.float64) * 1000
    t[1, 2] = t[4, 0] = float("nan")
    period = (torch.rand(7, generator=g, dtype=torch.float64) * 20 + 1).requires_grad_()
    shift = (torch.rand(7, generator=g, dtype=torch.float64) * 20).requires_grad_()
    r_on = (torch.rand(7, generator=g, dtype=torch.float64) * 0.5 + 0.05).requires_grad_()
    valid = ~torch.isnan(t)
    gk = torch.randn(6, 3, 7, generator=g, dtype=torch.float64)
    ref = torch.where(valid.unsqueeze(-1), time_gate(torch.where(valid, t, 0.0).unsqueeze(-1), period, shift, r_on,
                                                     1e-3), 0.0)
    got = scan.time_gate_cpp(t, period, shift, r_on, 1e-3, torch.float64)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert got[1, 2].abs().sum() == 0 and got[4, 0].abs().sum() == 0
    for a, b in zip(torch.autograd.grad((got * gk).sum(), [period, shift, r_on]),
                    torch.autograd.grad((ref * gk).sum(), [period, shift, r_on]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    low = scan.time_gate_cpp(t, period, shift, r_on, 1e-3, torch.float32)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref.detach().float())
    assert torch.autograd.gradcheck(lambda p, s, r: scan.time_gate_cpp(t, p, s, r, 1e-3, torch.float64),
                                    (period, shift, r_on))


def test_backend_resolution_and_fallback(monkeypatch):
    x = torch.randn(2, 3, 4)
    monkeypatch.setattr(scan.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    assert scan.resolve_backend("auto", x) == "python"
    with pytest.raises(seqplat.SeqplatError, match=r"phased_lstm: the C\+\+ kernel cannot be built \(simulated: no "
                       r"compiler\); cell.backend='cpp' needs it"):
        scan.resolve_backend("cpp", x)
    with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
        scan.resolve_backend("cpp", x.half())
    cell = plstm(double=False)
    y, _ = cell(torch.randn(2, 4, 3), times=torch.arange(4.0).expand(2, 4))  # auto -> python: still the fast path
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        seen.add(type(node).__name__)
        nodes.extend(n for n, _ in node.next_functions if n is not None)
    assert "PhasedLSTMScanBackward" in seen and "PhasedLSTMScanCppBackward" not in seen


# -- the time gate -------------------------------------------------------------------------------

def test_gate_shape():  # spec 1
    r_on, alpha, tau = 0.1, 1e-3, 10.0
    p, s, r = (torch.tensor([tau], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
               torch.tensor([r_on], dtype=torch.float64))

    def k(phi):
        return float(time_gate(torch.tensor([[phi * tau]], dtype=torch.float64), p, s, r, alpha))

    assert k(0.0) == 0.0
    assert k(r_on / 2) == pytest.approx(1.0)
    assert 0.0 < k(r_on - 1e-9) < 1e-6
    for a, b in ((0.01, 0.03), (0.06, 0.09), (0.2, 0.7)):  # linear on each branch
        assert k((a + b) / 2) == pytest.approx((k(a) + k(b)) / 2)
    assert k(0.02) == pytest.approx(2 * 0.02 / r_on) and k(0.07) == pytest.approx(2 - 2 * 0.07 / r_on)
    closed = [k(phi) for phi in np.linspace(r_on + 1e-9, 1 - 1e-9, 101)]
    assert min(closed) >= alpha * r_on - 1e-12 and max(closed) < alpha
    assert k(0.5) == pytest.approx(alpha * 0.5)


def test_open_fraction_and_mean_openness():  # spec 2
    r_on, alpha = 0.05, 1e-3
    t = torch.linspace(0, 1, 400_001, dtype=torch.float64)[:-1].unsqueeze(-1)  # phi uniform on [0, 1)
    one = torch.ones(1, dtype=torch.float64)
    k = time_gate(t, one, 0 * one, r_on * one, alpha)
    assert float((t < r_on).double().mean()) == pytest.approx(r_on, abs=1e-5)
    assert float(k.mean()) == pytest.approx(mean_openness_uniform(r_on, alpha), abs=1e-6)
    assert mean_openness_uniform(r_on, alpha) == pytest.approx(0.0255, abs=1e-4)


def test_update_fraction_matches_r_on_for_random_times():
    cell = plstm(input_size=1, hidden_size=64, r_on_init=0.05).eval()
    times = torch.rand(16, 400, dtype=torch.float64) * 5000.0
    with torch.no_grad():
        cell(torch.zeros(16, 400, 1, dtype=torch.float64), None, times=times)
    metrics = cell.extra_metrics()
    assert metrics["update_fraction"] == pytest.approx(0.05, abs=0.005)
    assert metrics["mean_openness"] == pytest.approx(0.025, abs=0.003)


def test_mod_gradient():  # spec 7
    t = torch.tensor([[57.3], [3.2], [130.9]], dtype=torch.float64)
    tau = torch.tensor([4.1, 7.3], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.7, 40.2], dtype=torch.float64, requires_grad=True)
    r_on = torch.tensor([0.6, 0.6], dtype=torch.float64)
    k = time_gate(t, tau, s, r_on, 1e-3)
    g_tau, g_s = torch.autograd.grad(k.sum(), (tau, s))
    eps = 1e-7
    tau, s = tau.detach(), s.detach()
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = eps
        fd_tau = (time_gate(t, tau + e, s, r_on, 1e-3) - time_gate(t, tau - e, s, r_on, 1e-3)).sum() / (2 * eps)
        fd_s = (time_gate(t, tau, s + e, r_on, 1e-3) - time_gate(t, tau, s - e, r_on, 1e-3)).sum() / (2 * eps)
        assert float(g_tau[i]) == pytest.approx(float(fd_tau), rel=1e-5)
        assert float(g_s[i]) == pytest.approx(float(fd_s), rel=1e-5)
    # the phase's period derivative includes -floor((t + s) / tau)
    tau1 = tau[:1].clone().requires_grad_(True)
    phi = torch.remainder(t[:1] + s[:1], tau1) / tau1
    (g,) = torch.autograd.grad(phi.sum(), tau1)
    u = float(t[0, 0] + s[0])
    tv = float(tau[0])
    assert float(g) == pytest.approx((-math.floor(u / tv) * tv - math.fmod(u, tv)) / tv**2)


def test_official_sign_equals_paper_sign_with_negated_shift():  # spec 9
    code = plstm(shift_sign="code", r_on_init=0.4, log_period_init=[0.0, 1.5])
    paper = plstm(shift_sign="paper", r_on_init=0.4, log_period_init=[0.0, 1.5])
    with torch.no_grad():
        paper.shift.copy_(-code.shift)
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    times = torch.cumsum(torch.rand(2, 8, dtype=torch.float64), 1)
    assert torch.equal(code(x, times=times)[0], paper(x, times=times)[0])
    with torch.no_grad():
        paper.shift.copy_(code.shift)
    assert not torch.allclose(code(x, times=times)[0], paper(x, times=times)[0])


# -- the cell -----------------------------------------------------------------------------------

def test_gate_bypass_is_bit_identical_to_a_peephole_lstm():  # spec 3
    cell = plstm(time_gate=False)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    times = torch.cumsum(torch.rand(2, 7, dtype=torch.float64), 1)
    ref = peephole_lstm(cell, x)
    assert torch.equal(run(cell, x, times, fast=False)[0], ref)
    torch.testing.assert_close(run(cell, x, times, fast=True)[0], ref, rtol=1e-12, atol=1e-12)
    # r_on = 1 is not an LSTM: k is a triangle wave with mean 0.5
    tri = plstm(r_on_init=1.0, r_on_min=1e-3)
    assert not torch.allclose(tri(x, times=times)[0], ref)
    set_gate(tri, period=2.0, shift=0.0, r_on=1.0)
    with torch.no_grad():
        k = tri.openness(torch.linspace(0, 50, 20001, dtype=torch.float64)[:-1])
    assert float(k.mean()) == pytest.approx(0.5, abs=1e-3) and float(k.max()) == pytest.approx(1.0)


def test_perfect_hold_when_closed():  # spec 4
    cell = plstm(r_on_init=0.5).eval()
    set_gate(cell, period=10.0, shift=0.0, r_on=0.5)
    times = torch.tensor([[0.5, 1.5, 2.5, 4.0, 6.0, 7.0, 8.5, 9.5]], dtype=torch.float64)  # open x4, closed x4
    x = torch.randn(1, 8, 3, dtype=torch.float64, requires_grad=True)
    for fast in (False, True):
        y, (h, c) = run(cell, x, times, fast)
        for j in range(4, 8):
            assert torch.equal(y[:, j], y[:, 3])
        assert torch.equal(h, y[:, 3])
        _, (_, c_open) = run(cell, x[:, :4], times[:, :4], fast)
        assert torch.equal(c, c_open)
        (gx,) = torch.autograd.grad(y.sum() + c.sum(), x)
        assert torch.equal(gx[:, 4:], torch.zeros_like(gx[:, 4:]))
        assert gx[:, :4].abs().sum() > 0
    # in training mode the leak lets closed steps move the state a little
    cell.train()
    y, _ = cell(x, times=times)
    assert not torch.equal(y[:, 4], y[:, 3])
    assert (y[:, 4] - y[:, 3]).abs().max() < 1e-2


def test_padding_holds_state_and_left_right_padding_agree():  # spec 5
    cell = plstm(r_on_init=0.5, log_period_init=[0.0, 1.5]).train()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    times = torch.cumsum(torch.rand(2, 6, dtype=torch.float64) + 0.2, 1)
    pad_x = torch.randn(2, 3, 3, dtype=torch.float64)  # padding content must not matter
    nan = torch.full((2, 3), float("nan"), dtype=torch.float64)
    for fast in (False, True):
        y, (h, c) = run(cell, x, times, fast)
        yl, (hl, cl) = run(cell, torch.cat([pad_x, x], 1), torch.cat([nan, times], 1), fast)
        yr, (hr, cr) = run(cell, torch.cat([x, pad_x], 1), torch.cat([times, nan], 1), fast)
        assert torch.equal(yl[:, :3], torch.zeros_like(yl[:, :3]))  # held at the zero initial state
        for a, b in ((hl, h), (cl, c), (hr, h), (cr, c), (yl[:, 3:], y), (yr[:, :6], y)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(yr[:, 6:], yr[:, 5:6].expand(-1, 3, -1))


def test_outputs_depend_on_time_not_on_step_index():  # spec 6
    cell = plstm(r_on_init=0.3, log_period_init=[0.0, 2.0])
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    times = torch.cumsum(torch.rand(2, 6, dtype=torch.float64) + 0.2, 1)
    y = cell(x, times=times)[0]
    delta = 123.456
    shifted = plstm(r_on_init=0.3, log_period_init=[0.0, 2.0])
    with torch.no_grad():
        shifted.shift.sub_(delta)  # code convention: phase of t + s
    torch.testing.assert_close(shifted(x, times=times + delta)[0], y, rtol=1e-9, atol=1e-9)
    # the same events with idle (NaN) steps in between give the same outputs at the events
    spread_x = torch.zeros(2, 12, 3, dtype=torch.float64)
    spread_t = torch.full((2, 12), float("nan"), dtype=torch.float64)
    spread_x[:, 1::2], spread_t[:, 1::2] = x, times
    torch.testing.assert_close(cell(spread_x, times=spread_t)[0][:, 1::2], y, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(cell(x, times=times * 1.7)[0], y)


def test_train_eval_switch_and_update_count():  # spec 8
    cell = plstm(input_size=2, hidden_size=6, r_on_init=0.2, log_period_init=[0.0, 2.0])
    times = torch.cumsum(torch.rand(3, 10, dtype=torch.float64) + 0.1, 1)
    times[1, :4] = float("nan")
    cell.train()
    k_train = cell.openness(times)
    cell.eval()
    k_eval = cell.openness(times)
    period, shift, r_on = (v.detach() for v in cell.gate_parameters())
    phi = torch.remainder(torch.nan_to_num(times).unsqueeze(-1) + shift, period) / period
    valid = ~torch.isnan(times).unsqueeze(-1)
    closed = (phi > r_on) & valid
    assert closed.any()
    assert torch.allclose(k_train[closed], 1e-3 * phi[closed])
    assert torch.equal(k_eval[closed], torch.zeros_like(k_eval[closed]))
    # eval forward counts the (unit, step) pairs with phi < r_on
    with torch.no_grad():
        cell(torch.randn(3, 10, 2, dtype=torch.float64), times=times)
        cell.use_fast_path = False
        cell(torch.randn(3, 10, 2, dtype=torch.float64), times=times)
    stats = cell.extra_stats()
    expected = int(((phi < r_on) & (phi > 0) & valid).sum())
    assert float(stats["open_updates"]) == 2 * expected
    assert float(stats["unit_steps"]) == 2 * int(valid.sum()) * 6
    metrics = cell.extra_metrics()
    assert metrics["update_fraction"] == pytest.approx(expected / (int(valid.sum()) * 6))
    cell.train()
    cell(torch.randn(3, 10, 2, dtype=torch.float64), times=times)
    assert cell.extra_metrics() == metrics  # training passes are not counted
    cell.eval()
    assert cell.extra_metrics() == {}  # each evaluation starts a fresh count


def test_step_index_time_source():
    counted = plstm(time_source="step_index", r_on_init=0.3, log_period_init=[0.0, 2.0])
    timed = plstm(r_on_init=0.3, log_period_init=[0.0, 2.0])
    assert not counted.uses_time and timed.uses_time
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    y, state = counted(x)
    torch.testing.assert_close(y, timed(x, times=torch.arange(8, dtype=torch.float64).expand(2, 8))[0])
    assert state[2].tolist() == [8, 8]
    y1, s1 = counted(x[:, :3])
    y2, _ = counted(x[:, 3:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    assert PhasedLSTMCell.needs_times(counted.config) is False
    with pytest.raises(ValueError, match="timestamps"):
        timed(x)


def test_initialisation_follows_the_spec():
    cell = plstm(double=False, hidden_size=2000, log_period_init=[1.0, 3.0], shift_init_max=100.0)
    tau, shift = cell.period.detach(), cell.shift.detach()
    assert tau.min() >= math.exp(1.0) - 1e-4 and tau.max() <= math.exp(3.0) + 1e-3
    assert abs(float(tau.log().mean()) - 2.0) < 0.05  # log-uniform
    assert float(shift.min()) >= 0 and float(shift.max()) <= 100 and float(shift.mean()) > 40
    assert torch.all(cell.r_on == 0.05)
    assert abs(float(cell.weight_hh.detach().std()) - 0.1) < 0.005
    h = 2000
    assert torch.all(cell.bias[:h] == -0.1) and torch.all(cell.bias[h:] == 0)
    default = plstm(double=False, hidden_size=2000)
    assert torch.all(default.shift <= default.period) and torch.all(default.shift >= 0)
    assert not default.r_on.requires_grad and default.period.requires_grad
    with pytest.raises(ValueError, match="log_period_init"):
        PhasedLSTMCell.config_class(log_period_init=(3.0, 1.0))


def test_time_aware_cell_on_a_task_without_times_fails_at_config_time():
    class NoTimes(Task):
        """A task without timestamps."""

        config_class = TaskConfig
        input_features = 1
        num_outputs = 2

    class Plugin:
        @seqplat.hookimpl
        def register_tasks(self, register):
            register("no_times", NoTimes)

    reg = Registry()
    reg.add_plugin(plugin_module, "phased_lstm")
    reg.add_plugin(Plugin(), "test_tasks")
    with pytest.raises(ConfigError, match="reads per-step timestamps but task 'no_times' provides none"):
        build_run_config(overrides=["cell.name=phased_lstm", "task.name=no_times"], registry=reg)


# -- frequency discrimination --------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["regular", "high_res", "async"])
def test_freq_task_sampling_conditions(sampling):
    task = build_task({"name": "freq_discrimination", "sampling": sampling})
    assert isinstance(task, FreqDiscriminationTask) and task.provides_times
    b = task.train_batch(5, 16, seed=3)
    again = task.train_batch(5, 16, seed=3)
    assert torch.equal(b.inputs, again.inputs) and torch.equal(b.targets, again.targets)
    assert not torch.equal(task.train_batch(6, 16, seed=3).inputs, b.inputs)
    assert b.inputs.shape[:2] == b.times.shape and b.inputs.shape[-1] == 1
    assert torch.isfinite(b.times[:, -1]).all()  # left padding: the last step is real everywhere
    assert b.targets[:8].eq(1).all()  # first half of the batch is drawn from the 5-6 ms band
    for row in range(16):
        t = b.times[row][~torch.isnan(b.times[row])].double()
        assert (b.inputs[row, : b.inputs.shape[1] - len(t)] == 0).all()
        assert t.min() >= 0 and t.max() <= 125 + 1e-3 and (t.diff() >= 0).all()
        if sampling == "async":
            assert 15 <= len(t) < 125
        else:
            step = 1.0 if sampling == "regular" else 0.1
            torch.testing.assert_close(t.diff(), torch.full_like(t.diff(), step), atol=2e-3, rtol=0)
    if sampling == "high_res":
        assert b.inputs.shape[1] > 300


def test_freq_task_labels_and_signal():
    cfg = FreqDiscriminationTask.config_class(sampling="regular")
    from seqplat.plugins.phased_lstm.freq import sample_waves

    times, values, periods, labels = sample_waves(np.random.default_rng(0), 64, cfg)
    assert np.array_equal(labels, ((periods >= 5) & (periods <= 6)).astype(np.int64))
    assert labels[:32].all() and 0 < labels.mean() < 1
    assert periods[32:].min() >= 1 and periods[32:].max() <= 100
    for v in values:
        assert np.abs(v).max() <= 1.0


def test_freq_eval_sets_are_fixed_and_times_as_feature():
    task = build_task({"name": "freq_discrimination", "valid_size": 50, "test_size": 30})
    v1 = list(task.eval_batches("valid", 20))
    v2 = list(task.eval_batches("valid", 20))
    assert [len(b.targets) for b in v1] == [20, 20, 10]
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(v1, v2, strict=True))
    assert sum(len(b.targets) for b in task.eval_batches("test", 20)) == 30
    feat = build_task({"name": "freq_discrimination", "times_as_feature": True, "time_feature_scale": 0.01})
    b = feat.train_batch(0, 8, 0)
    assert feat.input_features == 2 and b.inputs.shape[-1] == 2
    real = ~torch.isnan(b.times)
    torch.testing.assert_close(b.inputs[..., 1][real], b.times[real] * 0.01)
    assert (b.inputs[..., 1][~real] == 0).all()
    head = feat.build_head(7)
    assert isinstance(head[1], torch.nn.LeakyReLU) and head[0].out_features == 2


# -- N-MNIST -----------------------------------------------------------------------------------

def _fake_events(rng, n):
    x, y = rng.integers(0, 34, n), rng.integers(0, 34, n)
    p = rng.integers(0, 2, n)
    ts = np.sort(rng.integers(0, 2**23, n))
    return x, y, p, ts


def test_event_decoding_round_trip():
    rng = np.random.default_rng(0)
    x, y, p, ts = _fake_events(rng, 50)
    ids, t = decode_events(encode_events(x, y, p, ts))
    assert np.array_equal(t, ts) and np.array_equal(ids, p * 1156 + y * 34 + x)
    assert ids.max() < NUM_ADDRESSES
    with pytest.raises(DataError, match="5-byte"):
        decode_events(b"\x00" * 7)
    with pytest.raises(DataError, match="34x34"):
        decode_events(bytes([40, 1, 0, 0, 1]))


def _write_nmnist(root: Path, n_train: int = 12, n_test: int = 6, extra: dict[str, bytes] | None = None) -> None:
    rng = np.random.default_rng(1)
    (root / "nmnist").mkdir(parents=True, exist_ok=True)
    for folder, n in (("Train", n_train), ("Test", n_test)):
        with zipfile.ZipFile(root / "nmnist" / f"{folder}.zip", "w") as zf:
            for i in range(1, n + 1):
                x, y, p, ts = _fake_events(rng, int(rng.integers(5, 40)))
                zf.writestr(f"{folder}/{i % 10}/{i:05d}.bin", encode_events(x, y, p, ts))
            for name, data in (extra or {}).items():
                zf.writestr(name, data)


def test_nmnist_task_on_a_fixture(tmp_path, monkeypatch):
    _write_nmnist(tmp_path / "data")
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path / "data"))
    task = build_task({"name": "nmnist", "valid_fraction": 0.25, "event_rate": 0.5, "eval_event_rate": 1.0})
    task.prepare()
    assert [len(task.samples(s)) for s in ("train", "valid", "test")] == [9, 3, 6]
    b = task.train_batch(0, 4, seed=0)
    assert torch.equal(b.inputs, task.train_batch(0, 4, seed=0).inputs)
    assert b.inputs.dtype == torch.long and b.inputs.shape == b.times.shape
    assert torch.isfinite(b.times[:, -1]).all()
    valid = list(task.eval_batches("valid", 2))
    lengths = sorted(int((~torch.isnan(v.times)).sum(1)[i]) for v in valid for i in range(len(v.targets)))
    assert lengths == sorted(len(ids) for _, ids, _ in task.samples("valid"))  # rho = 1 keeps every event
    model = build_model(build_run_config(overrides=["cell.name=phased_lstm", "cell.hidden_size=6",
                                                    "task.name=nmnist", "model.embedding_size=5"]), task)
    out, _ = model(b.inputs, None, b.times)
    assert out.shape == (4, 10)
    feat = build_task({"name": "nmnist", "times_as_feature": True, "max_events": 7})
    fb = feat.train_batch(1, 3, seed=0)
    assert fb.inputs.shape[-1] == 2 and fb.inputs.shape[1] <= 7
    enc, width = feat.build_encoder(None)
    assert width == 41 and enc(fb.inputs).shape == (3, fb.inputs.shape[1], 41)


def test_nmnist_zip_reading_is_defensive(tmp_path, monkeypatch):
    _write_nmnist(tmp_path / "bad", extra={"Train/../../evil.bin": b"\x00" * 5})
    with pytest.raises(DataError, match="unsafe member name"):
        read_archive(str(tmp_path / "bad" / "nmnist" / "Train.zip"), "Train")
    _write_nmnist(tmp_path / "odd", extra={"Train/readme.txt": b"hello", "Train/3/": b""})
    rows = read_archive(str(tmp_path / "odd" / "nmnist" / "Train.zip"), "Train")
    assert len(rows) == 12  # non-matching names are skipped
    with zipfile.ZipFile(tmp_path / "big.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Train/1/00001.bin", b"\x00" * (5 * 1024 * 1024))  # inflates far beyond the limit
    with pytest.raises(DataError, match="bytes"):
        read_archive(str(tmp_path / "big.zip"), "Train")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot be read"):
        read_archive(str(tmp_path / "junk.zip"), "Train")
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nmnist/Train.zip"):
        build_task({"name": "nmnist"}).prepare()


@pytest.mark.data
def test_nmnist_real_subset():
    task = build_task({"name": "nmnist", "max_events": 64})
    task.prepare()
    assert [len(task.samples(s)) for s in ("train", "valid", "test")] == [900, 100, 100]
    labels = np.bincount([lab for lab, _, _ in task.samples("test")], minlength=10)
    assert labels.tolist() == [8, 14, 8, 11, 14, 7, 10, 15, 2, 11]
    lengths = [len(ids) for _, ids, _ in task.samples("train") + task.samples("valid")]
    assert min(lengths) >= 1069 and max(lengths) <= 7152
    assert max(float(ts.max()) for _, _, ts in task.samples("test")) <= 336_040
    b = task.train_batch(0, 8, 0)
    assert b.inputs.shape[1] <= 64 and float(np.nanmax(b.times.numpy())) < 340.0


# -- recipes, training, CLI, docs --------------------------------------------------------------------

def _params(recipe: str, **over) -> int:
    sets = [f"{k}={v}" for k, v in over.items()]
    return count_parameters(build_model(build_run_config(recipe=recipe, overrides=sets)))


def test_paper_recipes_parameter_counts():
    # 110 units, 1 input: 4H(D+H) + 4H bias + 3H peepholes + 3H time parameters; head Dense(110 -> 2)
    plstm_110 = 4 * 110 * (1 + 110) + 4 * 110 + 3 * 110 + 3 * 110
    assert plstm_110 == 49_940
    for recipe in ("freq_async", "freq_regular", "freq_highres"):
        assert _params(f"phased_lstm/{recipe}") == plstm_110 + 110 * 2 + 2 == 50_162
    # torch LSTM (two bias vectors) on [signal, time]
    assert _params("phased_lstm/freq_async_lstm") == 4 * 110 * (2 + 110) + 8 * 110 + 222 == 50_382
    # N-MNIST: 2,312 x 40 embedding, PLSTM 40 -> 110 (r_on fixed: not a trainable parameter), head 110 -> 10
    nm = 2312 * 40 + (4 * 110 * (40 + 110) + 4 * 110 + 5 * 110) + 110 * 10 + 10
    assert nm == 160_580
    assert _params("phased_lstm/nmnist") == nm


def test_recipes_resolve_to_the_paper_settings():
    cfg = build_run_config(recipe="phased_lstm/freq_async")
    assert cfg.cell["hidden_size"] == 110 and cfg.cell["gate_grad_clip"] == 10.0
    assert cfg.cell["log_period_init"] == [1.0, 3.0] and cfg.cell["shift_init_max"] == 100.0
    assert cfg.cell["learn_r_on"] and cfg.cell["r_on_init"] == 0.05 and cfg.cell["leak"] == 1e-3
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("adam", 1e-3, 32)
    lstm = build_run_config(recipe="phased_lstm/freq_async_lstm")
    assert lstm.cell["name"] == "lstm" and lstm.task["times_as_feature"] and lstm.train.clip_value == 10.0
    assert build_run_config(recipe="phased_lstm/freq_highres").task["sampling"] == "high_res"
    assert build_run_config(recipe="phased_lstm/freq_regular").train.steps == 70 * 157


TINY = ["train.steps=2", "train.batch_size=4", "train.eval_batch_size=8", "train.eval_every=2",
        "train.checkpoint_every=2", "tracking.enabled=false"]


@pytest.mark.parametrize("recipe,extra", [
    ("freq_regular", ["task.valid_size=8", "task.test_size=8"]),
    ("freq_highres", ["task.valid_size=4", "task.test_size=4", "task.max_duration=30", "task.min_duration=15",
                      "cell.hidden_size=8"]),
    ("freq_async", ["task.valid_size=8", "task.test_size=8"]),
    ("freq_async_lstm", ["task.valid_size=8", "task.test_size=8"]),
], ids=["freq_regular", "freq_highres", "freq_async", "freq_async_lstm"])
def test_paper_recipes_run_and_resume(recipe, extra, tmp_path):
    over = TINY + extra + [f"io.run_dir={tmp_path / 'run'}"]
    first = train(build_run_config(recipe=f"phased_lstm/{recipe}", overrides=over), progress=False)
    assert first.steps == 2 and 0.0 <= first.test_metrics["accuracy"] <= 1.0
    if recipe != "freq_async_lstm":
        assert 0.0 <= first.valid_metrics["update_fraction"] <= 1.0
    longer = build_run_config(recipe=f"phased_lstm/{recipe}", overrides=over + ["train.steps=3"])
    resumed = train(longer, resume=str(tmp_path / "run"), progress=False)
    assert resumed.steps == 3


@pytest.mark.data
def test_nmnist_recipe_runs_and_resumes(tmp_path):
    over = TINY + ["task.max_events=40", "task.max_train_samples=40", "task.max_test_samples=8",
                   "cell.hidden_size=8", f"io.run_dir={tmp_path / 'run'}"]
    first = train(build_run_config(recipe="phased_lstm/nmnist", overrides=over), progress=False)
    assert first.steps == 2 and 0.0 <= first.test_metrics["accuracy"] <= 1.0
    resumed = train(build_run_config(recipe="phased_lstm/nmnist", overrides=over + ["train.steps=3"]),
                    resume=str(tmp_path / "run"), progress=False)
    assert resumed.steps == 3


def test_default_recipe_via_cli(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--plugin", "phased_lstm", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "task.valid_size=16", "--set", "task.test_size=16", "--set", "tracking.enabled=false",
        "--set", "train.threads=1",
        "--set", f"io.output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    cfg = build_run_config(plugin="phased_lstm")
    assert cfg.task["name"] == "freq_discrimination" and cfg.cell["name"] == "phased_lstm"
    assert cfg.train.steps * cfg.train.batch_size <= 32 * 1000  # small enough for a CPU in minutes


def test_docs_python_snippet_runs(tmp_path):
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs page has no python snippet"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOCS), "exec"), namespace)  # noqa: S102 - our own docs


def test_public_api_only():
    src = ROOT / "src" / "seqplat" / "plugins" / "phased_lstm"
    for path in src.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for mod in re.findall(r"^\s*(?:from|import)\s+(seqplat[\w.]*)", text, flags=re.M):
            assert not mod.startswith("seqplat.plugins") or mod.startswith("seqplat.plugins.phased_lstm"), (path, mod)


def test_lstm_reference_formula_check():
    """The independent peephole LSTM above is itself right: no peepholes = torch's LSTM cell maths."""
    torch.manual_seed(0)
    cell = plstm(time_gate=False)
    with torch.no_grad():
        cell.peephole.zero_()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    hid = 5
    h = c = torch.zeros(2, hid, dtype=torch.float64)
    for j in range(4):
        i, f, g, o = (x[:, j] @ cell.weight_ih + cell.bias + h @ cell.weight_hh).split(hid, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    torch.testing.assert_close(peephole_lstm(cell, x)[:, -1], h)
