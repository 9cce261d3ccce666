"""Tests of the dilated_rnn plugin: the folded fast path against the naive skip loop and the plain
inner cell, state carry across chunks of any length, the concatenating head, the memory-capacity
figures, the recipes and the CLI. Numbered comments refer to section 5 of the spec."""

from __future__ import annotations

import math
import re
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from pydantic import Field
from torch import nn

import seqplat
from seqplat import CellConfig, ConfigError, StepCell, build_cell, build_model, build_run_config, count_parameters
from seqplat.core.cell import flatten_state
from seqplat.core.config import validate_component
from seqplat.plugins.dilated_rnn import (
    DilatedRNNCell,
    fold_time,
    mean_recurrent_length,
    memory_capacity,
    recurrent_path_lengths,
    unfold_time,
)
from seqplat.plugins.dilated_rnn import register_commands as dilated_register_commands
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins" / "dilated_rnn.md"
INNER = ["rnn", "gru", "lstm"]
RECIPES = ["default", "copy_memory_500", "copy_memory_1000", "smnist", "pmnist", "ptb_char",
           "copy_200", "psmnist_1ep", "ptb_char_1m"]


def dilated(inner: str = "gru", dilations: list[int] | None = None, hidden: int = 4, input_size: int = 3,
            concat: bool = True, double: bool = False, **inner_options) -> DilatedRNNCell:
    spec = {"name": "dilated_rnn", "inner": {"name": inner, **inner_options}, "hidden_size": hidden,
            "dilations": dilations or [1, 2, 4], "concat_outputs": concat}
    cell = build_cell(spec, input_size)
    assert isinstance(cell, DilatedRNNCell)
    return cell.double() if double else cell


def outputs_and_grads(cell, x, fast: bool, state=None):
    """Outputs, input gradient and parameter gradients of a fixed random projection of the outputs."""
    x = x.clone().requires_grad_(True)
    cell.zero_grad(set_to_none=True)
    cell.use_fast_path = fast
    try:
        y, new_state = cell(x, state)
    finally:
        cell.use_fast_path = True
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    (y * w).sum().backward()
    return y.detach(), x.grad.clone(), [p.grad.clone() for p in cell.parameters()], new_state


# -- registration and conformance ------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    assert reg.plugins["dilated_rnn"].error is None
    assert reg.plugin_of("cell", "dilated_rnn") == "dilated_rnn"
    assert {f"dilated_rnn/{r}" for r in RECIPES} <= set(reg.names("recipe"))
    assert "register_commands" in reg.plugins["dilated_rnn"].hooks


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("dilations", [[1, 2], [2, 4], [3, 1, 4]], ids=["1-2", "2-4_head", "3-1-4"])
def test_conformance(inner, dilations):
    check_cell({"name": "dilated_rnn", "inner": {"name": inner}, "hidden_size": 4, "dilations": dilations})
    gradcheck_cell({"name": "dilated_rnn", "inner": {"name": inner}, "hidden_size": 3, "dilations": dilations})


def test_conformance_longer_chunks_and_default_dilations():
    # check_cell splits t=11 into 5 + 6 steps: phases shift in layers 2, 4 and 8
    check_cell({"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_size": 4, "num_layers": 4}, time=11)


# -- spec test 1: dilation 1 is the plain cell ----------------------------------------------------

