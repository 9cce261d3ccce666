"""Tests of the unicornn plugin: the UnICORNN recurrence (naive loop, reverse-recompute function in
PyTorch and C++), the deep cell, coRNN, the three data sets, the recipes and the memory figures.
Comments "spec 7.N" refer to item N of section 7 ("tests an implementer should write") of
shared/papers/unicornn.md."""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seqplat import ConfigError, SeqplatError, build_cell, build_model, build_run_config, build_task, count_parameters
from seqplat.core import gemm
from seqplat.core.config import validate_component
from seqplat.core.cpp_ext import extension_cache_dir
from seqplat.plugins.unicornn import datasets, recurrence
from seqplat.plugins.unicornn.cell import stability_margin
from seqplat.plugins.unicornn.config import UnICORNNConfig
from seqplat.plugins.unicornn.memory import _build, saved_tensor_bytes
from seqplat.plugins.unicornn.recurrence import (
    fused_scan,
    load_cpp_extension,
    python_forward,
    reference_scan,
    unicornn_inverse_step,
    unicornn_step,
)
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins" / "unicornn.md"
SHARED_DATA = ROOT.parent / "shared" / "data"
EXT_CACHE = extension_cache_dir()  # the user's cache, read before conftest isolates SEQPLAT_CACHE
log = logging.getLogger(__name__)


@pytest.fixture(scope="module", autouse=True)
def _cpp_built_once():
    """Build/load the C++ kernel once per session in the persistent cache (conftest gives each
    test a fresh SEQPLAT_CACHE, which would otherwise rebuild it)."""
    load_cpp_extension(cache_dir=EXT_CACHE)


def backends() -> list:
    """``python`` always; ``cpp`` skipped with the reason when no compiler or build fails."""
    reason = f"C++ kernel unavailable: {recurrence.cpp_error()}"
    return ["python", pytest.param("cpp", marks=pytest.mark.skipif(not load_cpp_extension(cache_dir=EXT_CACHE),
                                                                  reason=reason))]


def inputs(batch=3, time=11, hidden=4, dtype=torch.float64, seed=0, state=True, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (x_scale * torch.randn(batch, time, hidden, generator=g, dtype=dtype)).requires_grad_()
    w = torch.rand(hidden, generator=g, dtype=dtype).requires_grad_()
    c = (0.2 * torch.rand(hidden, generator=g, dtype=dtype) - 0.1).requires_grad_()
    scale = 0.5 if state else 0.0
    y0 = (scale * torch.randn(batch, hidden, generator=g, dtype=dtype)).requires_grad_()
    z0 = (scale * torch.randn(batch, hidden, generator=g, dtype=dtype)).requires_grad_()
    return x, w, c, y0, z0


def run_scan(kind, x, w, c, y0, z0, dt, alpha, seed=1):
    """Outputs and gradients (x, w, c, y0, z0) of a random projection of outputs and final state."""
    delta = dt * torch.sigmoid(c)
    out = reference_scan(x, w, delta, y0, z0, alpha) if kind == "reference" else \
        fused_scan(x, w, delta, y0, z0, alpha, kind)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
    grads = torch.autograd.grad(loss, [x, w, c, y0, z0])
    return [o.detach() for o in out], list(grads)


def assert_scan_close(kind, dtype, T, dt, alpha, out_atol, grad_rtol_of_max, **kw):
    x, w, c, y0, z0 = inputs(time=T, dtype=dtype, **kw)
    out_ref, g_ref = run_scan("reference", x, w, c, y0, z0, dt, alpha)
    out, g = run_scan(kind, x, w, c, y0, z0, dt, alpha)
    scale = max(1.0, float(out_ref[0].abs().max()))  # fp32 rounding grows with the size of the states
    for a, b, name in zip(out, out_ref, ("y", "y_T", "z_T"), strict=True):
        torch.testing.assert_close(a, b, atol=out_atol * scale, rtol=0, msg=lambda m, n=name: f"{kind} {n}: {m}")
    for a, b, name in zip(g, g_ref, ("x", "w", "c", "y0", "z0"), strict=True):
        tol = grad_rtol_of_max * float(b.abs().max()) + 1e-30
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m, n=name: f"{kind} grad {n}: {m}")


# -- registration and conformance --------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    info = reg.plugins["unicornn"]
    assert not info.broken, info.error
    assert set(info.registered["cell"]) == {"unicornn", "cornn"}
    assert set(info.registered["task"]) == {"noisy_cifar10", "eigenworms", "imdb"}
    assert {f"unicornn/{r}" for r in ("default", "psmnist", "noisy_cifar10", "eigenworms", "imdb", "psmnist_1ep",
                                      "copy_200", "adding_400", "cornn_psmnist")} <= set(info.registered["recipe"])


CELL_SPECS = [
    pytest.param({"name": "unicornn", "hidden_size": 4, "num_layers": 2, "dt": [0.1, 0.5]}, id="unicornn-perlayer-dt"),
    pytest.param({"name": "unicornn", "hidden_size": 4, "num_layers": 1, "alpha": 0.0, "backend": "python"},
                 id="unicornn-python-alpha0"),
    pytest.param({"name": "unicornn", "hidden_size": 5, "num_layers": 3, "dt": 0.19, "alpha": 30.65},
                 id="unicornn-psmnist-settings"),
    pytest.param({"name": "cornn", "hidden_size": 4}, id="cornn"),
    pytest.param({"name": "cornn", "hidden_size": 4, "implicit_damping": True}, id="cornn-implicit"),
]


