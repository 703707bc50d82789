"""QEMU guest agent client: a few typed calls over the QGA chardev socket, every wait bounded.

The host end of the guest agent's virtio-serial port is a QEMU chardev (``-chardev
socket,path=<guest_agent>,server=on,wait=off``). The protocol is QMP-like JSON lines with
two traps this client deals with:

- The agent keeps no session: an answer to a command whose client gave up (timed out,
  died) comes out to the *next* client. So every connection starts with
  ``guest-sync-delimited``: a ``0xFF`` byte resets the agent's JSON parser, the agent
  answers the sync with ``0xFF`` followed by ``{"return": <id>}``, and everything read
  before the delimiter is stale and dropped.
- A hung agent (a guest that is frozen, busy, or has no agent running) simply never
  answers: every read is bounded by a deadline, and a call that timed out leaves the
  connection in an unknown state, so it is closed (the next call reconnects and syncs).

Commands used (qemu-ga's ``qga/qapi-schema.json``): ``guest-ping``,
``guest-fsfreeze-freeze``, ``guest-fsfreeze-freeze-list`` (mountpoints),
``guest-fsfreeze-thaw``, ``guest-fsfreeze-status``, ``guest-exec``,
``guest-exec-status``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vmvault.worker.errors import WorkerError

DEFAULT_TIMEOUT = 10.0
_DELIMITER = b"\xff"
_MAX_LINE = 16 * 1024 * 1024  # guest-exec output comes base64-encoded in one line

FreezeStatus = Literal["thawed", "frozen"]


class GuestAgentError(WorkerError):
    """Base of guest agent errors. Retryable (the agent may be starting or busy)."""

    retryable = True


class GuestAgentUnavailableError(GuestAgentError):
    """No agent answers on the socket: missing socket, QEMU not listening, or no reply to
    the sync handshake (no agent running in the guest, or it hangs)."""


class GuestAgentTimeoutError(GuestAgentError):
    """A command got no answer in time; the connection was dropped."""


class GuestAgentProtocolError(GuestAgentError):
    """The agent answered something that is not a valid answer to the command. The guest
    is not trusted: whatever it sends ends as this error, never as another exception."""


class GuestAgentCommandError(GuestAgentError):
    """The agent answered with an error; ``desc`` is the agent's own text."""

    def __init__(self, domain: str, command: str, klass: str, desc: str) -> None:
        super().__init__(f"domain {domain!r}: guest agent {command} failed: {desc} ({klass})")
        self.klass = klass
        self.desc = desc


@dataclass(frozen=True)
class ExecResult:
    """The end of a process started with ``guest-exec``."""

    exitcode: int | None  # None: ended by a signal
    signal: int | None
    stdout: bytes
    stderr: bytes