@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_dilation_one_equals_plain_inner_cell(inner, fast):
    torch.manual_seed(0)
    cell = dilated(inner, [1], hidden=5)
    plain = build_cell({"name": inner, "hidden_size": 5}, 3)
    plain.load_state_dict(cell.layers[0].state_dict())
    x = torch.randn(2, 13, 3)
    y_plain, s_plain = plain(x)
    cell.use_fast_path = fast
    y, state = cell(x)
    torch.testing.assert_close(y, y_plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(flatten_state(state), flatten_state(s_plain), strict=True):
        torch.testing.assert_close(a[:, 0], b, atol=1e-6, rtol=1e-5)  # the one phase of [b, 1, h]


# -- spec test 2: folded == naive loop, outputs and gradients --------------------------------------

@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("s", range(1, 17))
def test_folded_equals_naive_loop(inner, s):
    torch.manual_seed(s)
    cell = dilated(inner, [s], hidden=4, double=True)
    x = torch.randn(3, 23, 3, dtype=torch.float64)  # 23 is divisible by none of s > 1
    y_f, gx_f, gp_f, st_f = outputs_and_grads(cell, x, fast=True)
    y_n, gx_n, gp_n, st_n = outputs_and_grads(cell, x, fast=False)
    torch.testing.assert_close(y_f, y_n)
    torch.testing.assert_close(gx_f, gx_n)
    for a, b in zip(gp_f, gp_n, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(flatten_state(st_f), flatten_state(st_n), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("s", [2, 3, 5, 16])
def test_each_phase_is_the_plain_cell_on_the_subsampled_sequence(inner, s):
    """An oracle independent of the implementation: y[:, j::s] = inner(x[:, j::s]) from zero state."""
    torch.manual_seed(0)
    cell = dilated(inner, [s], hidden=4, concat=False)
    plain = build_cell({"name": inner, "hidden_size": 4}, 3)
    plain.load_state_dict(cell.layers[0].state_dict())
    x = torch.randn(2, 23, 3)
    y, _ = cell(x)
    for j in range(s):
        torch.testing.assert_close(y[:, j::s], plain(x[:, j::s])[0], atol=1e-6, rtol=1e-5)


def test_stack_of_dilations_1_to_16_folded_equals_naive():
    torch.manual_seed(0)
    for inner in INNER:
        cell = dilated(inner, [1, 2, 4, 8, 16], hidden=3, double=True)
        x = torch.randn(2, 37, 3, dtype=torch.float64)
        y_f, gx_f, gp_f, _ = outputs_and_grads(cell, x, fast=True)
        y_n, gx_n, gp_n, _ = outputs_and_grads(cell, x, fast=False)
        torch.testing.assert_close(y_f, y_n)
        torch.testing.assert_close(gx_f, gx_n)
        for a, b in zip(gp_f, gp_n, strict=True):
            torch.testing.assert_close(a, b)


# -- spec test 3: fold/unfold ----------------------------------------------------------------------

@pytest.mark.parametrize("s", [1, 2, 3, 7])
def test_fold_layout_and_round_trip(s):
    b, t = 3, 17
    x = torch.arange(b * t * 2, dtype=torch.float32).reshape(b, t, 2)
    xf = fold_time(x, s)
    n = math.ceil(t / s)
    assert xf.shape == (s * b, n, 2)
    for j in range(s):
        block = xf[j * b : (j + 1) * b]  # phase-major: block j, then the batch in order
        real = x[:, j::s]
        torch.testing.assert_close(block[:, : real.shape[1]], real)
        assert (block[:, real.shape[1] :] == 0).all()  # end padding
    torch.testing.assert_close(unfold_time(xf, s, t), x)
    # the folded input lies in time-major memory, so a fused RNN's own transpose to time-major is free
    # (dilation 1 folds nothing: x itself, no copy)
    assert xf.transpose(0, 1).is_contiguous() if s > 1 else xf.data_ptr() == x.data_ptr()
    torch.testing.assert_close(unfold_time(xf.contiguous(), s, t), x)  # a batch-first output unfolds too
    times = torch.rand(b, t)
    torch.testing.assert_close(unfold_time(fold_time(times, s), s, t), times)


# -- spec test 4: causality ------------------------------------------------------------------------

def _layer_outputs(cell: DilatedRNNCell, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output, from stacks truncated after each layer (same weights)."""
    outs = []
    for k in range(1, len(cell.dilations) + 1):
        part = dilated("gru", list(cell.dilations[:k]), hidden=4, concat=False)
        part.load_state_dict({n: p for n, p in cell.state_dict().items() if int(n.split(".")[1]) < k})
        outs.append(part(x)[0])
    return outs


def test_causality_in_every_layer():
    torch.manual_seed(0)
    cell = dilated("gru", [1, 2, 4, 8], concat=False)
    x = torch.randn(2, 21, 3)
    before = _layer_outputs(cell, x)
    t0 = 9
    x2 = x.clone()
    x2[:, t0] += 1.0
    after = _layer_outputs(cell, x2)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a[:, :t0], b[:, :t0], atol=0, rtol=0)
        assert not torch.allclose(a[:, t0], b[:, t0])
    longer = torch.cat([x, torch.randn(2, 6, 3)], dim=1)
    torch.testing.assert_close(cell(longer)[0][:, :21], cell(x)[0], atol=1e-6, rtol=1e-5)


# -- spec test 5: reachability ---------------------------------------------------------------------

@pytest.mark.parametrize("first", [1, 2, 4])
def test_reachability_from_the_last_output(first):
    torch.manual_seed(0)
    t = 19
    dil = [first * 2**i for i in range(3)]
    for concat in (False, True):
        cell = dilated("rnn", dil, concat=concat)
        x = torch.randn(1, t, 3, requires_grad=True)
        y, _ = cell(x)
        y[:, -1].sum().backward()
        reached = x.grad.abs().sum(-1)[0] > 0
        expected = [concat or (t - 1 - i) % first == 0 for i in range(t)]
        assert reached.tolist() == expected, (first, concat)


# -- spec test 6: streaming == one long run --------------------------------------------------------

@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("splits", [[8, 8, 7], [3, 5, 1, 14], [1] * 6 + [17], [22, 1]],
                         ids=["multiple-of-max", "odd", "single-steps", "long-then-one"])
def test_carried_state_across_chunks_equals_one_run(inner, splits):
    torch.manual_seed(0)
    cell = dilated(inner, [1, 2, 4, 8], concat=False)
    head = dilated(inner, [2, 3, 4], concat=True)  # head buffer carried too
    x = torch.randn(2, sum(splits), 3)
    for c in (cell, head):
        y_full, s_full = c(x)
        state, ys, start = None, [], 0
        for i, n in enumerate(splits):
            c.use_fast_path = i % 2 == 0  # mixing paths must not matter either
            y, state = c(x[:, start : start + n], state)
            c.use_fast_path = True
            ys.append(y)
            start += n
        torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-5, rtol=1e-4)
        for a, b in zip(flatten_state(state), flatten_state(s_full),
                        strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_stream_training_with_carried_state(tiny_run):
    """bptt 10 is not a multiple of the dilation 4: the trainer carries the phase-shifted state."""
    from seqplat.core.train import train

    cell = {"name": "dilated_rnn", "inner": {"name": "lstm"}, "hidden_size": 16, "dilations": [1, 4]}
    res = train(tiny_run(cell, steps=30, train={"lr": 1e-2, "eval_every": 30}), progress=False)
    assert res.valid_metrics["bpc"] < 2.5  # unigram over 8 symbols is 3 bits


def test_zoneout_set_on_the_wrapper_is_applied_by_the_inner_cells():
    torch.manual_seed(0)
    cell = dilated("gru", [1, 3], concat=False)
    x = torch.randn(2, 10, 3)
    y0, _ = cell(x)
    cell.zoneout_prob = 0.5
    assert cell.zoneout_prob == 0.5 and all(c.zoneout_prob == 0.5 for c in cell.layers)
    cell.eval()  # expected mix p*old + (1-p)*new: deterministic, the same on both paths
    y_fast, _ = cell(x)
    cell.use_fast_path = False
    y_ref, _ = cell(x)
    torch.testing.assert_close(y_fast, y_ref)
    assert not torch.allclose(y_fast, y0)


@pytest.mark.parametrize("task", [
    "toy_parity",  # classification at the last step, through the concatenating head
    {"name": "adding", "length": 20, "valid_size": 8, "test_size": 8},  # regression
    {"name": "copy_memory", "delay": 10, "valid_size": 8, "test_size": 8, "encoding": "tokens"},  # embedded tokens
], ids=["last-step", "regression", "per-step-tokens"])
def test_trains_on_other_kinds_of_task(tiny_run, task):
    from seqplat.core.train import train

    cell = {"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_size": 8, "dilations": [2, 4]}
    res = train(tiny_run(cell, task=task, steps=3, model={"embedding_size": 8}), progress=False)
    assert res.steps == 3 and all(math.isfinite(v) for v in res.test_metrics.values())


# -- spec test 7: the concatenating head -----------------------------------------------------------

def test_head_concatenates_the_last_d0_top_outputs_in_time_order():
    torch.manual_seed(0)
    d0 = 4
    with_head = dilated("gru", [d0, 8], hidden=5, concat=True)
    plain = dilated("gru", [d0, 8], hidden=5, concat=False)
    plain.load_state_dict(with_head.state_dict())
    assert with_head.output_size == d0 * 5 and plain.output_size == 5
    x = torch.randn(2, 11, 3)
    y_top, _ = plain(x)
    y, _ = with_head(x)
    padded = torch.cat([torch.zeros(2, d0 - 1, 5), y_top], 1)
    for t in range(11):
        expected = torch.cat([padded[:, t + k] for k in range(d0)], -1)  # oldest first
        torch.testing.assert_close(y[:, t], expected)
    # a first dilation of 1 has no head window
    assert dilated("gru", [1, 2], hidden=5).output_size == 5


def test_head_is_the_last_step_classifier_input(seqplat_registry):
    run = build_run_config(overrides=["task.name=toy_parity", "cell.name=dilated_rnn", "cell.dilations=[2,4]",
                                      "cell.hidden_size=6", "tracking.enabled=false"])
    model = build_model(run)
    assert model.head.in_features == 2 * 6  # W_o reads [h_{T-2}; h_{T-1}]


# -- spec test 8: mean recurrent length -------------------------------------------------------------

def test_mean_recurrent_length_figures_of_the_spec():
    assert mean_recurrent_length([2**i for i in range(9)]) == 4.00390625
    assert mean_recurrent_length([1] * 9, cycle=256) == 128.5
    for base, layers in [(2, 4), (3, 4), (4, 3)]:
        m = base ** (layers - 1)
        ds = [base**i for i in range(layers)]
        assert mean_recurrent_length(ds) == pytest.approx((base - 1) * (layers - 1) / 2 + 1 / m)
    d = recurrent_path_lengths([1, 2, 4, 8], 20)
    assert d[:9] == [0, 1, 1, 2, 1, 2, 2, 3, 1]  # binary digit sums
    assert math.isinf(recurrent_path_lengths([2, 4], 3)[1])  # odd spans unreachable without a head
    assert recurrent_path_lengths([2, 4], 3, head_window=2)[1] == 0  # the head reads t-1 directly


def test_memory_capacity_for_a_sequence_length():
    cap = memory_capacity([2**i for i in range(9)], seq_len=784)
    assert cap.mean_recurrent_length == 4.00390625 and cap.undilated_mean_recurrent_length == 128.5
    assert cap.first_to_last_path == 7  # 783 = 3*256 + 8 + 4 + 2 + 1
    assert cap.undilated_first_to_last_path == 783
    assert cap.sequential_depth == [784, 392, 196, 98, 49, 25, 13, 7, 4]
    assert memory_capacity([1, 2, 4, 8], seq_len=6).idle_layers == [3]
    with pytest.raises(ValueError, match="dilations"):
        memory_capacity([0, 2])


def test_dilated_info_command_prints_the_figures():
    @click.group()
    def cli() -> None:
        """Stand-in root group."""

    dilated_register_commands(cli)
    result = CliRunner().invoke(cli, ["dilated-info", "--recipe", "dilated_rnn/pmnist", "--seq-len", "784"])
    assert result.exit_code == 0, result.output
    assert "mean recurrent length" in result.output and "4.00391" in result.output and "128.5" in result.output
    bad = CliRunner().invoke(cli, ["dilated-info", "--recipe", "baselines/nope"])
    assert bad.exit_code != 0 and "Unknown recipe" in bad.output


def test_dilated_info_through_the_seqplat_cli():
    from seqplat.cli import main

    result = CliRunner().invoke(main, ["dilated-info", "--recipe", "dilated_rnn/default", "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.output)
    assert data["dilations"] == [1, 2, 4, 8, 16, 32]
    assert data["seq_len"] == data["sequential_depth"][0]  # read from the task's training batch


# -- spec test 9: parameter counts ------------------------------------------------------------------

@pytest.mark.parametrize(("inner", "expected"), [("rnn", 7_390), ("gru", 21_750), ("lstm", 28_930)])
def test_paper_mnist_models_parameter_counts(inner, expected):
    """Spec table, PyTorch-style cells (two bias vectors per gate): 9 x 20 units, 1 input, 10 classes."""
    cell = build_cell({"name": "dilated_rnn", "inner": {"name": inner}, "hidden_size": 20}, 1)
    assert sum(p.numel() for p in cell.parameters()) + (20 + 1) * 10 == expected


@pytest.mark.parametrize("recipe", ["pmnist", "smnist"])
def test_mnist_recipes_build_with_the_spec_parameter_count(recipe):
    run = build_run_config(recipe=f"dilated_rnn/{recipe}")
    assert run.cell["dilations"] == [2**i for i in range(9)]
    assert run.train.optimizer == "rmsprop" and run.train.lr == 1e-3 and run.train.batch_size == 128
    assert count_parameters(build_model(run)) == 21_750  # TF-style GRU (one bias per gate): 21,210


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_resolves_and_builds(recipe):
    run = build_run_config(recipe=f"dilated_rnn/{recipe}")
    assert run.cell["name"] == "dilated_rnn"
    model = build_model(run)
    n = count_parameters(model)
    if recipe in ("copy_200", "psmnist_1ep"):
        assert 63_000 <= n <= 77_000, n  # protocol budget: about 70k
    if recipe == "ptb_char_1m":
        assert 900_000 <= n <= 1_100_000, n  # 1.0M +- 10%


# -- any cell: third-party inner cells, timestamps, odd states -------------------------------------

class _ToyConfig(CellConfig):
    width: int = Field(3, ge=1, description="output units")


class _ToyTimedCell(StepCell):
    """A third-party cell with no hidden_size option, a nested state and per-step timestamps."""

    config_class = _ToyConfig
    uses_time = True

    def __init__(self, input_size: int, config: _ToyConfig):
        super().__init__(input_size, config)
        self.inp = nn.Linear(input_size, config.width)
        self.rec = nn.Linear(config.width, config.width, bias=False)

    @property
    def output_size(self) -> int:
        return self.config.width

    def initial_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, self.config.width, device=device, dtype=dtype or torch.float32)
        return (z, (torch.zeros(batch_size, 2, device=device, dtype=dtype or torch.float32),))

    def step(self, x_t, state, *, t=None):
        h, (acc,) = state
        h = torch.tanh(self.inp(x_t) + self.rec(h) + 0.1 * torch.sin(t)[:, None] + acc.sum(-1, keepdim=True))
        return h, (h, (0.5 * acc + h[:, :2],))


class _ThirdParty:
    @seqplat.hookimpl
    def register_cells(self, register):
        register("toy_timed", _ToyTimedCell)


def test_third_party_inner_cell_with_timestamps(register_plugin):
    register_plugin(_ThirdParty(), "third_party_toys")
    spec = {"name": "dilated_rnn", "inner": {"name": "toy_timed", "width": 3}, "dilations": [1, 3, 2]}
    cell = check_cell(spec, time=9)
    gradcheck_cell(spec)
    assert cell.uses_time and cell.output_size == 3
    with pytest.raises(ValueError, match="timestamps"):
        cell(torch.randn(2, 4, 3))


# -- errors at config time ---------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"inner": {"name": "gur"}}, "Unknown cell 'gur'. Did you mean 'gru'?"),
    ({"inner": {"name": "gru", "hidden_size": 8}}, "inner.hidden_size: set the width with dilated_rnn's"),
    ({"inner": {"name": "gru", "hiden": 8}}, "inner.hiden: unknown field"),
    ({"dilations": [1, 2], "num_layers": 3}, "num_layers=3 disagrees with 2 dilations"),
    ({"dilations": [1, 0]}, "every dilation must be an integer >= 1"),
    ({"dilations": [1, 2], "hidden_sizes": [4]}, "hidden_sizes has 1 entries but there are 2 layers"),
])
def test_bad_configs_fail_at_config_time(options, message):
    with pytest.raises(ConfigError) as info:
        validate_component("cell", {"name": "dilated_rnn", **options}, "cell", get_registry())
    assert message in str(info.value)


def test_per_layer_hidden_sizes_and_exponential_rule():
    cell = build_cell({"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_sizes": [20, 30, 40, 50],
                       "num_layers": 4, "dilation_base": 2, "first_exponent": 2, "concat_outputs": False}, 1)
    assert cell.dilations == (4, 8, 16, 32)  # the official README example
    assert [c.output_size for c in cell.layers] == [20, 30, 40, 50] and cell.output_size == 50
    assert cell.config.num_layers == 4 and cell.config.dilations == [4, 8, 16, 32]


# -- recipes run -------------------------------------------------------------------------------------

def test_default_recipe_trains_a_few_steps(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--recipe", "dilated_rnn/default", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "train.max_eval_batches=1", "--set", "tracking.enabled=false",
        "--set", f"io.output_dir={tmp_path}", "--no-progress",
    ])
    assert result.exit_code == 0, result.output


def test_paper_recipe_runs_a_few_steps_and_resumes(tmp_path):
    """copy_memory_500 as written (9 layers, dilations 1..256, RMSProp), shrunk only in batch and eval sets."""
    from seqplat.core.train import train

    shrink = ["train.batch_size=4", "train.eval_batch_size=8", "task.valid_size=8", "task.test_size=8",
              "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1", "tracking.enabled=false",
              f"io.run_dir={tmp_path / 'run'}"]
    first = train(build_run_config(recipe="dilated_rnn/copy_memory_500", overrides=[*shrink, "train.steps=2"]),
                  progress=False)
    assert first.steps == 2 and math.isfinite(first.test_metrics["loss"])
    more = build_run_config(recipe="dilated_rnn/copy_memory_500", overrides=[*shrink, "train.steps=3"])
    resumed = train(more, resume=str(tmp_path / "run"), progress=False)
    assert resumed.steps == 3


@pytest.mark.data
@pytest.mark.parametrize("recipe", ["smnist", "pmnist", "ptb_char", "psmnist_1ep", "ptb_char_1m"])
def test_real_data_recipes_take_an_optimizer_step(recipe):
    """One training step of each real-data recipe on a real batch (the full runs are GPU/lead jobs)."""
    run = build_run_config(recipe=f"dilated_rnn/{recipe}")
    task = seqplat.build_task(run.task)
    model = build_model(run, task)
    batch = task.train_batch(0, 2, run.train.seed)
    before = [p.detach().clone() for p in model.parameters()]
    out, _ = model(batch.inputs)
    loss = task.loss(out, batch)
    loss.backward()
    torch.optim.RMSprop(model.parameters(), lr=run.train.lr).step()
    assert math.isfinite(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the docs page has no python snippet"
    exec(compile(blocks[0], str(DOCS), "exec"), {})  # noqa: S102 - our own docs
