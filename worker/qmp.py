"""QMP session to one QEMU: a thin, typed, synchronous facade over ``qemu.qmp``'s async client.

Each session owns a private asyncio event loop, so it can be used from plain threads
(CLI, Celery worker threads) without touching a global loop. Every error keeps QEMU's
``error.desc`` and names the domain, so an operator reads one line and knows where to look.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError

from vmvault.worker.errors import WorkerError
from vmvault.worker.signals import critical

_T = TypeVar("_T")

DEFAULT_TIMEOUT = 30.0
# A QMP greeting comes at once from a live QEMU; longer means frozen or not QEMU.
_CONNECT_TIMEOUT = 10.0


class QmpError(WorkerError):
    """Base of QMP errors. Not retryable unless a subclass says so."""


class QmpConnectError(QmpError):
    """The domain's QMP socket is missing, refuses, or is not QEMU. Retryable once QEMU runs."""

    retryable = True


class QmpCommandError(QmpError):
    """QEMU answered a command with an error; ``desc`` is QEMU's own text. Not retryable as is."""

    def __init__(self, domain: str, command: str, klass: str, desc: str) -> None:
        super().__init__(f"domain {domain!r}: QMP {command} failed: {desc} ({klass})")
        self.domain = domain
        self.command = command
        self.klass = klass
        self.desc = desc


class QmpDisconnectedError(QmpError):
    """QEMU went away in the middle of a command (killed or quit). Retryable."""

    retryable = True


@dataclass(frozen=True)
class DirtyBitmapInfo:
    """One dirty bitmap as ``query-named-block-nodes`` reports it."""

    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    busy: bool
    granularity: int
    count: int

    @classmethod
    def from_qmp(cls, data: Mapping[str, Any]) -> DirtyBitmapInfo:
        return cls(
            name=str(data["name"]),
            recording=bool(data.get("recording", True)),
            persistent=bool(data.get("persistent", False)),
            inconsistent=bool(data.get("inconsistent", False)),
            busy=bool(data.get("busy", False)),
            granularity=int(data["granularity"]),
            count=int(data.get("count", 0)),
        )


@dataclass(frozen=True)
class BlockNode:
    """One node of ``query-named-block-nodes`` (flat)."""

    node_name: str
    driver: str
    file: str
    virtual_size: int
    read_only: bool
    backing_file: str | None
    bitmaps: tuple[DirtyBitmapInfo, ...]

    @classmethod
    def from_qmp(cls, data: Mapping[str, Any]) -> BlockNode:
        image = data.get("image", {})
        return cls(
            node_name=str(data["node-name"]),
            driver=str(data["drv"]),
            file=str(data.get("file", "")),
            virtual_size=int(image.get("virtual-size", 0)),
            read_only=bool(data.get("ro", False)),
            backing_file=data.get("backing_file"),
            # Block jobs add anonymous bitmaps (no "name"): they are not ours to see.
            bitmaps=tuple(
                DirtyBitmapInfo.from_qmp(b) for b in data.get("dirty-bitmaps", []) if "name" in b
            ),
        )


