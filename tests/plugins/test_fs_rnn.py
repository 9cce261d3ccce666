"""Tests of the fs_rnn plugin: the LN-LSTM with zoneout, the Fast-Slow wrapper around any steppable
cell, the four dropout sites, the fast path, the parameter counts and the recipes. Comments
``spec 5.x`` refer to the items of section 5 ("tests an implementer should write") of
``../shared/papers/fs_rnn.md``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from pydantic import Field
from torch import Tensor, nn

import seqplat
from seqplat import (
    Cell,
    CellConfig,
    ConfigError,
    StepCell,
    build_cell,
    build_model,
    build_run_config,
    count_parameters,
)
from seqplat.core.cell import flatten_state
from seqplat.core.config import validate_component
from seqplat.plugins.fs_rnn.cell import FSRNNCell
from seqplat.plugins.fs_rnn.ln_lstm import LNLSTMCell, block_layer_norm
from seqplat.plugins.fs_rnn.zoneout import zoneout
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins" / "fs_rnn.md"
RECIPES = ["default", "ptb_char", "ptb_char_fs4", "enwik8_fs2", "enwik8_fs4", "enwik8_large",
           "ptb_char_1m", "ptb_char_1m_gru", "copy_200"]
PTB = {"zoneout_keep_h": 0.9, "zoneout_keep_c": 0.5}


def ln(n: int, **options: Any) -> dict[str, Any]:
    return {"name": "ln_lstm", "hidden_size": n, **options}


def fs_spec(k: int = 2, fast: Any = None, slow: Any = None, **options: Any) -> dict[str, Any]:
    return {"name": "fs_rnn", "num_fast": k, "fast": fast or ln(4, **PTB), "slow": slow or ln(3, **PTB), **options}


def fs(k: int = 2, input_size: int = 3, **options: Any) -> FSRNNCell:
    torch.manual_seed(0)
    cell = build_cell(fs_spec(k, **options), input_size)
    assert isinstance(cell, FSRNNCell)
    return cell


class Spy:
    """Record every step of the inner cells: (role, input, state in, output, state out). Both the
    reference ``step`` and the fast path's ``step_planned`` (input None = zero input) are watched."""

    def __init__(self, cell: FSRNNCell):
        self.calls: list[tuple[str, Tensor | None, Any, Tensor, Any]] = []
        roles = [f"F{i + 1}" for i in range(len(cell.fast_cells))] + ["S"]
        for role, inner in zip(roles, cell.inner_cells(), strict=True):
            inner.step = self._wrap(role, inner.step)  # type: ignore[method-assign]
            if hasattr(inner, "step_planned"):
                inner.step_planned = self._wrap_planned(role, inner.step_planned)  # type: ignore[method-assign]

    def _record(self, role, u, state, y, new):
        self.calls.append((role, None if u is None else u.detach().clone(), state, y.detach().clone(), new))

    def _wrap(self, role, step):
        def spied(x_t, state, *, t=None):
            y, new = step(x_t, state, t=t)
            self._record(role, x_t, state, y, new)
            return y, new

        return spied

    def _wrap_planned(self, role, step_planned):
        def spied(u, state, plan, *, projected=False):
            y, new = step_planned(u, state, plan, projected=projected)
            self._record(role, u, state, y, new)
            return y, new

        return spied


# -- registration and conformance ------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    info = reg.get_plugin("fs_rnn")
    assert not info.broken, info.error
    assert {"ln_lstm", "fs_rnn"} <= set(reg.names("cell"))
    assert {f"fs_rnn/{r}" for r in RECIPES} <= set(reg.names("recipe"))


# float32 fast-vs-reference tolerance for layer-normalised cells: normalising a 2-4 unit layer divides by a
# small std, so the two summation orders (hoisted input projections vs per step) differ by up to ~2e-5 in
# weight gradients (seen once on a 2-core CI machine); exact agreement is checked in float64 by gradcheck_cell.
LN_TOL = {"atol": 1e-4, "rtol": 1e-3}


@pytest.mark.parametrize("spec", [ln(4), ln(4, **PTB), ln(3, pre_ln_bias=False, forget_bias=0.0)],
                         ids=["plain", "zoneout", "no_bias"])
def test_ln_lstm_conformance(spec):
    check_cell(spec, **LN_TOL)
    gradcheck_cell(spec)


