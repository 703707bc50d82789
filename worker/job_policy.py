"""What a worker accepts from the job queue: each queued job checked against the config.

Anyone who can write to the broker can enqueue any job with any arguments, and the worker
runs as root next to the VMs. So a job from the queue gets only what this worker's config
allows (the ``worker:`` block; docs/fleet.md, "Trust boundary"); the in-process CLI keeps
the operator's full powers. Each check is pure: it reads the config and the job's
arguments and returns them parsed, or raises ``JobRefusedError`` naming the rule. The
task calls it before anything else, so a refused job touches nothing.

    job      rule
    restore  its target (to_dir, or the incoming image dir) lies under worker.restore_roots
             force (replace existing images) only with worker.allow_force_from_queue
    prune    per domain, keeps at least what one of its schedules' retention keeps, or
             what a worker.prune_policies entry keeps (these alone cover "all domains")
    gc       grace no shorter than worker.gc_grace_seconds
    all      arguments of the expected types and shapes (names, backup ids, times, paths)

A dry-run prune or gc deletes nothing and is not limited by its policy rule.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmvault.storage.errors import StorageError
from vmvault.storage.format import check_backup_id, check_name
from vmvault.storage.prune import KEEP_PREFIX, KEEP_RULES, rule_name
from vmvault.worker.config import FleetConfig, RetentionPolicy
from vmvault.worker.errors import WorkerError
from vmvault.worker.job_requests import RestoreRequest

# Retention rules as the CLI spells them; the scheduler sends them as keep_<rule>.


class JobRefusedError(WorkerError):
    """A queued job is outside this worker's policy; nothing was done. Not retryable:
    change the job, or the worker's config (``worker:``) if it should be allowed."""


