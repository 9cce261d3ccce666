"""Tests of the gam_rhn plugin: the GAM-RHN cell (spec papers/gam_rhn.md section 6), its fast path,
the paper recipes' parameter counts, the FI-2010 task and the bilinear front-end."""

from __future__ import annotations

import gzip
import math
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seqplat import DataError, build_cell, build_model, build_run_config, build_task, count_parameters
from seqplat.plugins.gam_rhn.bilinear import BilinearEncoder, BilinearLayer
from seqplat.plugins.gam_rhn.cell import GAMRHNCell, grouped_softmax
from seqplat.plugins.gam_rhn.fi2010 import TEST_FILES, TRAIN_FILE, stock_boundaries
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell

SMALL = {"name": "gam_rhn", "memory": "3x4", "hidden_size": 5, "head_size": 3, "depth": 3}


@pytest.fixture
def one_thread():
    """Tiny float64 kernels run far faster on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(spec: dict | None = None, input_size: int = 3, **options) -> GAMRHNCell:
    torch.manual_seed(0)
    cell = build_cell({**(spec or SMALL), **options}, input_size)
    assert isinstance(cell, GAMRHNCell)
    return cell.eval()


def formula(V: int, dx: int, S: int, N: int, H: int, D: int, L: int, beta: int, out: int | None = None) -> int:
    """Spec section 2, term by term (V = 0: no embedding; out: head width, default V)."""
    out = V if out is None else out
    SN = S * N
    return (V * dx
            + (dx + D) * H + H * SN
            + (dx + D) * D + D + (dx + D) * N + N
            + L * (H * SN + beta * SN) + (L - 1) * D * H
            + L * ((N + D) * 2 * D + 2 * D + (N + D) * D + D)
            + D * out + out)


# -- registration and conformance ----------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    assert reg.plugin_of("cell", "gam_rhn") == "gam_rhn"
    assert reg.plugin_of("task", "fi2010") == "gam_rhn"
    recipes = {"default", "ptb_char", "text8", "pmnist", "fi2010", "temporal_order", "ptb_char_1m",
               "psmnist_1ep", "copy_200"}
    assert {f"gam_rhn/{r}" for r in recipes} <= set(reg.names("recipe"))


@pytest.mark.parametrize("options", [
    {},
    {"memory": "1x4", "read_address_bias": False, "write_address_bias": True},
    {"depth": 1, "memory": "2x1"},
    {"gam_dropout": 0.3, "rhn_dropout": 0.4},
], ids=["depth3", "S1-biases", "depth1-N1", "dropouts"])
def test_conformance(options, one_thread):
    check_cell({**SMALL, **options})


@pytest.mark.parametrize("options", [
    {"depth": 2},
    {"depth": 1, "memory": "1x2", "read_address_bias": False, "write_address_bias": True},
], ids=["depth2", "S1-biases"])
def test_gradcheck_float64(options, one_thread):
    gradcheck_cell({"name": "gam_rhn", "memory": "2x2", "hidden_size": 2, "head_size": 2, **options})


def test_default_config_conformance(one_thread):
    check_cell("gam_rhn", input_size=6)


# -- fast path == reference ----------------------------------------------------------------------

def _run(cell: GAMRHNCell, x: torch.Tensor, state, fast: bool, seed: int = 0):
    cell.use_fast_path = fast
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    state = tuple(s.clone().requires_grad_(True) for s in state)
    cell.zero_grad(set_to_none=True)
    y, (m, s) = cell(x, state)
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    ((y * w).sum() + (m ** 2).sum() + s.sum()).backward()
    grads = {n: p.grad.clone() for n, p in cell.named_parameters()}
    return y.detach(), m.detach(), s.detach(), x.grad, [t.grad for t in state], grads


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit-backward", "autograd-loop"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_fast_path_matches_reference(training, explicit):
    # the fast path trains through the hand-written backward of gam_rhn.fused by default; the autograd
    # loop it replaced stays selectable and must agree too
    cell = make(depth=3, write_address_bias=True, gam_dropout=0.25, rhn_dropout=0.3)
    cell.explicit_backward = explicit
    cell.train(training)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 23, 3, generator=g)
    state = (torch.rand(4, 12, generator=g) * 2 - 1, torch.randn(4, 5, generator=g))
    fast = _run(cell, x, state, True, seed=7)
    ref = _run(cell, x, state, False, seed=7)
    for a, b in zip(fast[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast[3], ref[3], atol=1e-5, rtol=1e-4)
    for a, b in zip(fast[4], ref[4], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert fast[5].keys() == ref[5].keys()
    for name in ref[5]:
        torch.testing.assert_close(fast[5][name], ref[5][name], atol=1e-5, rtol=1e-4, msg=name)
    if training:  # the dropout masks really acted (same masks on both paths)
        cell.eval()
        assert not torch.allclose(_run(cell, x, state, True)[0], fast[0])


# -- spec section 6 ------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("memory", ["3x4", "1x4"])
def test_shapes(batch, memory):
    cell = make(memory=memory)
    S, N = (int(v) for v in memory.split("x"))
    x = torch.randn(batch, 6, 3)
    y, (m, s) = cell(x)
    assert y.shape == (batch, 6, 5)
    assert m.shape == (batch, S * N) and s.shape == (batch, 5)
    init = cell.initial_state(batch)
    assert init[0].shape == (batch, S * N) and init[1].shape == (batch, 5)
    assert not init[0].any() and not init[1].any()
    trace = cell.trace_step(x[:, 0], init)
    assert len(trace.reads) == 3
    for read in trace.reads:
        assert read.shape == (batch, N)
    assert trace.value.shape == (batch, N)
    y_t, _ = cell.step(x[:, 0], init)
    assert y_t.shape == (batch, 5)


def test_memory_string_is_slots_by_groups():
    cell = make(memory="3x4")
    assert (cell.config.slots, cell.config.groups, cell.config.memory_size) == (3, 4, 12)
    assert cell.write_address.shape == (12, 3)  # S*N addresses from the H-wide head
    assert cell.value_weight.shape == (4, 3 + 5)  # one written value per group
    with pytest.raises(ValueError, match="SxN"):
        build_cell({**SMALL, "memory": "3-4"}, 3)
    with pytest.raises(ValueError):
        build_cell({**SMALL, "memory": "0x4"}, 3)


def test_bad_options_fail_at_config_time():
    from seqplat import ConfigError

    with pytest.raises(ConfigError, match="cell.memory: .*'SxN'"):
        build_run_config(recipe="gam_rhn/default", overrides=["cell.memory=3by4"])
    with pytest.raises(ConfigError, match="cell.depth"):
        build_run_config(recipe="gam_rhn/default", overrides=["cell.depth=0"])
    with pytest.raises(ConfigError, match="bilinear_shapes"):
        build_run_config(recipe="gam_rhn/fi2010", overrides=["task.bilinear_shapes=[[0, 3]]"])


def test_addresses_are_distributions_per_group():
    cell = make()
    trace = cell.trace_step(torch.randn(5, 3), cell.initial_state(5))
    for a in [trace.write_address, *trace.read_addresses]:
        groups = a.reshape(5, 4, 3)
        assert (groups >= 0).all()
        torch.testing.assert_close(groups.sum(-1), torch.ones(5, 4))


def test_grouped_softmax_is_stable_for_large_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0, 3e4, 3e4, -5e4]])
    a = grouped_softmax(logits, 3)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, torch.tensor([[1.0, 0.0, 0.0, 0.5, 0.5, 0.0]]))
    assert not torch.isfinite(logits.exp() / logits.exp().reshape(2, 3).sum(-1).repeat_interleave(3)).all()
    # inside the cell: huge address weights keep every group a distribution
    cell = make()
    with torch.no_grad():
        cell.write_address.mul_(1e4)
        for layer in cell.layers:
            layer.read_address.mul_(1e4)
    y, (m, s) = cell(torch.randn(2, 4, 3) * 10)
    assert torch.isfinite(y).all() and torch.isfinite(m).all()


def test_write_is_a_convex_update():
    cell = make()
    m_prev = torch.rand(64, 12) * 2 - 1
    trace = cell.trace_step(torch.randn(64, 3) * 5, (m_prev, torch.randn(64, 5)))
    assert trace.memory.abs().max() <= 1.0
    # every slot lies between its old value and its group's written value
    new = trace.memory.reshape(64, 4, 3)
    old = m_prev.reshape(64, 4, 3)
    value = trace.value.unsqueeze(-1).expand_as(new)
    lo, hi = torch.minimum(old, value), torch.maximum(old, value)
    assert ((new >= lo - 1e-6) & (new <= hi + 1e-6)).all()


def test_zero_address_logits_spread_the_write_evenly():
    cell = make()
    with torch.no_grad():
        cell.write_address.zero_()
    m_prev = torch.randn(2, 12)
    trace = cell.trace_step(torch.randn(2, 3), (m_prev, torch.randn(2, 5)))
    torch.testing.assert_close(trace.write_address, torch.full((2, 12), 1 / 3))
    expected = (1 - 1 / 3) * m_prev + (1 / 3) * trace.value.repeat_interleave(3, dim=1)
    torch.testing.assert_close(trace.memory, expected)


def _gru_highway_stack(cell: GAMRHNCell, read: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """L GRU-type highway layers fed by ``read`` at every layer, written out independently."""
    for layer in cell.layers:
        d = s.shape[-1]
        wg, bg, wc, bc = layer.gate_weight, layer.gate_bias, layer.candidate_weight, layer.candidate_bias
        n = read.shape[-1]
        g = torch.sigmoid(read @ wg[:, :n].T + s @ wg[:, n:].T + bg)
        r, z = g[:, :d], g[:, d:]
        cand = torch.tanh(read @ wc[:, :n].T + (r * s) @ wc[:, n:].T + bc)
        s = z * s + (1 - z) * cand
    return s


def test_one_slot_per_group_reduces_to_a_gru_highway_stack_fed_by_m_bar():
    cell = make(memory="1x4")
    x, s_prev = torch.randn(3, 3), torch.randn(3, 5)
    m_prev = torch.randn(3, 4, requires_grad=True)
    trace = cell.trace_step(x, (m_prev, s_prev))
    torch.testing.assert_close(trace.write_address, torch.ones(3, 4))
    torch.testing.assert_close(trace.memory, trace.value)  # m_t = m_bar whatever m_{t-1}
    for read in trace.reads:
        torch.testing.assert_close(read, trace.value)
    torch.testing.assert_close(trace.states[-1], _gru_highway_stack(cell, trace.value, s_prev))
    # no gradient reaches the old memory, on either path
    (grad,) = torch.autograd.grad(trace.states[-1].sum() + trace.memory.sum(), m_prev)
    assert grad.abs().max() == 0
    for fast in (True, False):
        cell.use_fast_path = fast
        m0 = torch.randn(3, 4, requires_grad=True)
        y, (m, s) = cell(torch.randn(3, 4, 3), (m0, s_prev))
        (grad,) = torch.autograd.grad(y.sum() + m.sum(), m0)
        assert grad.abs().max() == 0


def test_read_happens_after_write():
    cell = make()
    x = torch.randn(2, 3)
    trace = cell.trace_step(x, (torch.zeros(2, 12), torch.randn(2, 5)))
    assert trace.value.abs().min() > 0
    assert trace.reads[0].abs().min() > 0  # read from m_t: m_{t-1} = 0 would give exactly 0
    torch.testing.assert_close(trace.reads[0], (trace.read_addresses[0] * trace.memory).reshape(2, 4, 3).sum(-1))


def test_read_heads_and_addresses_per_layer():
    cell = make(depth=3)
    names = dict(cell.named_parameters())
    assert "layers.0.read_head" not in names  # layer 1 reuses the write head h_w
    assert names["layers.0.read_address"].shape == (12, 3)
    assert names["layers.0.read_address"] is not cell.write_address
    for i in (1, 2):
        assert names[f"layers.{i}.read_head"].shape == (3, 5)  # W_h^l: H x D
        assert names[f"layers.{i}.read_address"].shape == (12, 3)
    trace = cell.trace_step(torch.randn(2, 3), cell.initial_state(2))
    assert trace.read_heads[0] is trace.write_head
    # layer 1's own address matrix matters, and is not the write address
    with torch.no_grad():
        cell.layers[0].read_address.mul_(-1.0)
    torch.manual_seed(0)
    x, state = torch.randn(2, 3), (torch.randn(2, 12), torch.randn(2, 5))
    after = cell.trace_step(x, state)
    with torch.no_grad():
        cell.layers[0].read_address.mul_(-1.0)
    again = cell.trace_step(x, state)
    torch.testing.assert_close(after.write_address, again.write_address)
    assert not torch.allclose(after.reads[0], again.reads[0])


def test_zero_highway_weights_halve_the_state():
    cell = make(depth=3)
    with torch.no_grad():
        for layer in cell.layers:
            for p in (layer.gate_weight, layer.gate_bias, layer.candidate_weight, layer.candidate_bias):
                p.zero_()
    s_prev = torch.randn(2, 5)
    trace = cell.trace_step(torch.randn(2, 3), (torch.randn(2, 12), s_prev))
    expected = s_prev
    for s in trace.states:
        expected = 0.5 * expected
        torch.testing.assert_close(s, expected)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_input_enters_only_through_the_memory_write(fast):
    cell = make(depth=2)
    cell.use_fast_path = fast
    with torch.no_grad():
        for w in (cell.write_head, cell.reset_weight, cell.value_weight):
            w[:, :3] = 0.0
    state = (torch.randn(2, 12), torch.randn(2, 5))
    y1, s1 = cell(torch.randn(2, 7, 3), state)
    y2, s2 = cell(torch.randn(2, 7, 3) * 5, state)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    # and it does enter with the x columns in place
    cell2 = make(depth=2)
    cell2.use_fast_path = fast
    assert not torch.allclose(cell2(torch.randn(2, 7, 3), state)[0], cell2(torch.randn(2, 7, 3), state)[0])


@pytest.mark.parametrize("options", [
    {},
    {"read_address_bias": False},
    {"write_address_bias": True, "depth": 1, "memory": "1x7"},
])
def test_parameter_count_matches_spec_formula(options):
    cell = make(**options, input_size=6)
    c = cell.config
    beta = int(c.read_address_bias)
    expected = formula(0, 6, c.slots, c.groups, c.head_size, c.hidden_size, c.depth, beta, out=0)
    expected += c.memory_size if c.write_address_bias else 0
    assert count_parameters(cell) == expected


@pytest.mark.parametrize(("recipe", "overrides", "expected"), [
    ("gam_rhn/ptb_char", ["cell.read_address_bias=false"], 15_932_750),
    ("gam_rhn/ptb_char", [], 15_941_750),
    ("gam_rhn/text8", [], 44_685_627),
    ("gam_rhn/pmnist", [], formula(0, 1, 4, 60, 60, 120, 1, 1, out=10)),
    ("gam_rhn/default", [], 19_878),
    ("gam_rhn/temporal_order", [], 19_878),
    ("gam_rhn/psmnist_1ep", [], 70_525),
    ("gam_rhn/copy_200", [], 72_054),
    ("gam_rhn/ptb_char_1m", [], 1_018_770),
], ids=lambda v: v if isinstance(v, str) else None)
def test_recipe_parameter_counts(recipe, overrides, expected):
    run = build_run_config(recipe=recipe, overrides=overrides)
    assert count_parameters(build_model(run)) == expected
    if recipe == "gam_rhn/ptb_char_1m":
        assert abs(expected - 1_000_000) <= 100_000


def test_paper_formula_figures():
    assert formula(50, 150, 3, 600, 300, 600, 5, 0) == 15_932_750
    assert formula(50, 150, 3, 600, 300, 600, 5, 1) == 15_941_750
    assert formula(27, 50, 3, 750, 300, 750, 10, 0) == 44_685_627
    assert formula(27, 50, 3, 750, 300, 750, 10, 1) == 44_708_127


def test_init_glorot_normal_and_zero_biases():
    cell = make({"name": "gam_rhn", "memory": "3x100", "hidden_size": 200, "head_size": 100, "depth": 2},
                input_size=50, write_address_bias=True)
    for name, p in cell.named_parameters():
        p = p.detach()
        if "bias" in name:
            assert not p.any(), name
        else:
            fan_out, fan_in = p.shape
            std = math.sqrt(2.0 / (fan_in + fan_out))
            assert abs(float(p.std()) / std - 1) < 0.1, name
            assert abs(float(p.mean())) < 0.1 * std, name
    # the gate matrix is one Glorot matrix over [read ; s] -> [r ; z]
    assert cell.layers[0].gate_weight.shape == (400, 100 + 200)


def test_eval_is_deterministic_and_training_dropout_is_not():
    cell = make(gam_dropout=0.5, rhn_dropout=0.5)
    x = torch.randn(2, 6, 3)
    assert torch.equal(cell(x)[0], cell(x)[0])
    cell.train()
    assert not torch.equal(cell(x)[0], cell(x)[0])
    # gam dropout acts on m_bar alone: with rhn_dropout 0, zeroed m_bar entries leave those slots' writes at 0
    cell = make(gam_dropout=0.9)
    cell.train()
    torch.manual_seed(3)
    trace = cell.trace_step(torch.randn(50, 3), cell.initial_state(50))
    dropped = trace.value == 0
    assert dropped.any() and (~dropped).any()
    kept = trace.value[~dropped]
    assert kept.abs().max() > 1.0  # inverted dropout scales survivors by 1 / (1 - p)


@pytest.mark.slow
def test_temporal_order_smoke_reaches_full_accuracy(tmp_path):
    """Spec: the temporal-order config reaches 100% validation accuracy within 50k iterations."""
    from seqplat.core.train import train

    run = build_run_config(recipe="gam_rhn/temporal_order", overrides=[
        "train.steps=50000", "tracking.enabled=false", f"io.output_dir={tmp_path}", "train.threads=1",
    ])
    result = train(run)
    assert result.valid_metrics["accuracy"] == 1.0


@pytest.mark.parametrize(("task", "target_shape"), [
    ({"name": "adding", "length": 20}, (4, 1)),  # regression at the last step
    ({"name": "copy_memory", "delay": 10}, (4, 30)),  # classification at every step
    ({"name": "temporal_order", "length": 30, "window": 5}, (4,)),  # classification at the last step
], ids=["adding", "copy", "temporal_order"])
def test_cell_trains_on_any_task_kind(task, target_shape):
    run = build_run_config(overrides=["cell.name=gam_rhn", "cell.hidden_size=8", "cell.memory=2x4",
                                      "cell.head_size=4", "cell.depth=2", "model.num_layers=2"])
    run = run.model_copy(update={"task": {**task}})
    torch.manual_seed(0)
    t = build_task(run.task)
    model = build_model(run, t)
    batch = t.train_batch(0, 4, seed=0)
    assert tuple(batch.targets.shape) == target_shape
    out, state = model(batch.inputs)
    loss = t.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert len(state) == 2 and state[0][0].shape == (4, 8)


# -- training through the CLI ----------------------------------------------------------------------

def _train(args: list[str], tmp_path: Path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, ["train", *args, "--no-progress", "--set", "tracking.enabled=false",
                                       "--set", f"io.output_dir={tmp_path}"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_default_recipe_trains_a_few_steps(tmp_path):
    _train(["--plugin", "gam_rhn", "--set", "train.steps=3", "--set", "train.eval_every=3",
            "--set", "task.valid_size=20", "--set", "task.test_size=20", "--set", "train.eval_batch_size=20",
            "--set", "train.threads=1"], tmp_path)


def test_docs_python_snippet_runs(tmp_path, monkeypatch):
    """The Python usage snippet of docs/plugins/gam_rhn.md runs as written (on a two-step budget)."""
    import seqplat

    doc = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "gam_rhn.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the docs page has no python snippet"
    tiny = ["train.steps=2", "train.eval_every=2", "task.valid_size=10", "task.test_size=10",
            "train.eval_batch_size=10", "train.threads=1", f"io.output_dir={tmp_path}"]
    real = seqplat.build_run_config
    monkeypatch.setattr(seqplat, "build_run_config",
                        lambda *a, overrides=(), **k: real(*a, overrides=[*overrides, *tiny], **k))
    namespace: dict = {}
    exec(compile(blocks[0], str(doc), "exec"), namespace)  # noqa: S102 - our own docs snippet
    assert 0.0 <= namespace["result"].test_metrics["accuracy"] <= 1.0


# -- FI-2010 ----------------------------------------------------------------------------------------

PRICES = (30.0, 13.0, 17.5, 14.2, 38.0)  # five stocks at clearly different levels (DecPre: /10000)


def write_fi2010(folder: Path, events=(30, 20, 16, 12), nested: bool = False, gz: bool = False,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the four setup-2 DecPre files in the canonical format: 149 text rows, one column per event,
    5 stocks one after the other. Returns each file's matrix."""
    g = torch.Generator().manual_seed(seed)
    names = [TRAIN_FILE, *TEST_FILES]
    mats = {}
    for name, n in zip(names, events, strict=True):
        blocks = []
        for price in PRICES:
            tick = 0.01 * torch.randint(-2, 3, (n,), generator=g).cumsum(0).double()
            m = torch.zeros(149, n, dtype=torch.float64)
            for lvl in range(10):
                m[4 * lvl] = (price + tick + 0.01 * (lvl + 1)) / 1e4  # ask price
                m[4 * lvl + 1] = torch.randint(0, 5000, (n,), generator=g).double() / 1e5  # ask volume
                m[4 * lvl + 2] = (price + tick - 0.01 * (lvl + 1)) / 1e4  # bid price
                m[4 * lvl + 3] = torch.randint(0, 5000, (n,), generator=g).double() / 1e5  # bid volume
            m[40:144] = torch.randn(104, n, generator=g, dtype=torch.float64)
            m[144:149] = torch.randint(1, 4, (5, n), generator=g).double()
            blocks.append(m)
        mat = torch.cat(blocks, dim=1)
        sub = Path()
        if nested:
            part = "Training" if name.startswith("Train") else "Testing"
            sub = Path("BenchmarkDatasets/NoAuction/3.NoAuction_DecPre") / f"NoAuction_DecPre_{part}"
        path = folder / sub / (name + (".gz" if gz else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join("  " + "  ".join(f"{v:.7e}" for v in row) + "\n" for row in mat.tolist())
        path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
        mats[name] = mat
    return mats


@pytest.fixture
def fi_data(tmp_path, monkeypatch):
    root = tmp_path / "data"
    mats = write_fi2010(root / "fi2010")
    monkeypatch.setenv("SEQPLAT_DATA", str(root))
    return mats


def _expected_volumes(mat: torch.Tensor) -> torch.Tensor:
    return torch.log10(mat[1:40:2].T * 1e5 + 1).float()


def test_fi2010_loads_setup_two_from_the_canonical_files(fi_data):
    task = build_task({"name": "fi2010", "horizon": 30})
    sp = task.splits()
    assert [len(sp[k]) for k in ("train", "valid", "test")] == [5, 5, 5]
    train_mat = fi_data[TRAIN_FILE]
    x0, y0 = sp["train"][0]
    assert x0.shape == (30, 20) and y0.shape == (30,)
    torch.testing.assert_close(x0, _expected_volumes(train_mat[:, :30]))
    horizon_row = 144 + 2  # horizons 10, 20, 30, 50, 100
    assert torch.equal(y0, train_mat[horizon_row, :30].long() - 1)
    assert set(torch.cat([y for _, y in sp["train"]]).tolist()) <= {0, 1, 2}
    # stock 3 of the test split = its day-8, day-9 and day-10 events, in that order
    x_test, y_test = sp["test"][2]
    parts = [fi_data[name][:, 2 * n : 3 * n] for name, n in zip(TEST_FILES, (20, 16, 12), strict=True)]
    torch.testing.assert_close(x_test, torch.cat([_expected_volumes(p) for p in parts]))
    assert torch.equal(y_test, torch.cat([p[horizon_row].long() - 1 for p in parts]))
    assert sp["valid"] is sp["train"]  # the authors validate on the training days
    assert task.input_features == 15 * 20 and task.num_outputs == 3
    assert task.primary_metric == "macro_f1" and task.primary_mode == "max"


def test_fi2010_layouts_and_options(tmp_path, monkeypatch):
    write_fi2010(tmp_path / "nested", nested=True, gz=True)
    task = build_task({"name": "fi2010", "data_dir": str(tmp_path / "nested"), "volume_only": False,
                       "valid_fraction": 0.25, "split_stocks": False, "log_volumes": False})
    sp = task.splits()
    assert len(sp["train"]) == 1 and sp["train"][0][0].shape == (150 - 38, 40)  # 5 x 30 events, 25% held out
    assert sp["valid"][0][0].shape == (38, 40)
    assert sp["test"][0][0].shape == (5 * 48, 40)
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="BenchmarkDatasets.zip"):
        build_task({"name": "fi2010"}).prepare()


def test_fi2010_rejects_malformed_files(tmp_path):
    write_fi2010(tmp_path)
    lines = (tmp_path / TRAIN_FILE).read_text().splitlines()
    (tmp_path / TRAIN_FILE).write_text("\n".join(lines[:100]) + "\n")
    with pytest.raises(DataError, match="149"):
        build_task({"name": "fi2010", "data_dir": str(tmp_path)}).prepare()
    with pytest.raises(DataError, match="stocks"):
        stock_boundaries(torch.full((40,), 0.003))


def test_fi2010_stock_boundaries():
    price = torch.cat([torch.full((7,), p) + 0.001 * torch.arange(7.0) for p in PRICES])
    assert stock_boundaries(price) == [7, 14, 21, 28]


def test_fi2010_batches(fi_data):
    task = build_task({"name": "fi2010", "subseq_len": 12, "bptt": 5, "eval_bptt": 7, "window": 3})
    b0 = task.train_batch(0, 4, seed=1)
    assert b0.inputs.shape == (4, 5, 60) and b0.targets.shape == (4, 5) and b0.reset
    assert torch.equal(b0.inputs, task.train_batch(0, 4, seed=1).inputs)  # deterministic in step and seed
    b2 = task.train_batch(2, 4, seed=1)
    assert b2.inputs.shape == (4, 2, 60) and not b2.reset  # the last, shorter chunk of the sub-sequence
    assert task.train_batch(3, 4, seed=1).reset  # a new draw of sub-sequences
    assert not torch.equal(task.train_batch(0, 4, seed=2).inputs, b0.inputs)
    # windows: the last `window` events, oldest first, zeros before the sequence starts
    x, _ = task.splits()["train"][1]
    w = task.windows(x, 0, 4).reshape(4, 3, 20)
    assert not w[0, :2].any() and torch.equal(w[0, 2], x[0])
    assert torch.equal(w[3], x[1:4])
    # evaluation reads every event of every test sequence exactly once
    batches = list(task.eval_batches("test", 8))
    assert batches[0].reset and not batches[1].reset
    assert all(b.inputs.shape[0] == 8 for b in batches)
    assert int(sum(b.mask.sum() for b in batches)) == 5 * (20 + 16 + 12)
    labels = torch.cat([b.targets[:5] for b in batches], dim=1)
    assert torch.equal(labels[2], task.splits()["test"][2][1])


def test_fi2010_metrics_are_accuracy_and_macro_f1(fi_data):
    task = build_task({"name": "fi2010"})
    batch = next(iter(task.eval_batches("test", 5)))
    logits = torch.nn.functional.one_hot(batch.targets, 3).float() * 5  # perfect predictions
    metrics = task.finalize(task.batch_stats(logits, batch))
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == pytest.approx(1.0)
    metrics = task.finalize(task.batch_stats(torch.zeros_like(logits), batch))  # always class 0
    assert metrics["accuracy"] < 1.0 and metrics["macro_f1"] < metrics["accuracy"]


def test_fi2010_recipe_builds_trains_and_resumes(fi_data, tmp_path):
    run = build_run_config(recipe="gam_rhn/fi2010")
    cell = formula(0, 20, 2, 50, 15, 200, 8, 1, out=3)
    assert count_parameters(build_model(run)) == cell + 27_669  # + the bilinear front-end
    out = tmp_path / "runs"
    small = ["--recipe", "gam_rhn/fi2010", "--set", "task.subseq_len=6", "--set", "task.bptt=3",
             "--set", "task.eval_bptt=64", "--set", "train.batch_size=2", "--set", "train.eval_every=2",
             "--set", "train.checkpoint_every=2", "--set", "cell.depth=2", "--set", "train.threads=1"]
    _train([*small, "--set", "train.steps=2"], out)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    _train(["--resume", str(run_dir), "--set", "train.steps=4"], out)


# -- the bilinear front-end -------------------------------------------------------------------------

def test_bilinear_layer_is_w1_x_w2_plus_bias():
    torch.manual_seed(0)
    layer = BilinearLayer((15, 20), (20, 60))
    assert layer.left.shape == (20, 15) and layer.right.shape == (20, 60) and layer.bias.shape == (60,)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(7, 15, 20)
    expected = torch.stack([layer.left @ xi @ layer.right + layer.bias for xi in x])
    torch.testing.assert_close(layer(x), expected)


def test_bilinear_encoder_shapes_count_and_max_norm():
    torch.manual_seed(0)
    enc = BilinearEncoder(15, 20)
    assert enc.output_size == 20
    assert sum(p.numel() for p in enc.parameters()) == 27_669  # 20x60, 15x80, 10x100, 5x120, 5x4
    x = torch.randn(2, 3, 300, requires_grad=True)
    enc.eval()
    y = enc(x)
    assert y.shape == (2, 3, 20) and y.abs().max() <= 1.0  # tanh output layer
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in enc.parameters())
    # blow the weights up: eval leaves them, a training forward projects every column to norm <= 2.5
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(10.0)
    enc(x)
    assert max(float(layer.left.detach().norm(dim=0).max()) for layer in enc.layers) > 2.5
    enc.train()
    enc(x)
    for layer in enc.layers:
        for w in (layer.left, layer.right):
            assert float(w.detach().norm(dim=0).max()) <= 2.5 + 1e-5