@pytest.mark.parametrize("spec", [
    fs_spec(3, ln(2, **PTB), ln(2, **PTB)),
    fs_spec(3, ln(3), ln(2), inputless_width=0),
    fs_spec(3, {"name": "gru", "hidden_size": 2}, {"name": "lstm", "hidden_size": 2}),
], ids=["ln_lstm_k3", "ln_lstm_no_input_matrix", "gru_fast_lstm_slow"])
def test_fs_rnn_conformance(spec):
    check_cell(spec, **LN_TOL)
    gradcheck_cell(spec)


def test_fs_rnn_conformance_with_dropout_configured():
    check_cell(fs_spec(2, dropout=0.3), **LN_TOL)  # eval mode: dropout off, paths agree


# -- spec 5.1: order of updates ----------------------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_update_order_and_what_each_cell_reads(fast):
    cell = fs(3).eval()
    cell.explicit_backward = False  # the planned loop: the fused one (test_fs_rnn_fused.py) makes no inner calls
    spy = Spy(cell)
    x = torch.randn(2, 3, 3)
    cell.use_fast_path = fast
    y, _ = cell(x)
    assert [c[0] for c in spy.calls] == ["F1", "S", "F2", "F3"] * 3
    prev_fast = cell.initial_state(2)[0]
    f1_cell = cell.fast_cells[0]
    for t in range(3):
        f1, s, f2, f3 = spy.calls[4 * t: 4 * t + 4]
        # only F1 reads x_t (the fast path hands it W_x x_t, hoisted out of the loop)
        torch.testing.assert_close(f1[1], f1_cell.project_inputs(x[:, t]) if fast else x[:, t])
        for a, b in zip(f1[2], prev_fast, strict=True):  # F1's state is Fk's (h, c) of step t-1
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(s[1], f1[3])  # S reads F1's new output of the same step
        for a, b in zip(f2[2], f1[4], strict=True):  # F2 continues from F1's new state
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(f2[1], s[3])  # F2 reads the slow output
        for a, b in zip(f3[2], f2[4], strict=True):
            torch.testing.assert_close(a, b)
        assert f3[1] is None if fast else (f3[1].shape == (2, 1) and not f3[1].any())  # F3: no input
        torch.testing.assert_close(y[:, t], f3[3])  # the output is Fk's
        prev_fast = f3[4]


def test_fs_step_equals_a_hand_written_unroll():
    """Eqs. 1-5 unrolled by hand with the inner cells' own steps, against both paths."""
    cell = fs(3).eval()
    f1, f2, f3 = cell.fast_cells
    x = torch.randn(2, 4, 3)
    fast_state, slow_state = cell.initial_state(2)
    ys = []
    with torch.no_grad():
        for t in range(4):
            y1, fast_state = f1.step(x[:, t], fast_state)
            ys_, slow_state = cell.slow_cell.step(y1, slow_state)
            y2, fast_state = f2.step(ys_, fast_state)
            y3, fast_state = f3.step(torch.zeros(2, 1), fast_state)
            ys.append(y3)
        expected = torch.stack(ys, 1)
        for fast in (False, True):
            cell.use_fast_path = fast
            y, (fs_state, s_state) = cell(x)
            torch.testing.assert_close(y, expected)
            for a, b in zip(flatten_state((fs_state, s_state)), flatten_state((fast_state, slow_state)),
                            strict=True):
                torch.testing.assert_close(a, b)


def test_slow_cell_is_updated_every_step():
    cell = fs(2).eval()
    spy = Spy(cell)
    cell.use_fast_path = False
    cell(torch.randn(2, 5, 3))
    assert [c[0] for c in spy.calls].count("S") == 5


# -- spec 5.2: state structure ---------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 4])
def test_state_structure_and_widths(k):
    cell = build_cell(fs_spec(k, ln(7), ln(5)), 3)
    (h_f, c_f), (h_s, c_s) = cell.initial_state(2)
    assert [tuple(t.shape) for t in (h_f, c_f, h_s, c_s)] == [(2, 7), (2, 7), (2, 5), (2, 5)]
    y, ((h_f, c_f), (h_s, c_s)) = cell(torch.randn(2, 3, 3))
    assert y.shape == (2, 3, 7) and cell.output_size == 7
    assert [tuple(t.shape) for t in (h_f, c_f, h_s, c_s)] == [(2, 7), (2, 7), (2, 5), (2, 5)]
    inputs = [c.input_size for c in cell.fast_cells]
    assert inputs == [3, 5] + [1] * (k - 2)  # k = 2: no input-less cells
    assert cell.slow_cell.input_size == 7 and len(cell.fast_cells) == k


# -- spec 5.3: input-less cells --------------------------------------------------------------------

