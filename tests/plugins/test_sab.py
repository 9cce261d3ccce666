"""Tests of the sab plugin (Sparse Attentive Backtracking).

They pin the gradient structure (local windows cut at k_trunc, credit reaching older steps only
through selected memories, dense reading without truncation == LSTM + self-attention with full
BPTT), the two sparsifiers, the memory bookkeeping, the fast path against the reference path, the
release-reproduction switch, the recipes and their parameter counts, and the CLI. Numbered comments
refer to section 5 of ../shared/papers/sab.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import Field

import seqplat
from seqplat import (
    CellConfig,
    ConfigError,
    StepCell,
    build_cell,
    build_model,
    build_run_config,
    build_task,
    count_parameters,
)
from seqplat.core.config import validate_component
from seqplat.plugins.sab.attention import DenseKeys, sparse_weights
from seqplat.plugins.sab.bench import format_rows, measure_step_cost
from seqplat.plugins.sab.cell import SABCell
from seqplat.plugins.sab.memory import ChainMemory, DenseMemory
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins" / "sab.md"
PAPER_RECIPES = ["default", "copy_100", "copy_200", "copy_300", "copy_200_release", "adding", "pmnist", "ptb_char"]
PROTOCOL_RECIPES = ["protocol_copy_200", "protocol_copy_200_tbptt", "protocol_copy_200_dense", "adding_400",
                    "adding_400_tbptt", "ptb_char_1m", "ptb_char_1m_tbptt"]


def sab(input_size: int = 3, double: bool = False, **options) -> SABCell:
    torch.manual_seed(0)
    cell = build_cell({"name": "sab", "hidden_size": 5, **options}, input_size)
    assert isinstance(cell, SABCell)
    return cell.double() if double else cell


# -- registration and conformance ------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    assert reg.plugin_of("cell", "sab") == "sab"
    recipes = set(reg.names("recipe"))
    for name in PAPER_RECIPES + PROTOCOL_RECIPES:
        assert f"sab/{name}" in recipes


CONFORMANCE = {
    "default": {"name": "sab"},
    "sparse_ring": {"name": "sab", "hidden_size": 6, "k_att": 1, "k_top": 2, "k_trunc": 2, "memory_size": 12},
    "release": {"name": "sab", "hidden_size": 6, "reproduce_released_code": True, "k_att": 1, "k_top": 3,
                "k_trunc": 3, "memory_size": 5},
    "gru_state_output": {"name": "sab", "inner": {"name": "gru"}, "hidden_size": 5, "k_att": 2, "k_top": 1,
                         "output": "state", "memory_size": 4},
    "rnn_official_scorer": {"name": "sab", "inner": {"name": "rnn"}, "hidden_size": 4, "k_att": 1, "k_top": 2,
                            "scorer": "official", "detach_threshold": True, "memory_size": 20},
}


@pytest.mark.parametrize("spec", CONFORMANCE.values(), ids=CONFORMANCE.keys())
def test_conformance(spec):
    """Shapes, state carry over chunks == one run (ring wrapping included), fast == reference.

    In float64: the C++ loop (fused.py) rounds its scores differently from torch, and in float32 two
    scores that tie to rounding can select different slots on the two paths (test_sab_cpp.py compares
    them in float32 where no such tie occurs)."""
    cell = check_cell(spec, time=10 if len(spec) == 1 else 24, dtype=torch.float64)
    assert cell.has_fast_path


GRADCHECK = {
    "paper_sparse": {"name": "sab", "hidden_size": 3, "k_att": 1, "k_top": 1, "k_trunc": None, "memory_size": 4},
    "softmax_small_memory": {"name": "sab", "hidden_size": 3, "k_att": 1, "k_top": 8, "k_trunc": 0,
                             "memory_size": 4},
    "release": {"name": "sab", "hidden_size": 3, "reproduce_released_code": True, "k_att": 1, "k_top": 2,
                "k_trunc": None, "memory_size": 4},
}


@pytest.mark.parametrize("spec", GRADCHECK.values(), ids=GRADCHECK.keys())
def test_gradcheck(spec):
    """float64 gradcheck of both paths (no truncation: a detach makes autograd differ from finite
    differences on purpose)."""
    gradcheck_cell(spec, time=4)


# -- 1, 2: the sparsifiers -----------------------------------------------------------------------

def test_paper_sparsifier_keeps_exactly_k_top_normalised_weights():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 20, generator=g)
    for k in (1, 3, 7):
        w, idx = sparse_weights(scores, k, "paper")
        assert w.shape == idx.shape == (6, k)
        assert (w > 0).sum(-1).eq(k).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(6), atol=1e-6, rtol=0)
        assert torch.equal(idx.sort(-1).values, scores.topk(k, -1).indices.sort(-1).values)


def test_paper_sparsifier_breaks_ties_towards_the_lower_slot():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]])
    w, idx = sparse_weights(scores, 2, "paper")
    assert idx.tolist() == [[1, 3]]  # the two tied maxima, lower index first; delta = 2
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))
    w3, idx3 = sparse_weights(scores, 3, "paper")  # the third slot ties with the threshold: weight 0
    assert idx3.tolist() == [[1, 3, 2]] and w3[0, 2] == 0
    assert all(torch.equal(sparse_weights(scores, 3, "paper")[1], idx3) for _ in range(3))


def test_official_sparsifier_reproduces_the_off_by_one():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 12, generator=g)
    for k in (2, 4, 6):
        w, _ = sparse_weights(scores, k, "official")
        assert (w > 0).sum(-1).eq(k - 1).all()  # only k_top - 1 weights
    w1, _ = sparse_weights(scores, 1, "official")
    assert torch.equal(w1, torch.zeros_like(w1))  # k_top = 1 reads nothing
    small = scores[:, :4]
    raw, idx = sparse_weights(small, 4, "official", "raw")
    assert idx is None and torch.equal(raw, small)  # |M| <= k_top: raw scores, negatives included
    soft, _ = sparse_weights(small, 4, "paper", "softmax")
    torch.testing.assert_close(soft, torch.softmax(small, -1))


# -- 3: memory bookkeeping -------------------------------------------------------------------------------

@pytest.mark.parametrize("release", [True, False], ids=["release_h0_slot", "paper"])
@pytest.mark.parametrize("k_att", [1, 3])
def test_memory_holds_the_states_at_multiples_of_k_att(release, k_att):
    T, H = 14, 5
    cell = sab(k_att=k_att, k_top=2, memory_size=20, reproduce_released_code=release).eval()
    y, (_, memory, step) = cell(torch.randn(2, T, 3))
    assert step.tolist() == [T, T]
    written = (1 if release else 0) + T // k_att
    assert cell.writes_before(T) == written
    h = y[..., :H]  # y_t = [h_t; s_t]
    expected = ([torch.zeros(2, H)] if release else []) + [h[:, t] for t in range(T) if (t + 1) % k_att == 0]
    assert len(expected) == written
    torch.testing.assert_close(memory[:, :written], torch.stack(expected, 1), atol=0, rtol=0)
    assert memory[:, written:].abs().sum() == 0


def test_full_memory_overwrites_the_oldest_slot():
    T, S, H = 13, 3, 5
    cell = sab(k_att=2, memory_size=S).eval()
    y, (_, memory, _) = cell(torch.randn(2, T, 3))
    writes = [y[:, t, :H] for t in range(T) if (t + 1) % 2 == 0]  # 6 writes into 3 slots
    for j, h in enumerate(writes[-S:], start=len(writes) - S):
        torch.testing.assert_close(memory[:, j % S], h, atol=0, rtol=0)


def test_summary_joins_h_but_not_c_and_memory_is_carried():
    """h_t = h^_t + s_t becomes the recurrent h; the LSTM cell state c_t is the inner cell's own."""
    cell = sab(k_att=1, k_top=2, memory_size=10).eval()
    x = torch.randn(2, 6, 3)
    y, ((h, c), memory, _) = cell(x[:, :5])
    h_hat, (h_inner, c_inner) = cell.inner.step(x[:, 5], (h, c))
    y6, ((h6, c6), _, _) = cell(x[:, 5:], ((h, c), memory, torch.full((2,), 5)))
    s6 = y6[:, 0, 5:]
    assert s6.abs().sum() > 0
    torch.testing.assert_close(h6, h_hat + s6)
    torch.testing.assert_close(c6, c_inner)
    torch.testing.assert_close(y6[:, 0, :5], h6)


