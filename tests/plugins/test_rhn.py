"""Tests of the rhn plugin: RHN (Zilly et al.) and hyper-RHN (Suarez) cells, the last-5 task, recipes.

Each test names the spec item (``papers/rhn_hyper.md`` §4) it pins.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from seqplat import SequenceModel, Task, build_cell, build_model, build_run_config, count_parameters
from seqplat.core.errors import ConfigError
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "rhn.md"
RECIPES = ("default", "ptb_char", "ptb_char_hyper", "ptb_char_last5", "ptb_char_hyper_last5", "enwik8",
           "text8", "ptb_word", "ptb_char_1m", "ptb_char_1m_hyper", "copy_200")
needs_data = pytest.mark.data


def rhn(input_size: int = 3, **opts) -> nn.Module:
    return build_cell({"name": "rhn", "hidden_size": 4, "depth": 3, **opts}, input_size)


def hyper(input_size: int = 3, **opts) -> nn.Module:
    return build_cell({"name": "hyper_rhn", "hidden_size": 5, "hyper_size": 3, "depth": 2, **opts}, input_size)


def hand_rhn(cell, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Spec §1 written out independently: R1-R4 with separate H and T blocks (no dropout)."""
    n = cell.config.hidden_size
    w_h, w_t = cell.weight_ih[:n], cell.weight_ih[n:]
    b_in = cell.bias_ih if cell.bias_ih is not None else torch.zeros(2 * n)
    ys = []
    for t in range(x.shape[1]):
        for layer in range(cell.config.depth):
            r_h, r_t = cell.weight_hh[layer, :n], cell.weight_hh[layer, n:]
            b_h, b_t = cell.bias_hh[layer, :n], cell.bias_hh[layer, n:]
            in_h = x[:, t] @ w_h.T + b_in[:n] if layer == 0 else 0.0
            in_t = x[:, t] @ w_t.T + b_in[n:] if layer == 0 else 0.0
            h = torch.tanh(in_h + s @ r_h.T + b_h)
            g = torch.sigmoid(in_t + s @ r_t.T + b_t)
            s = h * g + s * (1 - g)
        ys.append(s)
    return torch.stack(ys, 1)


# -- registration and conformance ------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    info = reg.get_plugin("rhn")
    assert not info.broken, info.error
    assert {"rhn", "hyper_rhn"} <= set(info.registered["cell"])
    assert info.registered["task"] == ["ptb_char_last5"]
    assert info.registered["regularizer"] == ["rhn_token_dropout"]
    assert {f"rhn/{r}" for r in RECIPES} <= set(info.registered["recipe"])


CONFORMANCE = [
    {"name": "rhn", "hidden_size": 4, "depth": 3},
    {"name": "rhn", "hidden_size": 4, "depth": 2, "init": "orthogonal", "input_bias": True, "transform_bias": None,
     "gate_dropout": 0.3, "input_dropout": 0.2, "hidden_dropout": 0.2, "output_dropout": 0.2},
    {"name": "hyper_rhn", "hidden_size": 4, "hyper_size": 3, "depth": 2, "gate_dropout": 0.35},
    {"name": "hyper_rhn", "hidden_size": 4, "hyper_size": 2, "depth": 1, "init": "uniform", "transform_bias": -2.0,
     "projection_init": "identity"},
]


@pytest.mark.parametrize("spec", CONFORMANCE, ids=["rhn", "rhn-suarez-dropouts", "hyper_rhn", "hyper_rhn-identity"])
def test_conformance_and_gradcheck(spec):
    check_cell(spec)  # includes fast path == reference path on outputs and gradients (eval mode)
    gradcheck_cell(spec)  # float64, reference and fast path


