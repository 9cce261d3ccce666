"""``train.compile`` modes: which cells ``step`` compiles, that it changes no numbers, and how to undo it."""

import logging
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from seqplat import CellConfig, StepCell
from seqplat.core.cell import Cell
from seqplat.core.compiling import StepDispatch, apply_compile, compile_steps
from seqplat.core.config import TrainConfig
from seqplat.core.train import train


class _Cfg(CellConfig):
    hidden_size: int = 3


class _Elman(StepCell):
    """h_t = tanh(W x_t + U h_{t-1}): a StepCell run by the core's loop."""

    config_class = _Cfg

    def __init__(self, input_size: int, config: _Cfg = _Cfg()):
        super().__init__(input_size, config)
        self.w = nn.Linear(input_size, config.hidden_size)
        self.u = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def step(self, x_t, state, *, t=None):
        h = torch.tanh(self.w(x_t) + self.u(state))
        return h, h


class _Wrapper(StepCell):
    """A StepCell whose step drives an inner StepCell's step (as fs_rnn does)."""

    config_class = _Cfg

    def __init__(self, input_size: int, config: _Cfg = _Cfg()):
        super().__init__(input_size, config)
        self.inner = _Elman(input_size, config)

    def step(self, x_t, state, *, t=None):
        y, h = self.inner.step(x_t, state)
        return 2 * y, h


class _OwnLoop(_Elman):
    """Overrides reference_forward: the core cannot know what its loop calls."""

    def reference_forward(self, x, state, *, times=None):
        return StepCell.reference_forward(self, x, state, times=times)


class _Kernel(_Elman):
    fused_kernel = True


class _SequenceCell(Cell):
    """A plain Cell holding a StepCell that it drives step by step (as sab does)."""

    config_class = _Cfg
    drives_inner_steps = True

    def __init__(self, input_size: int, config: _Cfg = _Cfg(), inner: type[StepCell] = _Elman):
        super().__init__(input_size, config)
        self.inner = inner(input_size, config)

    def reference_forward(self, x, state, *, times=None):
        ys = []
        for x_t in x.unbind(1):
            y, state = self.inner.step(x_t, state)
            ys.append(y)
        return torch.stack(ys, 1), state


def _counting_compiler(calls: list[str]):
    def compiler(fn):
        calls.append(fn.__qualname__)

        def wrapped(*args, **kwargs):
            calls.append("run")
            return fn(*args, **kwargs)

        return wrapped

    return compiler


def test_step_mode_compiles_the_outermost_step_and_leaves_kernels_alone():
    model = nn.ModuleDict({"a": _Wrapper(2), "b": _SequenceCell(2), "c": _OwnLoop(2), "d": _Kernel(2)})
    calls: list[str] = []
    compiled = compile_steps(model, _counting_compiler(calls))
    # the wrapper's step (its inner cell runs inside it) and the inner cell of the plain Cell
    assert compiled.names == ["a", "b.inner"]
    assert calls == ["_Wrapper.step", "_Elman.step"]
    assert not model["a"].use_fast_path and model["a"].inner.use_fast_path
    assert "step" not in vars(model["c"]) and "step" not in vars(model["d"])
    compiled.restore()
    assert "step" not in vars(model["a"]) and model["a"].use_fast_path


def test_a_wrapper_that_drives_steps_gets_them_compiled_even_on_a_fused_kernel_cell():
    model = nn.ModuleDict({"sab_like": _SequenceCell(2, inner=_Kernel), "plain": _Kernel(2)})
    compiled = compile_steps(model, _counting_compiler([]))
    assert compiled.names == ["sab_like.inner"]  # the kernel cell on its own keeps its fast path


def test_step_mode_gives_the_eager_outputs_and_gradients():
    torch.manual_seed(0)
    cell = _Wrapper(2)
    x = torch.randn(4, 7, 2)
    y0, h0 = cell(x)
    g0 = torch.autograd.grad(y0.square().sum(), list(cell.parameters()))
    calls: list[str] = []
    compiled = compile_steps(cell, _counting_compiler(calls))
    y1, h1 = cell(x)
    # steps 0 (initial state without gradient) and 1 (the first call with the training signature)
    # run eagerly, steps 2-6 compiled
    assert calls.count("run") == 5
    g1 = torch.autograd.grad(y1.square().sum(), list(cell.parameters()))
    torch.testing.assert_close((y1, h1, g1), (y0, h0, g0))
    with compiled.suspended():  # e.g. under a FLOP counter: the eager method again
        cell(x)
    assert calls.count("run") == 5 and "step" in vars(cell)
    cell(x)  # a second sequence: only its first step runs eagerly
    assert calls.count("run") == 11


