import importlib.metadata as md
import json

import pytest
from click.testing import CliRunner

import seqplat
from seqplat.cli import main
from seqplat.core.errors import UnknownNameError
from seqplat.registry import Registry, set_registry


def _fake_eps(monkeypatch, extra):
    real = list(md.entry_points(group="seqplat"))
    monkeypatch.setattr("seqplat.registry.md.entry_points", lambda group: real + extra)


def test_first_party_plugins_load_through_entry_points():
    reg = Registry.from_entry_points()
    assert {"baselines", "tasks"} <= set(reg.plugins)
    assert {"lstm", "gru", "rnn"} <= set(reg.names("cell"))
    assert reg.plugins["baselines"].distribution == "seqplat"
    assert not reg.plugins["baselines"].broken


def test_broken_entry_point_is_listed_and_everything_else_works(monkeypatch):
    _fake_eps(monkeypatch, [md.EntryPoint(name="broken_one", value="no_such_module_xyz", group="seqplat")])
    reg = Registry.from_entry_points()
    assert reg.plugins["broken_one"].broken
    assert "ModuleNotFoundError" in reg.plugins["broken_one"].error
    assert "lstm" in reg.names("cell")
    prev = set_registry(reg)
    try:
        result = CliRunner().invoke(main, ["plugins", "list", "--json"])
        assert result.exit_code == 0, result.output
        rows = {r["name"]: r for r in json.loads(result.output)}
        assert rows["broken_one"]["status"] == "broken"
        assert rows["baselines"]["status"] == "ok"
        result = CliRunner().invoke(main, ["train", "--plugin", "broken_one"])
        assert result.exit_code == 2
        assert "plugin 'broken_one' is broken" in result.output
    finally:
        set_registry(prev)


class _Dup:
    @staticmethod
    @seqplat.hookimpl
    def register_cells(register):
        from seqplat.plugins.baselines.cells import LSTMCell  # test-only import

        register("lstm", LSTMCell)


def test_duplicate_name_marks_second_plugin_broken_naming_both():
    reg = Registry.from_entry_points()
    info = reg.add_plugin(_Dup(), "dup_plugin")
    assert info.broken
    assert "'lstm' is registered by both plugin 'baselines' and plugin 'dup_plugin'" in info.error
    assert reg.get("cell", "lstm").plugin == "baselines"


class _Typo:
    @staticmethod
    @seqplat.hookimpl
    def register_cell(register):  # missing "s": must fail loudly
        pass


def test_misspelled_hook_fails_loudly():
    reg = Registry.from_entry_points()
    info = reg.add_plugin(_Typo(), "typo_plugin")
    assert info.broken and "unknown hook 'register_cell'" in info.error


class _Failing:
    @staticmethod
    @seqplat.hookimpl
    def register_tasks(register):
        raise RuntimeError("boom")


def test_plugin_failing_inside_register_is_broken_and_rolled_back():
    reg = Registry.from_entry_points()
    info = reg.add_plugin(_Failing(), "failing")
    assert info.broken and "boom" in info.error


def test_allow_list_and_block_list(monkeypatch):
    monkeypatch.setenv("SEQPLAT_LOAD_PLUGINS", "")
    assert Registry.from_entry_points().plugins == {}
    monkeypatch.setenv("SEQPLAT_LOAD_PLUGINS", "baselines")
    assert set(Registry.from_entry_points().plugins) == {"baselines"}
    monkeypatch.delenv("SEQPLAT_LOAD_PLUGINS")
    monkeypatch.setenv("SEQPLAT_BLOCK_PLUGINS", "baselines")
    reg = Registry.from_entry_points()
    assert "baselines" not in reg.plugins and "lstm" not in reg.names("cell")


def test_unknown_name_suggests_close_match():
    reg = Registry.from_entry_points()
    with pytest.raises(UnknownNameError) as exc:
        reg.get("cell", "lstn")
    assert str(exc.value).startswith("Unknown cell 'lstn'. Did you mean 'lstm'? Installed: ")


def test_plugins_info_lists_registrations():
    result = CliRunner().invoke(main, ["plugins", "info", "baselines", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["cells"] == ["gru", "lstm", "rnn"]
    assert "register_cells" in info["hooks"]
    result = CliRunner().invoke(main, ["plugins", "info", "baselinez"])
    assert result.exit_code == 2
    assert "Did you mean 'baselines'?" in result.output
