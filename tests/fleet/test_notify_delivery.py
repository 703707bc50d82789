"""Notification events and their delivery with real Redis, a real HTTP and SMTP server.

One event per problem however many workers race; a webhook answering 500 twice gets the
event once; a target that hangs holds up neither the tick nor the other targets; an
overdue domain gets one problem and one recovery; e-mail goes out over STARTTLS + AUTH.
"""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.common import free_port, wait_until
from tests.fixtures.notify import SmtpServer, WebhookServer
from tests.fixtures.redis import RedisServer
from tests.fleet.conftest import make_config
from vmvault.scheduler.notify_delivery import Notifier
from vmvault.scheduler.scheduler_loop import Scheduler
from vmvault.worker.celery_app import configure
from vmvault.worker.config import FleetConfig
from vmvault.worker.metrics import record_job
from vmvault.worker.notify_events import Event, job_ended, open_problem, open_problems
from vmvault.worker.redis_keys import NOTIFY_OUTBOX, NOTIFY_QUEUE_PREFIX


def _config(tmp: Path, redis_server: RedisServer, **notifications: Any) -> FleetConfig:
    return make_config(
        tmp,
        redis_server.url,
        notifications={"retry_seconds": 0.05, **notifications},
        scheduler={"gc_interval_seconds": None},
    )


def _deliver_all(notifier: Notifier, done: Any, what: str) -> None:
    """Pump like the scheduler's ticks do until ``done()``."""

    def step() -> bool:
        notifier.pump()
        notifier.join(5)
        return bool(done())

    wait_until(step, 30, what)


