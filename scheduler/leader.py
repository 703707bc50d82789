"""Scheduler leadership: the replica holding a Redis lease plans and enqueues; others wait.

The lease is the same compare-and-renew key as the domain lock (``worker.redis_lock``).
Leadership alone does not make enqueueing exactly-once (a stalled leader may act after
its lease expired): every scheduled job is also claimed with SET NX on a per-slot key
before it is sent, so two leaders can never both send it (see ``scheduler_loop``).
"""

from __future__ import annotations

import logging
import os
import socket

import redis

from vmvault.worker.redis_keys import LEADER_KEY
from vmvault.worker.redis_lock import RedisLease

log = logging.getLogger(__name__)


class Leadership:
    """Keeps trying to hold the leader lease; ``is_leader()`` says whether we hold it now."""

    def __init__(self, client: redis.Redis, ttl: float, name: str | None = None) -> None:
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease = RedisLease(client, LEADER_KEY, ttl, owner=self.name)
        self._held = False

    def is_leader(self) -> bool:
        """True while the lease is ours; tries to take it when free (never blocks long)."""
        if self._held and not self.lease.lost.is_set():
            # The renewal thread notices a lost lease within ttl/3; asking Redis here
            # closes that window for the tick about to run (one GET per tick).
            try:
                if self.lease.client.get(LEADER_KEY) == self.lease.token.encode():
                    return True
            except redis.RedisError as err:
                log.warning("scheduler %s: cannot check the leader lease: %s", self.name, err)
                return False
            self.lease.release()
            self.lease.lost.set()
        if self._held:
            log.warning("scheduler %s: lost leadership", self.name)
            self._held = False
        try:
            self._held = self.lease.try_acquire()
        except redis.RedisError as err:
            log.warning("scheduler %s: cannot reach Redis for the leader lease: %s", self.name, err)
            return False
        if self._held:
            log.info("scheduler %s: now leader", self.name)
        return self._held

    def holder(self) -> str | None:
        """Who holds the lease right now (the token's owner part), if anyone."""
        raw = self.lease.client.get(LEADER_KEY)
        if not isinstance(raw, bytes):
            return None
        return raw.decode(errors="replace").rsplit(":", 1)[0]

    def resign(self) -> None:
        """Give the lease up (clean shutdown) so another replica takes over at once."""
        if self._held:
            self.lease.release()
            self._held = False