def test_zero_input_contributes_nothing():
    torch.manual_seed(0)
    with_input = build_cell(ln(4, **PTB), 1).eval()
    without = build_cell(ln(4, **PTB), 0).eval()
    assert without.weight_x is None
    sd = {k: v for k, v in with_input.state_dict().items() if k != "weight_x"}
    without.load_state_dict(sd)
    state = (torch.randn(2, 4), torch.randn(2, 4))
    y1, s1 = with_input.step(torch.zeros(2, 1), state)
    y0, s0 = without.step(torch.zeros(2, 0), state)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(s1[1], s0[1])


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_input_less_fast_cells_equal_cells_without_input_matrix(fast):
    a = fs(4).eval()  # inputless_width 1: the authors' unused 1 x 4n matrices
    b = fs(4, inputless_width=0).eval()
    assert count_parameters(a) - count_parameters(b) == 2 * 4 * 4  # two 1 x 4n matrices
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not re.match(r"fast_cells\.[23]\.weight_x", k)})
    x = torch.randn(2, 5, 3)
    a.use_fast_path = b.use_fast_path = fast
    torch.testing.assert_close(a(x)[0], b(x)[0])


# -- spec 5.4, 5.5: the LN-LSTM equations ----------------------------------------------------------

def _ln(v: Tensor, eps: float = 1e-3) -> Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps)


