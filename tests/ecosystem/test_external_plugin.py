"""The external plugin examples/seqplat-indrnn, installed with pip the way a user installs one.

One install serves the whole module; the last test uninstalls it through the CLI and checks that
everything else still works (the fixture removes it in any case).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ecosystem_helpers import EXAMPLE, environment_lock, install_copy, is_installed, uninstall_if_installed

from seqplat import build_run_config
from seqplat.cli import main
from seqplat.core.errors import ConfigError
from seqplat.core.model import build_cell
from seqplat.core.train import train
from seqplat.registry import Registry, set_registry
from seqplat.testing import check_cell, gradcheck_cell
from seqplat.testing.tasks import ToyTasksPlugin

DIST = "seqplat-indrnn"


@pytest.fixture(scope="module")
def indrnn_installed(tmp_path_factory):
    with environment_lock():
        uninstall_if_installed(DIST)  # a leftover of a killed session
        source = install_copy(EXAMPLE, tmp_path_factory.mktemp("indrnn-source"))
        set_registry(None)
        try:
            yield source
        finally:
            uninstall_if_installed(DIST)
            set_registry(None)


@pytest.fixture
def registry(indrnn_installed, seqplat_registry):
    """A fresh process-wide registry that sees the installed plugin."""
    return seqplat_registry


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def test_plugins_list_shows_the_installed_distribution(registry):
    result = _cli("plugins", "list")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("indrnn "))
    assert line.split()[1:4] == ["seqplat-indrnn", "0.1.0", "ok"]
    assert "[1 cells, 1 tasks, 1 recipes]" in line
    rows = {r["name"]: r for r in json.loads(_cli("plugins", "list", "--json").output)}
    row = rows["indrnn"]
    assert (row["distribution"], row["version"], row["module"]) == ("seqplat-indrnn", "0.1.0", "seqplat_indrnn")
    assert (row["cells"], row["tasks"], row["recipes"]) == (["indrnn"], ["indrnn_sine"], ["indrnn/default"])
    # imported from the installed copy in site-packages, not from the repository's source folder
    import seqplat_indrnn

    assert EXAMPLE not in Path(seqplat_indrnn.__file__).resolve().parents


SPECS = {
    "relu": {"name": "indrnn", "hidden_size": 4},
    "relu_bounded": {"name": "indrnn", "hidden_size": 4, "recurrent_max_from_length": 5},
    "tanh_no_bias": {"name": "indrnn", "hidden_size": 4, "activation": "tanh", "bias": False,
                     "recurrent_init_min": -0.5, "recurrent_init_max": 0.5, "recurrent_max_abs": 0.9},
}


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_indrnn_conformance(registry, spec):
    check_cell(spec)  # includes fast path (hoisted W x) == reference step, outputs and gradients
    # gradcheck away from the clamp's kink: initial weights strictly inside the bound
    gradcheck_cell({**spec, "hidden_size": 3, "recurrent_init_min": -0.5, "recurrent_init_max": 0.5})


def test_indrnn_follows_eq_2(registry):
    torch.manual_seed(0)
    cell = build_cell({"name": "indrnn", "hidden_size": 3}, 2).eval()
    x = torch.randn(2, 4, 2)
    with torch.no_grad():
        cell.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        w, u, b = cell.input_weight, cell.recurrent_weight, cell.bias
        h = torch.zeros(2, 3)
        expected = []
        for t in range(4):
            h = torch.relu(x[:, t] @ w.T + u * h + b)  # eq. 2
            expected.append(h)
        expected = torch.stack(expected, 1)
        for fast in (False, True):
            cell.use_fast_path = fast
            y, state = cell(x)
            torch.testing.assert_close(y, expected)
            torch.testing.assert_close(state, expected[:, -1])
    assert ((u >= 0) & (u <= 1)).all()  # U(0, 1) initialisation, as the authors do


def test_recurrent_bound_clips_where_used_and_in_training(registry):
    bound = 2.0 ** (1 / 50)
    torch.manual_seed(0)
    cell = build_cell({"name": "indrnn", "hidden_size": 3, "recurrent_max_from_length": 50}, 1)
    assert cell.config.recurrent_bound == pytest.approx(bound)
    with torch.no_grad():
        cell.recurrent_weight.copy_(torch.tensor([5.0, -5.0, 0.5]))
    cell.eval()
    x = torch.ones(1, 3, 1)
    y_eval, _ = cell(x)
    with torch.no_grad():  # eval uses clamp(u) without touching the stored weights
        assert cell.recurrent_weight.tolist() == [5.0, -5.0, 0.5]
        h, clipped = torch.zeros(1, 3), torch.tensor([bound, -bound, 0.5])
        for _ in range(3):
            h = torch.relu(cell.input_weight[:, 0] + clipped * h + cell.bias)
    torch.testing.assert_close(y_eval[:, -1], h)
    cell.train()
    cell(x)
    assert cell.recurrent_weight.tolist() == pytest.approx([bound, -bound, 0.5])  # projected, like the authors
    with pytest.raises(ConfigError, match="recurrent_max_abs and recurrent_max_from_length both set a bound"):
        build_run_config(recipe="indrnn/default", overrides=["cell.recurrent_max_abs=1.0"])


def test_default_recipe_builds_with_the_expected_parameter_count(registry):
    from seqplat.core.model import build_model, count_parameters

    run = build_run_config(recipe="indrnn/default")
    # layer 1: W 32x1 + u 32 + b 32; layer 2: W 32x32 + u 32 + b 32; head 32 + 1
    assert count_parameters(build_model(run)) == (32 + 32 + 32) + (32 * 32 + 32 + 32) + 33 == 1217
    task_cls = registry.get("task", "indrnn_sine").obj
    assert task_cls.baseline == pytest.approx(1 / math.sqrt(12))


def test_train_plugin_trains_it(registry, tmp_path):
    result = _cli("train", "--plugin", "indrnn", "--no-progress", "--set", "train.steps=4",
                  "--set", "train.eval_every=4", "--set", "task.valid_size=32", "--set", "task.test_size=32",
                  "--set", "tracking.enabled=false", "--set", f"io.output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert "steps: 4" in result.output and "rmse" in result.output


WRAPPED = {
    "dilated_rnn": {"name": "dilated_rnn", "inner": {"name": "indrnn"}, "hidden_size": 4, "dilations": [1, 2]},
    "fs_rnn": {"name": "fs_rnn", "num_fast": 3, "fast": {"name": "indrnn", "hidden_size": 4},
               "slow": {"name": "indrnn", "hidden_size": 3, "activation": "tanh"}},
    "sab": {"name": "sab", "inner": {"name": "indrnn"}, "hidden_size": 4, "k_att": 2, "k_top": 2,
            "k_trunc": 3, "memory_size": 6},
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_wrapper_cells_wrap_indrnn_by_name(registry, tiny_run, name):
    spec = WRAPPED[name]
    cell = check_cell(spec, time=6)
    inner = [m for m in cell.modules() if type(m).__name__ == "IndRNNCell"]
    assert inner, f"{name} built no IndRNN inner cell"
    assert all(type(m).__module__ == "seqplat_indrnn.cell" for m in inner)
    run = tiny_run(spec, task={"name": "indrnn_sine", "length": 8, "valid_size": 8, "test_size": 8}, steps=3)
    result = train(run, progress=False)
    assert result.steps == 3 and math.isfinite(result.test_metrics["rmse"])


def test_uninstall_leaves_everything_else_working(indrnn_installed, tiny_run):
    before = {name: info.broken for name, info in Registry.from_entry_points().plugins.items()}
    assert before["indrnn"] is False
    set_registry(None)
    result = _cli("plugins", "uninstall", "indrnn", "--yes")
    assert result.exit_code == 0, result.output
    assert "Uninstalled seqplat-indrnn (plugins: indrnn)" in result.output
    assert not is_installed(DIST)
    listing = _cli("plugins", "list", "--json")
    assert listing.exit_code == 0, listing.output
    rows = {r["name"]: r for r in json.loads(listing.output)}
    assert "indrnn" not in rows
    assert {name: r["status"] == "broken" for name, r in rows.items()} == {
        name: broken for name, broken in before.items() if name != "indrnn"}
    assert {"baselines", "tasks", "dilated_rnn", "fs_rnn", "sab"} <= set(rows)
    cells = _cli("cells")
    assert cells.exit_code == 0 and "indrnn" not in cells.output and "dilated_rnn" in cells.output
    missing = _cli("train", "--plugin", "indrnn")
    assert missing.exit_code == 2 and "Unknown plugin 'indrnn'" in missing.output
    wrapped = _cli("config", "show", "--set", "cell.name=sab", "--set", "cell.inner={name: indrnn}")
    assert wrapped.exit_code == 2 and "Unknown cell 'indrnn'" in wrapped.output
    fresh = Registry.from_entry_points()
    fresh.add_plugin(ToyTasksPlugin(), "seqplat_testing_toys")
    assert "indrnn" not in fresh.names("cell")
    set_registry(fresh)
    result = train(tiny_run({"name": "dilated_rnn", "inner": {"name": "gru"}, "hidden_size": 4,
                             "dilations": [1, 2]}, steps=2), progress=False)
    assert result.steps == 2
