"""Shell completion: ``seqplat completion SHELL`` prints click's script, and completion answers."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from seqplat.cli import main


@pytest.mark.parametrize(("shell", "needles"), [
    ("bash", ["_SEQPLAT_COMPLETE=bash_complete", "complete -o nosort -F _seqplat_completion seqplat"]),
    ("zsh", ["#compdef seqplat", "_SEQPLAT_COMPLETE=zsh_complete"]),
    ("fish", ["complete --no-files --command seqplat", "_SEQPLAT_COMPLETE=fish_complete"]),
])
def test_completion_prints_the_script(shell, needles):
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0, result.output
    for needle in needles:
        assert needle in result.output


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_is_clicks_own(shell):
    ours = CliRunner().invoke(main, ["completion", shell])
    clicks = CliRunner().invoke(main, [], env={"_SEQPLAT_COMPLETE": f"{shell}_source"}, prog_name="seqplat")
    assert ours.exit_code == clicks.exit_code == 0, clicks.output
    assert ours.output == clicks.output


def test_completion_defaults_to_the_login_shell():
    zsh = CliRunner().invoke(main, ["completion"], env={"SHELL": "/usr/bin/zsh"})
    assert zsh.exit_code == 0 and "#compdef seqplat" in zsh.output
    other = CliRunner().invoke(main, ["completion"], env={"SHELL": "/bin/tcsh"})
    assert other.exit_code == 0 and "_SEQPLAT_COMPLETE=bash_complete" in other.output
    bad = CliRunner().invoke(main, ["completion", "powershell"])
    assert bad.exit_code == 2 and "'powershell' is not one of 'bash', 'zsh', 'fish'" in bad.output


@pytest.mark.parametrize(("words", "cword", "expected"), [
    ("seqplat plu", "1", "plain,plugins"),
    ("seqplat plugins ins", "2", "plain,install"),
    ("seqplat gen", "1", "plain,generate"),
    ("seqplat generate runs/x --tem", "3", "plain,--temperature"),
    ("seqplat completion f", "2", "plain,fish"),
])
def test_bash_completion_answers(words, cword, expected):
    env = {"_SEQPLAT_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword}
    result = CliRunner().invoke(main, [], env=env, prog_name="seqplat")
    assert result.exit_code == 0, result.output
    assert expected in result.output.splitlines()
