"""Delivering the notification outbox: fan out per target, send in order, retry with backoff.

Run by the scheduler leader at each tick, never inside a job::

    vmvault:notify:outbox ──LPOP+RPUSH (one script)──► vmvault:notify:queue:<target> ...
                                                          │ head: send, then pop (ack)
                                                          ▼
                                                        webhook / SMTP

* Fan-out moves an event from the outbox to every target's queue in one Lua script: a
  kill between the two loses nothing and copies nothing twice.
* Each target's queue is sent in order by its own thread, so a target that hangs until
  its timeout delays neither the tick nor the other targets.
* Deliver-then-ack: the head is popped only after the target took it (or after
  ``max_tries`` failures, with an error log line). A scheduler killed mid-send re-sends
  that event later: delivery is at least once, never lost.
* A per-target Redis lock around each send keeps two schedulers (a stalled leader and
  its successor) from sending the same event at once.
* After a failure the target waits ``retry_seconds``, doubled per further failure (at
  most an hour); the state lives in Redis so a new leader keeps the backoff.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from vmvault.scheduler.notify_send import DeliveryError, send
from vmvault.worker.config import FleetConfig
from vmvault.worker.notify_events import Event
from vmvault.worker.redis_keys import NOTIFY_OUTBOX, NOTIFY_QUEUE_PREFIX, NOTIFY_RETRY

log = logging.getLogger(__name__)

_MAX_BACKOFF = 3600.0
# Events moved from the outbox per tick at most (the rest waits for the next tick).
_FAN_OUT_BATCH = 1000
_LOCK_PREFIX = "vmvault:notify:sending:"

# KEYS: outbox, target queues... Returns the moved event or nil.
_FAN_OUT = """
local event = redis.call('LPOP', KEYS[1])
if not event then return false end
for i = 2, #KEYS do redis.call('RPUSH', KEYS[i], event) end
return event
"""
# KEYS: target queue, retry hash. ARGV: the event that was sent, target name.
_ACK = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('LPOP', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Sender = Callable[[FleetConfig, str, Event], None]


def backoff(retry_seconds: float, tries: int) -> float:
    """Seconds to wait after the ``tries``-th failed try (1-based)."""
    return float(min(retry_seconds * 2 ** (tries - 1), _MAX_BACKOFF))


class Notifier:
    """The leader's delivery of queued events; ``pump()`` once per tick."""

    def __init__(self, config: FleetConfig, client: redis.Redis, sender: Sender = send) -> None:
        self.config = config
        self.client = client
        self.sender = sender
        self._threads: dict[str, threading.Thread] = {}

    def pump(self) -> None:
        """Fan the outbox out and start a sender thread for each target with work to do.

        Returns at once: sending happens in the threads.
        """
        targets = self.config.notifications.targets()
        self._fan_out(targets)
        for target in targets:
            thread = self._threads.get(target)
            if thread is not None and thread.is_alive():
                continue
            if not self.client.llen(NOTIFY_QUEUE_PREFIX + target):
                continue
            thread = threading.Thread(
                target=self._deliver_safely, args=(target,), name=f"notify-{target}", daemon=True
            )
            self._threads[target] = thread
            thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the sender threads (``scheduler --once``, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads.values()):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            thread.join(left)

    def _fan_out(self, targets: list[str]) -> int:
        keys = [NOTIFY_OUTBOX, *(NOTIFY_QUEUE_PREFIX + t for t in targets)]
        moved = 0
        while moved < _FAN_OUT_BATCH:
            event = self.client.eval(_FAN_OUT, len(keys), *keys)
            if event is None:
                break
            moved += 1
            if not targets:
                log.info("notify: no targets configured, event dropped: %s", event)
        return moved

    def _deliver_safely(self, target: str) -> None:
        try:
            self.deliver(target)
        except redis.RedisError as err:
            log.warning("notify: target %s: Redis unreachable, retrying next tick: %s", target, err)
        except Exception:
            log.exception("notify: target %s: delivery crashed; retrying next tick", target)

    def deliver(self, target: str) -> int:
        """Send ``target``'s due events in order until its queue is empty or a send fails.

        Returns how many events the target took.
        """
        settings = self.config.notifications
        queue = NOTIFY_QUEUE_PREFIX + target
        sent = 0
        while True:
            raw = self.client.lindex(queue, 0)
            if not isinstance(raw, bytes):
                return sent
            retry = self._retry_state(target)
            if retry.get("next", 0.0) > time.time():
                return sent
            token = uuid.uuid4().hex
            lock = _LOCK_PREFIX + target
            ttl = int(self._timeout(target)) + 5  # a send ends within its timeout
            if not self.client.set(lock, token, nx=True, ex=ttl):
                return sent  # another scheduler is sending to this target right now
            try:
                if self.client.lindex(queue, 0) != raw:
                    continue  # the other scheduler sent it before we locked
                try:
                    event = Event.from_json(raw)
                except (ValueError, TypeError) as err:
                    # Someone wrote garbage into the queue: dropping it beats stalling it.
                    log.error(
                        "notify: target %s: dropped an unreadable event %r: %s", target, raw, err
                    )
                    self.client.eval(_ACK, 2, queue, NOTIFY_RETRY, raw, target)
                    continue
                try:
                    self.sender(self.config, target, event)
                except DeliveryError as err:
                    tries = int(retry.get("tries", 0)) + 1
                    if tries >= settings.max_tries:
                        log.error(
                            "notify: target %s: giving up on an event after %d tries: %s "
                            "(event: %s)",
                            target,
                            tries,
                            err,
                            raw.decode(errors="replace"),
                        )
                        self.client.eval(_ACK, 2, queue, NOTIFY_RETRY, raw, target)
                        continue
                    wait = backoff(settings.retry_seconds, tries)
                    log.warning(
                        "notify: target %s: try %d/%d failed, next in %.0fs: %s",
                        target,
                        tries,
                        settings.max_tries,
                        wait,
                        err,
                    )
                    self.client.hset(
                        NOTIFY_RETRY,
                        target,
                        json.dumps({"tries": tries, "next": time.time() + wait}),
                    )
                    return sent
                self.client.eval(_ACK, 2, queue, NOTIFY_RETRY, raw, target)
                sent += 1
                log.info("notify: target %s: sent %s", target, raw.decode(errors="replace"))
            finally:
                self.client.eval(_UNLOCK, 1, lock, token)

    def _retry_state(self, target: str) -> dict[str, float]:
        raw = self.client.hget(NOTIFY_RETRY, target)
        if not isinstance(raw, bytes):
            return {}
        try:
            state = json.loads(raw)
            return {"tries": float(state["tries"]), "next": float(state["next"])}
        except (ValueError, KeyError, TypeError):
            # Hand-edited or from a future release: start the backoff over rather than stall.
            log.warning("notify: target %s: unreadable retry state %r, reset", target, raw)
            return {}

    def _timeout(self, target: str) -> float:
        settings = self.config.notifications
        if target in settings.webhooks:
            return settings.webhooks[target].timeout_seconds
        if target in settings.email:
            return settings.email[target].timeout_seconds
        return 60.0
