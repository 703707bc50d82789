"""A tiny loopback TCP proxy in front of the S3 server that can fail on command.

Modes: ``pass`` (forward bytes both ways), ``503`` (answer every HTTP request with
503 SlowDown, as S3 does when throttling), and ``down`` (listener closed: connection
refused, as for a stopped endpoint).
"""

from __future__ import annotations

import contextlib
import socket
import threading

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyProxy:
    """Forward 127.0.0.1:<port> to ``upstream``; ``mode`` can be switched at any time."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.requests = 0
        self.failures = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port: int = probe.getsockname()[1]
        probe.close()
        self.listen()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        t = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        t.start()
        self._threads.append(t)

    def throttle(self) -> None:
        """Answer 503 SlowDown from now on, also to clients with pooled connections."""
        self.mode = "503"
        self._drop_connections()

    def _drop_connections(self) -> None:
        # Kept-alive connections would otherwise carry on passing requests through.
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def go_down(self) -> None:
        """Close the listener: new connections are refused, open ones are cut."""
        self.mode = "down"
        self._drop_connections()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None

    def come_back(self) -> None:
        self.mode = "pass"
        if self._listener is None:
            self.listen()

    def close(self) -> None:
        self._stop.set()
        self.go_down()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            if self.mode == "503":
                self._refuse(client)
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            self.requests += 1
            with self._conns_lock:
                self._conns.update((client, upstream))
            try:
                with upstream:
                    t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
                    t.start()
                    _pump(client, upstream)
                    t.join(30)
            finally:
                with self._conns_lock:
                    self._conns.difference_update((client, upstream))

    def _refuse(self, client: socket.socket) -> None:
        """Read one request head (and its body unless it waits for 100-continue), answer 503."""
        self.requests += 1
        self.failures += 1
        client.settimeout(5)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            header, _, body = head.partition(b"\r\n\r\n")
            lower = header.lower()
            length = 0
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if b"expect: 100-continue" not in lower:
                while len(body) < length:
                    data = client.recv(65536)
                    if not data:
                        break
                    body += data
            client.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOWDOWN) + _SLOWDOWN
            )


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
