"""Celery tasks: thin adapters over the in-process backup/restore/verify/prune/gc functions.

Each task names its job type, checks its arguments against the worker's queue policy
(``worker.job_policy``) and calls exactly the function the in-process CLI calls, inside
the job frame (worker/job_frame.py: registry, lease, replay guard, retry, metrics). The
job's result is the same JSON object the CLI prints with ``--json``. Task names
(``vmvault.backup`` ...) are the wire contract with the senders: they never change.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from vmvault.worker.celery_app import app, fleet_config
from vmvault.worker.job_frame import (
    WORKER_HOST_ENV,
    JobProgress,
    admit,
    fleet_repository,
    redis_client,
    retry_if_locked,
    run_job,
)
from vmvault.worker.job_policy import (
    JobRefusedError,
    check_copy,
    check_copy_job,
    check_gc,
    check_prune,
    check_repository,
    check_restore,
    check_restore_test,
    check_verify,
)

__all__ = [
    "WORKER_HOST_ENV",
    "backup",
    "copy",
    "gc",
    "ping",
    "prune",
    "restore",
    "restore_test",
    "verify",
]


@app.task(bind=True, name="vmvault.backup", acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
def backup(self: Task, domain: str, mode: str = "auto") -> dict[str, Any]:
    """Back up one domain (runs on the domain's host)."""
    from vmvault.worker.backup import run_backup

    config = fleet_config()
    return run_job(
        self,
        "backup",
        domain,
        lambda progress: run_backup(config, domain, mode, progress=progress),  # type: ignore[arg-type]
    )


# A restore that died half-way is not blindly re-run on another delivery: the operator
# decides (the job shows failed). Hence reject_on_worker_lost=False. A refusal by the
# queue policy is an expected outcome: ``throws`` logs it without a traceback.
@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="vmvault.restore",
    acks_late=True,
    reject_on_worker_lost=False,
    throws=(JobRefusedError,),
)
def restore(
    self: Task,
    domain: str,
    backup_id: str | None = None,
    at: str | None = None,
    to_dir: str | None = None,
    incoming: bool = False,
    boot: bool = False,
    force: bool = False,
    disks: list[str] | None = None,
    live: bool = False,
    speed: int = 0,
    repository: Any = None,
) -> dict[str, Any]:
    """Restore one domain (runs on the domain's host), within the worker's queue policy.

    ``live``: the domain's QEMU runs at once while the backup is copied in; the job ends
    when the copy is done, the QEMU running on (worker/live_restore.py)."""
    from vmvault.worker.config import config_path
    from vmvault.worker.live_restore import run_live_restore
    from vmvault.worker.restore import run_restore

    config = fleet_config()
    name = admit(self, "restore", domain, lambda: check_repository(config, "restore", repository))
    if name is not None and live:
        admit(self, "restore", domain, lambda: _refuse_live_named(name))
    config = config.with_primary(name)
    args = admit(
        self,
        "restore",
        domain,
        lambda: check_restore(
            config, domain, backup_id, at, to_dir, incoming, boot, force, disks, live, speed
        ),
    )
    if args.live:
        # nbdkit's plugin loads the config file the worker was started with (its env).
        config_file = config_path(None)
        return run_job(
            self,
            "restore",
            args.domain,
            lambda progress: run_live_restore(
                config, config_file, progress=progress, **args.live_kwargs()
            ),
        )
    return run_job(
        self,
        "restore",
        args.domain,
        lambda progress: run_restore(config, progress=progress, **args.run_kwargs()),
    )


def _refuse_live_named(name: str) -> None:
    raise JobRefusedError(
        f"restore refused: a live restore reads the primary repository only, not {name!r}"
    )


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="vmvault.verify",
    acks_late=True,
    reject_on_worker_lost=True,
    throws=(JobRefusedError,),
)
def verify(
    self: Task,
    backup_id: str | None = None,
    read_data: bool = False,
    repository: Any = None,
    job: str | None = None,
) -> dict[str, Any]:
    """Verify one backup, the whole repository, or (``job``) what a ``verify_jobs`` entry
    of this worker's config is due to check (storage queue; writes only verification
    records, so idempotent). A scheduled verify that finds damage fails."""
    from vmvault.storage.verify import verify as verify_repository
    from vmvault.worker.metrics import record_verification_counts
    from vmvault.worker.verify_job import run_verify_job, verification_counts

    config = fleet_config()
    admit(self, "verify", None, lambda: check_verify(backup_id, read_data, job, config, repository))
    name = admit(self, "verify", None, lambda: check_repository(config, "verify", repository))

    def work(progress: JobProgress) -> Any:
        with fleet_repository(name) as repo:
            try:
                if job is not None:
                    return run_verify_job(config, repo, job, progress=progress)
                return verify_repository(repo, backup_id, read_data=read_data, progress=progress)
            finally:
                # Also after a failed verification: the gauges must show the failure. They
                # describe the primary repository, where backups are written.
                if name is None:
                    record_verification_counts(redis_client(), verification_counts(repo))

    return run_job(self, "verify", None, work)


