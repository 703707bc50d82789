"""Fleet commands: ``worker``, ``scheduler``, ``jobs`` and ``status``.

They need a ``broker`` in the config (Redis); without one they explain how to add it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import add_command
from vmvault.scheduler.dispatch import broker_hint
from vmvault.scheduler.errors import SchedulerError
from vmvault.worker.redact import mask_url, redact
from vmvault.worker.routing import STORAGE_QUEUE, host_queue

if TYPE_CHECKING:
    import redis

    from vmvault.scheduler.cli_context import CliContext
    from vmvault.worker.config import FleetConfig
    from vmvault.worker.jobs import JobRecord

log = logging.getLogger(__name__)

_LOG_LEVELS = {0: "WARNING", 1: "INFO", 2: "DEBUG"}


class BrokerUnavailableError(SchedulerError):
    """Redis did not answer. Retryable once it is reachable."""

    retryable = True


def register(commands: Any) -> None:
    """Add ``worker``, ``scheduler``, ``jobs`` and ``status``."""
    worker = add_command(commands, "worker", "run this host's job worker (Celery on Redis)")
    worker.add_argument("--host", required=True, help="host name as in domains.<name>.host")
    worker.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="jobs run at once (default: hosts.<host>.max_concurrent, +1 with --storage)",
    )
    worker.add_argument(
        "--storage", action="store_true", help="also take repository jobs (verify/prune/gc)"
    )
    worker.add_argument("--metrics-port", type=int, metavar="PORT", help="serve /metrics")
    worker.set_defaults(func=_worker)

    sched = add_command(commands, "scheduler", "run the backup scheduler (one leader at a time)")
    sched.add_argument("--once", action="store_true", help="run one tick and exit")
    sched.add_argument("--metrics-port", type=int, metavar="PORT", help="serve /metrics")
    sched.set_defaults(func=_scheduler)

    jobs = add_command(commands, "jobs", "list recent and running jobs")
    jobs.add_argument("--limit", type=int, default=30, metavar="N", help="jobs to show")
    jobs.set_defaults(func=_jobs)

    status = add_command(
        commands, "status", "last successful backup per domain and whether it is overdue"
    )
    status.set_defaults(func=_status)


def _broker(config: FleetConfig, ctx: CliContext, command: str) -> str:
    """The broker URL to connect with (password included: never print it, see _redis)."""
    from vmvault.worker.config import ConfigError, config_path

    url = config.broker_url()
    if url is None:
        raise ConfigError(
            [
                f"{config_path(ctx.config_file)}: broker: required for 'vmvault {command}' "
                "(add e.g. broker: redis://redis:6379/0)"
            ]
        )
    return url


def _redis(url: str) -> redis.Redis:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as err:
        raise BrokerUnavailableError(
            f"cannot reach the broker {mask_url(url)}: {redact(str(err))}; {broker_hint(err)}"
        ) from err
    return client


def _all_queues(config: FleetConfig) -> list[str]:
    return sorted({host_queue(d.host) for d in config.domains.values()} | {STORAGE_QUEUE})


# -- worker ------------------------------------------------------------------------------


def _worker(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.config import CONFIG_ENV, ConfigError, config_path

    config = ctx.config
    broker = _broker(config, ctx, "worker")
    host: str = args.host
    hosts = {d.host for d in config.domains.values()}
    if host not in hosts and not args.storage:
        known = ", ".join(sorted(hosts)) or "none"
        raise ConfigError(
            [f"--host {host}: no domain runs on this host (hosts in the config: {known})"]
        )
    concurrency = args.concurrency or config.host(host).max_concurrent + (1 if args.storage else 0)
    if concurrency < 1:
        raise ConfigError(["--concurrency: must be at least 1"])
    client = _redis(broker)
    # Pool processes and anything they exec see the same config and know their host.
    os.environ[CONFIG_ENV] = str(config_path(ctx.config_file).resolve())
    from vmvault.worker.tasks import WORKER_HOST_ENV

    os.environ[WORKER_HOST_ENV] = host
    from vmvault.worker.celery_app import configure

    app = configure(config)
    _clean_leftovers(config, host)
    from vmvault.worker.reaper import Reaper

    # The main process reaps: pool processes run jobs, and fork does not copy threads.
    Reaper(config, host, config.scheduler.reaper_interval_seconds).start()
    queues = [host_queue(host)] + ([STORAGE_QUEUE] if args.storage else [])
    if args.metrics_port:
        from vmvault.worker.metrics import serve

        serve(client, _all_queues(config), args.metrics_port)
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{host}@{socket.gethostname()}",
        "--prefetch-multiplier",
        "1",
        "--optimization",
        "fair",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        _LOG_LEVELS[min(args.verbose, 2)] if args.verbose else "INFO",
    ]
    app.worker_main(argv)
    return 0


def _clean_leftovers(config: FleetConfig, host: str) -> None:
    """Before taking jobs, remove what a crashed worker left behind on this host's domains."""
    from vmvault.worker.reaper import reap_host

    cleaned = reap_host(config, host, thorough=True)
    if cleaned:
        log.warning("worker %s: cleaned leftovers of %d domain(s)", host, cleaned)


# -- scheduler ---------------------------------------------------------------------------


