"""The Celery application shared by workers, the scheduler and the CLI.

One module-level ``app``; ``configure(config)`` points it at the fleet's Redis (broker and
result backend) and sets the delivery rules every job relies on:

- ``acks_late`` + ``prefetch 1``: a message is acknowledged only after its job ends, and a
  worker holds at most one job it has not started, so a killed worker loses nothing
  (Redis redelivers unacked messages after ``visibility_timeout``).
- Priorities on the Redis transport (0 first): restores ahead of scheduled backups.
- Connection retries forever: a Redis restart pauses the fleet, it does not kill workers.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from vmvault.worker.config import FleetConfig
from vmvault.worker.routing import PRIORITY

app = Celery("vmvault", include=["vmvault.worker.tasks"])

_config: FleetConfig | None = None


def celery_settings(config: FleetConfig) -> dict[str, Any]:
    """Celery settings derived from the fleet config (pure; tested on its own)."""
    url = config.broker_url()  # with the password from broker_password_file
    if url is None:
        raise ValueError("celery_settings needs a config with a broker")
    sched = config.scheduler
    return {
        "broker_url": url,
        "result_backend": url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_time_limit": sched.job_time_limit_seconds,
        # The soft limit raises inside the job so its teardown runs before the hard kill.
        "task_soft_time_limit": max(sched.job_time_limit_seconds - 60, 5),
        "task_default_priority": PRIORITY["backup"],
        "task_default_queue": "storage",
        "result_expires": 7 * 86400,
        "result_extended": True,
        "broker_transport_options": {
            "visibility_timeout": sched.visibility_timeout_seconds,
            # Look for messages of dead workers every few seconds (kombu's default scans
            # every 10th 10 s tick), a cheap ZRANGE on the unacked index.
            "unacked_restore_interval": max(1, min(10, sched.visibility_timeout_seconds // 5)),
            "unacked_restore_throttle": 1,
            # Ten real priority levels instead of kombu's default four buckets.
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        # A Redis blip must not cancel running backups: they hold their own leases.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "worker_enable_remote_control": True,
        "broker_pool_limit": 4,
    }


def configure(config: FleetConfig) -> Celery:
    """Point ``app`` at the fleet's broker; the tasks read ``config`` through ``fleet_config()``."""
    global _config
    settings = celery_settings(config)
    if app.conf.broker_url and app.conf.broker_url != settings["broker_url"]:
        # Re-pointed at another Redis (tests, long-lived tools): drop the cached connection
        # pools and result backend built for the old one.
        app.close()
        app._after_fork()
        app._backend_cache = None
        app._local = threading.local()
    app.conf.update(settings)
    _config = config
    return app


def fleet_config() -> FleetConfig:
    """The config this process was configured with (workers: from ``vmvault worker``)."""
    if _config is None:
        # A worker child started without configure(): load the same file the parent used.
        from vmvault.worker.config import load_config

        configure(load_config(None))
    assert _config is not None
    return _config
