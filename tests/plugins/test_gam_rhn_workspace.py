"""The workspace of gam_rhn's hand-written backward: buffers reused across training calls, safely."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from seqplat.core.model import build_cell
from seqplat.plugins.gam_rhn.cell import GAMRHNCell

SMALL = {"name": "gam_rhn", "memory": "3x4", "hidden_size": 5, "head_size": 3, "depth": 2}


def make() -> GAMRHNCell:
    torch.manual_seed(0)
    cell = build_cell(SMALL, 3)
    assert isinstance(cell, GAMRHNCell)
    return cell.train()


def grads_of(cell: GAMRHNCell, x: torch.Tensor) -> dict[str, torch.Tensor]:
    cell.zero_grad(set_to_none=True)
    y, (m, s) = cell(x)
    (y.sin().sum() + m.sum() + s.sum()).backward()
    return {n: p.grad.clone() for n, p in cell.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_buffers_are_reused_and_results_unchanged():
    cell = make()
    x = torch.randn(4, 7, 3)
    first = grads_of(cell, x)
    assert len(cell.workspace) == 2  # the saved activations and the backward's scratch came back
    held = {id(bufs[0]) for bufs in cell.workspace.held()}
    second = grads_of(cell, x)  # runs on the same buffers
    assert {id(bufs[0]) for bufs in cell.workspace.held()} == held
    assert_same(first, second)
    cell.explicit_backward = False
    assert_same(first, grads_of(cell, x))  # and agrees with autograd on the same loop


def test_eval_clears_the_workspace():
    cell = make()
    grads_of(cell, torch.randn(2, 5, 3))
    assert len(cell.workspace) > 0
    cell.eval()
    assert len(cell.workspace) == 0


def test_two_graphs_alive_get_their_own_buffers():
    cell = make()
    x1, x2 = torch.randn(3, 6, 3), torch.randn(3, 6, 3)
    ref1, ref2 = grads_of(cell, x1), grads_of(cell, x2)
    cell.zero_grad(set_to_none=True)
    y1 = cell(x1)[0]
    y2 = cell(x2)[0]  # same shapes: would take y1's buffers if they were not held by its graph
    y2.sin().sum().backward()
    g2 = {n: p.grad.clone() for n, p in cell.named_parameters()}
    cell.zero_grad(set_to_none=True)
    y1.sin().sum().backward()
    g1 = {n: p.grad.clone() for n, p in cell.named_parameters()}
    cell.explicit_backward = False
    for x, got in ((x1, g1), (x2, g2)):
        cell.zero_grad(set_to_none=True)
        cell(x)[0].sin().sum().backward()
        assert_same(got, {n: p.grad.clone() for n, p in cell.named_parameters()})
    assert ref1 and ref2


def test_retain_graph_second_backward():
    cell = make()
    x = torch.randn(2, 5, 3)
    cell.zero_grad(set_to_none=True)
    y = cell(x)[0].sin().sum()
    y.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in cell.named_parameters()}
    y.backward(retain_graph=True)  # nothing took the buffers in between: works, gradients double
    for n, p in cell.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], msg=n)
    grads_of(cell, x)  # a later forward takes the buffers back
    with pytest.raises(RuntimeError, match="explicit_backward = False"):
        y.backward()


def test_copies_and_pickles_get_an_empty_workspace():
    cell = make()
    grads_of(cell, torch.randn(2, 4, 3))
    assert len(copy.deepcopy(cell).workspace) == 0
    assert len(pickle.loads(pickle.dumps(cell)).workspace) == 0
