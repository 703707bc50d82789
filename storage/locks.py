"""Repository locks with leases: shared for backups in flight, exclusive for GC.

A lock is an object ``locks/<id>.json`` holding who took it and until when it is
valid (``expires``). Its holder renews it every ``ttl / 4``; a holder that dies
stops renewing and its lock lapses after at most ``ttl``. Nobody else ever has to
clean up after a crash: an expired lock is ignored (and removed by the next GC).

    backup A  ──shared──────────────────────┐ commit
    backup B        ──shared──────┐ abort   │
    gc                                          ──exclusive── (only when no live lock)

Taking a lock is "create, then look": write your own lock object, then list the
others. A shared lock conflicts with a live exclusive one; an exclusive lock
conflicts with any live lock. When two processes race, each sees the other's
object after writing its own (S3 and POSIX file systems give read-after-write
consistency for new keys), so at least one of them backs off — possibly both,
which is safe: ``RepositoryLockedError`` is retryable.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from storage.backends import Backend
from storage.errors import (
    LeaseExpiredError,
    ObjectNotFoundError,
    RepositoryLockedError,
    StorageError,
)
from storage.format import LOCKS_PREFIX, iso

log = logging.getLogger(__name__)

LockKind = Literal["shared", "exclusive"]

DEFAULT_LEASE_TTL = 600.0


def _clock() -> float:
    """Seconds on a clock that keeps running while the process is stopped or suspended."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


@dataclass(frozen=True)
class LockInfo:
    """A lock object as read back from the repository."""

    key: str
    kind: LockKind | Literal["unreadable"]
    purpose: str
    host: str
    pid: int
    created: datetime
    expires: datetime

    def live(self, now: datetime) -> bool:
        return self.expires > now

    def describe(self) -> str:
        return (
            f"{self.kind} lock for {self.purpose} held by {self.host} pid {self.pid} "
            f"(until {iso(self.expires)}, object {self.key})"
        )


def _parse(key: str, data: bytes, modified: datetime) -> LockInfo:
    try:
        doc = json.loads(data)
        return LockInfo(
            key=key,
            kind=doc["kind"] if doc["kind"] in ("shared", "exclusive") else "unreadable",
            purpose=str(doc["purpose"]),
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            created=datetime.fromisoformat(doc["created"].replace("Z", "+00:00")),
            expires=datetime.fromisoformat(doc["expires"].replace("Z", "+00:00")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        # An unreadable lock is treated as live for a day from its write time: we
        # cannot tell whose it is, and guessing "stale" could let GC race a backup.
        return LockInfo(key, "unreadable", "?", "?", 0, modified, modified + timedelta(days=1))


def list_locks(backend: Backend) -> list[LockInfo]:
    """Every lock object in the repository, live or expired."""
    locks = []
    for info in backend.list(LOCKS_PREFIX):
        try:
            data = backend.get(info.key)
        except ObjectNotFoundError:
            continue  # released while we listed
        except StorageError as err:
            # Unreadable is not absent: it may be a live backup's lock. Count it as live
            # (like an unparsable one) so that GC backs off instead of racing a writer.
            log.warning("cannot read lock %s: %s", info.key, err)
            data = b""
        locks.append(_parse(info.key, data, info.modified))
    return locks


class Lease:
    """A lock this process holds, renewed in a background thread until released."""

    def __init__(self, backend: Backend, kind: LockKind, purpose: str, ttl: float) -> None:
        self.backend = backend
        self.kind: LockKind = kind
        self.purpose = purpose
        self.ttl = ttl
        self.id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(6)}"
        self.key = f"{LOCKS_PREFIX}{self.id}.json"
        self.created = datetime.now(UTC)
        self._renewed = 0.0  # _clock() of the last successful write
        # Set once a renewal came later than ttl after the previous one: another
        # process may have seen the lock expired (and GC run) in between. Sticky.
        self.lapsed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = datetime.now(UTC)
        doc = {
            "kind": self.kind,
            "purpose": self.purpose,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": iso(self.created),
            "expires": iso(now + timedelta(seconds=self.ttl)),
        }
        return json.dumps(doc).encode()

    def _write(self) -> None:
        started = _clock()
        if self._renewed and started - self._renewed >= self.ttl:
            self.lapsed = True
        self.backend.put(self.key, self._body())
        # Count validity from before the write: the object may have landed early.
        self._renewed = started

    def acquire(self) -> Lease:
        """Write the lock, check for conflicts, start renewing. Raises when in conflict."""
        self._write()
        try:
            now = datetime.now(UTC)
            for other in list_locks(self.backend):
                if other.key == self.key or not other.live(now):
                    continue
                if self.kind == "exclusive" or other.kind != "shared":
                    raise RepositoryLockedError(
                        f"repository {self.backend.url} is locked: {other.describe()}; retry later"
                    )
        except BaseException:
            self._delete()
            raise
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease-{self.id}", daemon=True
        )
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write()
            except StorageError as err:
                # Keep trying: the lease is still valid until ttl after the last write.
                log.warning("cannot renew %s: %s", self.key, err)

    def check(self) -> None:
        """``LeaseExpiredError`` when the lease may have lapsed (GC could have run)."""
        age = _clock() - self._renewed
        if self.lapsed or age >= self.ttl:
            raise LeaseExpiredError(
                f"{self.purpose}: lease {self.key} lapsed (last renewed {age:.0f}s ago, "
                f"ttl {self.ttl:.0f}s); a GC may have run meanwhile: retry"
            )

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        self.stop_renewing()
        self._delete()

    def _delete(self) -> None:
        try:
            self.backend.delete(self.key)
        except StorageError as err:
            log.warning("cannot remove lock %s (it expires by itself): %s", self.key, err)
