"""Tests of the regularizers plugin: locked/embedding dropout, weight tying, weight drop, zoneout, AR/TAR.

The plugin registers no cells, so there is no ``check_cell`` here; the weight-dropped baseline cells
get their own float64 gradcheck and fused-vs-reference parity tests instead.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils import parametrize

import seqplat
from seqplat import Cell, CellConfig, ConfigError, StepCell, build_cell, build_model, build_run_config, count_parameters
from seqplat.cli import main
from seqplat.core.train import evaluate_checkpoint, train
from seqplat.registry import get_registry
from seqplat.testing import run_cell

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "regularizers.md"
REGULARIZERS = {"locked_dropout", "embedding_dropout", "weight_drop", "zoneout", "ar", "tar"}
RECIPES = {"regularizers/default", "regularizers/ptb_char_1m_lstm_reg"}


def regularize(model: nn.Module, *specs: dict) -> nn.Module:
    """Apply regularizer specs (``{name, options}``) to a model or a bare cell, through the registry."""
    from seqplat.core.regularize import apply_regularizers

    apply_regularizers(model, list(specs))
    return model


def dropconnects(model: nn.Module) -> list:
    from seqplat.plugins.regularizers.weight_drop import DropConnect

    return [m for m in model.modules() if isinstance(m, DropConnect)]


# -- small cells for the contracts -------------------------------------------------------------------

class _WidthConfig(CellConfig):
    hidden_size: int = Field(3, ge=1, description="units")


class _Elman(StepCell):
    """A custom (non-torch-module) step cell: h = tanh(W_ih x + W_hh h)."""

    config_class = _WidthConfig
    weight_roles = {"recurrent": ("weight_hh",)}

    def __init__(self, input_size: int, config: _WidthConfig):
        super().__init__(input_size, config)
        h = config.hidden_size
        self.weight_ih = nn.Parameter(torch.randn(h, input_size) * 0.5)
        self.weight_hh = nn.Parameter(torch.randn(h, h) * 0.5)

    def step(self, x_t, state, *, t=None):
        h = torch.tanh(x_t @ self.weight_ih.T + state @ self.weight_hh.T)
        return h, h


class _Counter(StepCell):
    """New state = old state + 1, so zoneout's keep decisions can be counted exactly."""

    config_class = _WidthConfig

    def step(self, x_t, state, *, t=None):
        new = state + 1.0 + 0.0 * x_t.sum(-1, keepdim=True)
        return new, new


class _WholeSequence(Cell):
    """A whole-sequence cell with no recurrent weight role and no zoneout support."""

    config_class = _WidthConfig

    def __init__(self, input_size: int, config: _WidthConfig):
        super().__init__(input_size, config)
        self.proj = nn.Linear(input_size, config.hidden_size)

    def reference_forward(self, x, state, *, times=None):
        y = torch.cumsum(self.proj(x), dim=1) + state.unsqueeze(1)
        return y, y[:, -1]


class _WholeSequenceZoneout(_WholeSequence):
    """Opts in to zoneout: it mixes consecutive outputs with its ``zoneout_prob`` itself."""

    supports_zoneout = True

    def reference_forward(self, x, state, *, times=None):
        y, _ = super().reference_forward(x, state)
        p = self.zoneout_prob
        if p > 0:
            prev = torch.cat([state.unsqueeze(1), y[:, :-1]], dim=1)
            y = p * prev + (1 - p) * y
        return y, y[:, -1]


class _TestCells:
    @seqplat.hookimpl
    def register_cells(self, register):
        register("reg_test_elman", _Elman)
        register("reg_test_counter", _Counter)
        register("reg_test_whole", _WholeSequence)
        register("reg_test_whole_zoneout", _WholeSequenceZoneout)


@pytest.fixture
def test_cells(register_plugin):
    register_plugin(_TestCells(), "regularizer_test_cells")


def lstm_model(tiny_run, *regs: dict, cell: dict | None = None, task: str = "toy_stream", **model_opts):
    run = tiny_run(cell or {"name": "lstm", "hidden_size": 6}, task=task, regularizers=list(regs),
                   model={"embedding_size": 5, **model_opts} if task == "toy_stream" else model_opts)
    torch.manual_seed(0)
    return build_model(run), run


