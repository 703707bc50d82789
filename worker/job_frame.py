"""The job frame every Celery task runs in: registry, lease, replay guard, retry, metrics.

Each job (1) is checked against the worker's queue policy (``admit``, worker.job_policy):
a refused job ends failed, having touched nothing; (2) marks its job running in the
registry; (3) for backup/restore takes the fleet-wide domain lease (a busy domain is
retried later: taking a lock is idempotent); (4) runs the job function with a progress
reporter that publishes (phase, done, total) through ``update_state`` and the registry
and stops the job if the lease was lost; (5) records the outcome and metrics. A restore
that a worker already started is never replayed. The task stubs are in worker/tasks.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Task, states
from celery.signals import worker_process_init

from vmvault.worker.celery_app import fleet_config
from vmvault.worker.config import FleetConfig, UnknownDomainError
from vmvault.worker.errors import WorkerError
from vmvault.worker.job_policy import JobRefusedError
from vmvault.worker.jobs import JobRecord, JobStore
from vmvault.worker.metrics import record_job
from vmvault.worker.notify_events import job_ended
from vmvault.worker.redis_keys import DOMAIN_LOCK_PREFIX
from vmvault.worker.redis_lock import LockBusyError, RedisLease
from vmvault.worker.routing import queue_for
from vmvault.worker.signals import Terminated, signals_as_exceptions

log = logging.getLogger(__name__)

T = TypeVar("T")

WORKER_HOST_ENV = "VMVAULT_WORKER_HOST"

# Progress is published at most this often: a backup reports per chunk.
_PROGRESS_INTERVAL = 0.5

_client: redis.Redis | None = None


class MisroutedJobError(WorkerError):
    """A host-bound job reached another host's worker. Not retryable: check the routing."""


class JobTerminatedError(WorkerError):
    """The worker process running the job got SIGTERM; the job tore down and stopped.
    Retryable as a new job."""

    retryable = True


class ReplayedJobError(WorkerError):
    """A restore that a worker already started came back (redelivered): never re-run it."""


# Jobs that must not run twice: Redis redelivers an unacked message after the visibility
# timeout whatever ``reject_on_worker_lost`` says, so the registry decides.
_NOT_REPLAYED = frozenset({"restore"})
# Registry states of a job no worker has started yet (``waiting``: retried on a busy lock).
_NOT_STARTED = frozenset({"queued", "waiting"})