@pytest.mark.parametrize("name", ["rhn", "hyper_rhn"])
def test_fast_path_matches_reference_in_training_mode_with_dropout(name):
    """Both paths draw the same masks in the same order, so even training-mode outputs and gradients agree."""
    opts = ({"input_dropout": 0.3, "hidden_dropout": 0.3, "output_dropout": 0.3, "gate_dropout": 0.3}
            if name == "rhn" else {"gate_dropout": 0.35})
    cell = rhn(**opts) if name == "rhn" else hyper(**opts)
    cell.train()
    x = torch.randn(3, 6, 3)
    results = []
    for fast in (False, True):
        cell.use_fast_path = fast
        cell.zero_grad()
        torch.manual_seed(7)
        y, state = cell(x)
        (y.square().sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))).backward()
        results.append((y.detach(), [p.grad.clone() for p in cell.parameters()]))
    (y_ref, g_ref), (y_fast, g_fast) = results
    assert (y_ref == 0).any(), "dropout should zero some outputs"
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["rhn", "hyper_rhn"])
def test_step_api_equals_forward(name):
    cell = (rhn() if name == "rhn" else hyper()).eval()
    x = torch.randn(2, 4, 3)
    y, state = cell(x)
    s = cell.initial_state(2)
    ys = []
    for x_t in x.unbind(1):
        y_t, s = cell.step(x_t, s)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y)


@pytest.mark.parametrize("task", ["toy_stream", "toy_parity"])
@pytest.mark.parametrize("cell", [{"name": "rhn", "hidden_size": 8, "depth": 2, "hidden_dropout": 0.2},
                                  {"name": "hyper_rhn", "hidden_size": 8, "hyper_size": 4, "depth": 2}],
                         ids=["rhn", "hyper_rhn"])
def test_cells_train_on_streams_and_last_step_classification(tiny_run, cell, task):
    """Carried state across chunks (LM stream) and a last-step head both train through the core loop."""
    from seqplat.core.train import train

    res = train(tiny_run(cell, task=task, steps=3), progress=False)
    assert res.steps == 3 and all(math.isfinite(v) for v in res.test_metrics.values())


@pytest.mark.parametrize("name", ["rhn", "hyper_rhn"])
def test_quantizer_roles_name_real_parameters(name):
    cell = rhn() if name == "rhn" else hyper()
    params = dict(cell.named_parameters())
    for role, names in type(cell).weight_roles.items():
        assert all(n in params for n in names), role
    cell.activation_quantizers["gate"] = lambda v: torch.zeros_like(v)  # gates shut: the state is carried
    s0 = cell.initial_state(2)
    y, _ = cell.eval()(torch.randn(2, 3, 3), s0)  # a quantizer forces the reference path
    last = s0 if name == "rhn" else s0[1]
    torch.testing.assert_close(y, last.unsqueeze(1).expand(-1, 3, -1))


# -- RHN (spec §1, §4) ----------------------------------------------------------------------------

