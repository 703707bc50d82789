"""What a backup or restore job is asked to do: one typed model per job, for both routes.

The CLI builds a request from its flags and either runs it in-process or sends
``to_job_kwargs()`` (JSON-safe) to the domain's host; the worker's queue policy
(worker/job_policy.py) parses a queued job's arguments back into the same model. The
field names are the keyword arguments of ``run_backup`` / ``run_restore`` and of the
Celery tasks (a wire contract: they do not change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vmvault.worker.routing import BackupMode


@dataclass(frozen=True)
class BackupRequest:
    """Back up ``domain`` now."""

    domain: str
    mode: BackupMode = "auto"

    def to_job_kwargs(self) -> dict[str, Any]:
        return {"domain": self.domain, "mode": self.mode}


@dataclass(frozen=True)
class RestoreRequest:
    """Restore one backup of ``domain`` (by id, at a time, or the newest)."""

    domain: str
    backup_id: str | None = None
    at: datetime | None = None
    to_dir: Path | None = None
    incoming: bool = False
    boot: bool = False
    force: bool = False
    disks: list[str] | None = None
    live: bool = False  # run_live_restore instead of run_restore
    speed: int = 0  # live only: bytes/s per disk, 0 unlimited
    repository: str | None = None  # a key of the config's repositories; None: primary

    def to_job_kwargs(self) -> dict[str, Any]:
        """The restore task's arguments (JSON-safe: time as ISO 8601, directory as text).

        ``live`` and ``speed`` only for a live restore: a worker older than them still
        takes every other restore."""
        kwargs: dict[str, Any] = {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "at": self.at.isoformat() if self.at is not None else None,
            "to_dir": str(self.to_dir) if self.to_dir is not None else None,
            "incoming": self.incoming,
            "boot": self.boot,
            "force": self.force,
            "disks": self.disks,
        }
        if self.live:
            kwargs.update(live=True, speed=self.speed)
        if self.repository is not None:
            kwargs["repository"] = self.repository
        return kwargs

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``run_restore`` besides the config and progress."""
        kwargs = asdict(self)
        del kwargs["live"], kwargs["speed"], kwargs["repository"]
        return kwargs

    def live_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``run_live_restore`` besides config, config file, progress."""
        return {
            "domain": self.domain,
            "backup_id": self.backup_id,
            "at": self.at,
            "to_dir": self.to_dir,
            "force": self.force,
            "speed": self.speed,
        }