@pytest.mark.parametrize("spec", CELL_SPECS)
def test_conformance_and_gradcheck(spec):
    check_cell(spec)
    gradcheck_cell(spec)


@pytest.mark.parametrize(("options", "message"), [
    ({"dt": [0.1, 0.2], "num_layers": 3}, "dt has 2 entries but num_layers is 3"),
    ({"dt": -0.1}, "dt must be positive"),
    ({"backend": "cuda"}, "backend"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_configs_fail_at_config_time(options, message):
    with pytest.raises(ConfigError) as info:
        validate_component("cell", {"name": "unicornn", **options}, "cell", get_registry())
    assert message in str(info.value)


# -- spec 7.1 / 7.2: custom function == naive loop (outputs, all gradients) ---------------------------

@pytest.mark.parametrize("alpha", [0.0, 30.65])
@pytest.mark.parametrize("T", [1, 2, 37, 784])
@pytest.mark.parametrize("kind", backends())
def test_fused_equals_naive_loop_float64(kind, T, alpha):
    """fp64: outputs within 1e-12 and every gradient within 1e-11 of its largest entry."""
    assert_scan_close(kind, torch.float64, T, 0.19, alpha, out_atol=1e-12, grad_rtol_of_max=1e-11)


@pytest.mark.parametrize("alpha", [0.0, 30.65])
@pytest.mark.parametrize("kind", backends())
def test_fused_equals_naive_loop_float32_784_steps(kind, alpha):
    """fp32 over 784 steps (dt 0.19, zero initial state): outputs within 1e-5 * max(1, max|y|), gradients
    within 1e-4 of their largest entry (observed: outputs <= 3e-6 * max|y|, gradients <= 1.3e-5)."""
    assert_scan_close(kind, torch.float32, 784, 0.19, alpha, out_atol=1e-5, grad_rtol_of_max=1e-4, batch=4,
                      hidden=16, state=False)


@pytest.mark.slow
@pytest.mark.parametrize(("dt", "alpha"), [(0.19, 30.65), (0.0343, 0.0)])
@pytest.mark.parametrize("kind", backends())
def test_fused_equals_naive_loop_float32_4000_steps(kind, dt, alpha):
    """fp32 over 4,000 steps: outputs within 1e-4 * max(1, max|y|), gradients within 2e-4 of their
    largest entry (observed: outputs <= 1e-5 * max|y|, gradients <= 1.8e-5)."""
    assert_scan_close(kind, torch.float32, 4000, dt, alpha, out_atol=1e-4, grad_rtol_of_max=2e-4, batch=4,
                      hidden=16, state=False)


@pytest.mark.parametrize("kind", backends())
def test_custom_backward_passes_gradcheck(kind):
    """spec 7.2: gradcheck of the custom function in fp64 w.r.t. x, w, c and the initial state."""
    x, w, c, y0, z0 = inputs(batch=2, time=6, hidden=3)

    def fn(x_, w_, c_, y0_, z0_):
        return fused_scan(x_, w_, 0.4 * torch.sigmoid(c_), y0_, z0_, 5.0, kind)

    assert torch.autograd.gradcheck(fn, (x, w, c, y0, z0), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind", backends())
def test_the_dropout_mask_folded_into_the_scan_equals_masking_its_output(kind):
    """The fast path writes ``m * y`` and reads ``m * grad``: outputs and every gradient equal the reference
    loop followed by ``y * m`` (the state ``y_T`` stays unmasked), and the masked function passes gradcheck."""
    x, w, c, y0, z0 = inputs(batch=3, time=9, hidden=4)
    mask = torch.tensor([[2.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    results = []
    for masked_scan in (True, False):
        delta = 0.3 * torch.sigmoid(c)
        if masked_scan:
            out, yT, zT = fused_scan(x, w, delta, y0, z0, 2.0, kind, mask.unsqueeze(1))
        else:
            out, yT, zT = reference_scan(x, w, delta, y0, z0, 2.0)
            out = out * mask.unsqueeze(1)
        g = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (out, yT, zT))
        results.append([out.detach(), yT.detach(), *torch.autograd.grad(loss, [x, w, c, y0, z0])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)

    def fn(x_, w_, c_, y0_, z0_):
        return fused_scan(x_, w_, 0.4 * torch.sigmoid(c_), y0_, z0_, 5.0, kind, mask)

    assert torch.autograd.gradcheck(fn, (x, w, c, y0, z0), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_loading_the_kernel_keeps_denormals():
    """-ffast-math is a compile flag only: the process must not switch to flush-to-zero."""
    load_cpp_extension(cache_dir=EXT_CACHE)
    assert 1e-310 * 1.0 != 0.0
    assert float(torch.tensor([1e-40]) * torch.tensor([1.0])) != 0.0


def test_cpp_and_python_backends_agree_float32():
    if not load_cpp_extension(cache_dir=EXT_CACHE):
        pytest.skip(f"C++ kernel unavailable: {recurrence.cpp_error()}")
    x, w, c, y0, z0 = inputs(batch=5, time=300, hidden=8, dtype=torch.float32)
    out_p, g_p = run_scan("python", x, w, c, y0, z0, 0.126, 13.0)
    out_c, g_c = run_scan("cpp", x, w, c, y0, z0, 0.126, 13.0)
    for a, b in zip(out_p + g_p, out_c + g_c, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()) + 1e-6, rtol=0)


def test_forward_saves_no_per_step_state():
    """The custom function keeps x (the pre-activations) and O(B*H) tensors, not T copies of the state."""
    for kind in ("fused", "naive"):
        cell = _build(hidden=16, layers=1, backend="python", device="cpu")
        x = torch.randn(4, 500, 1)
        saved = saved_tensor_bytes(cell, x, kind)
        one = 4 * 500 * 16 * 4  # bytes of one [b, t, h] float32 tensor
        if kind == "fused":
            assert saved < 2.2 * one, saved / one   # x of the layer + the output y the loss reads
        else:
            assert saved > 4 * one, saved / one     # the loop stores several [b, h] tensors per step


def test_input_is_not_modified_in_place_and_guarded():
    """Pitfall of spec 8: an in-place edit of x after the forward must not silently corrupt the backward."""
    x, w, c, y0, z0 = inputs(time=5)
    pre = x * 1.0
    out, _, _ = fused_scan(pre, w, 0.2 * torch.sigmoid(c), y0, z0, 1.0, "python")
    with torch.no_grad():
        pre.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# -- spec 7.3 / 7.4 / 7.5: reversibility -------------------------------------------------------------

def _forward_states(x, w, delta, y0, z0, alpha):
    ys, zs = [y0], [z0]
    for x_t in x.unbind(1):
        y, z = unicornn_step(x_t, ys[-1], zs[-1], w, delta, alpha)
        ys.append(y)
        zs.append(z)
    return ys, zs


def _backward_states(x, w, delta, yT, zT, alpha):
    ys, zs = [yT], [zT]
    for x_t in reversed(x.unbind(1)):
        y, z = unicornn_inverse_step(x_t, ys[-1], zs[-1], w, delta, alpha)
        ys.append(y)
        zs.append(z)
    return ys[::-1], zs[::-1]


def test_reconstructed_states_equal_stored_states():
    """spec 7.3: fp64 to 1e-12; fp32 max error vs T is logged and bounded."""
    with torch.no_grad():
        x, w, c, y0, z0 = inputs(batch=4, time=784, hidden=16, state=False)
        delta = 0.19 * torch.sigmoid(c)
        ys, zs = _forward_states(x, w, delta, y0, z0, 30.65)
        ys_b, zs_b = _backward_states(x, w, delta, ys[-1], zs[-1], 30.65)
        err = max(float((a - b).abs().max()) for a, b in zip(ys + zs, ys_b + zs_b, strict=True))
        assert err < 1e-12, err
        for T, bound in ((100, 1e-5), (784, 1e-4), (4000, 1e-3)):
            x32, w32, c32, y32, z32 = inputs(batch=4, time=T, hidden=16, dtype=torch.float32, state=False)
            d32 = 0.19 * torch.sigmoid(c32)
            ys, zs = _forward_states(x32, w32, d32, y32, z32, 30.65)
            ys_b, zs_b = _backward_states(x32, w32, d32, ys[-1], zs[-1], 30.65)
            err32 = max(float((a - b).abs().max()) for a, b in zip(ys + zs, ys_b + zs_b, strict=True))
            log.info("fp32 state reconstruction, T=%d: max abs error %.2e", T, err32)
            assert err32 < bound, (T, err32)


def test_step_then_inverse_is_identity_and_T_steps_invert_to_zero():
    """spec 7.4."""
    with torch.no_grad():
        x, w, c, y0, z0 = inputs(batch=3, time=200, hidden=6)
        delta = 0.126 * torch.sigmoid(c)
        y1, z1 = unicornn_step(x[:, 0], y0, z0, w, delta, 13.0)
        yb, zb = unicornn_inverse_step(x[:, 0], y1, z1, w, delta, 13.0)
        torch.testing.assert_close(yb, y0, atol=1e-14, rtol=0)
        torch.testing.assert_close(zb, z0, atol=1e-14, rtol=0)
        zeros = torch.zeros_like(y0)
        _, yT, zT = python_forward(x, w, delta, zeros, zeros, 13.0)
        ys, zs = _backward_states(x, w, delta, yT, zT, 13.0)
        assert float(ys[0].abs().max()) < 1e-12 and float(zs[0].abs().max()) < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 30.65])
def test_per_neuron_jacobian_determinant_is_one(alpha):
    """spec 7.5: the 2x2 Jacobian d(y_t, z_t)/d(y_{t-1}, z_{t-1}) of every neuron has determinant 1."""
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x_t, y, z, w, delta = (torch.randn(1, generator=g, dtype=torch.float64) for _ in range(5))
        w, delta = w.abs(), 0.3 * delta.abs()

        def step(yy, zz, x_t=x_t, w=w, delta=delta):
            return torch.cat(unicornn_step(x_t, yy, zz, w, delta, alpha))

        jac = torch.autograd.functional.jacobian(step, (y, z))
        J = torch.stack([torch.cat([jac[0][0], jac[1][0]]), torch.cat([jac[0][1], jac[1][1]])])
        assert abs(float(torch.linalg.det(J)) - 1.0) < 1e-12


def test_update_order_is_z_first_then_y():
    """Pitfall of spec 8: z uses the old y, y uses the new z (not the other symplectic Euler variant)."""
    x_t, y, z = torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([-0.2])
    w, delta, alpha = torch.tensor([0.7]), torch.tensor([0.1]), 2.0
    y1, z1 = unicornn_step(x_t, y, z, w, delta, alpha)
    z_expected = z - delta * (torch.tanh(w * y + x_t) + alpha * y)
    torch.testing.assert_close(z1, z_expected)
    torch.testing.assert_close(y1, y + delta * z_expected)


# -- spec 7.6 / 7.7: batch independence, T = 1 ----------------------------------------------------------

@pytest.mark.parametrize("kind", backends())
def test_batch_independence_and_per_sample_gradient_sums(kind):
    x, w, c, y0, z0 = inputs(batch=4, time=9, hidden=3)
    perm = torch.tensor([2, 0, 3, 1])
    delta = 0.3 * torch.sigmoid(c)
    out = fused_scan(x, w, delta, y0, z0, 2.0, kind)[0]
    out_p = fused_scan(x[perm], w, delta, y0[perm], z0[perm], 2.0, kind)[0]
    torch.testing.assert_close(out_p, out[perm], atol=1e-14, rtol=0)
    gw, gc = torch.autograd.grad(fused_scan(x, w, 0.3 * torch.sigmoid(c), y0, z0, 2.0, kind)[0].sum(), [w, c])
    per = [torch.autograd.grad(fused_scan(x[i:i + 1], w, 0.3 * torch.sigmoid(c), y0[i:i + 1], z0[i:i + 1], 2.0,
                                          kind)[0].sum(), [w, c]) for i in range(4)]
    torch.testing.assert_close(gw, sum(p[0] for p in per), atol=1e-13, rtol=0)
    torch.testing.assert_close(gc, sum(p[1] for p in per), atol=1e-13, rtol=0)


@pytest.mark.parametrize("kind", backends())
def test_single_step_sequence(kind):
    """spec 7.7: T=1 leaves the backward loop at t=0 with the right adjoints (initial state included)."""
    assert_scan_close(kind, torch.float64, 1, 0.5, 3.0, out_atol=1e-15, grad_rtol_of_max=1e-14)


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_fast_path_equals_reference_in_training_with_dropout(backend):
    """Cell level, training mode: the same dropout masks are drawn on both paths, so outputs and the
    gradients of every parameter match (float64)."""
    if backend == "cpp" and not load_cpp_extension(cache_dir=EXT_CACHE):
        pytest.skip(f"C++ kernel unavailable: {recurrence.cpp_error()}")
    torch.manual_seed(0)
    cell = build_cell({"name": "unicornn", "hidden_size": 6, "num_layers": 3, "dt": [0.1, 0.3, 0.5],
                       "alpha": 4.0, "dropout": 0.3, "backend": backend}, 3).double().train()
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    results = []
    for fast in (True, False):
        cell.use_fast_path = fast
        cell.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        y, state = cell(x)
        (y.square().sum() + sum(s.sum() for pair in state for s in pair)).backward()
        results.append([y.detach()] + [p.grad.clone() for p in cell.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.skipif(not gemm.projection_uses_onednn(torch.ones(1), torch.ones(1)),
                    reason="the projection runs inside the C++ loop's function only where it takes oneDNN")
def test_projection_inside_the_cpp_function_matches_the_reference(monkeypatch):
    """float32, where the fast path runs (U1)-(U3) as one function (recurrence.ProjectedScan) and takes the
    projection's weight and bias gradients from the C++ backward: outputs, the input's gradient and every
    parameter's gradient match the reference path, with dropout drawn alike on both."""
    if not load_cpp_extension(cache_dir=EXT_CACHE):
        pytest.skip(f"C++ kernel unavailable: {recurrence.cpp_error()}")
    calls = []
    original = recurrence.ProjectedScan.apply
    monkeypatch.setattr(recurrence.ProjectedScan, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    cell = build_cell({"name": "unicornn", "hidden_size": 64, "num_layers": 2, "dt": [0.1, 0.3], "alpha": 4.0,
                       "dropout": 0.3}, 20).train()
    x = torch.randn(5, 30, 20)
    results = []
    for fast in (True, False):
        cell.use_fast_path = fast
        cell.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        torch.manual_seed(5)
        y, state = cell(xg)
        (y.square().sum() + sum(s.sum() for pair in state for s in pair)).backward()
        results.append([y.detach(), xg.grad] + [p.grad.clone() for p in cell.parameters()])
    assert len(calls) == 2  # one per layer, on the fast path only
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        err = ((a - b).norm() / b.norm()).item()  # float32 rounding: 1e-7 to 7e-7 measured
        assert err < 1e-5, f"output/gradient {i} differs from the reference path by {err:.2e}"


@pytest.mark.skipif(not gemm.projection_uses_onednn(torch.ones(1), torch.ones(1)),
                    reason="the projection runs inside the C++ loop's function only where it takes oneDNN")
def test_projection_gradients_do_not_depend_on_the_thread_count():
    """On builds with the packed products the C++ backward sums the projection's weight gradient per fixed slab
    of batch rows and adds the slabs in order: one, two or three threads give the same gradients bit for bit
    (19 rows: slabs of two and three). Elsewhere oneDNN computes it after the loop, with no such promise."""
    if not load_cpp_extension(cache_dir=EXT_CACHE):
        pytest.skip(f"C++ kernel unavailable: {recurrence.cpp_error()}")
    if not gemm.outer_uses_packed(torch.ones(2, 2), torch.ones(2, 2)):
        pytest.skip("the projection's gradients are summed inside the loop only on builds with the packed products")
    torch.manual_seed(0)
    cell = build_cell({"name": "unicornn", "hidden_size": 70, "num_layers": 1}, 33).train()
    x = torch.randn(19, 40, 33)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            cell.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same dropout mask
            y, _ = cell(x)
            y.square().sum().backward()
            grads.append([p.grad.clone() for p in cell.parameters()])
    finally:
        torch.set_num_threads(before)
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# -- spec 7.8: dropout over time ---------------------------------------------------------------------------

def test_dropout_mask_is_shared_over_time_and_eval_is_identity():
    torch.manual_seed(0)
    cell = build_cell({"name": "unicornn", "hidden_size": 16, "num_layers": 1, "dropout": 0.5}, 3)
    x = torch.randn(4, 12, 3)
    cell.eval()
    y_eval, _ = cell(x)
    cell.train()
    y_train, _ = cell(x)
    ratio = y_train / y_eval
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # one mask per (b, h)
    values = set(torch.round(ratio[:, 0], decimals=4).flatten().tolist())
    assert values <= {0.0, 2.0} and values == {0.0, 2.0}
    plain = build_cell({"name": "unicornn", "hidden_size": 16, "num_layers": 1, "dropout": 0.0}, 3)
    plain.load_state_dict(cell.state_dict())
    plain.eval()
    torch.testing.assert_close(plain(x)[0], y_eval)


def test_dropout_applies_after_every_layer_including_the_top():
    torch.manual_seed(1)
    cell = build_cell({"name": "unicornn", "hidden_size": 8, "num_layers": 3, "dropout": 0.5}, 2).train()
    calls = []
    original = cell.dropout_mask
    cell.dropout_mask = lambda ref: calls.append(ref.shape) or original(ref)  # type: ignore[method-assign]
    y, _ = cell(torch.randn(2, 5, 2))
    assert len(calls) == 3
    assert (y == 0).any()  # the top layer's output is masked too


# -- spec 7.9: parameter counts and boundedness --------------------------------------------------------------

@pytest.mark.parametrize(("recipe", "expected"), [
    ("psmnist", 136_202), ("noisy_cifar10", 47_498), ("eigenworms", 1_573), ("cornn_psmnist", 134_154),
])
def test_paper_recipes_build_with_the_spec_parameter_count(recipe, expected):
    run = build_run_config(recipe=f"unicornn/{recipe}")
    assert count_parameters(build_model(run)) == expected


def test_healthcare_and_imdb_models_parameter_counts():
    """BIDMC (2 inputs, 3 x 128, one regression output) = 34,305; IMDB cell + 1-logit head = 30,081
    (+ 25,002 x 100 embedding)."""
    cell = build_cell({"name": "unicornn", "hidden_size": 128, "num_layers": 3}, 2)
    assert sum(p.numel() for p in cell.parameters()) + 129 == 34_305
    cell = build_cell({"name": "unicornn", "hidden_size": 128, "num_layers": 2, "dt": [0.0066, 0.205]}, 100)
    assert sum(p.numel() for p in cell.parameters()) + 129 == 30_081


@pytest.mark.parametrize("recipe", ["psmnist_1ep", "copy_200", "adding_400"])
def test_protocol_recipes_are_about_70k_parameters(recipe):
    run = build_run_config(recipe=f"unicornn/{recipe}")
    assert run.cell["name"] == "unicornn"
    n = count_parameters(build_model(run))
    assert 63_000 <= n <= 77_000, n


@pytest.mark.parametrize("kind", backends())
def test_state_stays_bounded_without_input(kind):
    """spec 7.9: x = 0 and delta^2 alpha < 4 (psMNIST settings): |y| stays bounded over 1e5 steps."""
    H = 8
    g = torch.Generator().manual_seed(0)
    y0, z0 = torch.randn(1, H, generator=g), torch.randn(1, H, generator=g)
    w, c = torch.rand(H, generator=g), 0.2 * torch.rand(H, generator=g) - 0.1
    delta = 0.19 * torch.sigmoid(c)
    assert float((delta**2 * 30.65).max()) < 4
    steps = 100_000 if kind == "cpp" else 20_000
    with torch.no_grad():
        y, yT, zT = fused_scan(torch.zeros(1, steps, H), w, delta, y0, z0, 30.65, kind)
    start = float(torch.maximum(y0.abs(), z0.abs()).max())
    assert torch.isfinite(y).all() and float(y.abs().max()) < 5 * start + 1.0
    assert stability_margin(UnICORNNConfig(dt=0.19, alpha=30.65)) < 4


def test_initialisation_follows_the_authors_code():
    torch.manual_seed(0)
    cell = build_cell({"name": "unicornn", "hidden_size": 300, "num_layers": 2}, 50).requires_grad_(False)
    layer = cell.layers[0]
    bound = math.sqrt(6 / (65 * 50))  # kaiming_uniform_(a=8, mode='fan_in')
    assert float(layer.linear.weight.abs().max()) <= bound and float(layer.linear.weight.abs().max()) > 0.9 * bound
    assert float(layer.linear.bias.abs().max()) == 0.0
    assert float(layer.w.min()) >= 0.0 and float(layer.w.max()) <= 1.0
    assert float(layer.c.abs().max()) <= 0.1
    assert all(isinstance(layer.dt, float) for layer in cell.layers)  # dt is a constant, not trained
    assert {n.split(".")[-1] for n, _ in cell.named_parameters()} == {"weight", "bias", "w", "c"}


# -- backends ----------------------------------------------------------------------------------------------

def test_backend_fallback_and_errors(monkeypatch):
    x = torch.randn(2, 3, 4)
    monkeypatch.setattr(recurrence.KERNEL, "state", {"loaded": False, "error": "simulated: no compiler"})
    assert recurrence.resolve_backend("auto", x) == "python"
    with pytest.raises(SeqplatError, match=r"unicornn: the C\+\+ kernel cannot be built \(simulated: no compiler\); "
                       r"cell.backend='cpp' needs it"):
        recurrence.resolve_backend("cpp", x)
    assert recurrence.resolve_backend("auto", x.half()) == "python"
    with pytest.raises(ValueError, match="float32/float64 CPU tensors"):
        recurrence.resolve_backend("cpp", x.half())


def test_missing_compiler_falls_back_to_python(monkeypatch):
    monkeypatch.setattr(recurrence.KERNEL, "state", {"loaded": False, "error": None})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert load_cpp_extension() is False
    assert "no C++ compiler '/nonexistent/c++'" in recurrence.cpp_error()
    cell = build_cell({"name": "unicornn", "hidden_size": 4, "num_layers": 1, "dropout": 0.0}, 2)
    y, _ = cell(torch.randn(2, 6, 2))  # auto -> python, still the reverse-recompute function
    assert y.grad_fn is not None and "ReverseRecomputeScan" in type(y.grad_fn).__name__


def test_auto_uses_the_cpp_kernel_on_cpu_when_it_builds():
    if not load_cpp_extension(cache_dir=EXT_CACHE):
        pytest.skip(f"C++ kernel unavailable: {recurrence.cpp_error()}")
    assert recurrence.resolve_backend("auto", torch.randn(2, 3, 4)) == "cpp"
    assert recurrence.resolve_backend("auto", torch.randn(2, 3, 4, dtype=torch.float64)) == "cpp"


def test_half_precision_runs_the_recurrence_in_float32():
    x, w, c, y0, z0 = (t.detach() for t in inputs(dtype=torch.float32))
    ref = fused_scan(x, w, 0.2 * torch.sigmoid(c), y0, z0, 1.0, "python")[0]
    out = fused_scan(x.bfloat16(), w.bfloat16(), (0.2 * torch.sigmoid(c)).bfloat16(), y0.bfloat16(),
                     z0.bfloat16(), 1.0, "python")[0]
    assert out.dtype == torch.bfloat16 and float((out.float() - ref).abs().max()) < 0.05


# -- "any cell, any task": stream LM with carried state, last-step classification, regression ---------------

@pytest.mark.parametrize("task", ["toy_stream", "toy_parity",
                                  {"name": "adding", "length": 20, "valid_size": 8, "test_size": 8},
                                  {"name": "copy_memory", "delay": 5, "valid_size": 8, "test_size": 8}],
                         ids=["stream", "last-step-class", "regression", "per-step"])
@pytest.mark.parametrize("cell", ["unicornn", "cornn"])
def test_trains_on_every_kind_of_task(tiny_run, task, cell):
    from seqplat.core.train import train

    result = train(tiny_run({"name": cell, "hidden_size": 8, **({"num_layers": 2} if cell == "unicornn" else {})},
                            task=task, steps=2), progress=False)
    assert result.steps == 2 and all(math.isfinite(v) for v in result.test_metrics.values())


# -- data: noise-padded CIFAR-10 ------------------------------------------------------------------------------

def _write_cifar(root: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    everything = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}))
        everything.append((data, labels))
    return everything[-1][0], np.asarray(everything[-1][1])


def test_noisy_cifar10_from_canonical_pickles(tmp_path, monkeypatch):
    test_data, test_labels = _write_cifar(tmp_path)
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path))
    task = build_task({"name": "noisy_cifar10", "valid_size": 4})
    task.prepare()
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [26, 4, 6]
    batch = next(task.eval_batches("test", 6))
    assert batch.inputs.shape == (6, 1000, 96) and batch.targets.tolist() == test_labels.tolist()
    img = test_data[2].reshape(3, 32, 32) / 255.0
    row5 = np.concatenate([img[0, 5], img[1, 5], img[2, 5]])  # step 5 = row 5 of R, then G, then B
    np.testing.assert_allclose(batch.inputs[2, 5].numpy(), row5, atol=1e-6)
    noise = batch.inputs[:, 32:]
    assert torch.equal(noise[0], noise[3]) and torch.equal(noise[0], task.train_batch(7, 3, 0).inputs[1, 32:])
    assert abs(float(noise[0].std()) - 1.0) < 0.05
    assert torch.equal(task.train_batch(5, 4, 0).inputs, task.train_batch(5, 4, 0).inputs)


def test_cifar_pickle_parser_refuses_code_and_bad_shapes():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(SeqplatError, match="refusing to load builtins.print"):
        datasets.parse_cifar_batch(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(SeqplatError, match="expected \\[n, 3072\\]"):
        datasets.parse_cifar_batch(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))


@pytest.mark.data
def test_noisy_cifar10_reads_the_png_copy():
    task = build_task({"name": "noisy_cifar10", "png_folder": "foolbox_cifar10_test_first20"})
    labels = task.splits["test"][1].tolist()
    assert labels == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]  # README: first 20 test labels
    batch = next(task.eval_batches("test", 20))
    assert batch.inputs.shape == (20, 1000, 96)
    assert float(batch.inputs[:, :32].min()) >= 0.0 and float(batch.inputs[:, :32].max()) <= 1.0


# -- data: EigenWorms / UEA .ts ----------------------------------------------------------------------------------

TS_TEXT = """# comment
@problemName Toy
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true a b
@data
1,2,3:4,5,6:a
7,?,9:1,1,1:b
"""


def test_ts_parser():
    ts = datasets.parse_ts(TS_TEXT)
    assert ts.values.shape == (2, 3, 2) and ts.labels == ["a", "b"] and ts.class_labels == ["a", "b"]
    assert ts.values[0, :, 1].tolist() == [4, 5, 6] and math.isnan(ts.values[1, 1, 0])
    reg = datasets.parse_ts("@targetLabel true\n@data\n1,2:0.5\n3,4:1.5\n")
    assert reg.targets.tolist() == [0.5, 1.5]
    with pytest.raises(SeqplatError, match="different lengths"):
        datasets.parse_ts("@classLabel true a\n@data\n1,2:3:a\n")
    with pytest.raises(SeqplatError, match="not declared"):
        datasets.parse_ts("@classLabel true a\n@data\n1,2:z\n")
    with pytest.raises(SeqplatError, match="no @data"):
        datasets.parse_ts("@problemName x\n")


def test_sklearn_style_split_sizes():
    """259 EigenWorms cases -> 181 / 39 / 39, as the authors' two train_test_split calls."""
    train, held = datasets.sklearn_style_split(259, 0.3, 1234)
    valid_rel, test_rel = datasets.sklearn_style_split(len(held), 0.5, 1234)
    assert (len(train), len(held[valid_rel]), len(held[test_rel])) == (181, 39, 39)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(259))
    np.testing.assert_array_equal(np.random.RandomState(1234).permutation(259)[78:], train)


@pytest.mark.data
def test_eigenworms_task_on_the_real_basicmotions_ts_files():
    task = build_task({"name": "eigenworms", "problem": "BasicMotions", "num_classes": 4})
    assert task.classes == ["Badminton", "Running", "Standing", "Walking"]
    sizes = [task.num_examples(s) for s in ("train", "valid", "test")]
    assert sizes == [56, 12, 12]  # 80 cases: ceil(0.3*80)=24 held out, halved
    batch = task.train_batch(0, 8, 0)
    assert batch.inputs.shape == (8, 100, 6) and batch.inputs.dtype == torch.float32
    with pytest.raises(SeqplatError, match="task.num_classes=5 but BasicMotions has 4"):
        build_task({"name": "eigenworms", "problem": "BasicMotions"}).prepare()


# -- data: IMDB -------------------------------------------------------------------------------------------------

REVIEWS = {
    ("train", "pos"): ["A great, great movie!", "Loved it.<br /><br />Great acting", "great fun", "superb and great"],
    ("train", "neg"): ["Awful movie.", "Boring, awful and long", "I didn't like it", "awful awful"],
    ("test", "pos"): ["great", "really great film"],
    ("test", "neg"): ["awful", "so boring"],
}


def _write_imdb(root: Path) -> None:
    folder = root / "imdb"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "aclImdb_labelled.tar.xz", "w:xz") as tf:
        for (split, label), texts in REVIEWS.items():
            for i, text in enumerate(texts):
                data = text.encode()
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{8 if label == 'pos' else 2}.txt")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_tokenizer_and_vocabulary():
    assert datasets.tokenize("I didn't like it.<br />Great!") == ["I", "didn't", "like", "it", ".", "Great", "!"]
    vocab = datasets.build_vocab([["b", "a", "b"], ["c", "a"]], max_size=2)
    assert vocab == ["<unk>", "<pad>", "a", "b"]  # ties broken alphabetically


@pytest.mark.parametrize("padding", ["right", "left"])
def test_imdb_task_on_a_fixture_archive(tmp_path, monkeypatch, padding):
    _write_imdb(tmp_path)
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path))
    task = build_task({"name": "imdb", "valid_fraction": 0.25, "padding": padding, "max_vocab": 50})
    task.prepare()
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [6, 2, 4]
    assert task.vocab[:2] == ["<unk>", "<pad>"]
    batch = next(task.eval_batches("test", 4))
    assert sorted(batch.targets.tolist()) == [0, 0, 1, 1]
    pad_cols = batch.inputs == 1
    if padding == "right":
        assert not pad_cols[:, 0].any()
    else:
        assert not pad_cols[:, -1].any()
    b1, b2 = task.train_batch(3, 2, 0), task.train_batch(3, 2, 0)
    assert torch.equal(b1.inputs, b2.inputs) and task.steps_per_epoch(2) == 3
    run = build_run_config(recipe="unicornn/imdb", overrides=["task.glove=false", "task.valid_fraction=0.25"])
    model = build_model(run, task)
    assert count_parameters(model) == 30_081 + task.vocab_size * 100
    weight = model.encoder.weight.detach()
    assert float(weight[0].abs().sum()) == 0 and float(weight[1].abs().sum()) == 0  # <unk>, <pad> rows
    model.eval()
    with torch.no_grad():
        out, _ = model(batch.inputs)
    assert out.shape == (4, 1)
    stats = task.batch_stats(out, batch)
    metrics = task.finalize(stats)
    assert stats["confusion"].sum() == 4 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(
        out.reshape(-1), batch.targets.float())), rel=1e-6)


