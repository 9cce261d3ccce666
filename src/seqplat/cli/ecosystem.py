"""Ecosystem commands: plugins install/uninstall, new-plugin, generate, shell completion.

``plugins install`` / ``uninstall`` run pip in seqplat's own interpreter (``sys.executable -m pip``)
with an argument list, never a shell. The pip step needs no plugin to load, so they work while
another installed plugin is broken; after an install the new plugins are loaded once to report
their status. ``new-plugin`` renders the templates in ``seqplat/templates/plugin``.
``generate`` samples text from a trained language-model run.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import click

from seqplat.cli import UserError, main
from seqplat.cli.commands import plugins
from seqplat.core.errors import SeqplatError

# -- plugins install / uninstall -----------------------------------------------------------------


@dataclass(frozen=True)
class EntryPointInfo:
    """A ``seqplat`` entry point as installed metadata says (nothing is imported)."""

    name: str
    value: str
    distribution: str | None
    version: str | None


def installed_entry_points() -> dict[str, EntryPointInfo]:
    """The ``seqplat`` entry points of the environment, read fresh from the installed metadata."""
    importlib.invalidate_caches()
    out: dict[str, EntryPointInfo] = {}
    for ep in md.entry_points(group="seqplat"):
        dist = getattr(ep, "dist", None)
        out.setdefault(ep.name, EntryPointInfo(
            ep.name, ep.value, dist.metadata["Name"] if dist is not None else None,
            dist.version if dist is not None else None,
        ))
    return out


def pip_argv(action: str, *args: str) -> list[str]:
    """``[python, -m, pip, action, *args]`` for the interpreter running seqplat."""
    return [sys.executable, "-m", "pip", action, *args]


def run_pip(argv: list[str]) -> tuple[int, list[str]]:
    """Run pip (no shell), echoing its output line by line; returns the exit code and the last lines."""
    tail: deque[str] = deque(maxlen=40)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:
        raise UserError(f"Cannot run pip ({' '.join(argv[:3])}): {exc}") from exc
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        click.echo(line)
    return proc.wait(), list(tail)


def _pip_error(tail: list[str]) -> str:
    errors = [ln.strip() for ln in tail if ln.strip().startswith("ERROR")]
    lines = errors or [ln.strip() for ln in tail if ln.strip()]
    return lines[-1] if lines else "no output"


def _check_target(target: str, what: str) -> None:
    if not target.strip():
        raise UserError(f"{what}: empty argument; give a package name, a path or a URL")
    if target.startswith("-"):
        raise UserError(f"{what}: '{target}' looks like an option, not a package; give a package name, a path "
                        f"(./my-plugin) or a URL")


def _forget_loaded_registry() -> None:
    """Drop the process-wide registry so the next lookup sees the new set of plugins."""
    from seqplat.registry import set_registry

    set_registry(None)


def _describe_new_plugins(before: dict[str, EntryPointInfo], after: dict[str, EntryPointInfo]) -> None:
    changed = sorted(name for name, ep in after.items() if before.get(name) != ep)
    if not changed:
        click.echo("No new or changed seqplat plugins (already installed, or the package has no entry point "
                   "in the 'seqplat' group).")
        return
    from seqplat.registry import Registry

    try:
        loaded = Registry.from_entry_points()
    except Exception as exc:  # noqa: BLE001 - the install itself succeeded; only the check failed
        click.echo(f"Warning: could not load the plugins to check the new ones ({type(exc).__name__}: {exc})", err=True)
        for name in changed:
            click.echo(f"Installed plugin {name} ({after[name].distribution} {after[name].version})")
        return
    for name in changed:
        info = loaded.plugins.get(name)
        if info is None:
            status = "not loaded (SEQPLAT_LOAD_PLUGINS / SEQPLAT_BLOCK_PLUGINS exclude it)"
        elif info.broken:
            status = f"BROKEN: {info.error}"
        else:
            what = ", ".join(f"{len(v)} {k}s" for k, v in info.registered.items() if v)
            status = f"ok ({what or 'nothing registered'})"
        click.echo(f"Installed plugin {name} ({after[name].distribution} {after[name].version}): {status}")


@plugins.command("install")
@click.argument("target", metavar="NAME_OR_PATH_OR_URL")
@click.option("-e", "--editable", is_flag=True, help="Install a local folder in editable mode (pip -e).")
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade the package if it is already installed.")
@click.option("--no-deps", is_flag=True, help="Do not install the package's dependencies.")
@click.option("--no-build-isolation", is_flag=True,
              help="Build with the packages already installed (no download of build tools; works offline).")
def plugins_install(target: str, editable: bool, upgrade: bool, no_deps: bool, no_build_isolation: bool) -> None:
    """Install a plugin with pip into seqplat's own Python environment.

    NAME_OR_PATH_OR_URL is whatever pip accepts as one requirement: a distribution name
    (seqplat-indrnn), a local folder (./seqplat-indrnn) or a URL (git+https://..., a wheel URL).
    It is passed to pip as a single argument, never through a shell.

    \b
    Examples:
      seqplat plugins install seqplat-indrnn
      seqplat plugins install ./examples/seqplat-indrnn --no-deps
      seqplat plugins install -e ./my-plugin
    """
    _check_target(target, "plugins install")
    options = [flag for flag, on in (("--upgrade", upgrade), ("--no-deps", no_deps),
                                     ("--no-build-isolation", no_build_isolation)) if on]
    before = installed_entry_points()
    argv = pip_argv("install", *options, *(["-e", target] if editable else [target]))
    code, tail = run_pip(argv)
    if code != 0:
        raise UserError(f"pip could not install '{target}' (exit code {code}): {_pip_error(tail)}")
    _forget_loaded_registry()
    _describe_new_plugins(before, installed_entry_points())


@plugins.command("uninstall")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def plugins_uninstall(name: str, yes: bool) -> None:
    """Uninstall a plugin's distribution with pip.

    NAME is a plugin name as `seqplat plugins list` shows it (indrnn) or a distribution name
    (seqplat-indrnn). Plugins that ship with seqplat cannot be uninstalled; hide them with
    SEQPLAT_BLOCK_PLUGINS=NAME instead.
    """
    _check_target(name, "plugins uninstall")
    eps = installed_entry_points()
    if name in eps:
        dist = eps[name].distribution
        if dist is None:
            raise UserError(f"plugins uninstall: plugin '{name}' has no installed distribution to remove")
    else:
        dist = name
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            raise UserError(
                f"plugins uninstall: no installed plugin or distribution named '{name}'. "
                f"Installed plugins: {', '.join(sorted(eps)) or '(none)'}."
            ) from None
    if _normalize(dist) == "seqplat":
        raise UserError(
            f"plugins uninstall: '{name}' ships with seqplat itself and cannot be uninstalled alone; "
            f"hide it with SEQPLAT_BLOCK_PLUGINS={name}" if name in eps else
            "plugins uninstall: refusing to uninstall seqplat itself; use `pip uninstall seqplat`"
        )
    provided = sorted(n for n, ep in eps.items() if ep.distribution and _normalize(ep.distribution) == _normalize(dist))
    if not yes:
        click.confirm(f"Uninstall {dist} (plugins: {', '.join(provided) or 'none'})?", abort=True)
    code, tail = run_pip(pip_argv("uninstall", "-y", dist))
    if code != 0:
        raise UserError(f"pip could not uninstall '{dist}' (exit code {code}): {_pip_error(tail)}")
    _forget_loaded_registry()
    click.echo(f"Uninstalled {dist}" + (f" (plugins: {', '.join(provided)})" if provided else ""))


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


# -- new-plugin ------------------------------------------------------------------------------------

_PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def template_files() -> list[tuple[str, str]]:
    """``(relative path, text)`` of every plugin template file (``*.tmpl``), sorted."""
    from importlib.resources import files

    root = files("seqplat") / "templates" / "plugin"
    out: list[tuple[str, str]] = []

    def walk(node: Any, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".tmpl"):
                out.append((prefix + child.name[: -len(".tmpl")], child.read_text(encoding="utf-8")))

    walk(root, "")
    return out


def render_plugin(name: str, directory: Path) -> list[Path]:
    """Write a new plugin package for ``name`` into ``directory``; returns the files written."""
    words = name.split("_")
    values = {
        "name": name,
        "package": f"seqplat_{name}",
        "distribution": f"seqplat-{name.replace('_', '-')}",
        "class_prefix": "".join(w[:1].upper() + w[1:] for w in words if w),
        "seqplat_version": _seqplat_version(),
    }
    written = []
    for rel, text in template_files():
        rel = rel.replace("PACKAGE", values["package"]).replace("NAME", name)
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values), encoding="utf-8")
        written.append(path)
    return written


def _seqplat_version() -> str:
    try:
        return md.version("seqplat")
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0.1.0"


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to create (default: ./seqplat-NAME); it must not exist or be empty.")
def new_plugin(name: str, directory: Path | None) -> None:
    """Create a plugin package: a working cell with its config, a recipe, README and tests.

    NAME is the plugin's registry name (snake_case, e.g. my_cell). The package installs with
    `pip install -e DIR` and its tests (`pytest DIR/tests`) pass unchanged; then replace the
    example cell with yours.
    """
    if not _PLUGIN_NAME.match(name):
        raise UserError(f"new-plugin: '{name}' is not a valid plugin name; use snake_case letters, digits and "
                        f"underscores, starting with a letter (e.g. my_cell)")
    directory = directory or Path(f"seqplat-{name.replace('_', '-')}")
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"new-plugin: folder '{directory}' already exists and is not empty; choose another --dir")
    from seqplat.registry import get_registry

    reg = get_registry()
    if name in reg.plugins or name in reg.entries["cell"]:
        click.echo(f"Warning: a plugin or cell named '{name}' is already installed; the names will clash "
                   f"if both are installed.", err=True)
    written = render_plugin(name, directory)
    click.echo(f"Created plugin '{name}' in {directory} ({len(written)} files). Next:")
    click.echo(f"  pip install -e {directory}        # or: seqplat plugins install -e {directory}")
    click.echo(f"  pytest {directory / 'tests'}")
    click.echo(f"  seqplat train --plugin {name}")


# -- generate --------------------------------------------------------------------------------------


class GenerateError(SeqplatError):
    """A run or prompt that ``seqplat generate`` cannot use (the CLI prints it on one line, exit code 2)."""


def load_language_model(ref: str) -> tuple[Any, Any, Any]:
    """``(model, task, run)`` of a language-model run id (``runs:/ID``, ``models:/NAME/V``) or checkpoint URL.

    Raises :class:`GenerateError` when the run's task is not a :class:`seqplat.LanguageModelTask`.
    """
    import torch

    from seqplat.core.checkpoint import load_checkpoint
    from seqplat.core.config import validate_run
    from seqplat.core.errors import CheckpointError
    from seqplat.core.model import build_model, build_task
    from seqplat.core.registry_mlflow import resolve_model_reference
    from seqplat.core.task import LanguageModelTask
    from seqplat.core.train import resolve_run_reference

    ck = load_checkpoint(resolve_run_reference(resolve_model_reference(ref)), prefer="best")
    run = validate_run(ck.config)
    task = build_task(run.task)
    if not isinstance(task, LanguageModelTask):
        raise GenerateError(
            f"generate: run '{ref}' trained task '{run.task['name']}', which is not a language model; "
            f"generate needs a run of a LanguageModelTask (char_text, ptb_char, text8, enwik8, ptb_word, ...)"
        )
    torch.manual_seed(run.train.seed)
    model = build_model(run, task)
    try:
        model.load_state_dict(ck.model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"Checkpoint '{ck.url}' does not fit the model its config describes: "
                              f"{str(exc).splitlines()[0][:200]}") from exc
    model.eval()
    return model, task, run


def tokenize(prompt: str, vocab: list[str]) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` and whether the vocabulary is character-level.

    Character vocabularies (every entry one character) read the prompt character by character;
    word vocabularies split it on whitespace. Raises :class:`GenerateError` on unknown symbols.
    """
    index = {s: i for i, s in enumerate(vocab)}
    chars = all(len(s) == 1 for s in vocab)
    symbols = list(prompt) if chars else prompt.split()
    if not symbols:
        raise GenerateError("generate: --prompt is empty; give at least one " + ("character" if chars else "word"))
    unknown = sorted({s for s in symbols if s not in index})
    if unknown:
        shown = ", ".join(repr(s) for s in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        kind = "characters" if chars else "words"
        small = chars and len(vocab) <= 120
        where = f"Vocabulary: {''.join(vocab)!r}" if small else f"The vocabulary has {len(vocab)} symbols"
        raise GenerateError(f"generate: the prompt has {kind} outside the model's vocabulary: {shown}. {where}.")
    return [index[s] for s in symbols], chars


def sample_tokens(model: Any, prompt_ids: list[int], length: int, temperature: float, seed: int) -> list[int]:
    """``length`` token ids sampled after ``prompt_ids``, carrying the recurrent state (temperature 0: greedy)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt_ids], dtype=torch.long))
        for _ in range(length):
            last = logits[0, -1].double()
            if temperature == 0:
                token = int(last.argmax())
            else:
                probs = torch.softmax(last / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            out.append(token)
            logits, state = model(torch.tensor([[token]], dtype=torch.long), state)
    return out


@main.command()
@click.argument("ref", metavar="RUN_OR_CHECKPOINT")
@click.option("--prompt", required=True, help="Text the model continues (its symbols must be in the vocabulary).")
@click.option("--length", type=click.IntRange(min=1), default=200, show_default=True,
              help="Number of symbols to generate.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Softmax temperature: below 1 is more conservative; 0 always takes the most likely symbol.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler (same seed, same text).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI for run ids.")
def generate(ref: str, prompt: str, length: int, temperature: float, seed: int, tracking_uri: str | None) -> None:
    """Sample text from a trained language model (a run id, runs:/ID, models:/NAME/VERSION or checkpoint URL).

    \b
    Examples:
      seqplat generate 3f2a...e9 --prompt "the " --length 300 --temperature 0.8
      seqplat generate runs/char_text-lstm-20261122-101500-ab12cd --prompt "Once" --seed 1
    """
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    model, task, _ = load_language_model(ref)
    vocab = list(task.vocab)
    ids, chars = tokenize(prompt, vocab)
    new = sample_tokens(model, ids, length, temperature, seed)
    sep = "" if chars else " "
    click.echo(prompt + sep + sep.join(vocab[i] for i in new))


# -- shell completion ------------------------------------------------------------------------------

SHELLS = ("bash", "zsh", "fish")


@main.command()
@click.argument("shell", required=False, type=click.Choice(SHELLS))
def completion(shell: str | None) -> None:
    """Print the shell completion script for bash, zsh or fish (default: from $SHELL).

    \b
    Enable it for the current shell, or add the line to ~/.bashrc / ~/.zshrc:
      eval "$(seqplat completion bash)"
      eval "$(seqplat completion zsh)"
      seqplat completion fish > ~/.config/fish/completions/seqplat.fish
    """
    from click.shell_completion import get_completion_class

    if shell is None:
        guess = Path(os.environ.get("SHELL", "bash")).name
        shell = guess if guess in SHELLS else "bash"
    cls = get_completion_class(shell)
    assert cls is not None, shell  # click ships all three
    click.echo(cls(main, {}, "seqplat", "_SEQPLAT_COMPLETE").source(), nl=False)