# -- registration ------------------------------------------------------------------------------------

def test_plugin_is_installed():
    info = get_registry().get_plugin("regularizers")
    assert not info.broken, info.error
    assert set(info.registered["regularizer"]) == REGULARIZERS
    assert set(info.registered["recipe"]) == RECIPES


# -- locked dropout ----------------------------------------------------------------------------------

def test_locked_dropout_mask_is_shared_over_time_and_fresh_per_call():
    from seqplat.plugins.regularizers.dropout import LockedDropout

    drop = LockedDropout(0.5).train()
    x = torch.ones(16, 7, 10)
    y1, y2 = drop(x), drop(x)
    assert set(y1.unique().tolist()) <= {0.0, 2.0}  # kept units rescaled by 1 / (1 - p)
    assert torch.equal(y1, y1[:, :1].expand_as(y1))  # one mask per (sequence, feature), every step
    assert not torch.equal(y1[0], y1[1]) or not torch.equal(y1[1], y1[2])  # masks differ between sequences
    assert not torch.equal(y1, y2)  # a fresh mask for the next batch
    step = drop(torch.ones(64, 10))  # [b, h]: one step, an ordinary elementwise mask
    assert step.shape == (64, 10) and not torch.equal(step, step[:1].expand_as(step))
    assert drop(torch.ones(4000, 1, 50)).mean().item() == pytest.approx(1.0, abs=0.03)  # unbiased
    drop.eval()
    assert torch.equal(drop(x), x)