def check_socket(domain: str, path: Path) -> None:
    """Fail early, with a clear message, when ``path`` is not a unix socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise QmpConnectError(
            f"domain {domain!r}: QMP socket {path} does not exist (is the domain running?)"
        ) from None
    except OSError as err:
        raise QmpConnectError(f"domain {domain!r}: cannot stat QMP socket {path}: {err}") from err
    if not stat.S_ISSOCK(mode):
        raise QmpConnectError(f"domain {domain!r}: {path} is not a unix socket (QMP expected)")


class QmpSession:
    """A connected QMP session to the QEMU of one domain.

    Use :func:`open_session` (a context manager) rather than the constructor.
    """

    def __init__(self, domain: str, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.domain = domain
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(domain)

    # -- plumbing -----------------------------------------------------------------------------

    def _run(self, aw: Awaitable[_T], timeout: float | None) -> _T:
        # SIGTERM/SIGINT wait for the command (bounded by ``timeout``): an exception raised
        # inside the event loop would leave the session half way through a command.
        with critical():
            return self._loop.run_until_complete(asyncio.wait_for(aw, timeout))

    def connect(self, timeout: float | None = None) -> None:
        """Connect and negotiate capabilities; ``QmpConnectError`` when it is not QEMU."""
        check_socket(self.domain, self.path)
        timeout = timeout or min(self.timeout, _CONNECT_TIMEOUT)
        try:
            self._run(self._client.connect(str(self.path)), timeout)
        except TimeoutError as err:
            self._drop()
            raise QmpConnectError(
                f"domain {self.domain!r}: no QMP greeting on {self.path} within {timeout:.0f}s "
                "(is its QEMU frozen, or is it not a QEMU QMP socket?)"
            ) from err
        except (QMPError, OSError) as err:
            self._drop()
            cause = err.__cause__ or err
            if isinstance(cause, ConnectionRefusedError):
                raise QmpConnectError(
                    f"domain {self.domain!r}: nothing listens on QMP socket {self.path}: "
                    "the domain is not running (stale socket file)"
                ) from err
            if isinstance(err, GreetingError) or isinstance(cause, GreetingError):
                raise QmpConnectError(
                    f"domain {self.domain!r}: {self.path} is not a QEMU QMP socket "
                    "(no QMP greeting): check domains.<name>.qmp in the config"
                ) from err
            raise QmpConnectError(
                f"domain {self.domain!r}: cannot connect to QMP socket {self.path}: {cause}"
            ) from err

    def _drop(self) -> None:
        with suppress(Exception):
            self._run(self._client.disconnect(), 5.0)

    def close(self) -> None:
        """Disconnect (idempotent) and close the private loop."""
        if self._loop.is_closed():
            return
        self._drop()
        self._loop.close()

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        try:
            return self._run(
                self._client.execute(command, dict(arguments) if arguments else None),
                timeout or self.timeout,
            )
        except ExecuteError as err:
            error = err.error.error
            raise QmpCommandError(self.domain, command, error.class_, error.desc) from err
        except TimeoutError as err:
            raise QmpDisconnectedError(
                f"domain {self.domain!r}: QMP {command} got no answer within "
                f"{timeout or self.timeout:.0f}s (is its QEMU frozen?)"
            ) from err
        except (QMPError, OSError, EOFError) as err:
            raise QmpDisconnectedError(
                f"domain {self.domain!r}: QMP connection lost during {command}: {err}"
            ) from err

    # -- typed helpers --------------------------------------------------------------------------

    def query_status(self) -> str:
        """The run state (``running``, ``paused``, ``inmigrate``, ...)."""
        return str(self.execute("query-status")["status"])

    def query_block(self) -> list[dict[str, Any]]:
        """``query-block``: the guest-visible block devices (``qdev`` and root ``inserted``)."""
        return cast(list[dict[str, Any]], self.execute("query-block"))

    def named_block_nodes(self) -> list[BlockNode]:
        """``query-named-block-nodes`` with ``flat: true``: every node once, with its bitmaps."""
        nodes = self.execute("query-named-block-nodes", {"flat": True})
        return [BlockNode.from_qmp(n) for n in nodes]

    def transaction(self, actions: list[dict[str, Any]]) -> None:
        """One atomic ``transaction``: all actions take effect, or none."""
        if actions:
            self.execute("transaction", {"actions": actions})

    def blockdev_add(self, options: Mapping[str, object]) -> None:
        self.execute("blockdev-add", options)

    def blockdev_del(self, node_name: str) -> None:
        self.execute("blockdev-del", {"node-name": node_name})

    def bitmap_add(
        self,
        node: str,
        name: str,
        *,
        persistent: bool,
        disabled: bool = False,
        granularity: int | None = None,
    ) -> None:
        args: dict[str, object] = {"node": node, "name": name, "persistent": persistent}
        if disabled:
            args["disabled"] = True
        if granularity is not None:
            args["granularity"] = granularity
        self.execute("block-dirty-bitmap-add", args)

    def bitmap_remove(self, node: str, name: str) -> None:
        self.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    def set_drive(self, qdev: str, node: str) -> None:
        """Point guest device ``qdev`` at block node ``node`` (``qom-set`` of its drive
        property; QEMU 6.0+ allows it on a running device)."""
        self.execute("qom-set", {"path": qdev, "property": "drive", "value": node})

    def nbd_server_start(self, socket_path: Path) -> None:
        """Start QEMU's NBD server on a unix socket (``SocketAddressLegacy``, valid 7.2–10.x)."""
        self.execute(
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(socket_path)}}},
        )

    def nbd_server_stop(self) -> None:
        self.execute("nbd-server-stop")

    def block_export_add(
        self,
        export_id: str,
        node: str,
        name: str,
        bitmaps: Sequence[str | Mapping[str, str]],
        writable: bool = False,
    ) -> None:
        """An NBD export of ``node``; ``bitmaps`` by name, or ``{node, name}`` (QEMU 7.1+)."""
        args: dict[str, object] = {
            "type": "nbd",
            "id": export_id,
            "node-name": node,
            "name": name,
            "writable": writable,
        }
        if bitmaps:
            args["bitmaps"] = list(bitmaps)
        self.execute("block-export-add", args)

    def block_exports(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.execute("query-block-exports"))

    def block_export_del(self, export_id: str, wait: float = 10.0) -> None:
        """Remove an export and wait until QEMU has really dropped it (it is asynchronous)."""
        self.execute("block-export-del", {"id": export_id, "mode": "hard"})
        self._wait(
            lambda: all(e["id"] != export_id for e in self.block_exports()),
            wait,
            f"export {export_id} to go away",
        )

    def block_jobs(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.execute("query-block-jobs"))

    def block_job_cancel(self, job_id: str, wait: float = 10.0) -> None:
        """Cancel a block job and wait until it is gone (its target can then be deleted)."""
        self.execute("block-job-cancel", {"device": job_id, "force": True})
        self._wait(
            lambda: all(j["device"] != job_id for j in self.block_jobs()),
            wait,
            f"block job {job_id} to finish cancelling",
        )

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (tests use ``qemu-io`` through it)."""
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise QmpError(f"domain {self.domain!r}: timed out waiting for {what}")
            time.sleep(0.02)


@contextmanager
def open_session(domain: str, path: Path, timeout: float = DEFAULT_TIMEOUT) -> Iterator[QmpSession]:
    """Connect to the QMP socket of ``domain``; always disconnects."""
    session = QmpSession(domain, path, timeout)
    try:
        session.connect()
        yield session
    finally:
        session.close()


def socket_is_listening(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