def test_step_dispatch_compiles_only_signatures_seen_twice_in_a_row():
    """The first step of each sequence (a state needing no gradient) never gets a compiled graph of its own."""
    compiled_keys: list[tuple[bool, ...]] = []
    eager_keys: list[tuple[bool, ...]] = []
    step = StepDispatch(lambda *a: eager_keys.append(StepDispatch.signature(a, {})),
                        lambda *a: compiled_keys.append(StepDispatch.signature(a, {})))
    w = torch.ones(2, requires_grad=True)
    fresh, carried = torch.zeros(2), torch.zeros(2) * w
    for _ in range(3):  # three training sequences of four steps
        step(w, fresh)
        for _ in range(3):
            step(w, carried)
    with torch.no_grad():
        for _ in range(4):
            step(w, fresh)
    assert eager_keys == [(True, True, False), (True, True, True), (True, True, False), (True, True, False),
                          (False, True, False)]
    assert set(compiled_keys) == {(True, True, True), (False, True, False)} and len(compiled_keys) == 2 + 3 + 3 + 3


def test_compile_setting_reads_the_old_booleans_and_refuses_unknown_modes():
    assert TrainConfig(compile=True).compile == "model"
    assert TrainConfig(compile="false").compile == "off"
    assert TrainConfig(compile="step").compile == "step"
    with pytest.raises(ValidationError, match="'off', 'model' or 'step'"):
        TrainConfig(compile="fast")


def test_step_mode_warns_when_nothing_can_be_compiled(caplog):
    model = nn.Sequential(_Kernel(2))
    with caplog.at_level(logging.WARNING, logger="seqplat.compile"):
        assert apply_compile(model, "step") is model
    assert "nothing was compiled" in caplog.text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # Dynamo's own
def test_step_mode_under_torch_compile_does_not_recompile_for_a_longer_sequence():
    """The graph holds one step, so T=5 and T=40 share it (``model`` mode would unroll each T)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    cell = _Elman(3)
    x = torch.randn(2, 40, 3)
    ref = cell(x)[0]
    compiled = compile_steps(cell)
    frames = counters["stats"]["unique_graphs"]
    y5 = cell(x[:, :5])[0]
    # one graph: the first step (initial state without gradient) runs eagerly, not compiled on its own
    assert counters["stats"]["unique_graphs"] == frames + 1
    y40 = cell(x)[0]
    assert counters["stats"]["unique_graphs"] == frames + 1
    torch.testing.assert_close(y5, ref[:, :5])
    torch.testing.assert_close(y40, ref)
    compiled.restore()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # Dynamo's own
def test_trainer_step_mode_trains_and_reports_its_compile_time(tiny_run, caplog):
    """``train.compile=step`` with a loop cell (ln_lstm): compiles its step, trains, reports the time."""
    run = tiny_run({"name": "ln_lstm", "hidden_size": 6}, steps=6, train={"compile": "step"})
    with caplog.at_level(logging.INFO):
        res = train(run, progress=False)
    assert res.steps == 6 and math.isfinite(res.valid_metrics["bpc"])
    assert "compiled the step of LNLSTMCell" in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile:")]
    assert len(lines) == 1 and float(lines[0].split()[1]) > 0.1


@pytest.mark.parametrize("name", ["rhn", "hyper_rhn"])
def test_rhn_cells_name_the_per_step_method_their_own_loop_calls(name):
    from seqplat import build_cell

    torch.manual_seed(0)
    cell = build_cell({"name": name, "hidden_size": 4, "depth": 2}, 3)
    x = torch.randn(2, 5, 3)
    cell.use_fast_path = False
    ref = cell(x)[0]
    calls: list[str] = []
    compiled = compile_steps(cell, _counting_compiler(calls))
    assert compiled.names == [""] and calls[0].endswith("._step")
    torch.testing.assert_close(cell(x)[0], ref)
    assert calls.count("run") == 3  # steps 2-4: the first two run eagerly (see StepDispatch)