# Like a restore, a restore test that died half-way is not replayed blindly: the reaper
# removes what it left, the next verify slot tests again.
@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="vmvault.restore_test",
    acks_late=True,
    reject_on_worker_lost=False,
    throws=(JobRefusedError,),
)
def restore_test(self: Task, domain: str, job: str) -> dict[str, Any]:
    """Restore-test the latest backup of ``domain`` for verify job ``job`` (host queue):
    restored into a scratch directory, started isolated and paused, thrown away; the
    outcome is recorded, and a failed test fails the job."""
    from vmvault.worker.restore_test import RestoreTestFailedError, run_restore_test

    config = fleet_config()
    admit(self, "restore-test", domain, lambda: check_restore_test(config, domain, job))
    entry = config.verify_jobs[job].restore_test
    assert entry is not None  # checked by check_restore_test

    def work(progress: JobProgress) -> Any:
        out = run_restore_test(config, domain, timeout=entry.timeout_seconds, boot=entry.boot)
        if not out["ok"]:
            raise RestoreTestFailedError(
                f"restore test of {domain} backup {out['backup_id']} failed: {out['problems'][0]}"
            )
        return out

    return run_job(self, "restore-test", domain, work)


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="vmvault.copy",
    acks_late=True,
    reject_on_worker_lost=True,
    throws=(JobRefusedError,),
)
def copy(
    self: Task,
    to: Any = None,
    source: Any = None,
    domains: Any = None,
    backup_id: Any = None,
    copy_job: Any = None,
) -> dict[str, Any]:
    """Copy backups from ``source`` (None: the primary) to repository ``to`` (storage
    queue; never touches a hypervisor). Resumable: a redelivery skips what is there.

    A scheduled copy names only its ``copy_job``: repositories, domains and the retention
    applied on the target afterwards come from this worker's config."""
    from vmvault.storage.copy import copy_backups, select_backups
    from vmvault.storage.prune import plan_repository_prune

    config = fleet_config()
    names = admit(
        self,
        "copy",
        None,
        lambda: (
            check_copy_job(config, copy_job)
            if copy_job is not None
            else check_copy(config, to, source, domains, backup_id)
        ),
    )

    def work(progress: JobProgress) -> Any:
        with fleet_repository(names.source) as src, fleet_repository(names.to) as dst:
            chosen = select_backups(src, names.domains, names.backup_id)
            doc: dict[str, Any] = copy_backups(src, dst, chosen, progress).to_json()
            if names.retention is not None and names.domains:
                rules = names.retention.model_dump(exclude_none=True)
                plan = plan_repository_prune(dst, rules, names.domains)
                doc["pruned"] = plan.execute(dst, progress)
            return doc

    return run_job(self, "copy", None, work)


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="vmvault.prune",
    acks_late=True,
    reject_on_worker_lost=True,
    throws=(JobRefusedError,),
)
def prune(
    self: Task,
    policy: dict[str, int],
    domains: list[str] | None = None,
    dry_run: bool = False,
    schedule: str = "",
    repository: Any = None,
) -> dict[str, Any]:
    """Apply a retention policy to ``domains`` (all when None); chunks are left to GC.

    Only a retention the config defines for those domains (worker.job_policy).
    Idempotent: planning again after a partial run removes what is left to remove.
    """
    from vmvault.storage.prune import plan_repository_prune

    config = fleet_config()
    name = admit(self, "prune", None, lambda: check_repository(config, "prune", repository))
    rules = admit(self, "prune", None, lambda: check_prune(config, policy, domains, dry_run, name))

    def work(progress: JobProgress) -> Any:
        with fleet_repository(name) as repo:
            plan = plan_repository_prune(repo, rules, domains)
            removed = [] if dry_run else plan.execute(repo, progress)
            doc: dict[str, Any] = plan.to_json()
            doc.update(dry_run=dry_run, removed=removed, schedule=schedule or None)
            return doc

    try:
        return run_job(self, "prune", None, work)
    except Exception as err:
        retry_if_locked(self, err)
        raise


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="vmvault.gc",
    acks_late=True,
    reject_on_worker_lost=True,
    throws=(JobRefusedError,),
)
def gc(
    self: Task, dry_run: bool = False, grace: float | None = None, repository: Any = None
) -> dict[str, Any]:
    """Mark-and-sweep GC under the repository's exclusive lock (storage queue); the grace
    window is never shorter than worker.gc_grace_seconds (its default too)."""
    from vmvault.storage.gc import collect_garbage

    config = fleet_config()
    name = admit(self, "gc", None, lambda: check_repository(config, "gc", repository))
    window = admit(self, "gc", None, lambda: check_gc(config, grace, dry_run))

    def work(progress: JobProgress) -> Any:
        with fleet_repository(name) as repo:
            return collect_garbage(repo, grace=window, dry_run=dry_run, progress=progress)

    try:
        return run_job(self, "gc", None, work)
    except Exception as err:
        retry_if_locked(self, err)
        raise


@app.task(bind=True, name="vmvault.ping", acks_late=True)  # type: ignore[untyped-decorator]
def ping(self: Task, sent: float = 0.0) -> dict[str, Any]:
    """Empty job: proves a worker consumes a queue and measures queue overhead."""
    started = time.time()
    return {
        "worker": self.request.hostname,
        "started": started,
        "latency": started - sent if sent else None,
    }