def _show(value: Any) -> str:
    """A hostile value for a one-line message: repr (no newlines), cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(job: str, name: str, value: Any, want: str) -> JobRefusedError:
    return JobRefusedError(f"{job} refused (job arguments): bad {name} {_show(value)}: {want}")


def _refuse(job: str, rule: str, why: str) -> JobRefusedError:
    return JobRefusedError(f"{job} refused by {rule}: {why}")


def _is_name(value: Any) -> bool:
    try:
        check_name(value, "domain")
    except StorageError:
        return False
    return True


def _flag(job: str, name: str, value: Any) -> bool:
    # Exactly a bool: a queued "false" is a non-empty string, and truthy.
    if not isinstance(value, bool):
        raise _bad(job, name, value, "want true or false")
    return value


def _rate(job: str, name: str, value: Any) -> int:
    # bool is an int too: a queued true must not mean 1 byte/s.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(job, name, value, "want bytes per second, 0 or more (0: unlimited)")
    return int(value)


def _names(job: str, name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_name(v) for v in value):
        raise _bad(job, name, value, "want a list of names ([A-Za-z0-9._-], up to 63)")
    return list(value)


# -- restore ------------------------------------------------------------------------


def check_restore(
    config: FleetConfig,
    domain: Any,
    backup_id: Any = None,
    at: Any = None,
    to_dir: Any = None,
    incoming: Any = False,
    boot: Any = False,
    force: Any = False,
    disks: Any = None,
    live: Any = False,
    speed: Any = 0,
) -> RestoreRequest:
    """A queued restore's arguments, parsed, if this worker's policy admits them."""
    if not _is_name(domain):
        raise _bad("restore", "domain", domain, "want a domain name from the config")
    config.domain(domain)  # UnknownDomainError names the known ones
    if backup_id is not None:
        try:
            check_backup_id(backup_id)
        except StorageError:
            raise _bad(
                "restore", "backup_id", backup_id, "want e.g. 20260101T020000.000000Z-1a2b3c4d"
            ) from None
    when = _parse_at(at)
    if backup_id is not None and when is not None:
        raise JobRefusedError("restore refused (job arguments): give backup_id or at, not both")
    args = RestoreRequest(
        domain=domain,
        backup_id=backup_id,
        at=when,
        to_dir=_absolute_dir(to_dir),
        incoming=_flag("restore", "incoming", incoming),
        boot=_flag("restore", "boot", boot),
        force=_flag("restore", "force", force),
        disks=_names("restore", "disks", disks),
        live=_flag("restore", "live", live),
        speed=_rate("restore", "speed", speed),
    )
    if args.live and (args.incoming or args.boot or args.disks):
        raise JobRefusedError(
            "restore refused (job arguments): live goes with neither incoming, boot nor disks"
        )
    if args.speed and not args.live:
        raise JobRefusedError("restore refused (job arguments): speed is for live restores")
    target = args.to_dir
    if target is None and (args.incoming or args.live):
        target = config.incoming_image_dir(domain)
    if target is not None:
        _check_under_roots(config, target)
    if args.force and not config.worker.allow_force_from_queue:
        raise _refuse(
            "restore",
            "worker.allow_force_from_queue",
            "force (replace existing images) is not taken from the queue; set "
            "worker.allow_force_from_queue: true on this worker, or restore with the CLI "
            "without a broker",
        )
    return args


def _parse_at(at: Any) -> datetime | None:
    if at is None:
        return None
    try:
        if not isinstance(at, str):
            raise ValueError(at)
        when = datetime.fromisoformat(at)
    except ValueError:
        raise _bad(
            "restore", "at", at, "want an ISO 8601 time, e.g. 2026-01-02T03:04:05+00:00"
        ) from None
    # As the CLI reads --at: a time without an offset is UTC.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _absolute_dir(to_dir: Any) -> Path | None:
    if to_dir is None:
        return None
    if not isinstance(to_dir, str) or "\0" in to_dir or not os.path.isabs(to_dir):
        raise _bad("restore", "to_dir", to_dir, "want an absolute path on the worker's host")
    return Path(to_dir)


def _check_under_roots(config: FleetConfig, target: Path) -> None:
    roots = config.restore_roots()
    if not roots:
        raise _refuse(
            "restore",
            "worker.restore_roots",
            "this worker has no restore roots (worker.restore_roots: []), so it takes no "
            "restore from the queue; restore with the CLI without a broker",
        )
    # Symlinks and '..' resolved: the directory the files would really land in. Whoever
    # could plant a symlink in a root after this check is on the host already.
    real = Path(os.path.realpath(target))
    if any(real == root or root in real.parents for root in roots):
        return
    shown = str(target) if real == target else f"{target} (really {real})"
    raise _refuse(
        "restore",
        "worker.restore_roots",
        f"target {shown} is not under a restore root of this worker "
        f"({', '.join(map(str, roots))}); restore under one, add a root to "
        "worker.restore_roots, or restore with the CLI without a broker",
    )


# -- prune --------------------------------------------------------------------------


def keeps_at_least(policy: dict[str, int], allowed: dict[str, int]) -> bool:
    """True when ``policy`` keeps every backup ``allowed`` keeps (rule by rule).

    Each rule keeps the newest N (per period), and a backup is kept when any rule keeps
    it (storage.prune): so a rule with a larger N keeps a superset, and extra rules only
    keep more.
    """
    return all(policy.get(rule, 0) >= count for rule, count in allowed.items())


def _rules(policy: RetentionPolicy) -> dict[str, int]:
    return {rule_name(k): v for k, v in policy.model_dump(exclude_none=True).items()}


def _spell(rules: dict[str, int]) -> str:
    return ", ".join(f"{KEEP_PREFIX}{rule}: {count}" for rule, count in rules.items())


def _policy_rules(policy: Any) -> dict[str, int]:
    """The queued policy as {rule: count}; either spelling (``keep_last`` or ``last``)."""
    want = "want {keep_<rule>: N, ...} with rules last/hourly/daily/weekly/monthly/yearly, N >= 1"
    if not isinstance(policy, dict) or not policy:
        raise _bad("prune", "policy", policy, want)
    rules: dict[str, int] = {}
    for key, count in policy.items():
        rule = rule_name(key) if isinstance(key, str) else key
        valid_count = isinstance(count, int) and not isinstance(count, bool) and count >= 1
        if rule not in KEEP_RULES or rule in rules or not valid_count:
            raise _bad("prune", "policy", policy, want)
        rules[rule] = count
    return {rule: rules[rule] for rule in KEEP_RULES if rule in rules}


def check_repository(config: FleetConfig, job: str, repository: Any) -> str | None:
    """A queued storage job's repository name (None: the primary) if this worker's config
    has it: a job for a repository the worker does not know is refused, not run on the
    primary."""
    if repository is None:
        return None
    if not isinstance(repository, str) or repository not in config.repositories:
        known = ", ".join(sorted(config.repositories)) or "none"
        raise _refuse(
            job,
            "repositories",
            f"repository {str(repository)[:80]!r} is not in this worker's config (known: {known})",
        )
    return repository


@dataclass(frozen=True)
class CopyArgs:
    """A queued copy's arguments, checked; ``retention`` applies on the target after it."""

    to: str
    source: str | None
    domains: list[str] | None  # None: every domain in the source
    backup_id: str | None
    retention: RetentionPolicy | None = None


def check_copy_job(config: FleetConfig, copy_job: Any) -> CopyArgs:
    """A scheduled copy: everything comes from this worker's ``copy_jobs`` entry."""
    if not isinstance(copy_job, str) or copy_job not in config.copy_jobs:
        raise _refuse("copy", "copy_jobs", f"{str(copy_job)[:80]!r} is not in this worker's config")
    job = config.copy_jobs[copy_job]
    domains = config.domains_matching(job.domains)
    return CopyArgs(job.to, job.source, domains, None, job.retention)


