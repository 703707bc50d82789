"""Fleet-wide leases in Redis: a key with a TTL, owned by a random token, renewed while held.

Used for the per-domain job lock (one backup/restore per domain across all hosts) and, with
the same code, for the scheduler's leader lease. The owner renews the TTL from a daemon
thread; if a renewal finds the key gone or owned by someone else (Redis restarted, TTL
expired while the process was stalled), the lease is *lost*: ``lost`` is set and
``check()`` raises, so the job stops at its next progress report instead of carrying on
next to a second owner. A holder that dies simply stops renewing: the key expires after
its TTL and the next job can take it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import redis

from vmvault.worker.errors import WorkerError
from vmvault.worker.redis_keys import DOMAIN_LOCK_PREFIX

log = logging.getLogger(__name__)

# Compare-and-extend / compare-and-delete: only the token holder may touch the key.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LockBusyError(WorkerError):
    """Someone else holds the lease. Retryable: once their job ends or the TTL runs out."""

    retryable = True


class LockLostError(WorkerError):
    """The lease expired or was taken over while held. The job stopped; retryable as a new job."""

    retryable = True


class RedisLease:
    """One lease on ``key``: ``acquire()`` once, ``check()`` often, ``release()`` at the end."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        ttl: float,
        owner: str = "",
        renew_every: float | None = None,
    ) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(int(ttl * 1000), 100)
        # The token names the owner for operators reading Redis, plus randomness for safety.
        self.token = f"{owner}:{secrets.token_hex(8)}" if owner else secrets.token_hex(8)
        self.renew_every = renew_every if renew_every is not None else ttl / 3
        self.lost = threading.Event()
        # Monotonic time until which the key is surely still ours: the start of the last
        # successful SET/renewal plus the TTL (the server's expiry is later than that).
        self._valid_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def try_acquire(self) -> bool:
        """Take the lease if free (SET NX PX); start renewing. False when someone holds it."""
        sent = time.monotonic()
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._valid_until = sent + self.ttl_ms / 1000
        self.lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease:{self.key}", daemon=True
        )
        self._thread.start()
        return True

    def acquire(self) -> None:
        """Take the lease or raise ``LockBusyError`` naming the holder."""
        if not self.try_acquire():
            holder = self.client.get(self.key)
            who = holder.decode(errors="replace") if isinstance(holder, bytes) else "unknown"
            raise LockBusyError(
                f"{self.key} is held by {who}: another job runs; retry when it ends "
                f"(or after the {self.ttl_ms / 1000:.0f}s TTL if its worker died)"
            )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            sent = time.monotonic()
            try:
                ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
            except redis.RedisError as err:
                log.warning("lease %s: renewal failed: %s", self.key, err)
                if time.monotonic() >= self._valid_until:
                    log.error("lease %s: lost (Redis unreachable for a whole TTL)", self.key)
                    self.lost.set()
                    return
                continue
            if not ok:
                log.error("lease %s: lost (expired or taken over)", self.key)
                self.lost.set()
                return
            self._valid_until = sent + self.ttl_ms / 1000

    def check(self) -> None:
        """Raise ``LockLostError`` if the lease was lost; cheap, call it on every progress step.

        Besides the renewal thread's verdict, the clock decides: once a TTL has passed
        since the last renewal Redis confirmed, the key may have expired and been taken
        by another job, even while a renewal is still hanging on an unreachable Redis.
        """
        if not self.lost.is_set() and time.monotonic() >= self._valid_until:
            self.lost.set()
        if self.lost.is_set():
            raise LockLostError(
                f"{self.key}: lease lost (TTL expired or taken over); the job stopped safely"
            )

    def release(self) -> None:
        """Stop renewing and delete the key if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self._release(keys=[self.key], args=[self.token])
        except redis.RedisError as err:
            # The TTL frees it anyway.
            log.warning("lease %s: release failed: %s", self.key, err)

    def __enter__(self) -> RedisLease:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@contextmanager
def domain_lease(
    client: redis.Redis, domain: str, ttl: float, owner: str = ""
) -> Iterator[RedisLease]:
    """Hold the fleet-wide lock of ``domain`` for the duration of the block."""
    lease = RedisLease(client, DOMAIN_LOCK_PREFIX + domain, ttl, owner=owner)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
