"""Restore tests: restore a domain's latest backup into a scratch directory, start it
isolated and paused, check that QEMU accepts it, then throw it all away.

    <state_dir>/restore-tests/<domain>-<token>/   0700, one per test
        lock            flock held for the test's life: a dead test's lock is free
        pid             the test QEMU's pid (its own session: killed as a group)
        images/         the restored disks
        qmp, qemu.log   the test QEMU's private QMP socket and output

The QEMU runs from the domain's ``launch`` argv with its network devices removed and
its files and sockets (guest agent, serial logs, monitors) moved into the scratch
directory (``worker/isolate.py``; the live domain keeps its own), and ``-S``: the guest
CPUs never run. The outcome is recorded as the
backup's verification (kind ``restore-test``). ``clean_restore_tests`` removes what a
killed test left (the reaper calls it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmvault.storage.errors import StorageError
from vmvault.storage.verification import new_check, record_check
from vmvault.worker.config import FleetConfig
from vmvault.worker.errors import WorkerError
from vmvault.worker.guest_agent import GuestAgent, GuestAgentError
from vmvault.worker.isolate import isolated_argv, relocate_files
from vmvault.worker.launch import QemuProcess, connect_qmp, render_argv, start_qemu
from vmvault.worker.restore import run_restore

log = logging.getLogger(__name__)

SCRATCH_DIR = "restore-tests"


class RestoreTestError(WorkerError):
    """A restore test could not be set up (no backup, no launch description)."""


class RestoreTestFailedError(WorkerError):
    """A restore test ran and the restored backup did not start (recorded as FAILED)."""


def scratch_root(state_dir: Path) -> Path:
    return state_dir / SCRATCH_DIR


@contextlib.contextmanager
def _scratch(state_dir: Path, domain: str) -> Iterator[Path]:
    """A fresh scratch directory, locked while the test runs, removed after it."""
    root = scratch_root(state_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / f"{domain}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        _remove(path)
        os.close(fd)


def _remove(path: Path) -> None:
    """Kill the test QEMU named in ``path/pid`` (its process group), delete ``path``."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int((path / "pid").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def clean_restore_tests(state_dir: Path) -> int:
    """Remove the scratch directories of dead restore tests (their lock is free);
    returns how many. A running test holds its lock: its directory is left alone."""
    root = scratch_root(state_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for path in sorted(root.iterdir()):
        try:
            fd = os.open(path / "lock", os.O_RDWR)
        except FileNotFoundError:
            # Killed before its lock existed (or a stray entry): nothing can hold it.
            _remove(path)
            removed += 1
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        log.warning("restore test: removing %s left by a killed test", path)
        _remove(path)
        removed += 1
    return removed


def _wait_for_agent(domain: str, path: Path, process: QemuProcess, timeout: float) -> str:
    """Wait until the restored guest's agent answers ``guest-ping``; ``"agent answered"``.
    ``RestoreTestError`` after ``timeout`` seconds, or when QEMU exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not process.alive():
            raise RestoreTestError(f"the restored {domain} exited while booting")
        try:
            with GuestAgent(domain, path, timeout=min(5.0, timeout)) as agent:
                agent.connect()
                agent.ping()
                return "agent answered"
        except GuestAgentError as err:
            last = str(err)
        time.sleep(0.5)
    raise RestoreTestError(
        f"the restored {domain}'s guest agent did not answer guest-ping within {timeout:.0f}s "
        f"({last})"
    )


def run_restore_test(
    config: FleetConfig, domain: str, timeout: float = 60.0, boot: str = "paused"
) -> dict[str, Any]:
    """Restore-test the latest backup of ``domain``; the outcome, also recorded.

    ``boot``: ``paused`` (``-S``; QEMU must answer on QMP, the guest paused) or ``agent``
    (booted; its guest agent must answer ``guest-ping`` within ``timeout``).
    """
    dom = config.domain(domain)
    if boot == "agent" and dom.guest_agent is None:
        raise RestoreTestError(
            f"domain {domain!r} has no guest_agent: a restore test with boot: agent waits "
            "for the restored guest's agent"
        )
    if dom.launch is None:
        raise RestoreTestError(
            f"domain {domain!r} has no launch description: a restore test starts the restored "
            "backup from domains.<name>.launch"
        )
    with config.repository.open() as repo:
        manifest = repo.latest_manifest(domain)
    if manifest is None:
        raise RestoreTestError(f"domain {domain!r} has no backup to restore-test")
    problems: list[str] = []
    status = ""
    with _scratch(config.state_dir, domain) as scratch:
        process: QemuProcess | None = None
        try:
            result = run_restore(
                config, domain, backup_id=manifest.backup_id, to_dir=scratch / "images"
            )
            images = {d.name: d.path for d in result.disks}
            argv = render_argv(domain, dom.launch, scratch / "qmp", images, incoming=False)
            if dom.guest_agent is not None:
                # The live domain's agent socket must stay its own.
                live, own = str(dom.guest_agent), str(scratch / "qga")
                argv = [a.replace(live, own) for a in argv]
            # Its other files and sockets (serial logs, monitors) too.
            keep = {str(scratch / "qmp"), *(str(p) for p in images.values())}
            argv = isolated_argv(relocate_files(argv, scratch, keep))
            if boot == "paused":
                argv.append("-S")

            def note_pid(pid: int) -> None:
                (scratch / "pid").write_text(str(pid))

            process = start_qemu(
                domain,
                argv,
                scratch / "qmp",
                scratch / "qemu.log",
                timeout=timeout,
                on_start=note_pid,
            )
            session = connect_qmp(process)
            try:
                status = session.query_status()
            finally:
                session.close()
            if boot == "agent":
                status = _wait_for_agent(domain, scratch / "qga", process, timeout)
            elif status not in ("prelaunch", "paused"):
                problems.append(f"restored QEMU is {status!r}, not paused")
        except (WorkerError, StorageError) as err:
            if getattr(err, "retryable", False):
                raise  # e.g. the domain is busy with a backup: no verdict on the backup
            problems.append(f"restore test of {manifest.backup_id}: {err}")
        finally:
            if process is not None:
                process.kill()
    check = new_check("restore-test", problems)
    with config.repository.open() as repo:
        record_check(repo, domain, manifest.backup_id, check)
    return {
        "domain": domain,
        "backup_id": manifest.backup_id,
        "ok": check.ok,
        "status": status,
        "problems": problems,
    }
