"""Ecosystem commands: plugins install/uninstall, new-plugin, generate, shell completion."""
