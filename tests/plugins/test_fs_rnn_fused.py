"""Tests of FS-RNN's fused path (``fs_rnn/fused.py``): the whole FS step over LN-LSTM cells with a
hand-written backward, against the reference ``step`` (and, with dropout, the planned loop, which draws
site 1 dropout for the whole sequence as the fused path does)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from seqplat import build_cell
from seqplat.core.cell import flatten_state
from seqplat.plugins.fs_rnn.cell import FSRNNCell
from seqplat.plugins.fs_rnn.fused import FSLNLSTMRecurrence, FusedPlan, draw_masks

PTB = {"zoneout_keep_h": 0.9, "zoneout_keep_c": 0.5}


def ln(n: int, **options: Any) -> dict[str, Any]:
    return {"name": "ln_lstm", "hidden_size": n, **options}


def fs_cell(k: int = 2, zone: bool = True, dtype: torch.dtype = torch.float64, **options: Any) -> FSRNNCell:
    torch.manual_seed(0)
    z = PTB if zone else {}
    spec = {"name": "fs_rnn", "num_fast": k, "fast": ln(5, **z), "slow": ln(4, **z), **options}
    cell = build_cell(spec, 3).to(dtype)
    with torch.no_grad():  # off the initial values, so every gain, shift and bias matters
        for p in cell.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert isinstance(cell, FSRNNCell)
    return cell


def run(cell: FSRNNCell, x: Tensor, state: list[Tensor], path: str, seed: int = 11) -> list[Tensor]:
    """Outputs, final state and every gradient (input, initial state, parameters) of one path."""
    cell.use_fast_path = path != "reference"
    cell.explicit_backward = path == "fused"
    x = x.clone().requires_grad_(True)
    st = [s.clone().requires_grad_(True) for s in state]
    cell.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y, final = cell(x, ((st[0], st[1]), (st[2], st[3])))
    if path == "fused":
        assert y.grad_fn is not None and "FSLNLSTMRecurrence" in type(_source(y)).__name__
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    ((y * w).sum() + sum((s**2 * (i + 1)).sum() for i, s in enumerate(flatten_state(final)))).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in cell.parameters()]
    return [y.detach(), *(s.detach() for s in flatten_state(final)), x.grad, *(s.grad for s in st), *grads]


def _source(y: Tensor) -> Any:
    """The autograd node behind ``y`` past the transpose (and dropout) the cell applies to the output."""
    todo, seen = [y.grad_fn], 0
    while todo and seen < 8:  # a few nodes breadth-first: the fused node sits right behind the output
        fn = todo.pop(0)
        seen += 1
        if fn is not None and "FSLNLSTMRecurrence" in type(fn).__name__:
            return fn
        todo += [f for f, _ in (fn.next_functions if fn is not None else ())]
    return None


def _inputs(cell: FSRNNCell, b: int = 3, t: int = 6) -> tuple[Tensor, list[Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 3, generator=g, dtype=torch.float64)
    nf, ns = cell.fast_cells[0].output_size, cell.slow_cell.output_size
    state = [torch.randn(b, n, generator=g, dtype=torch.float64) for n in (nf, nf, ns, ns)]
    return x, state


def assert_all_close(a: list[Tensor], b: list[Tensor], **tol: float) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        torch.testing.assert_close(u, v, **tol, msg=lambda m, i=i: f"item {i}: {m}")


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("zone", [True, False], ids=["zoneout", "no_zoneout"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_matches_reference(k, zone, train):
    """float64: outputs, final state and the gradients of input, initial state and every parameter; in
    training the zoneout masks are the reference's (drawn up front in its order)."""
    cell = fs_cell(k, zone).train(train)
    x, state = _inputs(cell)
    ref = run(cell, x, state, "reference")
    fused = run(cell, x, state, "fused")
    assert_all_close(fused, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("k", [2, 4])
def test_fused_matches_the_planned_loop_with_dropout_and_zoneout(k):
    cell = fs_cell(k, True, dropout=0.4).train()
    x, state = _inputs(cell)
    assert_all_close(run(cell, x, state, "fused"), run(cell, x, state, "planned"), atol=1e-10, rtol=1e-8)


def test_fused_float32_close_to_reference():
    cell = fs_cell(3, True, dtype=torch.float32).train()
    x, state = _inputs(cell)
    ref = run(cell, x.float(), [s.float() for s in state], "reference")
    fused = run(cell, x.float(), [s.float() for s in state], "fused")
    assert_all_close(fused, ref, atol=1e-4, rtol=1e-3)


def test_fused_options_no_bias_no_forget_bias_core_zoneout_and_input_matrices():
    """pre_ln_bias off, forget_bias 0, the core's zoneout_prob folded into the inner cells' keeps."""
    torch.manual_seed(0)
    spec = {"name": "fs_rnn", "num_fast": 3, "fast": ln(5, pre_ln_bias=False, forget_bias=0.0, **PTB),
            "slow": ln(4, zoneout_keep_h=0.8), "inputless_width": 0}
    cell = build_cell(spec, 3).double()
    for c in cell.inner_cells():
        c.zoneout_prob = 0.2
    for train in (True, False):
        cell.train(train)
        x, state = _inputs(cell)
        assert_all_close(run(cell, x, state, "fused"), run(cell, x, state, "reference"), atol=1e-10, rtol=1e-8)


def _plan_and_params(cell: FSRNNCell, steps: int, b: int, train: bool, dropout: float) -> tuple[FusedPlan, list]:
    f1, f2, *rest = cell.fast_cells
    cells = [f1, cell.slow_cell, f2, *rest]
    keeps = [(c.config.zoneout_keep_h, c.config.zoneout_keep_c) for c in cells]
    like = torch.empty(0, dtype=torch.float64)
    zone, d2, d3 = draw_masks(steps, b, [c.config.hidden_size for c in cells], keeps, [train] * len(cells),
                              dropout, like)
    plan = FusedPlan(len(cell.fast_cells), [c.config.ln_eps for c in cells], zone, d2, d3)
    params: list[Any] = []
    for i, c in enumerate(cells):
        w = torch.cat([c.weight_x, c.weight_h], 1) if i in (1, 2) else c.weight_h
        params += [w, None if i == 0 else c.bias, c.ln_gain, c._shift_with_forget_bias(), c.ln_c_gain, c.ln_c_shift]
    return plan, [p.detach().clone().requires_grad_(True) if p is not None else None for p in params]


@pytest.mark.parametrize(("train", "dropout"), [(True, 0.0), (True, 0.3), (False, 0.0)],
                         ids=["train_zoneout", "train_zoneout_dropout", "eval"])
def test_gradcheck_recurrence(train, dropout):
    """float64 gradcheck of the autograd Function itself (masks fixed), w.r.t. the projected inputs,
    the initial state and all parameters."""
    cell = fs_cell(3, True).train(train)
    steps, b = 3, 2
    torch.manual_seed(4)
    plan, params = _plan_and_params(cell, steps, b, train, dropout)
    g = torch.Generator().manual_seed(5)
    xp = torch.randn(steps, b, 20, generator=g, dtype=torch.float64, requires_grad=True)
    st = [torch.randn(b, n, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 5, 4, 4)]
    idx = [i for i, p in enumerate(params) if p is not None]

    def fn(xp_, *args):
        ps = list(params)
        for i, p in zip(idx, args[4:], strict=True):
            ps[i] = p
        return FSLNLSTMRecurrence.apply(xp_, *args[:4], plan, *ps)

    assert torch.autograd.gradcheck(fn, (xp, *st, *(params[i] for i in idx)), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fused_path_only_with_gradients_and_ln_lstm_inner_cells():
    cell = fs_cell(2, True).train()
    x, _ = _inputs(cell)
    assert _source(cell(x)[0]) is not None
    with torch.no_grad():  # inference: the planned loop (nothing kept for a backward)
        torch.testing.assert_close(cell.eval()(x)[0], cell.eval().fast_forward(x, cell.initial_state(3, None,
                                                                                   torch.float64))[0])
    torch.manual_seed(0)
    gru = build_cell({"name": "fs_rnn", "fast": {"name": "gru", "hidden_size": 4}, "slow": ln(3)}, 3)
    assert _source(gru(torch.randn(2, 3, 3))[0]) is None
    cell.fast_cells[0].activation_quantizers["gate"] = lambda v: v
    assert _source(cell.train()(x)[0]) is None


def test_bulk_mask_draw_equals_per_step_draws():
    """The up-front draw consumes the generator exactly as the per-step ``rand_like`` calls do."""
    torch.manual_seed(7)
    zone, _, _ = draw_masks(4, 2, [3, 5], [(0.9, 0.5), (1.0, 0.7)], [True, True], 0.0, torch.empty(0))
    torch.manual_seed(7)
    for t in range(4):
        assert torch.equal(zone[0][0][t], torch.rand(2, 3) < 0.9)
        assert torch.equal(zone[0][1][t], torch.rand(2, 3) < 0.5)
        assert torch.equal(zone[1][1][t], torch.rand(2, 5) < 0.7)  # S's h: keep 1, nothing drawn
    assert zone[1][0] is None
