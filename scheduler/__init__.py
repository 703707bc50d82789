"""vmvault control plane: fleet config, planning, enqueueing and the `vmvault` CLI."""
