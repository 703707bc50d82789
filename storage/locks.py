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

A holder killed with SIGKILL (or by the OOM killer, or a power cut of its container)
would block GC or every backup for up to ``ttl``. So a lock records, besides host and
pid, the kernel boot id, the pid namespace and the process start time
(``/proc/<pid>/stat`` field 22). A conflicting lock is *broken* (deleted, with a
WARNING naming it) only when all of these say its holder is provably dead: same host
name, same boot, same pid namespace, and that pid is gone, a zombie, or now a process
that started at another time (pid reused). A lock of another host, another boot or
namespace, a live process, or one that lacks these fields (an older vmvault) is never
broken: it waits for its ``expires``.
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
from functools import cache
from pathlib import Path
from typing import Literal

from vmvault.storage.backends import Backend
from vmvault.storage.errors import (
    LeaseExpiredError,
    ObjectNotFoundError,
    RepositoryLockedError,
    StorageError,
)
from vmvault.storage.format import LOCKS_PREFIX, MAX_LOCK_BYTES, iso, parse_json

log = logging.getLogger(__name__)

LockKind = Literal["shared", "exclusive"]

DEFAULT_LEASE_TTL = 600.0
# GC never deletes an object younger than this (seconds): a backup in flight may still
# reference it (docs/repository-format.md, "Garbage collection").
DEFAULT_GRACE = 3600.0


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
    # Who exactly the holder is, on its host (None in locks of older vmvaults).
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: int | None = None

    def live(self, now: datetime) -> bool:
        return self.expires > now

    def dead_holder(self) -> str | None:
        """Why this lock's holder is provably dead (a local process that is gone), else None.

        None means "cannot tell": another host, boot or pid namespace, a live process,
        or a lock without the fields to decide. Such a lock must be respected.
        """
        if self.kind == "unreadable" or self.pid <= 0:
            return None
        if self.boot_id is None or self.pid_ns is None or self.pid_start is None:
            return None
        if (self.host, self.boot_id, self.pid_ns) != _process_space():
            return None
        state = _proc_state(self.pid)
        if state is None:
            return f"pid {self.pid} is gone"
        status, start = state
        if start is None:
            return None  # unreadable: it may well be alive
        if start != self.pid_start:
            return f"pid {self.pid} was reused by a process started later"
        if status in ("Z", "X"):
            return f"pid {self.pid} has exited"
        return None

    def describe(self) -> str:
        return (
            f"{self.kind} lock for {self.purpose} held by {self.host} pid {self.pid} "
            f"(until {iso(self.expires)}, object {self.key})"
        )


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _parse(key: str, data: bytes, modified: datetime) -> LockInfo:
    try:
        doc = parse_json(data, f"lock {key}", MAX_LOCK_BYTES)
        start = doc.get("pid_start")
        return LockInfo(
            key=key,
            kind=doc["kind"] if doc["kind"] in ("shared", "exclusive") else "unreadable",
            purpose=str(doc["purpose"]),
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            created=datetime.fromisoformat(doc["created"].replace("Z", "+00:00")),
            expires=datetime.fromisoformat(doc["expires"].replace("Z", "+00:00")),
            boot_id=_optional_str(doc.get("boot_id")),
            pid_ns=_optional_str(doc.get("pid_ns")),
            pid_start=start if isinstance(start, int) and not isinstance(start, bool) else None,
        )
    except (StorageError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        # An unreadable lock is treated as live for a day from its write time: we
        # cannot tell whose it is, and guessing "stale" could let GC race a backup.
        return LockInfo(key, "unreadable", "?", "?", 0, modified, modified + timedelta(days=1))


@cache
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


@cache
def _pid_ns() -> str | None:
    """``pid:[4026531836]``: pids are only comparable within one pid namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_space() -> tuple[str, str | None, str | None]:
    """Where this process's pids mean something: host name, kernel boot, pid namespace."""
    return socket.gethostname(), _boot_id(), _pid_ns()


def _proc_state(pid: int) -> tuple[str, int | None] | None:
    """``(state letter, start time in clock ticks after boot)`` of ``pid``; None if gone.

    A start time of None means "could not read it": the caller must then assume alive.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?", None
    # "pid (comm) state ppid ..." where comm may hold spaces and ')': split after the last.
    try:
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])  # field 3 (state) and field 22 (starttime)
    except (ValueError, IndexError):
        return "?", None


def _own_start() -> int | None:
    state = _proc_state(os.getpid())
    return None if state is None else state[1]


def list_locks(backend: Backend) -> list[LockInfo]:
    """Every lock object in the repository, live or expired."""
    locks = []
    for info in backend.list(LOCKS_PREFIX):
        try:
            data = backend.get(info.key, max_size=MAX_LOCK_BYTES)
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
        self._pid_start = _own_start()

    def _body(self) -> bytes:
        now = datetime.now(UTC)
        doc = {
            "kind": self.kind,
            "purpose": self.purpose,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "boot_id": _boot_id(),
            "pid_ns": _pid_ns(),
            "pid_start": self._pid_start,
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
                    if self._break(other):
                        continue
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

    def _break(self, other: LockInfo) -> bool:
        """Delete ``other`` if its holder is provably dead (see the module docstring)."""
        why = other.dead_holder()
        if why is None:
            return False
        log.warning(
            "breaking %s lock %s (%s): its holder on this host, %s pid %d, is dead: %s",
            other.kind,
            other.key,
            other.purpose,
            other.host,
            other.pid,
            why,
        )
        # Deleting twice (two processes breaking it at once) is harmless, and a dead
        # holder cannot write its lock again.
        self.backend.delete(other.key)
        return True

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
