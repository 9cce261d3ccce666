"""``seqplat.testing.pytest_plugin``'s fixtures as a third-party plugin author uses them."""

from __future__ import annotations

import pytest
import torch

import seqplat
from seqplat import build_cell
from seqplat.core.train import train
from seqplat.testing import check_cell


class _Doubler(seqplat.StepCell):
    """h_t = tanh(x_t W) + h_{t-1} / 2 (an inline test cell)."""

    class config_class(seqplat.CellConfig):  # noqa: N801 - the contract's attribute name
        hidden_size: int = 3

    def __init__(self, input_size, config):
        super().__init__(input_size, config)
        self.lin = torch.nn.Linear(input_size, config.hidden_size)

    def step(self, x_t, h, *, t=None):
        h = torch.tanh(self.lin(x_t)) + 0.5 * h
        return h, h


class _InlinePlugin:
    @staticmethod
    @seqplat.hookimpl
    def register_cells(register):
        register("doubler", _Doubler)


def test_register_plugin_and_tiny_run(register_plugin, seqplat_registry, tiny_run):
    info = register_plugin(_InlinePlugin(), "inline_doubler")
    assert info.registered["cell"] == ["doubler"]
    check_cell("doubler")
    assert isinstance(build_cell("doubler", 2), _Doubler)
    run = tiny_run({"name": "doubler", "hidden_size": 4}, steps=3)
    assert (run.train.steps, run.tracking.enabled, run.task["name"]) == (3, False, "toy_stream")
    assert train(run, progress=False).steps == 3


def test_two_rank_run_passes_a_mapping_and_separate_folders(two_rank_run, tiny_run, monkeypatch, tmp_path):
    calls = []

    def fake(config, workdir, toy_tasks=True, timeout=300, env=None):
        calls.append((config, workdir, toy_tasks, timeout, env))
        return {"steps": config["train"]["steps"]}

    monkeypatch.setattr("seqplat.testing.pytest_plugin.run_two_ranks", fake)
    run = tiny_run("lstm", steps=2)
    assert two_rank_run(run) == {"steps": 2}
    assert two_rank_run(run.model_dump(mode="json"), toy_tasks=False, timeout=60, env={"X": "1"}) == {"steps": 2}
    (c1, w1, t1, _, _), (c2, w2, t2, to2, e2) = calls
    assert c1 == c2 == run.model_dump(mode="json")
    assert w1 != w2 and w1.parent == w2.parent == tmp_path
    assert (t1, t2, to2, e2) == (True, False, 60, {"X": "1"})


@pytest.mark.timeout(600)
def test_two_rank_run_trains_on_two_processes(two_rank_run, tiny_run):
    run = tiny_run({"name": "gru", "hidden_size": 4}, steps=2, train={"batch_size": 4, "eval_batch_size": 4})
    result = two_rank_run(run)
    assert result["steps"] == 2
    assert result["test"]["bpc"] > 0 and len(result["history"]["train_loss"]) == 2
