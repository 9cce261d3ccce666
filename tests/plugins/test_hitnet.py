"""Tests of the hitnet plugin: HitNet's hybrid ternary quantizer and its baselines, export, recipes.

Items of the spec's list (``papers/hitnet.md`` §6) are named in the test docstrings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import Field
from torch import nn

import seqplat
from seqplat import CellConfig, ConfigError, StepCell, build_cell, build_model, build_run_config, count_parameters
from seqplat.core.errors import CheckpointError
from seqplat.plugins.hitnet import (
    BinaryQuantizer,
    HitNetQuantizer,
    TernaryQuantizer,
    UniformQuantizer,
    load_export,
    size_report,
    size_summary,
)
from seqplat.plugins.hitnet.config import HitNetConfig, QuantizeConfig, TernaryConfig
from seqplat.plugins.hitnet.functions import (
    bernoulli_ternary,
    codebook,
    direct_weights,
    lookup,
    pack_codes,
    packed_bytes,
    ste,
    twn_statistics,
    unpack_codes,
    weight_codes,
)
from seqplat.plugins.hitnet.quantizer import ActivationQuantizer, Slope, WeightQuantizer, quantized_weights
from seqplat.registry import get_registry
from seqplat.testing import check_cell, gradcheck_cell, run_cell

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "hitnet.md"
RECIPES = ("default", "ptb_word_lstm", "ptb_word_lstm_fp", "ptb_word_gru", "ptb_word_gru_fp", "ptb_word_ternary",
           "ptb_word_ternary_fp")
QUANTIZERS = {"hitnet": HitNetQuantizer, "ternary": TernaryQuantizer, "uniform": UniformQuantizer,
              "binary": BinaryQuantizer}
needs_data = pytest.mark.data


def quantized_cell(name: str = "lstm", hidden: int = 6, input_size: int = 3, seed: int = 0, **opts) -> nn.Module:
    """A baseline cell with the hitnet quantizer (``opts`` override HitNetConfig)."""
    torch.manual_seed(seed)
    cell = build_cell({"name": name, "hidden_size": hidden}, input_size)
    HitNetQuantizer(HitNetConfig(**opts)).apply(cell)
    return cell


def latent(module: nn.Module, attr: str) -> torch.Tensor:
    return module.parametrizations[attr].original


# -- registration ----------------------------------------------------------------------------------

def test_plugin_is_installed():
    reg = get_registry()
    assert reg.plugins["hitnet"].error is None
    for name, cls in QUANTIZERS.items():
        assert reg.get("quantizer", name).obj is cls
        assert reg.plugin_of("quantizer", name) == "hitnet"
    for recipe in RECIPES:
        assert f"hitnet/{recipe}" in reg.names("recipe")
    from seqplat.cli import main

    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0, result.output
    assert "RUN_OR_CHECKPOINT" in result.output


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_baseline_cells_with_preact_roles_still_conform(name):
    """The pre-activation roles added to the baselines change nothing without a quantizer."""
    check_cell({"name": name, "hidden_size": 4})
    gradcheck_cell({"name": name, "hidden_size": 3})


# -- spec §6.1-2: threshold ternary weights -------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_quantized_weights_take_exactly_three_values_per_tensor(name):
    """§6.1: unique(W_q) = {-alpha, 0, +alpha}, alpha > 0; Delta and alpha follow the FP weights every call."""
    cell = quantized_cell(name, hidden=16)
    for attr in ("weight_ih_l0", "weight_hh_l0"):
        w, wq = latent(cell.rnn, attr), getattr(cell.rnn, attr)
        values = torch.unique(wq.detach())
        assert values.numel() == 3
        alpha = float(values[-1])
        assert alpha > 0 and values.tolist() == [-alpha, 0.0, alpha]
        a = w.detach().abs()
        keep = a > 0.7 * a.mean()
        assert alpha == pytest.approx(float(a[keep].mean()), rel=1e-6)
        with torch.no_grad():
            w.mul_(3.0)  # the FP master changes: Delta and alpha are recomputed
        assert float(torch.unique(getattr(cell.rnn, attr).detach())[-1]) == pytest.approx(3 * alpha, rel=1e-6)


def test_twn_statistics_of_a_gaussian():
    """§6.2: for W ~ N(0, sigma^2), Delta = 0.558 sigma, zero fraction 0.424, alpha = 1.184 sigma."""
    sigma = 0.37
    w = torch.randn(1, 1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
    codes, scales = weight_codes("ternary", w)
    delta = 0.7 * float(w.abs().mean())
    assert delta / sigma == pytest.approx(0.558, abs=2e-3)
    assert float((codes == 0).double().mean()) == pytest.approx(0.424, abs=2e-3)
    assert float(scales[0, 0]) / sigma == pytest.approx(1.184, abs=3e-3)
    closed = twn_statistics(sigma)
    assert closed["delta"] / sigma == pytest.approx(0.5585, abs=1e-4)
    assert closed["zero_fraction"] == pytest.approx(0.4236, abs=1e-4)
    assert closed["alpha"] / sigma == pytest.approx(1.1842, abs=1e-4)


def test_gate_granularity_and_unscaled_ternary():
    """Options: one (Delta, alpha) per gate block; scale=none gives pure {-1, 0, 1}."""
    cell = quantized_cell("lstm", hidden=8, granularity="gate", activations="none", slope=1.0)
    wq = cell.rnn.weight_hh_l0.detach()
    for block in wq.view(4, -1):
        assert torch.unique(block).numel() == 3
    assert torch.unique(wq).numel() == 1 + 2 * 4
    cell = quantized_cell("gru", hidden=8, scale="none", activations="none", slope=1.0)
    assert torch.unique(cell.rnn.weight_ih_l0.detach()).tolist() == [-1.0, 0.0, 1.0]


# -- spec §6.3: Bernoulli ternary activations --------------------------------------------------------

def test_bernoulli_ternary_values_mean_and_variance():
    """§6.3: values in {-1,0,1} ({0,1} on [0,1]); mean -> x, variance -> |x| - x^2; exact at -1, 0, 1."""
    g = torch.Generator().manual_seed(0)
    for x0, mean, var in ((0.3, 0.3, 0.21), (-0.6, -0.6, 0.24)):
        q = bernoulli_ternary(torch.full((1_000_000,), x0), g)
        assert float(q.mean()) == pytest.approx(mean, abs=3e-3)
        assert float(q.var()) == pytest.approx(var, abs=3e-3)
    x = torch.rand(10_000, generator=g) * 2 - 1
    assert set(torch.unique(bernoulli_ternary(x, g)).tolist()) == {-1.0, 0.0, 1.0}
    assert set(torch.unique(bernoulli_ternary(x.abs(), g)).tolist()) == {0.0, 1.0}
    edges = torch.tensor([-1.0, 0.0, 1.0]).repeat(1000)
    assert torch.equal(bernoulli_ternary(edges, g), edges)


# -- spec §6.4: straight-through gradients ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["ternary", "bernoulli", "uniform", "binary"])
def test_weight_ste_passes_the_gradient_unchanged(method):
    """§6.4: d/dW sum(Q(W) * g) = g for every weight quantizer (Delta, alpha are constants)."""
    w = torch.randn(12, 5, requires_grad=True)
    g = torch.randn(12, 5)
    wq = WeightQuantizer(QuantizeConfig(weights=method, activations="none"), w, blocks=1)
    (wq(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("method", ["ternary", "binary"])
@pytest.mark.parametrize("use_scale", [True, False])
def test_direct_weights_equal_the_codes_and_codebook(method, use_scale):
    """The training path's closed form gives W_q value for value as the export's codes do, zero blocks included."""
    w = torch.randn(4, 30)
    w[2] = 0.0  # an all-zero block: no weight above Delta = 0
    w[3, :5] = 0.0
    codes, scales = weight_codes(method, w, use_scale=use_scale)
    expected = lookup(codebook(method, scales, 2), codes)
    got = direct_weights(method, w, use_scale=use_scale)
    assert torch.equal(got, expected)
    assert direct_weights("uniform", w) is None and direct_weights("bernoulli", w) is None


def test_ste_gives_the_quantized_values_own_graph_its_gradient():
    """Trained scales learn through ``quantized``; the latent gets ``grad_scale * grad``; double backward works."""
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = ste(scale * torch.sign(w.detach()), w, grad_scale=3.0)
    assert torch.equal(out.detach(), 0.5 * torch.sign(w.detach()))
    g = torch.randn(6, dtype=torch.float64)
    (gw,) = torch.autograd.grad((out * out * g).sum(), w, create_graph=True)
    torch.testing.assert_close(gw, 3.0 * 2 * out.detach() * g)
    (gs,) = torch.autograd.grad(gw.sum(), scale)
    torch.testing.assert_close(gs, (6.0 * torch.sign(w.detach()) * g).sum())


def test_weight_ste_clip_and_trained_ternary_gradients():
    """Options: ste_clip zeroes the gradient where |W| > clip; trained_ternary scales it by w_p / 1 / w_n
    and gives the scales the sums of their regions' gradients (Zhu et al.)."""
    w = (torch.randn(8, 6) * 2).requires_grad_(True)
    g = torch.randn(8, 6)
    wq = WeightQuantizer(QuantizeConfig(weights="ternary", activations="none", ste_clip=1.0), w, blocks=1)
    (wq(w) * g).sum().backward()
    assert torch.equal(w.grad, g * (w.detach().abs() <= 1.0))
    w.grad = None
    wq = WeightQuantizer(QuantizeConfig(weights="trained_ternary", activations="none"), w, blocks=1)
    with torch.no_grad():
        wq.scales.copy_(torch.tensor([[0.7, 0.4]]))
    out = wq(w)
    torch.testing.assert_close(torch.unique(out.detach()), torch.tensor([-0.4, 0.0, 0.7]))
    (out * g).sum().backward()
    pos = out.detach() > 0
    neg = out.detach() < 0
    expected = g * torch.where(pos, 0.7, torch.where(neg, 0.4, 1.0))
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(wq.scales.grad, torch.tensor([[g[pos].sum(), -g[neg].sum()]]))