def _scheduler(args: argparse.Namespace, ctx: CliContext) -> int:
    config = ctx.config
    broker = _broker(config, ctx, "scheduler")
    client = _redis(broker)
    from vmvault.scheduler.scheduler_loop import Scheduler
    from vmvault.worker.celery_app import configure

    app = configure(config)
    scheduler = Scheduler(config, client, app)
    if args.metrics_port:
        from vmvault.worker.metrics import serve

        serve(client, _all_queues(config), args.metrics_port)
    if args.once:
        try:
            report = scheduler.tick()
            scheduler.notifier.join(timeout=60)  # what this tick started sending
        finally:
            scheduler.leadership.resign()
        doc = {
            "leader": report.leader,
            "planned": report.planned,
            "enqueued": report.enqueued,
            "seconds": round(report.seconds, 3),
        }
        if ctx.json:
            ctx.emit(doc)
        else:
            who = "leader" if report.leader else "not leader"
            ctx.say(f"tick ({who}): {len(report.enqueued)} job(s) enqueued")
        return 0
    scheduler.run()
    return 0


# -- jobs --------------------------------------------------------------------------------


def _age(stamp: float, now: float) -> str:
    if not stamp:
        return "-"
    secs = max(now - stamp, 0)
    if secs < 120:
        return f"{secs:.0f}s"
    if secs < 7200:
        return f"{secs / 60:.0f}m"
    if secs < 172800:
        return f"{secs / 3600:.1f}h"
    return f"{secs / 86400:.1f}d"


def job_state(job: JobRecord, lock_ttl: float, now: float) -> str:
    """The state to show: a running job whose heartbeat stopped is shown as ``stale``."""
    if job.state == "running" and job.heartbeat and now - job.heartbeat > 3 * lock_ttl:
        return "stale"
    return job.state


def _jobs(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.jobs import JobStore

    config = ctx.config
    client = _redis(_broker(config, ctx, "jobs"))
    records = JobStore(client).recent(max(args.limit, 1))
    now = time.time()
    ttl = config.scheduler.lock_ttl_seconds
    if ctx.json:
        docs = []
        for rec in records:
            doc = rec.to_json()
            doc["state"] = job_state(rec, ttl, now)
            docs.append(doc)
        ctx.emit({"jobs": docs})
        return 0
    if not records:
        ctx.say("no jobs")
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    # Job ids are what operators copy: never cut them, wrap the error instead.
    table.add_column("job", no_wrap=True, min_width=max(len(r.id) for r in records))
    for col in ("type", "state", "host", "domain", "progress", "age"):
        table.add_column(col, no_wrap=True)
    table.add_column("error", overflow="fold")
    for rec in records:
        progress = ""
        if rec.total:
            progress = f"{rec.phase} {100 * rec.done / rec.total:.0f}%".strip()
        elif rec.phase:
            progress = rec.phase
        table.add_row(
            rec.id,
            rec.type,
            job_state(rec, ttl, now),
            rec.host or "-",
            rec.domain or "-",
            progress,
            _age(rec.enqueued, now),
            rec.error[:60],
        )
    ctx.human.print(table)
    return 0


# -- status ------------------------------------------------------------------------------


def _status(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.scheduler.planner import overdue

    config = ctx.config
    now = datetime.now(UTC)
    last = _last_successes(config)
    leader = None
    if config.broker is not None:
        from vmvault.worker.redis_keys import LEADER_KEY

        raw = _redis(_broker(config, ctx, "status")).get(LEADER_KEY)
        leader = raw.decode().rsplit(":", 1)[0] if isinstance(raw, bytes) else None
    rows: list[dict[str, Any]] = []
    for name in sorted(config.domains):
        schedules = [
            s
            for s, sched in sorted(config.schedules.items())
            if name in config.domains_matching(sched.domains)
        ]
        backup_id, when = last.get(name, (None, None))
        late = any(overdue(config.schedules[s].cron, when, now) for s in schedules)
        rows.append(
            {
                "domain": name,
                "host": config.domains[name].host,
                "last_backup_id": backup_id,
                "last_success": None if when is None else when.isoformat(),
                "age_seconds": None if when is None else round((now - when).total_seconds()),
                "schedules": schedules,
                "overdue": late,
            }
        )
    if ctx.json:
        ctx.emit({"leader": leader, "domains": rows})
        return 0
    from rich.table import Table

    ctx.say(f"scheduler leader: {leader or 'none'}")
    table = Table(box=None, pad_edge=False)
    for col in ("domain", "host", "last backup", "age", "schedules", "overdue"):
        table.add_column(col)
    for row in rows:
        age = "-" if row["age_seconds"] is None else _age(0, row["age_seconds"])
        table.add_row(
            row["domain"],
            row["host"],
            row["last_backup_id"] or "never",
            age,
            ",".join(row["schedules"]) or "-",
            "OVERDUE" if row["overdue"] else "ok" if row["schedules"] else "-",
        )
    ctx.human.print(table)
    return 0


def _last_successes(config: FleetConfig) -> dict[str, tuple[str, datetime]]:
    """Newest committed backup per domain, from the repository (the source of truth)."""
    repository = config.repository.open()
    out: dict[str, tuple[str, datetime]] = {}
    for name in config.domains:
        manifest = repository.latest_manifest(name)
        if manifest is not None:
            out[name] = (manifest.backup_id, manifest.created)
    return out
