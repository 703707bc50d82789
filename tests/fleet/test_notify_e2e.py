"""Notifications through the real fleet: Celery worker, scheduler processes, QEMU.

A backup whose QMP socket is gone fails, is sent again and fails again, then succeeds
once QEMU is back: the webhook and the SMTP server each get exactly one problem and one
recovery, with two scheduler replicas running. A scheduler SIGKILLed while a webhook
holds the request loses nothing: its successor sends the event again.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.fixtures.common import stop_process, wait_until
from tests.fixtures.notify import SmtpServer, WebhookServer
from tests.fixtures.qemu import MiB, VmFactory
from tests.fleet.conftest import Fleet
from vmvault.scheduler.enqueue import JobRequest, enqueue
from vmvault.storage.repository import init_repository
from vmvault.worker.jobs import JobStore
from vmvault.worker.notify_events import job_ended
from vmvault.worker.redis_keys import NOTIFY_OUTBOX, NOTIFY_QUEUE_PREFIX


def _notifications(webhook: WebhookServer, smtp: SmtpServer, password: Path) -> dict[str, Any]:
    return {
        "retry_seconds": 0.2,
        "webhooks": {"ops": {"url": webhook.url}},
        "email": {
            "mail": {
                "smtp_host": smtp.host,
                "smtp_port": smtp.port,
                "ca_file": str(smtp.cert),
                "username": smtp.user,
                "password_file": str(password),
                "from": "vmvault@example.org",
                "to": ["ops@example.org"],
            }
        },
    }


def test_failed_backup_then_success_sends_one_problem_and_one_recovery(
    fleet: Fleet,
    qemu_vm_factory: VmFactory,
    webhook_server: WebhookServer,
    smtp_server: SmtpServer,
) -> None:
    web1 = qemu_vm_factory(disk_sizes=[4 * MiB], name="web1")
    repo_url = f"file://{fleet.tmp / 'repo'}"
    init_repository(repo_url, chunk_size=1 * MiB).close()
    password = fleet.tmp / "smtp.pass"
    password.write_text(smtp_server.password)
    fleet.write(
        repository={"url": repo_url},
        domains={"web1": {"host": "hv1", "qmp": str(web1.qmp_path)}},
        scheduler={"gc_interval_seconds": None, "tick_seconds": 0.2, "lease_seconds": 3},
        notifications=_notifications(webhook_server, smtp_server, password),
    )
    client = fleet.redis.client()
    store = JobStore(client)
    fleet.start_worker("hv1")
    fleet.vmvault("scheduler", "-v", log="sched-a.log")
    fleet.vmvault("scheduler", "-v", log="sched-b.log")
    # The first try of the problem event gets a 500: retried, still sent once.
    webhook_server.statuses[:] = [500]

    def backup() -> str:
        [job_id] = enqueue(
            fleet.app(),
            store,
            [JobRequest(type="backup", kwargs={"domain": "web1"}, domain="web1", host="hv1")],
        )
        return fleet.wait_jobs([job_id], timeout=120)[job_id].state

    web1.quit()  # the QMP socket is gone
    assert backup() == "failed"
    wait_until(lambda: len(webhook_server.events()) == 1, 60, "problem event")
    assert backup() == "failed"  # again: no second problem
    web1.restart()
    assert backup() == "succeeded"

    def all_delivered() -> bool:
        queues = [NOTIFY_OUTBOX, NOTIFY_QUEUE_PREFIX + "ops", NOTIFY_QUEUE_PREFIX + "mail"]
        return len(smtp_server.messages) == 2 and not any(client.llen(q) for q in queues)

    wait_until(all_delivered, 60, "both targets got both events")
    events = webhook_server.events()
    assert [(e["event"], e["kind"], e["domain"]) for e in events] == [
        ("problem", "job_failed", "web1"),
        ("recovery", "job_failed", "web1"),
    ]
    assert "backup of web1 failed" in events[0]["summary"]
    assert webhook_server.answered == [500, 200, 200]
    subjects = [str(m["Subject"]) for m in smtp_server.messages]
    assert subjects[0].startswith("[vmvault] PROBLEM: backup of web1 failed")
    assert subjects[1].startswith("[vmvault] RECOVERED: backup of web1")


def test_scheduler_killed_mid_delivery_loses_no_event(
    fleet: Fleet, webhook_server: WebhookServer
) -> None:
    fleet.write(
        scheduler={"gc_interval_seconds": None, "tick_seconds": 0.2, "lease_seconds": 2},
        notifications={
            "retry_seconds": 0.2,
            "webhooks": {"ops": {"url": webhook_server.url, "timeout_seconds": 2}},
        },
    )
    client = fleet.redis.client()
    webhook_server.gate.clear()  # the receiver holds the request
    job_ended(client, "backup", "web1", "failed", "QmpError: no socket")
    first = fleet.vmvault("scheduler", "-v", log="sched-a.log")
    assert webhook_server.arrived.wait(60), fleet.log("sched-a.log")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    webhook_server.gate.set()
    # Not acked: the event is still at the head of the target's queue.
    assert client.llen(NOTIFY_QUEUE_PREFIX + "ops") == 1
    second = fleet.vmvault("scheduler", "-v", log="sched-b.log")
    wait_until(lambda: not client.llen(NOTIFY_QUEUE_PREFIX + "ops"), 60, "the new leader sent it")
    stop_process(second, timeout=10)
    # At least once: the copy the killed scheduler never saw answered, then the resend.
    assert [e["event"] for e in webhook_server.events()] == ["problem", "problem"]


def test_a_refused_job_opens_its_problem(fleet: Fleet, webhook_server: WebhookServer) -> None:
    fleet.write(
        scheduler={"gc_interval_seconds": None, "tick_seconds": 0.2},
        notifications={"webhooks": {"ops": {"url": webhook_server.url}}},
    )
    client = fleet.redis.client()
    fleet.start_worker("hv2")
    # web1 lives on hv1: its backup on hv2's queue is refused before touching anything.
    [job_id] = enqueue(
        fleet.app(),
        JobStore(client),
        [JobRequest(type="backup", kwargs={"domain": "web1"}, domain="web1", queue="host.hv2")],
    )
    assert fleet.wait_jobs([job_id])[job_id].state == "failed"
    fleet.vmvault("scheduler", "-v", log="sched.log")
    wait_until(lambda: bool(webhook_server.events()), 60, "problem event")
    [event] = webhook_server.events()
    assert event["problem"] == "job:backup:web1"
    assert "MisroutedJobError" in event["summary"]
