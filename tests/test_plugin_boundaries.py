"""A plugin imports only seqplat's public API, never another plugin (STYLE.md)."""

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "src" / "seqplat" / "plugins"
ALLOWED = ("seqplat.core", "seqplat.testing", "seqplat.registry")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


@pytest.mark.parametrize("plugin", sorted(p.name for p in PLUGINS.iterdir() if (p / "__init__.py").exists()))
def test_plugin_imports_only_public_api(plugin):
    bad = []
    for path in (PLUGINS / plugin).rglob("*.py"):
        for line, module in _imports(path):
            if not module.startswith("seqplat") or module == "seqplat":
                continue
            if module.startswith(f"seqplat.plugins.{plugin}") or module.startswith(ALLOWED):
                continue
            bad.append(f"{path.relative_to(PLUGINS)}:{line} imports {module}")
    assert not bad, "plugins may import only seqplat's public API:\n" + "\n".join(bad)
