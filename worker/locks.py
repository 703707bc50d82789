"""Per-domain job lock: ``flock`` on ``state_dir/locks/<domain>.lock`` (one job per domain).

The kernel drops an ``flock`` when its holder dies, even by SIGKILL, so a crashed worker
never leaves a stale lock behind. The file records who holds it, for the error message.
Across hosts the fleet adds a Redis lock on top (``worker/redis_lock.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmvault.worker.errors import WorkerError


class DomainBusyError(WorkerError):
    """Another backup or restore of the domain is running. Retryable once it has finished."""

    retryable = True


def lock_path(state_dir: Path, domain: str) -> Path:
    return state_dir / "locks" / f"{domain}.lock"


@contextmanager
def domain_lock(state_dir: Path, domain: str, job: str = "backup") -> Iterator[None]:
    """Hold the domain's lock for the block, or raise ``DomainBusyError`` at once."""
    path = lock_path(state_dir, domain)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise DomainBusyError(
                f"domain {domain!r} is busy: {holder}; try again when it has finished"
            ) from None
        info = {
            "pid": os.getpid(),
            "job": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (
            f"a {info.get('job', 'job')} (pid {info.get('pid')}) holds it since {info.get('since')}"
        )
    except (OSError, ValueError):
        return "another job holds its lock"