def test_rhn_follows_equations_R1_to_R4():
    torch.manual_seed(0)
    for opts in ({}, {"input_bias": True, "init": "orthogonal", "transform_bias": None}):
        cell = rhn(**opts).eval()
        with torch.no_grad():
            cell.bias_hh.normal_()  # nonzero everywhere so every term matters
        x, s0 = torch.randn(2, 5, 3), torch.randn(2, 4)
        y, state = cell(x, s0)
        torch.testing.assert_close(y, hand_rhn(cell, x, s0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state, y[:, -1])


def test_rhn_shapes_layout_and_parameter_formula():
    """State (B, n); L micro-layers with their own R and b; only micro-layer 1 has input weights."""
    d, n, depth = 7, 6, 4
    cell = build_cell({"name": "rhn", "hidden_size": n, "depth": depth}, d)
    y, state = cell(torch.randn(2, 3, d))
    assert state.shape == (2, n) and y.shape == (2, 3, n)
    shapes = {k: tuple(v.shape) for k, v in cell.named_parameters()}
    assert shapes == {"weight_ih": (2 * n, d), "weight_hh": (depth, 2 * n, n), "bias_hh": (depth, 2 * n)}
    formula = 2 * ((d + n) * n + n) + 2 * (depth - 1) * (n * n + n)  # spec §1 (cell part)
    assert sum(p.numel() for p in cell.parameters()) == formula


def test_only_first_micro_layer_reads_the_input():
    """Close micro-layer 1 (t^1 = 0, so s^1 = s^0): then nothing of x_t may reach the output."""
    cell = rhn(depth=2).eval()
    with torch.no_grad():
        cell.bias_hh[0, 4:] = -1e4
    s0 = torch.randn(2, 4)
    y1, _ = cell(torch.randn(2, 4, 3), s0)
    y2, _ = cell(torch.randn(2, 4, 3), s0)
    assert torch.equal(y1, y2)
    with torch.no_grad():
        cell.bias_hh[0, 4:] = 0.0
    assert not torch.equal(cell(torch.randn(2, 4, 3), s0)[0], y1)


@pytest.mark.parametrize("bias", [-2.0, -4.0])
def test_transform_bias_init_and_carry_biased_start(bias):
    cell = rhn(transform_bias=bias, depth=3)
    n = 4
    assert torch.equal(cell.bias_hh[:, n:], torch.full((3, n), bias))  # every b_T^l exactly
    with torch.no_grad():
        cell.weight_ih.zero_()
        cell.weight_hh.zero_()
    cell.eval()
    s0 = torch.randn(2, n)
    b_h = cell.bias_hh[:, :n].detach()
    _, s = cell(torch.randn(2, 1, 3), s0)
    g = 1 / (1 + math.exp(-bias))  # sigma(-2) = 0.119
    expected = s0
    for layer in range(3):
        expected = (1 - g) * expected + g * torch.tanh(b_h[layer])
    torch.testing.assert_close(s, expected)
    if bias == -2.0:
        assert abs(g - 0.119) < 1e-3


def test_suarez_init_has_no_transform_bias_and_orthogonal_weights():
    cell = build_cell({"name": "rhn", "hidden_size": 6, "depth": 2, "init": "orthogonal", "transform_bias": "none",
                       "input_bias": True}, 4)
    for w in cell.weight_hh:  # [2n, n]: orthonormal columns
        torch.testing.assert_close(w.T @ w, torch.eye(6), atol=1e-5, rtol=0)
    assert cell.bias_hh.abs().max() <= 1 / math.sqrt(6)  # PyTorch's default bias range, no -2
    assert cell.bias_ih.abs().max() <= 1 / math.sqrt(4)


def test_coupling_limits_identity_and_tanh_rnn():
    x, s0 = torch.randn(2, 5, 3), torch.randn(2, 4)
    closed = rhn(transform_bias=-1e4).eval()  # t -> 0, c = 1 - t -> 1: the state is carried unchanged
    with torch.no_grad():
        closed.weight_hh.mul_(0.01)
        closed.weight_ih.mul_(0.01)
    y, s = closed(x, s0)
    torch.testing.assert_close(s, s0, atol=0, rtol=0)
    torch.testing.assert_close(y, s0.unsqueeze(1).expand(-1, 5, -1), atol=0, rtol=0)

    open_ = rhn(transform_bias=1e4, depth=3).eval()  # t -> 1, c -> 0: a depth-3 tanh RNN
    with torch.no_grad():
        open_.weight_hh[:, 4:].mul_(0.01)
        open_.weight_ih[4:].mul_(0.01)
    y, _ = open_(x, s0)
    s, ys = s0, []
    for t in range(5):
        for layer in range(3):
            inp = x[:, t] @ open_.weight_ih[:4].T if layer == 0 else 0.0
            s = torch.tanh(inp + s @ open_.weight_hh[layer, :4].T + open_.bias_hh[layer, :4])
        ys.append(s)
    torch.testing.assert_close(y, torch.stack(ys, 1))


def test_depth_one_rhn_is_a_gru_without_reset_gate():
    cell = rhn(depth=1, transform_bias=0.3).eval()
    with torch.no_grad():
        cell.bias_hh.normal_()
    x, h = torch.randn(2, 6, 3), torch.randn(2, 4)
    y, _ = cell(x, h)
    w, r, b = cell.weight_ih.detach(), cell.weight_hh[0].detach(), cell.bias_hh[0].detach()
    outs = []
    for t in range(6):  # GRU with r = 1: z = update gate, n = candidate
        z = torch.sigmoid(x[:, t] @ w[4:].T + h @ r[4:].T + b[4:])
        cand = torch.tanh(x[:, t] @ w[:4].T + h @ r[:4].T + b[:4])
        h = (1 - z) * h + z * cand
        outs.append(h)
    torch.testing.assert_close(y, torch.stack(outs, 1))


def _recurrent_input_patterns(monkeypatch, cell, x, s0):
    """Zero patterns of every ``s^{l-1}`` the reference path feeds to a recurrent matrix."""
    patterns = []
    linear = F.linear

    def spy(inp, weight, bias=None):
        if weight.dim() == 2 and weight.shape[1] == cell.config.hidden_size and weight.shape[0] == 2 * weight.shape[1]:
            patterns.append(inp == 0)
        return linear(inp, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    cell.use_fast_path = False
    try:
        cell(x, s0)
    finally:
        monkeypatch.setattr(F, "linear", linear)
        cell.use_fast_path = True
    return patterns


def test_variational_hidden_mask_shared_over_time_and_depth_new_per_segment(monkeypatch):
    cell = rhn(hidden_size=16, depth=3, hidden_dropout=0.5, input_size=2)
    x, s0 = torch.randn(4, 5, 2), torch.randn(4, 16)
    cell.train()
    first = _recurrent_input_patterns(monkeypatch, cell, x, s0)
    assert len(first) == 5 * 3  # every step, every micro-layer
    assert first[0].any() and not first[0].all()
    for p in first[1:]:
        assert torch.equal(p, first[0])  # same mask at every time step and micro-layer
    assert not all(torch.equal(first[0][i], first[0][0]) for i in range(4))  # per sequence in the batch
    second = _recurrent_input_patterns(monkeypatch, cell, x, s0)
    assert not torch.equal(second[0], first[0])  # a new segment draws new masks
    cell.eval()
    assert not any(p.any() for p in _recurrent_input_patterns(monkeypatch, cell, x, s0))  # all ones in eval


def test_variational_input_and_output_masks_shared_over_time():
    cell = rhn(input_size=6, hidden_size=6, depth=1, transform_bias=1e4, input_dropout=0.5, output_dropout=0.5)
    with torch.no_grad():  # s_t = tanh(W_H (m_i * x_t)) with W_H = I and x_t = 1: reveals m_i directly
        cell.weight_hh.zero_()
        cell.bias_hh[:, :6].zero_()
        cell.weight_ih[:6] = torch.eye(6)
    x = torch.ones(8, 5, 6)
    cell.train()
    y, s = cell(x)
    # input and output masks identical at every step (to an ulp: the C++ loop's vectorised sigmoid(1e4) is
    # 1 - 2^-24, not 1, so s_1 = t h differs from s_2 = s_1 + t (h - s_1) in the last bit)
    torch.testing.assert_close(y, y[:, :1].expand_as(y), atol=1e-6, rtol=0)
    assert (y == 0).any() and (y != 0).any()
    y2, _ = cell(x)
    assert not torch.equal(y2, y)
    # the state is not masked by noise_o: s is tanh(0) or tanh(2) per unit, never scaled by 2
    zero, on = s.abs() < 1e-6, (s - math.tanh(2.0)).abs() < 1e-6
    assert bool((zero | on).all())
    ratio = y[:, -1][on] / s[on]  # y = s * m_o with m_o in {0, 2}
    assert bool(((ratio - 0).abs() < 1e-6).logical_or((ratio - 2).abs() < 1e-6).all())
    cell.eval()
    y3, _ = cell(x)
    torch.testing.assert_close(y3, torch.full_like(y3, math.tanh(1.0)))


def test_weight_tying_is_the_same_tensor_and_count_matches_ptb_word():
    """Zilly's PTB-word model: tied softmax (only a softmax bias kept), 23,482,400 parameters."""
    run = build_run_config(recipe="rhn/ptb_word")
    assert run.model.tie_weights and run.model.embedding_size == run.cell["hidden_size"] == 830
    model = build_model(run)
    assert model.head.weight is model.encoder.weight
    assert count_parameters(model) == 23_482_400


def test_token_dropout_is_zillys_noise_x():
    """noise_x: one keep/drop decision per (row, token type) per segment, whole embeddings, eval no-op."""
    run = build_run_config(recipe="rhn/ptb_word", overrides=["cell.hidden_size=6", "model.embedding_size=6",
                                                               "cell.depth=1"])
    assert run.regularizers == [{"name": "rhn_token_dropout", "p": 0.25}]
    model = build_model(run)
    ids = torch.tensor([[5, 7, 5, 9, 7, 5] * 4, [5, 5, 5, 5, 8, 8] * 4])
    model.train()
    emb = model.encoder(ids)
    plain = model.encoder.weight[ids]
    scale = (emb / plain)[..., 0]
    assert bool(((scale.abs() < 1e-6) | ((scale - 1 / 0.75).abs() < 1e-5)).all())  # whole vectors, inverted
    torch.testing.assert_close(emb, plain * scale.unsqueeze(-1))
    for row in range(2):
        for tok in ids[row].unique():
            vals = scale[row][ids[row] == tok]
            assert torch.equal(vals, vals[:1].expand_as(vals))  # a repeated token reuses its decision
    model.eval()
    torch.testing.assert_close(model.encoder(ids), plain)


def test_token_dropout_needs_token_inputs():
    with pytest.raises(ConfigError, match="rhn_token_dropout needs a token task"):
        build_model(build_run_config(recipe="rhn/default", overrides=["regularizers=[{name: rhn_token_dropout}]"]))


# -- hyper-RHN (spec §3, §4) --------------------------------------------------------------------------

def hand_hyper(cell, x: torch.Tensor, sh: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Spec §3 H1-H3 written out independently (no dropout)."""
    m, n, depth = cell.config.hyper_size, cell.config.hidden_size, cell.config.depth

    def hw(u, prev, k):
        h, g = torch.tanh(u[:, :k]), torch.sigmoid(u[:, k:])
        return h * g + prev * (1 - g)

    ys = []
    for t in range(x.shape[1]):
        zs = []
        for layer in range(depth):
            u = sh @ cell.hyper_weight_hh[layer].T + cell.hyper_bias_hh[layer]
            if layer == 0:
                u = u + x[:, t] @ cell.hyper_weight_ih.T + cell.hyper_bias_ih
            sh = hw(u, sh, m)
            zs.append(sh @ cell.proj_weight[layer].T + cell.proj_bias[layer])
        for layer in range(depth):
            z = zs[layer]
            rec = s @ cell.weight_hh[layer].T
            u_h = z * rec[:, :n] + cell.bias_hh[layer, :n]
            u_t = z * rec[:, n:] + cell.bias_hh[layer, n:]
            if layer == 0:
                inp = x[:, t] @ cell.weight_ih.T
                u_h = u_h + z * inp[:, :n] + cell.bias_ih[:n]
                u_t = u_t + z * inp[:, n:] + cell.bias_ih[n:]
            s = hw(torch.cat([u_h, u_t], 1), s, n)
        ys.append(s)
    return torch.stack(ys, 1)


def test_hyper_rhn_follows_equations_H1_to_H3():
    """z^l from the hyper layer of the same depth and step; the same z scales the H and T halves."""
    torch.manual_seed(1)
    cell = hyper(depth=3).eval()
    x, sh, s = torch.randn(2, 4, 3), torch.randn(2, 3), torch.randn(2, 5)
    y, (sh_out, s_out) = cell(x, (sh, s))
    torch.testing.assert_close(y, hand_hyper(cell, x, sh, s), atol=1e-6, rtol=1e-5)
    assert sh_out.shape == (2, 3) and torch.equal(s_out, y[:, -1])


def _copy_main_weights(h, plain, kappa: float = 1.0):
    with torch.no_grad():
        plain.weight_ih.copy_(kappa * h.weight_ih)
        plain.bias_ih.copy_(h.bias_ih)
        plain.weight_hh.copy_(kappa * h.weight_hh)
        plain.bias_hh.copy_(h.bias_hh)


@pytest.mark.parametrize("kappa", [1.0, 0.3, 2.5])
def test_hyper_rhn_with_constant_scales_is_a_plain_rhn(kappa):
    """Key reduction: P_l = 0, p_l = kappa * 1 scales the input and recurrent contributions by kappa,
    never the biases; kappa = 1 gives exactly a plain RHN with the same weights."""
    h = hyper(depth=3).eval()
    with torch.no_grad():
        h.proj_weight.zero_()
        h.proj_bias.fill_(kappa)
        h.bias_hh.normal_()
        h.bias_ih.normal_()
    plain = build_cell({"name": "rhn", "hidden_size": 5, "depth": 3, "input_bias": True}, 3).eval()
    _copy_main_weights(h, plain, kappa)
    x, s = torch.randn(2, 6, 3), torch.randn(2, 5)
    y_h, (_, s_h) = h(x, (torch.randn(2, 3), s))
    y_p, s_p = plain(x, s)
    torch.testing.assert_close(y_h, y_p)
    torch.testing.assert_close(s_h, s_p)


def test_identity_projection_init_starts_as_plain_rhn():
    h = hyper(projection_init="identity")
    assert torch.equal(h.proj_weight, torch.zeros_like(h.proj_weight))
    assert torch.equal(h.proj_bias, torch.ones_like(h.proj_bias))
    z = h.scales(torch.randn(2, 4, 3))
    assert torch.equal(z, torch.ones(2, 4, 2, 5))


def test_hyper_scales_have_width_n_one_projection_per_depth():
    h = build_cell({"name": "hyper_rhn", "hidden_size": 7, "hyper_size": 3, "depth": 4}, 2)
    assert tuple(h.proj_weight.shape) == (4, 7, 3) and tuple(h.proj_bias.shape) == (4, 7)
    z = h.scales(torch.randn(2, 5, 2))
    assert z.shape == (2, 5, 4, 7)
    assert not torch.allclose(z[:, 1:], z[:, :1].expand(-1, 4, -1, -1))  # per step
    assert not torch.allclose(z[:, :, 1:], z[:, :, :1].expand(-1, -1, 3, -1))  # per depth


def test_hyper_rhn_default_init_follows_suarez():
    h = build_cell({"name": "hyper_rhn", "hidden_size": 8, "hyper_size": 4, "depth": 2}, 3)
    for w in list(h.weight_hh) + list(h.hyper_weight_hh) + list(h.proj_weight):
        k = min(w.shape)
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        torch.testing.assert_close(gram, torch.eye(k), atol=1e-5, rtol=0)
    assert h.bias_hh.abs().max() <= 1 / math.sqrt(8) and h.hyper_bias_hh.abs().max() <= 1 / math.sqrt(4)
    assert h.proj_bias.abs().max() <= 1 / math.sqrt(4)
    assert h.config.transform_bias is None and h.config.gate_dropout == 0.0


def test_gate_dropout_acts_on_t_only_after_carry_is_computed():
    from seqplat.plugins.rhn.common import highway

    n = 3
    u, s = torch.randn(2, 2 * n), torch.randn(2, n)
    h, t = torch.tanh(u[:, :n]), torch.sigmoid(u[:, n:])
    torch.testing.assert_close(highway(u, s, torch.zeros(2, n)), s * (1 - t))  # t' = 0 but c = 1 - t kept
    torch.testing.assert_close(highway(u, s, torch.full((2, n), 2.0)), 2 * h * t + s * (1 - t))
    torch.testing.assert_close(highway(u, s), h * t + s * (1 - t))


@pytest.mark.parametrize("name", ["rhn", "hyper_rhn"])
def test_gate_dropout_train_is_random_eval_is_deterministic(name):
    cell = rhn(gate_dropout=0.35) if name == "rhn" else hyper(gate_dropout=0.35)
    x = torch.randn(2, 5, 3)
    cell.train()
    assert not torch.equal(cell(x)[0], cell(x)[0])
    cell.eval()
    assert torch.equal(cell(x)[0], cell(x)[0])


# -- parameter counts of the paper recipes -----------------------------------------------------------

@pytest.mark.parametrize(("recipe", "expected"), [("rhn/ptb_char", 14_121_400), ("rhn/ptb_char_hyper", 15_262_736),
                                                  ("rhn/text8", 45_152_256)])
def test_paper_recipe_parameter_counts(recipe, expected):
    """Exact (tolerance 0): Suarez's RHN and HRHN (spec §3 formulas), Zilly's text8 large model (45M)."""
    assert count_parameters(build_model(build_run_config(recipe=recipe))) == expected


class _Vocab205(Task):
    """The full enwik8 file has 205 distinct bytes; the shared copy is a prefix with fewer."""

    head_kind = "per_step"

    @property
    def vocab_size(self) -> int:
        return 205

    @property
    def num_outputs(self) -> int:
        return 205


def test_enwik8_recipe_parameter_count_with_the_canonical_vocabulary():
    run = build_run_config(recipe="rhn/enwik8")
    model = SequenceModel(_Vocab205(None), run.cell, run.model)
    assert count_parameters(model) == 45_994_730  # exact; rhn.py and the README's 46M


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_validates(recipe):
    run = build_run_config(recipe=f"rhn/{recipe}")
    assert run.cell["name"] in ("rhn", "hyper_rhn") and run.description


def test_protocol_recipes_fit_their_budgets():
    for recipe, lo, hi in (("rhn/ptb_char_1m", 0.9e6, 1.1e6), ("rhn/ptb_char_1m_hyper", 0.9e6, 1.1e6),
                           ("rhn/copy_200", 60e3, 80e3)):
        n = count_parameters(build_model(build_run_config(recipe=recipe)))
        assert lo <= n <= hi, (recipe, n)


# -- the last-5 task (spec §3 "Evaluation protocol") ------------------------------------------------------

def _last5(seqplat_registry, **opts):
    from seqplat import build_task

    return build_task({"name": "ptb_char_last5", "base_task": "toy_stream", **opts})


def test_last5_rows_masks_and_metric_name(seqplat_registry):
    task = _last5(seqplat_registry)
    data = task.base.split("test")
    rows = task.eval_rows("test")
    assert rows.shape == (data.numel() // 51 - 1, 101)
    assert torch.equal(rows[3], data[153:254])  # block 3 (51 symbols) + the first 50 of block 4
    batches = list(task.eval_batches("test", 8))
    assert all(b.inputs.shape == (8, 100) for b in batches)  # incomplete batch dropped
    assert len(batches) == rows.shape[0] // 8
    mask = batches[0].mask
    assert mask[:, :95].sum() == 0 and bool((mask[:, 95:] == 1).all())  # only the last 5 scored
    vmask = next(iter(task.eval_batches("valid", 8))).mask
    assert vmask[0].sum() == 50 and vmask[0, 50:].sum() == 50
    assert task.stream is False and task.primary_metric == "bpc_last_k"
    metrics = task.finalize({"loss_sum": torch.tensor(10.0), "count": torch.tensor(10.0),
                             "confusion": torch.eye(8)})
    assert "bpc" not in metrics and metrics["bpc_last_k"] == pytest.approx(1 / math.log(2))


def test_last5_training_windows_are_random_and_reproducible(seqplat_registry):
    task = _last5(seqplat_registry)
    a, b = task.train_batch(3, 4, seed=0), task.train_batch(3, 4, seed=0)
    assert torch.equal(a.inputs, b.inputs) and a.mask is None and a.inputs.shape == (4, 100)
    assert torch.equal(a.targets[:, :-1], a.inputs[:, 1:])
    assert not torch.equal(task.train_batch(4, 4, seed=0).inputs, a.inputs)
    data = task.base.split("train")
    start = int((data.unfold(0, 101, 1) == torch.cat([a.inputs[0], a.targets[0, -1:]])).all(1).nonzero()[0])
    assert torch.equal(data[start : start + 100], a.inputs[0])
    assert task.steps_per_epoch(200) == max(1, data.numel() // 101 // 200)


def test_last5_config_errors_at_config_time(seqplat_registry):
    with pytest.raises(ConfigError, match="eval_stride"):
        build_run_config(overrides=["cell.name=rhn", "task.name=ptb_char_last5", "task.eval_stride=20"])
    with pytest.raises(ConfigError, match="test_score_last"):
        build_run_config(overrides=["cell.name=rhn", "task.name=ptb_char_last5", "task.test_score_last=500"])
    with pytest.raises(ConfigError, match="task.base_task: .*not a language-model task"):
        build_run_config(overrides=["cell.name=rhn", "task.name=ptb_char_last5", "task.base_task=toy_parity"])
    with pytest.raises(ConfigError, match="Unknown task 'ptb_chr'"):
        build_run_config(overrides=["cell.name=rhn", "task.name=ptb_char_last5", "task.base_task=ptb_chr"])


def test_last5_trains_and_scores_with_the_trainer(tiny_run):
    from seqplat.core.train import train

    run = tiny_run({"name": "hyper_rhn", "hidden_size": 8, "hyper_size": 4, "depth": 2, "gate_dropout": 0.35},
                   task={"name": "ptb_char_last5", "base_task": "toy_stream", "window": 20, "eval_stride": 11,
                         "valid_score_last": 10, "test_score_last": 5}, steps=3)
    res = train(run, progress=False)
    assert set(res.test_metrics) >= {"bpc_last_k", "loss", "accuracy"} and "bpc" not in res.test_metrics
    assert math.isfinite(res.test_metrics["bpc_last_k"])


@needs_data
def test_last5_on_real_ptb_characters():
    from seqplat import build_task

    task = build_task({"name": "ptb_char_last5"})
    assert task.vocab_size == 50
    test = task.base.split("test")
    assert task.eval_rows("test").shape == (test.numel() // 51 - 1, 101)
    assert sum(1 for _ in task.eval_batches("test", 200)) == (test.numel() // 51 - 1) // 200


# -- recipes run, resume and the CLI -------------------------------------------------------------------

def test_default_recipe_runs_from_the_cli(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--recipe", "rhn/default", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "task.valid_size=16", "--set", "task.test_size=16", "--set", "tracking.enabled=false",
        "--set", f"io.output_dir={tmp_path}",
    ])
    assert result.exit_code == 0, result.output


@needs_data
@pytest.mark.parametrize("recipe", ["rhn/ptb_char", "rhn/ptb_char_hyper", "rhn/ptb_char_last5"])
def test_paper_recipes_run_and_resume_on_cpu_at_toy_size(recipe, tmp_path):
    """The paper recipes (GPU-sized) run two steps and resume, with the cell shrunk for the CPU."""
    from seqplat.core.train import train

    shrink = ["cell.hidden_size=8", "cell.depth=2", "train.batch_size=4", "train.eval_batch_size=4",
              "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1", "tracking.enabled=false",
              f"io.run_dir={tmp_path / 'run'}"]
    shrink += (["task.window=20", "task.eval_stride=11", "task.valid_score_last=10", "task.test_score_last=5",
                "task.max_eval_rows=8"] if recipe.endswith("last5") else ["task.bptt=10", "task.max_eval_tokens=80"])
    if "hyper" in recipe:
        shrink.append("cell.hyper_size=4")
    run = build_run_config(recipe=recipe, overrides=[*shrink, "train.steps=2"])
    assert train(run, progress=False).steps == 2
    longer = run.model_copy(update={"train": run.train.model_copy(update={"steps": 4})})
    assert train(longer, resume=str(tmp_path / "run"), progress=False).steps == 4


# -- docs ------------------------------------------------------------------------------------------

def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/plugins/rhn.md has no python block"
    exec(compile(blocks[0], str(DOCS), "exec"), {})
