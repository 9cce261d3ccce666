"""Plugin discovery and name lookups.

Plugins are modules listed in the ``seqplat`` entry-point group (first-party plugins too). Each is
imported and registered in its own ``try``: a plugin that fails is recorded as broken with its
error and everything else keeps working. ``SEQPLAT_LOAD_PLUGINS`` is an allow-list (empty: load
none) and ``SEQPLAT_BLOCK_PLUGINS`` a block-list, both comma-separated entry-point names.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import yaml

from seqplat.core import hookspecs
from seqplat.core.errors import DuplicateNameError, PluginLoadError, UnknownNameError

KINDS = ("cell", "task", "regularizer", "quantizer", "recipe")


@dataclass
class PluginInfo:
    """One loaded (or broken) plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    @property
    def broken(self) -> bool:
        return self.error is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": "broken" if self.broken else "ok",
            "error": self.error,
            "hooks": sorted(self.hooks),
            **{k + "s": sorted(v) for k, v in self.registered.items()},
        }


@dataclass
class Entry:
    name: str
    obj: Any
    plugin: str
    description: str = ""


def _env_list(var: str) -> list[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def load_recipe_source(source: Any) -> dict[str, Any]:
    """A recipe as a dict, from a dict or a TOML/YAML/JSON file path."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {path} must hold a mapping, got {type(data).__name__}")
    return data


class Registry:
    """Everything the installed plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("seqplat")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_entry_points(cls) -> Registry:
        reg = cls()
        allow = _env_list("SEQPLAT_LOAD_PLUGINS")
        block = set(_env_list("SEQPLAT_BLOCK_PLUGINS") or [])
        seen: set[str] = set()
        for ep in sorted(md.entry_points(group="seqplat"), key=lambda e: e.name):
            if ep.name in seen or (allow is not None and ep.name not in allow) or ep.name in block:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure makes the plugin broken
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                info.traceback = traceback.format_exc()  # type: ignore[attr-defined]
                reg.plugins[ep.name] = info
                continue
            reg.add_plugin(module, info)
        return reg

    def add_plugin(self, module: ModuleType | object, info: PluginInfo | str) -> PluginInfo:
        """Register one plugin object and call its hooks; failures mark it broken."""
        if isinstance(info, str):
            info = PluginInfo(name=info, module=getattr(module, "__name__", type(module).__name__))
        if info.name in self.plugins and not self.plugins[info.name].broken:
            raise DuplicateNameError(f"Plugin name '{info.name}' is registered twice.")
        self.plugins[info.name] = info
        try:
            self.pm.register(module, name=info.name)
            self._check_hooks(module, info)
        except Exception as exc:  # noqa: BLE001
            info.error = f"registration failed: {type(exc).__name__}: {exc}"
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            return info
        info.hooks = [c.name for c in self.pm.get_hookcallers(module) or []]
        try:
            self._call_register_hooks(module, info)
        except Exception as exc:  # noqa: BLE001
            self._rollback(info)
            info.error = f"{type(exc).__name__}: {exc}"
            self.pm.unregister(module)
        return info

    def _check_hooks(self, module: object, info: PluginInfo) -> None:
        """Fail loudly on a hookimpl whose name matches no hookspec (a typo)."""
        for caller in self.pm.get_hookcallers(module) or []:
            if caller.spec is None:
                raise PluginLoadError(
                    f"plugin '{info.name}' implements unknown hook '{caller.name}'; "
                    f"known hooks: {', '.join(sorted(n for n in dir(hookspecs) if n.startswith('register_')))}"
                )

    def _call_register_hooks(self, module: object, info: PluginInfo) -> None:
        for kind in KINDS:
            hook = getattr(self.pm.hook, f"register_{kind}s")
            for impl in hook.get_hookimpls():
                if impl.plugin is module:
                    args = {"register": self._make_register(kind, info)}
                    impl.function(**{a: args[a] for a in impl.argnames})

    def _make_register(self, kind: str, info: PluginInfo):
        def register(name: str, obj: Any, *args: Any, **kwargs: Any) -> None:
            self._register(kind, name, obj, info, *args, **kwargs)

        return register

    def _register(self, kind: str, name: str, obj: Any, info: PluginInfo, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
        table = self.entries[kind]
        if name in table:
            other = table[name].plugin
            raise DuplicateNameError(
                f"{kind.capitalize()} '{name}' is registered by both plugin '{other}' and plugin '{info.name}'; "
                f"block one with SEQPLAT_BLOCK_PLUGINS={info.name}"
            )
        if kind == "recipe":
            obj = load_recipe_source(obj)
            description = description or str(obj.get("description", ""))
        else:
            if not description and obj.__doc__ and obj.__doc__.strip():
                description = obj.__doc__.strip().splitlines()[0]
            if kind in ("cell", "task", "regularizer", "quantizer") and not hasattr(obj, "config_class"):
                raise TypeError(f"{kind} '{name}' ({obj!r}) has no config_class attribute")
        table[name] = Entry(name, obj, info.name, description)
        info.registered[kind].append(name)

    def _rollback(self, info: PluginInfo) -> None:
        for kind, names in info.registered.items():
            for n in names:
                self.entries[kind].pop(n, None)
            names.clear()

    def check_pending(self) -> None:
        self.pm.check_pending()

    # -- lookups ----------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        table = self.entries[kind]
        if name not in table:
            err = UnknownNameError(kind, name, table)
            owner = name.split("/")[0] if kind == "recipe" else name
            broken = self.plugins.get(owner)
            if broken is not None and broken.broken:
                raise UnknownNameError(kind, name, table) from PluginLoadError(
                    f"plugin '{owner}' is broken: {broken.error}"
                )
            raise err
        return table[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get_plugin(self, name: str) -> PluginInfo:
        if name not in self.plugins:
            raise UnknownNameError("plugin", name, self.plugins)
        return self.plugins[name]

    def plugin_of(self, kind: str, name: str) -> str:
        return self.get(kind, name).plugin


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry.from_entry_points()
    return _REGISTRY


def set_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (tests); returns the previous one."""
    global _REGISTRY
    prev, _REGISTRY = _REGISTRY, registry
    return prev


def get_cell(name: str) -> type:
    return get_registry().get("cell", name).obj


def get_task(name: str) -> type:
    return get_registry().get("task", name).obj


def list_cells() -> list[str]:
    return get_registry().names("cell")


def list_tasks() -> list[str]:
    return get_registry().names("task")
