"""RMSprop options: TensorFlow 1's decay 0.9 and accumulator starting at 1.0 (the dilated RNN recipes)."""

from __future__ import annotations

import pytest
import torch

from seqplat.core.config import TrainConfig
from seqplat.core.errors import ConfigError
from seqplat.core.train import make_optimizer


def _step(cfg: TrainConfig, grad: torch.Tensor, p0: torch.Tensor, steps: int = 1):
    p = torch.nn.Parameter(p0.clone())
    opt = make_optimizer([p], cfg)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach(), opt


def test_rmsprop_tensorflow_style_first_step():
    cfg = TrainConfig(optimizer="rmsprop", lr=1e-2, eps=1e-10, rmsprop_alpha=0.9, rmsprop_initial_square_avg=1.0)
    g, p0 = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])
    p, opt = _step(cfg, g, p0)
    v = 0.9 * 1.0 + 0.1 * g**2
    torch.testing.assert_close(p, p0 - 1e-2 * g / (v.sqrt() + 1e-10))
    torch.testing.assert_close(opt.state[opt.param_groups[0]["params"][0]]["square_avg"], v)
    # torch's defaults (alpha 0.99, accumulator at 0) give a much larger first step
    q, _ = _step(TrainConfig(optimizer="rmsprop", lr=1e-2, eps=1e-10), g, p0)
    assert ((p0 - q).abs() > 4 * (p0 - p).abs()).all()


def test_rmsprop_resumed_state_is_kept():
    cfg = TrainConfig(optimizer="rmsprop", lr=1e-2, rmsprop_alpha=0.9, rmsprop_initial_square_avg=1.0)
    g, p0 = torch.tensor([0.5, -2.0]), torch.tensor([1.0, 1.0])
    p2, _ = _step(cfg, g, p0, steps=2)
    p1, opt = _step(cfg, g, p0, steps=1)
    resumed = torch.nn.Parameter(p1.clone())
    opt2 = make_optimizer([resumed], cfg)
    opt2.load_state_dict(opt.state_dict())
    resumed.grad = g.clone()
    opt2.step()  # the loaded accumulator is used, not refilled with 1.0
    torch.testing.assert_close(resumed.detach(), p2)


def test_rmsprop_alpha_is_validated():
    with pytest.raises(Exception, match="rmsprop_alpha"):
        TrainConfig(rmsprop_alpha=1.5)
    assert ConfigError  # the CLI turns the validation error into a one-line message (tests/cli)
