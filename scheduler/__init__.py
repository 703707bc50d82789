"""vmvault control plane: fleet config, planning, enqueueing and the `vmvault` CLI."""

__version__ = "0.1.0"