def test_bilinear_is_an_encoder_option_of_fi2010(fi_data):
    run = build_run_config(recipe="gam_rhn/fi2010", overrides=["task.encoder=default", "task.window=1"])
    model = build_model(run)
    assert isinstance(model.encoder, torch.nn.Identity)
    assert model.cells[0].input_size == 20
    run = build_run_config(recipe="gam_rhn/fi2010")
    assert isinstance(build_model(run).encoder, BilinearEncoder)


# -- real data ---------------------------------------------------------------------------------------

needs_data = pytest.mark.skipif(not os.environ.get("SEQPLAT_DATA"), reason="SEQPLAT_DATA is not set")


@pytest.mark.data
@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("recipe", ["ptb_char", "text8"])
def test_paper_recipe_runs_a_few_steps_and_resumes_on_real_data(recipe, tmp_path):
    """The GPU-sized paper recipes build, take two steps and resume on CPU (tiny batch and evaluation)."""
    small = {
        "ptb_char": ["--set", "task.bptt=4", "--set", "task.max_eval_tokens=40", "--set", "task.eval_bptt=20",
                     "--set", "task.eval_batch_size=2", "--set", "train.eval_batch_size=2"],
        "text8": ["--set", "task.bptt=4", "--set", "task.max_eval_tokens=40", "--set", "task.eval_bptt=20",
                  "--set", "train.eval_batch_size=2"],
    }[recipe]
    common = ["--recipe", f"gam_rhn/{recipe}", "--set", "train.batch_size=2", "--set", "train.eval_every=2",
              "--set", "train.checkpoint_every=1", "--set", "train.threads=1", *small]
    out = tmp_path / "runs"
    _train([*common, "--set", "train.steps=1"], out)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    _train(["--resume", str(run_dir), "--set", "train.steps=2"], out)


