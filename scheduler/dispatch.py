"""On-demand jobs from the CLI: run in-process, or — with a ``broker`` — through the queue.

The one entry point is ``run_job``; a command handler wraps its in-process call in it::

    result = run_job(ctx, args, "backup", {"domain": name, "mode": mode}, progress,
                     lambda: run_backup(config, name, mode, progress), domain=name)

Without a broker this is exactly the old call. With one, the job is enqueued on the
domain's host queue (repository jobs on ``storage``), followed with the same progress
reporter, and its result comes back as a read-only view with the same attributes and the
same ``to_json()`` as the in-process result object, so the handler prints exactly what it
prints for a local run. A failed job raises ``RemoteJobError`` (exit 1) with the worker's
message. ``--no-wait`` prints the job id (``{"job_id": ...}`` with ``--json``) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from vmvault.scheduler.errors import SchedulerError
from vmvault.worker.redact import mask_url, redact

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.storage.progress import Progress
    from vmvault.worker.jobs import JobRecord, JobStore

T = TypeVar("T")

_POLL_SECONDS = 0.2


class RemoteJobError(SchedulerError):
    """The queued job failed on its worker; the message is the worker's. Not retryable as is."""


class JobLostError(SchedulerError):
    """The job's record vanished (Redis restarted without persistence). Check ``vmvault jobs``."""


def broker_hint(err: BaseException) -> str:
    """What to check when Redis did not take a command: the password, or that it runs."""
    import redis

    if isinstance(err, redis.AuthenticationError) or "NOAUTH" in str(err):
        return (
            "check the broker's password (broker_password_file, or the URL) against Redis's"
            " requirepass"
        )
    return "is Redis running and the broker URL right?"


def add_wait_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-wait`` to a command that can run through the queue."""
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="with a broker configured: enqueue the job, print its id and return at once",
    )


def run_job(
    ctx: CliContext,
    args: argparse.Namespace,
    job_type: str,
    kwargs: dict[str, Any],
    progress: Progress | None,
    local: Callable[[], T],
    remote: Callable[[dict[str, Any]], T],
    domain: str | None = None,
) -> T:
    """Run ``local()`` in-process, or the same job through the queue when a broker is set.

    ``remote`` turns the job's JSON result (the worker's ``to_json()``) back into what
    ``local()`` returns (``BackupResult.from_json`` ...), so the handler prints both alike.
    """
    import redis
    from kombu.exceptions import OperationalError

    from vmvault.scheduler.enqueue import JobRequest, enqueue
    from vmvault.worker.jobs import JobStore

    config = ctx.config
    if config.broker is None:
        if getattr(args, "no_wait", False):
            raise SchedulerError(
                "--no-wait needs a broker in the config (jobs run in-process without one)"
            )
        return local()
    from vmvault.worker.celery_app import configure

    url = config.broker_url()
    assert url is not None
    app = configure(config)
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    store = JobStore(client)
    host = config.domain(domain).host if domain is not None else None
    request = JobRequest(type=job_type, kwargs=kwargs, domain=domain, host=host)
    try:
        job_id = enqueue(app, store, [request])[0]
    except (redis.RedisError, OSError, OperationalError) as err:
        raise SchedulerError(
            f"cannot enqueue the {job_type} job on {mask_url(url)}: {redact(str(err))}; "
            f"{broker_hint(err)}"
        ) from err
    if getattr(args, "no_wait", False):
        if ctx.json:
            ctx.emit({"job_id": job_id, "queue": request.target_queue})
        else:
            print(job_id, file=ctx.stdout)
            ctx.note(f"{job_type} job {job_id} queued on {request.target_queue}")
        raise SystemExit(0)
    if not ctx.json:
        ctx.note(f"{job_type} job {job_id} queued on {request.target_queue}")
    record = follow(store, job_id, progress)
    if record.state != "succeeded":
        raise RemoteJobError(f"{job_type} job {job_id} failed on {record.worker}: {record.error}")
    doc: dict[str, Any] = json.loads(record.result) if record.result else {}
    return remote(doc)


def follow(
    store: JobStore,
    job_id: str,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> JobRecord:
    """Poll the job's record until it ends, feeding its progress to ``progress``."""
    from vmvault.worker.jobs import FINAL_STATES

    deadline = None if timeout is None else time.monotonic() + timeout
    for record in _poll(store, job_id):
        if progress is not None and record.phase:
            progress(record.phase, record.done, record.total)
        if record.state in FINAL_STATES:
            return record
        if deadline is not None and time.monotonic() > deadline:
            raise SchedulerError(f"job {job_id} still {record.state} after {timeout:.0f}s")
    raise AssertionError("unreachable")


def _poll(store: JobStore, job_id: str) -> Iterator[JobRecord]:
    import redis

    misses = 0
    while True:
        try:
            record = store.get(job_id)
        except redis.RedisError:
            record = None  # Redis restarting: keep waiting a little
        if record is None:
            misses += 1
            if misses * _POLL_SECONDS > 30:
                raise JobLostError(
                    f"job {job_id}: its record is gone (Redis restarted?); "
                    "see 'vmvault jobs' and the repository for what happened"
                )
        else:
            misses = 0
            yield record
        time.sleep(_POLL_SECONDS)