def test_locked_dropout_replaces_the_models_dropout_sites(tiny_run):
    from seqplat.plugins.regularizers.dropout import LockedDropout

    model, _ = lstm_model(tiny_run, {"name": "locked_dropout", "input": 0.4}, num_layers=2, dropout=0.3,
                          output_dropout=0.2)
    for attr, p in (("input_dropout", 0.4), ("dropout", 0.3), ("output_dropout", 0.2)):
        module = getattr(model, attr)
        assert isinstance(module, LockedDropout) and module.p == p, attr  # None keeps the model's rate
    seen: list[Tensor] = []
    model.cells[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.cells[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.train()
    model(torch.randint(0, 8, (6, 9)))
    for x in seen:  # the zero pattern of each cell's input is the same at every step
        zeros = x == 0
        assert zeros.any()
        assert torch.equal(zeros, zeros[:, :1].expand_as(zeros))


def test_locked_dropout_on_a_last_step_head(tiny_run):
    model, run = lstm_model(tiny_run, {"name": "locked_dropout", "output": 0.5}, task="toy_parity")
    model.train()
    out, _ = model(torch.randn(5, 6, 1))
    assert out.shape == (5, 2)
    assert train(run, progress=False).steps == 4


# -- embedding dropout and weight tying --------------------------------------------------------------

def test_embedding_dropout_drops_whole_rows(tiny_run):
    model, _ = lstm_model(tiny_run, {"name": "embedding_dropout", "p": 0.5})
    emb = model.encoder
    ids = torch.arange(8).repeat(4, 3)  # every token type 3 times in every row
    model.train()
    torch.manual_seed(3)
    out = emb(ids)
    dropped = set()
    for v in range(8):
        rows = out[ids == v]  # all occurrences of token type v in the batch
        if (rows == 0).all():
            dropped.add(v)
        else:
            torch.testing.assert_close(rows, (emb.weight[v] * 2.0).expand_as(rows))  # kept, / (1 - p)
    assert 0 < len(dropped) < 8
    out.sum().backward()
    for v in dropped:
        assert torch.count_nonzero(emb.weight.grad[v]) == 0  # a dropped row gets no gradient
    model.eval()
    torch.testing.assert_close(emb(ids), emb.weight[ids])


def test_embedding_dropout_needs_a_token_task(tiny_run):
    with pytest.raises(ConfigError) as err:
        lstm_model(tiny_run, {"name": "embedding_dropout"}, task="toy_parity")
    assert str(err.value) == (
        "regularizers: 'embedding_dropout' needs a token task (an nn.Embedding encoder); this model's encoder is "
        "Identity. Use it with a language-model task, or use locked_dropout (input) on feature inputs"
    )


def test_tie_weights_shares_the_matrix_and_saves_parameters(tiny_run):
    untied, _ = lstm_model(tiny_run, embedding_size=6)
    tied, _ = lstm_model(tiny_run, {"name": "embedding_dropout", "p": 0.3}, embedding_size=6, tie_weights=True)
    assert tied.head.weight is tied.encoder.weight
    assert count_parameters(untied) - count_parameters(tied) == 8 * 6  # V x h counted once
    tied.train()
    out, _ = tied(torch.randint(0, 8, (2, 5)))
    out.sum().backward()
    assert tied.encoder.weight.grad is not None  # gradients from the lookup and the output layer add up
    with pytest.raises(ConfigError, match=re.escape("model.tie_weights: embedding_size (5) must equal the last "
                                                    "cell's output size (6)")):
        lstm_model(tiny_run, tie_weights=True)
    with pytest.raises(ConfigError, match="model.tie_weights: needs a token task"):
        lstm_model(tiny_run, task="toy_parity", tie_weights=True)


def test_tied_model_with_embedding_dropout_survives_a_checkpoint(tiny_run):
    _, run = lstm_model(tiny_run, {"name": "embedding_dropout", "p": 0.2}, embedding_size=6, tie_weights=True)
    res = train(run, progress=False)
    metrics, run2 = evaluate_checkpoint(res.checkpoint_dir, split="valid")
    assert metrics["bpc"] == pytest.approx(res.valid_metrics["bpc"], rel=1e-5)
    assert run2.model.tie_weights and run2.regularizers[0]["name"] == "embedding_dropout"


# -- weight drop -------------------------------------------------------------------------------------

def dropped_cell(name: str = "lstm", p: float = 0.5, **opts) -> Cell:
    torch.manual_seed(0)
    cell = build_cell({"name": name, "hidden_size": 5, **opts}, 3)
    return regularize(cell, {"name": "weight_drop", "p": p})


def _forward_backward(cell: Cell, x: Tensor, fast: bool, seed: int) -> tuple[Tensor, list[Tensor]]:
    cell.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y, state = run_cell(cell, x, fast=fast)
    (y.square().sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))).backward()
    return y.detach(), [p.grad.clone() for p in cell.parameters()]


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_weight_drop_fused_path_matches_reference_under_a_fixed_mask(name):
    """Training mode, same seed: the fused nn.LSTM/GRU/RNN kernel and the hand-written steps see the
    same dropped W_hh (outputs and gradients agree), so the fused path really uses the dropped weight."""
    cell = dropped_cell(name).train()
    x = torch.randn(2, 6, 3)
    y_fast, g_fast = _forward_backward(cell, x, fast=True, seed=11)
    y_ref, g_ref = _forward_backward(cell, x, fast=False, seed=11)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    cell.eval()  # no mask in eval: same as an un-regularized cell with the same weights
    plain = build_cell({"name": name, "hidden_size": 5}, 3)
    plain.load_state_dict({k.replace("parametrizations.weight_hh_l0.original", "weight_hh_l0"): v
                           for k, v in cell.state_dict().items()})
    torch.testing.assert_close(cell(x)[0], plain.eval()(x)[0])