def plain_ln_lstm(cell: LNLSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs. 1-3 written out independently of the cell's code (no zoneout)."""
    n = h.shape[-1]
    a = x @ cell.weight_x.T + h @ cell.weight_h.T + cell.bias
    blocks = [_ln(a[:, i * n:(i + 1) * n]) for i in range(4)]
    a = torch.cat(blocks, -1) * cell.ln_gain + cell.ln_shift
    i, j, f, o = a.split(n, -1)
    c_new = torch.sigmoid(f + 1.0) * c + torch.sigmoid(i) * torch.tanh(j)
    h_new = torch.sigmoid(o) * torch.tanh(_ln(c_new) * cell.ln_c_gain + cell.ln_c_shift)
    return h_new, c_new


def test_all_zero_weights_give_the_closed_form():
    cell = build_cell(ln(6), 3)
    with torch.no_grad():
        for p in (cell.weight_x, cell.weight_h, cell.bias):
            p.zero_()
    c = torch.randn(2, 6)
    y, (h, c_new) = cell.step(torch.randn(2, 3), (torch.randn(2, 6), c))
    sig1 = 1 / (1 + math.exp(-1))  # ~0.731
    torch.testing.assert_close(c_new, sig1 * c)
    torch.testing.assert_close(h, 0.5 * torch.tanh(_ln(sig1 * c)))
    torch.testing.assert_close(y, h)


def test_ln_lstm_matches_the_written_out_equations():
    torch.manual_seed(1)
    cell = build_cell(ln(5), 3).train()  # keep = 1: training mode is the plain LN-LSTM
    with torch.no_grad():
        for p in (cell.bias, cell.ln_gain, cell.ln_shift, cell.ln_c_gain, cell.ln_c_shift):
            p.add_(0.3 * torch.randn_like(p))
    x, h, c = torch.randn(2, 3), torch.randn(2, 5), torch.randn(2, 5)
    h_ref, c_ref = plain_ln_lstm(cell, x, h, c)
    y, (h_new, c_new) = cell.step(x, (h, c))
    torch.testing.assert_close(h_new, h_ref)
    torch.testing.assert_close(c_new, c_ref)  # c is stored un-normalised
    torch.testing.assert_close(y, h_ref)


def test_layer_norm_is_per_gate_block():
    torch.manual_seed(0)
    cell = build_cell(ln(64), 16)
    scales = torch.tensor([0.1, 1.0, 10.0, 100.0]).repeat_interleave(64)
    a = torch.randn(32, 256) * scales + 5.0  # each block has its own scale and offset
    out = cell.gate_preactivations(a).unflatten(-1, (4, 64))  # gains 1, shifts 0 at init
    torch.testing.assert_close(out.mean(-1), torch.zeros(32, 4), atol=1e-5, rtol=0)
    v = a.unflatten(-1, (4, 64)).var(-1, unbiased=False)
    torch.testing.assert_close(out.var(-1, unbiased=False), v / (v + 1e-3))  # eps inside the sqrt
    # for random inputs and weights, through the whole preactivation
    h = torch.randn(32, 64)
    pre = cell.gate_preactivations(F.linear(torch.randn(32, 16), cell.weight_x) + F.linear(h, cell.weight_h))
    blocks = pre.unflatten(-1, (4, 64))
    torch.testing.assert_close(blocks.mean(-1), torch.zeros(32, 4), atol=1e-5, rtol=0)
    assert ((blocks.var(-1, unbiased=False) - 1).abs() < 0.01).all()
    joint = block_layer_norm(a, 1, 1e-3).unflatten(-1, (4, 64))  # a joint LN would not do this
    assert (joint.var(-1, unbiased=False)[:, 0] < 1e-3).all()


def test_orthogonal_initialisation():
    for d, n in [(3, 5), (128, 700 // 20), (40, 8)]:
        cell = build_cell(ln(n), d)
        for w in (cell.weight_x, cell.weight_h):  # [4n, d] and [4n, n]: orthonormal columns or rows
            gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
        assert not cell.bias.any() and (cell.ln_gain == 1).all() and not cell.ln_shift.any()
        assert (cell.ln_c_gain == 1).all() and not cell.ln_c_shift.any()


# -- spec 5.6: zoneout -----------------------------------------------------------------------------

def _twins(keep_h: float, keep_c: float, n: int = 5) -> tuple[LNLSTMCell, LNLSTMCell]:
    torch.manual_seed(3)
    zoned = build_cell(ln(n, zoneout_keep_h=keep_h, zoneout_keep_c=keep_c), 3)
    plain = build_cell(ln(n), 3)
    plain.load_state_dict(zoned.state_dict())
    return zoned, plain


def test_zoneout_keep_one_is_the_plain_cell():
    zoned, plain = _twins(1.0, 1.0)
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(zoned.train()(x)[0], plain.eval()(x)[0])


def test_zoneout_eval_is_the_expected_mix_with_ptb_settings():
    zoned, plain = _twins(0.9, 0.5)
    zoned.eval()
    state = (torch.randn(2, 5), torch.randn(2, 5))
    x = torch.randn(2, 3)
    _, (h_new, c_new) = plain.step(x, state)
    y, (h, c) = zoned.step(x, state)
    torch.testing.assert_close(h, 0.9 * h_new + 0.1 * state[0])
    torch.testing.assert_close(c, 0.5 * c_new + 0.5 * state[1])
    torch.testing.assert_close(y, h)  # the output is the zoned h, as in the authors' code


def test_zoneout_training_takes_each_unit_exactly_new_or_old():
    zoned, plain = _twins(0.9, 0.5, n=400)
    zoned.train()
    state = (torch.randn(64, 400), torch.randn(64, 400))
    x = torch.randn(64, 3)
    _, (h_new, c_new) = plain.step(x, state)
    torch.manual_seed(5)
    y, (h, c) = zoned.step(x, state)
    for got, new, old, keep in ((h, h_new, state[0], 0.9), (c, c_new, state[1], 0.5)):
        is_new, is_old = got == new, got == old
        assert (is_new | is_old).all()
        assert abs(is_new.double().mean().item() - keep) < 0.01  # 25,600 units
    torch.testing.assert_close(y, h)


def test_zoneout_function_and_core_zoneout_prob_folded_in():
    old, new = torch.zeros(1000), torch.ones(1000)
    torch.manual_seed(0)
    assert zoneout(old, new, 1.0, True) is new
    assert zoneout(old, new, 0.3, False).eq(0.3).all()
    # a regularizer's zoneout_prob (probability of keeping the old value) combines with keep
    zoned, plain = _twins(0.9, 0.5)
    zoned.zoneout_prob = 0.5
    zoned.eval()
    state = (torch.randn(2, 5), torch.randn(2, 5))
    x = torch.randn(2, 3)
    _, (h_new, c_new) = plain.step(x, state)
    y, (h, c) = zoned(x[:, None], state)
    torch.testing.assert_close(h, 0.45 * h_new + 0.55 * state[0])
    torch.testing.assert_close(c, 0.25 * c_new + 0.75 * state[1])


def test_zoneout_previous_state_of_f2_is_f1s_new_state():
    """In eval, F2's zoned state mixes its new state with the state F1 handed over in the same step."""
    cell = fs(2).eval()
    spy = Spy(cell)
    cell.use_fast_path = False
    cell(torch.randn(2, 1, 3))
    _, _, f1_out_state = spy.calls[0][2], spy.calls[0][3], spy.calls[0][4]
    f2_in_state = spy.calls[2][2]
    for a, b in zip(f2_in_state, f1_out_state, strict=True):
        assert a is b


# -- spec 5.7: dropout at exactly four places ------------------------------------------------------

def _dropped_or_zero(got: Tensor, clean: Tensor, p: float) -> bool:
    scaled = clean / (1 - p)
    return bool(((got == 0) | torch.isclose(got, scaled, atol=1e-6, rtol=1e-5)).all()) and bool((got == 0).any())


def test_dropout_sites_reference_path():
    p = 0.5
    cell = fs(3, fast=ln(16), slow=ln(12), dropout=p).train()  # keep 1: no zoneout noise
    spy = Spy(cell)
    cell.use_fast_path = False
    x = torch.randn(4, 3, 3) + 3.0  # no exact zeros
    y, _ = cell(x)
    for t in range(3):
        f1, s, f2, f3 = spy.calls[4 * t: 4 * t + 4]
        assert _dropped_or_zero(f1[1], x[:, t], p)  # site 1: x_t before F1
        assert _dropped_or_zero(s[1], f1[3], p)  # site 2: h^F1 before S
        assert _dropped_or_zero(f2[1], s[3], p)  # site 3: h^S before F2
        assert _dropped_or_zero(y[:, t], f3[3], p)  # site 4: h^Fk before the output
        for a, b in zip(f2[2], f1[4], strict=True):  # never on the fast state handed F1 -> F2
            assert a is b
        for a, b in zip(f3[2], f2[4], strict=True):
            assert a is b
        assert not f3[1].any()


def test_dropout_sites_fast_path():
    p = 0.5
    cell = fs(2, fast=ln(16), slow=ln(12), dropout=p).train()
    cell.explicit_backward = False  # the planned loop; the fused one is checked against it in test_fs_rnn_fused.py
    spy = Spy(cell)
    seen: list[Tensor] = []
    f1 = cell.fast_cells[0]
    project = f1.project_inputs
    f1.project_inputs = lambda x: (seen.append(x.detach().clone()), project(x))[1]  # type: ignore[method-assign]
    x = torch.randn(4, 3, 3) + 3.0
    y, _ = cell(x)
    assert _dropped_or_zero(seen[0], x, p)  # site 1 on the whole sequence
    for t in range(3):
        f1_, s, f2 = spy.calls[3 * t: 3 * t + 3]
        assert _dropped_or_zero(s[1], f1_[3], p)  # site 2
        assert _dropped_or_zero(f2[1], s[3], p)  # site 3
        assert _dropped_or_zero(y[:, t], f2[3], p)  # site 4 (on the whole output sequence)
        for a, b in zip(f2[2], f1_[4], strict=True):
            assert a is b


def test_eval_is_deterministic_and_dropout_free():
    cell = fs(3, dropout=0.5)
    clean = build_cell(fs_spec(3, dropout=0.0), 3)
    clean.load_state_dict(cell.state_dict())
    cell.eval()
    clean.eval()
    x = torch.randn(2, 6, 3)
    for fast in (False, True):
        cell.use_fast_path = clean.use_fast_path = fast
        a, b = cell(x)[0], cell(x)[0]
        assert torch.equal(a, b)
        torch.testing.assert_close(a, clean(x)[0])


# -- fast path parity (training mode, same random draws) -------------------------------------------

def _run(cell: Cell, x: Tensor, fast: bool, seed: int = 11):
    x = x.clone().requires_grad_(True)
    cell.zero_grad(set_to_none=True)
    cell.use_fast_path = fast
    torch.manual_seed(seed)
    y, state = cell(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    ((y * w).sum() + sum((s ** 2).sum() for s in flatten_state(state))).backward()
    return y.detach(), x.grad, [p.grad for p in cell.parameters()]


@pytest.mark.parametrize("spec", [ln(6, **PTB), fs_spec(3, ln(6, **PTB), ln(4, **PTB)),
                                  fs_spec(2, {"name": "gru", "hidden_size": 5}, ln(4, **PTB))],
                         ids=["ln_lstm", "fs_ln_lstm", "fs_gru_fast"])
def test_fast_path_matches_reference_in_training_with_zoneout(spec):
    """float64, so the comparison is about the computation, not float32 rounding (which layer norm
    over a few units amplifies); the zoneout masks are drawn in the same order on both paths."""
    torch.manual_seed(0)
    cell = build_cell(spec, 3).double().train()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    y_r, gx_r, g_r = _run(cell, x, fast=False)
    y_f, gx_f, g_f = _run(cell, x, fast=True)
    torch.testing.assert_close(y_f, y_r, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-10, rtol=1e-8)
    for p, a, b in zip(cell.parameters(), g_f, g_r, strict=True):
        # the fast path skips the zero inputs of F3..Fk: their unused input matrices get no gradient
        a = torch.zeros_like(p) if a is None else a
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# -- spec 5.8: parameter counts --------------------------------------------------------------------

def lnlstm_count(d: int, n: int) -> int:
    return 4 * n * (d + n) + 14 * n


@pytest.mark.parametrize(("V", "E", "nf", "ns", "k", "expected"), [
    (50, 128, 700, 400, 2, 7_225_050),
    (50, 128, 500, 400, 4, 6_565_050),
    (205, 256, 900, 1500, 2, 27_484_985),
    (205, 256, 730, 1500, 4, 27_303_975),
    (205, 256, 1200, 1500, 4, 48_065_285),
], ids=["ptb_fs2", "ptb_fs4", "enwik8_fs2", "enwik8_fs4", "enwik8_large_fs4"])
def test_spec_parameter_counts(V, E, nf, ns, k, expected):
    with torch.device("meta"):  # no memory, no init cost: shapes are all that is counted
        cell = build_cell(fs_spec(k, ln(nf), ln(ns)), E)
    n_cell = count_parameters(cell)
    formula = lnlstm_count(E, nf) + lnlstm_count(nf, ns) + lnlstm_count(ns, nf) + (k - 2) * lnlstm_count(1, nf)
    assert n_cell == formula
    assert V * E + n_cell + nf * V + V == expected


@pytest.mark.parametrize(("recipe", "expected"), [("ptb_char", 7_225_050), ("ptb_char_fs4", 6_565_050)])
def test_ptb_recipes_build_with_the_spec_parameter_count(recipe, expected):
    run = build_run_config(recipe=f"fs_rnn/{recipe}")  # ptb_char's 50 symbols are known without data
    with torch.device("meta"):
        model = build_model(run)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(("recipe", "nf", "ns", "k", "at_205"), [
    ("enwik8_fs2", 900, 1500, 2, 27_484_985),
    ("enwik8_fs4", 730, 1500, 4, 27_303_975),
    ("enwik8_large", 1200, 1500, 4, 48_065_285),
])
def test_enwik8_recipes_sizes(recipe, nf, ns, k, at_205):
    run = build_run_config(recipe=f"fs_rnn/{recipe}")
    assert run.cell["fast"]["hidden_size"] == nf and run.cell["slow"]["hidden_size"] == ns
    assert run.cell["num_fast"] == k and run.model.embedding_size == 256
    with torch.device("meta"):
        cell = build_cell(run.cell, 256)
    assert 205 * 256 + count_parameters(cell) + nf * 205 + 205 == at_205


@pytest.mark.data
@pytest.mark.parametrize("recipe", ["enwik8_fs2"])
def test_enwik8_recipe_builds_on_the_data_copy(recipe):
    """The shared copy is a 4.2M-byte prefix: its train-split vocabulary is smaller than 205."""
    run = build_run_config(recipe=f"fs_rnn/{recipe}")
    with torch.device("meta"):
        model = build_model(run)
    v = model.head.out_features
    assert v <= 205
    with torch.device("meta"):
        cell = build_cell(run.cell, 256)
    assert count_parameters(model) == v * 256 + count_parameters(cell) + 900 * v + v


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_resolves(recipe):
    run = build_run_config(recipe=f"fs_rnn/{recipe}")
    assert run.cell["name"] == "fs_rnn"
    assert run.cell["fast"]["name"] in ("ln_lstm", "gru")
    if recipe in ("ptb_char_1m", "ptb_char_1m_gru", "copy_200", "default"):
        model = build_model(run)
        n = count_parameters(model)
        if recipe.startswith("ptb_char_1m"):
            assert 900_000 <= n <= 1_100_000, n  # 1.0M +- 10%
            assert run.train.steps == 3000 and run.task["bptt"] == 100
        if recipe == "copy_200":
            assert 63_000 <= n <= 77_000, n  # about 70k


# -- spec 5.9: loss scaling ------------------------------------------------------------------------

def test_summed_cost_with_clip_1_equals_mean_loss_with_scaled_clip_and_eps():
    """The authors' cost is the window SUM of the mean-over-batch CE, clipped at global norm 1.0;
    ours is the mean over time. With Adam, clip_norm = 1/T and eps = 1e-8/T reproduce their updates."""
    T, V = 6, 7
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Embedding(V, 5), nn.Linear(5, V))
    ours = nn.Sequential(nn.Embedding(V, 5), nn.Linear(5, V))
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-8)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2, eps=1e-8 / T)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randint(0, V, (3, T), generator=g), torch.randint(0, V, (3, T), generator=g)
        ce = F.cross_entropy(ref(x).reshape(-1, V), y.reshape(-1), reduction="none").reshape(3, T)
        cost = ce.sum() / 3  # sum over time, mean over batch
        torch.testing.assert_close(cost, T * ce.mean())  # per-window cost = BPTT length x mean CE
        opt_ref.zero_grad()
        cost.backward()
        norm = nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        assert norm > 1.0  # clipping is active, as in the paper's runs
        opt_ref.step()
        loss = F.cross_entropy(ours(x).reshape(-1, V), y.reshape(-1))
        opt_ours.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ours.parameters(), 1.0 / T)
        opt_ours.step()
    for a, b in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("recipe", "bptt"), [("ptb_char", 150), ("ptb_char_fs4", 150), ("enwik8_large", 100),
                                              ("enwik8_fs2", 150), ("enwik8_fs4", 150)])