def test_racing_workers_emit_one_problem_and_one_recovery(redis_server: RedisServer) -> None:
    client = redis_server.client()
    barrier = threading.Barrier(8)

    def fail() -> None:
        barrier.wait()
        job_ended(redis_server.client(), "backup", "web1", "failed", "QmpError: no socket")

    threads = [threading.Thread(target=fail) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.llen(NOTIFY_OUTBOX) == 1
    assert list(open_problems(client)) == ["job:backup:web1"]
    # A failed re-run is no new problem; two successes make one recovery.
    job_ended(client, "backup", "web1", "failed", "QmpError: no socket")
    job_ended(client, "backup", "web1", "succeeded")
    job_ended(client, "backup", "web1", "succeeded")
    events = [Event.from_json(raw) for raw in client.lrange(NOTIFY_OUTBOX, 0, -1)]
    assert [(e.event, e.problem) for e in events] == [
        ("problem", "job:backup:web1"),
        ("recovery", "job:backup:web1"),
    ]
    assert "no socket" in events[0].summary
    assert open_problems(client) == {}


def test_webhook_500_twice_then_200_gets_the_event_once(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("VMV_TEST_TOKEN", "tok-123")
    config = _config(
        tmp_path,
        redis_server,
        webhooks={"ops": {"url": webhook_server.url, "token_env": "VMV_TEST_TOKEN"}},
    )
    client = redis_server.client()
    webhook_server.statuses[:] = [500, 500]
    job_ended(client, "backup", "web1", "failed", "QmpError: gone")
    notifier = Notifier(config, client)
    _deliver_all(notifier, lambda: webhook_server.events(), "webhook accepted the event")
    assert webhook_server.answered == [500, 500, 200]
    [event] = webhook_server.events()
    assert event["event"] == "problem" and event["kind"] == "job_failed"
    assert event["domain"] == "web1" and "gone" in event["summary"] and event["time"]
    assert webhook_server.headers[-1]["Authorization"] == "Bearer tok-123"
    # Acked: nothing is left to send, and a further pump sends nothing again.
    assert client.llen(NOTIFY_QUEUE_PREFIX + "ops") == 0
    notifier.pump()
    notifier.join(5)
    assert len(webhook_server.received) == 3


def test_gives_up_after_max_tries_and_goes_on(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path
) -> None:
    config = _config(
        tmp_path, redis_server, max_tries=2, webhooks={"ops": {"url": webhook_server.url}}
    )
    client = redis_server.client()
    webhook_server.statuses[:] = [503, 503]
    job_ended(client, "backup", "web1", "failed", "boom")
    job_ended(client, "backup", "web2", "failed", "bang")
    notifier = Notifier(config, client)
    _deliver_all(notifier, lambda: webhook_server.events(), "second event delivered")
    # The first event was dropped after two tries, the second one went through.
    assert webhook_server.answered == [503, 503, 200]
    assert [e["domain"] for e in webhook_server.events()] == ["web2"]


def test_a_hanging_target_blocks_neither_the_tick_nor_other_targets(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path
) -> None:
    # A listener that never answers: the sender waits for its full timeout.
    hole = socket.socket()
    hole.bind(("127.0.0.1", free_port()))
    hole.listen(8)
    port = hole.getsockname()[1]
    config = _config(
        tmp_path,
        redis_server,
        webhooks={
            "hole": {"url": f"http://127.0.0.1:{port}/", "timeout_seconds": 60},
            "ops": {"url": webhook_server.url},
        },
    )
    client = redis_server.client()
    sched = Scheduler(config, client, configure(config), name="t")
    try:
        job_ended(client, "backup", "web1", "failed", "boom")
        report = sched.tick()  # returns while the "hole" sender is stuck
        assert report.leader
        wait_until(lambda: bool(webhook_server.events()), 30, "ops got the event")
        assert sched.notifier._threads["hole"].is_alive()
        # Further ticks run meanwhile and start no second sender for the stuck target.
        sched.tick()
        assert sum(t.name == "notify-hole" for t in threading.enumerate()) == 1
        assert client.llen(NOTIFY_QUEUE_PREFIX + "hole") == 1
    finally:
        hole.close()
        sched.notifier.join(70)
        sched.leadership.resign()


def test_email_over_starttls_with_auth(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    password = tmp_path / "smtp.pass"
    password.write_text(smtp_server.password + "\n")
    config = _config(
        tmp_path,
        redis_server,
        email={
            "mail": {
                "smtp_host": smtp_server.host,
                "smtp_port": smtp_server.port,
                "starttls": True,
                "ca_file": str(smtp_server.cert),
                "username": smtp_server.user,
                "password_file": str(password),
                "from": "vmvault@example.org",
                "to": ["ops@example.org"],
            }
        },
    )
    client = redis_server.client()
    job_ended(client, "verify", None, "failed", "VerifyError: chunk x at vda offset 4096")
    job_ended(client, "verify", None, "succeeded")
    notifier = Notifier(config, client)
    _deliver_all(notifier, lambda: len(smtp_server.messages) >= 2, "two e-mails")
    assert smtp_server.logins == [smtp_server.user, smtp_server.user]
    subjects = [str(m["Subject"]) for m in smtp_server.messages]
    assert subjects[0].startswith("[vmvault] PROBLEM: verify of the repository failed")
    assert subjects[1].startswith("[vmvault] RECOVERED: verify of the repository")
    assert "vda offset 4096" in str(smtp_server.messages[0].get_payload())


def test_wrong_smtp_password_is_retried_not_lost(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("VMV_SMTP_PASS", "wrong")
    config = _config(
        tmp_path,
        redis_server,
        email={
            "mail": {
                "smtp_host": smtp_server.host,
                "smtp_port": smtp_server.port,
                "ca_file": str(smtp_server.cert),
                "username": smtp_server.user,
                "password_env": "VMV_SMTP_PASS",
                "from": "vmvault@example.org",
                "to": ["ops@example.org"],
            }
        },
    )
    client = redis_server.client()
    job_ended(client, "backup", "web1", "failed", "boom")
    notifier = Notifier(config, client)
    notifier.pump()
    notifier.join(30)
    assert smtp_server.messages == []
    assert client.llen(NOTIFY_QUEUE_PREFIX + "mail") == 1  # kept for the next try
    monkeypatch.setenv("VMV_SMTP_PASS", smtp_server.password)
    _deliver_all(notifier, lambda: len(smtp_server.messages) == 1, "e-mail after the fix")


def test_overdue_domain_gets_one_problem_and_one_recovery(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        redis_server.url,
        schedules={"hourly": {"cron": "0 * * * *", "domains": ["web1"]}},
        notifications={"retry_seconds": 0.05, "webhooks": {"ops": {"url": webhook_server.url}}},
        scheduler={"gc_interval_seconds": None},
    )
    client = redis_server.client()
    sched = Scheduler(config, client, configure(config), name="t")
    start = datetime(2026, 3, 1, 2, 0, 30, tzinfo=UTC)
    try:
        # First seen at 02:00:30; 02:00 and 03:00 slots pass without a good backup.
        assert sched.tick(start).overdue == []
        assert sched.tick(start + timedelta(hours=1)).overdue == []
        late = start + timedelta(hours=2)
        assert sched.tick(late).overdue == ["web1"]
        assert sched.tick(late + timedelta(minutes=5)).overdue == ["web1"]  # no second event
        sched.notifier.join(10)
        # A good backup (recorded as the workers do) clears it.
        good = late + timedelta(minutes=10)
        record_job(client, "backup", "succeeded", 1.0, "web1", good.timestamp())
        assert sched.tick(good + timedelta(seconds=1)).overdue == []
        sched.tick(good + timedelta(seconds=2))
        wait_until(lambda: len(webhook_server.events()) == 2, 30, "problem and recovery")
        sched.notifier.join(10)
    finally:
        sched.leadership.resign()
    events = webhook_server.events()
    assert [(e["event"], e["kind"], e["domain"]) for e in events] == [
        ("problem", "overdue", "web1"),
        ("recovery", "overdue", "web1"),
    ]
    assert len(webhook_server.received) == 2


def test_unreadable_event_is_dropped_not_stuck(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_server, webhooks={"ops": {"url": webhook_server.url}})
    client = redis_server.client()
    client.rpush(NOTIFY_OUTBOX, b"{not json", b'["a", "list"]')
    open_problem(
        client, Event("problem", "job_failed", "job:gc:repository", "gc failed", "2026-01-01")
    )
    notifier = Notifier(config, client)
    _deliver_all(notifier, lambda: webhook_server.events(), "the good event")
    assert [e["problem"] for e in webhook_server.events()] == ["job:gc:repository"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"url": "http://x/", "token": "abc"}, "token: secrets do not belong in the config"),
        ({"url": "http://x/", "token_file": "t", "token_env": "T"}, "keep one"),
        ({"url": "ftp://x/"}, "bad webhook URL"),
    ],
)
def test_webhook_config_refuses(tmp_path: Path, target: dict[str, Any], message: str) -> None:
    from vmvault.worker.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        make_config(tmp_path, notifications={"webhooks": {"ops": target}})
    assert "notifications.webhooks.ops" in str(err.value)


def test_email_config_refuses_literal_password_and_clear_auth(tmp_path: Path) -> None:
    from vmvault.worker.config import ConfigError

    base = {"smtp_host": "mx", "from": "a@b", "to": ["c@d"], "username": "u"}
    with pytest.raises(ConfigError, match="password: secrets do not belong"):
        make_config(tmp_path, notifications={"email": {"m": {**base, "password": "x"}}})
    with pytest.raises(ConfigError, match="in clear"):
        make_config(
            tmp_path,
            notifications={"email": {"m": {**base, "password_env": "P", "starttls": False}}},
        )


def test_a_redirect_is_a_failed_try_not_a_delivery(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_server, webhooks={"ops": {"url": webhook_server.url}})
    client = redis_server.client()
    webhook_server.statuses[:] = [302]
    job_ended(client, "backup", "web1", "failed", "boom")
    _deliver_all(Notifier(config, client), lambda: webhook_server.events(), "delivered")
    assert webhook_server.answered == [302, 200]
    assert webhook_server.gets == 0


def test_overdue_problem_of_a_domain_no_longer_scheduled_is_cleared(
    redis_server: RedisServer, webhook_server: WebhookServer, tmp_path: Path
) -> None:
    notifications = {"webhooks": {"ops": {"url": webhook_server.url}}}
    scheduled = make_config(
        tmp_path,
        redis_server.url,
        schedules={"hourly": {"cron": "0 * * * *", "domains": ["web1"]}},
        scheduler={"gc_interval_seconds": None},
        notifications=notifications,
    )
    client = redis_server.client()
    start = datetime(2026, 3, 1, 2, 0, 30, tzinfo=UTC)
    sched = Scheduler(scheduled, client, configure(scheduled), name="t")
    try:
        sched.tick(start)
        assert sched.tick(start + timedelta(hours=2)).overdue == ["web1"]
    finally:
        sched.leadership.resign()
    assert list(open_problems(client)) == ["overdue:web1"]
    unscheduled = make_config(
        tmp_path,
        redis_server.url,
        scheduler={"gc_interval_seconds": None},
        notifications=notifications,
    )
    sched = Scheduler(unscheduled, client, configure(unscheduled), name="t2")
    try:
        sched.tick(start + timedelta(hours=3))
        assert open_problems(client) == {}
        sched.tick(start + timedelta(hours=3, seconds=1))  # hands the recovery over
        wait_until(lambda: len(webhook_server.events()) == 2, 30, "problem and recovery")
    finally:
        sched.notifier.join(10)
        sched.leadership.resign()
    events = webhook_server.events()
    assert [e["event"] for e in events] == ["problem", "recovery"]
    assert "no schedule covers it" in events[1]["summary"]