class GuestAgent:
    """A connection to one domain's guest agent (connects and syncs on first use)."""

    def __init__(self, domain: str, path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.domain = domain
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def connect(self, timeout: float | None = None) -> None:
        """Connect and sync; ``GuestAgentUnavailableError`` when no agent answers in time."""
        self.close()
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError as err:
            sock.close()
            raise GuestAgentUnavailableError(
                f"domain {self.domain!r}: cannot connect to the guest agent socket "
                f"{self.path}: {err.strerror or err}"
            ) from err
        self._sock = sock
        sync_id = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        try:
            self._send(_DELIMITER + json.dumps(request).encode() + b"\n")
            # Everything before the agent's delimiter is a stale answer (or the parser's
            # complaint about our 0xFF): drop it.
            while True:
                self._fill(deadline, "the sync handshake")
                _, sep, rest = self._buf.partition(_DELIMITER)
                if sep:
                    self._buf = rest
                    break
                self._buf = b""
            while True:
                reply = self._read_reply(deadline, "the sync handshake")
                if reply.get("return") == sync_id:
                    return
        except GuestAgentTimeoutError as err:
            self.close()
            raise GuestAgentUnavailableError(
                f"domain {self.domain!r}: the guest agent on {self.path} did not answer "
                f"within {timeout:.0f}s (is qemu-ga running in the guest?)"
            ) from err

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as err:
            self.close()
            raise GuestAgentUnavailableError(
                f"domain {self.domain!r}: guest agent connection lost: {err}"
            ) from err

    def _fill(self, deadline: float, what: str) -> None:
        """Read more bytes into the buffer before ``deadline``."""
        assert self._sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestAgentTimeoutError(
                f"domain {self.domain!r}: guest agent gave no answer to {what} in time"
            )
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError as err:
            raise GuestAgentTimeoutError(
                f"domain {self.domain!r}: guest agent gave no answer to {what} in time"
            ) from err
        except OSError as err:
            raise GuestAgentUnavailableError(
                f"domain {self.domain!r}: guest agent connection lost during {what}: {err}"
            ) from err
        if not data:
            raise GuestAgentUnavailableError(
                f"domain {self.domain!r}: guest agent connection closed during {what}"
            )
        self._buf += data
        if len(self._buf) > _MAX_LINE:
            raise GuestAgentError(f"domain {self.domain!r}: guest agent answer too long")

    def _read_reply(self, deadline: float, what: str) -> dict[str, Any]:
        """The next JSON object line (lines that are not JSON objects are skipped)."""
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if not sep:
                self._fill(deadline, what)
                continue
            self._buf = rest
            try:
                reply = json.loads(line.strip(b"\xff \r\t").decode())
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(reply, dict):
                return reply

    def call(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one command and return its ``return`` value; connects (and syncs) first."""
        if self._sock is None:
            self.connect()
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        try:
            reply = self._read_reply(deadline, command)
        except GuestAgentError as err:
            self.close()  # an answer may still come: this connection is out of step
            if isinstance(err, GuestAgentTimeoutError):
                raise GuestAgentTimeoutError(
                    f"domain {self.domain!r}: guest agent {command} got no answer within "
                    f"{timeout:.0f}s"
                ) from err
            raise
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise GuestAgentCommandError(
                self.domain, command, str(error.get("class"))[:100], str(error.get("desc"))[:500]
            )
        if "return" not in reply:
            raise self._bad(command, reply)
        return reply["return"]

    def _bad(self, command: str, answer: object) -> GuestAgentProtocolError:
        return GuestAgentProtocolError(
            f"domain {self.domain!r}: guest agent gave an unexpected answer to {command}: "
            f"{json.dumps(answer)[:200]}"
        )

    def _int(self, command: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(command, value)
        return value

    # -- typed calls ----------------------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> None:
        self.call("guest-ping", timeout=timeout)

    def fsfreeze_status(self, timeout: float | None = None) -> FreezeStatus:
        status = self.call("guest-fsfreeze-status", timeout=timeout)
        if status not in ("thawed", "frozen"):
            raise self._bad("guest-fsfreeze-status", status)
        return "frozen" if status == "frozen" else "thawed"

    def fsfreeze_freeze(
        self, mountpoints: list[str] | None = None, timeout: float | None = None
    ) -> int:
        """Freeze the guest's file systems (or only ``mountpoints``); returns how many.

        On an error the agent thaws what it had frozen; on a timeout nobody knows: the
        caller must thaw.
        """
        if mountpoints:
            command = "guest-fsfreeze-freeze-list"
            frozen = self.call(command, {"mountpoints": mountpoints}, timeout=timeout)
        else:
            command = "guest-fsfreeze-freeze"
            frozen = self.call(command, timeout=timeout)
        return self._int(command, frozen)

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        """Thaw every frozen file system; returns how many were thawed."""
        return self._int("guest-fsfreeze-thaw", self.call("guest-fsfreeze-thaw", timeout=timeout))

    def exec(self, path: str, args: list[str], timeout: float | None = None) -> int:
        """Start ``path args...`` in the guest with its output captured; returns its pid."""
        reply = self.call(
            "guest-exec",
            {"path": path, "arg": args, "capture-output": True},
            timeout=timeout,
        )
        if not isinstance(reply, dict):
            raise self._bad("guest-exec", reply)
        return self._int("guest-exec", reply.get("pid"))

    def exec_status(self, pid: int, timeout: float | None = None) -> ExecResult | None:
        """The process's result once it exited, else None."""
        reply = self.call("guest-exec-status", {"pid": pid}, timeout=timeout)
        if not isinstance(reply, dict):
            raise self._bad("guest-exec-status", reply)
        if not reply.get("exited"):
            return None
        try:
            return ExecResult(
                exitcode=_optional_int(reply.get("exitcode")),
                signal=_optional_int(reply.get("signal")),
                stdout=base64.b64decode(str(reply.get("out-data", "")), validate=True),
                stderr=base64.b64decode(str(reply.get("err-data", "")), validate=True),
            )
        except ValueError as err:  # binascii.Error is a ValueError
            raise self._bad("guest-exec-status", reply) from err

    def run(self, path: str, args: list[str], timeout: float) -> ExecResult:
        """Run a command in the guest and wait for it, at most ``timeout`` seconds.

        ``GuestAgentTimeoutError`` when it did not end in time (it is left running: the
        agent has no way to kill it).
        """
        deadline = time.monotonic() + timeout
        pid = self.exec(path, args, timeout=min(self.timeout, timeout))
        pause = 0.02
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestAgentTimeoutError(
                    f"domain {self.domain!r}: guest command {path} (pid {pid}) did not end "
                    f"within {timeout:.0f}s"
                )
            result = self.exec_status(pid, timeout=min(self.timeout, max(left, 1.0)))
            if result is not None:
                return result
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.5)


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r}")
    return value