def test_paper_recipes_scale_clip_and_eps_by_the_window(recipe, bptt):
    run = build_run_config(recipe=f"fs_rnn/{recipe}")
    assert run.task["bptt"] == bptt
    assert run.train.clip_norm == pytest.approx(1.0 / bptt)
    assert run.train.eps == pytest.approx(1e-8 / bptt)
    assert run.train.batch_size == 128 and run.train.optimizer == "adam"


# -- any cell, third-party cells, errors -----------------------------------------------------------

class _ToyConfig(CellConfig):
    width: int = Field(3, ge=1, description="output units")


class _ToyCell(StepCell):
    """A third-party cell: no hidden_size option, a nested state."""

    config_class = _ToyConfig

    def __init__(self, input_size: int, config: _ToyConfig):
        super().__init__(input_size, config)
        self.inp = nn.Linear(input_size, config.width)
        self.rec = nn.Linear(config.width, config.width, bias=False)

    @property
    def output_size(self) -> int:
        return self.config.width

    def initial_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, self.config.width, device=device, dtype=dtype or torch.float32)
        return (z, (z.clone(),))

    def step(self, x_t, state, *, t=None):
        h, (acc,) = state
        h = torch.tanh(self.inp(x_t) + self.rec(h) + 0.5 * acc)
        return h, (h, (0.5 * acc + h,))


