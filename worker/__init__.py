"""vmvault worker: the data plane on each hypervisor host (QMP, NBD, backup, restore)."""
