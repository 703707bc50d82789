"""Scheduled verification (config ``verify_jobs``): pick the backups a job is due to check,
verify them (each gets its verification record), and fail the job on any damage.

Due, as Proxmox Backup Server's ``outdated_after``: a backup without a successful
verification (never verified, failed, or its record unreadable) is always due; one whose
last successful verification is younger than ``outdated_after`` days is skipped. Nothing
is deleted or repaired: a failed job is how a damaged backup gets reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from vmvault.storage.format import Manifest
from vmvault.storage.progress import Progress
from vmvault.storage.repository import Repository
from vmvault.storage.verification import Verification, load_records
from vmvault.storage.verify import VerifyReport, verify
from vmvault.worker.config import FleetConfig
from vmvault.worker.errors import WorkerError


class VerificationFailedError(WorkerError):
    """A scheduled verification found damage (recorded as FAILED). Not retryable: the
    backup stays damaged; the next backup of its domain is made full."""


def due_backups(
    manifests: Iterable[Manifest],
    records: Mapping[tuple[str, str], Verification],
    outdated_after_days: int | None,
    now: datetime,
) -> list[Manifest]:
    """The backups to verify now, oldest first."""
    if outdated_after_days is None:
        return list(manifests)
    cutoff = now - timedelta(days=outdated_after_days)
    due = []
    for m in manifests:
        record = records.get((m.domain, m.backup_id))
        last_ok = record.last_ok if record else None
        if last_ok is None or last_ok.time <= cutoff:
            due.append(m)
    return due


def verification_counts(repo: Repository) -> dict[str, dict[str, int]]:
    """Per domain of the repository: backups without a readable record (``unverified``)
    and backups whose latest verification FAILED (``failed``)."""
    records = load_records(repo)
    counts: dict[str, dict[str, int]] = {}
    for m in repo.list_manifests():
        per = counts.setdefault(m.domain, {"unverified": 0, "failed": 0})
        record = records.get((m.domain, m.backup_id))
        if record is None:
            per["unverified"] += 1
        elif not record.latest.ok:
            per["failed"] += 1
    return counts


def run_verify_job(
    config: FleetConfig,
    repo: Repository,
    name: str,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Verify what verify job ``name`` is due to; its report plus ``job``, ``due`` and
    ``skipped``. Raises ``VerificationFailedError`` naming the first damage found."""
    job = config.verify_jobs[name]
    domains = set(config.domains_matching(job.domains))
    manifests = [m for m in repo.list_manifests() if m.domain in domains]
    due = due_backups(manifests, load_records(repo), job.outdated_after, now or datetime.now(UTC))
    report = VerifyReport(read_data=job.read_data)
    if due:
        only = [m.backup_id for m in due]
        report = verify(repo, read_data=job.read_data, progress=progress, only=only)
    doc = report.to_json()
    doc.update(job=name, due=len(due), skipped=len(manifests) - len(due))
    if not report.ok:
        damaged = sorted({p.backup_id for p in report.problems})
        raise VerificationFailedError(
            f"verify job {name}: {len(report.problems)} problem(s) in {len(damaged)} of "
            f"{len(due)} backup(s) checked, recorded as FAILED; first: {report.problems[0]}"
        )
    return doc