class _InputShapedState(_ToyCell):
    """A cell whose state width depends on its input size: cannot hand states between fast cells."""

    def initial_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(batch_size, self.input_size, device=device, dtype=dtype or torch.float32)


class _SequenceOnly(Cell):
    """A cell with only a whole-sequence forward (cannot be stepped)."""

    config_class = _ToyConfig

    def reference_forward(self, x, state, *, times=None):
        return x, state


class _ThirdParty:
    @seqplat.hookimpl
    def register_cells(self, register):
        register("toy_third_party", _ToyCell)
        register("toy_input_state", _InputShapedState)
        register("toy_sequence_only", _SequenceOnly)


def test_third_party_inner_cells(register_plugin):
    register_plugin(_ThirdParty(), "fs_rnn_test_toys")
    spec = fs_spec(3, {"name": "toy_third_party", "width": 3}, {"name": "toy_third_party", "width": 2})
    cell = check_cell(spec)
    gradcheck_cell(spec)
    assert cell.output_size == 3 and cell.slow_cell.input_size == 3 and cell.fast_cells[1].input_size == 2
    mixed = fs_spec(2, {"name": "toy_third_party", "width": 3}, ln(2))
    check_cell(mixed)


@pytest.mark.parametrize(("options", "message"), [
    ({"fast": {"name": "ln_lstn"}}, "cell.fast: Value error, fast.name: Unknown cell 'ln_lstn'. "
                                    "Did you mean 'ln_lstm'?"),
    ({"slow": {"name": "ln_lstm", "hidden_size": 0}}, "slow.hidden_size: Input should be greater than or equal to 1"),
    ({"slow": {"name": "ln_lstm", "zoneout_keep_c": 1.5}}, "slow.zoneout_keep_c: Input should be less than or equal"),
    ({"fast": {"name": "gru", "hiden_size": 8}}, "fast.hiden_size: unknown field"),
    ({"fast": {"hidden_size": 8}}, "fast: needs an inner cell spec {name: ..., <options>}"),
    ({"num_fast": 1}, "cell.num_fast: Input should be greater than or equal to 2"),
    ({"dropout": 1.0}, "cell.dropout: Input should be less than 1"),
])
def test_bad_configs_fail_at_config_time(options, message):
    with pytest.raises(ConfigError) as info:
        validate_component("cell", {"name": "fs_rnn", **options}, "cell", get_registry())
    assert message in str(info.value)


