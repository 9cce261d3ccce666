"""First-party plugins. Each is registered through the ``seqplat`` entry-point group, like any
third-party plugin, and imports only seqplat's public API."""
