"""qemu-nbd: serve one image file writable on a unix socket, for one client.

The one place vmvault starts qemu-nbd (restore to files; bench/restore_bench.py gives
nbdcopy's qemu-nbd the same command line and environment).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vmvault.worker.errors import WorkerError

QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 15.0


class QemuNbdError(WorkerError):
    """qemu-nbd is missing, exited or never listened. Not retryable: see the message."""


def supports_direct_io(path: Path) -> bool:
    """True when ``path``'s file system takes ``O_DIRECT`` (tmpfs, for one, does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return True


def argv(path: Path, socket: Path, export: str) -> list[str]:
    """How vmvault serves a fresh qcow2 image.

    ``--cache=none --aio=native`` (O_DIRECT) where the file system allows it: the data
    goes to the file without a page-cache copy, and reading it back for verification
    reads the file, not a cached copy. That took qemu-nbd from 1.2-1.8 to 0.9 CPU-seconds
    per GiB restored here. Elsewhere (tmpfs) ``--cache=writeback``.
    """
    cache = ["--cache=none", "--aio=native"] if supports_direct_io(path) else ["--cache=writeback"]
    return [
        QEMU_NBD,
        "--format=qcow2",
        f"--socket={socket}",
        f"--export-name={export}",
        *cache,
        "--discard=unmap",
        str(path),
    ]


def env() -> dict[str, str]:
    """qemu-nbd's environment: glibc malloc tuned for its per-request bounce buffers.

    qemu-nbd allocates a buffer per request (4 MiB for a chunk). Above glibc's mmap
    threshold every such buffer is a fresh mmap, so each request faults in and zeroes a
    thousand pages, and munmaps them again. Serving them from the heap, and not trimming
    it, lets the buffers be reused: qemu-nbd went from 1.0 to 0.4 CPU-seconds per GiB
    restored here.
    """
    return {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(64 * 1024 * 1024),
        "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024),
    }


@contextlib.contextmanager
def serve(
    path: Path, socket: Path, export: str, on_start: Callable[[int], None] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-nbd`` serving ``path`` writable on a 0600 unix socket, for one client.

    Without ``--persistent`` qemu-nbd exits once its client disconnects, after closing the
    image cleanly (qcow2 metadata written); we wait for that before the image is used.
    ``on_start(pid)`` runs as soon as it is started (the restore journal records it).
    """
    try:
        # umask 077: the socket is created 0600 (it lives in a 0700 directory anyway).
        proc = subprocess.Popen(
            argv(path, socket, export), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, umask=0o077, start_new_session=True, env=env(),
        )  # fmt: skip
    except FileNotFoundError as err:
        raise QemuNbdError("qemu-nbd not found: install qemu-utils") from err
    try:
        if on_start is not None:
            on_start(proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise QemuNbdError(f"qemu-nbd for {path} exited early: {stderr}")
            if time.monotonic() > deadline:
                raise QemuNbdError(f"qemu-nbd for {path} did not create {socket} in time")
            time.sleep(0.01)
        os.chmod(socket, 0o600)
        yield proc
    finally:
        if proc.poll() is None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