def test_weight_drop_uses_one_mask_per_forward_and_a_new_one_next_time():
    cell = dropped_cell("lstm", p=0.5).train()
    x = torch.randn(2, 7, 3)
    y1, _ = cell(x)
    (drop,) = dropconnects(cell)
    mask1 = drop.mask.clone()
    latent = cell.rnn.parametrizations.weight_hh_l0.original
    assert set(mask1.unique().tolist()) == {0.0, 2.0}
    assert 0.3 < (mask1 == 0).float().mean().item() < 0.7
    # the fused kernel ran every step with W_hh * mask: a plain nn.LSTM with that weight agrees
    ref = nn.LSTM(3, 5, batch_first=True)
    with torch.no_grad():
        for name, value in cell.rnn.named_parameters():
            if "parametrizations" not in name:
                getattr(ref, name).copy_(value)
        ref.weight_hh_l0.copy_(latent * mask1)
    torch.testing.assert_close(y1, ref(x)[0])
    y2, _ = cell(x)
    assert not torch.equal(drop.mask, mask1) and not torch.allclose(y1, y2)  # fresh mask next forward
    y2.sum().backward()
    assert torch.count_nonzero(latent.grad[drop.mask == 0]) == 0  # dropped entries get no gradient
    assert torch.count_nonzero(latent.grad[drop.mask != 0]) > 0
    assert not parametrize.is_parametrized(cell.rnn, "weight_ih_l0")  # only the recurrent role
    cell.eval()
    ya, yb = cell(x)[0], cell(x)[0]
    assert torch.equal(ya, yb) and drop.mask is None


def test_weight_drop_gradcheck_float64_both_paths():
    """float64 gradcheck w.r.t. the inputs and the latent W_hh, fused and reference, under a fixed mask."""
    cell = dropped_cell("lstm", p=0.4).double().train()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = cell.rnn.parametrizations.weight_hh_l0.original.detach().clone().requires_grad_(True)
    for fast in (True, False):
        def fn(inp: Tensor, weight: Tensor, fast: bool = fast) -> Tensor:
            torch.manual_seed(5)  # the same mask at every evaluation
            cell.use_fast_path = fast
            y, _ = torch.func.functional_call(cell, {"rnn.parametrizations.weight_hh_l0.original": weight}, (inp,))
            return y

        assert torch.autograd.gradcheck(fn, (x, w))
    cell.use_fast_path = True


def test_weight_drop_on_a_custom_step_cell_keeps_one_mask_over_the_sequence():
    torch.manual_seed(0)
    cell = regularize(_Elman(3, _WidthConfig(hidden_size=4)), {"name": "weight_drop", "p": 0.5}).train()
    x = torch.randn(2, 6, 3)
    y, _ = cell(x)
    (drop,) = dropconnects(cell)
    w = cell.parametrizations.weight_hh.original * drop.mask
    h = torch.zeros(2, 4)
    expected = []
    for x_t in x.unbind(1):  # the same W_hh * mask at every step
        h = torch.tanh(x_t @ cell.weight_ih.T + h @ w.T)
        expected.append(h)
    torch.testing.assert_close(y, torch.stack(expected, 1))
    mask = drop.mask.clone()
    cell(x)
    assert not torch.equal(mask, drop.mask)


def test_weight_drop_state_dict_round_trip(tiny_run):
    model, run = lstm_model(tiny_run, {"name": "weight_drop", "p": 0.3}, num_layers=2)
    keys = set(model.state_dict())
    assert {"cells.0.rnn.parametrizations.weight_hh_l0.original",
            "cells.1.rnn.parametrizations.weight_hh_l0.original"} <= keys
    assert not any("mask" in k for k in keys)  # masks are not state
    fresh = build_model(run)
    fresh.load_state_dict(model.state_dict())  # strict
    x = torch.randint(0, 8, (2, 5))
    model.eval(), fresh.eval()
    torch.testing.assert_close(model(x)[0], fresh(x)[0])
    model.train(), fresh.train()
    torch.manual_seed(4)
    a = model(x)[0]
    torch.manual_seed(4)
    torch.testing.assert_close(fresh(x)[0], a)


def test_weight_drop_trains_checkpoints_evaluates_and_resumes(tiny_run, tmp_path):
    run = tiny_run({"name": "gru", "hidden_size": 6}, steps=3,
                   regularizers=[{"name": "weight_drop", "p": 0.5}, {"name": "locked_dropout", "input": 0.2}],
                   io={"run_dir": str(tmp_path / "run")})
    res = train(run, progress=False)
    metrics, _ = evaluate_checkpoint(res.checkpoint_dir, split="valid")
    assert metrics["bpc"] == pytest.approx(res.valid_metrics["bpc"], rel=1e-5)
    longer = run.model_copy(update={"train": run.train.model_copy(update={"steps": 5})})
    assert train(longer, resume=str(tmp_path / "run"), progress=False).steps == 5