def test_inner_cell_that_cannot_step_fails_at_config_time(register_plugin):
    register_plugin(_ThirdParty(), "fs_rnn_test_toys")
    with pytest.raises(ConfigError) as info:
        build_run_config(recipe="fs_rnn/default", overrides=["cell.slow={name: toy_sequence_only}"])
    assert ("cell.slow: Value error, slow.name: cell 'toy_sequence_only' cannot be unrolled one step at a time"
            in str(info.value))


def test_sizes_that_cannot_chain_fail_at_build_with_the_field(register_plugin):
    register_plugin(_ThirdParty(), "fs_rnn_test_toys")
    with pytest.raises(ValueError, match=r"fs_rnn.fast: F2 \('toy_input_state', input_size 2\) has state shapes"):
        build_cell(fs_spec(2, {"name": "toy_input_state"}, {"name": "toy_third_party", "width": 2}), 3)


def test_cells_that_need_an_input_fail_with_inputless_width_zero():
    with pytest.raises(ValueError, match=r"fs_rnn.fast: cannot build F3 \('lstm'\) with input_size 0 "
                                         r"\(F3..Fk get inputless_width"):
        build_cell(fs_spec(3, {"name": "lstm", "hidden_size": 4}, inputless_width=0), 3)


def test_stream_training_with_carried_state(tiny_run):
    from seqplat.core.train import train

    cell = fs_spec(2, ln(16, zoneout_keep_h=0.95, zoneout_keep_c=0.9), ln(8), dropout=0.1)
    res = train(tiny_run(cell, steps=30, train={"lr": 1e-2, "eval_every": 30}), progress=False)
    assert res.valid_metrics["bpc"] < 2.5  # unigram over 8 symbols is 3 bits


