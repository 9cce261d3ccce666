"""Exceptions that seqplat shows to users.

Every user-facing error says what failed, the offending value, and how to fix it. The CLI turns a
:class:`SeqplatError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SeqplatError(Exception):
    """Base class of every error seqplat reports to a user."""


class UnknownNameError(SeqplatError, KeyError):
    """A cell, task, recipe, regularizer, quantizer or plugin name that is not installed."""

    def __init__(self, kind: str, name: str, installed: Iterable[str]):
        self.kind, self.name = kind, name
        self.installed = sorted(installed)
        close = difflib.get_close_matches(name, self.installed, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(self.installed) if self.installed else "(none)"
        super().__init__(f"Unknown {kind} '{name}'.{hint} Installed: {listing}.")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateNameError(SeqplatError):
    """Two plugins registered the same name."""


class PluginLoadError(SeqplatError):
    """A plugin failed to import or to register its components."""


class ConfigError(SeqplatError):
    """A run configuration is invalid. ``lines`` holds one message per bad field."""

    def __init__(self, lines: list[str] | str):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


class DataError(SeqplatError):
    """A dataset file is missing, unreadable or malformed."""


class CheckpointError(SeqplatError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class TrainingInterrupted(SeqplatError):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint."""


class DivergenceError(SeqplatError):
    """The loss or the gradients became NaN or infinite."""