def test_weight_drop_refuses_cells_without_recurrent_weights(test_cells, tiny_run):
    with pytest.raises(ConfigError) as err:
        lstm_model(tiny_run, {"name": "weight_drop"}, cell={"name": "reg_test_whole"})
    message = str(err.value)
    assert message.startswith(
        "regularizers: 'weight_drop' cannot apply to cell 'reg_test_whole': it declares no weight_roles, and none "
        "of the roles ['recurrent'] (nor do its inner cells). Cells with recurrent weights: "
    )
    assert "lstm" in message and "reg_test_elman" in message
    with pytest.raises(ConfigError, match=re.escape(
            "regularizers: 'weight_drop' cannot drop role(s) ['input'] of cell 'reg_test_elman': it declares "
            "weight_roles ['recurrent']; set roles to those")):
        lstm_model(tiny_run, {"name": "weight_drop", "roles": ["recurrent", "input"]}, cell={"name": "reg_test_elman"})
    with pytest.raises(ConfigError, match="applied twice"):
        lstm_model(tiny_run, {"name": "weight_drop"}, {"name": "weight_drop"})


def test_weight_drop_can_drop_input_weights_too():
    cell = build_cell({"name": "lstm", "hidden_size": 4}, 3)
    regularize(cell, {"name": "weight_drop", "p": 0.3, "roles": ["recurrent", "input"]})
    assert all(parametrize.is_parametrized(cell.rnn, w) for w in ("weight_hh_l0", "weight_ih_l0"))


def test_weight_drop_reaches_the_inner_cells_of_a_wrapper():
    torch.manual_seed(0)
    cell = build_cell({"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_size": 4, "dilations": [1, 2]}, 3)
    regularize(cell, {"name": "weight_drop", "p": 0.5})
    assert len(dropconnects(cell)) == 2
    cell.train()
    x = torch.randn(2, 6, 3)
    torch.manual_seed(1)
    a = cell(x)[0]
    torch.manual_seed(1)
    cell.use_fast_path = False
    torch.testing.assert_close(cell(x)[0], a, atol=1e-5, rtol=1e-4)