@pytest.mark.parametrize("task", [
    "toy_parity",  # classification at the last step
    {"name": "adding", "length": 20, "valid_size": 8, "test_size": 8},  # regression
    {"name": "copy_memory", "delay": 10, "valid_size": 8, "test_size": 8, "encoding": "tokens"},  # per step
], ids=["last-step", "regression", "per-step-tokens"])
def test_trains_on_other_kinds_of_task(tiny_run, task):
    from seqplat.core.train import train

    cell = fs_spec(3, ln(6, **PTB), {"name": "gru", "hidden_size": 4}, dropout=0.2)
    res = train(tiny_run(cell, task=task, steps=3, model={"embedding_size": 8}), progress=False)
    assert res.steps == 3 and all(math.isfinite(v) for v in res.test_metrics.values())


# -- recipes run -----------------------------------------------------------------------------------

def test_default_recipe_trains_a_few_steps(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--recipe", "fs_rnn/default", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "train.max_eval_batches=1", "--set", "tracking.enabled=false",
        "--set", f"io.output_dir={tmp_path}", "--no-progress",
    ])
    assert result.exit_code == 0, result.output


def _paper_run(recipe: str, tmp_path: Path, steps: int):
    shrink = ["train.batch_size=2", "task.bptt=4", "task.max_eval_tokens=40", "task.eval_bptt=20",
              "task.eval_batch_size=2", "train.eval_batch_size=2", "train.eval_every=2", "train.checkpoint_every=2",
              "train.log_every=1", "train.threads=1", "tracking.enabled=false", f"io.run_dir={tmp_path / 'run'}",
              f"train.steps={steps}"]
    return build_run_config(recipe=f"fs_rnn/{recipe}", overrides=shrink)


@pytest.mark.data
@pytest.mark.parametrize("recipe", ["ptb_char", pytest.param("enwik8_large", marks=pytest.mark.slow)])
def test_paper_recipe_runs_a_few_steps_and_resumes(recipe, tmp_path):
    """The GPU-sized paper recipes as written (sizes, dropout, zoneout, clipping, Adam eps), with a
    tiny batch, window and evaluation: two steps, then a resumed third."""
    from seqplat.core.train import train

    first = train(_paper_run(recipe, tmp_path, 2), progress=False)
    assert first.steps == 2 and math.isfinite(first.valid_metrics["bpc"])
    resumed = train(_paper_run(recipe, tmp_path, 3), resume=str(tmp_path / "run"), progress=False)
    assert resumed.steps == 3


def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the docs page has no python snippet"
    exec(compile(blocks[0], str(DOCS), "exec"), {})  # noqa: S102 - our own docs
