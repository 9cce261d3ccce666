"""Generate docs/cli.md from the commands' ``--help`` (a test fails when the file is stale).

Run ``python -m seqplat.cli.docgen > docs/cli.md`` after changing a command.
"""

from __future__ import annotations

import click

from seqplat.cli import main


def _walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=100, max_content_width=100)
    level = "#" * min(len(path) + 1, 4)
    out.append(f"{level} `{' '.join(path)}`\n")
    out.append("```text\n" + cmd.get_help(ctx).rstrip() + "\n```\n")
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                _walk(sub, path + [name], out)


def render() -> str:
    out = ["# CLI reference\n", "Generated from `--help` by `python -m seqplat.cli.docgen`; do not edit by hand.\n"]
    _walk(main, ["seqplat"], out)
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    click.echo(render(), nl=False)
