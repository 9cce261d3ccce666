"""The docs' code runs as written, and the CLI reference is current."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = "baselines,tasks,gam_rhn,rhn,fs_rnn,dilated_rnn,unicornn,phased_lstm,sab,hitnet,regularizers"


def _python_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


def test_writing_a_plugin_tutorial_runs(tmp_path):
    code = _python_blocks(ROOT / "docs" / "writing-a-plugin.md")
    code = code.replace("/tmp/mgu-runs", str(tmp_path / "mgu-runs"))
    exec(compile(code, "writing-a-plugin.md", "exec"), {"__name__": "tutorial"})


def test_cli_reference_is_current():
    env = {**os.environ, "SEQPLAT_LOAD_PLUGINS": FIRST_PARTY}
    out = subprocess.run([sys.executable, "-m", "seqplat.cli.docgen"], capture_output=True, text=True, env=env,
                         check=True).stdout
    current = (ROOT / "docs" / "cli.md").read_text()
    assert out == current, "docs/cli.md is stale: run `python -m seqplat.cli.docgen > docs/cli.md`"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs" / "plugins").glob("*.md")))
def test_plugin_pages_have_required_sections(page):
    text = (ROOT / "docs" / "plugins" / page).read_text().lower()
    for needed in ("equation", "usage", "result", "deviation", "bibtex"):
        assert needed in text, f"docs/plugins/{page} lacks a '{needed}' section"