def redis_client() -> redis.Redis:
    """This process's Redis client for registry, leases and metrics (not shared across fork)."""
    global _client
    if _client is None:
        broker = fleet_config().broker_url()
        assert broker is not None
        _client = redis.Redis.from_url(
            broker, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
    return _client


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_client_after_fork(**_: Any) -> None:
    # A forked pool process must not reuse the parent's sockets.
    global _client
    _client = None


class JobProgress:
    """The ``Progress`` a task hands to the job function.

    Publishes to the Celery task state (``PROGRESS``, meta phase/done/total) and to the
    job registry, throttled; raises ``LockLostError`` when the domain lease was lost, so
    the job function's teardown runs and nothing is written next to a second owner.
    """

    def __init__(self, task: Task, store: JobStore, job_id: str, lease: RedisLease | None) -> None:
        self.task = task
        self.store = store
        self.job_id = job_id
        self.lease = lease
        self._last = 0.0
        self._phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.lease is not None:
            self.lease.check()
        now = time.monotonic()
        if phase == self._phase and now - self._last < _PROGRESS_INTERVAL and done < total:
            return
        self._phase = phase
        self._last = now
        meta = {"phase": phase, "done": done, "total": total}
        try:
            self.task.update_state(state="PROGRESS", meta=meta)
            self.store.update(self.job_id, heartbeat=time.time(), **meta)
        except Exception as err:
            # Progress is advisory; a Redis blip (redis-py or Celery backend error) must
            # not fail a backup.
            log.warning("job %s: progress not published: %s", self.job_id, err)


def _result_json(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        return result
    to_json = getattr(result, "to_json", None)
    if callable(to_json):
        out: dict[str, Any] = to_json()
        return out
    return {"result": result}


def _check_host(config: FleetConfig, job_id: str, domain: str | None) -> str:
    """The domain's host; refuses a host-bound job that reached another host's worker."""
    if domain is None:
        return ""
    host = config.domain(domain).host  # UnknownDomainError if the config lost it
    this_host = os.environ.get(WORKER_HOST_ENV)
    if this_host and this_host != host:
        raise MisroutedJobError(
            f"job {job_id} for domain {domain!r} (host {host}) reached the worker of "
            f"{this_host}: check domains.{domain}.host and the worker's --host"
        )
    return host


def _record_refusal(
    store: JobStore,
    job_id: str,
    worker_name: str,
    err: Exception,
    job_type: str,
    domain: str | None,
) -> None:
    """A job refused before it started still ends ``failed`` in the registry, with why,
    and opens its problem like any failed job (an operator must fix the config or routing).
    """
    error = f"{type(err).__name__}: {err}"
    store.update(job_id, state="failed", error=error, worker=worker_name, finished=time.time())
    if domain is not None and domain not in fleet_config().domains:
        # The name came from the queue, not the config: one problem for all such jobs.
        domain = "unknown-domain"
    job_ended(store.client, job_type, domain, "failed", error)


def _register(store: JobStore, task: Task, job_type: str, domain: str, host: str) -> None:
    """Put a job nobody registered (e.g. sent with ``celery call``) into the registry."""
    queue = (task.request.delivery_info or {}).get("routing_key")
    store.create(
        [
            JobRecord(
                id=task.request.id,
                type=job_type,
                queue=queue or queue_for(job_type, host or None),
                domain=domain,
                host=host,
            )
        ]
    )


def admit(task: Task, job_type: str, domain: Any, check: Callable[[], T]) -> T:
    """Run the queue policy's ``check`` of a job's arguments (worker.job_policy).

    A refused job ends ``failed`` with the rule in its error, listed by ``vmvault jobs``
    even when nobody registered it, before anything (lease, files, repository) is touched.
    """
    try:
        return check()
    except (JobRefusedError, UnknownDomainError) as err:
        store = JobStore(redis_client())
        job_id: str = task.request.id
        config = fleet_config()
        name = domain if isinstance(domain, str) and domain in config.domains else ""
        host = config.domains[name].host if name else ""
        if store.get(job_id) is None:
            _register(store, task, job_type, name, host)
        worker_name = task.request.hostname or socket.gethostname()
        _record_refusal(store, job_id, worker_name, err, job_type, name or None)
        log.warning("job %s: %s refused: %s", job_id, job_type, err)
        raise


def run_job(
    task: Task,
    job_type: str,
    domain: str | None,
    work: Callable[[JobProgress], Any],
) -> dict[str, Any]:
    """Common frame of every job: registry, lease, progress, outcome, metrics."""
    config = fleet_config()
    client = redis_client()
    store = JobStore(client)
    job_id: str = task.request.id
    worker_name = task.request.hostname or socket.gethostname()
    try:
        host = _check_host(config, job_id, domain)
    except Exception as err:
        _record_refusal(store, job_id, worker_name, err, job_type, domain)
        raise
    existing = store.get(job_id)
    if existing is not None and job_type in _NOT_REPLAYED and existing.state not in _NOT_STARTED:
        # A worker already started it (it died, or ended without acking): the operator
        # decides whether to run it again, hours later a replay could clobber newer data.
        replay = ReplayedJobError(
            f"{job_type} job {job_id} was already started by {existing.worker or 'a worker'} "
            f"(state {existing.state}) and came back after that worker died: not replayed; "
            "check the domain and send a new job if needed"
        )
        _record_refusal(store, job_id, worker_name, replay, job_type, domain)
        raise replay
    if existing is None:
        # Sent by something that did not register it (e.g. celery call): register now.
        _register(store, task, job_type, domain or "", host)
    lease: RedisLease | None = None
    if domain is not None:
        lease = RedisLease(
            client,
            DOMAIN_LOCK_PREFIX + domain,
            config.scheduler.lock_ttl_seconds,
            owner=f"{worker_name}/{job_id}",
        )
        try:
            lease.acquire()
        except LockBusyError as err:
            # Taking a lock is idempotent: wait for the other job instead of failing.
            countdown = min(max(config.scheduler.lock_ttl_seconds / 2, 1.0), 30.0)
            retries = int(config.scheduler.job_time_limit_seconds / countdown)
            store.update(job_id, state="waiting", error=str(err))
            raise task.retry(exc=err, countdown=countdown, max_retries=retries) from err
    started = time.time()
    store.update(
        job_id, state="running", started=started, heartbeat=started, worker=worker_name, error=""
    )
    log.info("job %s: %s %s started", job_id, job_type, domain or "")
    outcome = "failed"
    error = ""
    result: dict[str, Any] = {}
    try:
        result = _result_json(_until_sigterm(work, JobProgress(task, store, job_id, lease)))
        outcome = "succeeded"
        _store_final(task, states.SUCCESS, result)
        return result
    except BaseException as err:
        if job_type in ("prune", "gc") and _will_retry_locked(task, err):
            # The task retries it (``retry_if_locked``): not an end, or a CLI following
            # the job would report a failure for a job that runs again shortly.
            outcome = "waiting"
        else:
            _store_final(task, states.FAILURE, err)
        error = f"{type(err).__name__}: {err}"
        store.update(job_id, error=error)
        raise
    finally:
        finished = time.time()
        if lease is not None:
            lease.release()
        if outcome == "waiting":
            _registry_write(job_id, lambda: store.update(job_id, state="waiting"))
        else:
            _registry_write(
                job_id,
                lambda: _record_end(store, job_type, host, job_id, outcome, finished, result),
            )
            record_job(
                client, job_type, outcome, finished - started, domain or "", finished, result
            )
            # Only a job's end opens or clears its problem: a lock wait is no failure.
            job_ended(client, job_type, domain, outcome, error)
        log.info(
            "job %s: %s %s %s in %.1fs", job_id, job_type, domain or "", outcome, finished - started
        )


def _until_sigterm(work: Callable[[JobProgress], Any], progress: JobProgress) -> Any:
    """Run the job with SIGTERM turned into an exception, so its teardown runs.

    A pool process otherwise dies on SIGTERM at once (Celery resets it to the default),
    e.g. under systemd's default ``KillMode=control-group``, leaving fleecing in QEMU.
    SIGINT stays ignored there: the worker's main process handles Ctrl-C.
    """
    try:
        with signals_as_exceptions((signal.SIGTERM,)):
            return work(progress)
    except Terminated as err:
        raise JobTerminatedError(
            f"job {progress.job_id}: the worker process got SIGTERM; the job tore down and "
            "stopped (run it again)"
        ) from err


def _store_final(task: Task, state: str, value: Any) -> None:
    """Keep Celery's result backend truthful for jobs sent with ``ignore_result``.

    The enqueuer skips the result subscription (see ``scheduler.enqueue``), which also
    stops Celery storing the outcome; progress was stored with ``update_state``, so the
    final state is stored here or the backend would say ``PROGRESS`` forever.
    """
    if not task.request.ignore_result:
        return
    try:
        task.backend.store_result(task.request.id, value, state, request=task.request)
    except Exception as err:  # the registry has the outcome; never fail a job on this
        log.warning(
            "job %s: final state not stored in the result backend: %s", task.request.id, err
        )


def _record_end(
    store: JobStore,
    job_type: str,
    host: str,
    job_id: str,
    outcome: str,
    finished: float,
    result: dict[str, Any],
) -> None:
    if job_type == "backup" and host:
        store.remove_in_flight(host, job_id)
    text = json.dumps(result, default=str) if result else ""
    store.update(job_id, state=outcome, finished=finished, result=text)


def _registry_write(job_id: str, write: Callable[[], None], patience: float = 15.0) -> None:
    """Write a job's end to the registry, waiting out a short Redis outage (a restart).

    The job's real outcome (a committed manifest, restored disks) does not depend on it:
    after ``patience`` seconds it is logged and dropped instead of failing the job.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            write()
            return
        except redis.RedisError as err:
            if time.monotonic() > deadline:
                log.warning("job %s: end not recorded in the job registry: %s", job_id, err)
                return
            time.sleep(0.5)


def fleet_repository(name: str | None = None) -> Any:
    """The fleet config's repository (``repositories[name]``; None: the primary one),
    opened for one storage job."""
    return fleet_config().repository_config(name).open()


_LOCKED_RETRIES = 20


def _will_retry_locked(task: Task, err: BaseException) -> bool:
    """True when ``retry_if_locked`` will retry this failure (retries left)."""
    from vmvault.storage.errors import RepositoryLockedError

    retries: int = task.request.retries or 0
    return isinstance(err, RepositoryLockedError) and retries < _LOCKED_RETRIES


def retry_if_locked(task: Task, err: Exception) -> None:
    """Repository lock conflicts (GC vs. writers) are waited out: the jobs are idempotent."""
    if _will_retry_locked(task, err):
        raise task.retry(exc=err, countdown=30, max_retries=_LOCKED_RETRIES) from err