def test_word_dropout_drops_whole_embedding_rows():
    from seqplat.plugins.unicornn.tasks import WordDropoutEmbedding

    torch.manual_seed(0)
    emb = WordDropoutEmbedding(50, 6, padding_idx=1, p=0.5).train()
    ids = torch.tensor([[3, 3, 4, 5, 3]])
    out = emb(ids)
    for pos in (1, 4):  # the same word is either dropped everywhere or kept everywhere in a pass
        torch.testing.assert_close(out[0, pos], out[0, 0])
    zeroed = (out[0].abs().sum(-1) == 0).tolist()
    kept = [(out[0, i] / emb.weight[ids[0, i]]).mean().item() for i in range(5) if not zeroed[i]]
    assert all(abs(k - 2.0) < 1e-5 for k in kept)
    emb.eval()
    torch.testing.assert_close(emb(ids), emb.weight[ids])


@pytest.mark.data
@pytest.mark.slow  # reads and decompresses the whole 105 MB archive (~15 s)
def test_imdb_task_on_the_real_aclimdb_archive():
    task = build_task({"name": "imdb", "max_examples": 64})
    assert [task.num_examples(s) for s in ("train", "valid", "test")] == [64, 64, 64]
    batch = task.train_batch(0, 16, 0)
    assert batch.inputs.dtype == torch.long and batch.inputs.shape[0] == 16
    assert set(task.splits["test"][1].tolist()) == {0, 1}


