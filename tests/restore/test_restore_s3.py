"""Restores from an ``s3://`` repository on a real SeaweedFS, and the store going away mid-restore.

The store is reached through a small TCP relay so the test can cut the network at a chosen
moment (the shared SeaweedFS keeps running for the other tests).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.s3 import S3Bucket
from tests.restore.conftest import CHUNK, ConfigFactory, MiB, images_equal, make_image, write_backup
from vmvault.storage.backends import RetryPolicy
from vmvault.storage.backends import s3 as backends
from vmvault.storage.errors import BackendUnavailableError
from vmvault.storage.repository import init_repository
from vmvault.worker.restore import RestoreReadError, run_restore


class Relay:
    """Forwards 127.0.0.1:port to the S3 endpoint until ``cut()`` drops every connection."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.cut_event = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut_event.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_event.is_set():
                client.close()
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """The store becomes unreachable: listener closed, live connections reset."""
        self.cut_event.set()
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()


@pytest.fixture
def relay(s3_server: S3Bucket) -> Iterator[Relay]:
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    relay = Relay(port)
    try:
        yield relay
    finally:
        relay.cut()


def test_restore_from_s3_bit_exact_then_store_unreachable(
    tmp_path: Path, s3_server: S3Bucket, relay: Relay, fleet_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    endpoint = f"http://127.0.0.1:{relay.port}"
    url = s3_server.repo_url()
    repo = init_repository(url, endpoint_url=endpoint, chunk_size=CHUNK)
    src = tmp_path / "src"
    src.mkdir()
    vda0 = make_image(src / "a0.raw", 6 * MiB, 7, [(2 * MiB, 1 * MiB)])
    b0 = write_backup(repo, "web1", {"vda": vda0})
    vda1 = make_image(src / "a1.raw", 6 * MiB, 8, [(0, 3 * MiB)])
    b1 = write_backup(repo, "web1", {"vda": vda1}, parent=b0)
    repo.close()
    config = fleet_config(url, endpoint_url=endpoint)
    for manifest, ref in ((b0, vda0), (b1, vda1)):
        out = tmp_path / manifest.backup_id
        result = run_restore(config, "web1", backup_id=manifest.backup_id, to_dir=out)
        assert images_equal(ref, result.disks[0].path)

    # Few, quick retries: the point is the error, not riding out the outage.
    quick = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
    monkeypatch.setattr(backends, "RetryPolicy", lambda: quick)

    def cut_after_first_chunks(phase: str, done: int, total: int) -> None:
        if done >= 2 * CHUNK:
            relay.cut()

    out = tmp_path / "cut"
    # BackendUnavailableError (retries exhausted) or RestoreReadError (a transport error the
    # backend leaves unmapped): either way one line naming backup, disk and offset.
    with pytest.raises(
        (BackendUnavailableError, RestoreReadError),
        match=rf"web1 backup {b0.backup_id} disk vda offset \d+",
    ):
        run_restore(
            config, "web1", backup_id=b0.backup_id, to_dir=out, progress=cut_after_first_chunks
        )
    assert list(out.iterdir()) == []  # no partial image is left behind