# dynamo reads .grad of the non-leaf tensors a frame resumes with after nn.LSTM's graph break and
# torch warns about that access; the project's pytest config turns warnings into errors
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_weight_drop_under_torch_compile(tiny_run):
    """Dynamo traces the mask-drawing hook and the parametrization (aot_eager: no C++ build, a few seconds)."""
    model, _ = lstm_model(tiny_run, {"name": "weight_drop", "p": 0.5}, {"name": "locked_dropout", "input": 0.2})
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randint(0, 8, (2, 5))
    model.train()
    torch.manual_seed(9)
    eager = model(x)[0]
    torch.manual_seed(9)
    out = compiled(x)[0]
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model.cells[0].rnn.parametrizations.weight_hh_l0.original.grad is not None
    torch.manual_seed(10)
    assert not torch.allclose(compiled(x)[0], out)  # a fresh mask per call, also compiled
    model.eval()
    torch.testing.assert_close(compiled(x)[0], model(x)[0])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_weight_drop_with_trainer_compile(tiny_run, caplog):
    """``train.compile=true`` (inductor) with weight drop: compiles, trains and reports its compile time
    (slow: 15-90 s of compiling, depending on inductor's cache)."""
    run = tiny_run({"name": "lstm", "hidden_size": 6}, steps=6, regularizers=[{"name": "weight_drop", "p": 0.5}],
                   train={"compile": True})
    with caplog.at_level(logging.INFO, logger="seqplat.train"):
        res = train(run, progress=False)
    assert res.steps == 6 and math.isfinite(res.valid_metrics["bpc"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile:")]
    assert len(lines) == 1 and "in the first 3 training steps" in lines[0] and "upper bound" not in lines[0]
    assert float(lines[0].split()[1]) > 0.5  # inductor takes seconds, not the milliseconds of wrapping


@pytest.mark.timeout(600)
def test_weight_drop_in_two_process_training(tiny_run, tmp_path):
    from seqplat.testing.distributed import run_two_ranks

    cfg = tiny_run({"name": "lstm", "hidden_size": 8}, steps=4,
                   regularizers=[{"name": "weight_drop", "p": 0.5}, {"name": "locked_dropout", "input": 0.2},
                                 {"name": "ar", "alpha": 1.0}],
                   train={"batch_size": 8, "eval_batch_size": 8, "eval_every": 4})
    data = cfg.model_dump(mode="json")
    data["io"]["run_dir"] = str(tmp_path / "two")
    two = run_two_ranks(data, tmp_path / "work")
    assert two["steps"] == 4 and math.isfinite(two["test"]["bpc"])
    metrics, _ = evaluate_checkpoint(str(tmp_path / "two"), split="test")
    assert math.isfinite(metrics["bpc"])


# -- zoneout -----------------------------------------------------------------------------------------

def test_zoneout_keeps_units_with_probability_p_and_mixes_in_eval():
    cell = regularize(_Counter(1, _WidthConfig(hidden_size=200)), {"name": "zoneout", "prob": 0.3})
    assert cell.zoneout_prob == 0.3
    x = torch.zeros(4, 20, 1)
    cell.train()
    _, state = cell(x)
    assert torch.equal(state, state.round())  # each unit is exactly its old or its new value
    assert (state / 20).mean().item() == pytest.approx(0.7, abs=0.02)  # took the new value w.p. 1 - p
    cell.eval()
    _, state = cell(x)
    torch.testing.assert_close(state, torch.full_like(state, 20 * 0.7))  # expected mix every step


def test_zoneout_on_lstm_uses_the_stepwise_path(tiny_run):
    model, _ = lstm_model(tiny_run, {"name": "zoneout", "prob": 0.5}, num_layers=2)
    assert [c.zoneout_prob for c in model.cells] == [0.5, 0.5]
    model.train()
    out, _ = model(torch.randint(0, 8, (3, 6)))
    out.sum().backward()
    model.eval()
    cell = model.cells[0]
    x = torch.randn(2, 4, 5)
    plain = run_cell(cell, x, fast=False)[0]
    cell.zoneout_prob = 0.0
    assert not torch.allclose(cell(x)[0], plain)  # the mix changed the outputs


def test_zoneout_cell_conventions(test_cells, tiny_run):
    model, _ = lstm_model(tiny_run, {"name": "zoneout", "prob": 0.2}, cell={"name": "reg_test_whole_zoneout"})
    assert model.cells[0].zoneout_prob == 0.2
    wrapper = build_cell({"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_size": 4, "dilations": [1, 2]}, 3)
    regularize(wrapper, {"name": "zoneout", "prob": 0.25})  # passes zoneout_prob to its inner step cells
    assert [c.zoneout_prob for c in wrapper.layers] == [0.25, 0.25]
    with pytest.raises(ConfigError) as err:
        lstm_model(tiny_run, {"name": "zoneout"}, cell={"name": "reg_test_whole"})
    message = str(err.value)
    assert message.startswith(
        "regularizers: 'zoneout' cannot apply to cell 'reg_test_whole': it is a whole-sequence cell that does not "
        "expose its state between steps (not a StepCell and no supports_zoneout = True). Cells that support it: "
    )
    assert "reg_test_whole_zoneout" in message and "lstm" in message
    assert message.endswith("a cell author opts in by setting supports_zoneout = True and applying "
                            "self.zoneout_prob in forward")


# -- AR / TAR ----------------------------------------------------------------------------------------

def test_ar_and_tar_penalties():
    from seqplat.core.regularize import Regularizer

    reg = get_registry()
    h = torch.randn(3, 5, 4)
    ar: Regularizer = reg.get("regularizer", "ar").obj(reg.get("regularizer", "ar").obj.config_class(alpha=2.0))
    tar: Regularizer = reg.get("regularizer", "tar").obj(reg.get("regularizer", "tar").obj.config_class(beta=0.5))
    torch.testing.assert_close(ar.penalty(h)["ar"], 2.0 * (h**2).sum() / h.numel())
    diffs = torch.stack([h[:, t] - h[:, t - 1] for t in range(1, 5)], 1)
    torch.testing.assert_close(tar.penalty(h)["tar"], 0.5 * (diffs**2).sum() / diffs.numel())
    assert tar.penalty(h[:, :1])["tar"].item() == 0.0  # one step: no difference to penalise
    off = reg.get("regularizer", "ar").obj(reg.get("regularizer", "ar").obj.config_class(alpha=0.0))
    assert off.penalty(h) == {}


def test_ar_tar_are_added_to_the_loss_and_logged_separately(tiny_run, monkeypatch):
    from seqplat.core import tracking

    logged: list[dict[str, float]] = []
    monkeypatch.setattr(tracking.Tracker, "log_metrics", lambda self, metrics, step: logged.append(dict(metrics)))
    regs = [{"name": "ar", "alpha": 2.0}, {"name": "tar", "beta": 1.0}]
    res = train(tiny_run({"name": "lstm", "hidden_size": 6}, steps=2, regularizers=regs), progress=False)
    train_logs = [m for m in logged if "train_loss" in m]
    assert len(train_logs) == 2
    for m in train_logs:
        assert m["train_ar"] > 0 and m["train_tar"] > 0 and m["train_loss"] != m["train_ar"]
    # the penalties move the weights: a strong AR gives another model after the same steps
    strong = train(tiny_run({"name": "lstm", "hidden_size": 6}, steps=2, regularizers=[{"name": "ar", "alpha": 500.0}]),
                   progress=False)
    assert strong.valid_metrics["bpc"] != pytest.approx(res.valid_metrics["bpc"], rel=1e-6)


# -- recipes, CLI, docs ------------------------------------------------------------------------------

def test_lstm_reg_recipe_is_the_baseline_plus_regularizers():
    base = build_run_config(recipe="baselines/ptb_char_1m")
    reg = build_run_config(recipe="regularizers/ptb_char_1m_lstm_reg")
    strip = {"description", "regularizers"}
    assert reg.model_dump(exclude=strip) == base.model_dump(exclude=strip)  # same model, task and budget
    assert [r["name"] for r in reg.regularizers] == ["locked_dropout", "weight_drop"]
    model = build_model(reg)
    assert count_parameters(model) == count_parameters(build_model(base)) == 999_186
    assert model.input_dropout.p == 0.1 and model.output_dropout.p == 0.1
    assert parametrize.is_parametrized(model.cells[0].rnn, "weight_hh_l0")


@pytest.mark.data
def test_lstm_reg_recipe_runs_two_steps_on_ptb(tmp_path):
    run = build_run_config(recipe="regularizers/ptb_char_1m_lstm_reg", overrides=[
        "train.steps=2", "train.eval_every=2", "task.max_eval_tokens=3200", "tracking.enabled=false",
        f"io.output_dir={tmp_path}"])
    res = train(run, progress=False)
    assert res.steps == 2 and 3.0 < res.valid_metrics["bpc"] < 7.0


def test_default_recipe_runs_from_the_cli(tmp_path):
    result = CliRunner().invoke(main, [
        "train", "--plugin", "regularizers", "--no-progress", "--set", "train.steps=3", "--set",
        "train.eval_every=3", "--set", "task.valid_size=16", "--set", "task.test_size=16", "--set",
        "tracking.enabled=false", "--set", f"io.output_dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output
    assert "test:" in result.output


def test_regularizers_from_the_command_line_set(tmp_path):
    run = build_run_config(recipe="baselines/default", overrides=[
        "regularizers=[{name: weight_drop, p: 0.5}, {name: zoneout, prob: 0.1}]"])
    assert run.regularizers == [{"name": "weight_drop", "p": 0.5, "roles": ["recurrent"]},
                                {"name": "zoneout", "prob": 0.1}]
    with pytest.raises(ConfigError, match=re.escape("regularizers.0.p: Input should be less than 1")):
        build_run_config(recipe="baselines/default", overrides=["regularizers=[{name: weight_drop, p: 1.5}]"])


def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/plugins/regularizers.md has no python block"
    exec(compile(blocks[0], str(DOCS), "exec"), {})  # noqa: S102 - our own docs