# -- recipes and CLI ----------------------------------------------------------------------------------------------

def test_default_recipe_trains_a_few_steps(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--plugin", "unicornn", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "train.max_eval_batches=1", "--set", "tracking.enabled=false",
        "--set", f"io.output_dir={tmp_path}", "--no-progress",
    ])
    assert result.exit_code == 0, result.output


@pytest.mark.data
def test_paper_recipe_runs_and_resumes_on_cpu(tmp_path):
    """The noise-padded CIFAR-10 recipe (T=1000, 3 x 128) on the 20 real test images: 2 steps, then
    resumed to 3."""
    from seqplat.core.train import train

    overrides = ["task.png_folder=foolbox_cifar10_test_first20", "train.batch_size=4", "train.eval_batch_size=10",
                 "train.eval_every=2", "train.checkpoint_every=2", "train.max_eval_batches=1",
                 "tracking.enabled=false", f"io.run_dir={tmp_path / 'run'}"]
    first = train(build_run_config(recipe="unicornn/noisy_cifar10", overrides=[*overrides, "train.steps=2"]),
                  progress=False)
    assert first.steps == 2
    resumed = train(build_run_config(recipe="unicornn/noisy_cifar10", overrides=[*overrides, "train.steps=3"]),
                    resume=str(tmp_path / "run"), progress=False)
    assert resumed.steps == 3 and math.isfinite(resumed.test_metrics["loss"])


@pytest.mark.data
def test_eigenworms_recipe_runs_on_the_basicmotions_proxy(tmp_path):
    from seqplat.core.train import train

    run = build_run_config(recipe="unicornn/eigenworms", overrides=[
        "task.problem=BasicMotions", "task.num_classes=4", "train.steps=2", "train.eval_every=2",
        "tracking.enabled=false", f"io.output_dir={tmp_path}"])
    assert math.isfinite(train(run, progress=False).test_metrics["accuracy"])


def test_memory_command_runs(monkeypatch):
    from seqplat.plugins.unicornn import memory

    calls = []
    monkeypatch.setattr(memory, "measure", lambda *a, **k: calls.append((a, k)) or [memory.measure_one(50, "fused")])
    result = CliRunner().invoke(memory.unicornn_memory, ["--lengths", "50", "--hidden", "4"])
    assert result.exit_code == 0, result.output
    assert "| 50 | fused |" in result.output and calls[0][0][0] == (50,)
    bad = CliRunner().invoke(memory.unicornn_memory, ["--lengths", "a,b"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output


def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the docs page has no python snippet"
    exec(compile(blocks[0], str(DOCS), "exec"), {})  # noqa: S102 - our own docs