@pytest.mark.parametrize("method", ["bernoulli", "ternary", "uniform", "binary"])
def test_activation_ste_and_sloping_factor_gradient(method):
    """§6.4: d/dx sum(Q_a(x) * g) = g; the backward through sigma(lambda z) carries lambda."""
    q = ActivationQuantizer(QuantizeConfig(activations=method), signed=True, seed=0)
    x = (torch.rand(50) * 2 - 1).requires_grad_(True)
    g = torch.randn(50)
    (q(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    z = torch.randn(40, dtype=torch.float64, requires_grad=True)
    lam = 2.5
    torch.sigmoid(Slope(lam)(z)).sum().backward()
    s = torch.sigmoid(lam * z.detach())
    torch.testing.assert_close(z.grad, lam * s * (1 - s))


# -- spec §6.5: ternary state ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_hidden_state_is_ternary_and_cell_state_integer(name):
    """§6.5: every h_t in {-1,0,1}; the LSTM's c_t is integer-valued with |c_t| <= t (c_0 = 0)."""
    cell = quantized_cell(name, hidden=8).train()
    x = torch.randn(5, 12, 3) * 3
    state = cell.initial_state(5)
    seen = set()
    for t, x_t in enumerate(x.unbind(1), start=1):
        y, state = cell.step(x_t, state)
        seen |= set(torch.unique(y.detach()).tolist())
        if name == "lstm":
            c = state[1].detach()
            assert torch.equal(c, c.round()) and float(c.abs().max()) <= t
    assert seen <= {-1.0, 0.0, 1.0} and len(seen) == 3
    y, _ = cell(x)  # the unrolled forward agrees on the value set
    assert set(torch.unique(y.detach()).tolist()) <= {-1.0, 0.0, 1.0}


# -- spec §6.6: reduction ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_unquantized_cells_equal_torch_cells(name):
    """§6.6: with no quantizer and lambda = 1 the reference step equals nn.LSTMCell / nn.GRUCell (1e-6)."""
    torch.manual_seed(0)
    cell = build_cell({"name": name, "hidden_size": 5}, 3)
    ref = (nn.LSTMCell if name == "lstm" else nn.GRUCell)(3, 5)
    for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(ref, attr).data.copy_(getattr(cell.rnn, attr + "_l0"))
    x = torch.randn(2, 7, 3)
    y, _ = run_cell(cell, x, fast=False)
    state = (torch.zeros(2, 5), torch.zeros(2, 5)) if name == "lstm" else torch.zeros(2, 5)
    for t in range(7):
        state = ref(x[:, t], state)
        h = state[0] if name == "lstm" else state
        torch.testing.assert_close(y[:, t], h, atol=1e-6, rtol=0)


def test_sloping_factor_equals_scaled_weights_and_biases():
    """§6.6: with quantizers off, sigma(lambda z) is the cell with pre-activation weights and biases times
    lambda (exactly so for the GRU; for the LSTM also tanh(lambda c), checked against the spec's equations)."""
    lam = 1.7
    gru = quantized_cell("gru", hidden=5, weights="none", activations="none", slope=lam)
    plain = build_cell({"name": "gru", "hidden_size": 5}, 3)
    with torch.no_grad():
        for name, p in plain.rnn.named_parameters():
            p.copy_(getattr(gru.rnn, name) * lam)
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(gru(x)[0], plain(x)[0], atol=1e-6, rtol=1e-5)
    lstm = quantized_cell("lstm", hidden=5, weights="none", activations="none", slope=lam)
    w_ih, w_hh, b_ih, b_hh = lstm._weights()
    h = c = torch.zeros(2, 5)
    y, _ = lstm(x)
    for t in range(6):
        z = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(lam * f) * c + torch.sigmoid(lam * i) * torch.tanh(lam * g)
        h = torch.sigmoid(lam * o) * torch.tanh(lam * c)
        torch.testing.assert_close(y[:, t], h, atol=1e-6, rtol=1e-5)


def test_sloped_lstm_passes_float64_gradcheck():
    """The sloping factor path (quantizers off) has exact gradients (float64 gradcheck, tiny sizes)."""
    cell = quantized_cell("lstm", hidden=3, input_size=2, weights="none", activations="none", slope=2.0).double()
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: cell(v)[0], (x,))


# -- spec §6.7: determinism ------------------------------------------------------------------------------

def test_evaluation_modes_are_deterministic_and_training_draws_are_seeded():
    """§6.7: act_eval=deterministic gives identical outputs; stochastic is reproducible per evaluation
    (reseeded at every switch to eval mode, global RNG untouched) and under a fixed training seed."""
    x = torch.randn(3, 10, 3)
    cell = quantized_cell("lstm", act_eval="deterministic").eval()
    assert torch.equal(cell(x)[0], cell(x)[0])
    cell = quantized_cell("lstm").eval()
    rng = torch.get_rng_state()
    first = cell(x)[0]
    assert torch.equal(torch.get_rng_state(), rng)
    cell.train().eval()
    assert torch.equal(cell(x)[0], first)
    cell.train()
    torch.manual_seed(5)
    a = cell(x)[0]
    torch.manual_seed(5)
    assert torch.equal(cell(x)[0], a)
    torch.manual_seed(6)
    assert not torch.equal(cell(x)[0], a)
    expectation = quantized_cell("lstm", act_eval="expectation").eval()
    assert torch.unique(expectation(x)[0]).numel() > 3  # activations not quantized in this ablation


def test_stochastic_draws_are_independent_across_time_steps():
    """§6.7: fresh Bernoulli noise per element and per step: gates at p = 0.5 agree ~50% between steps."""
    cell = quantized_cell("lstm", hidden=32).train()
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()  # every gate is sigmoid(0) = 0.5 at every step
    gates = []
    inner = cell.activation_quantizers["gate"]
    cell.activation_quantizers["gate"] = lambda v: gates.append(inner(v)) or gates[-1]
    cell(torch.randn(16, 8, 3))
    forget = [g.detach() for g in gates[1::3]]  # i, f, o per step
    agree = [float((a == b).float().mean()) for a, b in zip(forget, forget[1:], strict=False)]
    assert all(0.4 < v < 0.6 for v in agree), agree
    assert float(torch.stack(forget).mean()) == pytest.approx(0.5, abs=0.05)


# -- spec §6.8: size accounting --------------------------------------------------------------------------

def test_size_accounting_reproduces_the_spec_arithmetic():
    """§6.8: 2 bits per ternary weight, 32 otherwise; PTB LSTM 1x300: 720k recurrent weights = 2.88 MB in
    FP32 and 180 KB at 2 bits; 6.73M parameters = 26.9 MB; about 1.7 MB with everything ternary."""
    run = build_run_config(recipe="hitnet/ptb_word_lstm")
    model = build_model(run)
    rows = {r.name: r for r in size_report(model)}
    recurrent = [rows["cells.0.rnn.weight_ih_l0"], rows["cells.0.rnn.weight_hh_l0"]]
    assert [r.bits for r in recurrent] == [2, 2] and sum(r.numel for r in recurrent) == 720_000
    assert sum(r.full_precision_bytes for r in recurrent) == 2_880_000
    assert sum(r.bytes for r in recurrent) == 180_000 + 2 * 4  # + one float32 alpha per matrix
    assert rows["cells.0.rnn.bias_ih_l0"].bits == 32 and rows["encoder.weight"].bits == 32
    summary = size_summary(model)
    assert summary["parameters"] == 6_732_400 and summary["full_precision_bytes"] == 26_929_600
    assert summary["bytes"] == 26_929_600 - 2_880_000 + 180_008
    everything = build_model(build_run_config(recipe="hitnet/ptb_word_lstm", overrides=[
        "quantizer.quantize_embedding=true", "quantizer.quantize_decoder=true"]))
    summary = size_summary(everything)
    assert summary["quantized_parameters"] == 6_720_000
    assert summary["bytes"] == 6_720_000 // 4 + 4 * 4 + (2_400 + 10_000) * 4  # 1,729,616 bytes
    assert HitNetQuantizer(HitNetConfig()).model_size_bytes(everything) == summary["bytes"]


# -- fused path, other quantizers, any cell ------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_weight_only_quantization_keeps_the_fused_kernel_and_matches_reference(name):
    """Weight-only quantization runs torch's fused kernel on the quantized weights; outputs and gradients
    (reaching the latent FP weights) equal the reference step path."""
    torch.manual_seed(0)
    cell = build_cell({"name": name, "hidden_size": 6}, 3)
    TernaryQuantizer(TernaryConfig()).apply(cell)
    assert not cell.activation_quantizers
    x = torch.randn(2, 7, 3)
    g = torch.randn(2, 7, 6)
    grads = []
    for fast in (True, False):
        cell.zero_grad(set_to_none=True)
        y, _ = run_cell(cell, x, fast=fast)
        (y * g).sum().backward()
        grads.append((y.detach(), [p.grad.clone() for p in cell.parameters()]))
    (y_fast, g_fast), (y_ref, g_ref) = grads
    torch.testing.assert_close(y_fast, y_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(float(latent(cell.rnn, a).grad.abs().sum()) > 0 for a in ("weight_ih_l0", "weight_hh_l0"))
    plain = (nn.LSTM if name == "lstm" else nn.GRU)(3, 6, batch_first=True)
    with torch.no_grad():
        for attr, p in plain.named_parameters():
            p.copy_(getattr(cell.rnn, attr))  # the quantized values
    assert torch.equal(plain(x)[0], y_fast)


def test_evaluation_reuses_quantized_weights_until_the_latent_weights_change():
    """Serving (eval, no grad) quantizes each weight once, not once per call; an in-place update (an
    optimizer step, a checkpoint load) or training mode quantizes afresh."""
    torch.manual_seed(0)
    cell = build_cell({"name": "lstm", "hidden_size": 6}, 3)
    TernaryQuantizer(TernaryConfig()).apply(cell)
    x = torch.randn(2, 5, 3)
    cell.eval()
    with torch.no_grad():
        first, y1 = cell.rnn.weight_hh_l0, cell(x)[0]
        assert cell.rnn.weight_hh_l0 is first and torch.equal(cell(x)[0], y1)
        latent(cell.rnn, "weight_hh_l0").mul_(-1.0)
        flipped = cell.rnn.weight_hh_l0
        assert flipped is not first and torch.equal(flipped, -first)
        assert not torch.equal(cell(x)[0], y1)
    with torch.no_grad():  # training mode is never cached across calls (Bernoulli weights redraw)
        cell.train()
        assert cell.rnn.weight_hh_l0 is not cell.rnn.weight_hh_l0
    cell.eval()  # with a graph, every call builds its own (gradients must reach the latent weights)
    assert cell.rnn.weight_hh_l0 is not cell.rnn.weight_hh_l0


@pytest.mark.parametrize("weights,bits,levels", [("uniform", 2, 4), ("uniform", 3, 8), ("binary", 1, 2),
                                                 ("bernoulli", 2, 3)])
def test_other_weight_quantizers_take_their_levels(weights, bits, levels):
    """Uniform k-bit: at most 2^k symmetric levels m*(2i-(L-1))/(L-1); binary: {-alpha, alpha};
    Bernoulli: {-m, 0, m} (deterministic rounding in eval mode)."""
    cell = quantized_cell("lstm", hidden=16, weights=weights, bits=bits, activations="none", slope=1.0).eval()
    values = torch.unique(cell.rnn.weight_hh_l0.detach())
    assert values.numel() == levels
    torch.testing.assert_close(values, -values.flip(0))
    if weights == "uniform":
        m = float(latent(cell.rnn, "weight_hh_l0").detach().abs().max())
        n = 2**bits - 1
        torch.testing.assert_close(values, m * (2 * torch.arange(n + 1) - n) / n)


@pytest.mark.parametrize("method,signed,allowed", [
    ("uniform", True, {-1.0, -1 / 3, 1 / 3, 1.0}), ("uniform", False, {0.0, 1 / 3, 2 / 3, 1.0}),
    ("binary", True, {-1.0, 1.0}), ("binary", False, {0.0, 1.0}), ("ternary", True, {-1.0, 0.0, 1.0}),
])
def test_other_activation_quantizers_take_their_levels(method, signed, allowed):
    q = ActivationQuantizer(QuantizeConfig(activations=method), signed=signed, seed=0)
    x = torch.rand(2000) * (2 if signed else 1) - (1 if signed else 0)
    got = set(torch.unique(q(x)).tolist())
    assert len(got) == len(allowed) and all(min(abs(v - a) for a in allowed) < 1e-6 for v in got)


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_quantizer_applies_to_every_baseline_cell(quantizer, cell):
    torch.manual_seed(0)
    model = build_cell({"name": cell, "hidden_size": 6}, 3)
    QUANTIZERS[quantizer](QUANTIZERS[quantizer].config_class()).apply(model)
    x = torch.randn(2, 5, 3, requires_grad=True)
    y, _ = model(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and x.grad is not None
    assert len(quantized_weights(model)) == 2
    assert all(float(latent(model.rnn, a).grad.abs().sum()) > 0 for a in ("weight_ih_l0", "weight_hh_l0"))


def test_wrapper_cells_have_their_inner_cells_quantized():
    """A wrapper exposing no roles itself (dilated_rnn around gru) gets its inner cells quantized."""
    if "dilated_rnn" not in get_registry().names("cell"):
        pytest.skip("dilated_rnn plugin not installed")
    cell = build_cell({"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_size": 4, "dilations": [1, 2]}, 3)
    HitNetQuantizer(HitNetConfig()).apply(cell)
    assert len(quantized_weights(cell)) == 4
    y, _ = cell(torch.randn(2, 6, 3))
    assert set(torch.unique(y.detach()).tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("task", ["toy_stream", "toy_parity", {"name": "adding", "length": 6, "valid_size": 8,
                                                               "test_size": 8}], ids=["stream", "parity", "adding"])
def test_quantized_cells_train_on_streams_classification_and_regression(tiny_run, task):
    """The quantizer config travels through a RunConfig and the trainer (carried state, last-step
    classification, regression)."""
    from seqplat.core.train import train

    run = tiny_run({"name": "lstm", "hidden_size": 8}, task=task, steps=2, quantizer={"name": "hitnet"})
    result = train(run, progress=False)
    assert result.steps == 2 and all(math.isfinite(v) for v in result.test_metrics.values())


# -- errors --------------------------------------------------------------------------------------------

class PlainConfig(CellConfig):
    hidden_size: int = Field(4, ge=1, description="hidden units")


class NoRolesCell(StepCell):
    """A cell that exposes no quantization roles."""

    config_class = PlainConfig

    def __init__(self, input_size: int, config: PlainConfig):
        super().__init__(input_size, config)
        self.lin = nn.Linear(input_size + config.hidden_size, config.hidden_size)

    def step(self, x_t, state, *, t=None):
        h = torch.tanh(self.lin(torch.cat([x_t, state], -1)))
        return h, h


class UnslopedCell(NoRolesCell):
    """Exposes roles, but no pre-activation roles for the sloping factor."""

    weight_roles = {"all": ("lin.weight",)}
    activation_roles = ("hidden",)

    def step(self, x_t, state, *, t=None):
        h = self.quantize_activation("hidden", torch.tanh(self.lin(torch.cat([x_t, state], -1))))
        return h, h


class CellsPlugin:
    @seqplat.hookimpl
    def register_cells(self, register):
        register("no_roles_cell", NoRolesCell)
        register("unsloped_cell", UnslopedCell)


def test_quantizer_on_a_cell_without_roles_is_a_clear_error(register_plugin, tiny_run, tmp_path):
    register_plugin(CellsPlugin(), "test_hitnet_cells")
    run = tiny_run("no_roles_cell", quantizer={"name": "hitnet"})
    with pytest.raises(ConfigError) as err:
        build_model(run)
    assert str(err.value).startswith(
        "quantizer: 'hitnet' cannot quantize cell 'no_roles_cell': it exposes no weight_roles or activation_roles; "
        "choose a cell that exposes them (")
    assert "lstm" in str(err.value) and "declare weight_roles / activation_roles on the cell" in str(err.value)
    from seqplat.cli import main

    result = CliRunner().invoke(main, ["train", "--set", "cell.name=no_roles_cell", "--set", "task.name=toy_parity",
                                       "--set", "quantizer.name=ternary", "--set", "tracking.enabled=false",
                                       "--set", f"io.output_dir={tmp_path}", "--set", "train.steps=1"])
    assert result.exit_code == 2, result.output
    assert "Error: quantizer: 'ternary' cannot quantize cell 'no_roles_cell'" in result.output


def test_role_errors_name_the_fix(register_plugin):
    register_plugin(CellsPlugin(), "test_hitnet_cells")
    cell = build_cell({"name": "unsloped_cell"}, 3)
    with pytest.raises(ConfigError, match="none of its activation roles .hidden. is declared as a sigmoid/tanh"):
        HitNetQuantizer(HitNetConfig()).apply(cell)
    with pytest.raises(ConfigError, match="the sloping factor needs the pre-activation role 'hidden_preact'; set "
                                          "quantizer.slope=1"):
        HitNetQuantizer(HitNetConfig(activation_roles=("hidden",))).apply(build_cell({"name": "unsloped_cell"}, 3))
    ok = build_cell({"name": "unsloped_cell"}, 3)
    HitNetQuantizer(HitNetConfig(activation_roles=("hidden",), slope=1.0)).apply(ok)  # explicit opt-in works
    assert set(torch.unique(ok(torch.randn(2, 4, 3))[0].detach()).tolist()) <= {-1.0, 0.0, 1.0}
    with pytest.raises(ConfigError, match="role 'cell' is not a sigmoid/tanh output"):
        HitNetQuantizer(HitNetConfig(activation_roles=("cell",))).apply(build_cell("lstm", 3))
    with pytest.raises(ConfigError, match="unknown weight role.s. bogus; quantizer.weight_roles must be among: "
                                          "input, recurrent"):
        HitNetQuantizer(HitNetConfig(weight_roles=("bogus",))).apply(build_cell("gru", 3))
    with pytest.raises(ConfigError, match=r"quantizer.slope: Input should be greater than or equal to 1"):
        build_run_config(overrides=["cell.name=lstm", "quantizer.name=hitnet", "quantizer.slope=0.5"])
    with pytest.raises(ConfigError, match="would do nothing"):
        build_run_config(overrides=["quantizer.name=ternary", "quantizer.weights=none"])


# -- training from a full-precision checkpoint ---------------------------------------------------------

def test_init_from_a_full_precision_checkpoint(tiny_run):
    """init_from copies the FP weights into the latent weights at the first training step; loading a
    checkpoint first (resume, evaluate) cancels it; a checkpoint of another size is a clear error."""
    from seqplat.core.checkpoint import load_checkpoint
    from seqplat.core.train import train

    cell = {"name": "lstm", "hidden_size": 8}
    fp = train(tiny_run(cell, steps=2), progress=False)
    fp_state = load_checkpoint(fp.run_dir, prefer="best").model_state
    run = tiny_run(cell, steps=2, quantizer={"name": "hitnet", "init_from": fp.run_dir})
    model = build_model(run)
    w = latent(model.cells[0].rnn, "weight_hh_l0")
    assert not torch.equal(w, fp_state["cells.0.rnn.weight_hh_l0"])
    model.eval()(torch.randint(0, 5, (2, 4)))  # evaluation does not trigger it
    assert not torch.equal(w, fp_state["cells.0.rnn.weight_hh_l0"])
    model.train()(torch.randint(0, 5, (2, 4)))
    assert torch.equal(w, fp_state["cells.0.rnn.weight_hh_l0"])
    assert torch.equal(model.head.weight, fp_state["head.weight"])
    resumed = build_model(run)
    resumed.load_state_dict(model.state_dict())
    with torch.no_grad():
        latent(resumed.cells[0].rnn, "weight_hh_l0").add_(1.0)
    resumed.train()(torch.randint(0, 5, (2, 4)))
    assert torch.equal(latent(resumed.cells[0].rnn, "weight_hh_l0"), w + 1.0)
    assert train(run, progress=False).steps == 2
    other = build_model(tiny_run({"name": "lstm", "hidden_size": 6}, quantizer={"name": "hitnet",
                                                                                  "init_from": fp.run_dir}))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        other.train()(torch.randint(0, 5, (2, 4)))


# -- export ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_codes_pack_and_unpack(bits):
    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(1001, bits) == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


@pytest.mark.parametrize("quantizer", [{"name": "hitnet"}, {"name": "ternary", "granularity": "gate"},
                                       {"name": "hitnet", "weights": "trained_ternary", "act_eval": "deterministic"},
                                       {"name": "uniform", "bits": 3}],
                         ids=["hitnet", "ternary-gate", "trained", "uniform3"])
def test_export_round_trip_reproduces_outputs_exactly(tiny_run, tmp_path, quantizer):
    """`seqplat export` writes packed codes + scales, reloads them and reproduces the outputs bit for bit;
    trained weights still take exactly three values per ternary tensor."""
    from seqplat.cli import main
    from seqplat.core.checkpoint import load_checkpoint
    from seqplat.core.train import train
    from seqplat.plugins.hitnet.commands import build_quantized, outputs, probe_inputs

    result = train(tiny_run({"name": "lstm", "hidden_size": 8}, steps=2, quantizer=quantizer), progress=False)
    out = tmp_path / "model.safetensors"
    cli = CliRunner().invoke(main, ["export", result.run_dir, "--out", str(out), "--json"])
    assert cli.exit_code == 0, cli.output
    report = json.loads(cli.output)
    assert report["outputs_equal"] and report["max_abs_diff"] == 0.0
    assert report["file_bytes"] == out.stat().st_size and report["bytes"] < report["full_precision_bytes"]
    model, run, _ = build_quantized(result.run_dir)
    reloaded, _, summary = load_export(str(out))
    x, _ = probe_inputs(model, run, batch=3, steps=9, seed=4)
    assert torch.equal(outputs(model, x, None), outputs(reloaded, x, None))
    with torch.enable_grad():  # also outside inference mode (fused kernels dispatch on requires_grad)
        assert torch.equal(model.eval()(x)[0], reloaded.eval()(x)[0])
    assert summary == size_summary(model)
    from safetensors.torch import load_file

    tensors = load_file(str(out))
    bits = 3 if quantizer["name"] == "uniform" else 2
    assert tensors["cells.0.rnn.weight_hh_l0.codes"].numel() == packed_bytes(4 * 8 * 8, bits)
    assert "cells.0.rnn.weight_hh_l0" not in tensors and "head.weight" in tensors
    if quantizer["name"] != "uniform":
        blocks = 4 if quantizer.get("granularity") == "gate" else 1
        state = load_checkpoint(result.run_dir, prefer="best").model_state
        assert any(".parametrizations." in k for k in state)
        for attr in ("weight_ih_l0", "weight_hh_l0"):
            for block in getattr(model.cells[0].rnn, attr).detach().view(blocks, -1):
                assert torch.unique(block).numel() == 3


def test_export_quantizes_a_full_precision_run_after_training(tiny_run, tmp_path):
    from seqplat.cli import main
    from seqplat.core.train import train

    result = train(tiny_run({"name": "gru", "hidden_size": 8}, steps=2), progress=False)
    out = tmp_path / "fp.safetensors"
    cli = CliRunner().invoke(main, ["export", result.run_dir, "--out", str(out)])
    assert cli.exit_code == 2 and "has no quantizer" in cli.output
    cli = CliRunner().invoke(main, ["export", result.run_dir, "--out", str(out), "--quantizer", "ternary"])
    assert cli.exit_code == 0, cli.output
    assert re.search(r"size: [\d,]+ bytes packed vs [\d,]+ bytes in float32", cli.output)
    assert "reload: outputs reproduced exactly" in cli.output


# -- recipes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe,cell,params", [
    ("ptb_word_lstm", "lstm", 6_732_400), ("ptb_word_lstm_fp", "lstm", 6_732_400),
    ("ptb_word_gru", "gru", 6_551_800), ("ptb_word_gru_fp", "gru", 6_551_800),
    ("ptb_word_ternary", "lstm", 6_732_400), ("ptb_word_ternary_fp", "lstm", 6_732_400),
])
def test_paper_recipes_build_with_the_spec_parameter_counts(recipe, cell, params):
    """Spec §5: 1 layer of 300 units on PTB words (10k vocabulary, embedding 300, untied decoder):
    LSTM 720k recurrent weights + 3.0M embedding + 3.01M decoder = 6,732,400 (exact); GRU 6,551,800."""
    run = build_run_config(recipe=f"hitnet/{recipe}")
    assert run.cell["name"] == cell and run.cell["hidden_size"] == 300 and run.task["bptt"] == 35
    assert run.train.optimizer == "sgd" and run.train.batch_size == 20
    assert (run.quantizer is None) == recipe.endswith("_fp")
    assert count_parameters(build_model(run)) == params


def test_protocol_recipes_have_the_protocol_budget():
    """PROTOCOLS.md ptb_word_ternary: same architecture FP vs quantized, 6 epochs, SGD as in the spec."""
    fp, q = (build_run_config(recipe=f"hitnet/ptb_word_ternary{s}") for s in ("_fp", ""))
    assert fp.model_dump(exclude={"description", "quantizer"}) == q.model_dump(exclude={"description", "quantizer"})
    steps_per_epoch = (929_589 // 20 - 1) // 35  # PTB train tokens (with <eos>) per row, BPTT 35
    assert q.train.steps == 6 * steps_per_epoch and q.train.eval_every == steps_per_epoch
    assert q.train.lr == 20.0 and q.train.clip_norm == 0.25 and q.train.schedule.kind == "plateau"


def test_default_recipe_runs_from_the_cli(tmp_path):
    from seqplat.cli import main

    result = CliRunner().invoke(main, [
        "train", "--recipe", "hitnet/default", "--set", "train.steps=3", "--set", "train.eval_every=3",
        "--set", "task.valid_size=16", "--set", "task.test_size=16", "--set", "tracking.enabled=false",
        "--set", f"io.output_dir={tmp_path}", "--no-progress",
    ])
    assert result.exit_code == 0, result.output


@needs_data
@pytest.mark.slow  # ~1 min each: the core's LM evaluation bincounts a 10k x 10k confusion matrix per batch
@pytest.mark.parametrize("recipe", ["hitnet/ptb_word_lstm", "hitnet/ptb_word_gru_fp"])
def test_paper_recipes_run_and_resume_on_cpu_at_toy_size(recipe, tmp_path):
    """The PTB recipes (GPU-sized) run two steps and resume, with the model shrunk for the CPU."""
    from seqplat.core.train import train

    shrink = ["cell.hidden_size=8", "model.embedding_size=8", "train.batch_size=4", "train.eval_batch_size=4",
              "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1", "task.bptt=5",
              "task.max_eval_tokens=80", "tracking.enabled=false", f"io.run_dir={tmp_path / 'run'}"]
    run = build_run_config(recipe=recipe, overrides=[*shrink, "train.steps=2"])
    assert train(run, progress=False).steps == 2
    longer = run.model_copy(update={"train": run.train.model_copy(update={"steps": 4})})
    assert train(longer, resume=str(tmp_path / "run"), progress=False).steps == 4


# -- docs ------------------------------------------------------------------------------------------

def test_docs_python_snippet_runs():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/plugins/hitnet.md has no python block"
    exec(compile(blocks[0], str(DOCS), "exec"), {})
