"""Job vocabulary: job types, backup modes, Celery priorities and the queue each job goes to.

Shared by whoever sends jobs (the scheduler loop, the CLI) and whoever runs them (the
worker's job frame, which refuses a host-bound job that reached the wrong host).
"""

from __future__ import annotations

from typing import Literal

JobType = Literal["backup", "restore", "verify", "restore-test", "copy", "prune", "gc"]

# auto: incremental when the checkpoint chain allows, else full.
BackupMode = Literal["auto", "full", "incremental"]
MODES: tuple[BackupMode, ...] = ("auto", "full", "incremental")

# Celery priorities on the Redis transport: 0 is served first. Restores are what an
# operator waits for, so they jump ahead of scheduled backups; storage chores come last.
PRIORITY: dict[str, int] = {
    "restore": 0,
    "backup": 5,
    "verify": 7,
    "restore-test": 7,
    "copy": 8,
    "prune": 8,
    "gc": 9,
}

STORAGE_QUEUE = "storage"


def host_queue(host: str) -> str:
    """The Celery queue a host's worker consumes."""
    return f"host.{host}"


def queue_for(job_type: str, host: str | None) -> str:
    """Where a job goes: backups/restores (and restore tests, which start a QEMU) to their
    host, repository chores to ``storage``."""
    if job_type in ("backup", "restore", "restore-test"):
        if host is None:
            raise ValueError(f"a {job_type} job needs the domain's host")
        return host_queue(host)
    return STORAGE_QUEUE