# -- 4: dense reading without truncation == LSTM + self-attention with full BPTT ------------------------

def _lstm_attention_reference(cell: SABCell, x: torch.Tensor) -> torch.Tensor:
    """A straightforward LSTM + dense (softmax) self-attention over the states at multiples of k_att,
    no detaches, written from the equations with the cell's own parameters."""
    rnn, sc = cell.inner.rnn, cell.scorer
    b, T, _ = x.shape
    H = rnn.hidden_size
    h = c = x.new_zeros(b, H)
    mem: list[torch.Tensor] = []
    ys = []
    for t in range(T):
        gates = x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_hat = torch.sigmoid(o) * torch.tanh(c)
        if mem:
            m = torch.stack(mem, 1)
            a = (torch.tanh((h_hat @ sc.query_proj.weight.T + sc.query_proj.bias)[:, None] + m @ sc.key_proj.weight.T)
                 @ sc.out.weight.T).squeeze(-1)
            s = (torch.softmax(a, -1)[..., None] * m).sum(1)
        else:
            s = torch.zeros_like(h_hat)
        h = h_hat + s
        if (t + 1) % cell.config.k_att == 0:
            mem.append(h)
        ys.append(torch.cat([h, s], -1))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_dense_reading_without_truncation_equals_full_bptt_attention(fast):
    cell = sab(double=True, k_att=2, k_top=50, k_trunc=None, memory_size=50)
    cell.use_fast_path = fast
    x = torch.randn(3, 17, 3, dtype=torch.float64)
    w = torch.randn(3, 17, 10, dtype=torch.float64)
    y, _ = cell(x)
    (y * w).sum().backward()
    grads = [p.grad.clone() for p in cell.parameters()]
    cell.zero_grad()
    y_ref = _lstm_attention_reference(cell, x)
    (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    for (name, p), g in zip(cell.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# -- 5: truncation cuts only the local path; credit crosses windows only through selected memories --------

def _input_grad(cell: SABCell, x: torch.Tensor, t: int) -> torch.Tensor:
    """|d loss_t / d x_u| summed over features: ``[b, T]``."""
    x = x.clone().requires_grad_(True)
    y, _ = cell(x)
    w = torch.randn(y.shape[0], y.shape[-1], generator=torch.Generator().manual_seed(t), dtype=y.dtype)
    (y[:, t] * w).sum().backward()
    return x.grad.abs().sum(-1)


def _window_start(cell: SABCell, t: int) -> int:
    while t > 0 and not cell.cuts_before(t):
        t -= 1
    return t


def _reachable(cell: SABCell, trace: list[dict], t: int, row: int, with_threshold: bool) -> set[int]:
    """Steps u whose input x_u can influence the output at step t: the local window of every reached
    step, plus, for every reached read, the steps that wrote the selected slots (and the threshold
    slot when its gradient is not stopped)."""
    writer: dict[int, int] = {}
    writers_at = []  # slot -> writing step, as seen by the read at each step
    for rec in trace:
        writers_at.append(dict(writer))
        if "write_slot" in rec:
            writer[rec["write_slot"]] = rec["t"]
    k = cell.config.k_top
    reached: set[int] = set()
    todo = [t]
    while todo:
        tau = todo.pop()
        for u in range(_window_start(cell, tau), tau + 1):
            if u in reached:
                continue
            reached.add(u)
            rec = trace[u]
            if rec["slots"] is None:
                continue
            slots = rec["slots"][row].tolist()
            if rec["n"] > k:  # sparse read: weighted slots, plus the threshold slot if it gets gradient
                order = torch.sort(rec["scores"][row], descending=True, stable=True).indices.tolist()
                official = cell.config.sparsifier == "official"
                slots = order[: k - 1] if official else order[:k]
                if with_threshold:
                    slots.append(order[k - 1] if official else order[k])
            todo.extend(writers_at[u][p] for p in slots if p in writers_at[u])
    return reached


def test_truncation_without_attention_cuts_every_earlier_window():
    cell = sab(double=True, k_att=1, k_top=0, k_trunc=4, memory_size=16)
    x = torch.randn(2, 15, 3, dtype=torch.float64)
    for t in (3, 4, 9, 14):
        g = _input_grad(cell, x, t)
        start = _window_start(cell, t)
        assert (g[:, :start] == 0).all(), f"t={t}: gradient crossed the window start {start}"
        assert (g[:, start : t + 1] > 0).all() and (g[:, t + 1 :] == 0).all()


@pytest.mark.parametrize("release", [False, True], ids=["paper", "release"])
@pytest.mark.parametrize("detach_threshold", [True, False], ids=["detached_threshold", "threshold_gets_grad"])
def test_credit_crosses_windows_only_through_selected_memories(release, detach_threshold):
    """With truncation, the gradient reaching x_u in an earlier window (e.g. u = t - k_trunc - 1) is
    non-zero exactly when a chain of selected skip connections leads there."""
    k_trunc = 3
    cell = sab(double=True, k_att=2, k_top=2, k_trunc=k_trunc, memory_size=16, scorer="official" if release else "mlp",
               reproduce_released_code=release, detach_threshold=detach_threshold)
    torch.manual_seed(3)
    x = torch.randn(3, 24, 3, dtype=torch.float64)
    cell.record_trace = True
    crossed = 0
    for t in (11, 17, 23):
        cell.trace = []
        g = _input_grad(cell, x, t)
        for row in range(3):
            expect = _reachable(cell, cell.trace, t, row, with_threshold=not detach_threshold)
            got = {u for u in range(24) if g[row, u] > 0}
            assert got == expect, f"t={t} row={row}: gradient at {sorted(got)}, expected {sorted(expect)}"
            local = set(range(_window_start(cell, t), t + 1))
            crossed += len(got - local)
            assert t - k_trunc - 1 not in local
    assert crossed > 0, "no credit crossed a window: the test would be vacuous"


# -- 6: sparse credit ------------------------------------------------------------------------------------

@pytest.mark.parametrize("store", [DenseMemory, ChainMemory], ids=["reference", "fast"])
@pytest.mark.parametrize("detach_threshold", [False, True])
def test_unselected_slots_receive_no_gradient(detach_threshold, store):
    cell = sab(double=True, k_top=3, detach_threshold=detach_threshold)
    b, n, H = 4, 9, 5
    memory = torch.randn(b, n, H, dtype=torch.float64, requires_grad=True)
    h_hat = torch.randn(b, H, dtype=torch.float64)
    cell.record_trace = True
    s = cell._read(h_hat, store(memory), DenseKeys(cell.scorer, memory), n, 0)
    s.sum().backward()
    rec = cell.trace[-1]
    receives = memory.grad.abs().sum(-1) > 0  # [b, n]
    order = torch.sort(rec["scores"], dim=-1, descending=True, stable=True).indices
    for row in range(b):
        expected = set(order[row, :3].tolist()) | (set() if detach_threshold else {int(order[row, 3])})
        assert set(torch.nonzero(receives[row]).flatten().tolist()) == expected
    if detach_threshold:
        assert receives.sum(-1).eq(3).all()  # exactly k_top slots


# -- 7: the official scorer ignores the current state once |M| > k_top --------------------------------------

def test_official_scorer_weights_do_not_depend_on_the_state():
    cell = sab(scorer="official", k_top=3, reproduce_released_code=True)
    memory = torch.randn(2, 10, 5)
    keys = DenseKeys(cell.scorer, memory)
    weights = []
    for seed in range(3):
        h_hat = torch.randn(2, 5, generator=torch.Generator().manual_seed(seed)) * 3
        a = keys.scores(cell.scorer.query(h_hat), 10)
        weights.append(sparse_weights(a, 3, "official")[0])
    torch.testing.assert_close(weights[0], weights[1])
    torch.testing.assert_close(weights[0], weights[2])
    mlp = sab(k_top=3)  # the state-dependent default does depend on it
    mk = DenseKeys(mlp.scorer, memory)
    a1, a2 = (mk.scores(mlp.scorer.query(torch.randn(2, 5)), 10) for _ in range(2))
    assert not torch.allclose(sparse_weights(a1, 3)[0], sparse_weights(a2, 3)[0])


# -- the release switch ------------------------------------------------------------------------------------

def test_release_switch_sets_every_deviation_and_refuses_contradictions():
    cfg = SABCell.config_class(reproduce_released_code=True)
    assert (cfg.scorer, cfg.sparsifier, cfg.small_memory, cfg.zero_slot, cfg.truncation) == (
        "official", "official", "raw", True, "official")
    paper = SABCell.config_class()
    assert (paper.scorer, paper.sparsifier, paper.small_memory, paper.zero_slot, paper.truncation) == (
        "mlp", "paper", "softmax", False, "aligned")
    assert SABCell.config_class.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ConfigError, match="scorer='mlp' contradicts reproduce_released_code=true"):
        validate_component("cell", {"name": "sab", "reproduce_released_code": True, "scorer": "mlp"}, "cell",
                           get_registry())


def test_release_windows_and_first_step():
    """Official windows: detach before steps with (t+1) mod k_trunc == 0; the first read sees only the h_0
    slot and uses its raw score (times a zero memory: no summary)."""
    cell = sab(reproduce_released_code=True, k_trunc=4, k_att=2, k_top=2)
    assert [t for t in range(12) if cell.cuts_before(t)] == [3, 7, 11]
    aligned = sab(k_trunc=4)
    assert [t for t in range(12) if aligned.cuts_before(t)] == [4, 8]
    cell.record_trace = True
    y, _ = cell(torch.randn(2, 3, 3))
    assert cell.trace[0]["n"] == 1 and y[:, 0, 5:].abs().sum() == 0


# -- any cell: third-party inner cell, config-time errors -------------------------------------------------

class _ToyConfig(CellConfig):
    width: int = Field(4, ge=1, description="units")


class _ToyCell(StepCell):
    """A step cell whose output is a copy of its state's h, not the same object (state = (h, acc))."""

    config_class = _ToyConfig

    def __init__(self, input_size, config):
        super().__init__(input_size, config)
        self.lin = torch.nn.Linear(input_size + config.width, config.width)

    @property
    def output_size(self):
        return self.config.width

    def initial_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(batch_size, self.config.width, device=device, dtype=dtype or torch.float32)
        return (z, z.clone())

    def step(self, x_t, state, *, t=None):
        h, acc = state
        h = torch.tanh(self.lin(torch.cat([x_t, h], -1)) + 0.5 * acc)
        return h.clone(), (h, 0.9 * acc + 0.1 * h)


class _ThirdParty:
    @seqplat.hookimpl
    def register_cells(self, register):
        register("toy_step", _ToyCell)


def test_third_party_inner_cell(register_plugin):
    register_plugin(_ThirdParty(), "third_party_toys")
    spec = {"name": "sab", "inner": {"name": "toy_step", "width": 4}, "k_att": 1, "k_top": 2, "memory_size": 6}
    cell = check_cell(spec, time=12)
    gradcheck_cell({**spec, "k_trunc": None}, time=4)
    assert cell.output_size == 8
    explicit = check_cell({**spec, "hidden_state_index": 0}, time=6)
    assert explicit.config.hidden_state_index == 0
    with pytest.raises(ValueError, match="hidden_state_index=2 does not name"):
        build_cell({**spec, "hidden_state_index": 2}, 3)(torch.randn(2, 3, 3))


@pytest.mark.parametrize(("options", "message"), [
    ({"inner": {"name": "lstmm"}}, "Unknown cell 'lstmm'. Did you mean 'lstm'?"),
    ({"inner": {"name": "lstm", "hidden_size": 8}}, "inner.hidden_size: set the width with sab's hidden_size"),
    ({"inner": {"name": "lstm", "hiden": 8}}, "inner.hiden: unknown field"),
    ({"inner": {"name": "sab"}}, "cannot be unrolled one step at a time"),
    ({"sparsifier": "paper", "reproduce_released_code": True}, "sparsifier='paper' contradicts"),
    ({"k_att": 0}, "k_att: Input should be greater than or equal to 1"),
])
def test_bad_configs_fail_at_config_time(options, message):
    with pytest.raises(ConfigError) as info:
        validate_component("cell", {"name": "sab", **options}, "cell", get_registry())
    assert message in str(info.value)


def test_rows_at_different_stream_positions_are_refused():
    cell = sab()
    inner, memory, _ = cell.initial_state(2)
    with pytest.raises(ValueError, match="same step"):
        cell(torch.randn(2, 3, 3), (inner, memory, torch.tensor([0, 4])))


# -- 8: the copy data of the release's script (scalar digits) ------------------------------------------------

def test_copy_data_generator_matches_the_release_layout():
    T = 30
    task = build_task({"name": "copy_memory", "delay": T, "encoding": "scalar"})
    batch = task.train_batch(0, 16, seed=0)
    assert batch.inputs.shape == (16, T + 20, 1) and batch.targets.shape == (16, T + 20)
    digits = batch.inputs[:, :10, 0]
    assert ((digits >= 1) & (digits <= 8)).all()
    assert (batch.inputs[:, T + 9, 0] == 9).all()  # the marker, 0-based position T + 9
    rest = torch.cat([batch.inputs[:, 10 : T + 9, 0], batch.inputs[:, T + 10 :, 0]], 1)
    assert (rest == 0).all()
    assert (batch.targets[:, : T + 10] == 0).all()
    assert torch.equal(batch.targets[:, -10:].float(), digits)


# -- recipes, parameter counts, CLI, bench, docs ------------------------------------------------------------

def _lstm(inp: int, h: int) -> int:
    return 4 * h * (inp + h) + 8 * h


def _mlp(h: int, d: int) -> int:
    return 2 * h * d + 2 * d


@pytest.mark.parametrize(("recipe", "expected"), [
    # the release's copy model: LSTMCell(1, 128) + w_t (256) + Linear(256, classes); the release uses 10
    # classes (69,898), the task has 9 (the delimiter is never a target): 257 fewer
    ("copy_200_release", _lstm(1, 128) + 256 + 256 * 9 + 9),
    ("copy_100", _lstm(1, 128) + _mlp(128, 128) + 256 * 9 + 9),
    ("copy_300", _lstm(1, 128) + _mlp(128, 128) + 256 * 9 + 9),
    ("adding", _lstm(2, 128) + _mlp(128, 128) + 256 + 1),
    ("pmnist", _lstm(1, 128) + _mlp(128, 128) + 256 * 10 + 10),
    ("ptb_char", 50 * 128 + _lstm(128, 1000) + _mlp(1000, 1000) + 2000 * 50 + 50),
])
def test_paper_recipes_parameter_counts(recipe, expected):
    model = build_model(build_run_config(recipe=f"sab/{recipe}"))
    assert count_parameters(model) == expected
    if recipe == "copy_200_release":
        assert expected == 69_898 - 257


@pytest.mark.parametrize(("recipe", "baseline", "tolerance"), [
    ("protocol_copy_200", "baselines/copy_200", 0.05),
    ("adding_400", "baselines/adding_400", 0.05),
    ("ptb_char_1m", "baselines/ptb_char_1m", 0.05),
])
def test_protocol_recipes_match_the_lstm_budget(recipe, baseline, tolerance):
    ours = count_parameters(build_model(build_run_config(recipe=f"sab/{recipe}")))
    theirs = count_parameters(build_model(build_run_config(recipe=baseline)))
    assert abs(ours - theirs) / theirs <= tolerance, (ours, theirs)
    if recipe == "ptb_char_1m":
        assert abs(ours - 1_000_000) <= 100_000


@pytest.mark.parametrize("recipe", PAPER_RECIPES + PROTOCOL_RECIPES)
def test_every_recipe_resolves_and_builds(recipe):
    run = build_run_config(recipe=f"sab/{recipe}")
    cell = run.cell
    assert cell["name"] == "sab"
    steps_per_sequence = {"copy_memory": run.task.get("delay", 0) + 20, "adding": run.task.get("length", 0),
                          "psmnist": 784}.get(run.task["name"])
    if steps_per_sequence and cell["k_top"] > 0:  # the memory keeps every macro-state of a sequence
        assert cell["memory_size"] >= int(cell["zero_slot"]) + steps_per_sequence // cell["k_att"]


def test_default_recipe_trains_a_few_steps(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--recipe", "sab/default", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "train.max_eval_batches=1", "--set", "train.batch_size=8", "--set", "train.eval_batch_size=16",
        "--set", "task.valid_size=16", "--set", "task.test_size=16", "--set", "tracking.enabled=false",
        "--set", f"io.output_dir={tmp_path}", "--no-progress",
    ])
    assert result.exit_code == 0, result.output