def check_copy(config: FleetConfig, to: Any, source: Any, domains: Any, backup_id: Any) -> CopyArgs:
    """A queued copy's arguments if this worker's config has both repositories."""
    target = check_repository(config, "copy", to)
    if target is None:
        raise _refuse("copy", "repositories", "a copy needs a target repository name")
    origin = check_repository(config, "copy", source)
    if origin == target:
        raise _refuse("copy", "repositories", f"source and target are both {target!r}")
    names = _names("copy", "domains", domains)
    if backup_id is not None:
        try:
            check_backup_id(backup_id)
        except (StorageError, TypeError):
            raise _refuse("copy", "backup_id", f"{str(backup_id)[:80]!r} is no backup id") from None
    return CopyArgs(target, origin, None if names is None else list(names), backup_id)


def check_prune(
    config: FleetConfig, policy: Any, domains: Any, dry_run: Any, repository: str | None = None
) -> dict[str, int]:
    """A queued prune's rules ({rule: count}) if this worker's policy admits the prune:
    a retention configured for the domains, the repository, or worker.prune_policies."""
    rules = _policy_rules(policy)
    names = _names("prune", "domains", domains)
    if _flag("prune", "dry_run", dry_run):
        return rules  # deletes nothing
    listed = [_rules(p) for p in config.worker.prune_policies]
    own = config.repositories[repository].retention if repository is not None else None
    if own is not None:
        listed.append(_rules(own))
    if names is None:
        if not any(keeps_at_least(rules, allowed) for allowed in listed):
            raise _refuse(
                "prune",
                "worker.prune_policies",
                f"{_spell(rules)} for all domains: a queued prune of every domain needs a "
                "retention that keeps at least what a worker.prune_policies entry keeps; "
                "name the domains, or add the policy there",
            )
        return rules
    for name in dict.fromkeys(names):
        scheduled = [
            (f"schedule {sched_name}", _rules(sched.retention))
            for sched_name, sched in sorted(config.schedules.items())
            if sched.retention is not None and name in config.domains_matching(sched.domains)
        ]
        options = scheduled + [("worker.prune_policies", allowed) for allowed in listed]
        if not any(keeps_at_least(rules, allowed) for _, allowed in options):
            known = "; ".join(f"{where}: {_spell(allowed)}" for where, allowed in options)
            raise _refuse(
                "prune",
                "worker.prune_policies",
                f"{_spell(rules)} for {name} keeps less than every retention configured for "
                f"it ({known or 'none'}); use one of those, or add the policy to "
                "worker.prune_policies",
            )
    return rules


# -- gc and verify ------------------------------------------------------------------


def check_gc(config: FleetConfig, grace: Any, dry_run: Any) -> float:
    """The grace window a queued gc runs with, if this worker's policy admits it."""
    dry = _flag("gc", "dry_run", dry_run)
    minimum = config.worker.gc_grace_seconds
    if grace is None:
        return minimum
    number = isinstance(grace, (int, float)) and not isinstance(grace, bool)
    if not number or not math.isfinite(grace) or grace < 0:
        raise _bad("gc", "grace", grace, "want a number of seconds >= 0")
    if grace < minimum and not dry:
        raise _refuse(
            "gc",
            "worker.gc_grace_seconds",
            f"grace {grace:g} s is shorter than this worker's minimum of {minimum:g} s "
            "(objects that young may belong to a backup still being written); ask for "
            "more, or lower worker.gc_grace_seconds",
        )
    return float(grace)


def check_restore_test(config: FleetConfig, domain: Any, job: Any) -> None:
    """Refuses a queued restore test that no ``verify_jobs`` entry of this worker's config
    asks for (the job names the entry; the worker runs it as its config says)."""
    entry = config.verify_jobs.get(job) if isinstance(job, str) else None
    if entry is None or entry.restore_test is None:
        raise _bad("restore-test", "job", job, "want a verify_jobs entry with restore_test")
    if domain not in config.restore_test_domains(job):
        raise _bad(
            "restore-test", "domain", domain, f"want one of verify_jobs.{job}'s domains with launch"
        )


def check_verify(
    backup_id: Any,
    read_data: Any,
    job: Any = None,
    config: FleetConfig | None = None,
    repository: Any = None,
) -> None:
    """Refuses a queued verify whose arguments are not a backup id and a flag, or that
    names a verify job this worker's config does not define (it runs the job as its own
    config says: the message only names it; verify jobs check the primary repository)."""
    if job is not None:
        if not isinstance(job, str) or config is None or job not in config.verify_jobs:
            raise _bad("verify", "job", job, "want the name of a verify_jobs entry")
        if backup_id is not None:
            raise _bad("verify", "backup_id", backup_id, "a verify job picks its own backups")
        if repository is not None:
            raise _bad("verify", "repository", repository, "a verify job checks the primary")
    if backup_id is not None:
        try:
            check_backup_id(backup_id)
        except StorageError:
            raise _bad(
                "verify", "backup_id", backup_id, "want e.g. 20260101T020000.000000Z-1a2b3c4d"
            ) from None
    _flag("verify", "read_data", read_data)
