"""Wrapper cells (dilated_rnn, fs_rnn, sab) around a time-aware cell: refused at config time on tasks
without timestamps, with the inner cell named; accepted where the task provides them."""

from __future__ import annotations

import pytest

from seqplat.core.config import build_run_config, time_aware_cells
from seqplat.core.errors import ConfigError
from seqplat.registry import get_registry

PHASED = {"name": "phased_lstm", "hidden_size": 8}

WRAPPERS = {
    "dilated_rnn": {"name": "dilated_rnn", "inner": {"name": "phased_lstm"}, "hidden_size": 8, "dilations": [1, 2]},
    "fs_rnn": {"name": "fs_rnn", "fast": {"name": "gru", "hidden_size": 8}, "slow": PHASED},
    "sab": {"name": "sab", "inner": {"name": "phased_lstm"}, "hidden_size": 8},
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrapper_around_time_aware_cell_is_refused_on_a_task_without_times(wrapper):
    cell = WRAPPERS[wrapper]
    assert time_aware_cells(cell, get_registry()) == [wrapper, "phased_lstm"]
    with pytest.raises(ConfigError) as err:
        build_run_config(overrides=[f"cell={cell!r}".replace("'", '"'), "task.name=copy_memory"])
    msg = str(err.value)
    assert msg.splitlines()[0].startswith(f"cell.name: cell '{wrapper}' (through its inner cell 'phased_lstm') "
                                          "reads per-step timestamps but task 'copy_memory' provides none")


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrapper_around_time_aware_cell_is_accepted_on_a_timed_task(wrapper):
    run = build_run_config(overrides=[f"cell={WRAPPERS[wrapper]!r}".replace("'", '"'),
                                      "task.name=freq_discrimination"])
    assert run.cell["name"] == wrapper


def test_plain_and_step_index_cells_need_no_times():
    reg = get_registry()
    assert time_aware_cells({"name": "lstm"}, reg) == []
    assert time_aware_cells({"name": "dilated_rnn", "inner": {"name": "gru"}}, reg) == []
    # phased_lstm reading step indices instead of the task's timestamps needs none either
    assert time_aware_cells({"name": "sab", "inner": {"name": "phased_lstm", "time_source": "step_index"}}, reg) == []