def test_paper_recipe_runs_and_resumes(tmp_path):
    """A GPU-sized paper recipe builds, runs two steps on CPU and resumes to three."""
    from seqplat.core.train import train

    run = build_run_config(recipe="sab/copy_100", overrides=[
        "task.delay=10", "cell.memory_size=15", "train.steps=2", "train.batch_size=4", "train.eval_every=2",
        "train.checkpoint_every=2", "train.max_eval_batches=1", "train.eval_batch_size=8", "task.valid_size=8",
        "task.test_size=8", "tracking.enabled=false",
        f"io.run_dir={tmp_path / 'run'}",
    ])
    first = train(run, progress=False)
    assert first.steps == 2 and math.isfinite(first.valid_metrics["loss"])
    more = run.model_copy(update={"train": run.train.model_copy(update={"steps": 3})})
    resumed = train(more, resume=str(tmp_path / "run"), progress=False)
    assert resumed.steps == 3


@pytest.mark.parametrize("task", [
    "toy_stream",  # language-model stream: the carried (detached) state holds the memory and the step count
    "toy_parity",  # classification at the last step
    {"name": "adding", "length": 12, "valid_size": 8, "test_size": 8},  # regression at the last step
], ids=["stream", "last_step_class", "regression"])
def test_trains_on_every_kind_of_task(tiny_run, task):
    from seqplat.core.train import train

    result = train(tiny_run({"name": "sab", "hidden_size": 8, "k_att": 2, "k_top": 2, "k_trunc": 4,
                             "memory_size": 6}, task=task, steps=3), progress=False)
    assert math.isfinite(result.valid_metrics["loss"])


