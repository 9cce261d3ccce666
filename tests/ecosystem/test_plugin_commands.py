"""``seqplat plugins install/uninstall`` and ``seqplat new-plugin``.

The argument handling is checked with pip replaced by a recorder; one test generates a plugin,
installs it with the real pip (offline) while another plugin is broken, runs the generated
package's own tests in a fresh interpreter, and uninstalls it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from ecosystem_helpers import OFFLINE, environment_lock, is_installed, uninstall_if_installed

import seqplat.cli
from seqplat.cli import ecosystem, main
from seqplat.registry import set_registry


def _cli(*args: str, **kwargs):
    return CliRunner().invoke(main, list(args), **kwargs)


@pytest.fixture
def recorded_pip(monkeypatch):
    """Replace pip by a recorder: each call's argv is appended; pip 'succeeds' unless told otherwise."""
    calls: list[list[str]] = []
    outcome = {"code": 0, "tail": ["Successfully installed something-1.0"]}

    def fake(argv):
        calls.append(list(argv))
        return outcome["code"], outcome["tail"]

    monkeypatch.setattr(ecosystem, "run_pip", fake)
    calls_outcome = (calls, outcome)
    return calls_outcome


def test_run_pip_passes_arguments_without_a_shell():
    tricky = "evil; echo pwned && rm -rf / $(whoami) 'quoted' \"double\""
    code, tail = ecosystem.run_pip([sys.executable, "-c", "import sys; print(repr(sys.argv[1:]))", tricky])
    assert code == 0
    assert tail == [repr([tricky])]


@pytest.mark.parametrize(("args", "pip_args"), [
    (["seqplat-indrnn"], ["install", "seqplat-indrnn"]),
    (["./my plugin; rm -rf ~"], ["install", "./my plugin; rm -rf ~"]),
    (["git+https://example.org/p.git#egg=p", "--upgrade"], ["install", "--upgrade", "git+https://example.org/p.git#egg=p"]),
    (["./p", "-e", "--no-deps", "--no-build-isolation"], ["install", "--no-deps", "--no-build-isolation", "-e", "./p"]),
], ids=["name", "path-with-shell-characters", "url", "editable-offline"])
def test_install_runs_pip_in_this_interpreter_with_one_argument(recorded_pip, args, pip_args):
    calls, _ = recorded_pip
    result = _cli("plugins", "install", *args)
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, "-m", "pip", *pip_args]]


def test_install_refuses_option_like_and_empty_targets(recorded_pip):
    calls, _ = recorded_pip
    result = _cli("plugins", "install", "--", "--index-url=http://example.org/simple")
    assert result.exit_code == 2
    assert "Error: plugins install: '--index-url=http://example.org/simple' looks like an option" in result.output
    assert _cli("plugins", "install", " ").exit_code == 2
    assert calls == []


def test_pip_failure_is_one_line_with_exit_code_2(recorded_pip):
    _, outcome = recorded_pip
    outcome.update(code=1, tail=["Looking in indexes: none", "ERROR: No matching distribution found for nope-xyz"])
    result = _cli("plugins", "install", "nope-xyz")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: pip could not install 'nope-xyz' (exit code 1): ERROR: No matching distribution found for nope-xyz"
    )


def test_uninstall_maps_a_plugin_name_to_its_distribution(recorded_pip, monkeypatch):
    calls, _ = recorded_pip
    fake = {"fancy": ecosystem.EntryPointInfo("fancy", "fancy_mod", "seqplat-fancy", "1.2.0"),
            "lstm_extras": ecosystem.EntryPointInfo("lstm_extras", "fancy_mod.extras", "seqplat-fancy", "1.2.0")}
    monkeypatch.setattr(ecosystem, "installed_entry_points", lambda: fake)
    result = _cli("plugins", "uninstall", "fancy", "--yes")
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, "-m", "pip", "uninstall", "-y", "seqplat-fancy"]]
    assert "Uninstalled seqplat-fancy (plugins: fancy, lstm_extras)" in result.output
    declined = _cli("plugins", "uninstall", "fancy", input="n\n")
    assert declined.exit_code == 1 and "Uninstall seqplat-fancy (plugins: fancy, lstm_extras)?" in declined.output
    assert len(calls) == 1


@pytest.mark.parametrize(("name", "message"), [
    ("gam_rhn", "Error: plugins uninstall: 'gam_rhn' ships with seqplat itself and cannot be uninstalled alone; "
                "hide it with SEQPLAT_BLOCK_PLUGINS=gam_rhn"),
    ("seqplat", "Error: plugins uninstall: refusing to uninstall seqplat itself; use `pip uninstall seqplat`"),
    ("no_such_plugin_xyz", "Error: plugins uninstall: no installed plugin or distribution named 'no_such_plugin_xyz'."),
])
def test_uninstall_refuses_first_party_and_unknown_names(recorded_pip, name, message):
    calls, _ = recorded_pip
    result = _cli("plugins", "uninstall", name, "--yes")
    assert result.exit_code == 2
    assert message in result.output
    assert calls == []


