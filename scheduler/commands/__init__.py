"""CLI command groups: each module has ``register(subparsers)`` and one handler per command."""
