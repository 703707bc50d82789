"""Starting a domain's QEMU from its ``launch`` description: paused for a restore, or normally.

``launch.argv`` (worker/config.py, docs/restore.md) is rendered with the domain's QMP
socket and the restored image paths. For a restore, ``-S -incoming defer`` is appended:
the guest CPUs never run and the block nodes stay inactive until the restore's writable
NBD export activates them (QEMU ``block-export-add``). QEMU's stdout and stderr go to a log
file; when QEMU exits before its QMP socket answers, the tail of that log is the error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmvault.worker.config import LaunchConfig
from vmvault.worker.errors import WorkerError
from vmvault.worker.qmp import QmpConnectError, QmpSession, socket_is_listening

INCOMING_ARGS = ("-S", "-incoming", "defer")
_START_TIMEOUT = 30.0
# How long a QEMU that refused a QMP connection gets to show it is exiting.
_EXIT_GRACE = 2.0
_STDERR_TAIL = 2000


class LaunchError(WorkerError):
    """QEMU could not be started from the launch description. Not retryable as is."""


@dataclass
class QemuProcess:
    """A QEMU started by restore; it outlives the restore unless stopped."""

    domain: str
    pid: int
    qmp: Path
    log: Path
    argv: list[str]
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Wait for QEMU to exit; its exit code, or None when still running after ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the QEMU (teardown after a failed restore) and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def log_tail(path: Path, limit: int = _STDERR_TAIL) -> str:
    """The last ``limit`` characters of a log file, stripped ('' when there is none)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def render_argv(
    domain: str, launch: LaunchConfig, qmp: Path, images: dict[str, Path], *, incoming: bool
) -> list[str]:
    """The QEMU argv for ``images`` (every ``{disk:NAME}`` must have one, and vice versa)."""
    wanted = launch.disk_names()
    missing = [name for name in wanted if name not in images]
    if missing:
        raise LaunchError(
            f"domain {domain!r}: launch.argv uses {{disk:{missing[0]}}} but disk {missing[0]!r}"
            f" is not being restored (restored: {', '.join(sorted(images)) or 'none'})"
        )
    unused = [name for name in images if name not in wanted]
    if unused:
        raise LaunchError(
            f"domain {domain!r}: disk {unused[0]!r} is restored but launch.argv has no"
            f" {{disk:{unused[0]}}} placeholder: add it to the domain's launch.argv"
        )
    argv = launch.render(qmp, images)
    return argv + list(INCOMING_ARGS) if incoming else argv


def ensure_qmp_free(domain: str, qmp: Path) -> None:
    """Refuse when something (the domain's running QEMU) already listens on ``qmp``."""
    if socket_is_listening(qmp):
        raise LaunchError(
            f"domain {domain!r}: something already listens on its QMP socket {qmp}:"
            " stop the running QEMU before restoring into the domain"
        )


def start_qemu(
    domain: str,
    argv: list[str],
    qmp: Path,
    log: Path,
    *,
    timeout: float = _START_TIMEOUT,
    on_start: Callable[[int], None] | None = None,
) -> QemuProcess:
    """Start QEMU in its own session and wait until its QMP socket accepts connections.

    ``on_start(pid)`` runs as soon as the process exists (the restore journal records it).
    """
    ensure_qmp_free(domain, qmp)
    # A stale socket file from a QEMU that died would make the wait below see the old file.
    qmp.unlink(missing_ok=True)
    qmp.parent.mkdir(parents=True, exist_ok=True)
    if not log.parent.exists():
        log.parent.mkdir(parents=True, mode=0o700)  # QEMU's stderr may name the guest's data
    with log.open("ab") as out:
        out.write(f"--- vmvault: starting {' '.join(argv)}\n".encode())
        out.flush()
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except OSError as err:
            raise LaunchError(
                f"domain {domain!r}: cannot start {argv[0]}: {err.strerror}"
                " (check launch.argv[0] in the config)"
            ) from err
    process = QemuProcess(domain, popen.pid, qmp, log, argv, popen)
    try:
        if on_start is not None:
            on_start(popen.pid)
        _wait_for_qmp(process, timeout)
    except BaseException:
        # Nobody else knows this QEMU yet (the caller's teardown starts with our return):
        # a timeout, an exit or an interrupt while waiting must not leave it running.
        process.kill()
        raise
    return process


def connect_qmp(process: QemuProcess) -> QmpSession:
    """A QMP session to a QEMU this process started.

    QEMU listens on its QMP socket before it has parsed all of its arguments: one that
    then exits (a bad ``-drive`` option) resets the connection. That is reported as the
    launch failure it is, with QEMU's stderr, not as a QMP connection error.
    """
    session = QmpSession(process.domain, process.qmp)
    try:
        session.connect()
    except QmpConnectError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(_EXIT_GRACE)
        code = process.popen.poll()
        if code is not None:
            raise _exited(process, code) from None
        raise
    return session


def _exited(process: QemuProcess, code: int) -> LaunchError:
    tail = log_tail(process.log).split("--- vmvault: starting")[-1]
    stderr = "\n".join(tail.splitlines()[1:]).strip() or "(no output)"
    return LaunchError(
        f"domain {process.domain!r}: QEMU exited with code {code} before its QMP socket"
        f" {process.qmp} was ready; its stderr:\n{stderr}"
    )


def _wait_for_qmp(process: QemuProcess, timeout: float) -> None:
    domain, qmp, log, popen = process.domain, process.qmp, process.log, process.popen
    deadline = time.monotonic() + timeout
    while not socket_is_listening(qmp):
        code = popen.poll()
        if code is not None:
            raise _exited(process, code)
        if time.monotonic() > deadline:
            raise LaunchError(
                f"domain {domain!r}: QEMU did not open its QMP socket {qmp} within"
                f" {timeout:.0f}s (does launch.argv use -qmp unix:{{qmp}},server=on,wait=off?);"
                f" log: {log}"
            )
        time.sleep(0.05)