@pytest.mark.data
@needs_data
def test_pmnist_recipe_takes_training_steps_on_real_data():
    """pmnist's final test pass covers all 10k images (no cap), so the steps are taken directly."""
    torch.manual_seed(0)
    run = build_run_config(recipe="gam_rhn/pmnist")
    task = build_task(run.task)
    model = build_model(run, task)
    opt = torch.optim.Adam(model.parameters(), lr=run.train.lr)
    for step in range(2):
        batch = task.train_batch(step, 2, seed=0)
        batch = type(batch)(batch.inputs[:, :40], batch.targets)  # the first 40 of 784 pixels
        out, _ = model(batch.inputs)
        assert out.shape == (2, 10)
        task.loss(out, batch).backward()
        opt.step()
        opt.zero_grad()


def test_explicit_backward_gradcheck_float64_with_dropout_masks():
    # gradcheck the hand-written backward directly, dropout masks and address biases included
    from seqplat.plugins.gam_rhn.fused import GAMRHNRecurrence

    torch.manual_seed(0)
    h, d, n, slots, depth, b, steps = 2, 3, 2, 2, 2, 2, 3
    sn = n * slots

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    weights = [t(d, 2 * d + h + d), t(2 * d), t(n, d), t(h, 2 * sn), t(2 * sn)]
    for i in range(depth):
        weights += [t(n, 3 * d), t(d), t(d, d)]
        if i >= 1:
            weights += [t(d, 2 * d + h), t(2 * d), t(h, sn), t(sn)]
    xp, m0, s0 = t(steps, b, h + d + n), t(b, slots, n), t(b, d)
    mask_g = (torch.rand(steps, b, n, dtype=torch.float64) > 0.3).double() / 0.7
    mask_r = (torch.rand(steps, depth, b, d, dtype=torch.float64) > 0.3).double() / 0.7

    def fn(xp_, m_, s_, *ws):
        return GAMRHNRecurrence.apply(xp_, None, None, m_, s_, mask_g, mask_r, (h, d, n, slots, depth), None, *ws)

    assert torch.autograd.gradcheck(fn, (xp, m0, s0, *weights), eps=1e-6, atol=1e-6, rtol=1e-4)