def test_install_works_even_when_no_plugin_can_be_loaded(recorded_pip, monkeypatch):
    calls, _ = recorded_pip

    def explode(cls):
        raise RuntimeError("plugin discovery exploded")

    monkeypatch.setattr(seqplat.cli, "_PLUGIN_COMMANDS_LOADED", set())
    monkeypatch.setattr("seqplat.registry.Registry.from_entry_points", classmethod(explode))
    set_registry(None)
    result = _cli("plugins", "install", "seqplat-indrnn")
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, "-m", "pip", "install", "seqplat-indrnn"]]


# -- new-plugin ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Bad-Name", "1cell", "my cell", "my-cell"])
def test_new_plugin_rejects_bad_names(tmp_path, name):
    result = _cli("new-plugin", name, "--dir", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert f"Error: new-plugin: '{name}' is not a valid plugin name" in result.output
    assert not (tmp_path / "x").exists()


def test_new_plugin_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = _cli("new-plugin", "my_cell", "--dir", str(tmp_path))
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_new_plugin_renders_a_clean_package(tmp_path):
    result = _cli("new-plugin", "my_cell", "--dir", str(tmp_path / "pkg"))
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(tmp_path / "pkg")) for p in (tmp_path / "pkg").rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "src/seqplat_my_cell/__init__.py", "src/seqplat_my_cell/cell.py",
                     "src/seqplat_my_cell/recipes/default.toml", "tests/conftest.py", "tests/test_my_cell.py"]
    pyproject = (tmp_path / "pkg" / "pyproject.toml").read_text()
    assert 'name = "seqplat-my-cell"' in pyproject
    assert '[project.entry-points.seqplat]\nmy_cell = "seqplat_my_cell"' in pyproject
    cell = (tmp_path / "pkg" / "src" / "seqplat_my_cell" / "cell.py").read_text()
    assert "class MyCellConfig(CellConfig)" in cell and "(eq. 1" in cell and "# eq. 3" in cell
    test = (tmp_path / "pkg" / "tests" / "test_my_cell.py").read_text()
    assert "check_cell(spec)" in test and "gradcheck_cell(" in test and '"--plugin", "my_cell"' in test
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(tmp_path / "pkg")],
                          capture_output=True, text=True, check=False)
    if "No module named ruff" in ruff.stderr:
        pytest.skip("ruff is not installed in this environment (pip install -e '.[dev]')")
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr


@pytest.mark.timeout(600)
def test_generated_plugin_installs_and_passes_its_own_tests_while_another_plugin_is_broken(tmp_path, monkeypatch):
    target = tmp_path / "seqplat-demo-cell"
    assert _cli("new-plugin", "demo_cell", "--dir", str(target)).exit_code == 0
    # another installed plugin whose import fails: install/uninstall must not care
    broken = md.EntryPoint(name="broken_one", value="no_such_module_for_seqplat_tests", group="seqplat")
    real_entry_points = md.entry_points

    def entry_points(**kwargs):
        found = real_entry_points(**kwargs)
        return [*found, broken] if kwargs.get("group") == "seqplat" else found

    monkeypatch.setattr(md, "entry_points", entry_points)
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    with environment_lock():
        uninstall_if_installed("seqplat-demo-cell")
        set_registry(None)
        try:
            result = _cli("plugins", "install", str(target), "--no-deps", "--no-build-isolation")
            assert result.exit_code == 0, result.output
            assert "Installed plugin demo_cell (seqplat-demo-cell 0.1.0): ok (1 cells, 1 recipes)" in result.output
            rows = {r["name"]: r for r in json.loads(_cli("plugins", "list", "--json").output)}
            assert rows["demo_cell"]["status"] == "ok" and rows["demo_cell"]["version"] == "0.1.0"
            assert rows["broken_one"]["status"] == "broken"

            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                                  cwd=target, capture_output=True, text=True, env=env, timeout=500, check=False)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
            assert "6 passed" in proc.stdout

            result = _cli("plugins", "uninstall", "demo_cell", "--yes")
            assert result.exit_code == 0, result.output
            assert "Uninstalled seqplat-demo-cell (plugins: demo_cell)" in result.output
            assert not is_installed("seqplat-demo-cell")
            rows = {r["name"]: r for r in json.loads(_cli("plugins", "list", "--json").output)}
            assert "demo_cell" not in rows and rows["baselines"]["status"] == "ok"
        finally:
            uninstall_if_installed("seqplat-demo-cell")
            set_registry(None)