def test_step_cost_measurement_runs():
    rows = measure_step_cost(lengths=(20, 60), variants=("sab", "sab_reference", "lstm_fused"), batch=2,
                             hidden=8, input_size=2, repeats=1)
    assert len(rows) == 6 and all(r["ms_per_step"] > 0 for r in rows)
    saved = {(r["variant"], r["T"]): r["saved_mb"] for r in rows}
    assert saved[("sab", 60)] > saved[("sab", 20)] > 0
    assert saved[("sab", 60)] < saved[("sab_reference", 60)]  # the fast path saves no tanh activations
    assert "sab_reference" in format_rows(rows)


def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the docs page has no python snippet"
    exec(compile(blocks[0], str(DOCS), "exec"), {})  # noqa: S102 - our own docs


# -- 9: smoke run: SAB beats truncated BPTT with the same k_trunc on copy memory ----------------------------------

@pytest.mark.slow
def test_sab_beats_tbptt_with_the_same_windows(tmp_path):
    """sab/default (delay 20, k_trunc 5) for 400 steps: with attention the model starts copying (observed
    test copy accuracy 0.30, loss 0.44); with k_top = 0 it stays at chance (0.11, loss 0.54). The spec's
    T = 100 version (sab/copy_100 against k_top = 0 for a few epochs) is GPU-sized."""
    from seqplat.core.train import train

    def run(k_top: int) -> float:
        cfg = build_run_config(recipe="sab/default", overrides=[
            f"cell.k_top={k_top}", "train.steps=400", "tracking.enabled=false",
            f"io.output_dir={tmp_path / str(k_top)}",
        ])
        return train(cfg, progress=False).test_metrics["copy_accuracy"]

    assert run(5) > run(0) + 0.1
