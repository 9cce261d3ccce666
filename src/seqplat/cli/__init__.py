"""The ``seqplat`` command line (click).

Errors a user can fix (unknown names, bad config fields, unreadable files) print one line per problem
and exit with code 2; ``--debug`` shows the traceback instead. An interrupted training run exits 130.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from typing import Any

import click

from seqplat.core.errors import ConfigError, SeqplatError, TrainingInterrupted


class UserError(click.ClickException):
    """A fixable problem: printed without a traceback, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class SeqplatGroup(click.Group):
    """Turns seqplat and pydantic errors into one-line messages with exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TrainingInterrupted as exc:
            click.echo(str(exc), err=True)
            ctx.exit(130)
        except ConfigError as exc:
            if _debug(ctx):
                traceback.print_exc()
            raise UserError("\n".join(exc.lines)) from exc
        except SeqplatError as exc:
            if _debug(ctx):
                traceback.print_exc()
            raise UserError(str(exc)) from exc
        except MemoryError as exc:
            raise UserError("Out of memory building or running the model; reduce sizes (hidden_size, batch_size, "
                            "num_layers) and try again.") from exc

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)  # built-in commands never need the plugins to load
        if cmd is not None:
            return cmd
        _load_plugin_commands(self)
        return super().get_command(ctx, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_plugin_commands(self)
        return super().list_commands(ctx)


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("SEQPLAT_DEBUG") == "1"


_PLUGIN_COMMANDS_LOADED: set[int] = set()


def _load_plugin_commands(group: click.Group) -> None:
    if id(group) in _PLUGIN_COMMANDS_LOADED:
        return
    _PLUGIN_COMMANDS_LOADED.add(id(group))
    from seqplat.registry import get_registry

    reg = get_registry()
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(**{a: group for a in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            name = reg.pm.get_name(impl.plugin)
            if name in reg.plugins:
                reg.plugins[name].error = f"register_commands failed: {type(exc).__name__}: {exc}"


@click.group(cls=SeqplatGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="seqplat")
def main(debug: bool) -> None:
    """seqplat: train, reproduce and compare long-memory recurrent sequence models.

    \b
    Quick tour:
      seqplat plugins list             what is installed
      seqplat recipes                  named runs, e.g. gam_rhn/ptb_char
      seqplat train --plugin gam_rhn   run a plugin's default recipe
      seqplat config show --recipe baselines/ptb_char_small --set train.lr=2e-3
      seqplat evaluate RUN_ID          test metrics of a logged run
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def source_options(f: Any) -> Any:
    """--plugin / --recipe / --config / --set, shared by train, config and bench."""
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override one field, e.g. --set train.lr=3e-4 (repeatable; applied last).")(f)
    f = click.option("--config", "config_files", multiple=True, metavar="FILE",
                     help="YAML/JSON/TOML config file or fsspec URL, merged over the recipe (repeatable).")(f)
    f = click.option("--recipe", default=None, help="Recipe name, e.g. gam_rhn/ptb_char (see `seqplat recipes`).")(f)
    f = click.option("--plugin", default=None, help="Run this plugin's default recipe (<plugin>/default).")(f)
    return f


def resolve(plugin: str | None, recipe: str | None, config_files: tuple[str, ...], overrides: tuple[str, ...],
            check: bool = True):
    from seqplat.core.config import build_run_config

    return build_run_config(plugin=plugin, recipe=recipe, config_files=config_files, overrides=overrides,
                            check=check)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


from seqplat.cli import commands as _commands  # noqa: E402,F401  (registers the built-in commands)

__all__ = ["main"]


def run() -> None:  # pragma: no cover - console entry point alias
    sys.exit(main())
from seqplat.cli import ecosystem as _ecosystem  # noqa: E402,F401  (plugins install, new-plugin, generate, ...)
from seqplat.cli import suite as _suite  # noqa: E402,F401
