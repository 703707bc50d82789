"""A lease holder cut off from Redis must consider its lease lost once the key expired.

Real Redis; the holder talks to it through a small TCP relay that the test "cuts" (it
stops forwarding bytes but keeps the sockets open, like a network partition), so the
holder's renewal hangs until its socket timeout while another client takes the key.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
import redis

from tests.fixtures.common import wait_until
from tests.fixtures.redis import RedisServer
from vmvault.worker.redis_lock import LockLostError, RedisLease


class _Relay:
    """TCP relay to Redis; ``cut()`` silently drops all traffic from then on."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.cut_event = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    return
                if not self.cut_event.is_set():
                    dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        self.cut_event.set()

    def close(self) -> None:
        self.cut_event.set()
        for sock in self.sockets:
            # shutdown() wakes a thread blocked in accept()/recv(); close() alone does not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def relay(redis_server: RedisServer) -> Iterator[_Relay]:
    proxy = _Relay(redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_partitioned_holder_sees_loss_when_key_expires(
    redis_server: RedisServer, relay: _Relay
) -> None:
    holder_client = redis.Redis(host="127.0.0.1", port=relay.port, socket_timeout=4)
    direct = redis_server.client()
    lease = RedisLease(holder_client, "vmvault:lock:domain:web1", ttl=1.5, owner="hv1/job1")
    lease.acquire()
    try:
        relay.cut()
        # The key expires within one TTL of the last renewal; a second job takes it.
        other = RedisLease(direct, lease.key, ttl=30, owner="hv2/job2")
        wait_until(other.try_acquire, 5, "the second job takes the expired lock")
        try:
            # From now on two jobs would run on the domain: the first must stop at its
            # next progress report, not seconds later when its renewal times out.
            with pytest.raises(LockLostError):
                lease.check()
        finally:
            other.release()
    finally:
        # Stop the renewal thread: un-cut errors its hanging call (a RedisError it handles).
        lease._stop.set()
        relay.close()
        if lease._thread is not None:
            lease._thread.join(timeout=10)
