"""A lock whose holder died on this host is broken at once; any other lock is respected.

Holders are real processes killed with SIGKILL; lock objects are edited to stand for a
holder on another host, a reused pid, or a vmvault that did not record enough to tell.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.conftest import CHUNK, Target
from tests.storage.helpers import write_full
from vmvault.storage.errors import RepositoryLockedError
from vmvault.storage.gc import collect_garbage
from vmvault.storage.locks import Lease

REPO_ROOT = Path(__file__).resolve().parents[2]

_HOLDER = """
import sys, time
from vmvault.storage.backends import open_backend
from vmvault.storage.locks import Lease
backend = open_backend(sys.argv[1], endpoint_url=sys.argv[2] or None)
lease = Lease(backend, sys.argv[3], "test holder", 600).acquire()
print(lease.key, flush=True)
time.sleep(600)
"""


class Holders:
    """Lock-holding subprocesses of one test; all killed at the end."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, kind: str) -> tuple[subprocess.Popen[bytes], str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, self.target.url, self.target.endpoint_url or "", kind],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        key = proc.stdout.readline().decode().strip()
        assert key.startswith("locks/"), key
        return proc, key

    def dead(self, kind: str) -> tuple[int, str]:
        """A holder killed with SIGKILL (and reaped): its pid and lock key."""
        proc, key = self.start(kind)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return proc.pid, key

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.fixture
def holders(target: Target) -> Iterator[Holders]:
    h = Holders(target)
    yield h
    h.stop()


def _edit(target: Target, key: str, **changes: object) -> None:
    backend = target.backend()
    doc = json.loads(backend.get(key))
    for name, value in changes.items():
        if value is None:
            doc.pop(name, None)
        else:
            doc[name] = value
    backend.put(key, json.dumps(doc).encode())


def _broken(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and key in r.getMessage() and "breaking" in r.getMessage()
    ]


def test_dead_backup_lock_is_broken_by_gc(
    target: Target, holders: Holders, caplog: pytest.LogCaptureFixture
) -> None:
    repo = target.init()
    write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    pid, key = holders.dead("shared")
    assert repo.backend.exists(key)
    caplog.set_level(logging.WARNING)
    report = collect_garbage(repo, grace=0)  # at once, not after the 600 s ttl
    assert report.backups == 1
    assert not repo.backend.exists(key)
    (message,) = _broken(caplog, key)
    assert f"pid {pid}" in message and "gone" in message
    assert list(repo.backend.list("locks/")) == []


def test_dead_gc_lock_is_broken_by_a_backup_even_before_it_is_reaped(
    target: Target, holders: Holders, caplog: pytest.LogCaptureFixture
) -> None:
    repo = target.init()
    proc, key = holders.start("exclusive")
    os.kill(proc.pid, signal.SIGKILL)
    # Not reaped yet: the pid is a zombie, which renews nothing either.
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 60
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the killed holder never became a zombie"
        time.sleep(0.05)
    caplog.set_level(logging.WARNING)
    m = write_full(repo, "vm", {"vda": os.urandom(CHUNK)})
    assert [b.backup_id for b in repo.list_manifests()] == [m.backup_id]
    assert _broken(caplog, key)
    proc.wait(30)


def test_a_live_holder_is_never_broken(target: Target, holders: Holders) -> None:
    repo = target.init()
    proc, key = holders.start("shared")
    with pytest.raises(RepositoryLockedError, match=f"pid {proc.pid}"):
        collect_garbage(repo, grace=0)
    assert repo.backend.exists(key)
    holders.stop()
    repo.backend.delete(key)
    # Nor a lease of this very process (another thread's).
    own = Lease(repo.backend, "exclusive", "gc in this process", 600).acquire()
    try:
        with pytest.raises(RepositoryLockedError, match="gc in this process"):
            repo.open_backup("vm", None, "full", "test", None)
    finally:
        own.release()


def test_a_lock_of_another_host_is_never_broken(target: Target, holders: Holders) -> None:
    repo = target.init()
    _, key = holders.dead("shared")
    _edit(target, key, host="some-other-host")
    with pytest.raises(RepositoryLockedError, match="some-other-host"):
        collect_garbage(repo, grace=0)
    assert repo.backend.exists(key)


def test_a_lock_of_another_boot_or_pid_namespace_is_never_broken(
    target: Target, holders: Holders
) -> None:
    """Same host name, but another kernel boot or a container's own pid space: the pid
    says nothing about that holder, so its lock must wait for its ttl."""
    repo = target.init()
    for field, value in (("boot_id", "00000000-0000-0000-0000-000000000000"), ("pid_ns", "x")):
        _, key = holders.dead("shared")
        _edit(target, key, **{field: value})
        with pytest.raises(RepositoryLockedError):
            collect_garbage(repo, grace=0)
        assert repo.backend.exists(key)
        repo.backend.delete(key)


def test_a_lock_whose_pid_was_reused_is_broken(
    target: Target, holders: Holders, caplog: pytest.LogCaptureFixture
) -> None:
    """The holder died and its pid now names another process: its start time differs."""
    repo = target.init()
    backend = target.backend()
    _, key = holders.dead("shared")
    other, other_key = holders.start("shared")  # a live process, started later
    dead_start = json.loads(backend.get(key))["pid_start"]
    assert json.loads(backend.get(other_key))["pid_start"] != dead_start
    _edit(target, key, pid=other.pid)
    # `other`'s own live lock is not what this test is about (it renews every 150 s).
    backend.delete(other_key)
    caplog.set_level(logging.WARNING)
    collect_garbage(repo, grace=0)
    assert not repo.backend.exists(key)
    (message,) = _broken(caplog, key)
    assert f"pid {other.pid}" in message and "reused" in message


def test_a_lock_without_process_details_waits_for_its_ttl(target: Target, holders: Holders) -> None:
    """A lock written by an older vmvault (no boot id, pid namespace, start time)."""
    repo = target.init()
    _, key = holders.dead("shared")
    _edit(target, key, boot_id=None, pid_ns=None, pid_start=None)
    with pytest.raises(RepositoryLockedError):
        collect_garbage(repo, grace=0)
    assert repo.backend.exists(key)
